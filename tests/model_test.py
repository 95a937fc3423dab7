"""The model family: selective implementations agree, standard matches Flax's MHA, causality, init, configs.

Every fast path is compared with the literal computation on fresh random inputs and weights, after checking
(on the jaxprs) that the two are really different code paths.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from typing import Any

import jax
import jax.extend  # jax.extend.core.Jaxpr / ClosedJaxpr, to walk nested jaxprs
import jax.numpy as jnp
import jaxtyping
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from selattn import config as config_lib
from selattn.config import ModelConfig
from selattn.model import Transformer, count_params
from selattn.model import attention as attn_lib
from selattn.model import rope as rope_lib

pytestmark = pytest.mark.usefixtures('no_mesh')  # conftest.py: parameters created unsharded, without a mesh

IMPLS = ('materialized', 'blockwise', 'factored')


# ----------------------------------------------------------------------------------------------------------------
# Helpers.

def _rel(got, ref) -> float:
  """max |got - ref| / max |ref| (0 when both are exactly zero)."""
  got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
  assert got.shape == ref.shape, (got.shape, ref.shape)
  err, scale = np.abs(got - ref).max(initial=0.0), np.abs(ref).max(initial=0.0)
  return 0.0 if err == 0.0 else err / scale


def _assert_trees_close(got, ref, tol, what=''):
  got_leaves = jax.tree_util.tree_flatten_with_path(got)[0]
  ref_leaves = jax.tree_util.tree_flatten_with_path(ref)[0]
  assert [p for p, _ in got_leaves] == [p for p, _ in ref_leaves]
  assert got_leaves, 'nothing to compare'
  overall = max(np.abs(np.asarray(r)).max() for _, r in ref_leaves)
  assert overall > 0, f'{what}: reference is all zero'
  for (path, g), (_, r) in zip(got_leaves, ref_leaves):
    # A leaf whose reference is exactly zero (W_k at T=1: one key, the softmax is constant) must be ~zero too.
    err = _rel(g, r) if np.abs(np.asarray(r)).max() > 0 else np.abs(np.asarray(g)).max() / overall
    assert err <= tol, f'{what}{jax.tree_util.keystr(path)}: relative error {err:.2e} > {tol:.0e}'


def _shapes(tree):
  """[(path, shape, dtype)] of every leaf: the structure of a parameter tree, without its values."""
  return [(jax.tree_util.keystr(p), tuple(x.shape), jnp.dtype(x.dtype))
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _subjaxprs(value):
  if isinstance(value, jax.extend.core.ClosedJaxpr):
    return [value.jaxpr]
  if isinstance(value, jax.extend.core.Jaxpr):
    return [value]
  if isinstance(value, (tuple, list)):
    return [j for v in value for j in _subjaxprs(v)]
  return []


def _eqns(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in _subjaxprs(value):
        yield from _eqns(sub)


def _jaxpr_facts(fn, *args):
  """(primitive names, shapes of all intermediates) of fn's jaxpr, nested jaxprs (scan, cond, remat) included."""
  closed = jax.make_jaxpr(fn)(*args)
  prims, shapes = set(), set()
  for eqn in _eqns(closed.jaxpr):
    prims.add(eqn.primitive.name)
    shapes.update(tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, 'shape'))
  return prims, shapes


_LOOPS = {'scan', 'while'}


def _assert_code_paths(impl, prims, shapes, *, b, t, n, h, block_q, block_k):
  """The impls really are different computations: only blockwise loops, only factored has no 5-D array."""
  five_d = {s for s in shapes if len(s) == 5}
  full = (b, t, t, n, h)  # the literal K/V: [B, T, S, N, H]
  tile = (b, min(block_q, t), min(block_k, t), n, h)
  if impl == 'materialized':
    assert not prims & _LOOPS, prims
    assert full in five_d, five_d
  elif impl == 'blockwise':
    assert prims & _LOOPS, prims
    assert 'cond' in prims, prims  # above-diagonal tiles are skipped
    assert tile in five_d, five_d  # the K/V tiles are [B, block_q, block_k, N, H] ...
    if t > max(block_q, block_k):
      assert full not in five_d, five_d  # ... and the whole [B, T, S, N, H] never exists
  elif impl == 'factored':
    assert not prims & _LOOPS, prims
    assert not five_d, five_d
  else:
    raise AssertionError(impl)


def _cfg(**kw) -> ModelConfig:
  base = dict(vocab_size=13, d_model=16, num_heads=2, num_layers=2, block_q=4, block_k=3)
  base.update(kw)
  return ModelConfig(**base)


def _split_call(module):
  """A pure function (params, *args, **kwargs) -> module(*args, **kwargs), and the module's params."""
  graphdef, params = nnx.split(module)

  def call(params, *args, **kwargs):
    return nnx.merge(graphdef, params)(*args, **kwargs)

  return call, params


# ----------------------------------------------------------------------------------------------------------------
# Selective attention: materialized, blockwise and factored compute the same function and the same gradients.

# RoPE on and off, each with every head count and T = 1; T = 11 is a multiple of neither block_q = 4 nor
# block_k = 3, so both the query and the key tiles are padded.
_ATTN_CASES = [(True, 1, 11), (True, 2, 1), (True, 4, 11), (False, 1, 1), (False, 2, 11), (False, 4, 11)]


def _attention_agreement(cfg, seed, impls, b=2, t=11):
  """Checks that `impls` are different code paths, then that outputs and grads (params and x) agree to 1e-5."""
  module = attn_lib.SelectiveAttention(cfg, rngs=nnx.Rngs(seed))
  call, params = _split_call(module)
  kx, kw = jax.random.split(jax.random.key(seed + 1000))
  x = jax.random.normal(kx, (b, t, cfg.d_model), jnp.float32)
  w = jax.random.normal(kw, (b, t, cfg.d_model), jnp.float32)
  positions = jnp.arange(t, dtype=jnp.int32)

  def loss(params, x, impl):
    out = call(params, x, positions, impl=impl)
    assert out.shape == (b, t, cfg.d_model) and out.dtype == jnp.float32
    return jnp.sum(jnp.sin(out) * w), out

  for impl in impls:
    prims, shapes = _jaxpr_facts(functools.partial(call, impl=impl), params, x, positions)
    _assert_code_paths(impl, prims, shapes, b=b, t=t, n=cfg.num_heads, h=cfg.head_dim, block_q=cfg.block_q,
                       block_k=cfg.block_k)

  @jax.jit  # one compilation for all impls
  def outputs_and_grads(params, x):
    results = {}
    for impl in impls:
      (_, out), (g_params, g_x) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x, impl)
      results[impl] = (out, g_params, g_x)
    return results

  results = outputs_and_grads(params, x)

  ref_out, ref_gp, ref_gx = results[impls[0]]
  assert np.all(np.isfinite(ref_out)) and np.abs(ref_out).max() > 0
  for impl in impls[1:]:
    out, g_params, g_x = results[impl]
    assert _rel(out, ref_out) <= 1e-5, (impl, _rel(out, ref_out))
    assert _rel(g_x, ref_gx) <= 1e-5, (impl, _rel(g_x, ref_gx))
    _assert_trees_close(g_params, ref_gp, 1e-5, what=f'{impl} grad ')
  return results


@pytest.mark.parametrize('seed,rope,n,t', [(i, *c) for i, c in enumerate(_ATTN_CASES)])
def test_selective_impls_agree(seed, rope, n, t):
  cfg = _cfg(num_heads=n, rope=rope)
  _attention_agreement(cfg, seed, IMPLS, t=t)


@pytest.mark.parametrize('seed,rope,t', [(100, True, 11), (101, False, 11), (102, True, 1)])
def test_selective_mlp_materialized_vs_blockwise(seed, rope, t):
  cfg = _cfg(kv_generator='mlp', kv_hidden=24, rope=rope)
  _attention_agreement(cfg, seed, ('materialized', 'blockwise'), t=t)


def test_selective_factored_refuses_mlp_generator():
  module = attn_lib.SelectiveAttention(_cfg(kv_generator='mlp', kv_hidden=8), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='kv_generator'):
    module(jnp.zeros((1, 3, 16)), jnp.arange(3), impl='factored')


# ----------------------------------------------------------------------------------------------------------------
# Whole model: one parameter tree for every selective impl; same logits and same loss gradients.

def _xent(logits, targets):
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


@pytest.mark.parametrize('seed,kv,rope', [(200, 'linear', True), (201, 'linear', False), (202, 'mlp', True)])
def test_transformer_selective_impls_agree(seed, kv, rope):
  impls = IMPLS if kv == 'linear' else ('materialized', 'blockwise')
  b, t = 2, 11
  cfgs = {impl: _cfg(attention='selective', selective_impl=impl, kv_generator=kv, kv_hidden=24, rope=rope,
                     num_layers=1)
          for impl in impls}
  # Different seeds, then one parameter state copied into all: the trees must match exactly.
  models = {impl: Transformer(cfg, rngs=nnx.Rngs(seed + 10 * i)) for i, (impl, cfg) in enumerate(cfgs.items())}
  ref_state = nnx.state(models[impls[0]], nnx.Param)
  for impl in impls[1:]:
    state = nnx.state(models[impl], nnx.Param)
    assert jax.tree.structure(state) == jax.tree.structure(ref_state)
    assert _shapes(state) == _shapes(ref_state)
    assert _rel(state['head']['kernel'][...], ref_state['head']['kernel'][...]) > 0.1  # really another init
    nnx.update(models[impl], ref_state)
    _assert_trees_close(nnx.state(models[impl], nnx.Param), ref_state, 0.0)

  tokens = jax.random.randint(jax.random.key(seed), (b, t + 1), 0, cfgs[impls[0]].vocab_size)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  calls = {impl: _split_call(models[impl])[0] for impl in impls}
  for impl in impls:
    prims, shapes = _jaxpr_facts(calls[impl], ref_state, inputs)
    _assert_code_paths(impl, prims, shapes, b=b, t=t, n=2, h=8, block_q=4, block_k=3)

  @jax.jit  # one compilation for all impls
  def losses_and_grads(params):
    results = {}
    for impl in impls:
      def loss(params, call=calls[impl]):
        logits = call(params, inputs)
        return _xent(logits, targets), logits
      (value, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
      results[impl] = (value, logits, grads)
    return results

  results = losses_and_grads(ref_state)
  for impl in impls:
    assert results[impl][1].shape == (b, t, cfgs[impl].vocab_size) and results[impl][1].dtype == jnp.float32

  ref_value, ref_logits, ref_grads = results[impls[0]]
  assert np.isfinite(ref_value)
  for impl in impls[1:]:
    value, logits, grads = results[impl]
    assert _rel(value, ref_value) <= 1e-5, impl
    assert _rel(logits, ref_logits) <= 1e-5, (impl, _rel(logits, ref_logits))
    _assert_trees_close(grads, ref_grads, 1e-5, what=f'{impl} grad ')


def test_selective_impl_auto_resolves():
  assert _cfg().impl == 'factored'
  assert _cfg(kv_generator='mlp').impl == 'blockwise'
  assert _cfg(selective_impl='materialized').impl == 'materialized'


# ----------------------------------------------------------------------------------------------------------------
# Standard attention (RoPE off) is Flax's nnx.MultiHeadAttention with the same Q/K/V weights and an identity output.

@pytest.mark.parametrize('seed,n', [(300, 1), (301, 4)])
def test_standard_attention_matches_flax_mha(seed, n):
  b, t, d = 2, 9, 16
  h = d // n
  std = attn_lib.StandardAttention(_cfg(attention='standard', num_heads=n, rope=False), rngs=nnx.Rngs(seed))
  mha = nnx.MultiHeadAttention(num_heads=n, in_features=d, qkv_features=d, out_features=d, use_bias=False,
                               decode=False, deterministic=True, rngs=nnx.Rngs(seed + 1))
  for name, w in (('query', std.wq), ('key', std.wk), ('value', std.wv)):
    kernel = getattr(mha, name).kernel
    assert kernel.shape == (d, n, h)
    kernel[...] = w.kernel[...].reshape(d, n, h)
  assert mha.out.kernel.shape == (n, h, d)
  mha.out.kernel[...] = jnp.eye(d).reshape(n, h, d)

  x = jax.random.normal(jax.random.key(seed), (b, t, d))
  pos = jnp.arange(t)
  mask = jnp.tril(jnp.ones((t, t), bool))[None, None]
  got, ref = std(x, pos), mha(x, mask=mask)
  assert got.shape == ref.shape == (b, t, d)
  assert _rel(got, ref) <= 1e-5, _rel(got, ref)
  # ... and the comparison can fail: with another output projection Flax's MHA is another function.
  mha.out.kernel[...] = mha.out.kernel[...].at[0, 0, 0].add(1.0)
  assert _rel(mha(x, mask=mask), got) > 1e-2


def test_reference_attention_is_flax_mha():
  cfg = _cfg(attention='reference', rope=False)
  ref = attn_lib.ReferenceAttention(cfg, rngs=nnx.Rngs(0))
  assert isinstance(ref.mha, nnx.MultiHeadAttention)
  x = jax.random.normal(jax.random.key(1), (2, 7, 16))
  mask = jnp.tril(jnp.ones((7, 7), bool))[None, None]
  np.testing.assert_array_equal(ref(x, jnp.arange(7)), ref.mha(x, mask=mask))


# ----------------------------------------------------------------------------------------------------------------
# Causality: the loss at position t does not depend on the inputs after t (and does on every input up to t).

def _layers_and_head(model: Transformer, x):
  """Transformer.__call__ after the embedding lookup, on a continuous input x [B, T, D]."""
  positions = jnp.arange(x.shape[1], dtype=jnp.int32)
  for layer in model.layers:
    x = layer(x, positions, True, None)
  return model.head(x).astype(jnp.float32)


def test_layers_and_head_is_the_model():
  """The causality test's helper computes exactly what Transformer.__call__ computes after the embedding."""
  model = Transformer(_cfg(attention='standard', num_layers=2, rope=False), rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 11), 0, 13)
  graphdef, params = nnx.split(model)

  @jax.jit
  def both(params):
    m = nnx.merge(graphdef, params)
    return _layers_and_head(m, m.embed(tokens)), m(tokens)

  got, ref = both(params)
  np.testing.assert_array_equal(got, ref)


_CAUSAL_CASES = ([('standard', 'auto', 'linear', rope) for rope in (True, False)]
                 + [('selective', impl, 'linear', rope) for impl in IMPLS for rope in (True, False)]
                 + [('selective', impl, 'mlp', rope) for impl in ('materialized', 'blockwise')
                    for rope in (True, False)]
                 + [('reference', 'auto', 'linear', False)])


@pytest.mark.parametrize('seed,attention,impl,kv,rope', [(400 + i, *c) for i, c in enumerate(_CAUSAL_CASES)])
def test_causality(seed, attention, impl, kv, rope):
  b, t = 2, 11
  cfg = _cfg(attention=attention, selective_impl=impl, kv_generator=kv, kv_hidden=24, rope=rope, num_layers=1)
  model = Transformer(cfg, rngs=nnx.Rngs(seed))
  tokens = jax.random.randint(jax.random.key(seed), (b, t + 1), 0, cfg.vocab_size)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  x = model.embed(inputs)
  graphdef, params = nnx.split(model)

  def losses(x):  # [B, T]: the loss of each sequence at each position
    logits = _layers_and_head(nnx.merge(graphdef, params), x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets)

  jac = np.asarray(jax.jit(jax.jacrev(losses))(x))  # [B, T, B, T, D]
  assert jac.shape == (b, t, b, t, cfg.d_model)
  dep = np.abs(jac).max(-1)  # [B, T, B, T]: does loss (b, t) depend on input (b', s)?
  same_seq = np.eye(b, dtype=bool)[:, None, :, None]
  past = (np.arange(t)[:, None] >= np.arange(t)[None, :])[None, :, None, :]
  assert np.all(dep[~(same_seq & past)] == 0), 'a loss depends on a later position or another sequence'
  assert np.all(dep[np.broadcast_to(same_seq & past, dep.shape)] > 0), 'a loss ignores a visible position'


# ----------------------------------------------------------------------------------------------------------------
# The original's parameter counts and initialisers.

@pytest.mark.parametrize('attention,expected', [('standard', 191_955), ('selective', 224_723),
                                                ('reference', 208_339)])
def test_param_counts_match_the_original(attention, expected):
  model = Transformer(ModelConfig(vocab_size=83, attention=attention), rngs=nnx.Rngs(0))
  assert count_params(model) == expected


def test_param_counts_are_the_same_for_every_selective_impl():
  counts = {impl: count_params(Transformer(ModelConfig(vocab_size=83, selective_impl=impl), rngs=nnx.Rngs(0)))
            for impl in IMPLS}
  assert set(counts.values()) == {224_723}, counts


def _linears(model):
  for path, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Linear):
      yield path, node, node.in_features
    elif isinstance(node, nnx.LinearGeneral):  # the reference attention's projections
      yield path, node, math.prod(node.in_features)


@pytest.mark.parametrize('attention,kv', [('standard', 'linear'), ('selective', 'linear'), ('selective', 'mlp'),
                                          ('reference', 'linear')])
def test_init_distributions(attention, kv):
  model = Transformer(ModelConfig(vocab_size=83, attention=attention, kv_generator=kv), rngs=nnx.Rngs(0))
  linears = list(_linears(model))
  assert len(linears) >= 4 * 3 + 1
  for path, lin, fan_in in linears:
    bound = 1.0 / math.sqrt(fan_in)
    w = np.asarray(lin.kernel[...]).ravel()
    assert lin.kernel[...].dtype == jnp.float32
    assert np.abs(w).max() <= bound, (path, np.abs(w).max(), bound)
    if w.size >= 1024:
      assert np.abs(w).max() > 0.9 * bound, (path, np.abs(w).max(), bound)
      # Uniform(-b, b) has std b / sqrt(3) (a normal or truncated normal of the same bound would not).
      assert abs(w.std() / (bound / math.sqrt(3)) - 1) < 0.1, (path, w.std(), bound)
      assert abs(w.mean()) < 0.1 * bound, path
    bias = getattr(lin, 'bias', None)
    if bias is not None and bias[...] is not None:
      b = np.asarray(bias[...])
      assert np.abs(b).max() <= bound and b.std() > 0.2 * bound, (path, b)

  emb = np.asarray(model.embed.embedding[...])
  assert emb.shape == (83, 64)
  assert abs(emb.std() - 1.0) < 0.1 and abs(emb.mean()) < 0.1, (emb.mean(), emb.std())

  norms = [node for _, node in nnx.iter_graph(model) if isinstance(node, nnx.LayerNorm)]
  assert len(norms) == 2 * 4
  for norm in norms:
    np.testing.assert_array_equal(norm.scale[...], np.ones(64, np.float32))
    np.testing.assert_array_equal(norm.bias[...], np.zeros(64, np.float32))


# ----------------------------------------------------------------------------------------------------------------
# Blockwise memory: bounded by tiles, not by T x S.

def test_blockwise_uses_far_less_memory_than_materialized():
  b, t, d, n = 2, 1024, 64, 2
  temp = {}
  for impl in ('materialized', 'blockwise'):
    cfg = ModelConfig(vocab_size=8, d_model=d, num_heads=n, block_q=128, block_k=128, selective_impl=impl)
    call, params = _split_call(attn_lib.SelectiveAttention(cfg, rngs=nnx.Rngs(0)))
    positions = jnp.arange(t, dtype=jnp.int32)

    def loss(params, x, call=call, positions=positions):
      return jnp.sum(jnp.sin(call(params, x, positions)))

    x = jax.ShapeDtypeStruct((b, t, d), jnp.float32)
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile()
    temp[impl] = compiled.memory_analysis().temp_size_in_bytes
  literal_kv = 2 * b * t * t * d * 4  # K and V, float32
  assert temp['materialized'] >= literal_kv, temp
  assert temp['blockwise'] * 8 <= temp['materialized'], temp


# ----------------------------------------------------------------------------------------------------------------
# Bad configs: a ValueError naming the key.

@pytest.mark.parametrize('kw,keys', [
    (dict(d_model=65, num_heads=2), ('model.d_model', 'model.num_heads')),
    (dict(d_model=6, num_heads=2, positions='rope'), ('model.positions',)),
    (dict(attention='linformer'), ('model.attention',)),
    (dict(selective_impl='flash'), ('model.selective_impl',)),
    (dict(selective_impl='factored', kv_generator='mlp'), ('model.selective_impl', 'mlp')),
    (dict(kv_generator='rnn'), ('model.kv_generator',)),
    (dict(dtype='float16'), ('model.dtype',)),
])
def test_bad_model_config_names_the_key(kw, keys):
  with pytest.raises(ValueError) as info:
    ModelConfig(vocab_size=83, **kw)
  assert isinstance(info.value, config_lib.ConfigError)
  assert '\n' not in str(info.value)
  for key in keys:
    assert key in str(info.value)


def test_good_model_configs_are_accepted():
  ModelConfig(vocab_size=83, d_model=6, num_heads=2, rope=False)  # odd head dim is fine without RoPE
  ModelConfig(vocab_size=83, d_model=6, num_heads=2, attention='reference')  # the reference has no RoPE
  ModelConfig(vocab_size=83, selective_impl='blockwise', kv_generator='mlp')


@pytest.mark.parametrize('as_configdict', [False, True])
def test_from_config_rejects_unknown_key(as_configdict):
  good = {'model': {'d_model': 32, 'num_heads': 4}, 'train': {'batch_size': 8}}
  bad = {'model': {'d_model': 32, 'num_heads': 4, 'head_count': 4}}
  if as_configdict:
    good, bad = ml_collections.ConfigDict(good), ml_collections.ConfigDict(bad)
  cfg = config_lib.from_config(good, vocab_size=83)
  assert cfg.model.d_model == 32 and cfg.model.vocab_size == 83 and cfg.train.batch_size == 8
  with pytest.raises(ValueError, match='head_count'):
    config_lib.from_config(bad, vocab_size=83)
  with pytest.raises(ValueError, match='model.d_model'):
    config_lib.from_config({'model': {'d_model': 30, 'num_heads': 4}}, vocab_size=83)


# ----------------------------------------------------------------------------------------------------------------
# bfloat16 compute, float32 parameters.

def test_bfloat16_compute():
  b, t = 2, 16
  cfgs = {impl: _cfg(d_model=32, num_heads=2, dtype='bfloat16', selective_impl=impl)
          for impl in ('factored', 'materialized')}
  model = Transformer(cfgs['factored'], rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  tokens = jax.random.randint(jax.random.key(1), (b, t), 0, 13)
  logits = {}
  for name, cfg in cfgs.items():
    call, _ = _split_call(Transformer(cfg, rngs=nnx.Rngs(1)))
    logits[name] = jax.jit(call)(params, tokens)
    assert logits[name].shape == (b, t, 13) and logits[name].dtype == jnp.float32
    assert np.all(np.isfinite(logits[name])), name
  assert _rel(logits['materialized'], logits['factored']) <= 2e-2
  # It really computes in bfloat16: every matmul (projections, attention, FFN, head) takes bfloat16 operands.
  call, _ = _split_call(model)
  dots = [eqn for eqn in _eqns(jax.make_jaxpr(call)(params, tokens).jaxpr) if eqn.primitive.name == 'dot_general']
  assert len(dots) >= 8
  assert all(v.aval.dtype == jnp.bfloat16 for eqn in dots for v in eqn.invars), [
      [v.aval.dtype for v in eqn.invars] for eqn in dots]

  # Activations are bfloat16, gradients of the float32 params float32 (shapes and dtypes only: no compute).
  x = jax.ShapeDtypeStruct((b, t, 32), jnp.float32)
  attn = attn_lib.SelectiveAttention(cfgs['factored'], rngs=nnx.Rngs(3))
  for impl in IMPLS:
    assert jax.eval_shape(lambda x, impl=impl: attn(x, jnp.arange(t), impl=impl), x).dtype == jnp.bfloat16
  grads = jax.eval_shape(nnx.grad(lambda m: jnp.sum(m(tokens))), model)
  assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}


# ----------------------------------------------------------------------------------------------------------------
# Shapes, checked at run time against the jaxtyping annotations of attention.py.
#
# Neither beartype nor typeguard is installed, so the checker handed to `jaxtyping.jaxtyped` is the smallest one
# that works: isinstance against each annotated class. Inside `jaxtyped`, jaxtyping's isinstance binds the
# dimension names (B, T, S, N, H, ...) across the arguments and the return value of one call.

def _isinstance_typechecker(fn):
  signature = inspect.signature(fn)

  def check(what, value, ann):
    if isinstance(ann, str):
      raise TypeError(f'{what}: unresolved annotation {ann!r}')
    if isinstance(ann, type) and ann not in (inspect.Parameter.empty, Any) and not isinstance(value, ann):
      raise TypeError(f'{what}: {getattr(value, "shape", value)} is not a {ann}')

  @functools.wraps(fn)
  def checked(*args, **kwargs):
    bound = signature.bind(*args, **kwargs)
    for name, value in bound.arguments.items():
      check(name, value, signature.parameters[name].annotation)
    out = fn(*args, **kwargs)
    check('return value', out, signature.return_annotation)
    return out

  return checked


_CHECKED = ('dense_attention', 'attend', 'causal_mask', 'selective_materialized', 'selective_blockwise',
            'selective_factored', '_heads', '_merge')


@pytest.fixture
def shape_checked(monkeypatch):
  for name in _CHECKED:
    monkeypatch.setattr(attn_lib, name, jaxtyping.jaxtyped(getattr(attn_lib, name),
                                                           typechecker=_isinstance_typechecker))
  # RoPE is applied to [B, T, N, H] queries and to [B, bq, bk, N, H] K tiles ('*B T N H' with T the key axis).
  monkeypatch.setattr(rope_lib, 'apply', jaxtyping.jaxtyped(rope_lib.apply, typechecker=_isinstance_typechecker))


@pytest.mark.parametrize('rope', [True, False])
def test_shapes_match_annotations(shape_checked, rope):
  del shape_checked
  b, t, d, n = 2, 7, 24, 3
  cfg = _cfg(d_model=d, num_heads=n, rope=rope, block_q=4, block_k=3)
  # Shapes are static, so tracing (eval_shape) runs every check without computing anything.
  x = jax.ShapeDtypeStruct((b, t, d), jnp.float32)
  pos = jnp.arange(t, dtype=jnp.int32)
  sel = attn_lib.SelectiveAttention(cfg, rngs=nnx.Rngs(0))
  for impl in IMPLS:
    assert jax.eval_shape(lambda x, impl=impl: sel(x, pos, impl=impl), x).shape == (b, t, d)
  mlp = attn_lib.SelectiveAttention(dataclasses.replace(cfg, kv_generator='mlp', kv_hidden=8), rngs=nnx.Rngs(1))
  for impl in ('materialized', 'blockwise'):
    assert jax.eval_shape(lambda x, impl=impl: mlp(x, pos, impl=impl), x).shape == (b, t, d)
  std = attn_lib.StandardAttention(cfg, rngs=nnx.Rngs(2))
  assert jax.eval_shape(lambda x: std(x, pos), x).shape == (b, t, d)

  # The pure kernels, called directly: output shapes as annotated.
  h = d // n
  q = jax.ShapeDtypeStruct((b, t, n, h), jnp.float32)
  p = sel.kv.arrays(jnp.float32)
  rope_cfg = cfg.rope_theta if rope else None
  kernels = {
      'materialized': functools.partial(attn_lib.selective_materialized, attn_lib.LinearKV, p, rope_cfg=rope_cfg),
      'blockwise': functools.partial(attn_lib.selective_blockwise, attn_lib.LinearKV, p, rope_cfg=rope_cfg,
                                     block_q=4, block_k=3),
      'factored': functools.partial(attn_lib.selective_factored, p, rope_cfg=rope_cfg, contiguous=True),
  }
  for name, kernel in kernels.items():
    assert jax.eval_shape(kernel, q, x, pos, pos).shape == (b, t, n, h), name
  v = jax.ShapeDtypeStruct((b, t, n, h + 2), jnp.float32)
  assert jax.eval_shape(functools.partial(attn_lib.dense_attention, scale=1.0), q, q, v, pos, pos).shape == (
      b, t, n, h + 2)


def test_shape_checker_catches_a_mismatch(shape_checked):
  del shape_checked
  b, t, n, h = 2, 5, 2, 4
  q = jnp.zeros((b, t, n, h))
  pos = jnp.arange(t)
  with pytest.raises(jaxtyping.TypeCheckError):  # q_pos has T+1 entries
    attn_lib.dense_attention(q, q, q, jnp.arange(t + 1), pos, 1.0)
  with pytest.raises(jaxtyping.TypeCheckError):  # k and v disagree on S
    attn_lib.dense_attention(q, q, q[:, :-1], pos, pos, 1.0)
  with pytest.raises(jaxtyping.TypeCheckError):  # x's batch is not q's
    attn_lib.selective_factored({}, q, jnp.zeros((b + 1, t, n * h)), pos, pos, None, True)

  # Return values are checked too.
  def bad_merge(x: jaxtyping.Float[jax.Array, 'B T N H']) -> jaxtyping.Float[jax.Array, 'B T D']:
    return x.reshape(x.shape[0], -1)

  checked = jaxtyping.jaxtyped(bad_merge, typechecker=_isinstance_typechecker)
  with pytest.raises(jaxtyping.TypeCheckError, match='return value'):
    checked(q)


def test_rope_annotations_are_checkable():
  """rope.py's annotations can be checked at run time: every symbolic axis refers to an annotated argument."""
  pos = jnp.arange(5, dtype=jnp.int32)
  freqs = jaxtyping.jaxtyped(rope_lib.frequencies, typechecker=_isinstance_typechecker)(8)
  assert freqs.shape == (4,)
  cos, sin = jaxtyping.jaxtyped(rope_lib.angles, typechecker=_isinstance_typechecker)(pos, 8)
  assert cos.shape == sin.shape == (5, 4)


@pytest.mark.parametrize('impl', ['jax', 'erf32', 'poly32'])
def test_gelu_is_the_exact_gelu_with_its_derivative(impl):
  """Each model.gelu_impl against numpy's erf transcription, float64: the value x Phi(x) and the derivative
  Phi(x) + x phi(x), on fresh inputs; bf16 in, bf16 gradient out."""
  from selattn.model import transformer  # pylint: disable=g-import-not-at-top
  gelu = transformer.activation(ModelConfig(vocab_size=5, activation='gelu', gelu_impl=impl))
  rng = np.random.default_rng(7)
  x = rng.uniform(-7, 7, 4096).astype(np.float32)
  c = rng.normal(size=x.shape).astype(np.float32)
  erf = np.vectorize(math.erf)
  x64 = x.astype(np.float64)
  phi_cdf = 0.5 * (1 + erf(x64 / math.sqrt(2)))
  want = x64 * phi_cdf
  want_grad = c * (phi_cdf + x64 * np.exp(-0.5 * x64 ** 2) / math.sqrt(2 * math.pi))
  got = gelu(jnp.asarray(x))
  got_grad = jax.grad(lambda v: jnp.sum(gelu(v) * c))(jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(got_grad), want_grad, rtol=1e-5, atol=1e-6)
  xb = jnp.asarray(x, jnp.bfloat16)
  gb = jax.grad(lambda v: jnp.sum(gelu(v).astype(jnp.float32) * c))(xb)
  assert gb.dtype == jnp.bfloat16
  want_b = c * (lambda v: 0.5 * (1 + erf(v / math.sqrt(2))) + v * np.exp(-0.5 * v ** 2) / math.sqrt(2 * math.pi))(
      np.asarray(xb, np.float64))
  np.testing.assert_allclose(np.asarray(gb, np.float32), want_b, rtol=1e-2, atol=1e-2)
  if impl == 'jax':  # 'auto': poly32 under bf16 compute, jax's own under float32
    for dtype, want_fn in (('float32', transformer.gelu), ('bfloat16', transformer.gelu_poly32)):
      assert transformer.activation(ModelConfig(vocab_size=5, activation='gelu', dtype=dtype)) is want_fn, dtype
    assert transformer.activation(ModelConfig(vocab_size=5, activation='relu', dtype='bfloat16')) is jax.nn.relu
  else:  # float32 arithmetic, one rounding: the bf16 value is the exact one rounded (but for near-ties; jax's
    # bf16 GELU, which rounds each op, matches on about 56% of these inputs)
    xb64 = np.asarray(xb, np.float64)
    erfc = np.vectorize(math.erfc)  # 1 + erf(-v) would lose the negative tail to cancellation
    exact_b = np.asarray(jnp.asarray(xb64 * 0.5 * erfc(-xb64 / math.sqrt(2)), jnp.float32).astype(jnp.bfloat16),
                         np.float32)
    got_b = np.asarray(gelu(xb), np.float32)
    assert np.mean(got_b == exact_b) > 0.999
    np.testing.assert_allclose(got_b, exact_b, rtol=2 ** -7, atol=0)


def test_a_run_may_resume_with_another_gelu_impl(tmp_path):
  """model.gelu_impl is the same function's arithmetic (an execution key, like dtype): a run started with 'jax'
  resumes with 'auto' (and an older config.json without the key reads as 'auto'); another activation is refused."""
  import json  # pylint: disable=g-import-not-at-top
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from selattn import config as config_lib  # pylint: disable=g-import-not-at-top
  from selattn import train  # pylint: disable=g-import-not-at-top
  c = tiny.get_config()
  c.model.activation, c.model.gelu_impl = 'gelu', 'jax'
  saved = config_lib.from_config(c, 11).to_dict()
  (tmp_path / 'config.json').write_text(json.dumps({'config': saved}))
  c.model.gelu_impl = 'auto'
  train.check_compatible(str(tmp_path), config_lib.from_config(c, 11))
  del saved['model']['gelu_impl']
  (tmp_path / 'config.json').write_text(json.dumps({'config': saved}))
  train.check_compatible(str(tmp_path), config_lib.from_config(c, 11))
  c.model.activation = 'relu'
  with pytest.raises(train.TrainingError, match='model.activation'):
    train.check_compatible(str(tmp_path), config_lib.from_config(c, 11))
