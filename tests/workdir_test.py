"""selattn.workdir in-process: the lock, atomic writes that never follow links, and checkpoint checksums.

The same guarantees through the command line, in real processes (a second writer, kills, a full disk), are in
main_test.py; the kill-at-random-moments stress run is stress_test.py.
"""

import os
import socket

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selattn import checkpoint
from selattn import workdir


# ----------------------------------------------------------------------------------------------------------------
# The lock.

def test_a_second_lock_is_refused_naming_the_holder(tmp_path):
  with workdir.Lock(str(tmp_path)):
    # A second open file description conflicts as another process's would.
    with pytest.raises(workdir.WorkdirError) as e:
      workdir.Lock(str(tmp_path)).acquire()
    msg = str(e.value)
    assert str(tmp_path) in msg and f'pid {os.getpid()} on {socket.gethostname()}' in msg, msg
    assert '\n' not in msg
  with workdir.Lock(str(tmp_path)):  # released: it can be taken again
    pass


def test_a_symlinked_lock_file_is_refused(tmp_path):
  target = tmp_path / 'elsewhere'
  target.write_text('keep me')
  run = tmp_path / 'run'
  run.mkdir()
  (run / workdir.LOCK_NAME).symlink_to(target)
  with pytest.raises(workdir.WorkdirError):
    workdir.Lock(str(run)).acquire()
  assert target.read_text() == 'keep me'


def test_a_workdir_that_is_a_file_is_refused(tmp_path):
  path = tmp_path / 'file'
  path.write_text('x')
  with pytest.raises(workdir.WorkdirError, match='not a directory'):
    workdir.check_is_dir(str(path))
  workdir.check_is_dir(str(tmp_path / 'not yet there'))  # created later: fine


# ----------------------------------------------------------------------------------------------------------------
# Files written whole, only when they change.

def test_an_unchanged_file_is_not_rewritten(tmp_path):
  path = str(tmp_path / 'config.json')
  assert workdir.write_text(path, '{"a": 1}\n')
  st = os.stat(path)
  assert not workdir.write_text(path, '{"a": 1}\n')
  assert (os.stat(path).st_ino, os.stat(path).st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
  assert workdir.write_text(path, '{"a": 2}\n')
  assert open(path).read() == '{"a": 2}\n'
  assert os.stat(path).st_ino != st.st_ino  # a new file renamed over the old one, not a rewrite in place
  assert sorted(os.listdir(tmp_path)) == ['config.json']
  (tmp_path / '.config.json.tmp-99999').write_text('{"a":')  # a write killed midway, by another process
  assert not workdir.write_text(path, '{"a": 2}\n')
  assert sorted(os.listdir(tmp_path)) == ['config.json']


def test_a_write_that_fails_midway_leaves_the_old_file(tmp_path, monkeypatch):
  path = str(tmp_path / 'config.json')
  workdir.write_text(path, 'old contents\n')
  real_write = os.write

  def write_half_then_fail(fd, data):
    real_write(fd, bytes(data[:len(data) // 2]))
    raise OSError(28, 'No space left on device')

  monkeypatch.setattr(os, 'write', write_half_then_fail)
  with pytest.raises(workdir.WorkdirError) as e:
    workdir.write_text(path, 'new contents, longer than the old\n')
  monkeypatch.undo()
  assert 'No space left on device' in str(e.value) and path in str(e.value)
  assert open(path).read() == 'old contents\n'
  assert sorted(os.listdir(tmp_path)) == ['config.json']  # no temporary file left behind


def test_links_are_never_followed(tmp_path):
  outside = tmp_path / 'outside.json'
  outside.write_text('theirs\n')
  run = tmp_path / 'run'
  run.mkdir()
  link = run / 'config.json'
  link.symlink_to(outside)
  with pytest.raises(workdir.WorkdirError, match='symbolic link'):
    workdir.read_text(str(link))
  with pytest.raises(workdir.WorkdirError, match='symbolic link'):
    workdir.write_text(str(link), 'ours\n')
  assert outside.read_text() == 'theirs\n'
  assert workdir.read_text(str(run / 'vocab.json')) is None


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint checksums.

def _state(seed=0):
  rng = np.random.default_rng(seed)
  return {'w': jnp.asarray(rng.normal(size=(7, 5)).astype(np.float32)),
          'b': jnp.asarray(rng.normal(size=(5,)).astype(jnp.bfloat16)),
          'step': jnp.asarray(np.uint32(12)),
          'mu': [jnp.asarray(rng.normal(size=(3, 3)).astype(np.float32))]}


def _checksum(state):
  finite, sums = jax.device_get(checkpoint.fingerprint(state))
  return bool(finite), checkpoint.checksum(sums)


def test_the_checksum_is_a_function_of_the_exact_bits():
  finite, base = _checksum(_state())
  assert finite and base == _checksum(_state())[1]  # deterministic
  rng = np.random.default_rng(1)
  state = _state()
  leaves, treedef = jax.tree.flatten(state)
  for trial in range(40):  # single bit flips anywhere, in every dtype: each changes the checksum
    i = int(rng.integers(len(leaves)))
    x = np.array(leaves[i]).reshape(-1)
    raw = x.view(np.uint8).copy()
    bit = int(rng.integers(raw.size * 8))
    raw[bit // 8] ^= np.uint8(1 << (bit % 8))
    flipped = list(leaves)
    flipped[i] = jnp.asarray(raw.view(x.dtype).reshape(leaves[i].shape))
    assert _checksum(jax.tree.unflatten(treedef, flipped))[1] != base, (trial, i, bit)
  swapped = dict(state, w=state['w'][::-1])  # the same values in another order
  assert _checksum(swapped)[1] != base


def test_the_finiteness_check_sees_nan_and_inf():
  for bad in (np.nan, np.inf):
    state = _state()
    state['mu'] = [state['mu'][0].at[1, 2].set(bad)]
    assert not _checksum(state)[0]


def test_a_checkpoint_that_fails_to_verify_is_renamed_and_the_previous_one_restored(tmp_path):
  directory = str(tmp_path / 'checkpoints')
  states = {s: _state(s) for s in (1, 2)}
  ckpt = checkpoint.Checkpointer(directory, keep=5, async_save=False)
  for s, state in states.items():
    ckpt.save(s, state, None, {'step': s, 'checksum': checkpoint.checksum(jax.device_get(
        checkpoint.fingerprint(state))[1])})
  ckpt.close()
  # Step 2's metadata now claims another checksum (as if its arrays had changed on disk).
  meta = os.path.join(directory, '2', 'meta', 'metadata')
  text = open(meta).read()
  open(meta, 'w').write(text.replace(checkpoint.checksum(jax.device_get(checkpoint.fingerprint(states[2]))[1]),
                                     '0' * 32))
  ckpt = checkpoint.Checkpointer(directory, keep=5, async_save=False)
  step, state, _ = ckpt.restore_latest(checkpoint.abstract(states[1]), None)
  ckpt.close()
  assert step == 1 and ckpt.intact == 1
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(states[1])))
  assert sorted(os.listdir(directory)) == ['1', '2.damaged']
