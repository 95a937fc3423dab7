"""Tests of selattn.sample, the sampling command line: a checkpoint restored from a relative --workdir (as the
README types it) samples what the live state did; the default prompt; one-line errors."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

from flax import nnx
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import tiny
from selattn import checkpoint as ckpt_lib
from selattn import config as config_lib
from selattn import data as data_lib
from selattn import generate
from selattn import sample
from selattn import sharding
from selattn import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = data_lib.Vocab('\n :ABCDEMORabcdefghi')  # 19 symbols
S = 12  # data.seq_len


def _run_cli(*args, cwd, **env):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO, **env)
  return subprocess.run([sys.executable, '-m', 'selattn.sample', *args], capture_output=True, text=True, env=env,
                        cwd=cwd, timeout=120, check=False)


def _make_run(workdir, data_path: str):
  """A run directory as selattn.main leaves it (config.json, vocab.json, a checkpoint at step 5); its live model."""
  c = tiny.get_config('selective')
  c.model.d_model, c.model.num_layers, c.data.seq_len, c.data.path = 16, 2, S, data_path
  cfg = config_lib.from_config(c, VOCAB.size)
  mesh = sharding.make_mesh(cfg.mesh)
  graphdef, state = train.create_state(cfg, mesh)  # eagerly sharded on the mesh, as in training
  ckpt = ckpt_lib.Checkpointer(str(workdir / 'checkpoints'), keep=1)
  ckpt.save(5, state, None, {'step': 5})
  ckpt.close()
  VOCAB.save(str(workdir / 'vocab.json'))
  with open(workdir / 'config.json', 'w') as f:
    json.dump({'config': cfg.to_dict(), 'num_params': 0, 'vocab_size': VOCAB.size}, f)
  return nnx.merge(graphdef, state)[0], cfg, mesh


def test_cli_with_relative_paths(tmp_path):
  # As the README types it: `python -m selattn.sample --workdir runs/quick ...` from the folder the run was made
  # in, whose data.path is relative too. Orbax refuses relative checkpoint paths; sampling must not.
  (tmp_path / 'runs' / 'quick').mkdir(parents=True)
  (tmp_path / 'corpus.txt').write_text('\n  \nROMEO: abc\nDEAR ceb.\n' * 20)
  model, cfg, mesh = _make_run(tmp_path / 'runs' / 'quick', 'corpus.txt')
  with jax.set_mesh(mesh):  # what train.py does at each eval, with the prompt it takes from the corpus
    want = generate.generate(model, VOCAB, 'ROMEO: abc', 20, seed=3, max_len=S)

  res = _run_cli('--workdir', 'runs/quick', '--length', '20', '--seed', '3', cwd=tmp_path)
  assert res.returncode == 0, res.stderr
  text = res.stdout[:-1]  # print's newline
  assert text == want  # the restored checkpoint samples what the live state did, from the corpus's first line
  assert text.startswith('ROMEO: abc') and len(text) == 30
  # --compilation_cache (relative, as typed): the programs go there (every one: no minimum compile time here).
  res = _run_cli('--workdir', 'runs/quick', '--length', '20', '--seed', '3', '--compilation_cache', 'cache',
                 cwd=tmp_path, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  assert res.returncode == 0 and res.stdout[:-1] == want, res.stderr[-3000:]
  assert os.listdir(tmp_path / 'cache')

  res = _run_cli('--workdir', 'runs/missing', '--length', '20', cwd=tmp_path)
  assert res.returncode == 1
  assert res.stderr.strip() == 'error: --workdir=runs/missing: no such directory'
  # Run from elsewhere, the relative corpus is not found: the default prompt cannot be made; --prompt can.
  with pytest.raises(sample.SampleError, match=r'^data.path=corpus.txt: no such file: .* give --prompt$'):
    sample.default_prompt(cfg)
  given = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, sample_prompt='Ab'))
  assert sample.default_prompt(given) == 'Ab'


def test_restore_errors(tmp_path):
  _make_run(tmp_path, '')
  with pytest.raises(sample.SampleError, match='config.json not found'):
    sample.restore(str(tmp_path / 'checkpoints'))
  with pytest.raises(sample.SampleError, match='no checkpoint at step 4 .* steps \\[5\\]'):
    sample.restore(str(tmp_path), step=4)
  empty = tmp_path / 'empty'
  empty.mkdir()
  for name in ('config.json', 'vocab.json'):
    (empty / name).write_text((tmp_path / name).read_text())
  with pytest.raises(sample.SampleError, match='no checkpoint in'):
    sample.restore(str(empty))
  # A vocab.json that is not the run's (one symbol fewer): named in one line, not a shape error from Orbax.
  data_lib.Vocab(VOCAB.chars[1:]).save(str(tmp_path / 'vocab.json'))
  with pytest.raises(sample.SampleError) as e:
    sample.restore(str(tmp_path))
  assert str(e.value) == (f'{tmp_path}/config.json says vocab_size={VOCAB.size} but vocab.json has {VOCAB.size - 1} '
                          'symbols')


def test_a_checkpoint_removed_while_read_falls_back_to_the_latest(tmp_path, monkeypatch):
  # A run in progress keeps its last few checkpoints; sampling from it can pick one the writer then deletes.
  model, cfg, mesh = _make_run(tmp_path, '')
  graphdef, state = nnx.split(model)
  later = jax.tree.map(lambda a: a + 1.0, state)
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / 'checkpoints'), keep=2)
  ckpt.save(9, later, None, {'step': 9})
  ckpt.close()
  restore = ocp.CheckpointManager.restore
  calls = []

  def racing_restore(self, step, *args, **kwargs):
    calls.append(step)
    if len(calls) == 1:  # the writer deletes step 9 (and saves nothing newer) while we read it
      shutil.rmtree(tmp_path / 'checkpoints' / str(step))
      raise FileNotFoundError(f'{step}/state: gone')
    return restore(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, 'restore', racing_restore)
  got, *_ = sample.restore(str(tmp_path))
  assert calls == [9, 5]
  want = nnx.state(model, nnx.Param)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), nnx.state(got, nnx.Param),
               want)

  # A step asked for by name is never swapped for another.
  calls.clear()
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / 'checkpoints'), keep=2)
  ckpt.save(9, later, None, {'step': 9})
  ckpt.close()
  with pytest.raises(FileNotFoundError):
    sample.restore(str(tmp_path), step=9)
  assert calls == [9]
