"""Token stores: a corpus file tokenised once into a memory-mapped array, described by a sidecar JSON file.

A store is built on first use (or by `python -m selattn.prepare --config ...`) in one streaming pass per job, a
few MiB at a time, so neither building nor reading one holds the corpus in memory:
  - data.vocab='chars': a first pass finds the characters (and checks the file is UTF-8; a character cut by a
    chunk boundary is carried to the next chunk), a second writes their ids, uint8 for up to 256 symbols, else
    uint16, to `chars.tokens`;
  - data.vocab='bytes': the tokens are the file's bytes, so the store maps the corpus itself; one pass hashes it.
The sidecar (`chars.json` or `bytes.json`) holds the corpus's path, size, modification time and sha256, the
vocabulary, the token count and dtype, the split and its boundaries, and the run-identity hash the trainer checks
on resume. Files are written to a temporary name, fsynced and renamed, so a store is whole or absent.

A store whose corpus changed (size or modification time), or built for another vocabulary or split, is stale:
it is rebuilt (with a logged line), or, where it cannot be written, refused in one line; never used as is.

Where: data.store_dir='' keeps a corpus's store in the folder `<corpus path>.selattn/` beside it; where that
folder cannot be written (a read-only corpus directory) and holds no fresh store, the store goes to
`$XDG_CACHE_HOME/selattn/stores/` (default `~/.cache/selattn/stores/`), in a folder named after the corpus and a
hash of its absolute path. data.store_dir=DIR keeps it in DIR/<that folder name>. The embedded corpus
(data.path='') is tokenised in memory (4.8 MB) and has no store.
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import fcntl
import hashlib
import json
import os

from absl import logging
import numpy as np

from selattn import data as data_lib
from selattn import workdir as workdir_lib

FORMAT = 1
CHUNK = 1 << 22  # bytes read at a time: 4 MiB of text is at most ~30 MiB of work arrays
_MAX_CODEPOINT = 0x110000
DataError = data_lib.DataError


def candidate_dirs(path: str, store_dir: str = '') -> list[str]:
  """The folders a corpus's store may live in, in the order they are tried."""
  path = os.path.abspath(path)
  folder = f'{os.path.basename(path)}-{hashlib.sha256(path.encode()).hexdigest()[:8]}'
  if store_dir:
    return [os.path.join(os.path.abspath(store_dir), folder)]
  return [path + '.selattn', os.path.join(workdir_lib.user_cache_dir('stores'), folder)]


def _check_corpus(path: str) -> os.stat_result:
  """The corpus file's stat; a missing file, a directory or an empty file is a one-line DataError."""
  try:
    st = os.stat(path)
  except OSError as e:
    raise data_lib.read_error(path, e) from None
  if os.path.isdir(path):
    raise DataError(f'data.path={path} is a directory, not a text file')
  if st.st_size == 0:
    raise DataError(f'data.path={path} is empty')
  if not os.access(path, os.R_OK):
    raise DataError(f'data.path={path}: cannot read it (permission denied)')
  return st


def _chunks(path: str):
  with open(path, 'rb') as f:
    while chunk := f.read(CHUNK):
      yield chunk


def _decoded(path: str):
  """(byte offset, text) of each chunk of a UTF-8 file, hashing it on the way; a byte that is not UTF-8 is a
  DataError naming its offset. A character split across two chunks is decoded with the second."""
  decoder = codecs.getincrementaldecoder('utf-8')('strict')
  offset = 0
  for chunk in _chunks(path):
    pending = len(decoder.getstate()[0])  # bytes of a cut character carried over from the last chunk
    try:
      text = decoder.decode(chunk)
    except UnicodeDecodeError as e:
      _not_utf8(path, e.object[e.start], offset - pending + e.start)
    yield chunk, text
    offset += len(chunk)
  try:
    decoder.decode(b'', final=True)
  except UnicodeDecodeError as e:
    _not_utf8(path, e.object[e.start], offset - len(e.object) + e.start)


def _not_utf8(path: str, byte: int, offset: int):
  raise DataError(f'data.path={path} is not UTF-8 text: byte 0x{byte:02x} at offset {offset} '
                  "(data.vocab='bytes' takes any file)")


def _codepoints(text: str) -> np.ndarray:
  return np.frombuffer(text.encode('utf-32-le'), dtype='<u4')


def _scan_chars(path: str) -> tuple[data_lib.Vocab, str]:
  """The text's own vocabulary (its sorted distinct characters) and the file's sha256, in one streaming pass."""
  seen = np.zeros(_MAX_CODEPOINT, bool)
  h = hashlib.sha256()
  for chunk, text in _decoded(path):
    h.update(chunk)
    seen[_codepoints(text)] = True
  points = np.flatnonzero(seen).astype('<u4')
  if len(points) > 65536:
    raise DataError(f'data.path={path} has {len(points)} distinct characters; a character store holds at most '
                    "65536 (use data.vocab='bytes')")
  return data_lib.Vocab(points.tobytes().decode('utf-32-le')), h.hexdigest()


@contextlib.contextmanager
def _atomic_file(path: str):
  """A binary file object whose contents appear at `path` only once complete (temporary file, fsync, rename)."""
  directory, name = os.path.split(path)
  tmp = os.path.join(directory, f'.{name}.tmp-{os.getpid()}')
  f = open(tmp, 'wb')  # pylint: disable=consider-using-with
  try:
    yield f
    f.flush()
    os.fsync(f.fileno())
    f.close()
    os.replace(tmp, path)
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
      os.fsync(dir_fd)
    finally:
      os.close(dir_fd)
  except BaseException:
    f.close()
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise


def _write_char_tokens(path: str, vocab: data_lib.Vocab, out: str) -> tuple[int, str, str, str]:
  """Streams the ids of `path`'s characters into `out`; returns (count, dtype, file sha256, run identity)."""
  table = np.full(_MAX_CODEPOINT, -1, np.int32)
  table[_codepoints(vocab.chars)] = np.arange(vocab.size, dtype=np.int32)
  dtype = np.uint8 if vocab.size <= 256 else np.uint16
  h, ident = hashlib.sha256(), hashlib.sha256(vocab.to_json().encode())
  n = 0
  with _atomic_file(out) as f:
    for chunk, text in _decoded(path):
      h.update(chunk)
      ids = table[_codepoints(text)]
      if (ids < 0).any():
        i = int(np.argmax(ids < 0))
        c = text[i]
        raise DataError(f'{path}: character {c!r} (U+{ord(c):04X}) at offset {n + i} is not in the vocabulary of '
                        f'{vocab.size} symbols (the vocabulary of the run being resumed)')
      # The run identity hashes int32 ids: the same value the trainer recorded before stores existed.
      ident.update(ids.astype('<i4').tobytes())
      f.write(ids.astype(dtype).tobytes())
      n += len(ids)
  return n, np.dtype(dtype).name, h.hexdigest(), ident.hexdigest()


def _hash_file(path: str) -> str:
  h = hashlib.sha256()
  for chunk in _chunks(path):
    h.update(chunk)
  return h.hexdigest()


def _read_meta(path: str) -> dict | None:
  try:
    with open(path, encoding='utf-8') as f:
      meta = json.load(f)
  except (OSError, ValueError):
    return None
  return meta if isinstance(meta, dict) else None


def _stale(meta: dict | None, directory: str, corpus: str, st: os.stat_result, vocab_json: str | None) -> str | None:
  """Why the store described by `meta` cannot be used for this corpus and vocabulary; None when it can."""
  if meta is None:
    return 'no store'
  if meta.get('format') != FORMAT:
    return f'a store of another format ({meta.get("format")})'
  if meta.get('corpus') != corpus:
    return f'a store of another corpus ({meta.get("corpus")})'
  if meta.get('size') != st.st_size or meta.get('mtime_ns') != st.st_mtime_ns:
    return (f'the corpus changed since the store was built (size {meta.get("size")} -> {st.st_size} bytes, '
            f'modification time {meta.get("mtime_ns")} -> {st.st_mtime_ns} ns)')
  if vocab_json is not None and json.dumps(meta.get('vocab')) != vocab_json:
    return 'a store of another vocabulary'
  tokens = meta.get('tokens_file')
  if tokens:
    want = meta.get('num_tokens', -1) * np.dtype(meta.get('dtype', 'uint8')).itemsize
    try:
      have = os.path.getsize(os.path.join(directory, tokens))
    except OSError:
      have = None
    if have != want:
      return f'its token file {tokens} holds {have} bytes, not {want}'
  return None


def _stem(kind: str, vocab) -> str:
  if kind == 'bytes' or vocab is None:
    return kind
  return f'chars-{hashlib.sha256(vocab.to_json().encode()).hexdigest()[:8]}'


def _build(corpus: str, st: os.stat_result, directory: str, stem: str, kind: str, vocab) -> dict:
  """Tokenises `corpus` into `directory` (which exists and is writable); returns the sidecar's contents."""
  if kind == 'bytes':
    vocab = data_lib.ByteVocab()
    sha = _hash_file(corpus)
    n, dtype, tokens_file = st.st_size, 'uint8', ''
    ident = hashlib.sha256((vocab.to_json() + sha).encode()).hexdigest()
  else:
    scanned_sha = None
    if vocab is None:
      vocab, scanned_sha = _scan_chars(corpus)
    tokens_file = f'{stem}.tokens'
    n, dtype, sha, ident = _write_char_tokens(corpus, vocab, os.path.join(directory, tokens_file))
    if scanned_sha not in (None, sha):
      raise DataError(f'data.path={corpus} changed while it was being tokenised; try again')
  after = os.stat(corpus)
  if (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
    raise DataError(f'data.path={corpus} changed while it was being tokenised; try again')
  return {'format': FORMAT, 'corpus': corpus, 'size': st.st_size, 'mtime_ns': st.st_mtime_ns, 'sha256': sha,
          'vocab': json.loads(vocab.to_json()), 'tokens_file': tokens_file, 'dtype': dtype, 'num_tokens': n,
          'data_sha256': ident}


@contextlib.contextmanager
def _locked(directory: str):
  """An exclusive flock on `directory`/.lock: one process builds a store, the others wait and then use it."""
  fd = os.open(os.path.join(directory, '.lock'), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)
    yield
  finally:
    os.close(fd)


def _writable_dir(directory: str) -> bool:
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError:
    return False
  return os.access(directory, os.W_OK | os.X_OK)


def _with_split(meta: dict, split: str, val_fraction: float) -> dict:
  train_end, val_end = data_lib.split_bounds(meta['num_tokens'], split, val_fraction)
  out = dict(meta, split=split, bounds=[train_end, val_end, meta['num_tokens']])
  out['val_fraction'] = val_fraction if split == 'tail' else None
  return out


def prepare(path: str, *, kind: str = 'chars', split: str = 'tail', val_fraction: float = 0.2, store_dir: str = '',
            vocab: data_lib.AnyVocab | None = None, rebuild: bool = False) -> tuple[str, dict, bool]:
  """Finds or builds the store of corpus `path`; returns (its sidecar path, the sidecar, whether it was built).

  `vocab`: the vocabulary the ids must follow (a resumed run's); None takes the text's own (or the bytes).
  `rebuild`: build even if a fresh store exists (and re-check its checksum: prepare's --verify).
  """
  if kind not in data_lib.VOCABS:
    raise DataError(f'data.vocab={kind!r} is not one of {", ".join(map(repr, data_lib.VOCABS))}')
  if vocab is not None and data_lib.vocab_kind(vocab) != kind:
    raise DataError(f'data.vocab={kind!r} but the vocabulary given is of kind {data_lib.vocab_kind(vocab)!r}')
  data_lib.split_bounds(1, split, val_fraction)  # a bad split or fraction: one line, before any work
  corpus = os.path.abspath(path)
  st = _check_corpus(path)
  dirs = candidate_dirs(path, store_dir)
  want = None if vocab is None or kind == 'bytes' else vocab.to_json()
  # The text's own store serves a resumed run whose vocabulary is the same; another vocabulary has its own.
  stems = [kind] if want is None else [kind, _stem(kind, vocab)]
  reasons = {}  # stem -> why its store (found in some folder) cannot be used
  if not rebuild:
    for directory in dirs:
      for stem in stems:
        sidecar = os.path.join(directory, f'{stem}.json')
        meta = _read_meta(sidecar)
        reason = _stale(meta, directory, corpus, st, want)
        if reason is None:
          if meta.get('split') == split and meta.get('val_fraction') == (val_fraction if split == 'tail' else None):
            return sidecar, meta, False
          # Same tokens, another split: only the sidecar's boundaries change (under the lock: write_text removes
          # the temporary files of other writers of the same file).
          if _writable_dir(directory):
            with _locked(directory):
              meta = _with_split(meta, split, val_fraction)
              workdir_lib.write_text(sidecar, json.dumps(meta, indent=1) + '\n')
            return sidecar, meta, False
          reason = f'its split is {meta.get("split")!r}, not {split!r}'
        if meta is not None:
          reasons[stem] = f'{sidecar}: {reason}'

  stem = stems[-1]
  for i, directory in enumerate(dirs):
    if not _writable_dir(directory):
      continue
    if i > 0 and store_dir == '':
      logging.warning('%s cannot be written: the token store of %s goes to %s', dirs[0], path, directory)
    sidecar = os.path.join(directory, f'{stem}.json')
    with _locked(directory):
      meta = _read_meta(sidecar)
      if not rebuild and _stale(meta, directory, corpus, st, want) is None:
        built = False  # another process built it while this one waited for the lock
      else:
        if stem in reasons:
          logging.warning('token store %s: rebuilding it', reasons[stem])
        logging.info('tokenising %s (%s) into %s', path, kind, directory)
        meta = _build(corpus, st, directory, stem, kind, vocab)
        built = True
      meta = _with_split(meta, split, val_fraction)
      workdir_lib.write_text(sidecar, json.dumps(meta, indent=1) + '\n')
    return sidecar, meta, built
  why = '; '.join(reasons.values()) or 'there is none'
  raise DataError(f'no usable token store for data.path={path} ({why}) and none can be written in '
                  f'{" or ".join(dirs)}; set data.store_dir to a writable folder')


def _embedded(kind: str, split: str, val_fraction: float, vocab) -> data_lib.Corpus:
  """The embedded corpus, tokenised in memory (it is small and shipped inside the package)."""
  text = data_lib.load_text('')
  if kind == 'bytes':
    vocab = data_lib.ByteVocab()
    tokens = np.frombuffer(text.encode('utf-8'), np.uint8)
    ident = hashlib.sha256((vocab.to_json() + data_lib.SHAKESPEARE_SHA256).encode()).hexdigest()
  else:
    vocab = vocab or data_lib.Vocab.from_text(text)
    try:
      tokens = vocab.encode(text)
    except DataError as e:
      raise DataError(f'the embedded corpus: {e} (the vocabulary of the run being resumed)') from None
    ident = data_lib.tokens_sha256(vocab, [tokens])
  train_end, val_end = data_lib.split_bounds(len(tokens), split, val_fraction)
  return data_lib.Corpus(vocab=vocab, train=tokens[:train_end], val=tokens[train_end:val_end],
                         test=tokens[val_end:], sha256=ident, name='the embedded corpus')


def open_corpus(path: str, *, kind: str = 'chars', split: str = 'tail', val_fraction: float = 0.2,
                store_dir: str = '', vocab: data_lib.AnyVocab | None = None) -> data_lib.Corpus:
  """The corpus at `path` ('' = embedded) with its splits memory-mapped from its token store (built if need be)."""
  if not path:
    return _embedded(kind, split, val_fraction, vocab)
  sidecar, meta, _ = prepare(path, kind=kind, split=split, val_fraction=val_fraction, store_dir=store_dir,
                             vocab=vocab)
  vocab = data_lib.vocab_from_json(json.dumps(meta['vocab']))
  tokens_path = os.path.join(os.path.dirname(sidecar), meta['tokens_file']) if meta['tokens_file'] else meta['corpus']
  train_end, val_end, n = meta['bounds']

  def part(start, stop):
    return data_lib.Tokens(path=tokens_path, dtype=meta['dtype'], start=start, stop=stop)

  return data_lib.Corpus(vocab=vocab, train=part(0, train_end), val=part(train_end, val_end), test=part(val_end, n),
                         sha256=meta['data_sha256'], name=path)


def open_config(data_cfg, vocab: data_lib.AnyVocab | None = None) -> data_lib.Corpus:
  """open_corpus for a config's data section (a DataConfig or an ml_collections ConfigDict)."""
  return open_corpus(data_cfg.path, kind=data_cfg.vocab, split=data_cfg.split, val_fraction=data_cfg.val_fraction,
                     store_dir=data_cfg.store_dir, vocab=vocab)
