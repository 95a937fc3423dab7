"""Trains a model: `python -m selattn.main --config configs/selective.py --workdir runs/sel`.

Run the same command again to resume from the latest checkpoint. Multi-process: pass --coordinator_address,
--num_processes and --process_id (launch/local.py does), or let JAX detect the cluster (SLURM and others).
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/selective.py[:variant].',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory: checkpoints, TensorBoard events, config.json.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (multi-process runs).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of JAX processes (multi-process runs).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process index (multi-process runs).')
flags.mark_flags_as_required(['config', 'workdir'])


def _parse(argv):
  """absl parsing, with a one-line error instead of a traceback for an unknown or mistyped config key."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f'error: {e}')
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    unknown = _unknown_overrides(argv)
    if unknown:
      sys.exit(f'error: unknown config key {", ".join(unknown)}; every key is listed in configs/base.py')
    sys.exit(f'error: bad config override ({e}); every key is listed in configs/base.py')


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
  """Drops INFO lines from Orbax and Grain (dozens per checkpoint); their warnings and errors still show."""

  def filter(self, record):
    return record.levelno >= 30 or not any(f'/{lib}/' in record.pathname for lib in ('orbax', 'grain'))


def main(argv):
  del argv
  import logging as py_logging  # pylint: disable=g-import-not-at-top
  py_logging.getLogger("absl").addFilter(_QuietLibraries())
  # Imported here so that `--helpfull` and flag errors are quick.
  import jax  # pylint: disable=g-import-not-at-top
  from selattn import config as config_lib, data, train  # pylint: disable=g-import-not-at-top

  if _COORDINATOR.value or _NUM_PROCESSES.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif any(v in os.environ for v in ('SLURM_JOB_ID', 'OMPI_COMM_WORLD_SIZE', 'JAX_COORDINATOR_ADDRESS')):
    jax.distributed.initialize()  # auto-detects the cluster
  logging.info('JAX %s, process %d/%d, %d devices: %s', jax.__version__, jax.process_index(), jax.process_count(),
               jax.device_count(), jax.devices()[:8])
  logging.info('config:\n%s', _CONFIG.value)
  try:
    train.train(_CONFIG.value, _WORKDIR.value)
  except (config_lib.ConfigError, data.DataError, train.TrainingError) as e:
    logging.error('%s', e)
    if jax.process_count() > 1:
      # jax.distributed's exit handler would wait minutes for the healthy peers; fail now so the launcher sees it.
      print(f'error: {e}', file=sys.stderr, flush=True)
      os._exit(1)
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  app.run(main, flags_parser=_parse)
