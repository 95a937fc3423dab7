"""Starts N processes of `python -m selattn.main` on this host, as one multi-process JAX job.

  python launch/local.py --num_processes 2 --cpu_devices_per_process 4 -- \
      --config configs/tiny.py --workdir runs/x

Everything after `--` goes to every process, followed by `--coordinator_address=127.0.0.1:PORT
--num_processes=N --process_id=i`. Process 0 prints to this terminal; process i > 0 writes to
`<workdir>/logs/process_<i>.log`. If one process fails, the others are killed and the launcher exits with its
code. SIGINT or SIGTERM reaches every process as one SIGTERM (so they can checkpoint); a second one kills them.
Standard library only, so it runs before any environment is set up.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

_POLL_S = 0.1
_TAIL_LINES = 40


def _log(msg: str) -> None:
  print(f'[launch] {msg}', file=sys.stderr, flush=True)


def _split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
  """Splits at the first `--` into the launcher's flags and the flags forwarded to every process."""
  if '--' in argv:
    i = argv.index('--')
    return argv[:i], argv[i + 1:]
  return argv, []


def _parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
  own, forwarded = _split_argv(argv)
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              usage='%(prog)s --num_processes N [options] -- [flags for each process]')
  p.add_argument('--num_processes', type=int, required=True, help='processes to start on this host')
  devices = p.add_mutually_exclusive_group()
  devices.add_argument('--cpu_devices_per_process', type=int, default=0,
                       help='run on CPU with this many JAX devices per process')
  devices.add_argument('--gpus_per_process', type=int, default=0,
                       help='give each process this many GPUs through CUDA_VISIBLE_DEVICES')
  p.add_argument('--port', type=int, default=0, help='coordinator port on 127.0.0.1 (default: a free one)')
  p.add_argument('--module', default='selattn.main', help='Python module each process runs with -m')
  args = p.parse_args(own)
  if args.num_processes < 1:
    p.error('--num_processes must be at least 1')
  if args.cpu_devices_per_process < 0 or args.gpus_per_process < 0:
    p.error('devices per process must be positive')
  return args, forwarded


def _free_port() -> int:
  # Another program could take the port before process 0 binds it; rare enough on one host, and --port exists.
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _workdir(forwarded: list[str]) -> str | None:
  """The value of --workdir among the forwarded flags, in either `--workdir X` or `--workdir=X` form."""
  for i, a in enumerate(forwarded):
    if a == '--workdir' and i + 1 < len(forwarded):
      return forwarded[i + 1]
    if a.startswith('--workdir='):
      return a.split('=', 1)[1]
  return None


def _child_env(args: argparse.Namespace, i: int) -> dict[str, str]:
  env = dict(os.environ)
  env['NCCL_NVLS_ENABLE'] = '0'  # NVLink multicast (NVLS) is never to be enabled on these machines
  env['PYTHONUNBUFFERED'] = '1'  # so the log files are live
  if args.cpu_devices_per_process:
    k = args.cpu_devices_per_process
    env['JAX_PLATFORMS'] = 'cpu'
    env['JAX_NUM_CPU_DEVICES'] = str(k)
    # Older jax only knows the XLA flag; drop any count inherited from the caller (e.g. a test conftest) first.
    flags = [f for f in env.get('XLA_FLAGS', '').split() if not f.startswith('--xla_force_host_platform_device_count')]
    env['XLA_FLAGS'] = ' '.join(flags + [f'--xla_force_host_platform_device_count={k}'])
  elif args.gpus_per_process:
    g = args.gpus_per_process
    env['CUDA_VISIBLE_DEVICES'] = ','.join(_gpu_pool(args)[i * g:(i + 1) * g])
  return env


def _gpu_count() -> int:
  """NVIDIA GPUs this machine shows: nvidia-smi's list, else the driver's /proc entries; 0 without a driver."""
  try:
    out = subprocess.run(['nvidia-smi', '-L'], capture_output=True, text=True, timeout=60, check=False).stdout
    return sum(line.startswith('GPU ') for line in out.splitlines())
  except (OSError, subprocess.TimeoutExpired):
    pass
  try:
    return len(os.listdir('/proc/driver/nvidia/gpus'))
  except OSError:
    return 0


def _gpu_pool(args: argparse.Namespace) -> list[str]:
  """The GPU ids the processes share out, checked before anything starts: without this, processes asked to use
  GPUs on a machine without any would silently train on its CPU."""
  need = args.num_processes * args.gpus_per_process
  have = _gpu_count()
  if not have:
    raise SystemExit(f'[launch] --gpus_per_process={args.gpus_per_process}: this machine has no NVIDIA GPU '
                     '(nvidia-smi finds none); use --cpu_devices_per_process to run on CPU')
  # Index into the caller's CUDA_VISIBLE_DEVICES if set, so `CUDA_VISIBLE_DEVICES=4,5,6,7 local.py` works.
  visible = os.environ.get('CUDA_VISIBLE_DEVICES')
  pool = visible.split(',') if visible else [str(d) for d in range(have)]
  if len(pool) < need:
    where = f'CUDA_VISIBLE_DEVICES={visible}' if visible else f'this machine has {have}'
    raise SystemExit(f'[launch] {args.num_processes} processes x {args.gpus_per_process} GPUs needs {need} GPUs '
                     f'but {where}')
  return pool


_LIBC = ctypes.CDLL(None) if sys.platform.startswith('linux') else None


def _die_with_parent() -> None:
  # Children live in their own process group, so nothing else ends them if the launcher is SIGKILLed. SIGKILL,
  # not SIGTERM: JAX takes SIGTERM as a preemption notice and keeps running.
  if _LIBC is not None:
    _LIBC.prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def _kill(p: subprocess.Popen) -> None:
  """SIGKILLs a child's whole process group (its data-loader workers too)."""
  try:
    os.killpg(p.pid, signal.SIGKILL)
  except ProcessLookupError:
    pass  # the group is already gone


def _tail(path: str, offset: int) -> str:
  with open(path, 'rb') as f:
    f.seek(offset)
    lines = f.read().decode('utf-8', 'replace').splitlines()
  return '\n'.join(lines[-_TAIL_LINES:])


def _exit_code(returncode: int) -> int:
  return 128 - returncode if returncode < 0 else returncode  # killed by signal s -> 128 + s, as shells report


def main(argv: list[str]) -> int:
  args, forwarded = _parse_args(argv)
  if args.gpus_per_process:
    _gpu_pool(args)  # refuse before any process starts
  n = args.num_processes
  port = args.port or _free_port()
  workdir = _workdir(forwarded)
  logdir = os.path.join(workdir, 'logs') if workdir else tempfile.mkdtemp(prefix='selattn_logs_')
  os.makedirs(logdir, exist_ok=True)

  procs, logs = [], {}
  for i in range(n):
    cmd = [sys.executable, '-m', args.module, *forwarded,
           f'--coordinator_address=127.0.0.1:{port}', f'--num_processes={n}', f'--process_id={i}']
    out = None
    if i > 0:
      path = os.path.join(logdir, f'process_{i}.log')
      out = open(path, 'ab')  # append: a resumed run keeps the failed run's log; the tail starts at this offset
      out.write(f'=== {time.strftime("%Y-%m-%d %H:%M:%S")} {" ".join(cmd)}\n'.encode())
      out.flush()
      logs[i] = (path, out.tell())
      _log(f'process {i} logs to {path}')
    # Own process group: a terminal Ctrl-C reaches only the launcher, which passes it on exactly once.
    procs.append(subprocess.Popen(cmd, env=_child_env(args, i), stdin=subprocess.DEVNULL, stdout=out,
                                  stderr=subprocess.STDOUT if out else None, process_group=0,
                                  preexec_fn=_die_with_parent))
    if out:
      out.close()  # the child holds its own descriptor

  signals = []

  def forward(signum, _frame):
    # Children get SIGTERM for Ctrl-C too: in a multi-process job JAX's preemption service catches SIGTERM and
    # `multihost_utils.reached_preemption_sync_point(step)` lets every process agree on one step to checkpoint,
    # whereas a KeyboardInterrupt would stop each process at a different step.
    signals.append(signum)
    first = len(signals) == 1
    _log(f'got {signal.Signals(signum).name}; ' +
         ('sending SIGTERM to all processes (again to kill them)' if first else 'killing all processes'))
    for p in procs:
      if p.poll() is not None:
        continue
      if first:
        p.send_signal(signal.SIGTERM)
      else:
        _kill(p)

  signal.signal(signal.SIGINT, forward)
  signal.signal(signal.SIGTERM, forward)

  while True:
    done = all(p.poll() is not None for p in procs)  # first, so a late exit can't slip past the check below
    # After a signal, non-zero codes are an expected way to stop: wait for everyone.
    failed = None if signals else next((i for i, p in enumerate(procs) if p.poll()), None)
    if done or failed is not None:
      break
    time.sleep(_POLL_S)
  if failed is None:
    return 128 + signals[0] if signals else 0

  # Kill, don't ask: without one of its processes the job can neither step nor save (a checkpoint is a
  # collective), and JAX would take a SIGTERM as a preemption notice and carry on waiting for the dead peer.
  code = _exit_code(procs[failed].returncode)
  _log(f'process {failed} exited with code {code}; killing the others')
  for p in procs:
    _kill(p)
    p.wait()
  if failed in logs:
    _log(f'process {failed} failed; last lines of {logs[failed][0]}:\n{_tail(*logs[failed])}')
  else:
    _log('process 0 failed; its output is above')
  return code


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
