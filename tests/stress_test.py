"""Stress: kill a run with SIGKILL at 50 random moments, resume it each time, and check that the final state and
the logged losses are those of an uninterrupted run, bit for bit.

Slow (minutes), so not in the default run: `python -m pytest -q -m slow tests/stress_test.py`. STRESS_KILLS and
STRESS_SEED in the environment change the number of kills (default 50) and the random moments.
"""

import json
import os
import pathlib
import random
import re
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from run_files import checkpoint_steps, scalars

REPO = pathlib.Path(__file__).resolve().parent.parent
STEPS = 1500
# A checkpoint every 5 steps and a loss logged every 4: kills land in saves, and in logging windows that a
# checkpoint splits (the loss logged after a resume must still average the whole window).
FLAGS = ['--config', 'configs/tiny.py', f'--config.train.num_steps={STEPS}', '--config.train.checkpoint_every=5',
         '--config.train.log_every=4', '--config.train.eval_every=500', '--config.train.sample_length=0',
         '--config.train.keep_checkpoints=2']


def _env(cache_dir):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO), JAX_COMPILATION_CACHE_DIR=str(cache_dir),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0', JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  for cluster in ('SLURM_JOB_ID', 'OMPI_COMM_WORLD_SIZE', 'JAX_COORDINATOR_ADDRESS'):
    env.pop(cluster, None)
  return env


def _start(workdir, log, cache_dir):
  with open(log, 'w') as f:
    return subprocess.Popen([sys.executable, '-m', 'selattn.main', *FLAGS, f'--workdir={workdir}'], cwd=REPO,
                            env=_env(cache_dir), stdout=subprocess.DEVNULL, stderr=f)


def _run_to_the_end(workdir, log, cache_dir):
  """The uninterrupted run (it also fills the compilation cache)."""
  proc = _start(workdir, log, cache_dir)
  assert proc.wait() == 0, open(log).read()[-3000:]


def _final_state(workdir):
  """(step, every array of the latest checkpoint's train state as numpy, its metadata)."""
  step = checkpoint_steps(workdir)[-1]
  manager = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'))
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                           meta=ocp.args.JsonRestore()))
  manager.close()
  return step, [np.asarray(x) for x in jax.tree.leaves(restored['state'])], restored['meta']


@pytest.mark.slow
def test_kills_at_random_moments_change_nothing(tmp_path):
  kills = int(os.environ.get('STRESS_KILLS', '50'))
  rng = random.Random(int(os.environ.get('STRESS_SEED', '0')))
  cache = tmp_path / 'jax_cache'
  reference, stressed = str(tmp_path / 'reference'), str(tmp_path / 'stressed')
  _run_to_the_end(reference, str(tmp_path / 'reference.log'), cache)
  # Kill moments, half in each phase: during start-up (imports, restore, file writes, compilation), uniform up to
  # the time the loop last took to start; or in the loop, uniform in its first 3 s (checkpoints are saved every
  # few tens of milliseconds). A cycle gains a few tens of steps at most: the run is unfinished after the last kill.
  startup = 15.0  # until measured: the compilation cache makes the first start slower
  outcomes = []
  for i in range(kills):
    log = str(tmp_path / f'kill_{i}.log')
    in_loop = rng.random() < 0.5
    delay = rng.uniform(0, 3.0 if in_loop else startup)
    start = time.monotonic()
    proc = _start(stressed, log, cache)
    looping_at = None
    while proc.poll() is None:
      if looping_at is None and 'training from step' in open(log).read():
        looping_at = time.monotonic() - start
        startup = looping_at
      due = start + delay if not in_loop else None if looping_at is None else start + looping_at + delay
      if due is not None and time.monotonic() >= due:
        break
      time.sleep(0.01)
    if proc.poll() is None:
      proc.kill()
    rc = proc.wait()
    text = open(log).read()
    assert rc in (0, -9), f'cycle {i} (killed after {delay:.2f} s) exited {rc}:\n{text[-3000:]}'
    assert 'Traceback' not in text and 'error:' not in text, f'cycle {i}:\n{text[-3000:]}'
    resumed = re.findall(r'resumed from .* at step (\d+)', text)
    outcomes.append((round(delay, 2), 'loop' if looping_at is not None else 'startup',
                     int(resumed[0]) if resumed else 0, rc))
  reached = checkpoint_steps(stressed)
  print(f'{kills} kills (delay s, where, resumed from step, exit status): {outcomes}')
  print(f'{sum(o[1] == "loop" for o in outcomes)} kills in the training loop, '
        f'{sum(o[1] == "startup" for o in outcomes)} before it')
  print(f'checkpoints after the kills: {reached}')
  finished = subprocess.run([sys.executable, '-m', 'selattn.main', *FLAGS, f'--workdir={stressed}'], cwd=REPO,
                            env=_env(cache), capture_output=True, text=True, timeout=600)
  assert finished.returncode == 0, finished.stderr[-3000:]

  # Nothing damaged, nothing left half-written.
  names = os.listdir(os.path.join(stressed, 'checkpoints'))
  assert all(n.isdigit() for n in names), names
  assert not [n for n in os.listdir(stressed) if '.tmp' in n]
  for name in ('config.json', 'vocab.json'):
    json.loads(pathlib.Path(stressed, name).read_text())
  # The final state, bit for bit.
  (ref_step, ref_arrays, ref_meta), (step, arrays, meta) = _final_state(reference), _final_state(stressed)
  assert step == ref_step == STEPS
  assert len(arrays) == len(ref_arrays)
  assert all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(arrays, ref_arrays))
  assert meta['checksum'] == ref_meta['checksum']
  # Every logged loss and eval: the later file wins a step that two runs logged (the same value, checked).
  for tag in ('train/loss', 'eval/loss'):
    want, got = scalars(reference, tag), scalars(stressed, tag)
    assert sorted(got) == sorted(want) and got == want, tag
  print(f'final state at step {step} matches the uninterrupted run bit for bit ({len(arrays)} arrays); '
        f'{len(scalars(stressed))} logged losses match')
