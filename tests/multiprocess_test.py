"""A real multi-process JAX job on CPU (loopback, 2 processes x 2 devices): same losses as one process, resume.

Every run is `python -m selattn.main` on configs/tiny.py with the seq-split selective attention (blockwise) on
the mesh (1 data x 2 fsdp x 2 seq): parameters, optimizer state and the batch are split across the two
processes, the K/V query split within each. The reference is one process with 4 devices on the same mesh.
The corpus is a file read as bytes (data.vocab='bytes'), so every process reads its rows from the memory-mapped
token store, which the first processes to start build together (one builds, the others wait for it).
  - reference: 1 process, 15 steps;                       started together with
  - first:     2 processes started with two Popen, 5 steps, checkpoint at 5 and a text sample there (which every
               process must take part in);                then
  - resume:    2 processes through launch/local.py, continuing the same workdir to step 10;   then
  - single:    1 process (4 devices), continuing it to step 15.
jax.distributed needs no extra setting on CPU with jax 0.10: cross-process collectives use gloo by default.
"""

import os
import pathlib
import re
import socket
import subprocess
import sys
import time

import pytest

import mesh_check as mc
import run_files
from selattn import data

ROOT = mc.ROOT
REL_TOL = 1e-5
FLAGS = ['--config', 'configs/tiny.py', '--config.model.selective_impl=blockwise', '--config.mesh.data=1',
         '--config.mesh.fsdp=2', '--config.mesh.seq=2', '--config.mesh.tensor=1', '--config.train.log_every=1',
         '--config.train.eval_every=0', '--config.train.eval_batches=1', '--config.train.sample_length=0']
TIMEOUT_S = 240


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class _Job:
  """Processes of one run, started now, their output in log files."""

  def __init__(self, name, cmds, env, logdir):
    self.name, self.logs, self.procs = name, [], []
    self.start = time.monotonic()
    for i, cmd in enumerate(cmds):
      path = os.path.join(logdir, f'{name}_{i}.log')
      with open(path, 'wb') as out:
        self.procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, start_new_session=True))
      self.logs.append(path)

  def log(self, i=0) -> str:
    return pathlib.Path(self.logs[i]).read_text(errors='replace')

  def wait(self, timeout=TIMEOUT_S, hang_after=None, grace_s=60):
    """Waits for every process; fails naming the one that failed. `hang_after`: a line of process 0's log after
    which everyone must exit within `grace_s` (else: a hang, reported as such)."""
    seen_at = None
    while any(p.poll() is None for p in self.procs):
      now = time.monotonic()
      if hang_after and seen_at is None and hang_after in self.log(0):
        seen_at = now
      if now - self.start > timeout or (seen_at is not None and now - seen_at > grace_s):
        self.kill()
        hung = seen_at is not None and now - seen_at > grace_s
        what = f'hung: not finished {grace_s}s after {hang_after!r}' if hung else f'timed out after {timeout}s'
        raise AssertionError(f'{self.name} {what}; last lines:\n' + self._tails())
      time.sleep(0.2)
    self.seconds = time.monotonic() - self.start
    bad = [(i, p.returncode) for i, p in enumerate(self.procs) if p.returncode != 0]
    assert not bad, f'{self.name}: processes exited with {bad}; last lines:\n' + self._tails()
    return self

  def _tails(self) -> str:
    return '\n'.join(f'--- {path}\n' + '\n'.join(
        l[:300] for l in pathlib.Path(path).read_text(errors='replace').splitlines()
        if 'Involuntary full rematerialization' not in l)[-3000:] for path in self.logs)

  def kill(self):
    # The launcher's children are in their own process groups, and trap SIGTERM: kill them by pid.
    for p in self.procs:
      for child in _children(p.pid):
        _kill(child)
      _kill(p.pid)
      p.wait()


def _children(pid: int) -> list[int]:
  try:
    return [int(c) for c in pathlib.Path(f'/proc/{pid}/task/{pid}/children').read_text().split()]
  except OSError:
    return []


def _kill(pid: int) -> None:
  try:
    os.kill(pid, 9)
  except ProcessLookupError:
    pass


_compile_cache = []  # the module's persistent compilation cache, shared by its subprocesses


def _env(devices):
  # The resume run compiles first's programs (2 processes x 2 devices) and the single-process
  # resume the reference's (1 x 4): from the cache, not again. A cache made fresh for this module.
  env = mc.subprocess_env(devices)
  env.update(JAX_COMPILATION_CACHE_DIR=_compile_cache[-1], JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  return env


def _main(workdir, steps, *extra, checkpoint_every=5):
  return [sys.executable, '-m', 'selattn.main', *FLAGS, f'--workdir={workdir}', f'--config.train.num_steps={steps}',
          f'--config.train.checkpoint_every={checkpoint_every}', *extra]


def _two_processes(workdir, steps, *extra):
  port = _free_port()
  return [_main(workdir, steps, *extra, f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
                f'--process_id={i}') for i in range(2)]


class _Runs:

  def __init__(self, tmp):
    self.tmp = str(tmp)
    _compile_cache[:] = [str(tmp / 'jax_cache')]
    self.ref_dir, self.dir = str(tmp / 'reference'), str(tmp / 'run')
    corpus = tmp / 'corpus.bin'
    # Shakespeare's first 600 KB as bytes, ending in a cut character.
    corpus.write_bytes(data.load_text('')[:600_000].encode() + 'é'.encode()[:1])
    self.data = [f'--config.data.path={corpus}', '--config.data.vocab=bytes']
    self.reference = _Job('reference', [_main(self.ref_dir, 15, *self.data)], _env(4), self.tmp)
    # Its sample (at its last step, after the eval, beside the checkpoint save) costs no run of its own; the text
    # sample of the runs after it stays off (train.sample_length may change on a resume).
    self.first = _Job('first', _two_processes(self.dir, 5, '--config.train.sample_length=5', *self.data), _env(2),
                      self.tmp)
    self._resume = self._single = None

  def first_run(self):
    # Were process 0 to sample alone, both would hang after the eval: a hang is reported as one, not as a timeout.
    return self.first.wait(hang_after='eval at step 5', grace_s=60)

  def resume(self):
    if self._resume is None:
      self.first_run()
      launcher = [sys.executable, 'launch/local.py', '--num_processes', '2', '--cpu_devices_per_process', '2', '--',
                  *_main(self.dir, 10, *self.data)[3:]]
      self._resume = _Job('resume', [launcher], _env(None), self.tmp)
    return self._resume

  def single(self):
    """After the 2-process resume: one process (4 devices) continues the same run to step 15."""
    if self._single is None:
      self.resume().wait()
      self._single = _Job('single', [_main(self.dir, 15, *self.data)], _env(4), self.tmp)
    return self._single

  def close(self):
    for job in (self.reference, self.first, self._resume, self._single):
      if job is not None:
        job.kill()


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  r = _Runs(tmp_path_factory.mktemp('multiprocess'))
  yield r
  r.close()


def _losses(files):
  return run_files.scalars('', files=files)


def _check_same(losses, ref, steps):
  assert sorted(losses) == list(steps), sorted(losses)
  got, want = [losses[s] for s in steps], [ref[s] for s in steps]
  diff = mc.max_rel_diff(got, want)
  assert diff < REL_TOL, (diff, got, want)


def test_two_processes_give_the_losses_of_one(runs):
  runs.reference.wait()
  first = runs.first_run()
  for i in range(2):
    assert re.search(rf'process {i}/2, 4 devices', first.log(i)), first.log(i)[-2000:]
  assert 'process 0/1, 4 devices' in runs.reference.log()
  # Process 0 alone keeps the run's train.log (it holds the workdir); process 1 logs the same steps to its stderr.
  log = pathlib.Path(runs.dir, 'train.log').read_text()
  for s in range(1, 6):
    line = f'] step {s}/5 |'
    assert log.count(line) == 1 and line in first.log(1), (line, log[-2000:])
  files = run_files.event_files(runs.dir)
  assert len(files) == 1, files
  _check_same(_losses(files), run_files.scalars(runs.ref_dir), range(1, 6))


def test_only_process_0_writes_tensorboard(runs):
  first = runs.first_run()
  files = run_files.event_files(runs.dir)
  # TensorBoard names its files events.out.tfevents.<time>.<host>.<pid>.<n>.
  assert [int(f.split('.')[-2]) for f in files[:1]] == [first.procs[0].pid], (files, [p.pid for p in first.procs])
  assert os.path.isdir(os.path.join(runs.dir, 'checkpoints', '5'))


def test_resume_through_the_launcher_continues_with_the_same_losses(runs):
  resume = runs.resume().wait()
  files = run_files.event_files(runs.dir)
  assert len(files) == 2, files  # the launcher's process 0 wrote one more; its process 1 none
  assert 'resumed from' in resume.log(0) and 'at step 5' in resume.log(0), resume.log(0)[-3000:]
  proc1 = pathlib.Path(runs.dir, 'logs', 'process_1.log').read_text(errors='replace')
  assert 'process 1/2, 4 devices' in proc1 and 'resumed from' in proc1, proc1[-2000:]
  ref = run_files.scalars(runs.ref_dir)
  _check_same(_losses(files[1:]), ref, range(6, 11))  # started at 6: restored, not retrained
  assert os.path.isdir(os.path.join(runs.dir, 'checkpoints', '10'))
  assert ref[10] < ref[1]


def test_one_process_resumes_a_two_process_run_at_the_same_data_position(runs):
  # grain saves one iterator-state file per process (process_<i>-of-2.json): a 1-process restart has none of its
  # own and must take the position from those, not start the data over (or crash).
  single = runs.single().wait()
  log = single.log()
  assert 'resumed from' in log and 'at step 10' in log, log[-3000:]
  assert 'saved by another number of processes' in log, log[-3000:]
  files = run_files.event_files(runs.dir)
  assert len(files) == 3, files
  _check_same(_losses(files[2:]), run_files.scalars(runs.ref_dir), range(11, 16))


def test_text_sample_with_parameters_split_across_processes(runs):
  # The sampler is one jitted computation over the global mesh: with fsdp across processes it needs every
  # process. If only process 0 samples, process 0 waits in the sampler for process 1, which waits for it in the
  # checkpoint save: both hang.
  first = runs.first_run()
  assert 'sample at step 5' in first.log(0), first.log(0)[-3000:]
  assert 'sample at step' not in first.log(1), first.log(1)[-3000:]  # process 0 alone logs it


def test_processes_starting_together_build_the_token_store_once(runs):
  runs.reference.wait()
  first = runs.first_run()
  logs = [runs.reference.log(), first.log(0), first.log(1)]
  assert sum(log.count('tokenising ') for log in logs) == 1, [l[-2000:] for l in logs]
  store_dir = os.path.join(runs.tmp, 'corpus.bin.selattn')
  assert sorted(os.listdir(store_dir)) == ['.lock', 'bytes.json']  # a byte store maps the corpus: no copy
