"""Trains a model: `python -m selattn.main --config configs/selective.py --workdir runs/sel`.

Run the same command again to resume from the latest checkpoint. Override any config key with
`--config.<section>.<key>=<value>`, e.g. `--config.train.num_steps=20000 --config.model.kv_generator=mlp`;
configs/base.py lists every key with its default and a one-line comment. Multi-process: pass
--coordinator_address, --num_processes and --process_id (launch/local.py does), or let JAX detect the cluster
(SLURM and others).

Exit status: 0 finished (train.num_steps reached); 1 error (one `error:` line says why); 75 stopped by SIGTERM or
Ctrl-C with its progress saved (rerun the same command to resume).
"""

import errno
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from selattn import compile_cache
from selattn import stopping

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/selective.py[:variant].',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None,
                                'Run directory: checkpoints, TensorBoard events, config.json, train.log.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (multi-process runs).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of JAX processes (multi-process runs).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process index (multi-process runs).')
_ALLOW_DATA_CHANGE = flags.DEFINE_bool(
    'allow_data_change', False, 'Resume a run on other data than it was trained on: another data.path, data.split or '
    'data.val_fraction, or an edited file.')
_STACK_SEEDS = flags.DEFINE_string(
    'stack_seeds', None, 'Train these seeds (e.g. 0,1,2) in one process, stacked: seed k in WORKDIR/seed<k> with '
    'train.seed=k, as `python -m selattn.sweep --stack` runs them (selattn/stack.py).')
_COMPILATION_CACHE = flags.DEFINE_string('compilation_cache', None, compile_cache.FLAG_HELP)
flags.mark_flags_as_required(['config', 'workdir'])

_HELP = ('--help', '-h', '-help', '--helpshort', '--helpfull', '-?')


def _usage() -> str:
  lines = [__doc__.strip(), '', 'flags:']
  for name in ('config', 'workdir', 'allow_data_change', 'stack_seeds', 'compilation_cache', 'coordinator_address',
               'num_processes', 'process_id'):
    flag = flags.FLAGS[name]
    lines.append(f'  --{name}: {flag.help}')
  lines.append('  --config.<section>.<key>=<value>: override one config key (sections: model, data, train, mesh; '
               'every key is in configs/base.py)')
  return '\n'.join(lines)


def _config_args(argv) -> list[str]:
  """The values of --config in argv (absl loads each; the last one wins)."""
  values = []
  for i, arg in enumerate(argv):
    if arg == '--config' and i + 1 < len(argv):
      values.append(argv[i + 1])
    elif arg.startswith('--config='):
      values.append(arg[len('--config='):])
  return values


def _check_config_file(value: str) -> None:
  """A missing config file is one line; a config file's own imports (`from configs import base`) work from any
  directory: the folder holding its package (the repository root for configs/*.py) goes on sys.path."""
  path = value.split(':', 1)[0]
  if not os.path.isfile(path):
    what = 'is a directory, not a config file' if os.path.isdir(path) else 'no such file'
    sys.exit(f'error: --config={path}: {what}')
  folder = os.path.dirname(os.path.abspath(path))
  if os.path.isfile(os.path.join(folder, '__init__.py')):
    folder = os.path.dirname(folder)
  if folder not in sys.path:
    sys.path.insert(0, folder)


def _parse(argv):
  """absl parsing, with a one-line error instead of a traceback for a bad config file, variant or key."""
  if any(a in _HELP for a in argv[1:]):
    print(_usage())
    sys.exit(0)
  config_values = _config_args(argv)
  for value in config_values:
    _check_config_file(value)
  config_value = config_values[-1] if config_values else None
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if len(lines) > 1:  # a config file that raised: its traceback is in the message; the last line says what
      sys.exit(f'error: --config={config_value}: {lines[-1]}')
    sys.exit(f'error: {e}')
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    unknown = _unknown_overrides(argv)
    if unknown:
      sys.exit(f'error: unknown config key {", ".join(unknown)}; every key is listed in configs/base.py')
    sys.exit(f'error: bad config override ({e}); every key is listed in configs/base.py')
  try:
    _CONFIG.value.to_dict()  # a config file that failed to load (or a bad variant) raises only when read
  except Exception as e:  # pylint: disable=broad-except  (whatever the user's config file raised)
    cause = e.__cause__ or e
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    sys.exit(f'error: --config={config_value}: {lines[-1] if lines else type(cause).__name__}')
  return rest


def _unknown_overrides(argv) -> list[str]:
  """The `--config.a.b=...` overrides naming no key of configs/base.py."""
  from configs import base  # pylint: disable=g-import-not-at-top
  known = base.get_config()
  unknown = []
  for arg in argv:
    if arg.startswith('--config.'):
      path = arg[len('--config.'):].split('=', 1)[0]
      node = known
      for part in path.split('.'):
        if not hasattr(node, 'keys') or part not in node.keys():
          unknown.append(path)
          break
        node = node[part]
  return unknown


class _QuietLibraries:
  """Drops Orbax's and Grain's INFO lines (dozens per checkpoint) and their ERROR lines (tracebacks of a failed
  save or restore, each hundreds of lines: the exception reaches selattn, which reports it in one line), keeping
  their warnings; and jax's "Unable to initialize backend 'tpu'" (it probes every platform it knows)."""

  def filter(self, record):
    if 'Unable to initialize backend' in str(record.msg):
      return False
    library = any(f'/{lib}/' in record.pathname for lib in ('orbax', 'grain'))
    return not library or 30 <= record.levelno < 40


def _drop_closed_loop_errors() -> None:
  """Drops the tracebacks Orbax leaves behind a failure selattn already reported in one line.

  After a failed save, TensorStore's threads finish the save's other writes and call back into Orbax's event
  loop, already closed: each callback prints a `RuntimeError: Event loop is closed` traceback (through
  sys.excepthook or the unraisable hook). After a failed restore (a damaged checkpoint, set aside by
  `Checkpointer.restore_latest`), the reads of the other arrays are coroutines never awaited; when collected,
  each prints `Exception ignored in: <coroutine ...>` and a page of TensorStore spec. Drop these echoes."""

  def echo(exc_type, exc) -> bool:
    closed_loop = exc_type is RuntimeError and 'Event loop is closed' in str(exc)
    failed_read = exc is not None and 'Encountered error while reading array' in str(exc)
    return closed_loop or failed_read

  excepthook, unraisablehook = sys.excepthook, sys.unraisablehook
  sys.excepthook = lambda t, v, tb: None if echo(t, v) else excepthook(t, v, tb)
  sys.unraisablehook = lambda u: None if echo(u.exc_type, u.exc_value) else unraisablehook(u)
  # The same echoes as asyncio's "Task exception was never retrieved" (a task, not a bare coroutine).
  import logging as py_logging  # pylint: disable=g-import-not-at-top
  py_logging.getLogger('asyncio').addFilter(
      lambda record: not (record.exc_info and echo(record.exc_info[0], record.exc_info[1])))


def _fail(message: str) -> None:
  """Prints the one error line and exits 1 at once.

  Not through the interpreter's shutdown: in a multi-process run jax.distributed's exit handler would wait minutes
  for the healthy peers, and after a failed save TensorStore's threads still call into Orbax's closed event loop,
  each printing a traceback. Everything of ours is closed by now (train's `finally`).
  """
  sys.stdout.flush()
  print(f'error: {message}', file=sys.stderr, flush=True)
  os._exit(stopping.EXIT_FAILED)  # pylint: disable=protected-access


def main(argv):
  if len(argv) > 1:  # a stray word (a flag missing its --, a value split by a space) must not start a long run
    _fail(f'unexpected arguments: {" ".join(argv[1:])} (every setting is a --flag or --config.<key>=<value>)')
  import logging as py_logging  # pylint: disable=g-import-not-at-top
  quiet = _QuietLibraries()
  py_logging.getLogger('absl').addFilter(quiet)
  py_logging.getLogger('jax._src.xla_bridge').addFilter(quiet)
  _drop_closed_loop_errors()
  multi_process = bool(_COORDINATOR.value or _NUM_PROCESSES.value or any(
      v in os.environ for v in ('SLURM_JOB_ID', 'OMPI_COMM_WORLD_SIZE', 'JAX_COORDINATOR_ADDRESS')))
  # Installed before anything slow (importing jax, compiling): a signal before the loop ends the run at once with
  # one line. Not in multi-process runs: there JAX's preemption service handles SIGTERM (train.py).
  stop = stopping.StopSignal(exit_early=True)
  if not multi_process:
    stop.__enter__()
  # Imported here so that `--help` and flag errors are quick.
  import jax  # pylint: disable=g-import-not-at-top
  # pylint: disable-next=g-import-not-at-top
  from selattn import checkpoint, config as config_lib, data, metrics, train, workdir

  if _COORDINATOR.value or _NUM_PROCESSES.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif multi_process:
    jax.distributed.initialize()  # auto-detects the cluster
  cache = compile_cache.use(_COMPILATION_CACHE.value)
  logging.info('JAX %s, process %d/%d, %d devices: %s; compilation cache: %s', jax.__version__, jax.process_index(),
               jax.process_count(), jax.device_count(), jax.devices()[:8], cache)
  try:
    if _STACK_SEEDS.value is not None:
      from selattn import stack  # pylint: disable=g-import-not-at-top
      stack.train(_CONFIG.value, _WORKDIR.value, stack.parse_seeds(_STACK_SEEDS.value),
                  allow_data_change=_ALLOW_DATA_CHANGE.value, stop=stop)
    else:
      train.train(_CONFIG.value, _WORKDIR.value, allow_data_change=_ALLOW_DATA_CHANGE.value, stop=stop)
  except (config_lib.ConfigError, data.DataError, train.TrainingError, workdir.WorkdirError,
          checkpoint.CheckpointError, metrics.MetricsError) as e:
    _fail(str(e))
  except OSError as e:
    if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
      raise
    # The disk (full, read-only, not ours) rather than the program: a line, not a traceback.
    _fail(f'{e.filename or _WORKDIR.value}: {os.strerror(e.errno)}')
  if stop.stopped_at is not None:
    sys.exit(stopping.EXIT_STOPPED)


if __name__ == '__main__':
  app.run(main, flags_parser=_parse)
