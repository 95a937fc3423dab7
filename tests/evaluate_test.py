"""Byte-level training on a generated file of enwik8's shape (configs/enwik8.py, shrunk), and selattn.evaluate: the
test split's loss against a numpy reference over the file's last 5% of bytes, bits per byte = nats / ln 2, on a
run whose workdir lock is held, from the command line as users type it, and its one-line errors."""

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from configs import enwik8
from run_files import scalars
from selattn import evaluate
from selattn import sample
from selattn import train
from selattn import workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 120_000  # bytes: 108,000 train, 6,000 val, 6,000 test
T = 32


def _enwik8_like(path) -> bytes:
  """XML-ish text with multi-byte characters, a few bytes that are not UTF-8, and a character cut at the end."""
  rng = np.random.default_rng(0)
  words = ['<page>', '<title>', 'Ünïcödé', 'the', 'of', '[[link]]', '{{cite}}', '€', '日本', '\n', ' ', '&amp;']
  text = ''.join(rng.choice(words, size=N // 3)).encode()
  raw = bytearray(text[:N - 1] + '€'.encode()[:1])
  raw[1000] = 0xff
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(raw)
  return bytes(raw)


def _config():
  c = enwik8.get_config()
  m, t = c.model, c.train
  m.d_model, m.num_heads, m.num_layers, m.dtype, m.dropout = 32, 2, 1, 'float32', 0.0
  c.data.seq_len = T
  t.batch_size, t.num_steps, t.warmup_steps, t.steps_per_call = 8, 4, 1, 1
  t.log_every, t.eval_every, t.checkpoint_every, t.eval_batches, t.sample_length = 2, 4, 2, 2, 24
  return c


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """(root: the folder users run from, with data/enwik8 and runs/enwik8; the file's bytes; train's result)."""
  root = tmp_path_factory.mktemp('enwik8')
  raw = _enwik8_like(str(root / 'data' / 'enwik8'))
  cwd = os.getcwd()
  os.chdir(root)  # data.path='data/enwik8' is relative, as configs/enwik8.py has it
  try:
    result = train.train(_config(), 'runs/enwik8')
  finally:
    os.chdir(cwd)
  return root, raw, result


def _reference(workdir, step, tokens, stride=T):
  """(summed NLL in nats, count) of the restored model over `tokens` (numpy): a window every `stride` tokens, the
  first scoring all its targets, the others their last `stride`, a last one ending at the end for the rest."""
  model = sample.restore(workdir, step)[0]
  n = len(tokens)
  rows, scored_to = [], 0  # (start, targets skipped); scored_to: the last target scored so far
  for s in range(0, n - T, stride):
    rows.append((s, 0 if s == 0 else T - stride))
    scored_to = s + T
  if scored_to < n - 1:
    rows.append((n - 1 - T, T - (n - 1 - scored_to)))
  total, count = 0.0, 0
  inputs = np.stack([tokens[s:s + T] for s, _ in rows]).astype(np.int32)
  targets = np.stack([tokens[s + 1:s + T + 1] for s, _ in rows])
  logits = np.asarray(model(jnp.asarray(inputs)), np.float64)
  m = logits.max(-1, keepdims=True)
  logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  for row, (_, skip) in enumerate(rows):
    total += nll[row, skip:].sum()
    count += T - skip
  return total, count


def test_byte_run_logs_bits_per_byte_and_samples_with_replacement_characters(run):
  root, raw, result = run
  workdir = str(root / 'runs' / 'enwik8')
  assert result['eval/bpb'] == pytest.approx(result['eval/loss'] / math.log(2), rel=1e-6)
  assert 'eval/bpc' not in result
  bpb = scalars(workdir, 'eval/bpb')
  assert sorted(bpb) == [4] and bpb[4] == pytest.approx(result['eval/bpb'], rel=1e-6)
  with open(os.path.join(workdir, 'vocab.json')) as f:
    assert json.load(f) == {'bytes': 256}
  with open(os.path.join(workdir, 'config.json')) as f:
    saved = json.load(f)
  assert saved['config']['data']['vocab'] == 'bytes' and saved['vocab_size'] == 256
  # A byte model's sample is any bytes: decoded with U+FFFD where they are not UTF-8, never an exception.
  model, vocab, cfg, _ = sample.restore(workdir)
  cwd = os.getcwd()
  os.chdir(root)
  try:  # selattn.sample's default prompt: the first line of the corpus, read from its first bytes only
    first = next(line for line in raw.decode('utf-8', 'replace').splitlines() if line.strip())
    assert sample.default_prompt(cfg) == first.rstrip()[:40] and len(first) > 40
  finally:
    os.chdir(cwd)
  from selattn import generate  # pylint: disable=g-import-not-at-top
  text = generate.generate(model, vocab, '<page>', 200, temperature=3.0, seed=1, max_len=cfg.data.seq_len)
  assert text.startswith('<page>') and isinstance(text, str)


def test_test_split_loss_is_the_nll_of_the_files_last_5_percent(run):
  root, raw, _ = run
  workdir = str(root / 'runs' / 'enwik8')
  cwd = os.getcwd()
  os.chdir(root)
  try:
    # The trainer holds the lock while it runs: evaluation reads past it.
    with workdir_lib.Lock(workdir):
      r = evaluate.evaluate('runs/enwik8', split='test', step=4)
      val = evaluate.evaluate('runs/enwik8', split='val', step=2, batch_size=4)
  finally:
    os.chdir(cwd)
  ref = np.frombuffer(raw, np.uint8)
  total, count = _reference(workdir, 4, ref[N * 19 // 20:])  # the last 6,000 bytes, cut here from the file
  assert r['tokens_scored'] == count == 6_000 - 1
  assert r['loss'] == pytest.approx(total / count, rel=1e-5)
  assert r['bits_per_byte'] == pytest.approx(total / count / math.log(2), rel=1e-5)
  total, count = _reference(workdir, 2, ref[N * 9 // 10:N * 19 // 20])
  assert val['tokens_scored'] == count and val['loss'] == pytest.approx(total / count, rel=1e-5)
  assert val['step'] == 2 and r['step'] == 4
  # Overlapping windows: every token still scored once, now with at least T - 8 tokens of context.
  cwd = os.getcwd()
  os.chdir(root)
  try:
    strided = evaluate.evaluate('runs/enwik8', split='test', step=4, stride=8)
  finally:
    os.chdir(cwd)
  total, count = _reference(workdir, 4, ref[N * 19 // 20:], stride=8)
  assert strided['tokens_scored'] == count == 6_000 - 1 and strided['stride'] == 8
  assert strided['loss'] == pytest.approx(total / count, rel=1e-5)
  assert strided['loss'] != pytest.approx(r['loss'], rel=1e-4)  # other contexts, another loss


def _cli(*args, cwd):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', *args], cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=300, check=False)


def test_cli_as_users_type_it(run):
  root, _, _ = run
  res = _cli('selattn.evaluate', '--workdir', 'runs/enwik8', '--split', 'test', '--out', 'test.json',
             '--compilation_cache', 'jax_cache', cwd=root)
  assert res.returncode == 0, res.stderr[-3000:]
  assert (root / 'jax_cache').is_dir()  # the flag's directory, relative to where the command runs
  lines = res.stdout.strip().splitlines()
  assert len(lines) == 1, res.stdout
  with open(root / 'test.json') as f:
    r = json.load(f)
  assert lines[0] == evaluate.describe(r)
  assert lines[0].startswith('runs/enwik8 step 4, test split of data/enwik8 (5,999 bytes scored): loss ')
  assert f"| {r['bits_per_byte']:.4f} bits per byte |" in lines[0]
  assert r['bits_per_byte'] == pytest.approx(r['loss'] / math.log(2), rel=1e-12)
  assert r['bytes_scored'] == r['tokens_scored'] == 5_999

  res = _cli('selattn.evaluate', '--workdir', 'runs/none', cwd=root)
  assert res.returncode == 1 and res.stderr.strip() == 'error: --workdir=runs/none: no such directory'


def test_bad_requests_are_one_line(run, tmp_path, monkeypatch):
  root, _, _ = run
  monkeypatch.chdir(root)  # data.path='data/enwik8' is relative
  workdir = str(root / 'runs' / 'enwik8')
  with pytest.raises(sample.SampleError, match=r'^no checkpoint at step 3 in .* \(it has steps \[2, 4\]\)$'):
    evaluate.evaluate(workdir, step=3)
  # A run trained with the 'tail' split (its config.json says so) has no test split.
  tail = str(tmp_path / 'tail')
  os.makedirs(tail)
  with open(os.path.join(workdir, 'config.json')) as f:
    saved = json.load(f)
  saved['config']['data']['split'] = 'tail'
  with open(os.path.join(tail, 'config.json'), 'w') as f:
    json.dump(saved, f)
  with pytest.raises(evaluate.EvaluateError) as e:
    evaluate.evaluate(tail, split='test')
  assert str(e.value) == (f"{tail} was trained with data.split='tail', which has no test split; use --split val, "
                          "or train with data.split='enwik8'")
  # Zero is not "the default": --stride 0 once scored silently without overlap.
  for kwargs, message in [({'stride': 0}, r'^--stride=0 must be in \[1, data.seq_len=32\]$'),
                          ({'stride': 33}, r'^--stride=33 must be in \[1, data.seq_len=32\]$'),
                          ({'batch_size': 0}, r'^--batch_size=0 must be positive$'),
                          ({'num_batches': -1}, r'^--batches=-1 must be 0 \(the whole split\) or more$')]:
    with pytest.raises(evaluate.EvaluateError, match=message):
      evaluate.evaluate(workdir, **kwargs)


def test_an_edited_corpus_is_refused(run, tmp_path, monkeypatch):
  # The same path, another text (one byte changed): its held-out split is not the one the run held out.
  root, raw, _ = run
  shutil.copytree(root / 'runs', tmp_path / 'runs')
  os.makedirs(tmp_path / 'data')
  edited = bytearray(raw)
  edited[-10] ^= 1
  (tmp_path / 'data' / 'enwik8').write_bytes(bytes(edited))
  monkeypatch.chdir(tmp_path)  # data.path='data/enwik8' is relative
  with pytest.raises(evaluate.EvaluateError) as e:
    evaluate.evaluate('runs/enwik8', split='test')
  assert str(e.value) == ("the text of data.path='data/enwik8' has changed since runs/enwik8 was trained on it: its "
                          'held-out split would not be the one the run held out')


def test_a_character_run_reports_bits_per_char_and_per_byte(tmp_path):
  # Multi-byte characters: a character's bits are spread over its UTF-8 bytes (1 to 4 of them).
  chars = list(np.random.default_rng(1).choice(list('ab é€🙂\n'), size=6_000))
  # The test split's first character (never a target) 4 bytes, its last 1: counting the inputs' bytes instead of
  # the targets' would be 3 bytes off.
  chars[6_000 * 19 // 20], chars[-1] = '🙂', 'a'
  text = ''.join(chars)
  path = tmp_path / 'utf8.txt'
  path.write_text(text, encoding='utf-8')
  c = _config()
  c.data.path, c.data.vocab, c.data.split = str(path), 'chars', 'enwik8'
  c.train.num_steps, c.train.eval_every, c.train.checkpoint_every, c.train.sample_length = 2, 2, 2, 0
  workdir = str(tmp_path / 'run')
  train.train(c, workdir)
  r = evaluate.evaluate(workdir, split='test')
  test = text[6_000 * 19 // 20:]
  assert r['unit'] == 'char' and r['tokens_scored'] == len(test) - 1
  assert r['bytes_scored'] == len(test[1:].encode('utf-8'))  # every scored character's bytes, counted here
  nats = r['loss'] * r['tokens_scored']
  assert r['bits_per_char'] == pytest.approx(r['loss'] / math.log(2), rel=1e-12)
  assert r['bits_per_byte'] == pytest.approx(nats / math.log(2) / r['bytes_scored'], rel=1e-9)
  assert r['bits_per_byte'] < r['bits_per_char']
  assert ' bits per char (' in evaluate.describe(r) and ' bits per byte | ' in evaluate.describe(r)


def test_prepare_cli(run, tmp_path):
  root, _, _ = run
  shutil.copytree(os.path.join(REPO, 'configs'), root / 'configs', dirs_exist_ok=True)
  # As the README has it, from a folder holding configs/ and data/enwik8 (the store was built by the run).
  res = _cli('selattn.prepare', '--config', 'configs/enwik8.py', cwd=root)
  assert res.returncode == 0, res.stderr[-3000:]
  assert res.stdout.strip() == (
      f'data/enwik8: 120,000 bytes, 256 symbols (uint8), already prepared in {root}/data/enwik8.selattn/bytes.json | '
      "split 'enwik8': train 108,000, val 6,000, test 6,000 | sha256 " + hashlib.sha256(run[1]).hexdigest()[:12]
      + '...')
  shutil.copytree(os.path.join(REPO, 'configs'), tmp_path / 'configs')
  res = _cli('selattn.prepare', '--config', 'configs/enwik8.py', cwd=tmp_path)
  assert res.returncode == 1
  assert res.stderr.strip() == ('error: data.path=data/enwik8: no such file (download '
                                'http://mattmahoney.net/dc/enwik8.zip and unzip it into data/)')
