"""The command line, `python -m selattn.main`, in subprocesses: SIGTERM and SIGKILL followed by a restart give the
losses of an uninterrupted run, bad inputs are one-line errors that leave the checkpoints alone, and a NaN stops
the run naming the step and the last good checkpoint; and the workdir's guarantees through the command line (one
writer, atomic files, verified checkpoints, a full disk, signals before the loop), whose in-process side is
workdir_test.py."""

import hashlib
import json
import logging
import os
import pathlib
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import types
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import tiny
from run_files import checkpoint_steps, event_files, new_event_files, restore_params, scalars
from selattn import stopping
from selattn import train
from selattn import workdir as workdir_lib

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


def _env(cache=True):
  # The parent's environment (so XLA_FLAGS, e.g. a forced device count, match the in-process reference run).
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO))
  for cluster in ('SLURM_JOB_ID', 'OMPI_COMM_WORLD_SIZE', 'JAX_COORDINATOR_ADDRESS'):  # main.py would join a cluster
    env.pop(cluster, None)
  if not cache:
    env.pop('JAX_COMPILATION_CACHE_DIR', None)  # and start_main passes --compilation_cache=none
  if _compile_cache and cache:
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


def start_main(workdir, log_path, *flags, cache=True):
  log = open(log_path, 'w')  # a file, not a pipe: a pipe nobody reads would fill and block the child
  try:
    off = () if cache else ('--compilation_cache=none',)
    return subprocess.Popen(_command(workdir, *flags, *off), cwd=REPO, env=_env(cache), stdout=subprocess.DEVNULL,
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


def sigterm(proc, log_path) -> int:
  """SIGTERMs a run and waits for its resumable exit: the step of the checkpoint it saved on the way out."""
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=TIMEOUT) == stopping.EXIT_STOPPED, _tail(log_path)
  return int(re.search(r'SIGTERM received: saved a checkpoint at step (\d+)', open(log_path).read()).group(1))


def _kill(proc) -> None:
  if proc.poll() is None:
    proc.kill()
    proc.wait()


def _tail(path, n=30):
  with open(path) as f:
    return ''.join(f.readlines()[-n:])


def train_log(workdir) -> str:
  """WORKDIR/train.log's text, '' if there is none."""
  path = pathlib.Path(workdir, 'train.log')
  return path.read_text() if path.exists() else ''


def appended(before: str, workdir) -> str:
  """What a start added to train.log: it appends, and never rewrites what was there."""
  now = train_log(workdir)
  assert now.startswith(before), (before[-2000:], now[-2000:])
  return now[len(before):]


def tree_hash(path, skip=('lock',)):
  """A hash of every file's relative path and contents under `path` (but the lock file: who last held it; and the
  other top-level names in `skip`)."""
  h = hashlib.sha256()
  for root, dirs, files in os.walk(path):
    dirs.sort()
    for name in sorted(files) + [d + '/' for d in dirs]:
      if root == str(path) and name in skip:
        continue
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
    _kill(proc)


def test_sigterm_saves_a_checkpoint_and_the_restart_is_bit_identical(tmp_path, reference):
  _, ref = reference
  workdir, log = str(tmp_path / 'run'), str(tmp_path / 'log.txt')
  # No periodic checkpoint: the only one can be the signal's.
  assert _signal_at_step(workdir, log, 15, signal.SIGTERM, checkpoint_every=1000) == stopping.EXIT_STOPPED, \
      _tail(log)
  text = open(log).read()
  m = re.search(r'SIGTERM received: saved a checkpoint at step (\d+) and stopping; rerun the same command to '
                r'resume', text)
  assert m, _tail(log)
  # The signal is acknowledged at once, once, before the save (the loop sees it only between jitted calls).
  ack = 'SIGTERM received: the steps in flight finish, then the run saves a checkpoint and stops'
  assert text.count(ack) == 1 and text.index(ack) < m.start(), _tail(log)
  assert open(os.path.join(workdir, 'train.log')).read().count(ack) == 1
  assert 'finished at step' not in text  # a stopped run is not a finished one
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


def test_a_signal_during_a_long_call_is_acknowledged_at_once(tmp_path):
  # 1000 steps in one jitted call (~4 s on a CPU): the loop sees the flag only when the call returns, but the line
  # saying the signal arrived must come while it is still running, before step 1000 is logged.
  workdir, log = str(tmp_path / 'run'), str(tmp_path / 'log.txt')
  every = [f'--config.train.{k}={v}' for k, v in (('steps_per_call', 1000), ('log_every', 1000),
                                                  ('eval_every', 100000), ('checkpoint_every', 100000))]
  proc = start_main(workdir, log, '--config.train.num_steps=100000', *every)
  try:
    wait_for_log(proc, log, r'training from step 0 to 100000')
    proc.send_signal(signal.SIGINT)
    wait_for_log(proc, log, r'SIGINT received: the steps in flight finish, then the run saves a checkpoint')
    before = open(log).read()
    assert not re.search(r'\bstep \d+/100000\b', before), _tail(log)
    assert proc.wait(timeout=TIMEOUT) == stopping.EXIT_STOPPED, _tail(log)
  finally:
    _kill(proc)
  text = open(log).read()
  stop = int(re.search(r'SIGINT received: saved a checkpoint at step (\d+)', text).group(1))
  assert stop % 1000 == 0 and checkpoint_steps(workdir) == [stop], (stop, _tail(log))
  # At once, well before the call in flight returns and step 1000 is logged (not when the loop sees the flag).
  def logged_at(pattern):
    hh, mm, ss = re.search(r'^[IWE]\d{4} (\d\d):(\d\d):(\d\d\.\d+) .*' + pattern, text, re.MULTILINE).groups()
    return int(hh) * 3600 + int(mm) * 60 + float(ss)
  lead = logged_at(r'step 1000/100000\b') - logged_at('SIGINT received: the steps in flight')
  assert lead > 1.0, (lead, _tail(log))


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
  # What the killed run logged up to its last checkpoint is on disk: the resumed run logs only the steps after it.
  killed = scalars(workdir, files=first)
  assert set(range(1, last + 1)) <= set(killed), sorted(killed)
  expect_losses(ref, {s: v for s, v in killed.items() if s <= last}, 1, last)
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
    # Another corpus for this run: allowed explicitly, so that the corpus itself is what refuses the start.
    'missing_corpus': (['--config.data.path=/nonexistent.txt', '--allow_data_change'],
                       ['/nonexistent.txt', 'no such file']),
    'empty_corpus': (['--config.data.path={empty}', '--allow_data_change'], ['data.path', 'is empty']),
    'not_utf8': (['--config.data.path={latin1}', '--allow_data_change'], ['data.path', 'UTF-8']),
    'seq_len_longer_than_held_out': (['--config.data.path={short}', '--allow_data_change'],
                                     ['data.seq_len=32', 'held-out']),
    'unknown_key': (['--config.model.nonexistent=1'], ['nonexistent']),
    'bad_value': (['--config.model.num_heads=3'], ['model.d_model', 'model.num_heads']),
    'other_model': (['--config.model.d_model=64'], ['model.d_model', '32', '64']),
    'other_optimizer_layout': (['--config.train.flat_optimizer=True'], ['train.flat_optimizer=False']),
    'nonexistent_config': (['--config', 'configs/nonexistent.py'], ['configs/nonexistent.py', 'no such file']),
    'unknown_variant': (['--config', 'configs/selective.py:bogus'], ["'bogus'", 'quick']),
    'inf_learning_rate': (['--config.train.learning_rate=inf'], ['train.learning_rate=inf', 'finite']),
    'inf_rope_theta': (['--config.model.rope_theta=inf'], ['model.rope_theta=inf', 'finite']),
    # Characters within the saved vocabulary: the corpus loads, and only the recorded data.path can refuse it.
    'other_data_path': (['--config.data.path={subset}'], ['data.path=', 'subset.txt', '--allow_data_change']),
    # A character run resumed as bytes: the model would read other symbols.
    'other_vocab_kind': (['--config.data.vocab=bytes'], ["data.vocab='chars'", '--config.data.vocab=chars']),
    # About 2 TiB for one step (factored attention's T x T logits): refused before it runs, with the estimate.
    'step_beyond_device_memory': (['--config.data.seq_len=60000', '--config.train.num_steps=300'],
                                  ['data.seq_len=60000', 'TiB per device']),
}


@pytest.mark.parametrize('case', list(ERROR_CASES))
def test_bad_input_is_a_one_line_error(case, tmp_path, reference):
  flags, expected = ERROR_CASES[case]
  files = {
      'empty': _corpus(tmp_path, 'empty.txt', b''),
      'latin1': _corpus(tmp_path, 'latin1.txt', 'ROMEO: café\n'.encode('latin-1') * 100),
      # 160 characters of the run's vocabulary: a 32-char held-out split, less than a 33-char window.
      'short': _corpus(tmp_path, 'short.txt', b'ROMEO: what light.\n' * 8 + b'xxxxxxxx'),
      'subset': _corpus(tmp_path, 'subset.txt', b'ROMEO: what light.\n' * 200),
  }
  assert len(open(files['short']).read()) == 160
  flags = [f.format(**files) for f in flags]
  workdir = str(tmp_path / 'run')
  shutil.copytree(reference[0], workdir)  # a real run, with checkpoints
  before, log = tree_hash(workdir, skip=('lock', 'train.log')), train_log(workdir)

  rc, err = run_main(workdir, *flags)
  assert rc != 0
  assert 'Traceback' not in err, err[-3000:]
  # One sentence (that may name the workdir and a corpus beside it).
  line = assert_one_error_line(err, *expected, limit=200 + 2 * len(workdir))
  assert tree_hash(workdir, skip=('lock', 'train.log')) == before
  # A start refused before it locked the workdir writes no log; one refused after (the memory estimate) logs
  # its attempt, and the error last.
  added = appended(log, workdir)
  if case == 'step_beyond_device_memory':
    assert added.splitlines()[-1].endswith('] ' + line), added[-2000:]
  else:
    assert added == '', added[-2000:]


def assert_one_error_line(err, *expected, limit=250):
  """stderr holds exactly one `error:` line, holding `expected`; no traceback, no second copy from absl."""
  assert 'Traceback' not in err, err[-3000:]
  errors = [line for line in err.splitlines() if line.startswith('error:')]
  assert len(errors) == 1, err[-3000:]
  assert len(errors[0]) < limit, errors[0]
  assert not re.search(r'^E\d{4} ', err, re.MULTILINE), err[-3000:]  # absl's ERROR line repeating it
  for s in expected:
    assert s in errors[0], (s, errors[0])
  return errors[0]


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
  assert re.match(r'E\d{4} .*\] ', train_log(workdir).splitlines()[-1]), train_log(workdir)[-2000:]
  assert train_log(workdir).splitlines()[-1].endswith('] ' + msg)  # the log ends as stderr does
  for s, h in before.items():  # the checkpoints from before are untouched
    assert tree_hash(os.path.join(ckpt_dir, str(s))) == h
  # The new checkpoints (and the one resumed from) hold finite params.
  for s, params in restore_params(workdir, [s for s in saved if s >= start]).items():
    assert all(np.isfinite(p).all() for p in params), s


# ----------------------------------------------------------------------------------------------------------------
# The command line itself.

def test_help_exits_0_and_names_the_config_keys():
  p = subprocess.run([sys.executable, '-m', 'selattn.main', '--help'], cwd=REPO, env=_env(), capture_output=True,
                     text=True, timeout=TIMEOUT)
  assert p.returncode == 0, p.stderr[-3000:]
  for s in ('--config.', 'configs/base.py', '--workdir', '--allow_data_change', 'Exit status'):
    assert s in p.stdout, s


def test_a_stray_argument_is_a_one_line_error_before_anything_starts(tmp_path):
  # A word absl does not read as a flag's value (a typo, a boolean flag given one) was ignored: a long run started.
  workdir = tmp_path / 'run'
  rc, err = run_main(str(workdir), 'extra_arg')
  assert rc == 1
  assert assert_one_error_line(err, 'unexpected arguments: extra_arg', '--config.<key>=<value>')
  assert not workdir.exists()


def test_an_absolute_config_path_works_from_another_directory(tmp_path):
  # As a user with the package installed: `configs` is not importable from elsewhere, selattn is.
  site = tmp_path / 'site'
  site.mkdir()
  (site / 'selattn').symlink_to(REPO / 'selattn')
  elsewhere = tmp_path / 'elsewhere'
  elsewhere.mkdir()
  env = dict(_env(), PYTHONPATH=str(site))
  assert TINY[:2] == ['--config', 'configs/tiny.py']
  p = subprocess.run([sys.executable, '-m', 'selattn.main', f'--config={REPO}/configs/tiny.py', *TINY[2:],
                      '--workdir=runs/x', '--config.train.num_steps=2'], cwd=elsewhere, env=env,
                     capture_output=True, text=True, timeout=TIMEOUT)
  assert p.returncode == 0, p.stderr[-3000:]
  assert checkpoint_steps(str(elsewhere / 'runs' / 'x')) == [2]


def test_a_workdir_that_is_a_file_is_a_one_line_error(tmp_path):
  path = tmp_path / 'notes.txt'
  path.write_text('my notes\n')
  # Every platform probed (no JAX_PLATFORMS), as a user's first run does: no "Unable to initialize backend" line.
  env = _env()
  env.pop('JAX_PLATFORMS')
  p = subprocess.run(_command(str(path)), cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT)
  assert p.returncode == 1
  assert_one_error_line(p.stderr, str(path), 'not a directory')
  assert 'Unable to initialize backend' not in p.stderr, p.stderr[-3000:]
  assert path.read_text() == 'my notes\n'


def test_sample_refuses_a_nan_temperature(reference):
  p = subprocess.run([sys.executable, '-m', 'selattn.sample', f'--workdir={reference[0]}', '--length=4',
                      '--temperature=nan'], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
  assert p.returncode == 1
  assert_one_error_line(p.stderr, 'temperature=nan')


# ----------------------------------------------------------------------------------------------------------------
# The workdir: one writer, files written whole, runs finished or resumed without rewriting anything.

def test_a_second_run_on_a_workdir_in_use_stops_at_once(tmp_path, reference):
  _, ref = reference
  workdir, log = str(tmp_path / 'run'), str(tmp_path / 'log.txt')
  # Every checkpoint kept: the sampler below reads the latest one, which the run would otherwise soon delete.
  proc = start_main(workdir, log, '--config.train.num_steps=100000', '--config.train.checkpoint_every=10',
                    '--config.train.keep_checkpoints=100000')
  try:
    wait_for_log(proc, log, r'\bstep 12/100000\b')
    config_before = pathlib.Path(workdir, 'config.json').read_bytes()
    # Another learning rate and seed: the second run must neither write config.json nor touch the checkpoints.
    rc, err = run_main(workdir, '--config.train.learning_rate=0.01', '--config.train.seed=7')
    assert rc == stopping.EXIT_FAILED
    assert_one_error_line(err, workdir, f'pid {proc.pid} on {socket.gethostname()}', 'in use')
    assert pathlib.Path(workdir, 'config.json').read_bytes() == config_before
    # Reading a run in use still works: sampling from its checkpoints.
    p = subprocess.run([sys.executable, '-m', 'selattn.sample', f'--workdir={workdir}', '--prompt=ROMEO:',
                        '--length=8'], cwd=REPO,
                       env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.startswith('ROMEO:') and len(p.stdout.rstrip('\n')) == len('ROMEO:') + 8, p.stdout
    assert proc.poll() is None  # the first run goes on
    stop = sigterm(proc, log)
  finally:
    _kill(proc)
  expect_losses(ref, scalars(workdir), 1, stop)  # the first run's own losses, undisturbed
  assert checkpoint_steps(workdir)[-1] == stop


def _stat(path):
  st = os.stat(path)
  return st.st_ino, st.st_mtime_ns, pathlib.Path(path).read_bytes()


def test_rerunning_a_finished_run_writes_nothing(tmp_path, reference):
  workdir = str(tmp_path / 'run')
  shutil.copytree(reference[0], workdir)
  files = {name: _stat(os.path.join(workdir, name)) for name in ('config.json', 'vocab.json')}
  before, events, log = tree_hash(workdir, skip=('lock', 'train.log')), event_files(workdir), train_log(workdir)
  # The reference's exact config: nothing to train, nothing that changed.
  rc, err = run_main(workdir, f'--config.train.num_steps={REFERENCE_STEPS}', '--config.train.checkpoint_every=10')
  assert rc == 0, err[-3000:]
  assert 'nothing to train' in err
  assert event_files(workdir) == events  # no new event file, so no second eval entry at the last step
  assert {name: _stat(os.path.join(workdir, name)) for name in files} == files  # not even rewritten in place
  assert tree_hash(workdir, skip=('lock', 'train.log')) == before
  assert 'nothing to train' in appended(log, workdir)  # but for the lines the rerun logged


def test_a_kill_right_after_resuming_leaves_config_and_vocab_whole(tmp_path, reference):
  workdir, log = str(tmp_path / 'run'), str(tmp_path / 'log.txt')
  shutil.copytree(reference[0], workdir)
  config_path, vocab_path = os.path.join(workdir, 'config.json'), os.path.join(workdir, 'vocab.json')
  old_config, vocab = pathlib.Path(config_path).read_text(), _stat(vocab_path)
  # Another learning rate: config.json changes (rewritten once the step compiled), vocab.json does not.
  proc = start_main(workdir, log, '--config.train.num_steps=100000', '--config.train.learning_rate=0.002')
  try:
    wait_for_log(proc, log, r'resumed from|compiled the train step')
    time.sleep(0.3 * np.random.default_rng().random())  # somewhere around the write
    proc.kill()
    proc.wait()
  finally:
    _kill(proc)
  new_config = pathlib.Path(config_path).read_text()
  lr = json.loads(new_config)['config']['train']['learning_rate']  # whole JSON, old or new
  assert new_config == old_config or lr == 0.002
  assert _stat(vocab_path) == vocab
  rc, err = run_main(workdir, f'--config.train.num_steps={REFERENCE_STEPS + 2}', '--config.train.learning_rate=0.002')
  assert rc == 0, err[-3000:]
  assert json.loads(pathlib.Path(config_path).read_text())['config']['train']['learning_rate'] == 0.002
  assert not [n for n in os.listdir(workdir) if '.tmp' in n]


def test_a_symlinked_config_json_is_refused_and_its_target_untouched(tmp_path, reference):
  workdir = str(tmp_path / 'run')
  shutil.copytree(reference[0], workdir)
  outside = tmp_path / 'elsewhere.json'
  os.replace(os.path.join(workdir, 'config.json'), outside)
  os.symlink(outside, os.path.join(workdir, 'config.json'))
  before = outside.read_bytes()
  rc, err = run_main(workdir, f'--config.train.num_steps={REFERENCE_STEPS + 2}', '--config.train.learning_rate=0.002')
  assert rc == 1
  assert_one_error_line(err, 'config.json', 'symbolic link')
  assert outside.read_bytes() == before


def test_train_log_keeps_the_runs_lines_and_each_resume_appends(tmp_path):
  """WORKDIR/train.log: the lines stderr shows (absl's format), each once; a resumed run adds its own after them."""
  workdir = str(tmp_path / 'run')
  rc, err = run_main(workdir, '--config.train.num_steps=3', '--config.train.eval_every=3')
  assert rc == 0, err[-3000:]
  first = train_log(workdir)
  for line in ('step 1/3 |', 'step 2/3 |', 'step 3/3 |', 'eval at step 3: loss', 'training from step 0 to 3'):
    assert len(re.findall(rf'^I\d{{4}} .*\] {re.escape(line)}', first, re.MULTILINE)) == 1, (line, first)
  assert set(first.splitlines()) <= set(err.splitlines())  # stderr's very lines
  # A finished run ends with one line: its step, the last held-out loss (the eval line's), where it is saved.
  loss = re.search(r'\] eval at step 3: loss ([0-9.]+) ', first).group(1)
  ckpts = os.path.join(os.path.abspath(workdir), 'checkpoints')
  assert re.search(rf'\] finished at step 3: held-out loss {loss} \| this call trained 3 steps in 0m\d\ds \| '
                   rf'checkpoint in {re.escape(ckpts)}; sample from it with: python -m selattn.sample --workdir '
                   rf'{re.escape(os.path.abspath(workdir))}$', first.splitlines()[-1]), first[-2000:]
  assert checkpoint_steps(workdir) == [3]
  # Each start begins with the run's header, naming the devices it ran on (a resume may run on others).
  assert re.search(r'\] run: .* on \d+ x cpu, JAX \d', first.splitlines()[0]), first
  rc, err = run_main(workdir, '--config.train.num_steps=5')
  assert rc == 0, err[-3000:]
  added = appended(first, workdir)  # the first run's lines kept as they were
  lines = added.splitlines()
  assert re.search(r'\] finished at step 5: .* this call trained 2 steps in ', lines[-1]), added
  resumed = [i for i, l in enumerate(lines) if re.search(r'\] resumed from .* at step 3$', l)]
  steps = [i for i, l in enumerate(lines) if re.search(r'\] step [45]/5 \|', l)]
  assert len(resumed) == 1 and len(steps) == 2 and resumed[0] < steps[0] < steps[1], added
  assert 'step 1/3' not in added and set(lines) <= set(err.splitlines())
  assert re.search(r'\] run: .* on \d+ x cpu, JAX \d', lines[0]), added


def test_a_run_refused_by_the_lock_leaves_train_log_as_it_was(tmp_path, reference):
  workdir = str(tmp_path / 'run')
  shutil.copytree(reference[0], workdir)
  rc, err = run_main(workdir, f'--config.train.num_steps={REFERENCE_STEPS}', '--config.train.checkpoint_every=10')
  assert rc == 0, err[-3000:]
  before = pathlib.Path(workdir, 'train.log').read_bytes()
  assert b'nothing to train' in before  # the rerun holding the lock logged there
  with workdir_lib.Lock(workdir):  # a live run holds the workdir
    rc, err = run_main(workdir, f'--config.train.num_steps={REFERENCE_STEPS + 10}')
  assert rc == stopping.EXIT_FAILED
  assert_one_error_line(err, workdir, 'in use')
  assert pathlib.Path(workdir, 'train.log').read_bytes() == before


# ----------------------------------------------------------------------------------------------------------------
# Damaged checkpoints: reported in one line, renamed aside, and the run resumes from the one before.

def _largest_array_file(step_dir):
  files = [p for p in pathlib.Path(step_dir, 'state').rglob('*') if p.is_file() and '/d/' in str(p)]
  return max(files, key=lambda p: p.stat().st_size)


def _raw_state(step_dir):
  """The checkpoint's arrays as Orbax alone restores them (no selattn checksum): numpy leaves."""
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')  # "Sharding info not provided when restoring"
    tree = ocp.PyTreeCheckpointer().restore(os.path.join(step_dir, 'state'))
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _flip_bytes(step_dir):
  """Flips 8 bytes of array data where Orbax restores the checkpoint without complaint, values changed.

  The data files are zstd-compressed, so a flip can also break a frame (an error Orbax reports): the offsets are
  tried in turn until a flip is silent, which only the checksum can catch.
  """
  path = _largest_array_file(step_dir)
  original, clean = path.read_bytes(), _raw_state(step_dir)
  for k in range(1, 40):
    data = bytearray(original)
    start = len(data) * k // 40
    for i in range(start, min(start + 8, len(data))):
      data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    try:
      flipped = _raw_state(step_dir)
    except Exception:  # pylint: disable=broad-except  (a broken frame: try another offset)
      continue
    if any(not np.array_equal(a, b, equal_nan=True) for a, b in zip(flipped, clean)):
      return
  pytest.fail(f'no flip of {path} restored silently with changed values')


def _truncate(step_dir):
  path = _largest_array_file(step_dir)
  path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def _corrupt_metadata(step_dir):
  pathlib.Path(step_dir, 'meta', 'metadata').write_text('{"step": ')


DAMAGE = {'flipped_array_bytes': _flip_bytes, 'truncated_array_file': _truncate, 'corrupt_metadata': _corrupt_metadata}


@pytest.mark.parametrize('damage', list(DAMAGE))
def test_a_damaged_latest_checkpoint_is_set_aside_and_the_run_falls_back(tmp_path, reference, damage):
  reference_dir, ref = reference
  workdir = str(tmp_path / 'run')
  shutil.copytree(reference_dir, workdir)
  *_, previous, last = checkpoint_steps(workdir)
  DAMAGE[damage](os.path.join(workdir, 'checkpoints', str(last)))
  first = event_files(workdir)
  rc, err = run_main(workdir, f'--config.train.num_steps={last}', '--config.train.checkpoint_every=10')
  assert rc == 0, err[-3000:]
  assert 'Traceback' not in err, err[-3000:]
  reports = [line for line in err.splitlines() if f'checkpoint {last} ' in line]
  assert len(reports) == 1 and 'cannot be used' in reports[0], err[-3000:]
  if damage == 'flipped_array_bytes':
    assert 'checksum' in reports[0]  # Orbax restores it without complaint: only the checksum catches it
  assert re.search(rf'resumed from .* at step {previous}\b', err), err[-3000:]
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', f'{last}.damaged'))  # kept, under another name
  expect_losses(ref, scalars(workdir, files=new_event_files(workdir, first)), previous + 1, last)
  retrained, original = restore_params(workdir, [last])[last], restore_params(reference_dir, [last])[last]
  assert all(np.array_equal(a, b) for a, b in zip(retrained, original))


def test_a_nan_stop_never_calls_a_damaged_checkpoint_the_last_good(tmp_path, reference):
  workdir = str(tmp_path / 'run')
  shutil.copytree(reference[0], workdir)
  *_, previous, last = checkpoint_steps(workdir)
  _flip_bytes(os.path.join(workdir, 'checkpoints', str(last)))
  rc, err = run_main(workdir, f'--config.train.num_steps={last + 20}', '--config.train.learning_rate=1e30',
                     '--config.train.checkpoint_every=1000')
  assert rc == 1
  msg = assert_one_error_line(err, 'not finite', limit=400)
  assert f'last good checkpoint (step {previous})' in msg, msg


# ----------------------------------------------------------------------------------------------------------------
# Signals before the training loop: one line, a distinct exit status, the workdir as it was.

@pytest.mark.parametrize('signum,before', [(signal.SIGINT, r'compiling the train step'), (signal.SIGTERM, r'\brun: ')])
def test_a_signal_before_the_loop_stops_cleanly(tmp_path, reference, signum, before):
  workdir, log = str(tmp_path / 'run'), str(tmp_path / 'log.txt')
  shutil.copytree(reference[0], workdir)
  checkpoints = tree_hash(os.path.join(workdir, 'checkpoints'))
  # No compilation cache: compiling takes seconds, and the signal lands in it.
  proc = start_main(workdir, log, '--config.train.num_steps=100000', cache=False)
  try:
    wait_for_log(proc, log, before)
    proc.send_signal(signum)
    rc = proc.wait(timeout=TIMEOUT)
  finally:
    _kill(proc)
  text = open(log).read()
  assert rc == stopping.EXIT_STOPPED, text[-3000:]
  for bad in ('Traceback', 'Segmentation', 'Fatal Python error', 'KeyboardInterrupt'):
    assert bad not in text, text[-3000:]
  name = signal.Signals(signum).name
  if f'{name} received before training started' in text:
    assert tree_hash(os.path.join(workdir, 'checkpoints')) == checkpoints
    # The line printed on the way out is the last of the run's log too.
    assert re.search(rf'^W\d{{4}} .*\] stopped: {name} received before training started',
                     train_log(workdir).splitlines()[-1]), train_log(workdir)[-2000:]
  else:  # the machine was quick: the loop had started, and saved a checkpoint
    assert f'{name} received: saved a checkpoint' in text, text[-3000:]
    assert f'{name} received: saved a checkpoint' in train_log(workdir), train_log(workdir)[-2000:]


# ----------------------------------------------------------------------------------------------------------------
# train/loss does not depend on where the run was interrupted.

def test_logged_losses_are_the_same_interrupted_or_not(tmp_path, reference):
  _, ref = reference
  workdir, log = str(tmp_path / 'run'), str(tmp_path / 'log.txt')
  # A loss logged every 20 steps, a SIGTERM in between: the mean at step 20 covers steps from both runs.
  proc = start_main(workdir, log, '--config.train.num_steps=100000', '--config.train.checkpoint_every=1000',
                    '--config.train.log_every=20', '--config.train.steps_per_call=1')
  try:
    wait_for_log(proc, log, r'training from step 0\b')
    stop = sigterm(proc, log)
  finally:
    _kill(proc)
  if stop >= 20:
    pytest.skip(f'the signal arrived at step {stop}, after the first log')  # a very fast machine
  rc, err = run_main(workdir, '--config.train.num_steps=40', '--config.train.checkpoint_every=1000',
                     '--config.train.log_every=20')
  assert rc == 0, err[-3000:]
  assert re.search(r'\| [\d,]+ tok/s \|', err), err[-3000:]  # 7,550 tok/s, not 7.55e+03
  got = scalars(workdir)
  assert sorted(got) == [20, 40]
  # The uninterrupted run's per-step losses, averaged over each logging window as the loop does (float32).
  for end in (20, 40):
    want = np.float32(np.mean(np.array([ref[s] for s in range(end - 19, end + 1)], np.float32)))
    assert got[end] == want, (end, got[end], want)


# ----------------------------------------------------------------------------------------------------------------
# A full disk (a small tmpfs, mounted in a user namespace; skipped where the system allows none).

def _tmpfs_available():
  if not shutil.which('unshare'):
    return False
  p = subprocess.run(['unshare', '-rm', 'sh', '-c', 'mount -t tmpfs -o size=64k tmpfs "$(mktemp -d)"'],
                     capture_output=True, timeout=30)
  return p.returncode == 0


@pytest.mark.skipif(not _tmpfs_available(), reason='cannot mount a tmpfs in a user namespace here')
@pytest.mark.parametrize('size_kib', [300, 1500])
def test_a_full_disk_stops_the_run_with_one_line(tmp_path, size_kib):
  # 300 KiB: the first checkpoint cannot be written. 1500 KiB: a few can, then there is no room for the next.
  mount = tmp_path / 'disk'
  mount.mkdir()
  command = ' '.join(shlex.quote(a) for a in _command(str(mount / 'run'), '--config.train.num_steps=100000',
                                                        '--config.train.checkpoint_every=5'))
  script = (f'mount -t tmpfs -o size={size_kib}k tmpfs {mount} || exit 99\n'
            f'for i in 1 2; do {command} 2>&1; echo "exit status $?"; done\n'
            f'ls {mount}/run/checkpoints; echo "---"')
  p = subprocess.run(['unshare', '-rm', 'bash', '-c', script], cwd=REPO, env=_env(), capture_output=True,
                     text=True, timeout=2 * TIMEOUT)
  out = p.stdout
  assert 'Traceback' not in out, out[-5000:]
  runs = out.split('exit status ')
  assert len(runs) == 3, out[-5000:]
  errors = []
  for run in runs[:2]:
    lines = [line for line in run.splitlines() if line.startswith('error:')]
    assert len(lines) == 1, run[-3000:]
    assert 'No space left on device' in lines[0], lines[0]
    errors.append(lines[0])
  assert runs[1].startswith('1') and runs[2].startswith('1'), out[-3000:]
  intact = [re.search(r'(no intact checkpoint|last intact checkpoint is step (\d+))', e) for e in errors]
  saved = sorted(int(n) for n in runs[2].split('\n', 1)[1].split('---')[0].split() if n.isdigit())
  if size_kib == 300:
    assert [m.group(1) for m in intact] == ['no intact checkpoint'] * 2 and not saved, errors
  else:
    # The restart names where things stand: the last checkpoint on disk. It may be a later one than the first
    # run's (the failed save's partial files are cleared, and the log and event files grow by varying amounts),
    # never an earlier one.
    steps = [int(m.group(2)) for m in intact]
    assert steps[1] == saved[-1] and steps[0] <= steps[1], (errors, saved)


def test_orbax_echoes_of_a_reported_failure_are_dropped(monkeypatch, caplog):
  # After a failed restore (reported in one line, the checkpoint set aside) Orbax's other reads end as unawaited
  # coroutines or unretrieved tasks, each printing a traceback; other errors still print.
  from selattn import main  # pylint: disable=g-import-not-at-top
  printed = []  # what reaches the hooks the filters wrap (Python's own would print it)
  monkeypatch.setattr(sys, 'unraisablehook', lambda u: printed.append(u.exc_value))  # restored after the test
  monkeypatch.setattr(sys, 'excepthook', lambda t, v, tb: printed.append(v))
  asyncio_logger = logging.getLogger('asyncio')
  monkeypatch.setattr(asyncio_logger, 'filters', list(asyncio_logger.filters))
  main._drop_closed_loop_errors()  # pylint: disable=protected-access

  def raised(exc):
    try:
      raise exc
    except Exception as e:  # pylint: disable=broad-except
      return e

  echo = raised(Exception('Encountered error while reading array index: (slice(0, 32, 1),). See full ...'))
  other = raised(ValueError('a real bug'))
  for exc in (echo, other):
    sys.unraisablehook(types.SimpleNamespace(exc_type=type(exc), exc_value=exc, exc_traceback=exc.__traceback__,
                                             err_msg='Exception ignored in', object=None))
    sys.excepthook(type(exc), exc, exc.__traceback__)
    with caplog.at_level(logging.ERROR, logger='asyncio'):
      asyncio_logger.error('Task exception was never retrieved', exc_info=(type(exc), exc, exc.__traceback__))
  assert printed == [other, other]
  assert [r.exc_info[1] for r in caplog.records] == [other]


def test_the_compilation_cache_is_the_users_by_default_and_can_be_moved_or_turned_off(tmp_path):
  """Compiled steps are cached in $XDG_CACHE_HOME/selattn/jax (a second run loads them), unless
  JAX_COMPILATION_CACHE_DIR or --compilation_cache says otherwise; a directory it cannot use costs the cache, not the
  run."""
  def run(name, *flags, **env):
    env = {**_env(cache=False), 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
           'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0', **env}
    p = subprocess.run(_command(str(tmp_path / name), '--config.train.num_steps=2', *flags), cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stderr

  xdg = tmp_path / 'xdg'
  default = xdg / 'selattn' / 'jax'
  hit = "Persistent compilation cache hit for '"  # JAX_LOG_COMPILES=1: JAX logs each hit (at WARNING)
  err = run('a', XDG_CACHE_HOME=str(xdg), JAX_LOG_COMPILES='1')
  assert f'; compilation cache: {default}\n' in err and hit not in err, err[-3000:]
  cached = set(os.listdir(default))
  assert cached
  err = run('b', XDG_CACHE_HOME=str(xdg), JAX_LOG_COMPILES='1')  # the same programs: loaded from the cache
  assert err.count(hit) >= 2 and set(os.listdir(default)) == cached, err[-3000:]  # the train and eval steps
  # Off: nothing written anywhere.
  assert '; compilation cache: off\n' in run('c', '--compilation_cache=none', XDG_CACHE_HOME=str(tmp_path / 'xdg2'))
  assert not (tmp_path / 'xdg2').exists()
  # JAX's own variable wins over the default.
  env_dir = tmp_path / 'from_env'
  err = run('d', XDG_CACHE_HOME=str(xdg), JAX_COMPILATION_CACHE_DIR=str(env_dir))
  assert f'; compilation cache: {env_dir}\n' in err, err[-3000:]
  assert os.listdir(env_dir)
  # A directory it cannot create: one warning, and the run trains.
  blocker = tmp_path / 'a_file'
  blocker.write_text('')
  err = run('e', f'--compilation_cache={blocker}/jax')
  assert re.search(rf'compilation cache off: cannot use {re.escape(str(blocker))}/jax \(.*\); programs compile on '
                   r'every start', err), err[-3000:]
  assert '; compilation cache: off\n' in err and checkpoint_steps(str(tmp_path / 'e')) == [2]
