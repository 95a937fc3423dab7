"""launch/local.py: real multi-process JAX jobs on CPU, a failing process, and forwarded signals.

The processes run tests/fake_worker.py (through `--module fake_worker` and PYTHONPATH), which takes the same
distributed flags as selattn.main.
"""

import importlib.util
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

_ROOT = pathlib.Path(__file__).resolve().parent.parent
_LAUNCHER = _ROOT / 'launch' / 'local.py'


def _load_launcher():
  # launch/ is a folder of scripts, not a package.
  spec = importlib.util.spec_from_file_location('launch_local', _LAUNCHER)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _env():
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join([str(_ROOT / 'tests'), env.get('PYTHONPATH', '')])
  # A conftest may force 8 host devices for the in-process tests; the launcher must override that count.
  env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
  env.pop('JAX_NUM_CPU_DEVICES', None)
  return env


def _launch_cmd(launcher_flags, worker_flags):
  return [sys.executable, str(_LAUNCHER), *launcher_flags, '--module', 'fake_worker', '--', *worker_flags]


def _run(launcher_flags, worker_flags, timeout=60):
  return subprocess.run(_launch_cmd(launcher_flags, worker_flags), env=_env(), capture_output=True, text=True,
                        timeout=timeout, check=False)


@pytest.mark.parametrize('num_processes,devices_per_process', [(2, 2), (3, 1)])
def test_processes_form_one_job_and_all_reduce(tmp_path, num_processes, devices_per_process):
  r = _run(['--num_processes', str(num_processes), '--cpu_devices_per_process', str(devices_per_process)],
           ['--workdir', str(tmp_path)])
  assert r.returncode == 0, r.stdout + r.stderr
  # Global row r is filled with r over 3 columns: sum = 3 * (0 + 1 + ... + devices - 1); column 0 = 0..devices-1.
  n = num_processes * devices_per_process
  expected = f'sum={3.0 * n * (n - 1) / 2} gathered={list(range(n))}'
  assert f'RESULT process=0 {expected}' in r.stdout  # process 0 streams to the launcher's stdout
  assert 'RESULT process=1' not in r.stdout
  for i in range(1, num_processes):
    log = tmp_path / 'logs' / f'process_{i}.log'
    assert str(log) in r.stderr
    text = log.read_text()
    assert f'RESULT process={i} {expected}' in text
    assert f'--workdir {tmp_path} --coordinator_address=127.0.0.1:' in text
    assert f'--num_processes={num_processes} --process_id={i}' in text


@pytest.mark.parametrize('fail_process', [0, 1])
def test_failed_process_stops_the_others(tmp_path, fail_process):
  start = time.monotonic()
  r = _run(['--num_processes', '2', '--cpu_devices_per_process', '1'],
           ['--workdir', str(tmp_path), f'--fail_process={fail_process}'], timeout=30)
  # The healthy processes sleep for 120 s: finishing quickly means the launcher stopped them.
  assert time.monotonic() - start < 25
  assert r.returncode == 3, r.stdout + r.stderr
  assert f'process {fail_process} exited with code 3' in r.stderr
  if fail_process == 0:
    assert 'fake failure' in r.stdout
    assert 'process 0 failed; its output is above' in r.stderr
  else:
    # The tail of the failed process's log is shown, and only this run's part of it.
    assert 'fake failure' in r.stderr.split(f'process_{fail_process}.log:')[1]


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_signal_lets_every_process_save_at_one_step(tmp_path, signum):
  marks = tmp_path / 'marks'
  marks.mkdir()
  cmd = _launch_cmd(['--num_processes', '2', '--cpu_devices_per_process', '1'],
                    ['--workdir', str(tmp_path), f'--wait_for_signal={marks}'])
  proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.monotonic() + 20
    while not all((marks / f'ready_{i}').exists() for i in range(2)):
      assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
      time.sleep(0.05)
    time.sleep(0.2)  # let them take a few steps
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=20)
  finally:
    proc.kill()
  assert proc.returncode == 128 + signum, err
  assert 'exited with code' not in err  # every process stopped cleanly, nobody was killed
  saved = sorted(p.name for p in marks.glob('saved_*'))
  assert len(saved) == 2, (saved, err)
  # Both processes agreed on the step to save at (it is past the steps they took before the signal).
  steps = {name.rsplit('_', 1)[1] for name in saved}
  assert len(steps) == 1 and int(steps.pop()) > 0, saved


def test_child_env_assigns_devices(monkeypatch):
  launcher = _load_launcher()
  monkeypatch.setattr(launcher, '_gpu_count', lambda: 8)
  args, fwd = launcher._parse_args(['--num_processes', '2', '--gpus_per_process', '2', '--', '--workdir=runs/x'])
  assert fwd == ['--workdir=runs/x'] and launcher._workdir(fwd) == 'runs/x'
  monkeypatch.delenv('CUDA_VISIBLE_DEVICES', raising=False)
  assert [launcher._child_env(args, i)['CUDA_VISIBLE_DEVICES'] for i in range(2)] == ['0,1', '2,3']
  monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '4,5,6,7')
  envs = [launcher._child_env(args, i) for i in range(2)]
  assert [e['CUDA_VISIBLE_DEVICES'] for e in envs] == ['4,5', '6,7']
  assert all(e['NCCL_NVLS_ENABLE'] == '0' for e in envs)
  monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '4,5,6')
  with pytest.raises(SystemExit, match='needs 4 GPUs but CUDA_VISIBLE_DEVICES=4,5,6$'):
    launcher._child_env(args, 1)
  monkeypatch.delenv('CUDA_VISIBLE_DEVICES')
  monkeypatch.setattr(launcher, '_gpu_count', lambda: 3)
  with pytest.raises(SystemExit, match='needs 4 GPUs but this machine has 3$'):
    launcher.main(['--num_processes', '2', '--gpus_per_process', '2', '--module', 'fake_worker'])

  args, fwd = launcher._parse_args(['--num_processes', '2', '--cpu_devices_per_process', '3', '--', '--workdir', 'w'])
  assert launcher._workdir(fwd) == 'w'
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=8 --xla_dump_to=/tmp/x')
  env = launcher._child_env(args, 0)
  assert (env['JAX_PLATFORMS'], env['JAX_NUM_CPU_DEVICES']) == ('cpu', '3')
  assert env['XLA_FLAGS'] == '--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=3'


def test_gpus_refused_without_a_gpu(tmp_path):
  # On a machine without GPUs (as CI's), asking for them stops with one line before any process starts, instead
  # of training on the CPU. With a GPU the in-process fake below checks the same path.
  launcher = _load_launcher()
  if launcher._gpu_count():
    pytest.skip('this machine has a GPU')
  r = _run(['--num_processes', '2', '--gpus_per_process', '1'], ['--workdir', str(tmp_path / 'run')])
  assert r.returncode == 1
  assert r.stderr == ('[launch] --gpus_per_process=1: this machine has no NVIDIA GPU (nvidia-smi finds none); '
                      'use --cpu_devices_per_process to run on CPU\n')
  assert r.stdout == '' and not (tmp_path / 'run').exists()


def test_gpu_count_reads_nvidia_smi(tmp_path, monkeypatch):
  launcher = _load_launcher()
  fake = tmp_path / 'nvidia-smi'
  fake.write_text('#!/bin/sh\necho "GPU 0: NVIDIA H200 (UUID: GPU-a)"\necho "GPU 1: NVIDIA H200 (UUID: GPU-b)"\n')
  fake.chmod(0o755)
  monkeypatch.setenv('PATH', f'{tmp_path}{os.pathsep}{os.environ["PATH"]}')
  assert launcher._gpu_count() == 2
  fake.write_text('#!/bin/sh\necho "NVIDIA-SMI has failed because it could not communicate with the driver"\n')
  assert launcher._gpu_count() == 0
