"""Data: the embedded corpus, the vocabulary, input errors, and the train/eval pipelines (determinism, process
slicing, coverage, iterator checkpoints)."""

import hashlib
import json

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from selattn import data


def _write(tmp_path, name, content: bytes) -> str:
  path = tmp_path / name
  path.write_bytes(content)
  return str(path)


def _batches_equal(a, b) -> bool:
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_embedded_corpus():
  text = data.load_text('')
  assert len(text) == 4_850_308
  assert len(set(text)) == 83
  assert text.isascii()
  assert data.SHAKESPEARE_SHA256 == '1e4f4c9b4a7010d27d177eea410a36fb5923c05398445cb5fda9020fe6da2d81'
  assert hashlib.sha256(text.encode('utf-8')).hexdigest() == data.SHAKESPEARE_SHA256

  corpus = data.load_corpus('', val_fraction=0.2)
  assert corpus.vocab.size == 83
  assert corpus.vocab.chars == ''.join(sorted(set(text)))
  assert (len(corpus.train), len(corpus.val)) == (3_880_246, 970_062)
  assert corpus.train.dtype == corpus.val.dtype == np.int32
  # Chronological: the held-out split is the end of the text, and the two decode back to the whole of it.
  assert corpus.vocab.decode(corpus.val) == text[3_880_246:]
  assert corpus.vocab.decode(corpus.train) + corpus.vocab.decode(corpus.val) == text


def test_vocab_json_round_trip(tmp_path):
  # Unsorted and non-ASCII on purpose: a saved vocabulary is used as stored, never re-sorted.
  vocab = data.Vocab('zé\n"\\a')
  assert json.loads(vocab.to_json()) == {'chars': ['z', 'é', '\n', '"', '\\', 'a']}
  assert data.Vocab.from_json(vocab.to_json()) == vocab
  path = str(tmp_path / 'vocab.json')
  vocab.save(path)
  assert data.Vocab.load(path) == vocab
  assert vocab.size == 6


def test_encode_decode_round_trip():
  vocab = data.Vocab('zé\n"\\a')
  text = 'a\nzé"\\aaz'
  ids = vocab.encode(text)
  assert ids.dtype == np.int32
  np.testing.assert_array_equal(ids, [vocab.chars.index(c) for c in text])
  assert vocab.decode(ids) == text
  assert vocab.decode(list(ids)) == text
  assert data.Vocab.from_text('banana') == data.Vocab('abn')


def test_encode_unknown_char():
  with pytest.raises(data.DataError, match=r"'q' \(U\+0071\) at offset 2"):
    data.Vocab('ab').encode('abq')


@pytest.mark.parametrize('content', [b'not json', b'{"chars": "ab"}', b'{"chars": ["ab"]}', b'{"chars": ["a", "a"]}'])
def test_vocab_load_bad_file(tmp_path, content):
  path = _write(tmp_path, 'vocab.json', content)
  with pytest.raises(data.DataError) as e:
    data.Vocab.load(path)
  assert path in str(e.value)


@pytest.mark.parametrize('kind', ['missing', 'directory', 'empty', 'not_utf8'])
def test_load_text_errors(tmp_path, kind):
  if kind == 'missing':
    path, pattern = str(tmp_path / 'nope.txt'), 'no such file'
  elif kind == 'directory':
    path, pattern = str(tmp_path), 'is a directory'
  elif kind == 'empty':
    path, pattern = _write(tmp_path, 'empty.txt', b''), 'is empty'
  else:
    path, pattern = _write(tmp_path, 'latin1.txt', 'abc\xe9def'.encode('latin-1')), r'byte 0xe9 at offset 3'
  with pytest.raises(data.DataError, match=pattern) as e:
    data.load_text(path)
  assert path in str(e.value)
  assert '\n' not in str(e.value)


def test_load_text_is_byte_exact(tmp_path):
  # Text mode would turn '\r\n' into '\n'; the corpus must be what the file holds.
  assert data.load_text(_write(tmp_path, 'crlf.txt', 'a\r\nbé\n'.encode())) == 'a\r\nbé\n'


def test_load_corpus_with_resumed_vocab(tmp_path):
  path = _write(tmp_path, 'c.txt', b'abcabcabca')
  corpus = data.load_corpus(path, 0.2, vocab=data.Vocab('cba'))
  np.testing.assert_array_equal(corpus.train, [2, 1, 0, 2, 1, 0, 2, 1])
  np.testing.assert_array_equal(corpus.val, [0, 2])
  with pytest.raises(data.DataError, match=rf"{path}: character 'c'"):
    data.load_corpus(path, 0.2, vocab=data.Vocab('ab'))
  with pytest.raises(data.DataError, match='data.val_fraction=0.0'):
    data.load_corpus(path, 0.0)


def test_check_seq_len(tmp_path):
  path = _write(tmp_path, 'corpus.txt', b'x' * 15_000)
  corpus = data.load_corpus(path, 0.2)
  assert (len(corpus.train), len(corpus.val)) == (12_000, 3_000)
  data.check_seq_len(corpus, 2_999, val_fraction=0.2, path=path)
  with pytest.raises(data.DataError) as e:
    data.check_seq_len(corpus, 5_000, val_fraction=0.2, path=path)
  assert str(e.value) == (f'data.seq_len=5000 needs windows of 5001 chars but the held-out split has only 3000 '
                          f'(data.val_fraction=0.2 of {path})')
  corpus = data.load_corpus(path, 0.9)
  with pytest.raises(data.DataError, match='data.seq_len=1500 .* the training split has only 1500'):
    data.check_seq_len(corpus, 1_500, val_fraction=0.9, path=path)


def test_train_batches():
  n, seq_len, batch = 40, 8, 16
  tokens = np.arange(n, dtype=np.int32)  # token value = position, so each row shows where its window starts
  ds = data.train_dataset(tokens, seq_len=seq_len, global_batch_size=batch, seed=0)
  b = ds[3]
  assert b['inputs'].shape == b['targets'].shape == (batch, seq_len)
  assert b['inputs'].dtype == b['targets'].dtype == np.int32
  starts = b['inputs'][:, :1]
  np.testing.assert_array_equal(b['inputs'], starts + np.arange(seq_len))
  np.testing.assert_array_equal(b['targets'], b['inputs'] + 1)

  # Starts are uniform over [0, n - seq_len - 1], both ends included, and never past the split.
  all_starts = np.concatenate([ds[i]['inputs'][:, 0] for i in range(200)])
  assert all_starts.min() == 0 and all_starts.max() == n - seq_len - 1

  assert _batches_equal(ds[3], data.train_dataset(tokens, seq_len=seq_len, global_batch_size=batch, seed=0)[3])
  assert not _batches_equal(ds[3], data.train_dataset(tokens, seq_len=seq_len, global_batch_size=batch, seed=1)[3])
  assert not _batches_equal(ds[3], ds[4])


def test_train_batches_on_real_corpus_stay_in_train_split():
  corpus = data.load_corpus('', 0.2)
  ds = data.train_dataset(corpus.train, seq_len=299, global_batch_size=16, seed=0)
  text = corpus.vocab.decode(corpus.train)
  for i in (0, 1000):
    b = ds[i]
    for row in range(16):
      window = corpus.vocab.decode(b['inputs'][row]) + corpus.vocab.decode(b['targets'][row][-1:])
      assert window in text


@pytest.mark.parametrize('process_count', [2, 4])
def test_process_slices_make_the_global_batch(process_count):
  tokens = np.random.default_rng(0).integers(0, 83, 5_000).astype(np.int32)
  kw = dict(seq_len=32, global_batch_size=8, seed=3)
  whole = data.train_dataset(tokens, **kw)
  parts = [data.train_dataset(tokens, process_index=p, process_count=process_count, **kw) for p in
           range(process_count)]
  for i in (0, 7, 2**33):
    local = [p[i] for p in parts]
    assert all(x['inputs'].shape == (8 // process_count, 32) for x in local)
    for k in ('inputs', 'targets'):
      np.testing.assert_array_equal(np.concatenate([x[k] for x in local]), whole[i][k])
  with pytest.raises(data.DataError, match='train.batch_size=8'):
    data.train_dataset(tokens, process_count=3, **kw)


@pytest.mark.parametrize('n', [1000, 1 + 7 * 50])  # with a partial tail window, and without
def test_eval_batches_cover_the_split(n):
  seq_len, batch = 7, 4
  tokens = np.arange(n, dtype=np.int32)
  batches = data.eval_batches(tokens, seq_len=seq_len, global_batch_size=batch, num_batches=0)
  again = data.eval_batches(tokens, seq_len=seq_len, global_batch_size=batch, num_batches=0)
  assert len(batches) == len(again) and all(_batches_equal(a, b) for a, b in zip(batches, again))

  windows = (n - 1) // seq_len + ((n - 1) % seq_len > 0)
  assert len(batches) == -(-windows // batch)
  for b in batches:
    assert b['inputs'].shape == b['targets'].shape == b['weights'].shape == (batch, seq_len)
    assert b['weights'].dtype == np.float32 and b['inputs'].dtype == np.int32
    np.testing.assert_array_equal(b['targets'][:, :-1], b['inputs'][:, 1:])
  weights = np.concatenate([b['weights'] for b in batches])
  targets = np.concatenate([b['targets'] for b in batches])
  # Every held-out character after the first is a weighted target exactly once.
  np.testing.assert_array_equal(np.sort(targets[weights == 1]), np.arange(1, n))
  assert set(np.unique(weights)) <= {0.0, 1.0}
  # Padding rows (past the real windows) weigh nothing.
  assert not weights[windows:].any() and weights[:windows].any(axis=1).all()
  # Full windows start at k * seq_len and do not overlap.
  full = (n - 1) // seq_len
  np.testing.assert_array_equal(targets[:full, 0], np.arange(full) * seq_len + 1)


def test_eval_batches_subset_and_processes():
  seq_len, batch, n = 7, 4, 1000
  tokens = np.arange(n, dtype=np.int32)
  batches = data.eval_batches(tokens, seq_len=seq_len, global_batch_size=batch, num_batches=2)
  assert len(batches) == 2
  inputs = np.concatenate([b['inputs'] for b in batches])
  assert all(b['weights'].all() for b in batches)
  starts = inputs[:, 0]
  assert len(set(starts)) == 8 and (starts % seq_len == 0).all()
  # Spread over the whole split, not just its beginning.
  assert starts[0] == 0 and starts[-1] > 0.8 * n

  for num_batches in (0, 2):
    whole = data.eval_batches(tokens, seq_len=seq_len, global_batch_size=batch, num_batches=num_batches)
    parts = [data.eval_batches(tokens, seq_len=seq_len, global_batch_size=batch, num_batches=num_batches,
                               process_index=p, process_count=2) for p in range(2)]
    for i, b in enumerate(whole):
      for k in ('inputs', 'targets', 'weights'):
        np.testing.assert_array_equal(np.concatenate([parts[0][i][k], parts[1][i][k]]), b[k])


def test_eval_batches_asking_for_every_window_get_the_whole_split():
  # 1000 tokens, windows of 7: 142 full windows (targets 1-994) and 5 targets left for the tail window.
  tokens = np.arange(1000, dtype=np.int32)
  for num_batches, want_batches, whole in ((71, 72, True), (70, 70, False), (72, 72, True)):
    batches = data.eval_batches(tokens, seq_len=7, global_batch_size=2, num_batches=num_batches)
    assert len(batches) == want_batches, num_batches
    weights = np.concatenate([b['weights'] for b in batches])
    scored = np.sort(np.concatenate([b['targets'] for b in batches])[weights == 1])
    if whole:  # 71 batches of 2 ask for every full window (72: more): the tail's targets too, each once
      np.testing.assert_array_equal(scored, np.arange(1, 1000))
    else:  # fewer: whole windows only, spread over the split
      assert len(scored) == 140 * 7 and len(set(scored)) == len(scored) and weights.all()


def test_iterator_checkpoint_through_orbax(tmp_path):
  tokens = np.random.default_rng(0).integers(0, 83, 5_000).astype(np.int32)
  ds = data.train_dataset(tokens, seq_len=32, global_batch_size=8, seed=0)
  it = data.train_iterator(ds, prefetch=2, worker_count=0)
  for i in range(3):
    assert _batches_equal(next(it), ds[i])

  with ocp.CheckpointManager(tmp_path / 'ckpt') as mngr:
    mngr.save(3, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    expected = [next(it) for _ in range(4)]

    fresh = data.train_iterator(ds, prefetch=2, worker_count=0)
    restored = mngr.restore(3, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(fresh)))
  assert restored['data_iter'] is fresh  # restored in place
  assert fresh.get_state() == {'next_index': 3}
  got = [next(fresh) for _ in range(4)]
  assert all(_batches_equal(a, b) for a, b in zip(expected, got))
  assert _batches_equal(got[0], ds[3]) and not _batches_equal(got[0], ds[0])


def test_iterator_with_worker_processes():
  # One worker: each costs seconds to spawn, and one is enough to cross the process boundary and back.
  tokens = np.random.default_rng(0).integers(0, 83, 5_000).astype(np.int32)
  ds = data.train_dataset(tokens, seq_len=32, global_batch_size=8, seed=0)
  it = data.train_iterator(ds, prefetch=2, worker_count=1)
  try:
    assert _batches_equal(next(it), ds[0])
    state = it.get_state()
    for i in range(1, 4):
      assert _batches_equal(next(it), ds[i])
    it.set_state(state)
    assert _batches_equal(next(it), ds[1])
  finally:
    it.close()


@pytest.mark.parametrize('n,seq_len,stride', [(1000, 7, 3), (1 + 7 + 3 * 40, 7, 3), (500, 16, 1), (300, 8, 8)])
def test_eval_batches_with_a_stride_score_each_target_once_with_long_context(n, seq_len, stride):
  tokens = np.arange(n, dtype=np.int32)  # token value = position
  batches = data.eval_batches(tokens, seq_len=seq_len, global_batch_size=4, num_batches=0, stride=stride)
  inputs = np.concatenate([b['inputs'] for b in batches])
  targets = np.concatenate([b['targets'] for b in batches])
  weights = np.concatenate([b['weights'] for b in batches])
  np.testing.assert_array_equal(np.sort(targets[weights == 1]), np.arange(1, n))  # each target once
  # Every scored target after the first window's sees at least seq_len - stride tokens before it in its window.
  pos = np.broadcast_to(np.arange(seq_len), weights.shape)
  first_window = inputs[:, 0] == 0
  assert (pos[(weights == 1) & ~first_window[:, None]] >= seq_len - stride).all()
  # Full windows start every `stride` tokens.
  real = weights.any(axis=1)
  starts = inputs[real, 0]
  full = starts[starts + seq_len <= n - 1]
  np.testing.assert_array_equal(full[:len(full) - 1], np.arange(len(full) - 1) * stride)
  with pytest.raises(data.DataError, match='stride 9 must be in'):
    data.eval_batches(tokens, seq_len=8, global_batch_size=4, num_batches=0, stride=9)
