"""Data: the corpus, its vocabulary (characters or bytes), its splits, and the grain pipelines for training and
evaluation.

Shapes: B windows in a batch (the global batch, or this process's rows of it), T positions (data.seq_len).
A window is T + 1 consecutive tokens (characters, or bytes with data.vocab='bytes'): inputs are its first T,
targets its last T. A split's tokens are a `Tokens`: an array in memory (the embedded corpus) or a slice of a
memory-mapped token store (selattn.store), read window by window, so no process holds a large corpus in memory.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
import dataclasses
import functools
import hashlib
import importlib.resources
import json
import lzma
import mmap
import os

from absl import flags
import grain
import numpy as np

SHAKESPEARE_SHA256 = '1e4f4c9b4a7010d27d177eea410a36fb5923c05398445cb5fda9020fe6da2d81'
_EMBEDDED = 'shakespeare.txt.xz'
# Element i of the training dataset is the global batch of step i. The range is lazy, so its length costs
# nothing; 2**40 steps is more than any run will take.
_NUM_BATCHES = 2**40
VOCABS = ('chars', 'bytes')
# A memory-mapped split larger than this has its pages unmapped after each batch read (WindowSource.windows).
RESIDENT_LIMIT = 32 << 20
ENWIK8_URL = 'http://mattmahoney.net/dc/enwik8.zip'  # not fetched for you: no checksum the project could verify
SPLITS = ('tail', 'enwik8')

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


def read_error(path: str, e: OSError) -> DataError:
  """The one-line error for a corpus file that cannot be opened; a missing one that fetch knows says how to get it."""
  if isinstance(e, FileNotFoundError):
    from selattn.corpora import fetch  # pylint: disable=g-import-not-at-top
    known = [name for name, src in fetch.CORPORA.items() if src.filename == os.path.basename(path)]
    hint = f' (python -m selattn.corpora.fetch {known[0]} downloads it)' if known else ''
    if os.path.basename(path) == 'enwik8':
      hint = f' (download {ENWIK8_URL} and unzip it into {os.path.dirname(path) or "."}/)'
    return DataError(f'data.path={path}: no such file{hint}')
  if isinstance(e, IsADirectoryError):
    return DataError(f'data.path={path} is a directory, not a text file')
  return DataError(f'data.path={path}: cannot read it ({e.strerror})')


def head_text(path: str, n: int) -> str:
  """The first n characters of `path` ('' = embedded), read from its first bytes only; bytes that are not UTF-8
  become U+FFFD (a byte-level corpus may hold any bytes)."""
  if not path:
    return _load_embedded()[:n]
  try:
    with open(path, 'rb') as f:
      head = f.read(4 * n)
  except OSError as e:
    raise read_error(path, e) from None
  # final=False: a character cut by the 4n-byte read is left out rather than replaced.
  return codecs.getincrementaldecoder('utf-8')('replace').decode(head, final=False)[:n]


def load_text(path: str) -> str:
  """Returns the text of the UTF-8 file `path`, or the embedded Shakespeare corpus when `path` is ''."""
  if not path:
    return _load_embedded()
  if os.path.isdir(path):
    raise DataError(f'data.path={path} is a directory, not a text file')
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except OSError as e:
    raise read_error(path, e) from None
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
    return _read_vocab(path, cls.from_json)


@dataclasses.dataclass(frozen=True)
class ByteVocab:
  """The 256 byte values of a byte-level model: token id i is byte i; any file is a corpus."""

  @property
  def size(self) -> int:
    return 256

  def encode(self, text: str) -> np.ndarray:
    """Returns the UTF-8 bytes of `text` as token ids int32[N]."""
    return np.frombuffer(text.encode('utf-8'), np.uint8).astype(np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Returns the text of token ids int[N]; bytes that are not UTF-8 (a character cut in two) become U+FFFD."""
    return np.asarray(ids, dtype=np.int64).astype(np.uint8).tobytes().decode('utf-8', 'replace')

  def to_json(self) -> str:
    return json.dumps({'bytes': 256})

  def save(self, path: str) -> None:
    with open(path, 'w', encoding='utf-8') as f:
      f.write(self.to_json() + '\n')


AnyVocab = Vocab | ByteVocab


def vocab_from_json(s: str) -> AnyVocab:
  """A vocabulary file's symbols: {"chars": [...]} (characters) or {"bytes": 256} (bytes)."""
  try:
    obj = json.loads(s)
  except ValueError:
    obj = None
  if isinstance(obj, dict) and obj.get('bytes') == 256 and 'chars' not in obj:
    return ByteVocab()
  return Vocab.from_json(s)


def _read_vocab(path: str, parse):
  """`parse` of the vocabulary file `path`; a DataError naming the path if it cannot be read or parsed."""
  try:
    with open(path, encoding='utf-8') as f:
      s = f.read()
  except (OSError, UnicodeDecodeError) as e:
    raise DataError(f'cannot read the vocabulary {path}: {getattr(e, "strerror", None) or e}') from None
  try:
    return parse(s)
  except DataError as e:
    raise DataError(f'{path}: {e}') from None


def load_vocab(path: str) -> AnyVocab:
  """Reads a run's vocab.json (either kind)."""
  return _read_vocab(path, vocab_from_json)


def vocab_kind(vocab: AnyVocab) -> str:
  """'bytes' or 'chars': the data.vocab value a vocabulary belongs to."""
  return 'bytes' if isinstance(vocab, ByteVocab) else 'chars'


def split_bounds(n: int, split: str, val_fraction: float) -> tuple[int, int]:
  """(end of train, end of validation) in tokens for a corpus of n tokens; the test split is the rest.

  'tail': the last val_fraction is validation (rounded to the nearest token) and there is no test split.
  'enwik8': the first 90% trains, the next 5% validates, the last 5% tests: for enwik8's 100,000,000 bytes
  exactly 90M, 5M and 5M; for other sizes the same fractions, rounded down (integer arithmetic, no float).
  """
  if split == 'tail':
    if not 0.0 < val_fraction < 1.0:
      raise DataError(f'data.val_fraction={val_fraction} must be strictly between 0 and 1')
    # round, not int: 15000 * (1 - 0.9) is 1499.999... in floating point.
    n_train = round(n * (1.0 - val_fraction))
    return n_train, n
  if split == 'enwik8':
    return n * 9 // 10, n * 19 // 20
  raise DataError(f'data.split={split!r} is not one of {", ".join(map(repr, SPLITS))}')


class Tokens:
  """Tokens [start, stop) of an in-memory array or of a memory-mapped token file: one split of a corpus.

  A file-backed one maps its file on first use, in each process that uses it, and pickles as its path (grain's
  worker processes reopen the map rather than receive a copy of the corpus). The map is advised for random access
  (no read-ahead around each window), and `release` drops its pages from the process's resident set.
  """

  def __init__(self, array: np.ndarray | None = None, *, path: str = '', dtype: str = 'uint8', offset: int = 0,
               start: int = 0, stop: int | None = None):
    self.path, self.dtype, self.offset = path, np.dtype(dtype), offset
    self._array = None if path else np.asarray(array)
    self._mmap = None
    total = self._array.shape[0] if self._array is not None else None
    self.start = start
    self.stop = stop if stop is not None else total
    if self.stop is None:
      raise ValueError('a file-backed Tokens needs its stop')

  @property
  def array(self) -> np.ndarray:
    """The split's tokens (a view: a file-backed split reads from disk only the pages that are touched)."""
    if self._array is None:
      with open(self.path, 'rb') as f:
        self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
      # Windows are read at random: the kernel's read-around (up to megabytes per fault) would map far more.
      self._mmap.madvise(mmap.MADV_RANDOM)
      self._array = np.frombuffer(self._mmap, dtype=self.dtype, count=self.stop, offset=self.offset)
    return self._array[self.start:self.stop]

  def release(self) -> None:
    """Unmaps the pages read so far from this process (they stay in the page cache, a minor fault away): the
    resident memory of a long run does not grow with the corpus."""
    if self._mmap is not None:
      self._mmap.madvise(mmap.MADV_DONTNEED)

  def __len__(self) -> int:
    return self.stop - self.start

  @property
  def nbytes(self) -> int:
    return len(self) * self.dtype.itemsize if self.path else self._array[self.start:self.stop].nbytes

  def __getitem__(self, index):
    return self.array[index]

  def __array__(self, dtype=None, copy=None):
    a = np.asarray(self.array)
    return a if dtype is None else a.astype(dtype)

  def __getstate__(self):
    state = dict(self.__dict__)
    state['_mmap'] = None
    if self.path:
      state['_array'] = None  # reopened in the receiving process: the map, not the data
    return state


def as_tokens(tokens) -> Tokens:
  return tokens if isinstance(tokens, Tokens) else Tokens(np.asarray(tokens))


@dataclasses.dataclass
class Corpus:
  """A tokenised text split chronologically: `train` first, then the held-out `val`, then `test` (empty under
  data.split='tail'). Each split is an int array or a `Tokens`; `sha256` identifies the run's data."""

  vocab: AnyVocab
  train: np.ndarray | Tokens
  val: np.ndarray | Tokens
  test: np.ndarray | Tokens = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))
  sha256: str = ''
  name: str = ''  # how messages name the corpus

  def split(self, name: str) -> np.ndarray | Tokens:
    return {'train': self.train, 'val': self.val, 'test': self.test}[name]


def tokens_sha256(vocab: AnyVocab, chunks) -> str:
  """The identity of a run's character data: a hash of its vocabulary and its tokens as int32 (both splits)."""
  h = hashlib.sha256(vocab.to_json().encode())
  for c in chunks:
    h.update(np.ascontiguousarray(c, '<i4').tobytes())
  return h.hexdigest()


def load_corpus(path: str, val_fraction: float, vocab: Vocab | None = None) -> Corpus:
  """Loads and tokenises `path` ('' = embedded) in memory; `vocab` (from a resumed run) replaces the text's own.

  For the embedded corpus and tests; a file a run trains on goes through selattn.store (memory-mapped)."""
  if not 0.0 < val_fraction < 1.0:
    raise DataError(f'data.val_fraction={val_fraction} must be strictly between 0 and 1')
  text = load_text(path)
  if vocab is None:
    vocab = Vocab.from_text(text)
  try:
    tokens = vocab.encode(text)
  except DataError as e:
    raise DataError(f'{_name(path)}: {e} (the vocabulary of the run being resumed)') from None
  n_train, _ = split_bounds(len(tokens), 'tail', val_fraction)
  return Corpus(vocab=vocab, train=tokens[:n_train], val=tokens[n_train:], sha256=tokens_sha256(vocab, [tokens]),
                name=_name(path))


def check_seq_len(corpus: Corpus, seq_len: int, *, val_fraction: float, path: str, split: str = 'tail') -> None:
  """Raises DataError unless both splits hold at least one window of seq_len + 1 tokens."""
  if seq_len < 1:
    raise DataError(f'data.seq_len={seq_len} must be at least 1')
  unit = 'bytes' if vocab_kind(corpus.vocab) == 'bytes' else 'chars'
  how = f'data.val_fraction={val_fraction}' if split == 'tail' else f'data.split={split!r}'
  for name, tokens in (('training', corpus.train), ('held-out', corpus.val)):
    if len(tokens) < seq_len + 1:
      raise DataError(f'data.seq_len={seq_len} needs windows of {seq_len + 1} {unit} but the {name} split has '
                      f'only {len(tokens)} ({how} of {_name(path)})')


def _windows(tokens: Tokens, starts: np.ndarray, seq_len: int) -> Batch:
  # Rows of a strided view: each window is one contiguous copy, and of a memory map only its pages are read.
  w = np.lib.stride_tricks.sliding_window_view(tokens.array, seq_len + 1)[starts].astype(np.int32, copy=False)
  return {'inputs': np.ascontiguousarray(w[:, :-1]), 'targets': np.ascontiguousarray(w[:, 1:])}


class WindowSource:
  """A grain random-access data source over a split: element i is the window of T + 1 tokens starting at token i,
  int32[T + 1]; `windows` reads many at once."""

  def __init__(self, tokens, seq_len: int):
    self.tokens, self.seq_len = as_tokens(tokens), seq_len

  def __len__(self) -> int:
    return max(len(self.tokens) - self.seq_len, 0)

  def __getitem__(self, i: int) -> np.ndarray:
    if not 0 <= i < len(self):
      raise IndexError(f'window {i} is outside [0, {len(self)})')
    return self.tokens[i:i + self.seq_len + 1].astype(np.int32)

  def windows(self, starts: np.ndarray) -> Batch:
    """{'inputs', 'targets'} int32[len(starts), T] of the windows starting at `starts`."""
    batch = _windows(self.tokens, starts, self.seq_len)
    if self.tokens.nbytes > RESIDENT_LIMIT:
      # The kernel maps a whole large folio (up to 2 MiB of page cache) per window touched: unmapping them after
      # each batch keeps the resident set at one batch's worth, whatever the corpus size (costing ~2 us per
      # window to map again; a split under the limit stays mapped).
      self.tokens.release()
    return batch


def _random_windows(step: int, rng: np.random.Generator, *, source: WindowSource, batch_size: int, first: int,
                    local: int) -> Batch:
  del step  # grain seeds `rng` from (seed, step); the step itself picks nothing.
  # Every process draws the global batch's starts (the same on each) and reads only its own rows' windows.
  starts = rng.integers(0, len(source), size=batch_size)
  return source.windows(starts[first:first + local])


def _check_processes(global_batch_size: int, process_index: int, process_count: int) -> int:
  if global_batch_size < 1 or global_batch_size % process_count:
    raise DataError(f'train.batch_size={global_batch_size} must be a positive multiple of the process count '
                    f'{process_count}')
  if not 0 <= process_index < process_count:
    raise DataError(f'process index {process_index} is outside [0, {process_count})')
  return global_batch_size // process_count


def train_dataset(tokens, *, seq_len: int, global_batch_size: int, seed: int, process_index: int = 0,
                  process_count: int = 1) -> grain.MapDataset:
  """Element i is this process's rows of global batch i: {'inputs', 'targets'}, int32[B_local, T] each.

  Global batch i is B random windows drawn with an RNG seeded by (seed, i), starting uniformly in
  [0, len(tokens) - T - 1], and only then sliced by process: every process count sees the same global batches,
  and each process reads only its own rows. `tokens`: an int array or a `Tokens` (a memory-mapped split).
  """
  local = _check_processes(global_batch_size, process_index, process_count)
  source = WindowSource(tokens, seq_len)
  if len(source) < 1:
    raise DataError(f'data.seq_len={seq_len} needs windows of {seq_len + 1} tokens but the training tokens '
                    f'number only {len(source.tokens)}')
  draw = functools.partial(_random_windows, source=source, batch_size=global_batch_size,
                           first=process_index * local, local=local)
  return grain.MapDataset.range(_NUM_BATCHES).random_map(draw, seed=seed)


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


class EvalBatches(Sequence):
  """eval_batches' batches, each computed and read when it is asked for: nothing is held per window, so a large
  split costs no memory until a batch of it is read."""

  def __init__(self, source: WindowSource, *, stride: int, num_windows: int, picked: int, tail: int,
               global_batch_size: int, first: int, local: int):
    self.source, self.stride, self.num_windows, self.picked, self.tail = source, stride, num_windows, picked, tail
    self.global_batch_size, self.first, self.local = global_batch_size, first, local
    self.count = picked or num_windows + (tail > 0)  # real rows; the rest of the last batch is padding

  def __len__(self) -> int:
    return -(-self.count // self.global_batch_size)

  def __getitem__(self, i: int) -> Batch:
    if not 0 <= i < len(self):
      raise IndexError(i)
    seq_len, stride = self.source.seq_len, self.stride
    rows = np.arange(self.local) + i * self.global_batch_size + self.first
    real = rows < self.count
    # Window k starts at k * stride; a subset takes `picked` of them evenly spaced; the tail window ends at the end.
    k = rows * self.num_windows // self.picked if self.picked else rows
    starts = np.where(real, k * stride, 0)
    is_tail = real & (k == self.num_windows)
    starts = np.where(is_tail, len(self.source.tokens) - 1 - seq_len, starts)
    weights = np.repeat(real[:, None], seq_len, axis=1).astype(np.float32)
    # Window 0 scores all its targets, window k > 0 its last `stride` (the earlier ones are window k - 1's), the
    # tail window only the targets no full window has.
    weights[real & (k > 0) & ~is_tail, :seq_len - stride] = 0.0
    weights[is_tail, :seq_len - self.tail] = 0.0
    batch = self.source.windows(starts)
    batch = {key: np.where(real[:, None], v, 0).astype(np.int32) for key, v in batch.items()}  # padding: zeros
    batch['weights'] = weights
    return batch


def eval_batches(tokens, *, seq_len: int, global_batch_size: int, num_batches: int, process_index: int = 0,
                 process_count: int = 1, stride: int | None = None) -> EvalBatches:
  """A fixed set of held-out batches: {'inputs', 'targets'} int32[B_local, T] and 'weights' float32[B_local, T].

  Window k starts at k * stride (default T: windows do not overlap) and scores the targets window k - 1 did not,
  so each target has at least T - stride tokens of context (except in the first window). num_batches=0 (or more
  windows than there are) takes all of them, plus one window ending at the last token whose weights cover only
  the targets the full windows missed: every held-out token after the first is scored exactly once. Otherwise it
  takes num_batches * B windows spread evenly over the split. Rows padding the last batch to B have weight 0.
  A sequence: batch i is read (this process's rows only) when indexed.
  """
  local = _check_processes(global_batch_size, process_index, process_count)
  stride = seq_len if stride is None else stride
  if not 1 <= stride <= seq_len:
    raise DataError(f'the evaluation stride {stride} must be in [1, data.seq_len={seq_len}]')
  source = WindowSource(tokens, seq_len)
  n = len(source.tokens)
  if n - 1 < seq_len:
    raise DataError(f'data.seq_len={seq_len} needs windows of {seq_len + 1} tokens but the held-out tokens '
                    f'number only {n}')
  num_windows = (n - 1 - seq_len) // stride + 1
  wanted = num_batches * global_batch_size
  picked = wanted if 0 < wanted < num_windows else 0
  tail = 0 if picked else n - 1 - ((num_windows - 1) * stride + seq_len)
  return EvalBatches(source, stride=stride, num_windows=num_windows, picked=picked, tail=tail,
                     global_batch_size=global_batch_size, first=process_index * local, local=local)
