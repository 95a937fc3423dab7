"""A run folder as the tests read it: TensorBoard event files and scalars, checkpoint steps, restored parameters.

Each start of a run writes its own event file, so "the files written since" is how a test isolates a resumed
run's losses. Files are ordered by modification time (a later start's file last), so later files win a step two
files both hold.
"""

from __future__ import annotations

import glob
import os


def event_files(workdir: str) -> list[str]:
  """The run's TensorBoard event files, oldest first."""
  return sorted(glob.glob(os.path.join(workdir, 'events.out.tfevents*')), key=lambda f: (os.path.getmtime(f), f))


def new_event_files(workdir: str, before: list[str]) -> list[str]:
  """The event files written since `before` was listed."""
  return [f for f in event_files(workdir) if f not in set(before)]


def scalars(workdir: str, tag: str = 'train/loss', files: list[str] | None = None) -> dict[int, float]:
  """{step: value} of a TensorBoard scalar over the run's event files (or `files`); later files win a step."""
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  out = {}
  for f in sorted(event_files(workdir) if files is None else files, key=lambda f: (os.path.getmtime(f), f)):
    acc = event_accumulator.EventAccumulator(f, size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    if tag in acc.Tags()['scalars']:
      out.update({e.step: e.value for e in acc.Scalars(tag)})
  return out


def checkpoint_steps(workdir: str) -> list[int]:
  d = os.path.join(workdir, 'checkpoints')
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def restore_params(workdir: str, steps) -> dict:
  """{step: the Param leaves (numpy) of checkpoint `step`}, restored the way `selattn.sample` restores a run."""
  # pylint: disable=g-import-not-at-top
  from flax import nnx
  import jax
  import numpy as np
  from selattn import sample
  out = {}
  for step in steps:
    model = sample.restore(workdir, step)[0]
    out[step] = [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]
  return out
