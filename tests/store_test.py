"""Token stores (selattn.store): windows read from the memory map equal the file's own bytes, the enwik8 split's
arithmetic, streaming tokenisation across chunk boundaries, stale stores, read-only folders and bad input."""

import hashlib
import json
import os
import pickle
import subprocess
import sys

import grain
import numpy as np
import pytest

from selattn import data
from selattn import store

T = 32


def _random_bytes(path, n, seed=0) -> bytes:
  """A byte-level corpus of enwik8's kind: any bytes, a UTF-8 character cut at its end."""
  raw = np.random.default_rng(seed).integers(0, 256, n - 1).astype(np.uint8).tobytes() + 'é'.encode()[:1]
  with open(path, 'wb') as f:
    f.write(raw)
  return raw


@pytest.fixture
def cache(tmp_path, monkeypatch):
  """The fallback store folder, inside the test's own folder."""
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
  return tmp_path / 'cache'


def test_enwik8_split_arithmetic():
  # The real file: exactly 90M / 5M / 5M bytes (no 100 MB file needed to check the boundaries).
  assert data.split_bounds(100_000_000, 'enwik8', 0.2) == (90_000_000, 95_000_000)
  # Other sizes: the same fractions, rounded down, whatever val_fraction says.
  assert data.split_bounds(2_000_003, 'enwik8', 0.5) == (1_800_002, 1_900_002)
  assert data.split_bounds(15_000, 'tail', 0.1) == (13_500, 15_000)
  with pytest.raises(data.DataError, match="data.split='head' is not one of 'tail', 'enwik8'"):
    data.split_bounds(10, 'head', 0.1)


def test_byte_store_windows_are_the_file_bytes(tmp_path, cache):
  path = str(tmp_path / 'enwik8')
  n = 200_000
  raw = _random_bytes(path, n)
  corpus = store.open_corpus(path, kind='bytes', split='enwik8')
  assert isinstance(corpus.vocab, data.ByteVocab) and corpus.vocab.size == 256
  assert (len(corpus.train), len(corpus.val), len(corpus.test)) == (180_000, 10_000, 10_000)
  ref = np.frombuffer(raw, np.uint8)  # the reference: the file's bytes, read here
  for split, lo in (('train', 0), ('val', 180_000), ('test', 190_000)):
    np.testing.assert_array_equal(np.asarray(corpus.split(split)), ref[lo:lo + len(corpus.split(split))])
  # The sidecar: vocabulary, boundaries and checksum; the store maps the corpus itself (no copy).
  meta = json.loads((tmp_path / 'enwik8.selattn' / 'bytes.json').read_text())
  assert meta['bounds'] == [180_000, 190_000, n] and meta['split'] == 'enwik8' and meta['vocab'] == {'bytes': 256}
  assert meta['sha256'] == hashlib.sha256(raw).hexdigest() and meta['tokens_file'] == ''
  assert not os.path.exists(cache)

  # A grain random-access source over the memory map: element i is the window at byte i.
  source = grain.MapDataset.source(data.WindowSource(corpus.val, T))
  assert len(source) == 10_000 - T
  for i in (0, 1, 4321, len(source) - 1):
    np.testing.assert_array_equal(source[i], ref[180_000 + i:180_000 + i + T + 1])

  # Training batches: each row is a window of the training bytes (found in the file by its content).
  ds = data.train_dataset(corpus.train, seq_len=T, global_batch_size=8, seed=0)
  for step in (0, 5, 2**35):
    b = ds[step]
    assert b['inputs'].dtype == np.int32 and b['inputs'].shape == (8, T)
    for inputs, targets in zip(b['inputs'], b['targets']):
      window = bytes(inputs.astype(np.uint8)) + bytes([targets[-1]])
      start = raw.find(window)
      assert 0 <= start and start + T + 1 <= 180_000, start
      np.testing.assert_array_equal(targets[:-1], inputs[1:])
  # The same batches as from the bytes in memory, and the dataset pickles as a path, not as the corpus.
  in_memory = data.train_dataset(ref[:180_000], seq_len=T, global_batch_size=8, seed=0)
  for k in ('inputs', 'targets'):
    np.testing.assert_array_equal(ds[7][k], in_memory[7][k])
  assert len(pickle.dumps(corpus.train)) < 2_000
  np.testing.assert_array_equal(pickle.loads(pickle.dumps(corpus.train))[:100], ref[:100])

  # Held-out batches read from the map score every byte of the test split after the first, once.
  batches = data.eval_batches(corpus.test, seq_len=T, global_batch_size=4, num_batches=0)
  targets = np.concatenate([b['targets'][b['weights'] > 0] for b in batches])
  assert len(targets) == 10_000 - 1
  assert sorted(np.unique(targets)) == sorted(np.unique(ref[190_001:]))


def test_processes_read_only_their_own_rows(tmp_path, cache, monkeypatch):
  path = str(tmp_path / 'corpus.bin')
  _random_bytes(path, 50_000)
  corpus = store.open_corpus(path, kind='bytes')
  read = []
  windows = data._windows  # pylint: disable=protected-access

  def counting(tokens, starts, seq_len):
    read.append(len(starts))
    return windows(tokens, starts, seq_len)

  monkeypatch.setattr(data, '_windows', counting)
  whole = data.train_dataset(corpus.train, seq_len=T, global_batch_size=8, seed=1)[3]
  parts = [data.train_dataset(corpus.train, seq_len=T, global_batch_size=8, seed=1, process_index=p,
                              process_count=4)[3] for p in range(4)]
  assert read == [8, 2, 2, 2, 2]  # each process read 2 windows, not the global 8
  for k in ('inputs', 'targets'):
    np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), whole[k])
  read.clear()
  parts = [data.eval_batches(corpus.val, seq_len=T, global_batch_size=8, num_batches=2, process_index=p,
                             process_count=2)[1] for p in range(2)]
  assert read == [4, 4]


@pytest.mark.parametrize('chunk', [1, 5, 4096])
def test_char_store_streams_across_chunk_boundaries(tmp_path, cache, monkeypatch, chunk):
  # Chunks of 1 and 5 bytes cut every 2-, 3- and 4-byte character somewhere.
  monkeypatch.setattr(store, 'CHUNK', chunk)
  text = 'naïve café: 5 €, 🙂 ok\r\n' * 40
  path = tmp_path / 'corpus.txt'
  path.write_bytes(text.encode())
  corpus = store.open_corpus(str(path), val_fraction=0.25)
  chars = ''.join(sorted(set(text)))
  assert corpus.vocab.chars == chars
  ids = np.array([chars.index(c) for c in text])  # the reference: a Python loop over the text
  n_train = round(len(text) * 0.75)
  np.testing.assert_array_equal(np.asarray(corpus.train), ids[:n_train])
  np.testing.assert_array_equal(np.asarray(corpus.val), ids[n_train:])
  assert corpus.train.array.dtype == np.uint8
  # The run identity is the hash trainers recorded before stores existed: vocab.json + int32 ids.
  want = hashlib.sha256(corpus.vocab.to_json().encode() + ids.astype('<i4').tobytes()).hexdigest()
  assert corpus.sha256 == want


def test_char_store_uses_uint16_beyond_256_symbols(tmp_path, cache):
  text = ''.join(chr(0x4e00 + i) for i in range(300)) * 3
  path = tmp_path / 'cjk.txt'
  path.write_text(text, encoding='utf-8')
  corpus = store.open_corpus(str(path))
  assert corpus.vocab.size == 300 and corpus.train.array.dtype == np.uint16
  assert corpus.vocab.decode(np.asarray(corpus.train)) + corpus.vocab.decode(np.asarray(corpus.val)) == text


@pytest.mark.parametrize('content,offset', [(b'abc\xe9def', 3), (b'ab' + 'é'.encode() + b'\xff', 4),
                                            (b'abcd' + '€'.encode()[:2], 4)])
def test_not_utf8_names_the_byte_offset(tmp_path, cache, monkeypatch, content, offset):
  monkeypatch.setattr(store, 'CHUNK', 3)  # the bad byte is found in a later chunk than the first
  path = tmp_path / 'latin1.txt'
  path.write_bytes(content)
  with pytest.raises(data.DataError) as e:
    store.open_corpus(str(path))
  msg = str(e.value)
  assert f'at offset {offset}' in msg and str(path) in msg and "data.vocab='bytes'" in msg and '\n' not in msg
  assert not [f for f in os.listdir(tmp_path / 'latin1.txt.selattn') if f.endswith('.tokens') or 'tmp' in f]
  store.open_corpus(str(path), kind='bytes')  # any file is a byte corpus


def test_a_changed_corpus_is_rebuilt_never_used_stale(tmp_path, cache):
  path = tmp_path / 'corpus.txt'
  path.write_text('abcabcabca' * 10)
  sidecar, meta, built = store.prepare(str(path))
  assert built and meta['num_tokens'] == 100
  assert store.prepare(str(path))[2] is False  # fresh: used as is
  # Same size, other content, another modification time: rebuilt with the new tokens.
  path.write_text('abcabcabcd' * 10)
  os.utime(path, ns=(meta['mtime_ns'] + 10**9, meta['mtime_ns'] + 10**9))
  corpus = store.open_corpus(str(path))
  assert corpus.vocab.chars == 'abcd' and corpus.vocab.decode(np.asarray(corpus.train[:10])) == 'abcabcabcd'
  # A truncated token file is refused as stale too.
  with open(os.path.join(os.path.dirname(sidecar), 'chars.tokens'), 'r+b') as f:
    f.truncate(50)
  assert store.prepare(str(path))[2] is True
  # prepare --verify: rebuilt although fresh, to the same checksum.
  sha = store.prepare(str(path))[1]['sha256']
  _, meta, built = store.prepare(str(path), rebuild=True)
  assert built and meta['sha256'] == sha == hashlib.sha256(path.read_bytes()).hexdigest()
  # Another split: the same tokens, new boundaries in the sidecar.
  _, meta, built = store.prepare(str(path), split='enwik8')
  assert not built and meta['bounds'] == [90, 95, 100]


def test_a_read_only_corpus_folder_falls_back_and_a_read_only_store_dir_refuses(tmp_path, cache, monkeypatch):
  path = tmp_path / 'corpus.txt'
  path.write_text('hello world\n' * 20)
  beside = str(path) + '.selattn'
  writable = store._writable_dir  # pylint: disable=protected-access
  monkeypatch.setattr(store, '_writable_dir', lambda d: d != beside and writable(d))
  sidecar, _, built = store.prepare(str(path))
  assert built and sidecar.startswith(str(cache)) and not os.path.exists(beside)
  assert store.prepare(str(path))[:3:2] == (sidecar, False)  # found there next time

  ro = str(tmp_path / 'ro')
  monkeypatch.setattr(store, '_writable_dir', lambda d: not d.startswith(ro) and writable(d))
  with pytest.raises(data.DataError) as e:
    store.open_corpus(str(path), store_dir=ro)
  assert str(e.value).startswith(f'no usable token store for data.path={path} (there is none)')
  assert 'data.store_dir' in str(e.value) and '\n' not in str(e.value)


@pytest.mark.parametrize('make,pattern', [
    (lambda p: None, r'data.path=.*/missing.txt: no such file$'),
    (lambda p: os.makedirs(p), r'is a directory, not a text file'),
    (lambda p: open(p, 'w').close(), r'is empty'),
], ids=['missing', 'directory', 'empty'])
def test_bad_corpus_is_one_line(tmp_path, cache, make, pattern):
  path = str(tmp_path / 'missing.txt')
  make(path)
  for kind in ('chars', 'bytes'):
    with pytest.raises(data.DataError, match=pattern) as e:
      store.open_corpus(path, kind=kind)
    assert '\n' not in str(e.value)


def test_missing_enwik8_says_where_to_get_it(tmp_path, cache):
  with pytest.raises(data.DataError, match=r'enwik8: no such file \(download http://mattmahoney.net/dc/enwik8.zip '
                                           r'and unzip it into .*\)'):
    store.open_corpus(str(tmp_path / 'data' / 'enwik8'), kind='bytes', split='enwik8')


def test_byte_vocab_round_trip_and_replacement():
  v = data.ByteVocab()
  ids = v.encode('é€🙂')
  assert ids.tolist() == list('é€🙂'.encode()) and v.decode(ids) == 'é€🙂'
  assert v.decode([0x61, 0xe9, 0x62]) == 'a\ufffdb'  # a byte that is not UTF-8: the replacement character
  assert v.decode(list('€'.encode())[:2]) == '\ufffd'
  assert data.vocab_from_json(v.to_json()) == v
  assert data.vocab_from_json(data.Vocab('ab').to_json()) == data.Vocab('ab')
  with pytest.raises(data.DataError):
    data.vocab_from_json('{"bytes": 255}')


def test_head_text_reads_only_the_start(tmp_path):
  path = tmp_path / 'x.bin'
  path.write_bytes('€uro\n'.encode() * 10 + b'\xff' * 10**6)
  assert data.head_text(str(path), 6) == '€uro\n€'
  assert data.head_text(str(path), 3) == '€ur'


_CHILD = '''
import resource, sys
from selattn import data, store
corpus = store.open_corpus(sys.argv[1], kind=sys.argv[2], store_dir=sys.argv[3])
it = data.train_iterator(data.train_dataset(corpus.train, seq_len=256, global_batch_size=16, seed=0), prefetch=2,
                         worker_count=0)
for _ in range(200):
  next(it)
ev = data.eval_batches(corpus.val, seq_len=256, global_batch_size=16, num_batches=0)
for i in range(0, len(ev), len(ev) // 20):
  ev[i]
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
'''


@pytest.mark.parametrize('kind,small,large', [
    ('bytes', 1 << 28, 1 << 30),
    ('chars', 1 << 24, 1 << 26),  # tokenising characters streams at ~40 MB/s here: the 1 GiB case is slow
    pytest.param('chars', 1 << 28, 1 << 30, marks=pytest.mark.slow),
])
def test_peak_rss_does_not_grow_with_the_corpus(tmp_path, kind, small, large):
  """Building the store, 200 training batches and 20 held-out batches, in a fresh process: the same peak RSS for a
  corpus and one 4x larger (sparse files of zeros: fast to make; the kernel maps any page the same way)."""
  env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  peaks = {}
  for size in (small, large):
    path = tmp_path / f'{size >> 20}MiB.bin'
    with open(path, 'wb') as f:
      f.truncate(size)
    r = subprocess.run([sys.executable, '-c', _CHILD, str(path), kind, str(tmp_path / 'stores')], env=env,
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    peaks[size >> 20] = int(r.stdout.split()[-1])  # MiB
  # Each split keeps at most RESIDENT_LIMIT mapped, plus one batch's pages: far below the extra corpus.
  (a, b) = peaks.values()
  assert abs(b - a) < 48, peaks


def test_grain_worker_processes_read_the_memory_map(tmp_path, cache):
  # The dataset crosses into the worker as the store's path (pickled Tokens), and the worker maps the file itself.
  path = str(tmp_path / 'corpus.bin')
  raw = _random_bytes(path, 100_000)
  corpus = store.open_corpus(path, kind='bytes')
  ds = data.train_dataset(corpus.train, seq_len=T, global_batch_size=4, seed=0)
  it = data.train_iterator(ds, prefetch=2, worker_count=1)
  try:
    for i in range(3):
      b = next(it)
      np.testing.assert_array_equal(b['inputs'], ds[i]['inputs'])
      for row, target in zip(b['inputs'], b['targets'][:, -1]):
        assert raw.find(bytes(row.astype(np.uint8)) + bytes([target])) >= 0
  finally:
    it.close()
