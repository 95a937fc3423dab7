"""The evaluation command line: a run's checkpoint scored on a held-out split, in nats and bits per byte (and per
character for a character model: its bits per byte are its total bits over the UTF-8 bytes of the characters).

  python -m selattn.evaluate --workdir runs/enwik8 --split test
  python -m selattn.evaluate --workdir runs/enwik8 --split val --step 20000 --out eval.json

It reads the run's config.json, vocab.json and checkpoint, never its lock: it works on a run in progress. The
split is the run's own (data.path, data.vocab, data.split), from its token store; every token of the split after
the first is scored once, by default in non-overlapping windows of data.seq_len (as the trainer's eval with
train.eval_batches=0), so a token's context is 0 to seq_len - 1 tokens. --stride S < seq_len overlaps them: a
window every S tokens scores only its last S, so each token has at least seq_len - S tokens of context (seq_len / S
times the compute). Prints one line; --out also writes JSON.
"""

from __future__ import annotations

import json
import math
import os
import sys

from absl import app
from absl import flags
from absl import logging
from flax import nnx
import jax
import numpy as np
import orbax.checkpoint as ocp

from selattn import compile_cache
from selattn import data as data_lib
from selattn import sample as sample_lib
from selattn import sharding
from selattn import store as store_lib
from selattn import train as train_lib
from selattn import workdir as workdir_lib


class EvaluateError(ValueError):
  """The run cannot be evaluated as asked; the message is one line saying why."""


def latest_step(workdir: str) -> int:
  ckpt_dir = os.path.abspath(os.path.join(workdir, 'checkpoints'))
  steps = []
  if os.path.isdir(ckpt_dir):
    steps = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(create=False)).all_steps()
  if not steps:
    raise EvaluateError(f'no checkpoint in {ckpt_dir}')
  return max(steps)


def evaluate(workdir: str, *, split: str = 'test', step: int | None = None, batch_size: int | None = None,
             num_batches: int = 0, stride: int | None = None) -> dict:
  """Scores checkpoint `step` (default: the latest) of the run in `workdir` on its `split` ('val' or 'test');
  `stride`: windows every `stride` tokens, each scoring its last `stride` targets (default data.seq_len)."""
  if split not in ('val', 'test'):
    raise EvaluateError(f'--split={split} is not one of val, test')
  if not os.path.isdir(workdir):
    raise EvaluateError(f'--workdir={workdir}: no such directory')
  # 0 and negatives are refused, not read as "the default": --stride 0 would silently score without overlap.
  if batch_size is not None and batch_size < 1:
    raise EvaluateError(f'--batch_size={batch_size} must be positive')
  if num_batches < 0:
    raise EvaluateError(f'--batches={num_batches} must be 0 (the whole split) or more')
  saved = train_lib.read_saved_config(workdir) or {}
  data_split = saved.get('config', {}).get('data', {}).get('split', 'tail')
  if split == 'test' and data_split == 'tail':
    raise EvaluateError(f"{workdir} was trained with data.split='tail', which has no test split; use --split val, "
                        "or train with data.split='enwik8'")
  step = latest_step(workdir) if step is None else step
  model, vocab, cfg, mesh = sample_lib.restore(workdir, step)
  d = cfg.data
  if d.vocab != data_lib.vocab_kind(vocab):
    raise EvaluateError(f'{workdir}: config.json says data.vocab={d.vocab!r} but vocab.json holds '
                        f'{data_lib.vocab_kind(vocab)}')
  corpus = store_lib.open_config(d, vocab)
  if saved.get('data_sha256') not in (None, corpus.sha256):
    raise EvaluateError(f'the text of data.path={d.path!r} has changed since {workdir} was trained on it: its '
                        'held-out split would not be the one the run held out')
  tokens = corpus.split(split)
  batch_size = cfg.train.batch_size if batch_size is None else batch_size
  n_dev = len(jax.devices())
  if batch_size % n_dev:
    raise EvaluateError(f'--batch_size={batch_size} must be a multiple of the {n_dev} devices')
  stride = d.seq_len if stride is None else stride
  if not 1 <= stride <= d.seq_len:
    raise EvaluateError(f'--stride={stride} must be in [1, data.seq_len={d.seq_len}]')
  batches = data_lib.eval_batches(tokens, seq_len=d.seq_len, global_batch_size=batch_size,
                                  num_batches=num_batches, stride=stride)
  graphdef, state = nnx.split(model)
  shard = sharding.batch_sharding(mesh)

  @jax.jit
  def scores(state, batch):
    logits = nnx.merge(graphdef, state)(batch['inputs'])
    return train_lib.cross_entropy(logits, batch['targets'], batch['weights'])

  # UTF-8 bytes of each token: a character model's loss per byte is its loss over the bytes of the text it scored.
  if data_lib.vocab_kind(vocab) == 'bytes':
    byte_len = np.ones(vocab.size)
  else:
    byte_len = np.array([len(c.encode('utf-8')) for c in vocab.chars], np.float64)
  totals = None
  with jax.set_mesh(mesh):
    for b in batches:
      sums = jax.device_get(scores(state, jax.device_put(b, shard)))
      # float64 on the host: millions of tokens' nats add up exactly enough.
      sums = {k: np.float64(v) for k, v in sums.items()}
      sums['bytes'] = float((byte_len[b['targets']] * b['weights']).sum())
      totals = sums if totals is None else {k: totals[k] + sums[k] for k in totals}
  unit = train_lib.unit(vocab)
  loss = totals['loss'] / totals['weight']
  nats = totals['loss']
  return {'workdir': workdir, 'step': step, 'split': split, 'data_path': d.path, 'data_vocab': d.vocab,
          'data_split': d.split, 'seq_len': d.seq_len, 'stride': stride, 'unit': unit,
          'tokens_scored': int(totals['weight']),
          'bytes_scored': int(totals['bytes']), 'loss': loss, f'bits_per_{unit}': loss / math.log(2),
          'bits_per_byte': nats / math.log(2) / totals['bytes'], 'accuracy': totals['correct'] / totals['weight']}


def describe(r: dict) -> str:
  """The result in one line."""
  name = r['data_path'] or 'the embedded corpus'
  unit = r['unit']
  per_char = f"{r['bits_per_char']:.4f} bits per char ({r['bytes_scored']:,} bytes) | " if unit == 'char' else ''
  windows = f", stride {r['stride']}" if r['stride'] != r['seq_len'] else ''
  return (f"{r['workdir']} step {r['step']}, {r['split']} split of {name} ({r['tokens_scored']:,} {unit}s scored"
          f"{windows}): "
          f"loss {r['loss']:.4f} nats | {per_char}{r['bits_per_byte']:.4f} bits per byte | "
          f"accuracy {r['accuracy']:.4f}")


def _define_flags() -> None:
  flags.DEFINE_string('workdir', None, 'Run directory written by selattn.main (config.json, checkpoints/).')
  flags.DEFINE_enum('split', 'test', ['val', 'test'], "Split to score: 'test' (data.split='enwik8' runs) or 'val'.")
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
  flags.DEFINE_integer('batch_size', None, 'Windows per batch (default: the run\'s train.batch_size).')
  flags.DEFINE_integer('batches', 0, 'Batches of windows spread over the split (0 = every window: the whole split).')
  flags.DEFINE_integer('stride', None, 'Windows start every this many tokens and score their last `stride` targets, '
                       'so each has at least seq_len - stride tokens of context (default: data.seq_len, no overlap).')
  flags.DEFINE_string('out', None, 'Also write the result as JSON here.')
  flags.DEFINE_string('compilation_cache', None, compile_cache.FLAG_HELP)
  flags.mark_flag_as_required('workdir')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  f = flags.FLAGS
  logging.set_verbosity(logging.WARNING)  # Orbax logs dozens of INFO lines per restore
  compile_cache.use(f.compilation_cache)
  try:
    result = evaluate(f.workdir, split=f.split, step=f.step, batch_size=f.batch_size, num_batches=f.batches,
                      stride=f.stride)
    if f.out:
      with open(f.out, 'w') as fh:
        json.dump(result, fh, indent=1)
  except (ValueError, train_lib.TrainingError, workdir_lib.WorkdirError) as e:  # and Sample/Data/ConfigError
    sys.exit(f'error: {e}')
  except OSError as e:
    sys.exit(f'error: {e.filename}: {e.strerror}')
  print(describe(result))


if __name__ == '__main__':
  _define_flags()
  app.run(main)
