"""Seeds stacked in one process (selattn/stack.py, `selattn.sweep --stack`): each seed's workdir holds what its
unstacked run leaves (losses, evals, parameters, config.json, vocab.json, checkpoints); a stop and a rerun equal
an uninterrupted run; an unstacked run resumes a stacked seed; bad input is one line that touches nothing."""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import tiny
from run_files import checkpoint_steps, event_files, restore_params, scalars
from selattn import config as config_lib
from selattn import perf
from selattn import plot
from selattn import stack
from selattn import stopping
from selattn import sweep
from selattn import train

REPO = pathlib.Path(__file__).resolve().parent.parent
SEEDS = [0, 1]
STEPS = 8
TOL = 1e-5  # float32: a batched matmul may sum in another order than the unbatched one


def _config(**train_keys):
  """A tiny run with every part the stacked step must map per seed: dropout (embeddings, residuals, attention
  probabilities), warmup, gradient clipping that clips (grad norms are ~1), several steps per call."""
  c = tiny.get_config()
  m, t = c.model, c.train
  m.d_model, m.num_layers, m.kv_hidden = 16, 1, 16
  m.dropout, m.attn_dropout = 0.1, 0.1
  c.data.seq_len = 16
  t.batch_size, t.num_steps, t.warmup_steps, t.grad_clip = 4, STEPS, 3, 0.05
  t.steps_per_call, t.log_every, t.eval_every, t.checkpoint_every = 2, 4, 4, 4
  t.eval_batches, t.sample_length = 2, 8
  for k, v in train_keys.items():
    setattr(t, k, v)
  return c


def _seed_config(seed, **train_keys):
  c = _config(**train_keys)
  c.train.seed = seed
  return c


def _params(workdir, step):
  return restore_params(str(workdir), [step])[step]


def _assert_same_run(got, want, step=STEPS, tol=TOL):
  """Two runs' logged losses and evals, and the parameters of checkpoint `step`, agree within tol."""
  for tag in ('train/loss', 'train/grad_norm', 'eval/loss', 'eval/accuracy', 'train/learning_rate'):
    a, b = scalars(str(got), tag), scalars(str(want), tag)
    assert sorted(a) == sorted(b) and a, (tag, a, b)
    np.testing.assert_allclose([a[s] for s in sorted(a)], [b[s] for s in sorted(b)], atol=tol, rtol=0,
                               err_msg=f'{tag} of {got} vs {want}')
  for x, y in zip(_params(got, step), _params(want, step), strict=True):
    np.testing.assert_allclose(x, y, atol=tol, rtol=0)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """A stacked run of seeds 1 and 0 (in that order), and each seed's unstacked run."""
  root = tmp_path_factory.mktemp('stack')
  stacked = root / 'stacked'
  with pytest.MonkeyPatch.context() as mp:
    mp.setitem(perf.PEAK_FLOPS, 'cpu', 1e9)  # a known peak: train/mfu is written
    with pytest.MonkeyPatch.context() as four:
      # The process sees 4 devices; the stacked step runs on one of them, whose peak its MFU is measured against.
      four.setattr(jax, 'device_count', lambda *args: 4)
      # Listed in reverse: seed k at stack position i must get seed k's dropout key and data, not position i's.
      result = stack.train(_config(), str(stacked), SEEDS[::-1])
    single = {}
    for k in SEEDS:
      single[k] = root / 'single' / f'seed{k}'
      train.train(_seed_config(k), str(single[k]))
  return stacked, single, result


def test_each_stacked_seed_is_its_unstacked_run(runs):
  stacked, single, result = runs
  assert set(result) == set(SEEDS)
  for k in SEEDS:
    got = stacked / f'seed{k}'
    _assert_same_run(got, single[k])
    assert scalars(str(got), 'train/grad_norm')[4] > 0.05 * 5  # the clipping clips
    assert set(plot.read_scalars(str(got))) == set(plot.read_scalars(str(single[k])))  # every tag, speed's too
    saved, want = (json.loads((d / 'config.json').read_text()) for d in (got, single[k]))
    # MFU: the FLOPs of every stacked seed's tokens over one device's peak (1e9 above).
    rate, mfu = scalars(str(got), 'train/tokens_per_second'), scalars(str(got), 'train/mfu')
    flops = perf.flops_per_token(config_lib.from_config(_seed_config(k), saved['vocab_size']), saved['num_params'])
    assert sorted(mfu) == sorted(rate) == [4, 8]
    for s in rate:
      assert mfu[s] == pytest.approx(flops * rate[s] * len(SEEDS) / 1e9, rel=1e-4), (s, mfu, rate)
    assert saved['config']['train']['seed'] == k
    assert saved == want  # jax version, data hash, parameter count: all as the unstacked run writes them
    assert (got / 'vocab.json').read_text() == (single[k] / 'vocab.json').read_text()
    assert checkpoint_steps(str(got)) == checkpoint_steps(str(single[k])) == [4, 8]
    log = (got / 'train.log').read_text()
    assert 'eval at step 8: loss' in log and 'sample at step 8' in log
    assert result[k]['eval/loss'] == pytest.approx(scalars(str(single[k]), 'eval/loss')[STEPS], abs=TOL)
  # Two seeds, two runs (a seed's own init, data and dropout), not one run twice.
  assert scalars(str(stacked / 'seed0'))[4] != scalars(str(stacked / 'seed1'))[4]


class _StopAt(stopping.StopSignal):
  """SIGTERM as the loop sees it once `step` is reached (the loop polls once per call)."""

  def __init__(self, polls):
    super().__init__()
    self._polls = polls

  @property
  def received(self):
    self._polls -= 1
    return 'SIGTERM' if self._polls < 0 else None

  @received.setter
  def received(self, value):
    pass


def test_a_stopped_stacked_run_resumes_as_if_uninterrupted(runs, tmp_path):
  stacked = runs[0]
  stop = _StopAt(polls=2)  # polled after steps 2 and 4, then stops after step 6 (between logs: a loss unlogged)
  stack.train(_config(), str(tmp_path), SEEDS, stop=stop)
  assert stop.stopped_at == 6
  assert checkpoint_steps(str(tmp_path / 'seed0')) == [4, 6]
  stack.train(_config(), str(tmp_path), SEEDS)
  for k in SEEDS:
    _assert_same_run(tmp_path / f'seed{k}', stacked / f'seed{k}', tol=0)


def test_an_unstacked_run_resumes_a_stacked_seed_and_mismatched_steps_are_refused(runs, tmp_path):
  single = runs[1]
  stack.train(_config(num_steps=4), str(tmp_path), SEEDS)
  train.train(_seed_config(1), str(tmp_path / 'seed1'))  # seed 1 alone, 4 -> 8
  _assert_same_run(tmp_path / 'seed1', single[1])
  # Seeds now at steps 4 and 8: refused in one line, before anything is written.
  before = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in tmp_path.rglob('*') if p.is_file()}
  with pytest.raises(train.TrainingError) as e:
    stack.train(_config(), str(tmp_path), SEEDS)
  assert str(e.value) == (
      'the stacked seeds stand at different steps (seed 0 at step 4, seed 1 at step 8): bring them to step 8 by '
      'rerunning the sweep without --stack and with --config.train.num_steps=8, then rerun it with --stack')
  after = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in tmp_path.rglob('*') if p.is_file()}
  assert after == before
  # As the error says: the laggard unstacked up to the leader's step, then stacked again (nothing left to train).
  train.train(_seed_config(0), str(tmp_path / 'seed0'))
  result = stack.train(_config(), str(tmp_path), SEEDS)
  assert result[1]['eval/loss'] == scalars(str(tmp_path / 'seed1'), 'eval/loss')[STEPS]
  # A new seed beside trained ones stands at step 0.
  with pytest.raises(train.TrainingError, match=r'seed 0 at step 8, seed 1 at step 8, seed 2 at step 0\)'):
    stack.train(_config(), str(tmp_path), [0, 1, 2])
  assert not (tmp_path / 'seed2').exists()


class _EarlyExitLine(stopping.StopSignal):
  """Calls the early-exit callbacks with a line when the loop starts, as a signal before the loop would (without
  exiting): the line a seed's train.log gets then."""

  def loop_started(self):
    super().loop_started()
    for f in self.on_exit:
      f('stopped: a line printed on stderr')


def test_each_seed_log_ends_with_the_error_that_ended_the_run(tmp_path):
  """A NaN stops the stacked run: each seed's train.log ends with the error line, as an unstacked run's does."""
  c = _config(num_steps=20, learning_rate=1e30, steps_per_call=1, log_every=1, warmup_steps=0)
  c.model.dropout = c.model.attn_dropout = 0.0
  stop = _EarlyExitLine()
  with pytest.raises(train.TrainingError, match='the loss is not finite') as e:
    stack.train(c, str(tmp_path), SEEDS, stop=stop)
  assert stop.on_exit == []  # the seeds' callbacks leave with the run
  for k in SEEDS:
    lines = (tmp_path / f'seed{k}' / 'train.log').read_text().splitlines()
    assert re.fullmatch(r'E\d{4} .* stack\.py:\d+\] error: ' + re.escape(str(e.value)), lines[-1]), lines[-3:]
    assert sum(l.startswith('W') and l.endswith('] stopped: a line printed on stderr') for l in lines) == 1, lines


@pytest.mark.parametrize('key,value,message', [
    ('data', 2, 'stacked seeds train on one device: mesh.data=2 is not supported; drop it or train without --stack'),
    ('tensor', 2, 'mesh.tensor=2 is not supported'),
])
def test_unsupported_mesh_is_refused(tmp_path, key, value, message):
  c = _config()
  setattr(c.mesh, key, value)
  with pytest.raises(config_lib.ConfigError, match=message):
    stack.train(c, str(tmp_path / 'sw'), SEEDS)
  assert not (tmp_path / 'sw').exists()


@pytest.mark.parametrize('text', ['', '0,0', '-1', 'a,b'])
def test_bad_seed_lists(text):
  with pytest.raises(config_lib.ConfigError, match='must be distinct non-negative seeds'):
    stack.parse_seeds(text)
  assert stack.parse_seeds('2, 0') == [2, 0]


def _sweep(*args):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO))
  return subprocess.run([sys.executable, '-m', 'selattn.sweep', *args], capture_output=True, text=True, cwd=REPO,
                        check=False, env=env, timeout=300)


def test_sweep_stack_on_cpu(tmp_path):
  """`selattn.sweep --stack`: one process for both seeds, a summary like the unstacked sweep's, and the one-line
  error of a seed left behind (as the CLI prints it)."""
  work = tmp_path / 'sw'
  args = ['--config', 'configs/tiny.py', '--seeds', '2', '--workdir', str(work), '--gpus', 'none', '--stack',
          '--config.train.num_steps=4', '--config.train.eval_every=2', '--config.train.checkpoint_every=2',
          '--config.train.log_every=2', '--config.train.sample_length=0', '--config.model.num_layers=1',
          '--config.data.seq_len=16', '--config.train.batch_size=4']
  r = _sweep(*args)
  assert r.returncode == 0, r.stdout + r.stderr
  assert '[sweep] seeds 0,1 (stacked) finished' in r.stdout
  summary = json.loads((work / 'summary.json').read_text())
  assert set(summary['seeds']) == {'0', '1'} and summary['failed'] == {}
  assert {s['last_step'] for s in summary['seeds'].values()} == {4}
  stack_log = (work / 'stack.log').read_text()
  assert 'training 2 stacked seeds from step 0 to 4' in stack_log
  assert stack_log.count('] step 4/4 | loss seed 0 ') == 1  # the process's own lines, once
  # Finished: one line naming every seed's last held-out loss (the eval line's) and where the checkpoints are.
  losses = re.search(r'\] eval at step 4: loss (seed 0 [0-9.]+ \| seed 1 [0-9.]+)\n', stack_log).group(1)
  assert re.search(rf'\] finished at step 4: held-out loss {re.escape(losses)} \| this call trained 4 steps in '
                   r'0m\d\ds \| checkpoints in .*/seed<k>/checkpoints\n', stack_log), stack_log[-2000:]
  # No seed's own line (those go to seed<k>/train.log only): 'loss 4.1', not the process's 'loss seed 0 4.1 | ...'.
  for pattern in (r'\] step \d+/4 \| loss \d', r'\] eval at step \d+: loss \d', r'\] training from step',
                  r'\] stacked with seeds'):
    assert not re.search(pattern, stack_log), (pattern, stack_log)
  for k in SEEDS:
    assert len(event_files(str(work / f'seed{k}'))) == 1
    log = (work / f'seed{k}' / 'train.log').read_text()
    for line in ('] step 2/4 | loss', '] step 4/4 | loss', '] eval at step 4: loss', '] training from step 0 to 4'):
      assert log.count(line) == 1, (k, line, log)  # each seed's lines once, none of the process's
    assert 'stacked seeds' not in log.replace('stacked with seeds', '')
    loss = re.search(r'\] eval at step 4: loss ([0-9.]+) ', log).group(1)
    assert re.search(rf'\] finished at step 4: held-out loss {loss} \| .*checkpoint in .*seed{k}/checkpoints; sample '
                     rf'from it with: python -m selattn.sample --workdir .*seed{k}$', log.splitlines()[-1]), log[-2000:]
  assert not (work / 'train.log').exists() and not (work / 'output.log').exists()  # the stacked process: stack.log
  sweep.main(['--config', 'configs/tiny.py', '--seeds', '2', '--workdir', str(work), '--summarize', '--stack'])
  assert json.loads((work / 'summary.json').read_text())['seeds'] == summary['seeds']
  job = sweep.build_stacked_job('configs/tiny.py', str(work), [0, 1], args[9:])
  assert job.argv[1:] == ['-m', 'selattn.main', '--config=configs/tiny.py', f'--workdir={work}',
                          '--stack_seeds=0,1', *args[9:]]
  assert job.log == str(work / 'stack.log') and job.seeds == [0, 1]
  # Seed 1 moved on alone: the stacked rerun fails in one line, reported for both seeds.
  (work / 'seed1' / 'checkpoints' / '4').rename(work / 'seed1' / 'checkpoints' / '4.damaged')
  r = _sweep(*args)
  assert r.returncode == 1
  line = r.stderr.strip().splitlines()[-1]
  assert line.startswith('seed 1 failed: error: the stacked seeds stand at different steps (seed 0 at step 4, '
                         'seed 1 at step 2)'), r.stderr
  assert not (work / 'seed1' / 'checkpoints' / '4').exists()


def test_stacked_jobs_deal_the_seeds_over_the_gpus():
  deal = lambda n, seeds: [(j.seeds, os.path.basename(j.log)) for j in  # pylint: disable=unnecessary-lambda-assignment
                           sweep.build_stacked_jobs('c.py', 'w', seeds, [], n)]
  assert deal(0, [0, 1, 2]) == deal(1, [0, 1, 2]) == [([0, 1, 2], 'stack.log')]
  assert deal(2, [0, 1, 2]) == [([0, 2], 'stack-0-2.log'), ([1], 'stack-1.log')]
  assert deal(4, [3, 4]) == [([3], 'stack-3.log'), ([4], 'stack-4.log')]  # no process without a seed


def test_sweep_stack_on_two_gpus_runs_one_process_per_gpu(tmp_path):
  """--gpus 0,1 (CUDA_VISIBLE_DEVICES per process; JAX_PLATFORMS=cpu here): seeds 0 and 2 stacked on GPU 0, seed 1
  on GPU 1, at the same time; one summary over the three."""
  work = tmp_path / 'sw'
  r = _sweep('--config', 'configs/tiny.py', '--seeds', '3', '--workdir', str(work), '--gpus', '0,1', '--stack',
             '--config.train.num_steps=4', '--config.train.eval_every=2', '--config.train.checkpoint_every=2',
             '--config.train.log_every=2', '--config.train.sample_length=0', '--config.model.num_layers=1',
             '--config.data.seq_len=16', '--config.train.batch_size=4')
  assert r.returncode == 0, r.stdout + r.stderr
  assert '[sweep] seeds 0,2 (stacked) started on GPU 0' in r.stdout
  assert '[sweep] seed 1 started on GPU 1' in r.stdout
  if not sweep.detect_gpus():  # a machine without GPUs is told where the runs go
    assert '[sweep] warning: --gpus 0,1, but nvidia-smi shows no GPU here' in r.stderr
  assert 'training 2 stacked seeds from step 0 to 4' in (work / 'stack-0-2.log').read_text()
  assert 'training 1 stacked seeds from step 0 to 4' in (work / 'stack-1.log').read_text()
  summary = json.loads((work / 'summary.json').read_text())
  assert {k: s['last_step'] for k, s in summary['seeds'].items()} == {'0': 4, '1': 4, '2': 4}
  assert summary['failed'] == {}


def test_sweep_stack_refuses_per_gpu(tmp_path):
  r = _sweep('--config', 'configs/tiny.py', '--workdir', str(tmp_path / 'x'), '--stack', '--per_gpu', '2')
  assert r.returncode == 2 and '--stack trains one process per GPU: --per_gpu does not apply' in r.stderr
  assert not (tmp_path / 'x').exists()


def test_sigterm_saves_every_seed_and_the_rerun_resumes_them(tmp_path):
  """The command line: SIGTERM mid-run saves each seed at one step and exits 75 (resumable); the rerun resumes both."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO), JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'cache'),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0', JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  work = tmp_path / 'sw'
  argv = [sys.executable, '-m', 'selattn.main', '--config', 'configs/tiny.py', f'--workdir={work}',
          '--stack_seeds=0,1', '--config.train.sample_length=0', '--config.model.num_layers=1',
          '--config.data.seq_len=16', '--config.train.batch_size=4', '--config.train.checkpoint_every=1000000']
  log = tmp_path / 'stack.log'
  with open(log, 'w') as f:
    proc = subprocess.Popen([*argv, '--config.train.num_steps=1000000'], stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
                            env=env)
  deadline = time.time() + 120
  while 'step 20/' not in log.read_text() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=120) == stopping.EXIT_STOPPED, log.read_text()[-2000:]
  steps = [checkpoint_steps(str(work / f'seed{k}')) for k in SEEDS]
  assert steps[0] == steps[1] and len(steps[0]) == 1 and steps[0][0] >= 20, steps
  stopped = steps[0][0]
  for k in SEEDS:
    assert f'SIGTERM received: saved a checkpoint at step {stopped}' in (work / f'seed{k}' / 'train.log').read_text()
    assert 'finished at step' not in (work / f'seed{k}' / 'train.log').read_text()  # stopped is not finished
  assert 'finished at step' not in log.read_text()
  r = subprocess.run([*argv, f'--config.train.num_steps={stopped + 2}'], capture_output=True, text=True, cwd=REPO,
                     env=env, timeout=120, check=False)
  assert r.returncode == 0, r.stderr[-2000:]
  for k in SEEDS:
    text = (work / f'seed{k}' / 'train.log').read_text()
    assert f'at step {stopped}' in text.split('resumed from')[-1].splitlines()[0]
    assert checkpoint_steps(str(work / f'seed{k}')) == [stopped, stopped + 2]
