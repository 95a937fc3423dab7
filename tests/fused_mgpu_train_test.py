"""`model.fused_forward='mgpu'`: the Mosaic GPU forward (fused_mgpu.py) under fused.py's custom VJP, with the Triton
backward, in Mosaic GPU's interpret mode on the CPU: outputs and gradients of every input against `materialized`,
the residuals' meaning checked exactly, and the fallbacks to the Triton forward."""

from __future__ import annotations

import logging
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from selattn import config as config_lib
from selattn.model import attention as attn_lib
from selattn.model import fused as fused_lib
from selattn.model import fused_mgpu as fm

pytestmark = [pytest.mark.usefixtures('no_mesh'),
              pytest.mark.skipif(fm.interpreter() is None, reason='no Mosaic GPU interpret mode in this jax')]
MGPU = fused_lib.Blocks(forward='mgpu')


def _rel(got, ref) -> float:
  got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
  assert got.shape == ref.shape, (got.shape, ref.shape)
  scale = np.abs(ref).max()
  assert scale > 0, 'reference is all zero'
  return float(np.abs(got - ref).max() / scale)


def _inputs(seed, b, t, n, h, f):
  d = n * h
  ks = jax.random.split(jax.random.key(seed), 7)
  p = {'w1': jax.random.normal(ks[0], (2 * d, f)) / np.sqrt(2 * d), 'b1': 0.3 * jax.random.normal(ks[1], (f,)),
       'w2': jax.random.normal(ks[2], (f, 2 * d)) / np.sqrt(f), 'b2': 0.3 * jax.random.normal(ks[3], (2 * d,))}
  return p, jax.random.normal(ks[4], (b, t, n, h)), jax.random.normal(ks[5], (b, t, d)), jax.random.normal(
      ks[6], (b, t, n, h))


def _value_and_grads(impl, p, q, x, cot, rope, blocks=MGPU):
  pos = jnp.arange(q.shape[1])
  theta = 10000.0 if rope else None

  def loss(p, q, x):
    if impl == 'materialized':
      out = attn_lib.selective_materialized(attn_lib.MlpKV, p, q, x, pos, pos, theta)
    else:
      out = attn_lib.selective_fused(attn_lib.MlpKV, attn_lib.MlpKV.fused_params(p), q, x, pos, pos, theta, blocks)
    return jnp.sum(out * cot), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(p, q, x)
  return out, grads


def _errors(got, ref) -> dict[str, float]:
  (out, (gp, gq, gx)), (r_out, (rp, rq, rx)) = got, ref
  return {'out': _rel(out, r_out), **{k: _rel(gp[k], rp[k]) for k in rp}, 'q': _rel(gq, rq), 'x': _rel(gx, rx)}


def _with_forward(monkeypatch, forward):
  """fused_mgpu.forward replaced by `forward(*args, scale, interpret)` (the kernel's stand-in)."""
  monkeypatch.setattr(fm, 'forward', lambda *a, scale, interpret, opts=fm.Options(): forward(*a, scale=scale))


# (rope, N, H, F, T): T = 70 is two 64-query tiles, the second mostly padding, and three key blocks of 32 in the
# transcription case; F = 40 one hidden chunk, 100 two; H = 6 odd RoPE halves padded; N = 1 and 2.
CASES = [(True, 2, 8, 100, 70), (False, 1, 6, 40, 37), (True, 1, 8, 40, 37), (False, 2, 8, 40, 70)]


@pytest.mark.parametrize('rope,n,h,f,t', CASES[:2])
def test_residuals_mean_what_the_triton_backward_needs(rope, n, h, f, t, monkeypatch):
  # With the kernel's formulation computed in exact float32 (its transcription, precision='float32'), the
  # training path through the MGPU branch gives materialized's output and gradients to float32 rounding: G and lse
  # come out in the layout and meaning of the Triton forward's (padding rows and hidden units included).
  _with_forward(monkeypatch, lambda *a, scale: fm.transcription(
      *a, scale=scale, opts=fm.Options(block_k=32, precision='float32')))
  p, q, x, cot = _inputs(7 * t + f, 2, t, n, h, f)
  errs = _errors(_value_and_grads('fused', p, q, x, cot, rope), _value_and_grads('materialized', p, q, x, cot, rope))
  assert max(errs.values()) <= 1e-5, errs


@pytest.mark.parametrize('rope,n,h,f,t', CASES)
def test_mgpu_forward_trains_like_materialized(rope, n, h, f, t, monkeypatch):
  # The kernel itself (interpreted). Against `materialized` (float32) the output and gradients carry the key
  # layer's bfloat16 rounding (g and W2k to 8 bits of mantissa, relative 2^-9 = 2e-3 each); the gradients carry it
  # twice, as the Triton backward recomputes p = exp(s - lse) with float32 logits s against the kernel's lse from
  # bfloat16 ones, so each row's p is off by the factor exp(lse32 - lse16) (see fused_mgpu's docstring). Seen in
  # these cases: output <= 6e-4, gradients <= 2.7e-3 of their scale (limits 3x that); a residual of the wrong
  # meaning or layout gives O(1).
  p, q, x, cot = _inputs(7 * t + f, 2, t, n, h, f)
  got = _value_and_grads('fused', p, q, x, cot, rope)
  errs = _errors(got, _value_and_grads('materialized', p, q, x, cot, rope))
  assert errs['out'] <= 2e-3 and max(errs.values()) <= 8e-3, errs
  # And exactly the bf16 transcription's: the same path with the kernel replaced by the formulation in jnp.
  _with_forward(monkeypatch, lambda *a, scale: fm.transcription(*a, scale=scale))
  errs = _errors(got, _value_and_grads('fused', p, q, x, cot, rope))
  assert max(errs.values()) <= 1e-5, errs


def _layer(**kw):
  base = dict(vocab_size=7, attention='selective', kv_generator='mlp', kv_hidden=40, d_model=16, num_heads=2,
              selective_impl='fused', fused_forward='mgpu')
  layer = attn_lib.SelectiveAttention(config_lib.ModelConfig(**{**base, **kw}), rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(layer)
  return jax.jit(lambda params, x, impl: nnx.merge(graphdef, params)(x, jnp.arange(x.shape[1]), impl=impl),
                 static_argnums=2), params


def _logged_run(caplog, run, params, x):
  fused_lib._log_once.cache_clear()
  with caplog.at_level(logging.WARNING):
    out = run(params, x, None)
    run(params, x[:, :2], None)  # another trace, the same reason: not logged twice
  return out, [r.getMessage() for r in caplog.records if 'fused_forward' in r.getMessage()]


def test_the_linear_generator_falls_back_to_the_triton_forward(caplog):
  run, params = _layer(kv_generator='linear')
  x = jax.random.normal(jax.random.key(1), (1, 5, 16))
  out, lines = _logged_run(caplog, run, params, x)
  assert lines == ['model.fused_forward=mgpu cannot take this call (the kernel computes gelu, not the identity '
                   'activation): running the Triton forward']
  assert _rel(out, run(params, x, 'materialized')) <= 1e-5  # float32 exact: the Triton forward ran


def test_shared_memory_overflow_falls_back_to_the_triton_forward(caplog):
  run, params = _layer(kv_hidden=1024)  # u and w rows of 1024 hidden units: > 227 KB of shared memory
  x = jax.random.normal(jax.random.key(2), (1, 5, 16))
  out, lines = _logged_run(caplog, run, params, x)
  assert len(lines) == 1 and 'bytes of shared memory' in lines[0] and lines[0].endswith('running the Triton forward')
  assert _rel(out, run(params, x, 'materialized')) <= 1e-5


@pytest.mark.parametrize('platform,cc,ok', [('gpu', '9.0', True), ('gpu', '8.0', False), ('gpu', '10.0', False),
                                            ('gpu', None, False), ('cpu', None, False)])
def test_only_hopper_runs_the_compiled_kernel(platform, cc, ok, monkeypatch):
  dev = types.SimpleNamespace(platform=platform, device_kind='a device', **({'compute_capability': cc} if cc else {}))
  monkeypatch.setattr(jax, 'devices', lambda *a: [dev])
  scale, args = fm.fused_inputs(jnp.zeros((1, 5, 2, 8)), jnp.zeros((1, 5, 40)), jnp.zeros((1, 5, 40)),
                                jnp.zeros((40, 16)), jnp.zeros((16,)), jnp.arange(5), jnp.arange(5), None)
  why = fm.cannot_run('gelu', False, args[0], args[2])
  assert (why is None) == ok, why
  if not ok:
    assert why.startswith('a device is not a Hopper GPU')


def test_no_interpreter_falls_back(monkeypatch):
  monkeypatch.setattr(fm, 'interpreter', lambda: None)
  q, w = jnp.zeros((1, 16, 2, 2, 16)), jnp.zeros((1, 16, 64))
  assert fm.cannot_run('gelu', True, q, w) == 'this jax has no Mosaic GPU interpret mode'
