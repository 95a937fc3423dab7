"""The command line, `python -m selattn.main`, in subprocesses: SIGTERM and SIGKILL followed by a restart give the
losses of an uninterrupted run, bad inputs are one-line errors that leave the checkpoints alone, and a NaN stops
the run naming the step and the last good checkpoint."""

import hashlib
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from configs import tiny
from run_files import checkpoint_steps, event_files, new_event_files, restore_params, scalars
from selattn import train

REPO = pathlib.Path(__file__).resolve().parent.parent
TIMEOUT = 180  # seconds for any one command: a hang fails the test instead of blocking the suite

# Every subprocess run: tiny, a loss per step, no text sample (sampling compiles for ~2 s).
TINY = ['--config', 'configs/tiny.py', '--config.train.log_every=1', '--config.train.sample_length=0']

_compile_cache = []  # the directory of the persistent compilation cache the subprocesses share


@pytest.fixture(scope='module', autouse=True)
def compile_cache(tmp_path_factory):
  # Each subprocess would otherwise compile the same tiny programs again (~5 s of a ~7 s run). A cache made
  # fresh for this module, so nothing stale from another version of the code can be picked up.
  _compile_cache.append(str(tmp_path_factory.mktemp('jax_cache')))
  yield
  _compile_cache.pop()


def _env():
  # The parent's environment (so XLA_FLAGS, e.g. a forced device count, match the in-process reference run).
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO))
  for cluster in ('SLURM_JOB_ID', 'OMPI_COMM_WORLD_SIZE', 'JAX_COORDINATOR_ADDRESS'):  # main.py would join a cluster
    env.pop(cluster, None)
  if _compile_cache:
    env.update(JAX_COMPILATION_CACHE_DIR=_compile_cache[-1], JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  return env


def _command(workdir, *flags):
  return [sys.executable, '-m', 'selattn.main', *TINY, f'--workdir={workdir}', *flags]


def run_main(workdir, *flags):
  """Runs the CLI to completion: (returncode, stderr)."""
  p = subprocess.run(_command(workdir, *flags), cwd=REPO, env=_env(), capture_output=True, text=True,
                     timeout=TIMEOUT)
  return p.returncode, p.stderr


def start_main(workdir, log_path, *flags):
  log = open(log_path, 'w')  # a file, not a pipe: a pipe nobody reads would fill and block the child
  try:
    return subprocess.Popen(_command(workdir, *flags), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=log)
  finally:
    log.close()


def wait_for_log(proc, log_path, pattern):
  """Polls the child's log until `pattern` matches a line; returns the match."""
  deadline = time.monotonic() + TIMEOUT
  while time.monotonic() < deadline:
    with open(log_path) as f:
      m = re.search(pattern, f.read(), re.MULTILINE)
    if m:
      return m
    if proc.poll() is not None:
      pytest.fail(f'the run exited ({proc.returncode}) before logging {pattern!r}:\n{_tail(log_path)}')
    time.sleep(0.02)
  proc.kill()
  pytest.fail(f'no {pattern!r} in the log after {TIMEOUT} s:\n{_tail(log_path)}')


def _tail(path, n=30):
  with open(path) as f:
    return ''.join(f.readlines()[-n:])


def tree_hash(path):
  """A hash of every file's relative path and contents under `path`."""
  h = hashlib.sha256()
  for root, dirs, files in os.walk(path):
    dirs.sort()
    for name in sorted(files) + [d + '/' for d in dirs]:
      full = os.path.join(root, name)
      h.update(os.path.relpath(full, path).encode() + b'\0')
      if os.path.isfile(full):
        with open(full, 'rb') as f:
          h.update(f.read())
  return h.hexdigest()


REFERENCE_STEPS = 200


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """An uninterrupted in-process run of REFERENCE_STEPS steps: (workdir with checkpoints, per-step losses)."""
  workdir = str(tmp_path_factory.mktemp('reference'))
  c = tiny.get_config()
  # The restarts below use another num_steps than this run: the same losses only if it doesn't shape the schedule.
  assert c.train.lr_schedule == 'constant'
  c.train.num_steps, c.train.log_every, c.train.sample_length, c.train.checkpoint_every = REFERENCE_STEPS, 1, 0, 10
  train.train(c, workdir)
  ref = scalars(workdir)
  assert sorted(ref) == list(range(1, REFERENCE_STEPS + 1))
  assert checkpoint_steps(workdir)[-1] == REFERENCE_STEPS
  return workdir, ref


def expect_losses(reference_losses, got, first, last):
  if last > REFERENCE_STEPS:
    pytest.skip(f'the run stopped at step {first - 1}, past the reference run')  # the machine is very slow
  assert sorted(got) == list(range(first, last + 1))
  mismatched = [s for s in got if got[s] != reference_losses[s]]
  assert not mismatched, f'losses differ from the uninterrupted run\'s at steps {mismatched}'


# ----------------------------------------------------------------------------------------------------------------
# Interruptions.

def _signal_at_step(workdir, log, step, signum, checkpoint_every):
  """Starts a long run, sends `signum` once step `step` is logged; returns the exit code."""
  proc = start_main(workdir, log, '--config.train.num_steps=100000',
                    f'--config.train.checkpoint_every={checkpoint_every}')
  try:
    wait_for_log(proc, log, rf'\bstep {step}/100000\b')
    proc.send_signal(signum)
    return proc.wait(timeout=TIMEOUT)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


def test_sigterm_saves_a_checkpoint_and_the_restart_is_bit_identical(tmp_path, reference):
  _, ref = reference
  workdir, log = str(tmp_path / 'run'), str(tmp_path / 'log.txt')
  # No periodic checkpoint: the only one can be the signal's.
  assert _signal_at_step(workdir, log, 15, signal.SIGTERM, checkpoint_every=1000) == 0, _tail(log)
  text = open(log).read()
  m = re.search(r'SIGTERM received: saved a checkpoint at step (\d+)', text)
  assert m, _tail(log)
  stop = int(m.group(1))
  assert stop >= 15
  assert checkpoint_steps(workdir) == [stop]
  assert not [n for n in os.listdir(os.path.join(workdir, 'checkpoints')) if 'tmp' in n]  # the save completed
  expect_losses(ref, scalars(workdir), 1, stop)  # the interrupted run itself matches, step for step

  first = event_files(workdir)
  rc, err = run_main(workdir, f'--config.train.num_steps={stop + 10}', '--config.train.checkpoint_every=1000')
  assert rc == 0, err[-3000:]
  assert re.search(rf'resumed from .* at step {stop}\b', err), err[-3000:]
  expect_losses(ref, scalars(workdir, files=new_event_files(workdir, first)), stop + 1, stop + 10)


def test_sigkill_resumes_from_the_last_complete_checkpoint(tmp_path, reference):
  _, ref = reference
  workdir, log = str(tmp_path / 'run'), str(tmp_path / 'log.txt')
  assert _signal_at_step(workdir, log, 25, signal.SIGKILL, checkpoint_every=10) == -signal.SIGKILL
  saved = checkpoint_steps(workdir)
  assert saved and saved[-1] >= 10 and saved[-1] % 10 == 0, saved
  last = saved[-1]
  # A save killed midway (step higher than the real ones) with garbage inside: ignored, not fatal.
  ckpt_dir = pathlib.Path(workdir, 'checkpoints')
  for name in (f'{last + 1000}.orbax-checkpoint-tmp', f'{last + 2000}.orbax-checkpoint-tmp-1234567890'):
    (ckpt_dir / name / 'state').mkdir(parents=True)
    (ckpt_dir / name / 'state' / 'garbage').write_bytes(os.urandom(100))
    (ckpt_dir / name / '_CHECKPOINT_METADATA').write_text('{not json')

  first = event_files(workdir)
  rc, err = run_main(workdir, f'--config.train.num_steps={last + 10}', '--config.train.checkpoint_every=10')
  assert rc == 0, err[-3000:]
  assert re.search(rf'resumed from .* at step {last}\b', err), err[-3000:]
  expect_losses(ref, scalars(workdir, files=new_event_files(workdir, first)), last + 1, last + 10)
  assert checkpoint_steps(workdir)[-1] == last + 10
  leftovers = [n for n in os.listdir(ckpt_dir) if not n.isdigit()]
  assert not leftovers, leftovers  # the start cleaned up the unfinished saves (checkpoint.py's promise)


# ----------------------------------------------------------------------------------------------------------------
# Bad inputs: a one-line error naming the problem, no traceback, a failing exit code, checkpoints untouched.

def _corpus(tmp_path, name, content: bytes):
  path = tmp_path / name
  path.write_bytes(content)
  return str(path)


ERROR_CASES = {
    # id: (flags, with {file} standing for the test corpora below; substrings the error line must contain)
    'missing_corpus': (['--config.data.path=/nonexistent.txt'], ['/nonexistent.txt', 'no such file']),
    'empty_corpus': (['--config.data.path={empty}'], ['data.path', 'empty']),
    'not_utf8': (['--config.data.path={latin1}'], ['data.path', 'UTF-8']),
    'seq_len_longer_than_held_out': (['--config.data.path={short}'], ['data.seq_len=32', 'held-out']),
    'unknown_key': (['--config.model.nonexistent=1'], ['nonexistent']),
    'bad_value': (['--config.model.num_heads=3'], ['model.d_model', 'model.num_heads']),
    'other_model': (['--config.model.d_model=64'], ['model.d_model', '32', '64']),
    'other_optimizer_layout': (['--config.train.flat_optimizer=True'], ['train.flat_optimizer=False']),
}


@pytest.mark.parametrize('case', list(ERROR_CASES))
def test_bad_input_is_a_one_line_error(case, tmp_path, reference):
  flags, expected = ERROR_CASES[case]
  files = {
      'empty': _corpus(tmp_path, 'empty.txt', b''),
      'latin1': _corpus(tmp_path, 'latin1.txt', 'ROMEO: café\n'.encode('latin-1') * 100),
      # 160 characters of the run's vocabulary: a 32-char held-out split, less than a 33-char window.
      'short': _corpus(tmp_path, 'short.txt', b'ROMEO: what light.\n' * 8 + b'xxxxxxxx'),
  }
  assert len(open(files['short']).read()) == 160
  flags = [f.format(**files) for f in flags]
  workdir = str(tmp_path / 'run')
  shutil.copytree(reference[0], workdir)  # a real run, with checkpoints
  before = tree_hash(workdir)

  rc, err = run_main(workdir, *flags)
  assert rc != 0
  assert 'Traceback' not in err, err[-3000:]
  errors = [line for line in err.splitlines() if line.startswith('error:')]
  assert len(errors) == 1, err[-3000:]
  assert len(errors[0]) < 200 + len(workdir), errors[0]  # short: one sentence (that may name the workdir)
  for s in expected:
    assert s in errors[0], (s, errors[0])
  assert tree_hash(workdir) == before


# ----------------------------------------------------------------------------------------------------------------
# NaN.

def test_nan_stops_naming_the_step_and_the_last_good_checkpoint(tmp_path, reference):
  workdir = str(tmp_path / 'run')
  shutil.copytree(reference[0], workdir)
  start = checkpoint_steps(workdir)[-1]
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  before = {s: tree_hash(os.path.join(ckpt_dir, str(s))) for s in checkpoint_steps(workdir)}
  # lr 1e30: the first update makes the params ~1e30 (finite) and the next loss NaN. A checkpoint every step,
  # so that the state just before the NaN is saved too.
  rc, err = run_main(workdir, f'--config.train.num_steps={start + 30}', '--config.train.learning_rate=1e30',
                     '--config.train.checkpoint_every=1', '--config.train.keep_checkpoints=100')
  assert rc != 0
  assert 'Traceback' not in err, err[-3000:]
  errors = [line for line in err.splitlines() if line.startswith('error:')]
  assert len(errors) == 1, err[-3000:]
  msg = errors[0]
  assert re.search(r'\bnan\b', msg), msg
  m = re.search(r'(?:at|after) step (\d+)', msg)
  assert m, msg
  nan_step = int(m.group(1))
  assert start < nan_step <= start + 30
  saved = checkpoint_steps(workdir)
  assert saved[-1] < nan_step
  m = re.search(r'last good checkpoint \(step (\d+)\)', msg)
  assert m and int(m.group(1)) == saved[-1], (msg, saved)
  assert ckpt_dir in msg
  for s, h in before.items():  # the checkpoints from before are untouched
    assert tree_hash(os.path.join(ckpt_dir, str(s))) == h
  # The new checkpoints (and the one resumed from) hold finite params.
  for s, params in restore_params(workdir, [s for s in saved if s >= start]).items():
    assert all(np.isfinite(p).all() for p in params), s
