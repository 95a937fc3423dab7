"""The sampling command line: restores a run's checkpoint and prints generated text (selattn.generate).

  python -m selattn.sample --workdir runs/sel --prompt 'ROMEO:' --length 500

Without --prompt it uses the run's train.sample_prompt, or, when that is empty, the first line of the run's corpus
(as the trainer's eval samples do).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from absl import app
from absl import flags
from absl import logging
from flax import nnx
import jax
import orbax.checkpoint as ocp

from selattn import checkpoint as ckpt_lib
from selattn import compile_cache
from selattn import config as config_lib
from selattn import data as data_lib
from selattn import generate as generate_lib
from selattn import sharding
from selattn import train as train_lib
from selattn.model.transformer import Transformer


class SampleError(ValueError):
  """The run directory cannot be sampled from; the message is one line saying why."""


def restore(workdir: str, step: int | None = None) -> tuple[Transformer, data_lib.AnyVocab, config_lib.Config, Any]:
  """The model of the run in `workdir` at checkpoint `step` (default: the latest), its vocabulary, config and
  a mesh over this host's devices (data axis only), on which the model lives."""
  if not os.path.isdir(workdir):
    raise SampleError(f'--workdir={workdir}: no such directory')
  config_path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(config_path):
    raise SampleError(f'{config_path} not found: {workdir} is not a selattn run directory')
  try:
    with open(config_path) as f:
      saved = json.load(f)['config']
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise SampleError(f'cannot read {config_path}: {e}') from None
  vocab = data_lib.load_vocab(os.path.join(workdir, 'vocab.json'))
  if saved.get('model', {}).get('vocab_size', vocab.size) != vocab.size:
    raise SampleError(f'{config_path} says vocab_size={saved["model"]["vocab_size"]} but vocab.json has '
                      f'{vocab.size} symbols')
  # The run's mesh may not fit this machine; sampling needs none of it.
  cfg = config_lib.from_config({**saved, 'mesh': {}}, vocab.size)
  # Orbax takes absolute paths only; the README's commands give relative ones.
  ckpt_dir = os.path.abspath(os.path.join(workdir, 'checkpoints'))
  steps = []
  if os.path.isdir(ckpt_dir):
    manager = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(create=False))
    steps = manager.all_steps()
  if not steps:
    raise SampleError(f'no checkpoint in {ckpt_dir}')
  if step is not None and step not in steps:
    raise SampleError(f'no checkpoint at step {step} in {ckpt_dir} (it has steps {sorted(steps)})')
  mesh = sharding.make_mesh(config_lib.MeshConfig(data=-1))
  # A live state only for its structure and shardings (create_state enters the mesh, which eval_shape forbids).
  graphdef, state = train_lib.create_state(cfg, mesh)
  target = ckpt_lib.abstract(state)
  del state
  latest = step is None
  step = max(steps) if latest else step
  for attempt in range(3):
    try:
      # Only the 'state' item: the data iterator and metadata are not needed (nor their handlers registered).
      state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))['state']
      break
    except Exception:  # pylint: disable=broad-except  (Orbax and TensorStore raise a dozen kinds)
      # A run in progress keeps its last few checkpoints: it may have deleted this one while we read it.
      manager.reload()
      if not latest or step in manager.all_steps() or not manager.all_steps() or attempt == 2:
        raise
      logging.info('checkpoint %d was removed while being read (a run in progress); taking the latest', step)
      step = max(manager.all_steps())
  return nnx.merge(graphdef, state)[0], vocab, cfg, mesh


def default_prompt(cfg: config_lib.Config) -> str:
  """The eval samples' prompt: train.sample_prompt, or the first line of the run's corpus when that is empty."""
  if cfg.train.sample_prompt:
    return cfg.train.sample_prompt
  try:
    return generate_lib.corpus_prompt(data_lib.head_text(cfg.data.path, generate_lib.PROMPT_SCAN))
  except data_lib.DataError as e:
    raise SampleError(f'{e}: the default prompt comes from the run\'s corpus; give --prompt') from None


def _define_flags() -> None:
  # Defined only when run as a program: selattn.main defines --workdir too.
  flags.DEFINE_string('workdir', None, 'Run directory written by selattn.main (config.json, checkpoints/).')
  flags.DEFINE_string('prompt', None, 'Text to continue (default: the run\'s train.sample_prompt, or the first '
                      'line of its corpus when that is empty).')
  flags.DEFINE_integer('length', 500, 'Tokens to generate: characters, or bytes for a data.vocab=bytes run.')
  flags.DEFINE_float('temperature', 1.0, 'Softmax temperature; 0 = greedy.')
  flags.DEFINE_integer('top_k', 0, 'Sample among the k likeliest characters only (0 = all).')
  flags.DEFINE_integer('seed', 0, 'Sampling seed.')
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
  flags.mark_flag_as_required('workdir')
  flags.DEFINE_string('compilation_cache', None, compile_cache.FLAG_HELP)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  f = flags.FLAGS
  logging.set_verbosity(logging.WARNING)  # Orbax logs dozens of INFO lines per restore
  compile_cache.use(f.compilation_cache)
  try:
    model, vocab, cfg, mesh = restore(f.workdir, f.step)
    prompt = default_prompt(cfg) if f.prompt is None else f.prompt
    with jax.set_mesh(mesh):
      text = generate_lib.generate(model, vocab, prompt, f.length, temperature=f.temperature, top_k=f.top_k,
                                   seed=f.seed, max_len=cfg.data.seq_len)
  except ValueError as e:  # SampleError, ConfigError, DataError, bad arguments
    sys.exit(f'error: {e}')
  print(text)


if __name__ == '__main__':
  _define_flags()
  app.run(main)
