"""Attention dropout and the selective ablations, against numpy transcriptions that share no code with the model.

The dropout mask is a function of (seed, batch row, head, query position, key position), so the dense, literal,
blockwise and factored computations drop the same weights; the factored form then needs the per-query value term
scaled by the row's kept mass. Every check below first makes sure that what it compares can differ.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from selattn.config import ModelConfig
from selattn.model import attention as attn_lib
from rel_error import rel as _rel

pytestmark = pytest.mark.usefixtures('no_mesh')

IMPLS = ('materialized', 'blockwise', 'factored')


# ----------------------------------------------------------------------------------------------------------------
# numpy references.

def np_mix32(x):
  x = np.asarray(x).astype(np.uint32)
  x = x ^ (x >> np.uint32(16))
  x = x * np.uint32(0x7FEB352D)
  x = x ^ (x >> np.uint32(15))
  x = x * np.uint32(0x846CA68B)
  return x ^ (x >> np.uint32(16))


def np_keep(seed, b, n, i, j, rate):
  """The mask's specification: lowbias32 chained over seed, b, n, i, j; keep iff >= rate * 2^32."""
  u = lambda a: np.asarray(a).astype(np.int64).astype(np.uint32)
  h = np_mix32(u(seed) ^ np_mix32(u(b)))
  for idx in (n, i, j):
    h = np_mix32(h ^ u(idx))
  return h >= np.uint32(round(rate * 2**32))


def np_rope(x, pos, theta=10000.0):
  """x [..., P, N, H] rotated by positions pos [P] (non-interleaved halves)."""
  h = x.shape[-1]
  freqs = theta ** (-2.0 * np.arange(h // 2) / h)
  ang = pos[:, None] * freqs[None, :]  # [P, H/2]
  cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]  # [P, 1, H/2]
  x1, x2 = x[..., :h // 2], x[..., h // 2:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def np_dropped_softmax(logits, keep, rate):
  """logits [B, N, T, S] (-inf masked) -> softmax weights with dropout: p * keep / (1 - rate)."""
  m = logits.max(-1, keepdims=True)
  e = np.exp(logits - m)
  p = e / e.sum(-1, keepdims=True)
  return p if keep is None else p * keep / (1.0 - rate)


def np_keep_grid(seed, b, n, t, s, rate):
  """The [B, N, T, S] keep mask for positions 0..T-1 and 0..S-1."""
  return np_keep(seed, np.arange(b)[:, None, None, None], np.arange(n)[None, :, None, None],
                 np.arange(t)[None, None, :, None], np.arange(s)[None, None, None, :], rate)


def np_selective(x, q, k_fn, v_fn, n, *, rope, keep, rate):
  """The literal selective attention of queries q [B, T, D]: K_ij = k_fn(q_i, x_j), V_ij = v_fn(q_i, x_j)."""
  b, t, d = x.shape
  h = d // n
  qq = np.broadcast_to(q[:, :, None], (b, t, t, d))
  xx = np.broadcast_to(x[:, None, :], (b, t, t, d))
  kf, vf = k_fn(qq, xx).reshape(b, t, t, n, h), v_fn(qq, xx).reshape(b, t, t, n, h)
  qh = q.reshape(b, t, n, h)
  if rope:
    pos = np.arange(t, dtype=np.float64)
    qh = np_rope(qh, pos)
    kf = np_rope(kf, pos)  # K_ij rotated by j: axis -3 of [B, T, S, N, H] is S
  logits = np.einsum('btnh,btsnh->bnts', qh, kf) / math.sqrt(h)
  logits = np.where(np.tril(np.ones((t, t), bool))[None, None], logits, -np.inf)
  w = np_dropped_softmax(logits, keep, rate)
  return np.einsum('bnts,btsnh->btnh', w, vf).reshape(b, t, d)


def np_standard(x, wq, wk, wv, n, *, rope, keep, rate, c=None):
  """Standard causal attention (RoPE optional), plus an optional per-query value term c scaled by the kept mass."""
  b, t, d = x.shape
  h = d // n
  q, k, v = ((x @ w).reshape(b, t, n, h) for w in (wq, wk, wv))
  if rope:
    pos = np.arange(t, dtype=np.float64)
    q, k = np_rope(q, pos), np_rope(k, pos)
  logits = np.einsum('btnh,bsnh->bnts', q, k) / math.sqrt(h)
  logits = np.where(np.tril(np.ones((t, t), bool))[None, None], logits, -np.inf)
  w = np_dropped_softmax(logits, keep, rate)
  out = np.einsum('bnts,bsnh->btnh', w, v)
  if c is not None:
    out = out + w.sum(-1).transpose(0, 2, 1)[..., None] * c.reshape(b, t, n, h)
  return out.reshape(b, t, d)


def _cfg(**kw):
  base = dict(vocab_size=13, d_model=16, num_heads=2, num_layers=1, block_q=4, block_k=3, attn_dropout=0.3)
  base.update(kw)
  return ModelConfig(**base)


def _np(a):
  return np.asarray(a, np.float64)


# ----------------------------------------------------------------------------------------------------------------
# The mask.

def test_mask_matches_numpy_and_has_the_rate():
  seed, rate = 123456789, 0.2
  b, n, t, s = 3, 4, 40, 40
  grid = [jnp.arange(b)[:, None, None, None], jnp.arange(n)[None, :, None, None], jnp.arange(t)[None, None, :, None],
          jnp.arange(s)[None, None, None, :]]
  got = np.asarray(jax.jit(attn_lib.dropout_keep, static_argnums=5)(jnp.uint32(seed), *grid, rate))
  ref = np_keep_grid(seed, b, n, t, s, rate)
  assert got.shape == (b, n, t, s)
  np.testing.assert_array_equal(got, ref)
  # Kept fraction 1 - rate: 19,200 draws, std of the mean ~0.003.
  assert abs(got.mean() - (1 - rate)) < 0.015, got.mean()
  # Neighbours are independent: P(both kept) = (1 - rate)^2 along every index, and for another seed.
  other = np_keep_grid(seed + 1, b, n, t, s, rate)
  pairs = {'b': (got[1:], got[:-1]), 'n': (got[:, 1:], got[:, :-1]), 'i': (got[:, :, 1:], got[:, :, :-1]),
           'j': (got[..., 1:], got[..., :-1]), 'seed': (got, other)}
  for name, (u, v) in pairs.items():
    assert abs((u & v).mean() - (1 - rate) ** 2) < 0.02, (name, (u & v).mean())
  # Rate 0 keeps everything; the threshold of a rate near 1 keeps almost nothing.
  assert np.asarray(attn_lib.dropout_keep(jnp.uint32(seed), *grid, 0.0)).all()
  assert np.asarray(attn_lib.dropout_keep(jnp.uint32(seed), *grid, 0.999)).mean() < 0.01


def test_mask_depends_on_positions_not_array_order():
  """A permuted sequence drops the same (query position, key position) pairs."""
  perm = np.array([3, 0, 2, 1, 4])
  seed = jnp.uint32(7)
  pos = jnp.arange(5)
  keep = attn_lib.dropout_keep(seed, 0, 1, pos[:, None], pos[None, :], 0.5)
  keep_perm = attn_lib.dropout_keep(seed, 0, 1, pos[perm][:, None], pos[perm][None, :], 0.5)
  np.testing.assert_array_equal(np.asarray(keep)[np.ix_(perm, perm)], np.asarray(keep_perm))


# ----------------------------------------------------------------------------------------------------------------
# Standard attention with dropout.

@pytest.mark.parametrize('rope,kernel', [(True, 'auto'), (False, 'auto'), (True, 'flash')])
def test_standard_attention_dropout_matches_numpy(rope, kernel):
  # 'auto' on a CPU is the dense softmax; 'flash' the Pallas kernel (flash.py), interpreted.
  cfg = _cfg(attention='standard', positions='rope' if rope else 'none', num_heads=4, attn_kernel=kernel)
  attn = attn_lib.StandardAttention(cfg, rngs=nnx.Rngs(0))
  b, t = 2, 9
  x = jax.random.normal(jax.random.key(1), (b, t, 16))
  key = jax.random.key(5)
  seed = int(jax.random.bits(key, (), jnp.uint32))
  got = attn(x, jnp.arange(t), dropout_key=key)
  w = {k: _np(getattr(attn, k).kernel[...]) for k in ('wq', 'wk', 'wv')}
  keep = np_keep_grid(seed, b, 4, t, t, 0.3)
  ref = np_standard(_np(x), w['wq'], w['wk'], w['wv'], 4, rope=rope, keep=keep, rate=0.3)
  no_drop = np_standard(_np(x), w['wq'], w['wk'], w['wv'], 4, rope=rope, keep=None, rate=0.3)
  assert _rel(no_drop, ref) > 0.1  # dropout changes the output ...
  assert _rel(got, ref) < 1e-5, _rel(got, ref)  # ... exactly as the reference says
  np.testing.assert_array_equal(attn(x, jnp.arange(t)), attn(x, jnp.arange(t), dropout_key=None))
  assert _rel(attn(x, jnp.arange(t)), no_drop) < 1e-5  # no key (evaluation): no dropout


# ----------------------------------------------------------------------------------------------------------------
# Selective attention with dropout: the three implementations agree (forward and gradients) and match numpy.

def _selective_reference(attn, x, *, rope, keep, rate):
  wq = _np(attn.wq.kernel[...])
  wk, wv = _np(attn.kv.wk.kernel[...]), _np(attn.kv.wv.kernel[...])
  bk = _np(attn.kv.wk.bias[...]) if attn.kv.wk.bias is not None else 0.0
  bv = _np(attn.kv.wv.bias[...]) if attn.kv.wv.bias is not None else 0.0
  bq = _np(attn.wq.bias[...]) if attn.wq.bias is not None else 0.0
  d = x.shape[-1]

  def gen(w, bias):
    if w.shape[0] == 2 * d:
      return lambda q, x: np.concatenate([q, x], -1) @ w + bias
    return lambda q, x: x @ w + bias  # an ablated generator reads x_j only

  xs = _np(x)
  return np_selective(xs, xs @ wq + bq, gen(wk, bk), gen(wv, bv), attn.cfg.num_heads, rope=rope, keep=keep,
                      rate=rate)


# RoPE with biases, no RoPE, and an ablation ('keys' is checked against numpy in every impl further down).
_DROPOUT_CASES = [(True, 'both', True), (False, 'both', False), (True, 'values', False)]


@pytest.mark.parametrize('rope,parts,bias', _DROPOUT_CASES)
def test_selective_dropout_impls_agree_and_match_numpy(rope, parts, bias):
  cfg = _cfg(positions='rope' if rope else 'none', selective_parts=parts, linear_bias=bias)
  attn = attn_lib.SelectiveAttention(cfg, rngs=nnx.Rngs(3))
  if bias:  # zero-initialised would hide them; make them count
    for lin in (attn.wq, attn.kv.wk, attn.kv.wv):
      lin.bias[...] = jax.random.normal(jax.random.key(9), lin.bias.shape)
  graphdef, params = nnx.split(attn)
  # The same parameters with factored's attention in the flash kernel (flash.py, interpreted here): 'factored-flash'.
  graphdefs = {impl: graphdef for impl in IMPLS}
  graphdefs['factored-flash'] = nnx.split(attn_lib.SelectiveAttention(dataclasses.replace(cfg, attn_kernel='flash'),
                                                                      rngs=nnx.Rngs(3)))[0]
  b, t = 2, 11
  x = jax.random.normal(jax.random.key(4), (b, t, 16))
  w = jax.random.normal(jax.random.key(6), (b, t, 16))
  pos = jnp.arange(t)
  key = jax.random.key(8)
  seed = int(jax.random.bits(key, (), jnp.uint32))

  def loss(params, x, impl, key):
    out = nnx.merge(graphdefs[impl], params)(x, pos, impl=impl.removesuffix('-flash'), dropout_key=key)
    return jnp.sum(jnp.sin(out) * w), out

  @jax.jit
  def run(params, x):
    res = {}
    for impl in graphdefs:
      (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x, impl, key)
      res[impl] = (out, grads)
    res['nodrop'] = loss(params, x, 'factored', None)[1]
    return res

  res = run(params, x)
  keep = np_keep_grid(seed, b, 2, t, t, 0.3)
  ref = _selective_reference(attn, x, rope=rope, keep=keep, rate=0.3)
  ref_nodrop = _selective_reference(attn, x, rope=rope, keep=None, rate=0.3)
  assert _rel(ref_nodrop, ref) > 0.1
  assert _rel(res['nodrop'], ref_nodrop) < 1e-5
  for impl in graphdefs:
    assert _rel(res[impl][0], ref) < 1e-5, (impl, _rel(res[impl][0], ref))
  out0, (gp0, gx0) = res['materialized']
  for impl in list(graphdefs)[1:]:
    _, (gp, gx) = res[impl]
    assert _rel(gx, gx0) < 1e-5, impl
    for (path, g), (_, g0) in zip(jax.tree_util.tree_leaves_with_path(gp), jax.tree_util.tree_leaves_with_path(gp0)):
      scale = max(np.abs(np.asarray(g0)).max(), 1e-30)
      assert np.abs(np.asarray(g) - np.asarray(g0)).max() / scale < 1e-5, (impl, jax.tree_util.keystr(path))


def test_factored_dropout_scales_the_value_term_by_the_kept_mass():
  """Adding c_i unscaled (the no-dropout identity) would be another function: the kept-mass term is needed."""
  cfg = _cfg(positions='none')
  attn = attn_lib.SelectiveAttention(cfg, rngs=nnx.Rngs(1))
  b, t, d = 2, 8, 16
  x = jax.random.normal(jax.random.key(2), (b, t, d))
  key = jax.random.key(3)
  seed = int(jax.random.bits(key, (), jnp.uint32))
  got = attn(x, jnp.arange(t), impl='factored', dropout_key=key)
  wq, wk, wv = (_np(a) for a in (attn.wq.kernel[...], attn.kv.wk.kernel[...], attn.kv.wv.kernel[...]))
  keep = np_keep_grid(seed, b, 2, t, t, 0.3)
  xs = _np(x)
  # Without RoPE selective = standard attention over (B x_j, E x_j) plus C q_i scaled by the kept mass.
  c = xs @ wq @ wv[:d]
  scaled = np_standard(xs, wq, wk[d:], wv[d:], 2, rope=False, keep=keep, rate=0.3, c=c)
  unscaled = np_standard(xs, wq, wk[d:], wv[d:], 2, rope=False, keep=keep, rate=0.3) + c
  assert _rel(unscaled, scaled) > 0.05
  assert _rel(got, scaled) < 1e-5


# ----------------------------------------------------------------------------------------------------------------
# The ablations: what 'values' and 'keys' compute, and their parameters.

def test_values_ablation_is_standard_attention_plus_the_value_term():
  cfg = _cfg(selective_parts='values', attn_dropout=0.0)
  attn = attn_lib.SelectiveAttention(cfg, rngs=nnx.Rngs(5))
  d = 16
  assert attn.kv.wk.kernel.shape == (d, d) and attn.kv.wv.kernel.shape == (2 * d, d)
  b, t = 2, 10
  x = jax.random.normal(jax.random.key(6), (b, t, d))
  wq, wk, wv = (_np(a) for a in (attn.wq.kernel[...], attn.kv.wk.kernel[...], attn.kv.wv.kernel[...]))
  xs = _np(x)
  c = xs @ wq @ wv[:d]
  ref = np_standard(xs, wq, wk, wv[d:], 2, rope=True, keep=None, rate=0.0, c=c)
  plain = np_standard(xs, wq, wk, wv[d:], 2, rope=True, keep=None, rate=0.0)
  assert _rel(plain, ref) > 0.05  # the value term matters
  for impl in IMPLS:
    assert _rel(attn(x, jnp.arange(t), impl=impl), ref) < 1e-5, impl
  # The same weights in StandardAttention (no value term) give `plain`: 'values' is standard + C q_i.
  std = attn_lib.StandardAttention(dataclasses.replace(cfg, attention='standard', selective_parts='both'),
                                   rngs=nnx.Rngs(0))
  std.wq.kernel[...], std.wk.kernel[...], std.wv.kernel[...] = (
      attn.wq.kernel[...], attn.kv.wk.kernel[...], attn.kv.wv.kernel[...][d:])
  assert _rel(std(x, jnp.arange(t)), plain) < 1e-5


def test_keys_ablation_has_no_value_term():
  cfg = _cfg(selective_parts='keys', attn_dropout=0.0)
  attn = attn_lib.SelectiveAttention(cfg, rngs=nnx.Rngs(7))
  d = 16
  assert attn.kv.wk.kernel.shape == (2 * d, d) and attn.kv.wv.kernel.shape == (d, d)
  b, t = 2, 10
  x = jax.random.normal(jax.random.key(8), (b, t, d))
  wq, wk, wv = (_np(a) for a in (attn.wq.kernel[...], attn.kv.wk.kernel[...], attn.kv.wv.kernel[...]))
  ref = np_selective(_np(x), _np(x) @ wq, lambda q, xx: np.concatenate([q, xx], -1) @ wk, lambda q, xx: xx @ wv, 2,
                     rope=True, keep=None, rate=0.0)
  # The augmented keys matter: standard keys (B x_j) give another function.
  standard_keys = np_standard(_np(x), wq, wk[d:], wv, 2, rope=True, keep=None, rate=0.0)
  assert _rel(standard_keys, ref) > 0.05
  for impl in IMPLS:
    assert _rel(attn(x, jnp.arange(t), impl=impl), ref) < 1e-5, impl


def test_ablation_gradients_skip_the_missing_half():
  """The zero query rows `arrays` adds are constants: the ablated kernels get gradients of their own shape."""
  for parts, name in (('keys', 'wv'), ('values', 'wk')):
    attn = attn_lib.SelectiveAttention(_cfg(selective_parts=parts, attn_dropout=0.0), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(attn)
    x = jax.random.normal(jax.random.key(1), (2, 6, 16))
    grads = jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(x, jnp.arange(6)) ** 2))(params)
    g = np.asarray(grads['kv'][name]['kernel'][...])
    assert g.shape == (16, 16) and np.abs(g).max() > 0, parts


@pytest.mark.parametrize('parts', ['both', 'keys', 'values'])
def test_ablation_param_counts(parts):
  from selattn.model import Transformer, count_params  # pylint: disable=g-import-not-at-top
  count = count_params(Transformer(ModelConfig(vocab_size=83, selective_parts=parts), rngs=nnx.Rngs(0)))
  # The original's config: standard 191,955; each ablation adds one D x D query half per layer (4 x 64 x 64).
  assert count == {'both': 224_723, 'keys': 208_339, 'values': 208_339}[parts]


@pytest.mark.parametrize('kw,named', [
    (dict(attention='standard', selective_parts='keys'), 'model.selective_parts'),
    (dict(kv_generator='mlp', selective_parts='values'), 'model.selective_parts'),
    (dict(attention='reference', attn_dropout=0.1), 'model.attn_dropout'),
    (dict(attn_dropout=1.0), 'model.attn_dropout'),
])
def test_bad_dropout_and_ablation_configs(kw, named):
  with pytest.raises(ValueError, match=named.replace('.', r'\.')) as e:
    ModelConfig(vocab_size=13, **kw)
  assert '\n' not in str(e.value)


def test_attn_dropout_refused_with_a_seq_split():
  from selattn import config as config_lib  # pylint: disable=g-import-not-at-top
  with pytest.raises(config_lib.ConfigError, match='mesh.seq'):
    config_lib.from_config({'model': {'attn_dropout': 0.1}, 'mesh': {'seq': 2}}, vocab_size=13)
  config_lib.from_config({'model': {'attn_dropout': 0.1}, 'mesh': {'seq': 1}}, vocab_size=13)



# ----------------------------------------------------------------------------------------------------------------
# Embedding and residual dropout (model.dropout_rng).

def test_hash_dropout_matches_numpy_and_threefry_is_unchanged():
  from selattn.model import transformer  # pylint: disable=g-import-not-at-top
  rate, key = 0.2, jax.random.key(7)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 50, 24)), jnp.float32)
  got = np.asarray(jax.jit(transformer.dropout, static_argnums=(1, 3))(x, rate, key, 'hash'))
  seed = int(jax.random.bits(key, (), jnp.uint32))
  flat = np.arange(x.size, dtype=np.uint32).reshape(x.shape)  # row-major element index
  keep = np_mix32(np.uint32(seed) ^ np_mix32(flat)) >= np.uint32(round(rate * 2**32))
  np.testing.assert_allclose(got, np.where(keep, np.asarray(x) / (1 - rate), 0.0), rtol=1e-6)
  assert abs(keep.mean() - (1 - rate)) < 0.015, keep.mean()  # 3600 draws
  other = np.asarray(transformer.dropout(x, rate, jax.random.key(8), 'hash')) != 0
  assert abs((keep & other).mean() - (1 - rate) ** 2) < 0.02  # another key: an independent mask
  # The default stream is jax.random's, as in every run before the option existed.
  ref = jnp.where(jax.random.bernoulli(key, 1 - rate, x.shape), x / (1 - rate), 0)
  np.testing.assert_array_equal(np.asarray(transformer.dropout(x, rate, key)), np.asarray(ref))
