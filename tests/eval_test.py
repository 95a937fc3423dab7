"""A training run in the configuration users run (warmup and cosine decay, dropout and attention dropout,
clipping that clips, a padded last eval batch), its held-out loss checked against the NLL of every held-out
character computed here.

The reference slices the corpus file itself (the split point and the windows written as literals from the
documented scheme), runs the restored model on those windows without a dropout key, and takes a numpy
log-softmax: it shares nothing with the evaluation code (data.eval_batches, train's eval step and its sums).
"""

from __future__ import annotations

import logging
import math
import os
import shutil

from absl import logging as absl_logging
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from optimizer_test import np_learning_rate
from run_files import checkpoint_steps, event_files, new_event_files, scalars
from selattn import data as data_lib
from selattn import sample
from selattn import train

N_CHARS = 3430  # val_fraction 0.2: 2744 training characters, 686 held out (exact in floating point, no rounding)
N_TRAIN, N_VAL = 2744, 686
T = 32  # seq_len: 686 - 1 = 21 * 32 + 13 -> 21 full windows and a tail window scoring 13 targets
BATCH = 16  # 22 eval windows -> 2 batches, the second holding 6 windows and 10 padding rows


def _corpus(path):
  """Words from a small alphabet; the held-out split has characters in other proportions than the training one."""
  rng = np.random.default_rng(0)
  words = ['the', 'cat', 'sat', 'on', 'a', 'mat', 'and', 'ate', 'rats', 'quickly', 'zebra', 'jazz']
  out = []
  while sum(map(len, out)) < N_CHARS:
    w = words[rng.integers(0, len(words) if sum(map(len, out)) > N_TRAIN else 8)]
    out.append(w + rng.choice([' ', ' ', ', ', '.\n']))
  text = ''.join(out)[:N_CHARS]
  with open(path, 'w') as f:
    f.write(text)
  return text


def _config(path, **train):
  c = tiny.get_config()
  c.data.path, c.data.seq_len = path, T
  c.model.dropout, c.model.attn_dropout = 0.2, 0.1
  t = c.train
  t.num_steps, t.warmup_steps, t.lr_schedule, t.min_learning_rate = 6, 2, 'cosine', 3e-4
  t.grad_clip, t.weight_decay = 1.0, 0.1
  t.steps_per_call, t.log_every, t.eval_every, t.checkpoint_every = 1, 1, 0, 3
  t.eval_batches, t.batch_size, t.sample_length = 0, BATCH, 0
  for k, v in train.items():
    setattr(t, k, v)
  return c


class _Lines(logging.Handler):
  def __init__(self):
    super().__init__(logging.INFO)
    self.lines = []

  def emit(self, record):
    self.lines.append(record.getMessage())


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """(workdir, corpus path, text, result, log lines, the host eval batches train.train built)."""
  root = tmp_path_factory.mktemp('eval')
  path = str(root / 'corpus.txt')
  text = _corpus(path)
  workdir = str(root / 'run')
  result, lines, batches = _train_recording(_config(path), workdir)
  return workdir, path, text, result, lines, batches


def _train_recording(config, workdir):
  """train.train, returning (result, absl log lines, the host eval batches it built)."""
  built = []
  eval_batches = data_lib.eval_batches

  def recording_eval_batches(tokens, **kw):
    out = eval_batches(tokens, **kw)
    built.append(out)
    return out

  rec = _Lines()
  absl_logger = logging.getLogger('absl')
  old_verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.INFO)
  absl_logger.addHandler(rec)
  mp = pytest.MonkeyPatch()
  mp.setattr(data_lib, 'eval_batches', recording_eval_batches)
  try:
    result = train.train(config, workdir)
  finally:
    mp.undo()
    absl_logger.removeHandler(rec)
    absl_logging.set_verbosity(old_verbosity)
  assert len(built) == 1
  return result, rec.lines, built[0]


def _reference_nll(workdir, text, windows):
  """(total NLL, correct predictions, count, scored held-out offsets) over `windows` [(start in the held-out
  split, targets skipped)], from the file and the restored model."""
  vocab = sorted(set(text))
  ids = np.array([vocab.index(c) for c in text])
  val = ids[N_TRAIN:]
  assert len(val) == N_VAL
  model = sample.restore(workdir, 6)[0]
  inputs = np.stack([val[s:s + T] for s, _ in windows])
  targets = np.stack([val[s + 1:s + T + 1] for s, _ in windows])
  logits = np.asarray(model(jnp.asarray(inputs, jnp.int32)), np.float64)  # no dropout key: evaluation
  m = logits.max(-1, keepdims=True)
  logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  correct = logits.argmax(-1) == targets
  total, right, count, scored = 0.0, 0, 0, []
  for row, (s, skip) in enumerate(windows):
    total += nll[row, skip:].sum()
    right += correct[row, skip:].sum()
    count += T - skip
    scored.extend(range(s + 1 + skip, s + T + 1))
  return total, right, count, scored


def test_held_out_loss_is_the_nll_of_every_held_out_character(run):
  workdir, _, text, result, lines, _ = run
  # Full windows at 0, 32, ..., 640 score all their 32 targets; the last window ends at the last character and
  # scores its last 13 targets (those after 672).
  windows = [(s, 0) for s in range(0, 21 * T, T)] + [(N_VAL - 1 - T, T - 13)]
  total, right, count, scored = _reference_nll(workdir, text, windows)
  assert sorted(scored) == list(range(1, N_VAL))  # every held-out character after the first, once
  assert count == N_VAL - 1 == 685
  assert result['eval/loss'] == pytest.approx(total / count, rel=1e-5)
  assert result['eval/accuracy'] == pytest.approx(right / count, abs=1e-6)
  assert result['eval/bpc'] == pytest.approx(total / count / math.log(2), rel=1e-5)
  assert any('(685 held-out chars)' in line for line in lines), [l for l in lines if 'eval' in l]


def test_eval_windows_lie_in_the_held_out_split(run):
  _, _, text, _, _, batches = run
  val_text = text[N_TRAIN:]
  assert len(batches) == 2
  assert batches[1]['weights'][:6].any(axis=1).all() and not batches[1]['weights'][6:].any()  # part-filled
  vocab = sorted(set(text))
  scored = 0
  for b in batches:
    for inputs, targets, weights in zip(b['inputs'], b['targets'], b['weights']):
      if not weights.any():
        continue
      window = ''.join(vocab[i] for i in inputs) + vocab[targets[-1]]
      assert ''.join(vocab[i] for i in targets) == window[1:]
      start = val_text.find(window)
      assert start >= 0, f'window {window!r} is not in the held-out text'
      assert start % T == 0 or start == N_VAL - 1 - T, start
      scored += int(weights.sum())
  assert scored == N_VAL - 1


def test_the_run_warms_up_decays_and_clips(run):
  workdir, _, _, _, _, _ = run
  h = dict(learning_rate=3e-3, warmup_steps=2, lr_schedule='cosine', num_steps=6, min_learning_rate=3e-4)
  lr = scalars(workdir, 'train/learning_rate')
  assert sorted(lr) == list(range(1, 7))
  # The rate logged at step s is the one its update used: update s - 1, counting from 0.
  np.testing.assert_allclose([lr[s] for s in range(1, 7)], [np_learning_rate(s - 1, **h) for s in range(1, 7)],
                             rtol=1e-6, atol=1e-10)
  norms = scalars(workdir, 'train/grad_norm')
  assert max(norms.values()) > 1.0  # grad_clip = 1 clipped at least one step


def test_resume_mid_schedule_with_dropout_is_bit_identical(run, tmp_path):
  # The dropout masks, the schedule position and the data position all come back from the step-3 checkpoint.
  workdir, path, _, _, _, _ = run
  losses = scalars(workdir)
  assert checkpoint_steps(workdir) == [3, 6]
  copy = str(tmp_path / 'run')
  shutil.copytree(workdir, copy)
  shutil.rmtree(os.path.join(copy, 'checkpoints', '6'))
  first = event_files(copy)
  train.train(_config(path), copy)
  resumed = scalars(copy, files=new_event_files(copy, first))
  assert sorted(resumed) == [4, 5, 6]
  assert resumed == {s: losses[s] for s in (4, 5, 6)}
  assert len(set(losses.values())) == 6


def test_a_subset_eval_scores_whole_spread_windows(run, tmp_path):
  # train.eval_batches=1: 16 of the 21 full windows, spread over the split; the run is at its last step, so
  # train.train only evaluates.
  workdir, path, text, _, _, _ = run
  copy = str(tmp_path / 'run')
  shutil.copytree(workdir, copy)
  result, lines, batches = _train_recording(_config(path, eval_batches=1), copy)
  assert len(batches) == 1 and batches[0]['weights'].all()
  vocab = sorted(set(text))
  val_text = text[N_TRAIN:]
  starts = [val_text.find(''.join(vocab[i] for i in row)) for row in batches[0]['inputs']]
  assert len(set(starts)) == 16 and all(s >= 0 and s % T == 0 for s in starts), starts
  assert min(starts) == 0 and max(starts) >= 0.8 * N_VAL, starts  # the whole split, not its start
  total, right, count, _ = _reference_nll(copy, text, [(s, 0) for s in starts])
  assert count == 16 * T
  assert result['eval/loss'] == pytest.approx(total / count, rel=1e-5)
  assert result['eval/accuracy'] == pytest.approx(right / count, abs=1e-6)
  assert any(f'({16 * T} held-out chars)' in line for line in lines)


def test_logged_loss_is_the_mean_over_the_logging_window(run, tmp_path):
  # Two steps per jitted call, logging every 4: the train/loss at step 4 is the mean of steps 1-4's losses, at
  # the last step (6) of steps 5-6's (per-step losses from the one-step-per-call run above: the same training,
  # dropout masks included, since they follow the optimizer step).
  workdir, path, _, result, _, _ = run
  per_step = scalars(workdir)
  other = str(tmp_path / 'run')
  got = train.train(_config(path, steps_per_call=2, log_every=4, checkpoint_every=6), other)
  logged = scalars(other)
  assert sorted(logged) == [4, 6]
  assert logged[4] == pytest.approx(np.mean([per_step[s] for s in (1, 2, 3, 4)]), rel=1e-5)
  assert logged[6] == pytest.approx(np.mean([per_step[s] for s in (5, 6)]), rel=1e-5)
  lr, per_step_lr = scalars(other, 'train/learning_rate'), scalars(workdir, 'train/learning_rate')
  assert lr == pytest.approx({s: per_step_lr[s] for s in (4, 6)}, rel=1e-6)  # the rate of the last update
  assert got['eval/loss'] == pytest.approx(result['eval/loss'], rel=1e-5)
