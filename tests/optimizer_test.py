"""The optimizer against a hand-written numpy AdamW: warmup, cosine decay, decoupled weight decay, clipping.

train_test.py checks the flat optimizer against the per-array one; both come from `train.make_optimizer`, so a
wrong schedule, decay sign or clip threshold is shared and cancels. Here the reference is written out from the
docs (configs/base.py's comments, the AdamW paper's decoupled decay, optax's step-count convention: update k,
counting from 0, uses the learning rate at k) and shares no code with selattn.
"""

from __future__ import annotations

import math

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from selattn import config as config_lib
from selattn import sharding
from selattn import train

# A schedule with every part: 2 warmup steps, cosine decay to a floor, clipping that clips on some steps only.
HYPER = dict(learning_rate=0.1, warmup_steps=2, lr_schedule='cosine', num_steps=7, min_learning_rate=0.01,
             b1=0.8, b2=0.95, weight_decay=0.5, grad_clip=1.0)


def np_learning_rate(k: int, *, learning_rate, warmup_steps, lr_schedule, num_steps, min_learning_rate,
                     lr_decay_steps=0, **_):
  """The rate of update k (k = 0 first): linear warmup from 0 over warmup_steps, then constant or a half cosine
  from learning_rate to min_learning_rate reached at lr_decay_steps (num_steps when 0)."""
  if k < warmup_steps:
    return learning_rate * k / warmup_steps
  if lr_schedule == 'constant':
    return learning_rate
  end = lr_decay_steps or num_steps
  frac = min(k - warmup_steps, end - warmup_steps) / (end - warmup_steps)
  return min_learning_rate + (learning_rate - min_learning_rate) * 0.5 * (1.0 + math.cos(math.pi * frac))


def test_learning_rate_literals():
  # The transcription itself, on values worked out by hand: 0, lr/2, then lr, (lr + min)/2 at the midpoint, min.
  h = dict(HYPER, num_steps=6)  # decay over 4 steps: midpoint at k = 4
  assert [np_learning_rate(k, **h) for k in (0, 1, 2, 4, 6, 9)] == pytest.approx([0, 0.05, 0.1, 0.055, 0.01, 0.01])
  schedule = train.lr_schedule(config_lib.TrainConfig(**h))
  np.testing.assert_allclose([float(schedule(k)) for k in (0, 1, 2, 4, 6, 9)], [0, 0.05, 0.1, 0.055, 0.01, 0.01],
                             rtol=1e-6, atol=1e-9)


def test_a_run_stopped_before_lr_decay_steps_keeps_the_longer_schedule():
  # nanoGPT's lr_decay_iters: 3 steps of a run whose cosine ends at step 6 take the 6-step run's rates, not a
  # decay squeezed into 3 steps (which would reach the floor at step 3).
  short = dict(HYPER, num_steps=3, lr_decay_steps=6)
  assert [np_learning_rate(k, **short) for k in (2, 4, 6)] == pytest.approx([0.1, 0.055, 0.01])
  schedule = train.lr_schedule(config_lib.TrainConfig(**short))
  np.testing.assert_allclose([float(schedule(k)) for k in (0, 1, 2, 3, 4, 6, 9)],
                             [0, 0.05, 0.1, 0.1 - 0.09 * 0.5 * (1 - math.cos(math.pi / 4)), 0.055, 0.01, 0.01],
                             rtol=1e-6, atol=1e-9)
  with pytest.raises(config_lib.ConfigError, match='lr_decay_steps=2 must be 0'):
    config_lib.TrainConfig(**dict(short, lr_decay_steps=2))


class NumpyAdamW:
  """AdamW (Loshchilov & Hutter) on a list of float64 arrays, global-norm clipping first, eps outside the sqrt."""

  def __init__(self, params, hyper, eps=1e-8, decays=None):
    self.h, self.eps, self.k = hyper, eps, 0
    self.decays = [True] * len(params) if decays is None else decays  # which arrays weight decay applies to
    self.p = [np.asarray(x, np.float64).copy() for x in params]
    self.m = [np.zeros_like(x) for x in self.p]
    self.v = [np.zeros_like(x) for x in self.p]

  def global_norm(self, grads) -> float:
    return math.sqrt(sum(float(np.sum(np.square(np.asarray(g, np.float64)))) for g in grads))

  def step(self, grads):
    h = self.h
    grads = [np.asarray(g, np.float64) for g in grads]
    norm = self.global_norm(grads)
    if h['grad_clip'] and norm > h['grad_clip']:
      grads = [g * (h['grad_clip'] / norm) for g in grads]
    lr = np_learning_rate(self.k, **h)
    self.k += 1
    b1, b2 = h['b1'], h['b2']
    for i, g in enumerate(grads):
      self.m[i] = b1 * self.m[i] + (1 - b1) * g
      self.v[i] = b2 * self.v[i] + (1 - b2) * g * g
      m_hat, v_hat = self.m[i] / (1 - b1 ** self.k), self.v[i] / (1 - b2 ** self.k)
      # Decoupled decay: shrinks the parameter itself (scaled by the rate), not added to the gradient.
      wd = h['weight_decay'] if self.decays[i] else 0.0
      self.p[i] = self.p[i] - lr * (m_hat / (np.sqrt(v_hat) + self.eps) + wd * self.p[i])
    return norm


# ----------------------------------------------------------------------------------------------------------------
# make_optimizer alone, on gradients chosen to clip on some steps and not others.

_SHAPES = [(3, 4), (5,), (2, 2, 2)]
_NORMS = [0.3, 2.5, 0.8, 6.0, 1.2, 0.1, 3.0, 0.9]  # clip = 1: steps 2, 4, 5, 7 clip


def _grads(rng, norm):
  g = [rng.normal(size=s) for s in _SHAPES]
  scale = norm / math.sqrt(sum(np.sum(x * x) for x in g))
  return [x * scale for x in g]


@pytest.mark.parametrize('flat,mask', [(False, 'all'), (True, 'all'), (False, 'matrices')])
@pytest.mark.parametrize('hyper', [HYPER, dict(HYPER, lr_schedule='constant', grad_clip=0.0, warmup_steps=3),
                                   dict(HYPER, warmup_steps=0, grad_clip=2.0, min_learning_rate=0.0),
                                   dict(HYPER, num_steps=5, lr_decay_steps=9)],
                         ids=['warmup_cosine_clip', 'warmup_constant', 'cosine_clip2', 'decay_past_the_end'])
def test_make_optimizer_matches_numpy_adamw(flat, mask, hyper):
  rng = np.random.default_rng(0)
  params0 = [rng.normal(size=s) for s in _SHAPES]
  tx = train.make_optimizer(config_lib.TrainConfig(flat_optimizer=flat, weight_decay_mask=mask, **hyper))
  params = {str(i): jnp.asarray(p, jnp.float32) for i, p in enumerate(params0)}
  state = tx.init(params)
  # 'matrices' (nanoGPT's rule): arrays of 2 or more dimensions decay, vectors (biases, norm scales) do not.
  ref = NumpyAdamW(params0, hyper, decays=[mask == 'all' or len(s) >= 2 for s in _SHAPES])
  clipped = 0
  for norm in _NORMS:  # 8 steps: past num_steps = 7, where the cosine has reached its floor
    g = _grads(rng, norm)
    clipped += bool(hyper['grad_clip']) and norm > hyper['grad_clip']
    ref.step(g)
    updates, state = tx.update({str(i): jnp.asarray(x, jnp.float32) for i, x in enumerate(g)}, state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
    for i, p in enumerate(ref.p):
      np.testing.assert_allclose(params[str(i)], p, rtol=2e-5, atol=2e-6, err_msg=f'step {ref.k}, array {i}')
  assert clipped >= 2 or not hyper['grad_clip']
  # The parameters really moved (by ~lr per step): a no-op optimizer would fail above, this documents the scale.
  assert max(np.abs(p - q).max() for p, q in zip(ref.p, params0)) > 0.1


# ----------------------------------------------------------------------------------------------------------------
# The jitted train step end to end: the gradients of the mean next-character NLL, written here, then numpy AdamW.

def _train_cfg(flat):
  c = tiny.get_config()
  t = c.train
  t.flat_optimizer, t.steps_per_call, t.log_every, t.eval_every, t.checkpoint_every = flat, 3, 3, 0, 3
  t.learning_rate, t.warmup_steps, t.lr_schedule, t.num_steps, t.min_learning_rate = 0.01, 2, 'cosine', 6, 0.001
  t.weight_decay, t.grad_clip, t.b1, t.b2 = 0.5, 0.36, 0.8, 0.95  # norms run ~0.41 -> 0.32
  c.model.attention = 'standard'  # the attention is model_test's business; standard compiles fastest
  c.model.num_layers = 1
  return config_lib.from_config(c, 17)


@pytest.mark.parametrize('flat', [False, True], ids=['per_array', 'flat'])
def test_train_step_matches_numpy_adamw_on_the_model_gradients(flat):
  cfg = _train_cfg(flat)
  hyper = {k: getattr(cfg.train, k) for k in HYPER}
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  graphdef, state = train.create_state(cfg, mesh)
  model = nnx.merge(graphdef, state)[0]
  model_def, params, rest = nnx.split(model, nnx.Param, ...)
  params0 = [np.asarray(x) for x in jax.tree.leaves(params)]
  treedef = jax.tree.structure(params)

  def mean_nll(params, inputs, targets):
    logits = nnx.merge(model_def, params, rest)(inputs)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))

  grad_fn = jax.jit(jax.value_and_grad(mean_nll))
  steps = train.build_steps(cfg, mesh, graphdef, state)
  rng = np.random.default_rng(3)
  ref = NumpyAdamW(params0, hyper)
  norms = []
  with jax.set_mesh(mesh):
    for _ in range(2):  # 2 calls of 3 steps: warmup, then the cosine down to its floor at step 6
      host = []
      for _ in range(3):
        tokens = rng.integers(0, 17, (16, 33)).astype(np.int32)
        host.append({'inputs': tokens[:, :-1], 'targets': tokens[:, 1:]})
      losses = []
      for b in host:
        params_now = jax.tree.unflatten(treedef, [jnp.asarray(p, jnp.float32) for p in ref.p])
        loss, g = grad_fn(params_now, b['inputs'], b['targets'])
        losses.append(float(loss))
        norms.append(ref.step(jax.tree.leaves(g)))
      state, metrics = steps.train(state, steps.train_batches(host))
      np.testing.assert_allclose(float(metrics['loss']), np.mean(losses), rtol=1e-5)
      np.testing.assert_allclose(float(metrics['grad_norm']), np.mean(norms[-3:]), rtol=1e-4)
  assert min(norms) < cfg.train.grad_clip < max(norms), norms  # clipping clips on some steps, not on all
  got = jax.tree.leaves(nnx.state(nnx.merge(graphdef, state)[0], nnx.Param))
  moved = max(np.abs(p - q).max() for p, q in zip(ref.p, params0))
  assert moved > 0.02, moved
  for i, (g, r) in enumerate(zip(got, ref.p)):
    # float32 vs float64 gradients: Adam's normalised step amplifies rounding only where the gradient is ~0.
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=2e-5, err_msg=f'parameter {i}')


def test_dropout_masks_change_every_step():
  # With a learning rate too small to move float32 parameters, the step losses on one repeated batch differ only
  # through the dropout masks: a fresh mask each step, and none at all with dropout 0.
  losses = {}
  for rate in (0.0, 0.2):
    c = tiny.get_config()
    c.model.attention, c.model.num_layers, c.model.dropout = 'standard', 1, rate
    c.train.learning_rate, c.train.steps_per_call, c.train.weight_decay = 1e-20, 1, 0.0
    cfg = config_lib.from_config(c, 17)
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
    graphdef, state = train.create_state(cfg, mesh)
    steps = train.build_steps(cfg, mesh, graphdef, state)
    tokens = np.random.default_rng(4).integers(0, 17, (16, 33)).astype(np.int32)
    batch = [{'inputs': tokens[:, :-1], 'targets': tokens[:, 1:]}]
    losses[rate] = []
    with jax.set_mesh(mesh):
      for _ in range(3):
        state, metrics = steps.train(state, steps.train_batches(batch))
        losses[rate].append(float(metrics['loss']))
  assert max(losses[0.0]) - min(losses[0.0]) < 1e-6, losses  # the parameters really stay put
  a, b, c_ = losses[0.2]
  assert min(abs(a - b), abs(b - c_), abs(a - c_)) > 1e-4, losses
