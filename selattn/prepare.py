"""Builds a config's token store ahead of training (the trainer builds it on first use otherwise):

  python -m selattn.prepare --config configs/enwik8.py
  python -m selattn.prepare --config configs/nanogpt.py --config.data.path=data/tinyshakespeare.txt --verify

Prints one line: the corpus, its tokens and splits, and where the store is (selattn.store says where stores go).
--verify rebuilds it, re-reading the whole corpus and its checksum, even when its size and modification time
still match. Multi-host: run it once per host (or once, on a shared filesystem) before starting the job.
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from selattn import config as config_lib
from selattn import data as data_lib
from selattn import store as store_lib

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/enwik8.py[:variant].')
_VERIFY = flags.DEFINE_bool('verify', False, 'Rebuild the store even if it looks fresh (re-checks the checksum).')
flags.mark_flag_as_required('config')


def describe(path: str, sidecar: str, meta: dict, built: bool) -> str:
  """The store in one line."""
  unit = 'bytes' if 'bytes' in meta['vocab'] else 'chars'
  symbols = 256 if unit == 'bytes' else len(meta['vocab']['chars'])
  train_end, val_end, n = meta['bounds']
  return (f'{path}: {n:,} {unit}, {symbols} symbols ({meta["dtype"]}), {"built" if built else "already prepared"} '
          f'in {sidecar} | split {meta["split"]!r}: train {train_end:,}, val {val_end - train_end:,}, '
          f'test {n - val_end:,} | sha256 {meta["sha256"][:12]}...')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  try:
    d = config_lib.from_config(_CONFIG.value, 1).data
    if not d.path:
      print('data.path is empty: the embedded corpus is tokenised in memory and needs no store')
      return
    sidecar, meta, built = store_lib.prepare(d.path, kind=d.vocab, split=d.split, val_fraction=d.val_fraction,
                                             store_dir=d.store_dir, rebuild=_VERIFY.value)
  except (data_lib.DataError, config_lib.ConfigError) as e:
    sys.exit(f'error: {e}')
  except OSError as e:
    sys.exit(f'error: {e.filename}: {e.strerror}')
  print(describe(d.path, sidecar, meta, built))


if __name__ == '__main__':
  app.run(main)
