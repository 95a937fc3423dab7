"""Orbax checkpoints of a run: train state, data-iterator state and metadata, under WORKDIR/checkpoints/<step>.

Saves are asynchronous; a save killed midway leaves `<step>.orbax-checkpoint-tmp`, which `latest_step()` ignores
and the next start cleans up, so a crash never makes a run unrestorable. Each checkpoint's metadata holds a
checksum of the saved state (`fingerprint`), checked on restore: a checkpoint that fails to restore or to match
it is renamed `<step>.damaged` (never deleted) and the run falls back to the one before.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
from typing import Any

from absl import logging
import grain
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

DAMAGED = '.damaged'


class CheckpointError(RuntimeError):
  """A checkpoint cannot be written (a full disk, say); the message is one line."""


def one_line(e: BaseException, limit: int = 200) -> str:
  """The first line of an exception's message (Orbax and TensorStore errors run to dozens), shortened."""
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  text = f'{type(e).__name__}: {lines[0] if lines else ""}'.rstrip(': ')
  return text if len(text) <= limit else text[:limit - 3] + '...'


def _words(x: jax.Array) -> jax.Array:
  """The bits of an array as uint32[n] (its exact stored value, NaN payloads included)."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  x = x.reshape(-1)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = x.dtype.itemsize
  if size == 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  if size == 8:
    return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
  small = {2: jnp.uint16, 1: jnp.uint8}[size]
  return jax.lax.bitcast_convert_type(x, small).astype(jnp.uint32)


@jax.jit
def fingerprint(state: Any) -> tuple[jax.Array, jax.Array]:
  """(whether every array is finite, uint32[2 * leaves] sums over each array's bits).

  Integer sums wrap mod 2**32, so they are exact and independent of how the arrays are sharded or reduced:
  the same on any mesh and process count. Each word is mixed (an invertible multiply-xorshift, so any change of
  one word changes the sum) and weighted by its position (so swapped elements change it too).
  """
  finite, sums = [], []
  for x in jax.tree.leaves(state):
    if jnp.issubdtype(x.dtype, jnp.inexact):
      finite.append(jnp.all(jnp.isfinite(x)))
    w = _words(x) * jnp.uint32(0x9E3779B1)
    w = w ^ (w >> 16)
    pos = jnp.arange(w.shape[0], dtype=jnp.uint32) * jnp.uint32(2) + jnp.uint32(1)
    sums += [jnp.sum(w, dtype=jnp.uint32), jnp.sum(w * pos, dtype=jnp.uint32)]
  return jnp.all(jnp.stack(finite)) if finite else jnp.bool_(True), jnp.stack(sums)


def checksum(sums: np.ndarray) -> str:
  """The hex digest stored in a checkpoint's metadata, from `fingerprint`'s sums (on the host)."""
  return hashlib.sha256(np.asarray(sums, dtype='<u4').tobytes()).hexdigest()[:32]


class Checkpointer:
  """A CheckpointManager with the three items every selattn checkpoint holds, and their verification."""

  def __init__(self, directory: str, *, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save)
    try:
      self.manager = ocp.CheckpointManager(self.directory, options=options)
    except OSError as e:
      raise CheckpointError(f'cannot open the checkpoint directory {self.directory}: '
                            f'{os.strerror(e.errno) if e.errno else one_line(e)}') from None
    self.intact = None  # the latest step known to be complete and verified (restored, or saved by this run)
    self._in_flight = None  # the step being saved asynchronously
    self._sized = (None, 0)  # (step, bytes on disk) of the last checkpoint measured by check_space

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_iter: Any, meta: dict) -> None:
    """Starts saving (asynchronously); `poll()` reports a failure, `wait()` blocks until it is on disk."""
    self.wait()  # orbax would wait for the previous save too; here its failure is reported as such
    args = {'state': ocp.args.StandardSave(state), 'meta': ocp.args.JsonSave(meta)}
    if data_iter is not None:
      args['data'] = grain.checkpoint.CheckpointSave(data_iter)
    self._in_flight = step
    try:
      self.manager.save(step, args=ocp.args.Composite(**args), force=True)
    except Exception as e:  # pylint: disable=broad-except  (OSError, or Orbax's wrapping of one)
      self._failed(e)
    self.poll()

  def poll(self) -> None:
    """Non-blocking: records a finished save, or raises CheckpointError if it failed."""
    if self._in_flight is not None and not self.manager.is_saving_in_progress():
      self._finish()

  def wait(self) -> None:
    """Blocks until the save in flight is on disk; CheckpointError if it failed."""
    if self._in_flight is not None:
      self._finish()

  def _finish(self) -> None:
    try:
      self.manager.wait_until_finished()
      self.manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      self._failed(e)
    self.intact, self._in_flight = self._in_flight, None

  def _failed(self, e: Exception) -> None:
    step, self._in_flight = self._in_flight, None
    reason = one_line(e)
    # The OS error inside Orbax's and TensorStore's wrapping says it best ("No space left on device").
    cause, chain = e, ''
    while cause is not None and len(chain) < 100_000:
      if isinstance(cause, OSError) and cause.errno:
        chain = os.strerror(cause.errno)
        break
      chain += str(cause) + '\n'
      cause = cause.__cause__ or cause.__context__
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO):
      if os.strerror(code) in chain:
        reason = os.strerror(code)
        break
    raise CheckpointError(f'saving checkpoint {step} to {self.directory} failed ({reason}): stopping; '
                          f'{self.describe_intact()}')

  def check_space(self) -> None:
    """Refuses to start a save the disk cannot hold (less free space than the last checkpoint takes)."""
    error = None
    self.wait()  # (a save waits for the one before anyway) so that `intact` is up to date
    if jax.process_index() == 0 and self.intact is not None:
      if self._sized[0] != self.intact:
        self._sized = (self.intact, _disk_usage(os.path.join(self.directory, str(self.intact))))
      st = os.statvfs(self.directory)
      free, size = st.f_bavail * st.f_frsize, self._sized[1]
      if free < size:
        error = (f'not enough space for a checkpoint in {self.directory} ({free / 2**20:.1f} MiB free, checkpoint '
                 f'{self.intact} takes {size / 2**20:.1f} MiB: No space left on device): stopping; '
                 f'{self.describe_intact()}')
    if jax.process_count() > 1:
      if bool(multihost_utils.broadcast_one_to_all(np.int32(error is not None))) and error is None:
        error = f'process 0 found no space for a checkpoint in {self.directory}: stopping'
    if error:
      raise CheckpointError(error)

  def describe_intact(self) -> str:
    if self.intact is None:
      return f'no intact checkpoint in {self.directory}'
    return f'the last intact checkpoint is step {self.intact} in {self.directory}'

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

  def restore_verified(self, step: int, abstract_state: Any, data_iter: Any) -> tuple[Any, dict]:
    """`restore`, then the state's checksum against the one saved with it (ValueError if they differ)."""
    state, meta = self.restore(step, abstract_state, data_iter)
    if not isinstance(meta, dict) or meta.get('step') != step:
      raise ValueError(f'its metadata does not describe step {step}')
    saved = meta.get('checksum')
    if saved is None:
      logging.warning('checkpoint %d has no checksum (saved by an older selattn): restored unverified', step)
    else:
      finite, sums = jax.device_get(fingerprint(state))
      got = checksum(sums)
      if got != saved:
        raise ValueError(f'checksum mismatch: the restored state hashes to {got}, saved as {saved}')
    return state, meta

  def restore_latest(self, abstract_state: Any, data_iter: Any) -> tuple[int, Any, dict] | None:
    """The latest checkpoint that restores and verifies, as (step, state, meta); None if there is none.

    Each one that fails is reported in one line, renamed `<step>.damaged` and the next older one tried.
    """
    for step in sorted(self.manager.all_steps(), reverse=True):
      error = None
      try:
        state, meta = self.restore_verified(step, abstract_state, data_iter)
      except Exception as e:  # pylint: disable=broad-except  (Orbax and TensorStore raise a dozen kinds)
        error = one_line(e)
      failed = [error] if error else []
      if jax.process_count() > 1:  # every process must fall back together
        flags = multihost_utils.process_allgather(np.int32(error is not None))
        if np.any(flags) and not failed:
          failed = ['it failed on another process']
      if not failed:
        self.intact = step
        return step, state, meta
      moved = self._move_aside(step)
      logging.warning('checkpoint %d in %s cannot be used (%s): renamed %s; falling back to the one before',
                      step, self.directory, failed[0], os.path.basename(moved))
      self.manager.reload()
    return None

  def _move_aside(self, step: int) -> str:
    src = os.path.join(self.directory, str(step))
    dst, n = src + DAMAGED, 1
    while os.path.lexists(dst):
      n += 1
      dst = f'{src}{DAMAGED}-{n}'
    if jax.process_index() == 0:
      os.rename(src, dst)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'selattn_move_aside_{step}')
    return dst

  def _other_layout_data_state(self, step: int) -> str | None:
    """A saved iterator-state file when this process layout has none of its own, else None."""
    data_dir = os.path.join(self.directory, str(step), 'data')
    own = os.path.join(data_dir, f'process_{jax.process_index()}-of-{jax.process_count()}.json')
    if not os.path.isdir(data_dir) or os.path.exists(own):
      return None
    saved = sorted(glob.glob(os.path.join(data_dir, 'process_*-of-*.json')))
    return saved[0] if saved else None

  def close(self) -> None:
    """Waits for the save in flight (CheckpointError if it failed) and closes the manager."""
    try:
      self.wait()
    finally:
      try:
        self.manager.close()
      except Exception:  # pylint: disable=broad-except  (its error, if any, was just reported)
        pass


def _disk_usage(path: str) -> int:
  total = 0
  for root, _, files in os.walk(path):
    for name in files:
      try:
        total += os.lstat(os.path.join(root, name)).st_blocks * 512
      except OSError:
        pass
  return total


def abstract(state: Any) -> Any:
  """ShapeDtypeStructs with the live arrays' shardings: the restore target."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
