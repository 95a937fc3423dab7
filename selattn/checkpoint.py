"""Orbax checkpoints of a run: train state, data-iterator state and metadata, under WORKDIR/checkpoints/<step>.

Saves are asynchronous; a save killed midway leaves `<step>.orbax-checkpoint-tmp`, which `latest_step()` ignores
and the next start cleans up, so a crash never makes a run unrestorable.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any

from absl import logging
import grain
import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """A CheckpointManager with the three items every selattn checkpoint holds."""

  def __init__(self, directory: str, *, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_iter: Any, meta: dict) -> None:
    """Starts saving (asynchronously); `wait()` blocks until it is on disk."""
    args = {'state': ocp.args.StandardSave(state), 'meta': ocp.args.JsonSave(meta)}
    if data_iter is not None:
      args['data'] = grain.checkpoint.CheckpointSave(data_iter)
    self.manager.save(step, args=ocp.args.Composite(**args), force=True)

  def restore(self, step: int, abstract_state: Any, data_iter: Any) -> tuple[Any, dict]:
    """Restores state onto the shardings in `abstract_state` (any mesh) and the iterator in place.

    The iterator state is saved per process (grain's `process_<i>-of-<n>.json`). A run restarted with another
    process count finds no file of its own; every process of the saved run stood at the same global batch
    (element i of selattn's dataset is global batch i, whatever the process count), so any saved file gives
    the position.
    """
    args = {'state': ocp.args.StandardRestore(abstract_state), 'meta': ocp.args.JsonRestore()}
    other_layout = None
    if data_iter is not None:
      other_layout = self._other_layout_data_state(step)
      if other_layout is None:
        args['data'] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    if other_layout is not None:
      with open(other_layout) as f:
        data_iter.set_state(json.load(f))
      if hasattr(data_iter, 'start_prefetch'):
        data_iter.start_prefetch()  # as grain's own restore does
      logging.warning('checkpoint %d was saved by another number of processes: data position taken from %s',
                      step, os.path.basename(other_layout))
    return restored['state'], restored['meta']

  def _other_layout_data_state(self, step: int) -> str | None:
    """A saved iterator-state file when this process layout has none of its own, else None."""
    data_dir = os.path.join(self.directory, str(step), 'data')
    own = os.path.join(data_dir, f'process_{jax.process_index()}-of-{jax.process_count()}.json')
    if not os.path.isdir(data_dir) or os.path.exists(own):
      return None
    saved = sorted(glob.glob(os.path.join(data_dir, 'process_*-of-*.json')))
    return saved[0] if saved else None

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract(state: Any) -> Any:
  """ShapeDtypeStructs with the live arrays' shardings: the restore target."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
