"""Character-level data: the corpus, its vocabulary, and the grain pipelines for training and evaluation.

Shapes: B windows in a batch (the global batch, or this process's rows of it), T positions (data.seq_len).
A window is T + 1 consecutive characters: inputs are its first T, targets its last T.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import functools
import hashlib
import importlib.resources
import json
import lzma
import os

from absl import flags
import grain
import numpy as np

SHAKESPEARE_SHA256 = '1e4f4c9b4a7010d27d177eea410a36fb5923c05398445cb5fda9020fe6da2d81'
_EMBEDDED = 'shakespeare.txt.xz'
# Element i of the training dataset is the global batch of step i. The range is lazy, so its length costs
# nothing; 2**40 steps is more than any run will take.
_NUM_BATCHES = 2**40

Batch = dict[str, np.ndarray]


class DataError(ValueError):
  """A bad data input; the message is one line naming the problem and the path."""


def _name(path: str) -> str:
  return path if path else 'the embedded corpus'


def _load_embedded() -> str:
  resource = importlib.resources.files('selattn.corpora') / _EMBEDDED
  try:
    data = lzma.decompress(resource.read_bytes())
  except (OSError, lzma.LZMAError) as e:
    raise DataError(f'cannot read the embedded corpus {resource}: {e}') from None
  if hashlib.sha256(data).hexdigest() != SHAKESPEARE_SHA256:
    raise DataError(f'the embedded corpus {resource} fails its sha256 check; rebuild it with '
                    'python -m selattn.corpora.build_corpus')
  return data.decode('ascii')


def load_text(path: str) -> str:
  """Returns the text of the UTF-8 file `path`, or the embedded Shakespeare corpus when `path` is ''."""
  if not path:
    return _load_embedded()
  if os.path.isdir(path):
    raise DataError(f'data.path={path} is a directory, not a text file')
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except FileNotFoundError:
    from selattn.corpora import fetch  # pylint: disable=g-import-not-at-top
    known = [name for name, src in fetch.CORPORA.items() if src.filename == os.path.basename(path)]
    hint = f' (python -m selattn.corpora.fetch {known[0]} downloads it)' if known else ''
    raise DataError(f'data.path={path}: no such file{hint}') from None
  except OSError as e:
    raise DataError(f'data.path={path}: cannot read it ({e.strerror})') from None
  if not data:
    raise DataError(f'data.path={path} is empty')
  try:
    # Decode the bytes ourselves: text mode would translate '\r\n', and the corpus must be what the file holds.
    return data.decode('utf-8')
  except UnicodeDecodeError as e:
    raise DataError(f'data.path={path} is not UTF-8 text: byte 0x{data[e.start]:02x} at offset {e.start}') from None


def _codepoints(text: str) -> np.ndarray:
  # UTF-32 is one uint32 per character, so whole texts convert without a Python loop.
  return np.frombuffer(text.encode('utf-32-le'), dtype='<u4')


@dataclasses.dataclass(frozen=True)
class Vocab:
  """The symbols of a character model: token id i is `chars[i]`."""

  chars: str

  def __post_init__(self):
    if not self.chars:
      raise DataError('the vocabulary is empty')
    if len(set(self.chars)) != len(self.chars):
      raise DataError(f'the vocabulary repeats characters: {self.chars!r}')

  @classmethod
  def from_text(cls, text: str) -> Vocab:
    """The sorted distinct characters of `text` (the original's vocabulary)."""
    return cls(''.join(sorted(set(text))))

  @property
  def size(self) -> int:
    return len(self.chars)

  @functools.cached_property
  def _table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # (code points by id, sorted code points, id of each sorted code point): the second and third give a
    # searchsorted lookup that does not assume `chars` is sorted (a saved vocabulary may not be).
    points = _codepoints(self.chars)
    order = np.argsort(points)
    return points, points[order], order.astype(np.int32)

  def encode(self, text: str) -> np.ndarray:
    """Returns the token ids int32[len(text)]; a character outside the vocabulary is a DataError."""
    _, keys, ids = self._table
    points = _codepoints(text)
    pos = np.minimum(np.searchsorted(keys, points), len(keys) - 1)
    unknown = keys[pos] != points
    if unknown.any():
      i = int(np.argmax(unknown))
      raise DataError(f'character {text[i]!r} (U+{ord(text[i]):04X}) at offset {i} is not in the vocabulary '
                      f'of {self.size} symbols')
    return ids[pos]

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Returns the text of token ids int[N]."""
    points, _, _ = self._table
    return points[np.asarray(ids, dtype=np.int64)].astype('<u4').tobytes().decode('utf-32-le')

  def to_json(self) -> str:
    # A list of single characters, not a string, so the file is readable and diffable symbol by symbol.
    return json.dumps({'chars': list(self.chars)})

  @classmethod
  def from_json(cls, s: str) -> Vocab:
    try:
      chars = json.loads(s)['chars']
    except (ValueError, KeyError, TypeError):
      raise DataError('a vocabulary must be JSON of the form {"chars": ["a", "b", ...]}') from None
    if not isinstance(chars, list) or not all(isinstance(c, str) and len(c) == 1 for c in chars):
      raise DataError('a vocabulary\'s "chars" must be a list of single characters')
    return cls(''.join(chars))

  def save(self, path: str) -> None:
    with open(path, 'w', encoding='utf-8') as f:
      f.write(self.to_json() + '\n')

  @classmethod
  def load(cls, path: str) -> Vocab:
    try:
      with open(path, encoding='utf-8') as f:
        s = f.read()
    except (OSError, UnicodeDecodeError) as e:
      raise DataError(f'cannot read the vocabulary {path}: {getattr(e, "strerror", None) or e}') from None
    try:
      return cls.from_json(s)
    except DataError as e:
      raise DataError(f'{path}: {e}') from None


@dataclasses.dataclass
class Corpus:
  """A tokenised text split chronologically: `train` int32[N_train] first, then the held-out `val` int32[N_val]."""

  vocab: Vocab
  train: np.ndarray
  val: np.ndarray


def load_corpus(path: str, val_fraction: float, vocab: Vocab | None = None) -> Corpus:
  """Loads and tokenises `path` ('' = embedded); `vocab` (from a resumed run) replaces the text's own."""
  if not 0.0 < val_fraction < 1.0:
    raise DataError(f'data.val_fraction={val_fraction} must be strictly between 0 and 1')
  text = load_text(path)
  if vocab is None:
    vocab = Vocab.from_text(text)
  try:
    tokens = vocab.encode(text)
  except DataError as e:
    raise DataError(f'{_name(path)}: {e} (the vocabulary of the run being resumed)') from None
  # round, not int: 15000 * (1 - 0.9) is 1499.999... in floating point.
  n_train = round(len(tokens) * (1.0 - val_fraction))
  return Corpus(vocab=vocab, train=tokens[:n_train], val=tokens[n_train:])


def check_seq_len(corpus: Corpus, seq_len: int, *, val_fraction: float, path: str) -> None:
  """Raises DataError unless both splits hold at least one window of seq_len + 1 characters."""
  if seq_len < 1:
    raise DataError(f'data.seq_len={seq_len} must be at least 1')
  for split, tokens in (('training', corpus.train), ('held-out', corpus.val)):
    if len(tokens) < seq_len + 1:
      raise DataError(f'data.seq_len={seq_len} needs windows of {seq_len + 1} chars but the {split} split has '
                      f'only {len(tokens)} (data.val_fraction={val_fraction} of {_name(path)})')


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> Batch:
  # One fancy-indexing gather for the whole batch: int32[B, T + 1].
  w = tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int32, copy=False)
  return {'inputs': np.ascontiguousarray(w[:, :-1]), 'targets': np.ascontiguousarray(w[:, 1:])}


def _random_windows(step: int, rng: np.random.Generator, *, tokens: np.ndarray, seq_len: int,
                    batch_size: int) -> Batch:
  del step  # grain seeds `rng` from (seed, step); the step itself picks nothing.
  return _windows(tokens, rng.integers(0, len(tokens) - seq_len, size=batch_size), seq_len)


def _rows(batch: Batch, *, start: int, stop: int) -> Batch:
  return {k: np.ascontiguousarray(v[start:stop]) for k, v in batch.items()}


def _check_processes(global_batch_size: int, process_index: int, process_count: int) -> int:
  if global_batch_size < 1 or global_batch_size % process_count:
    raise DataError(f'train.batch_size={global_batch_size} must be a positive multiple of the process count '
                    f'{process_count}')
  if not 0 <= process_index < process_count:
    raise DataError(f'process index {process_index} is outside [0, {process_count})')
  return global_batch_size // process_count


def train_dataset(tokens: np.ndarray, *, seq_len: int, global_batch_size: int, seed: int,
                  process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
  """Element i is this process's rows of global batch i: {'inputs', 'targets'}, int32[B_local, T] each.

  Global batch i is B random windows drawn with an RNG seeded by (seed, i), starting uniformly in
  [0, len(tokens) - T - 1], and only then sliced by process: every process count sees the same global batches.
  """
  local = _check_processes(global_batch_size, process_index, process_count)
  if len(tokens) < seq_len + 1:
    raise DataError(f'data.seq_len={seq_len} needs windows of {seq_len + 1} chars but the training tokens '
                    f'number only {len(tokens)}')
  draw = functools.partial(_random_windows, tokens=tokens, seq_len=seq_len, batch_size=global_batch_size)
  rows = functools.partial(_rows, start=process_index * local, stop=(process_index + 1) * local)
  return grain.MapDataset.range(_NUM_BATCHES).random_map(draw, seed=seed).map(rows)


def train_iterator(dataset: grain.MapDataset, *, prefetch: int, worker_count: int) -> grain.DatasetIterator:
  """A checkpointable iterator over `dataset`: `prefetch` batches ahead, in `worker_count` processes (0 = here).

  Its state (`get_state()`, or grain.checkpoint.CheckpointSave/Restore in an Orbax Composite) is the next
  step; restore it into an iterator built with the same worker_count.
  """
  if prefetch < 0 or worker_count < 0:
    raise DataError(f'data.prefetch={prefetch} and data.worker_count={worker_count} must not be negative')
  # One thread suffices: an element is a whole batch, made by one vectorised gather.
  read = grain.ReadOptions(num_threads=1 if prefetch else 0, prefetch_buffer_size=prefetch)
  ds = dataset.to_iter_dataset(read)
  if worker_count:
    if not flags.FLAGS.is_parsed():
      # grain 0.2.18 reads an absl flag when it starts workers and fails if nothing parsed flags (a notebook,
      # pytest: google/grain#1355). absl's own defaults are what it would read after parsing anyway.
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count,
                                                     per_worker_buffer_size=max(prefetch, 1)))
  return iter(ds)


def eval_batches(tokens: np.ndarray, *, seq_len: int, global_batch_size: int, num_batches: int,
                 process_index: int = 0, process_count: int = 1) -> list[Batch]:
  """A fixed set of held-out batches: {'inputs', 'targets'} int32[B_local, T] and 'weights' float32[B_local, T].

  Window k starts at k * T, so windows do not overlap. num_batches=0 (or more windows than there are) takes all
  of them, plus one window ending at the last character whose weights cover only the targets the full windows
  missed: every held-out character after the first is scored exactly once. Otherwise it takes
  num_batches * B windows spread evenly over the split. Rows padding the last batch to B have weight 0.
  """
  local = _check_processes(global_batch_size, process_index, process_count)
  n = len(tokens)
  num_windows = (n - 1) // seq_len
  if num_windows < 1:
    raise DataError(f'data.seq_len={seq_len} needs windows of {seq_len + 1} chars but the held-out tokens '
                    f'number only {n}')
  starts = np.arange(num_windows) * seq_len
  weights = np.ones((num_windows, seq_len), np.float32)
  wanted = num_batches * global_batch_size
  if 0 < wanted < num_windows:
    # Evenly spaced rather than the first ones, so a short eval sees the whole split, not just its start.
    pick = np.arange(wanted) * num_windows // wanted
    starts, weights = starts[pick], weights[pick]
  elif tail := n - 1 - num_windows * seq_len:
    tail_weights = np.zeros((1, seq_len), np.float32)
    tail_weights[0, -tail:] = 1.0
    starts = np.append(starts, n - 1 - seq_len)
    weights = np.concatenate([weights, tail_weights])

  count = len(starts)
  pad = -count % global_batch_size
  batch = _windows(tokens, np.pad(starts, (0, pad)), seq_len)
  batch = {k: np.concatenate([v[:count], np.zeros((pad, seq_len), v.dtype)]) for k, v in batch.items()}
  batch['weights'] = np.pad(weights, ((0, pad), (0, 0)))
  first = process_index * local
  return [
      {k: np.ascontiguousarray(v[b + first:b + first + local]) for k, v in batch.items()}
      for b in range(0, count + pad, global_batch_size)
  ]
