"""The fused (Pallas) selective attention against the literal computation and an independent numpy reference.

Off GPU the kernels run with `interpret=True`: the same kernel code, executed by XLA on the CPU. Every case checks
the output and the gradients of every generator parameter, of the query and of x.
"""

from __future__ import annotations

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mesh_check as mc
from selattn import config as config_lib
from selattn.model import Transformer
from selattn.model import attention as attn_lib
from selattn.model import fused as fused_lib
from rel_error import rel as _rel

pytestmark = pytest.mark.usefixtures('no_mesh')


def _inputs(seed, b, t, n, h, f):
  d = n * h
  ks = jax.random.split(jax.random.key(seed), 7)
  p = {'w1': jax.random.normal(ks[0], (2 * d, f)) / np.sqrt(2 * d), 'b1': 0.3 * jax.random.normal(ks[1], (f,)),
       'w2': jax.random.normal(ks[2], (f, 2 * d)) / np.sqrt(f), 'b2': 0.3 * jax.random.normal(ks[3], (2 * d,))}
  q = jax.random.normal(ks[4], (b, t, n, h))
  x = jax.random.normal(ks[5], (b, t, d))
  cot = jax.random.normal(ks[6], (b, t, n, h))
  return p, q, x, cot


def _run(impl, p, q, x, rope, blocks=fused_lib.Blocks()):
  pos = jnp.arange(q.shape[1])
  theta = 10000.0 if rope else None
  if impl == 'materialized':
    return attn_lib.selective_materialized(attn_lib.MlpKV, p, q, x, pos, pos, theta)
  return attn_lib.selective_fused(attn_lib.MlpKV, attn_lib.MlpKV.fused_params(p), q, x, pos, pos, theta, blocks)


def _value_and_grads(impl, p, q, x, cot, rope, blocks=fused_lib.Blocks()):
  def loss(p, q, x):
    out = _run(impl, p, q, x, rope, blocks)
    return jnp.sum(out * cot), out
  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(p, q, x)
  return out, grads


# (rope, heads N, head dim H, kv_hidden F, T): T = 19 and 21 are not multiples of the 16-row tile; T = 1 is one
# query and one key; F = 100 is not a power of two and spans several hidden chunks, F = 256 eight; H = 6 has odd
# halves (padded inside the kernel).
CASES = [(True, 1, 8, 16, 19), (False, 4, 6, 64, 21), (True, 4, 4, 256, 7), (True, 2, 8, 100, 1)]


def _assert_matches_materialized(rope, n, h, f, t, blocks, seed):
  p, q, x, cot = _inputs(seed, 2, t, n, h, f)
  out, grads = _value_and_grads('fused', p, q, x, cot, rope, blocks)
  ref_out, ref_grads = _value_and_grads('materialized', p, q, x, cot, rope)
  assert _rel(out, ref_out) <= 1e-5
  (gp, gq, gx), (rp, rq, rx) = grads, ref_grads
  for k in ('w1', 'b1', 'w2', 'b2'):
    assert _rel(gp[k], rp[k]) <= 1e-5, k
  assert _rel(gq, rq) <= 1e-5, 'q'
  assert _rel(gx, rx) <= 1e-5, 'x'


@pytest.mark.parametrize('rope,n,h,f,t', CASES)
def test_fused_matches_materialized(rope, n, h, f, t):
  _assert_matches_materialized(rope, n, h, f, t, fused_lib.Blocks(), 7 * n + f + t)


# CASES run the default backward, merged (one kernel per key tile, du and dq added with atomic adds); the split one
# (two kernels) on two of them: RoPE with F over eight hidden chunks, and no RoPE with T = 21 not a multiple of the
# tile.
def test_the_default_backward_is_merged_off_a_hopper_gpu():
  cfg = config_lib.ModelConfig(vocab_size=7)
  assert fused_lib.Blocks().backward == 'merged' and (cfg.fused_forward, cfg.fused_backward) == ('auto', 'auto')
  # 'auto' is Triton's kernels here (a CPU); the Mosaic GPU ones only compiled on a Hopper GPU (fused_mgpu tests).
  assert fused_lib.resolve_auto('auto', 'auto', True) == {'forward': 'triton', 'backward': 'merged'}
  assert fused_lib.resolve_auto('auto', 'auto', False) == {'forward': 'triton', 'backward': 'merged'}


@pytest.mark.parametrize('rope,n,h,f,t', [CASES[2], CASES[1]])
def test_split_backward_matches_materialized(rope, n, h, f, t):
  _assert_matches_materialized(rope, n, h, f, t, fused_lib.Blocks(backward='split'), 7 * n + f + t)


def test_merged_backward_adds_many_query_tiles_into_one_key_tile():
  # T = 37 in 16 x 16 tiles: three query and three key tiles, so the last query tile's du, dq rows take adds from
  # all three key tile programs; F = 40 spans three hidden chunks of 16.
  _assert_matches_materialized(True, 2, 8, 40, 37, fused_lib.Blocks(16, 16, 16, backward='merged'), 11)


# The parallel forms: heads in the grid, the forward's key tiles and the backward's query tiles dealt to several
# programs (T = 37: three tiles, so two splits deal them unevenly, and of three splits two see none of the first
# query tile's keys).
@pytest.mark.parametrize('blocks', [
    fused_lib.Blocks(16, 16, 16, heads_per_program=1, fwd_splits=2, bwd_splits=3),
    fused_lib.Blocks(16, 16, 16, heads_per_program=2, fwd_splits=3, bwd_splits=2, backward='split')])
def test_parallel_programs_match_materialized(blocks):
  _assert_matches_materialized(True, 4, 8, 40, 37, blocks, 11)


def test_more_heads_per_program_than_heads_takes_a_divisor():
  # What a `tensor` split does: the model's heads_per_program counts global heads, a device holds fewer.
  _assert_matches_materialized(False, 2, 8, 16, 19, fused_lib.Blocks(heads_per_program=4, bwd_splits=2), 5)


# Triton lowers only power-of-two array shapes. Exporting for cuda runs the Pallas Triton lowering on this CPU
# machine (not Triton's compiler: shared-memory limits show only on a GPU). Padded hidden widths that are not
# powers of two (kv_hidden 40 in chunks of 16: 48) and head groups of 3 or 6 once failed there, not here.
@pytest.mark.parametrize('n,f,blocks', [(2, 40, fused_lib.Blocks(16, 16, 16)),
                                        (6, 96, fused_lib.Blocks(heads_per_program=3, fwd_splits=2, bwd_splits=2)),
                                        (6, 64, fused_lib.Blocks(backward='split'))])
def test_kernels_lower_for_the_gpu(n, f, blocks, monkeypatch):
  p, q, x, cot = _inputs(3, 2, 37, n, 8, f)
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')  # compiled kernels, not the interpreter

  def loss(p, q, x):
    pos = jnp.arange(q.shape[1])
    out = attn_lib.selective_fused(attn_lib.MlpKV, attn_lib.MlpKV.fused_params(p), q, x, pos, pos, 10000.0, blocks)
    return jnp.sum(out * cot)

  exported = jax.export.export(
      jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=['cuda'],
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call('__gpu$xla.gpu.triton')])(p, q, x)
  assert exported.mlir_module().count('xla.gpu.triton') >= 2  # forward and backward kernels, lowered


def _numpy_selective_mlp(p, q, x, rope: bool):
  """The MLP generator's selective attention written out pair by pair in numpy (float64), from the definition:
  K_ij, V_ij = split(W2^T gelu(W1^T [q_i ; x_j] + b1) + b2); RoPE rotates q_i by i and K_ij by j (halves);
  causal softmax of q_i . K_ij / sqrt(H) per head; output sum_j p_ij V_ij. Shares no code with the package."""
  p = {k: np.asarray(v, np.float64) for k, v in p.items()}
  q, x = np.asarray(q, np.float64), np.asarray(x, np.float64)
  b, t, n, h = q.shape
  d = n * h

  def gelu(z):  # jax.nn.gelu's default: the tanh approximation
    return 0.5 * z * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (z + 0.044715 * z ** 3)))

  def rot(v, pos):  # v [..., H]
    half = h // 2
    theta = 10000.0 ** (-2.0 * np.arange(half) / h)
    c, s = np.cos(pos * theta), np.sin(pos * theta)
    v1, v2 = v[..., :half], v[..., half:]
    return np.concatenate([v1 * c - v2 * s, v2 * c + v1 * s], axis=-1)

  out = np.zeros((b, t, n, h))
  for bi in range(b):
    for i in range(t):
      qi = q[bi, i].reshape(d)
      logits, values = np.full((n, t), -np.inf), np.zeros((n, t, h))
      for j in range(i + 1):
        kv = gelu(np.concatenate([qi, x[bi, j]]) @ p['w1'] + p['b1']) @ p['w2'] + p['b2']
        k, v = kv[:d].reshape(n, h), kv[d:].reshape(n, h)
        for hd in range(n):
          qh, kh = (rot(q[bi, i, hd], i), rot(k[hd], j)) if rope else (q[bi, i, hd], k[hd])
          logits[hd, j] = qh @ kh / np.sqrt(h)
          values[hd, j] = v[hd]
      w = np.exp(logits - logits.max(axis=1, keepdims=True))
      w /= w.sum(axis=1, keepdims=True)
      out[bi, i] = np.einsum('nj,njh->nh', w, values)
  return out


@pytest.mark.parametrize('rope', [True, False])
def test_fused_matches_a_numpy_transcription(rope):
  p, q, x, _ = _inputs(31 + rope, 2, 18, 2, 4, 20)
  got = jax.jit(lambda p, q, x: _run('fused', p, q, x, rope))(p, q, x)
  assert _rel(got, _numpy_selective_mlp(p, q, x, rope)) <= 2e-6


def test_fused_is_causal():
  p, q, x, _ = _inputs(5, 1, 20, 2, 8, 16)
  f = jax.jit(lambda q, x: _run('fused', p, q, x, True))
  out = f(q, x)
  later = 11  # change every query and input from position `later` on: outputs before it must not move
  out2 = f(q.at[:, later:].set(3.0), x.at[:, later:].set(-2.0))
  np.testing.assert_array_equal(np.asarray(out[:, :later]), np.asarray(out2[:, :later]))
  assert np.abs(np.asarray(out[:, later:] - out2[:, later:])).max() > 1e-3


def test_fused_tiles_do_not_change_the_result():
  p, q, x, _ = _inputs(9, 1, 40, 2, 8, 48)
  small = jax.jit(lambda p, q, x: _run('fused', p, q, x, True, fused_lib.Blocks(16, 16, 16)))(p, q, x)
  big = jax.jit(lambda p, q, x: _run('fused', p, q, x, True, fused_lib.Blocks(32, 16, 64)))(p, q, x)
  assert _rel(big, small) <= 1e-5


def test_linear_generator_through_fused_matches_factored():
  cfg = config_lib.ModelConfig(vocab_size=11, d_model=16, num_heads=2)
  layer = attn_lib.SelectiveAttention(cfg, rngs=nnx.Rngs(2))
  x = jax.random.normal(jax.random.key(1), (2, 13, 16))
  pos = jnp.arange(13)

  graphdef, params = nnx.split(layer)

  def grads(impl):
    def loss(params, x):
      return jnp.sum(jnp.sin(nnx.merge(graphdef, params)(x, pos, impl=impl)))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)

  (v_f, g_f), (v_r, g_r) = grads('fused'), grads('factored')
  assert abs(float(v_f - v_r)) <= 1e-5 * abs(float(v_r))
  for a, b in zip(jax.tree.leaves(g_f), jax.tree.leaves(g_r)):
    assert _rel(a, b) <= 1e-5


def test_transformer_fused_matches_materialized():
  base = dict(vocab_size=13, attention='selective', kv_generator='mlp', kv_hidden=24, d_model=16, num_heads=2,
              num_layers=1)
  fused = Transformer(config_lib.ModelConfig(selective_impl='fused', **base), rngs=nnx.Rngs(0))
  ref = Transformer(config_lib.ModelConfig(selective_impl='materialized', **base), rngs=nnx.Rngs(1))
  graphdef_f, params = nnx.split(fused)
  graphdef_r, _ = nnx.split(ref)
  tokens = jax.random.randint(jax.random.key(3), (2, 12), 0, 13)

  def loss(graphdef):
    def f(params):
      logits = nnx.merge(graphdef, params)(tokens[:, :-1])
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], axis=-1))
    return jax.jit(jax.value_and_grad(f))(params)

  (lf, gf), (lr, gr) = loss(graphdef_f), loss(graphdef_r)
  assert abs(float(lf - lr)) <= 1e-5 * abs(float(lr))
  for a, b in zip(jax.tree.leaves(gf), jax.tree.leaves(gr)):
    assert _rel(a, b) <= 1e-5


def test_unsupported_head_dim_falls_back_to_blockwise_with_one_line(caplog):
  base = dict(vocab_size=7, attention='selective', kv_generator='mlp', kv_hidden=8, d_model=520, num_heads=2,
              block_q=2, block_k=2)
  layer = attn_lib.SelectiveAttention(config_lib.ModelConfig(selective_impl='fused', **base), rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (1, 3, 520))
  attn_lib._log_fallback.cache_clear()
  graphdef, params = nnx.split(layer)
  run = jax.jit(lambda params, x, impl: nnx.merge(graphdef, params)(x, jnp.arange(x.shape[1]), impl=impl),
                static_argnums=2)
  with caplog.at_level(logging.WARNING):
    out = run(params, x, None)
    run(params, x[:, :2], None)  # another trace, the same reason: not logged twice
  lines = [r.getMessage() for r in caplog.records if 'fused' in r.getMessage()]
  assert lines == ['model.selective_impl=fused cannot take this model (head dim 260 > 256): running blockwise']
  assert _rel(out, run(params, x, 'materialized')) <= 1e-5


def test_auto_picks_fused_for_the_mlp_generator_on_gpu(monkeypatch):
  small = config_lib.ModelConfig(vocab_size=7, kv_generator='mlp', kv_hidden=64)
  big = config_lib.ModelConfig(vocab_size=7, kv_generator='mlp', kv_hidden=256)
  assert small.impl == big.impl == 'blockwise'  # CPU: interpreted kernels would be far slower than XLA
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert small.impl == big.impl == 'fused'
  assert config_lib.ModelConfig(vocab_size=7).impl == 'factored'  # the linear generator keeps the identity


@pytest.mark.parametrize('tiles,named', [
    (dict(fused_block_q=24), 'model.fused_block_q=24 must be a power of two'),
    (dict(fused_block_k=3), 'model.fused_block_k=3 must be a power of two'),
    (dict(fused_block_q=1, fused_block_k=8), r'model.fused_block_q \* model.fused_block_k = 8 must be >= 16'),
    (dict(fused_block_f=8), 'model.fused_block_f=8 must be a power of two >= 16'),
    (dict(fused_num_warps=3), 'model.fused_num_warps=3 must be 1, 2, 4, 8 or 16')])
def test_fused_tiles_are_powers_of_two_with_16_pairs(tiles, named):
  with pytest.raises(config_lib.ConfigError, match=named):
    config_lib.ModelConfig(vocab_size=7, **tiles)
  config_lib.ModelConfig(vocab_size=7, fused_block_q=1, fused_block_k=16)  # tall tiles: 16 pairs


def test_the_config_reaches_the_kernels(monkeypatch):
  # Every fused_* key of the model config arrives in the kernels' Blocks (seen where `unsupported` vets them).
  seen = []
  monkeypatch.setattr(fused_lib, 'unsupported', lambda h, blocks, n: seen.append(blocks) or 'stopped here')
  keys = dict(fused_block_q=2, fused_block_k=32, fused_block_f=64, fused_num_warps=4, fused_num_stages=3,
              fused_backward='split', fused_forward='mgpu', fused_heads_per_program=1, fused_fwd_splits=3,
              fused_bwd_splits=5)
  cfg = config_lib.ModelConfig(vocab_size=7, attention='selective', kv_generator='mlp', kv_hidden=8, d_model=16,
                               num_heads=2, selective_impl='fused', **keys)
  layer = attn_lib.SelectiveAttention(cfg, rngs=nnx.Rngs(0))
  layer(jnp.ones((1, 3, 16)), jnp.arange(3))
  assert seen == [fused_lib.Blocks(block_q=2, block_k=32, block_f=64, num_warps=4, num_stages=3, backward='split',
                                   forward='mgpu', heads_per_program=1, fwd_splits=3, bwd_splits=5)]


# Tall tiles (few queries by many keys): one query per tile, and two with the backward's query tiles dealt to two
# programs (T = 37: 37 and 19 query tiles, 2 key tiles).
@pytest.mark.parametrize('blocks', [fused_lib.Blocks(1, 32, 16), fused_lib.Blocks(2, 32, 16, bwd_splits=2)])
def test_tall_tiles_match_materialized(blocks):
  _assert_matches_materialized(True, 2, 8, 40, 37, blocks, 13)


def test_a_run_may_resume_with_the_other_fused_backward(tmp_path):
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from selattn import train  # pylint: disable=g-import-not-at-top
  c = tiny.get_config()
  c.model.fused_backward = 'split'
  (tmp_path / 'config.json').write_text(json.dumps({'config': config_lib.from_config(c, 11).to_dict()}))
  c.model.fused_backward = 'merged'
  train.check_compatible(str(tmp_path), config_lib.from_config(c, 11))  # the same model, computed otherwise
  c.model.kv_hidden += 1  # while another model is refused
  with pytest.raises(train.TrainingError, match='model.kv_hidden'):
    train.check_compatible(str(tmp_path), config_lib.from_config(c, 11))


def test_sharded_meshes_give_the_single_device_result(tmp_path):
  # 8 fake CPU devices in a subprocess: seq split (zigzag positions), seq x tensor (with either backward), fsdp x
  # tensor.
  res = mc.Worker(['fused'], 8, str(tmp_path / 'fused.log'), timeout=600).result()
  assert set(res) == set(mc.FUSED_MESHES)
  for name, r in res.items():
    data, fsdp, seq, tensor = mc.FUSED_MESHES[name]
    assert r['shard_map'] and r['pallas_call'], (name, r)
    # Each device's kernel sees its own batch rows, query positions and heads: the work is split, not repeated.
    assert r['kernel_q'] == [[4 // (data * fsdp), 16, 4 // tensor, 2, 16]], (name, r['kernel_q'])
    assert r['leaves'] == 7 and r['max_rel_diff'] <= 1e-5, (name, r)
    backward = ['selective_fused_bwd_merged'] if name.endswith('_merged') else [
        'selective_fused_bwd_key', 'selective_fused_bwd_query']
    assert r['kernels'] == sorted(['selective_fused_fwd'] + backward), (name, r['kernels'])
