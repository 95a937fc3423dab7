"""The flash attention kernel (Pallas) against `dense_attention`, with and without the shared dropout mask.

Off GPU the kernels run with `interpret=True`: the same kernel code, executed by XLA on the CPU. Every case checks
the output and the gradients of q, k and v. The lowering test exports the kernels for CUDA (Triton) on this CPU
machine, which catches an operation Triton cannot lower; the `gpu` test runs the compiled kernels where a GPU is.
"""

from __future__ import annotations

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mesh_check as mc
from selattn import config as config_lib
from selattn.model import attention as attn_lib
from selattn.model import dropout as dropout_lib
from selattn.model import flash as flash_lib
from rel_error import rel as _rel

pytestmark = pytest.mark.usefixtures('no_mesh')

SMALL = flash_lib.Blocks(block_q=16, block_k=16)  # several tiles at test sizes


def _inputs(seed, b, t, n, hq, hv, dtype=jnp.float32):
  ks = jax.random.split(jax.random.key(seed), 4)
  q, k = (jax.random.normal(key, (b, t, n, hq), dtype) for key in ks[:2])
  v = jax.random.normal(ks[2], (b, t, n, hv), dtype)
  cot = jax.random.normal(ks[3], (b, t, n, hv), jnp.float32)
  return q, k, v, cot


def _rows(seed, b, n, q_pos, bn=lambda b, n: (b, n)):
  """The row hashes of global batch rows 0..b-1 and heads 0..n-1 (`bn` may swap or shift them: planted bugs)."""
  bi, ni = bn(jnp.arange(b)[:, None, None], jnp.arange(n)[None, :, None])
  return dropout_lib.row_hash(seed, bi, ni, q_pos[None, None, :])


def _value_and_grads(fn, q, k, v, cot):
  def loss(q, k, v):
    out = fn(q, k, v)
    return jnp.sum(out.astype(jnp.float32) * cot), out
  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return out, grads


def _dense(q_pos, k_pos, scale, dropout):
  return lambda q, k, v: attn_lib.dense_attention(q, k, v, q_pos, k_pos, scale, dropout)


def _flash(q_pos, k_pos, scale, seed, rate, blocks=SMALL, bn=lambda b, n: (b, n), contiguous=False):
  def fn(q, k, v):
    rows = _rows(seed, q.shape[0], q.shape[2], q_pos, bn) if rate else None
    return flash_lib.attention(q, k, v, q_pos, k_pos, scale, rows, rate, blocks, contiguous, interpret=True)
  return fn


# (B, T, N, Hq, Hv): T not a multiple of the tile (37), T = 1, T a whole number of tiles (32), Hv != Hq both ways,
# head dims that are not powers of two (12, 13: padded in the wrapper), several batch rows and heads.
CASES = [(2, 37, 3, 8, 8), (3, 1, 2, 8, 12), (2, 32, 2, 12, 13), (2, 23, 4, 16, 5)]


# contiguous: positions 0..T-1 promised, tiles skipped by loop bounds instead of by a test of their positions.
@pytest.mark.parametrize('rate,contiguous', [(0.0, False), (0.3, False), (0.3, True)])
@pytest.mark.parametrize('b,t,n,hq,hv', CASES)
def test_flash_matches_dense(b, t, n, hq, hv, rate, contiguous):
  q, k, v, cot = _inputs(b * 100 + t, b, t, n, hq, hv)
  pos, seed, scale = jnp.arange(t), jnp.uint32(987654321), 0.4
  dropout = attn_lib.AttnDropout(seed, rate) if rate else None
  out_ref, g_ref = _value_and_grads(_dense(pos, pos, scale, dropout), q, k, v, cot)
  out, g = _value_and_grads(_flash(pos, pos, scale, seed, rate, contiguous=contiguous), q, k, v, cot)
  assert _rel(out, out_ref) < 1e-5, _rel(out, out_ref)
  for name, a, r in zip('qkv', g, g_ref):
    if t == 1 and name in 'qk':  # one key: the softmax is 1 whatever q and k are, so their gradients are 0
      # (the kernel's p (dp - Delta) cancels to rounding, relative to the gradients that are not 0)
      assert np.abs(np.asarray(r)).max() == 0 and np.abs(np.asarray(a)).max() < 1e-5 * np.abs(np.asarray(g[2])).max()
      continue
    assert _rel(a, r) < 1e-5, (name, _rel(a, r))


def test_the_mask_matters_and_a_wrong_one_is_caught():
  """Dropout changes the output; the kernel's mask with batch and head swapped, or another batch offset (what a
  sharded call would draw with local indices), is far from the dense reference: the comparisons above can fail."""
  b, t, n, hq, hv = 3, 37, 3, 8, 8
  q, k, v, _ = _inputs(5, b, t, n, hq, hv)
  pos, seed, rate = jnp.arange(t), jnp.uint32(42), 0.3
  ref = _dense(pos, pos, 0.4, attn_lib.AttnDropout(seed, rate))(q, k, v)
  assert _rel(_dense(pos, pos, 0.4, None)(q, k, v), ref) > 0.1
  assert _rel(_flash(pos, pos, 0.4, seed, rate)(q, k, v), ref) < 1e-5
  for wrong in (lambda b, n: (n, b), lambda b, n: (b + 1, n), lambda b, n: (b, n + 1)):
    assert _rel(_flash(pos, pos, 0.4, seed, rate, bn=wrong)(q, k, v), ref) > 0.1
  assert _rel(_flash(pos, pos, 0.4, seed + 1, rate)(q, k, v), ref) > 0.1


def test_positions_not_array_order_and_tiles_do_not_matter():
  """Causal and dropped by positions (a permuted sequence, as the `seq` split's zigzag order); any tile size."""
  b, t, n = 2, 40, 2
  q, k, v, cot = _inputs(7, b, t, n, 8, 8)
  pos = jnp.asarray(np.random.default_rng(0).permutation(t), jnp.int32)
  seed, rate = jnp.uint32(3), 0.2
  out_ref, g_ref = _value_and_grads(_dense(pos, pos, 0.5, attn_lib.AttnDropout(seed, rate)), q, k, v, cot)
  for blocks in (SMALL, flash_lib.Blocks(block_q=32, block_k=16), flash_lib.Blocks()):
    out, g = _value_and_grads(_flash(pos, pos, 0.5, seed, rate, blocks), q, k, v, cot)
    assert _rel(out, out_ref) < 1e-5, blocks
    for a, r in zip(g, g_ref):
      assert _rel(a, r) < 1e-5, blocks


def test_contiguous_loop_bounds_with_unequal_tiles():
  """The index-bounded loops where query and key tiles differ (T = 33: 64-row query tiles over 16-key tiles reach
  past the last key tile, so the bound is clipped), forward and gradients."""
  b, t, n = 2, 33, 2
  q, k, v, cot = _inputs(9, b, t, n, 8, 8)
  pos, seed, rate = jnp.arange(t), jnp.uint32(21), 0.3
  out_ref, g_ref = _value_and_grads(_dense(pos, pos, 0.5, attn_lib.AttnDropout(seed, rate)), q, k, v, cot)
  for bq, bk in ((64, 16), (16, 32), (32, 16)):
    blocks = flash_lib.Blocks(block_q=bq, block_k=bk)
    out, g = _value_and_grads(_flash(pos, pos, 0.5, seed, rate, blocks, contiguous=True), q, k, v, cot)
    assert _rel(out, out_ref) < 1e-5, (bq, bk)
    for name, a, r in zip('qkv', g, g_ref):
      assert _rel(a, r) < 1e-5, (bq, bk, name)


def test_queries_and_keys_of_other_lengths():
  """S != T: keys at other positions than the queries (as a cache would hold), some keys seen by no query."""
  b, t, s, n = 2, 9, 21, 2
  ks = jax.random.split(jax.random.key(11), 4)
  q, k = jax.random.normal(ks[0], (b, t, n, 8)), jax.random.normal(ks[1], (b, s, n, 8))
  v, cot = jax.random.normal(ks[2], (b, s, n, 6)), jax.random.normal(ks[3], (b, t, n, 6))
  q_pos, k_pos = jnp.arange(5, 5 + t), jnp.arange(s)
  seed, rate = jnp.uint32(77), 0.25
  out_ref, g_ref = _value_and_grads(_dense(q_pos, k_pos, 0.3, attn_lib.AttnDropout(seed, rate)), q, k, v, cot)
  out, g = _value_and_grads(_flash(q_pos, k_pos, 0.3, seed, rate), q, k, v, cot)
  assert _rel(out, out_ref) < 1e-5
  for a, r in zip(g, g_ref):
    assert _rel(a, r) < 1e-5
  assert np.abs(np.asarray(g[2])[:, t + 5:]).max() == 0  # keys after the last query: no gradient


def _export_cuda(fn, *args):
  return jax.export.export(jax.jit(fn), platforms=['cuda'], disabled_checks=[
      jax.export.DisabledSafetyCheck.custom_call('__gpu$xla.gpu.triton')])(*args)


@pytest.mark.parametrize('rate,contiguous', [(0.0, False), (0.2, False), (0.2, True)])
def test_kernels_lower_to_triton(rate, contiguous):
  """Forward and backward lower for CUDA (Triton) at the model's dtypes, T not a whole tile (150: padded to 192,
  a whole-sequence block that is not a power of two), Hv != Hq, tiles skipped by position tests or loop bounds."""
  b, t, n, hq, hv = 2, 150, 3, 24, 25

  def grads(q, k, v, seed):
    pos = jnp.arange(t)
    rows = _rows(seed, b, n, pos) if rate else None

    def loss(q, k, v):
      out = flash_lib.attention(q, k, v, pos, pos, 0.2, rows, rate, contiguous=contiguous, interpret=False)
      return jnp.sum(out.astype(jnp.float32))
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  for dtype in (jnp.bfloat16, jnp.float32):
    qk, v = jax.ShapeDtypeStruct((b, t, n, hq), dtype), jax.ShapeDtypeStruct((b, t, n, hv), dtype)
    text = _export_cuda(grads, qk, qk, v, jax.ShapeDtypeStruct((), jnp.uint32)).mlir_module()
    for name in ('flash_attention_fwd', 'flash_attention_bwd_kv', 'flash_attention_bwd_q'):
      assert name in text, name


def test_lowering_check_catches_an_op_triton_lacks(monkeypatch):
  """The export above does run Triton's lowering: a kernel with an op it lacks (a sort) fails there."""
  monkeypatch.setattr(flash_lib, '_keep', lambda st, rows, kpos: jnp.argsort(rows)[:, None] >= kpos[None, :])
  qk = jax.ShapeDtypeStruct((1, 16, 1, 16), jnp.bfloat16)
  pos = jnp.arange(16)
  fn = lambda q, k, v: flash_lib.attention(q, k, v, pos, pos, 1.0, jnp.zeros((1, 1, 16), jnp.uint32), 0.5,
                                           interpret=False)
  with pytest.raises(NotImplementedError, match='sort'):
    _export_cuda(fn, qk, qk, qk)


# ----------------------------------------------------------------------------------------------------------------
# `attend`: which kernel runs.

def _primitives(fn, *args) -> set[str]:
  found = set()

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      found.add(eqn.primitive.name)
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)
  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


def test_attend_picks_the_kernel(monkeypatch):
  q, k, v, _ = _inputs(1, 2, 20, 2, 8, 8)
  pos = jnp.arange(20)
  drop = attn_lib.AttnDropout(jnp.uint32(1), 0.2)
  call = lambda kernel, dropout: lambda q, k, v: attn_lib.attend(q, k, v, pos, pos, 0.3, True, dropout, kernel)
  # CPU: 'auto' keeps the dense softmax (interpreted kernels are slow); 'flash' forces the kernel.
  assert 'pallas_call' not in _primitives(call('auto', drop), q, k, v)
  assert 'pallas_call' in _primitives(call('flash', drop), q, k, v)
  assert 'pallas_call' in _primitives(call('flash', None), q, k, v)
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert 'pallas_call' in _primitives(call('auto', drop), q, k, v)  # GPU with dropout: the kernel
  assert 'pallas_call' not in _primitives(call('dense', drop), q, k, v)  # the path before it, for A/B timing
  assert 'pallas_call' not in _primitives(call('auto', None), q, k, v)  # no dropout: cuDNN's (or dense) as before


def test_attend_falls_back_with_one_line(caplog):
  attn_lib._log_fallback.cache_clear()  # pylint: disable=protected-access
  q = jnp.zeros((1, 4, 1, 8), jnp.float32)
  v = jnp.zeros((1, 4, 1, 300), jnp.float32)
  pos = jnp.arange(4)
  with caplog.at_level(logging.WARNING):
    out = attn_lib.attend(q, q, v, pos, pos, 1.0, True, attn_lib.AttnDropout(jnp.uint32(0), 0.1), 'flash')
  assert out.shape == (1, 4, 1, 300)
  lines = [r.getMessage() for r in caplog.records if 'flash kernel' in r.getMessage()]
  assert lines == ['attention: the flash kernel cannot take this call (head dims 8 and 300: more than 256): dense '
                   'attention'], lines


@pytest.mark.parametrize('key,value,named', [('attn_kernel', 'cudnn', 'model.attn_kernel'),
                                             ('flash_block_q', 48, 'model.flash_block_q'),
                                             ('flash_block_k', 8, 'model.flash_block_k'),
                                             ('flash_num_warps', 3, 'model.flash_num_warps'),
                                             ('flash_num_stages', 0, 'model.flash_num_stages')])
def test_bad_kernel_configs(key, value, named):
  with pytest.raises(config_lib.ConfigError, match=named.replace('.', r'\.')) as e:
    config_lib.ModelConfig(vocab_size=13, **{key: value})
  assert '\n' not in str(e.value)


def test_a_run_may_resume_with_another_attn_kernel(tmp_path):
  """The kernel choice and its tiles compute the same function with the same masks: a run started on the dense
  path resumes on the kernel (and an old config.json without these keys reads as 'auto')."""
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from selattn import train  # pylint: disable=g-import-not-at-top
  c = tiny.get_config()
  c.model.attn_dropout, c.model.attn_kernel = 0.1, 'dense'
  saved = config_lib.from_config(c, 11).to_dict()
  (tmp_path / 'config.json').write_text(json.dumps({'config': saved}))
  c.model.attn_kernel, c.model.flash_block_q, c.model.flash_num_warps, c.model.flash_num_stages = 'flash', 32, 8, 3
  train.check_compatible(str(tmp_path), config_lib.from_config(c, 11))
  for key in ('attn_kernel', 'flash_block_q', 'flash_block_k', 'flash_num_warps', 'flash_num_stages'):
    del saved['model'][key]
  (tmp_path / 'config.json').write_text(json.dumps({'config': saved}))
  train.check_compatible(str(tmp_path), config_lib.from_config(c, 11))
  c.model.attn_dropout = 0.2  # an execution key too; another model is refused:
  c.model.d_model *= 2
  with pytest.raises(train.TrainingError, match='model.d_model'):
    train.check_compatible(str(tmp_path), config_lib.from_config(c, 11))


def test_sharded_flash_matches_one_device(tmp_path):
  """On 4 fake devices (batch over data/fsdp, heads over tensor) the kernel runs per device inside shard_map with
  the global batch and head indices' mask: standard and factored selective, output and gradients, as one device's
  dense path."""
  res = mc.Worker(['flash'], 4, str(tmp_path / 'flash.log'), timeout=600).result()
  assert set(res) == set(mc.FLASH_MESHES)
  for name, r in res.items():
    for attention, got in r.items():
      assert got['shard_map'] and got['pallas_call'], (name, attention)
      assert got['kernel_q'] == [list(mc.FLASH_LOCAL[name])], (name, attention, got['kernel_q'])
      assert got['max_rel_diff'] < 1e-5, (name, attention, got)
  json.dumps(res)


@pytest.mark.skipif(jax.default_backend() != 'gpu', reason='the compiled Triton kernels need a GPU')
# Tolerances for TF32 and bf16 matmuls (XLA's and Triton's round differently); a wrong mask is off by > 0.1.
@pytest.mark.parametrize('dtype,tol', [(jnp.float32, 5e-3), (jnp.bfloat16, 3e-2)])
def test_gpu_kernels_match_dense(dtype, tol):
  """nanoGPT's shape (B 64, T 256, 6 heads of 64) and factored's (Hq 64, Hv 65, T 299) on a GPU, compiled."""
  for b, t, n, hq, hv in ((64, 256, 6, 64, 64), (16, 299, 2, 64, 65)):
    q, k, v, cot = _inputs(0, b, t, n, hq, hv, dtype)
    pos, seed, rate = jnp.arange(t), jnp.uint32(5), 0.2
    dense = lambda q, k, v: attn_lib.dense_attention(q, k, v, pos, pos, hq ** -0.5, attn_lib.AttnDropout(seed, rate))
    out_ref, g_ref = _value_and_grads(dense, q, k, v, cot)
    for contiguous in (False, True):
      flash = lambda q, k, v, c=contiguous: flash_lib.attention(q, k, v, pos, pos, hq ** -0.5, _rows(seed, b, n, pos),
                                                                rate, contiguous=c)
      out, g = _value_and_grads(flash, q, k, v, cot)
      assert _rel(out, out_ref) < tol, (contiguous, _rel(out, out_ref))
      for name, a, r in zip('qkv', g, g_ref):
        assert _rel(a, r) < tol, (contiguous, name, _rel(a, r))
