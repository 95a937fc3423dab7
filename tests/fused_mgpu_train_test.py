"""`model.fused_forward='mgpu'`: the Mosaic GPU forward (fused_mgpu.py) under fused.py's custom VJP, with the Triton
backward, in Mosaic GPU's interpret mode on the CPU: outputs and gradients of every input against `materialized`,
the residuals' meaning checked exactly, the fallbacks to the Triton forward; the Mosaic GPU backward; one device's
share under `seq` and `tensor` meshes, and bf16 models."""

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
from selattn.model import fused_mgpu_bwd as fmb
from fused_mgpu_test import _lowers_for_cuda
import mesh_check as mc
from rel_error import rel as _rel

pytestmark = [pytest.mark.usefixtures('no_mesh', 'mgpu_interpreter'),
              pytest.mark.skipif(fm.interpreter() is None, reason='no Mosaic GPU interpret mode in this jax')]
MGPU = fused_lib.Blocks(forward='mgpu')


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
CASES = [(True, 2, 8, 100, 70), (False, 1, 6, 40, 37)]
# The interpreted kernels take seconds a case (fused_mgpu_test.py covers several tiles and chunks).
KERNEL_CASES = [(True, 2, 8, 40, 37), (False, 1, 6, 40, 37)]


@pytest.mark.parametrize('rope,n,h,f,t', CASES)
def test_residuals_mean_what_the_triton_backward_needs(rope, n, h, f, t, monkeypatch):
  # With the kernel's formulation computed in exact float32 (its transcription, precision='float32'), the
  # training path through the MGPU branch gives materialized's output and gradients to float32 rounding: G and lse
  # come out in the layout and meaning of the Triton forward's (padding rows and hidden units included).
  _with_forward(monkeypatch, lambda *a, scale: fm.transcription(
      *a, scale=scale, opts=fm.Options(block_k=32, precision='float32')))
  p, q, x, cot = _inputs(7 * t + f, 2, t, n, h, f)
  errs = _errors(_value_and_grads('fused', p, q, x, cot, rope), _value_and_grads('materialized', p, q, x, cot, rope))
  assert max(errs.values()) <= 1e-5, errs


@pytest.mark.parametrize('rope,n,h,f,t', KERNEL_CASES)
def test_mgpu_forward_trains_like_materialized(rope, n, h, f, t, monkeypatch):
  # The kernel itself (interpreted). Against `materialized` (float32) the output and gradients carry the key
  # layer's bfloat16 rounding (g and W2k to 8 bits of mantissa, relative 2^-9 = 2e-3 each); the gradients carry it
  # twice, as the Triton backward recomputes p = exp(s - lse) with float32 logits s against the kernel's lse from
  # bfloat16 ones, so each row's p is off by the factor exp(lse32 - lse16) (see fused_mgpu's docstring). Seen in
  # these cases: output <= 4.7e-4, gradients <= 2.7e-3 of their scale (limits 3x that); a residual of the wrong
  # meaning or layout gives O(1).
  p, q, x, cot = _inputs(7 * t + f, 1, t, n, h, f)
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


@pytest.mark.parametrize('t,f', [(37, 40), (70, 100)])
def test_the_mosaic_gpu_kernels_get_arrays_already_padded_to_their_tiles(t, f, monkeypatch):
  # fused.attention pads queries, keys and hidden units to 64 when a Mosaic GPU kernel runs, so that the kernels
  # pad and slice back nothing (before, T = 299 went to 304 for the Triton tiles, then 320 and back inside them).
  seen = []

  def recording(fn, name):
    def call(*args, **kw):
      q, w = args[0], args[2]
      seen.append((name, q.shape[1], w.shape[1], w.shape[2]))
      return fn(*args, **kw)
    return call

  monkeypatch.setattr(fm, 'forward', recording(fm.forward, 'forward'))
  monkeypatch.setattr(fmb, 'backward', recording(fmb.backward, 'backward'))
  run, params = _layer(kv_hidden=f, fused_backward='mgpu')
  x = jax.random.normal(jax.random.key(3), (1, t, 16))
  jax.make_jaxpr(jax.grad(lambda params: jnp.sum(run(params, x, None) ** 2)))(params)  # traced, not run
  tile = lambda n: -(-n // 64) * 64  # noqa: E731
  assert set(seen) == {('backward', tile(t), tile(t), tile(f)), ('forward', tile(t), tile(t), tile(f))}, seen


def test_the_linear_generator_falls_back_to_the_triton_forward(caplog):
  run, params = _layer(kv_generator='linear')
  x = jax.random.normal(jax.random.key(1), (1, 5, 16))
  out, lines = _logged_run(caplog, run, params, x)
  assert lines == ['model.fused_forward=mgpu cannot take this call (the kernel computes gelu, not the identity '
                   'activation): running the Triton forward']
  assert _rel(out, run(params, x, 'materialized')) <= 1e-5  # float32 exact: the Triton forward ran


def test_off_a_gpu_the_model_falls_back_without_the_interpreter(caplog, monkeypatch):
  # As users run it on a CPU (the tests' interpreter switch off): both MGPU options log one line each and the Triton
  # kernels (interpreted) compute the float32-exact result, never the minutes-long Mosaic GPU interpreter.
  monkeypatch.setattr(fm, 'INTERPRET_OFF_GPU', False)
  monkeypatch.setattr(fm, 'forward', lambda *a, **k: pytest.fail('the MGPU forward ran'))
  monkeypatch.setattr(fmb, 'backward', lambda *a, **k: pytest.fail('the MGPU backward ran'))
  run, params = _layer(fused_backward='mgpu')
  x = jax.random.normal(jax.random.key(3), (1, 5, 16))
  fused_lib._log_once.cache_clear()
  fused_lib._log_kernels.cache_clear()
  with caplog.at_level(logging.INFO):
    out, grads = jax.value_and_grad(lambda params: jnp.sum(run(params, x, None) ** 2))(params)
  ran = [r.getMessage() for r in caplog.records if r.getMessage().startswith('selective_impl=fused runs')]
  assert ran == ['selective_impl=fused runs the Triton forward and the merged Triton backward'], ran  # after both
  lines = sorted(r.getMessage() for r in caplog.records if 'mgpu cannot' in r.getMessage())
  why = '(the cpu backend is not a Hopper GPU (the Mosaic GPU interpreter is for tests))'
  assert lines == [f'model.fused_backward=mgpu cannot take this call {why}: running the merged Triton backward',
                   f'model.fused_forward=mgpu cannot take this call {why}: running the Triton forward'], lines
  ref, ref_grads = jax.value_and_grad(lambda params: jnp.sum(run(params, x, 'materialized') ** 2))(params)
  assert _rel(out, ref) <= 1e-5
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    assert _rel(a, b) <= 1e-5


class _FakeDevice:
  def __init__(self, platform, cc):
    self.platform, self.compute_capability, self.device_kind = platform, cc, f'fake {platform} {cc}'


@pytest.mark.parametrize('platform,cc,mesh,interpret,expect', [
    ('gpu', '9.0', 1, False, ('mgpu', 'mgpu')),  # one Hopper GPU, compiled
    ('gpu', '8.0', 1, False, ('triton', 'merged')),  # an A100: no wgmma
    ('gpu', '9.0', 2, False, ('triton', 'merged')),  # under a 2-device mesh (shard_map): not measured there
    ('gpu', '9.0', 1, True, ('triton', 'merged')),  # interpreted (tests)
    ('cpu', '', 1, False, ('triton', 'merged'))])
def test_auto_picks_the_mosaic_gpu_kernels_on_one_hopper_gpu(platform, cc, mesh, interpret, expect, monkeypatch):
  monkeypatch.setattr(jax, 'devices', lambda *a: [_FakeDevice(platform, cc)])
  monkeypatch.setattr(fm, '_mesh_devices', lambda: mesh)
  got = fused_lib.resolve_auto('auto', 'auto', interpret)
  assert (got['forward'], got['backward']) == expect
  # Explicit names are kept, either side.
  assert fused_lib.resolve_auto('triton', 'auto', interpret) == {'forward': 'triton', 'backward': expect[1]}
  assert fused_lib.resolve_auto('auto', 'split', interpret) == {'forward': expect[0], 'backward': 'split'}
  # The linear generator (identity activation): Triton's, silently.
  assert fused_lib.resolve_auto('auto', 'auto', interpret, 'identity') == {'forward': 'triton', 'backward': 'merged'}


def test_auto_on_a_hopper_gpu_falls_back_with_its_own_line(caplog, monkeypatch):
  # 'auto' resolved to the Mosaic GPU kernels (as on one H200), which cannot take this call (here: no Hopper GPU
  # to compile for): one line each naming auto, and Triton's float32-exact result.
  monkeypatch.setattr(fused_lib, 'resolve_auto', lambda *a: {'forward': 'mgpu', 'backward': 'mgpu'})
  monkeypatch.setattr(fm, 'INTERPRET_OFF_GPU', False)
  run, params = _layer(fused_forward='auto', fused_backward='auto')
  x = jax.random.normal(jax.random.key(4), (1, 5, 16))
  fused_lib._log_once.cache_clear()
  with caplog.at_level(logging.WARNING):
    grads = jax.grad(lambda params: jnp.sum(run(params, x, None) ** 2))(params)
  lines = sorted(r.getMessage() for r in caplog.records if 'cannot take' in r.getMessage())
  why = '(the cpu backend is not a Hopper GPU (the Mosaic GPU interpreter is for tests))'
  assert lines == [f'model.fused_backward=auto (the Mosaic GPU kernels) cannot take this call {why}: running the '
                   'merged Triton backward',
                   f'model.fused_forward=auto (the Mosaic GPU kernels) cannot take this call {why}: running the '
                   'Triton forward'], lines
  ref = jax.grad(lambda params: jnp.sum(run(params, x, 'materialized') ** 2))(params)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref)):
    assert _rel(a, b) <= 1e-5


# kv_hidden 1024: u and w rows of 1024 hidden units, > 227 KB of shared memory. 320 fits, but a key's w row is one
# TMA copy, at most 256 elements: before this refusal the kernel failed to lower there (probed on CPU).
@pytest.mark.parametrize('kv_hidden,why', [(1024, 'bytes of shared memory'),
                                           (320, 'its w rows of 320 hidden units exceed one TMA copy (256)')])
def test_shared_memory_overflow_falls_back_to_the_triton_forward(caplog, kv_hidden, why):
  run, params = _layer(kv_hidden=kv_hidden)
  x = jax.random.normal(jax.random.key(2), (1, 5, 16))
  out, lines = _logged_run(caplog, run, params, x)
  assert len(lines) == 1 and why in lines[0] and lines[0].endswith('running the Triton forward'), lines
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


# ----------------------------------------------------------------------------------------------------------------
# The Mosaic GPU backward (fused_mgpu_bwd.py).

def _backward_args(seed, rope, n, h, f, t):
  """fused.py's padded arrays, the forward's (G, lse) and a random cotangent dG."""
  p, q, x, _ = _inputs(seed, 1, t, n, h, f)
  u, w, w2k, b2k, _, _, _ = attn_lib.MlpKV.fused_inputs(attn_lib.MlpKV.fused_params(p), q.reshape(1, t, -1), x)
  pos = jnp.arange(t)
  scale, args = fm.fused_inputs(q, u, w, w2k, b2k, pos, pos, 10000.0 if rope else None)
  g, lse = fm.transcription(*args, scale=scale)
  return scale, args, g, lse, jax.random.normal(jax.random.key(seed + 1), g.shape)


def _errs5(got, ref, floor=0.0):
  names = ('dq', 'du', 'dw', 'dW2k', 'db2k')
  out = {}
  for k, a, r in zip(names, got, ref):
    a, r = np.asarray(a, np.float64), np.asarray(r, np.float64)
    assert a.shape == r.shape, (k, a.shape, r.shape)
    assert np.isfinite(a).all(), k  # (max() over the errors would pass a NaN by)
    out[k] = float(np.abs(a - r).max() / max(np.abs(r).max(), floor))
  return out


@pytest.mark.parametrize('rope,n,h,f,t', [(True, 2, 8, 100, 37), (False, 1, 6, 40, 21)])
def test_backward_transcription_in_float32_is_the_triton_backward(rope, n, h, f, t):
  scale, args, g, lse, dgo = _backward_args(t + f, rope, n, h, f, t)
  st = fm.triton_static(scale, n, f, interpret=True)
  ref = jax.jit(lambda *a: fused_lib._backward(st, a[:11], a[11])[:5])(*args, g, lse, dgo)
  got = jax.jit(lambda *a: fmb.transcription(*a, scale=scale, precision='float32'))(*args, g, lse, dgo)
  # db2k: without RoPE its true value is 0 (sum_j ds_ij = 0), so both are rounding noise: compared absolutely.
  errs = _errs5(got, ref, floor=1.0)
  assert max(errs.values()) <= 1e-5, errs


# The kernels interpreted against the bf16 transcription: the same arithmetic summed in another order, so dp, ds
# and dK differ in float32 rounding, and a dK element near a bfloat16 rounding boundary rounds the other way (one
# bfloat16 ulp, 2^-8 relative, on its products into dg and dW2k): seen up to 1.9e-4 of scale on dW2k and 8e-5 on
# dw, 1e-6 elsewhere; a wrong index or mask gives O(1). `small_smem` (a shared-memory limit) forces blocks of 32
# and one head per program in the query kernel, and at 150,000 bytes both heads in the key kernel (what kv_hidden
# 256 gets on a GPU), at 140,000 one: T = 40 in two key blocks and two query blocks, F = 100 in two hidden chunks.
# keep_hidden (the default) applies with one hidden chunk (F <= 64): GELU' kept from the logits' pass; False
# recomputes it (as with several chunks). T = 70: two query tiles and two key blocks, the first tile's second key
# block (and the key kernel's tile pair likewise) has no visible pair: such programs write nothing, masked outside
# (without the mask this case fails). With two hidden chunks the logits come first (the default there): the key
# kernel reads the query kernel's p and ds, masking the pairs it left unwritten (without that mask the F = 100 case
# fails); then the same in one pass (logits_first=False). With the logits first the key kernel sums du too
# (du_by_keys, the default): its terms dh rounded to bfloat16 per head group, as the transcription with du_heads
# rounds them (seen: 5.5e-5 of scale, rounding boundaries again; without du_heads 1.6e-3, and a wrong row of the
# one-hot A gives O(1)). There dg's p dG term is a wgmma too (pdg_wgmma, the default with du_by_keys and
# dg_one_acc), p and dG rounded to bfloat16 as the transcription with pdg rounds them (without pdg: du off by 4.1e-3
# of scale); the last case has it with one head a key-kernel program (16 queries a B tile), the 150,000 one with two
# (8 queries a tile).
@pytest.mark.parametrize('rope,n,h,f,t,small_smem,keep,first,kps', [(True, 2, 8, 40, 37, 0, True, None, 2),
                                                                    (False, 1, 6, 40, 70, 0, False, None, 2),
                                                                    (True, 2, 8, 100, 40, 150_000, True, None, 2),
                                                                    (True, 2, 8, 100, 39, 140_000, True, None, 4),
                                                                    (True, 2, 8, 100, 40, 140_000, True, None, 'q'),
                                                                    (True, 2, 8, 100, 40, 140_000, True, False, 2),
                                                                    (True, 2, 8, 100, 39, 140_000, True, None, 2)])
def test_backward_kernels_interpreted_match_the_transcription(rope, n, h, f, t, small_smem, keep, first, kps,
                                                              monkeypatch):
  # keys_per_step (kps): the logits' pass takes that many keys a step; at T = 39 the second key block has 7 keys,
  # so its last step of 4 takes a key that no query sees (p and ds 0, as the transcription has them).
  scale, args, g, lse, dgo = _backward_args(3 * t + f, rope, n, h, f, t)
  if small_smem:
    monkeypatch.setattr(fmb, 'SMEM_BYTES', small_smem)
  # 'q': keys_per_step 1, du summed by the query kernel's pass 2 (du_by_keys off), which holds the rotated queries
  # in registers (keep_q).
  # With 4 keys a step the key kernel also holds a chunk's w rows in registers (hold_w) and writes all its dW2k out
  # at the end (dw2_rounds off); the others write each chunk's out after its round of chunks (dw2_rounds, the
  # default: two rounds here, one warpgroup). Options off by default are turned on in one case each, and those on
  # by default off in one.
  extra = dict(keys_per_step=1, keep_q=True, du_by_keys=False) if kps == 'q' else dict(keys_per_step=kps)
  if f <= 64 and rope:  # one pass: the key kernel holds RoPE's rows across the queries (hold_rope, off by default)
    extra['hold_rope'] = True
  if kps == 4:  # and the key kernel's dg per head, each query's wgmmas waited for, du's 64 rows out
    extra.update(hold_w=True, dw2_rounds=False, dg_one_acc=False, wgmma_overlap=False, du_block_rows=False,
                 half_hidden=False)  # and u, w not halved
  if f <= 64 and not rope:  # one pass: dg's heads one accumulator each, waited for; the tables copied into shared
    extra.update(dg_one_acc=False, wgmma_overlap=False, tables_in_gmem=False)  # memory
  if small_smem == 150_000:  # the query kernel's K in one accumulator over the chunks (off by default)
    extra['q_one_acc'] = True
  opts = fmb.Options(keep_hidden=keep, logits_first=first, **extra)
  d = fmb._dims(args[0], args[2], opts)
  blocks = {0: (n, n, 64, 64), 140_000: (1, 1, 32, 32), 150_000: (1, 2, 32, 32)}[small_smem]
  assert (d.hq, d.hk, d.kb, d.qb, d.lq) == (*blocks, f > 64 and first is None), d
  got = jax.jit(lambda *a: fmb.backward(*a, scale=scale, opts=opts, interpret=fm.interpreter()))(*args, g, lse, dgo)
  ref = fmb.transcription(*args, g, lse, dgo, scale=scale, du_heads=d.hk if d.kdu else 0, pdg=fmb.folds_pdg(d, opts))
  errs = _errs5(got, ref, floor=1.0 if not rope else 0.0)
  # du summed by the key kernel has bfloat16 terms, so it sees rounding-boundary flips too (this machine's CPU
  # decides which: 1.1e-4 of scale in the 4-keys case on one, under 1e-4 on another); summed by the query kernel
  # it is float32.
  tight = ('dq', 'db2k') if d.kdu else ('dq', 'du', 'db2k')
  assert max(errs.values()) <= 1e-3 and max(errs[k] for k in tight) <= 1e-4, errs


@pytest.mark.parametrize('rope,n,h,f,t', [*KERNEL_CASES, (True, 2, 8, 100, 37)])
def test_mgpu_forward_and_backward_train_like_materialized(rope, n, h, f, t):
  # Both kernels: bfloat16 matmul operands throughout (the key layer, dg's and dW2k's products), the forward's lse
  # consistent with the backward's recomputed logits, so the gradients are closer than with the Triton backward
  # (seen: output <= 4.9e-4, gradients <= 1.5e-3 of their scale, against 2.7e-3 in the test above). F = 100: two
  # hidden chunks, so the logits first in both kernels and du summed by the key kernel (its terms in bfloat16;
  # seen: output 4.3e-4, gradients <= 1.6e-3 of their scale, on W1).
  p, q, x, cot = _inputs(5 * t + f, 1, t, n, h, f)
  got = _value_and_grads('fused', p, q, x, cot, rope, fused_lib.Blocks(forward='mgpu', backward='mgpu'))
  errs = _errors(got, _value_and_grads('materialized', p, q, x, cot, rope))
  assert errs['out'] <= 2e-3 and max(errs.values()) <= 5e-3, errs


def test_backward_shared_memory_overflow_falls_back_to_merged(caplog):
  run, params = _layer(kv_hidden=1024, fused_forward='triton', fused_backward='mgpu')
  x = jax.random.normal(jax.random.key(2), (1, 5, 16))
  fused_lib._log_once.cache_clear()
  with caplog.at_level(logging.WARNING):
    loss = lambda params: jnp.sum(run(params, x, None) ** 2)  # noqa: E731
    grads = jax.grad(loss)(params)
  lines = [r.getMessage() for r in caplog.records if 'fused_backward' in r.getMessage()]
  assert len(lines) == 1 and 'bytes of shared memory' in lines[0], lines
  assert lines[0].endswith('running the merged Triton backward')
  ref = jax.grad(lambda params: jnp.sum(run(params, x, 'materialized') ** 2))(params)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref)):
    assert _rel(a, b) <= 1e-5


def _backward_shapes(b, t, n, h, f):
  """(scale, fused.py's padded backward arguments, those and the residuals as shapes) of zeros at B T N H F."""
  scale, args = fm.fused_inputs(jnp.zeros((b, t, n, h)), jnp.zeros((b, t, f)), jnp.zeros((b, t, f)),
                                jnp.zeros((f, n * h)), jnp.zeros((n * h,)), jnp.arange(t), jnp.arange(t), 10000.0)
  tp, fp = args[0].shape[1], args[2].shape[2]
  res = [jnp.zeros((b, tp, n, fp)), jnp.zeros((b, n, tp)), jnp.zeros((b, tp, n, fp))]
  return scale, args, [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (*args, *res)]


def _assert_backward_lowers(scale, shapes, opts):
  lowered = jax.jit(lambda *a: fmb.backward(*a, scale=scale, opts=opts)).trace(*shapes).lower(
      lowering_platforms=('cuda',))
  assert lowered.as_text().count('mosaic_gpu') >= 2


# Two warpgroups (the default on a GPU) are checked here and on the GPU only (docs/bench/fused_mgpu_bwd_sweep_h200.json
# and, logits first, fused_mgpu_bwd_sweep_lf2_h200.json record the same errors against the transcription as with
# one): interpreted, two warpgroups waiting on the same TMA barriers hang in most runs (the forward's do too), with or
# without this kernel's own barriers, so interpreted runs use one.
@pytest.mark.skipif(not _lowers_for_cuda(), reason='lowering for cuda is unavailable here')
@pytest.mark.parametrize('f,expect,opts', [(64, (2, 2, 64, 64), {}), (256, (1, 2, 32, 32), {}),
                                           (256, (1, 1, 32, 32), {'logits_first': False}),
                                           (256, (1, 2, 32, 32), {'dw2_rounds': False}),
                                           (256, (1, 1, 32, 64), {'key_heads': 1}),
                                           (256, (1, 2, 32, 32), {'dg_one_acc': False}),
                                           (256, (1, 2, 32, 32), {'du_block_rows': False}),
                                           (256, (1, 2, 32, 32), {'q_one_acc': True}),
                                           (256, (1, 2, 32, 32), {'wgmma_overlap': False}),
                                           (256, (1, 2, 32, 32), {'tables_in_gmem': False}),
                                           (256, (1, 2, 32, 32), {'pdg_wgmma': False, 'half_hidden': False}),
                                           (64, (2, 2, 64, 64), {'dg_one_acc': False, 'wgmma_overlap': False}),
                                           (64, (2, 2, 64, 64), {'warpgroups': 1, 'keep_hidden': False,
                                                                 'approx_math': False})])
def test_backward_kernels_lower_for_cuda_at_the_original_config(f, expect, opts):
  # B16 T299 N2 H32: Mosaic GPU's Python lowering (layouts, wgmma operands, TMA copies, shared memory), not ptxas.
  scale, args, shapes = _backward_shapes(16, 299, 2, 32, f)
  opts = fmb.Options(**opts)
  d = fmb._dims(args[0], args[2], opts)
  assert (d.hq, d.hk, d.kb, d.qb, d.wgs) == (*expect, opts.warpgroups or 2), d
  _assert_backward_lowers(scale, shapes, opts)


# The per-tile tables grow as T^2. Read from global memory (tables_in_gmem, the default) the blocks of T 299 stay
# at any length, and the kernels lower at T 1024 and 2048. Copied into shared memory they are refused past one TMA
# copy's 256 entries (the key kernel's has 1024 at T 1024: before that refusal the kernels failed to lower there),
# and at 2048 they would not fit in shared memory.
@pytest.mark.skipif(not _lowers_for_cuda(), reason='lowering for cuda is unavailable here')
@pytest.mark.parametrize('t,copied', [(1024, 'have 1024 entries'), (2048, 'bytes of shared memory')])
def test_backward_tables_in_global_memory_keep_long_contexts(t, copied):
  scale, args, shapes = _backward_shapes(1, t, 2, 32, 256)
  assert copied in fmb._dims(args[0], args[2], fmb.Options(tables_in_gmem=False))
  d = fmb._dims(args[0], args[2])
  assert (d.hq, d.hk, d.kb, d.qb) == (1, 2, 32, 32)
  _assert_backward_lowers(scale, shapes, fmb.Options())


# The query kernel copies a key's w row whole, one TMA copy of at most 256 elements: kv_hidden 320 needs 267,264 bytes
# of shared memory, refused for that first, and for its w rows where that fits.
def test_backward_refuses_w_rows_longer_than_one_copy(monkeypatch):
  _, args, _ = _backward_shapes(1, 64, 1, 8, 320)
  assert 'bytes of shared memory' in fmb._dims(args[0], args[2])
  monkeypatch.setattr(fmb, 'SMEM_BYTES', 10**6)
  assert fmb._dims(args[0], args[2]) == 'its w rows of 320 hidden units exceed one TMA copy (256)'


# A refusal for shared memory names the kernel that does not fit and the least it would need: with key_heads=4 at
# N4 H8 kv_hidden 128 the key kernel needs more than an SM has even with 32 queries (the query kernel fits with
# one head). The message once reported the one-head need of both kernels, a number below the limit.
def test_backward_shared_memory_refusal_names_the_kernel_and_what_it_needs():
  scale, args, _ = _backward_shapes(2, 299, 4, 8, 128)
  why = fmb._dims(args[0], args[2], fmb.Options(key_heads=4, warpgroups=1))
  assert why.startswith('the backward needs ') and why.endswith(f'(> {fmb.SMEM_BYTES}) in its key kernel'), why
  need = int(why.split()[3])
  t, h2 = args[0].shape[1], args[0].shape[4]  # padded: heads of 8 are 2 x 16 wide here
  probe = fmb._Dims(tq=0, sk=0, kb=0, qb=0, hq=0, hk=0, b=2, t_in=t, s_in=t, f_in=128, n=4, h2=h2, fp=128, gm=True)
  assert need == fmb._k_smem(probe, 32, 4, t, t, 1, True, True) > fmb.SMEM_BYTES


@pytest.mark.parametrize('opts,match', [({'block_k': 48}, 'block_k=48 is not 32, 64 or 128'),
                                        ({'block_q': 16}, 'block_q=16 is not 32, 64 or 128'),
                                        ({'heads_per_program': 2}, 'heads_per_program=2 does not divide the 3 heads'),
                                        ({'key_heads': 2}, 'key_heads=2 does not divide the 3 heads'),
                                        ({'warpgroups': 3}, 'warpgroups=3 is not 1 or 2'),
                                        ({'keys_per_step': 3}, 'keys_per_step=3 is not 1, 2 or 4'),
                                        ({'block_q': 128, 'du_by_keys': False}, 'bytes of shared memory'),
                                        ({'block_q': 128}, 'block_q=128 with du_by_keys')])
def test_backward_options_it_cannot_take_are_refused_in_one_line(opts, match):
  f = 1024 if opts.get('block_q') == 128 else 40  # 128 queries of 1024 hidden units: > 227 KB
  scale, args = fm.fused_inputs(jnp.zeros((1, 37, 3, 8)), jnp.zeros((1, 37, f)), jnp.zeros((1, 37, f)),
                                jnp.zeros((f, 24)), jnp.zeros((24,)), jnp.arange(37), jnp.arange(37), None)
  tp, fp = args[0].shape[1], args[2].shape[2]
  res = (jnp.zeros((1, tp, 3, fp)), jnp.zeros((1, 3, tp)), jnp.zeros((1, tp, 3, fp)))
  with pytest.raises(ValueError, match=match) as e:
    fmb.backward(*args, *res, scale=scale, opts=fmb.Options(**opts))
  assert '\n' not in str(e.value)


# ----------------------------------------------------------------------------------------------------------------
# Meshes. Under `seq` and `tensor` splits attention.py calls fused.attention inside shard_map on each device's share:
# its zigzag query positions against all (gathered) keys, or its heads with the whole query as the generator's
# input. On a GPU the kernels run there as on one device; on the CPU Mosaic GPU's interpret mode fails under a
# multi-device mesh, so each device's share is checked here on one device, and the mesh run on the CPU must fall
# back to the Triton kernels with one line each.

def _zigzag(t, devices):
  """The trainer's token order under `seq`: device r holds chunks r and 2 devices - 1 - r of t / (2 devices)."""
  chunks = np.arange(t).reshape(2 * devices, t // (2 * devices))
  return np.concatenate([np.concatenate([chunks[r], chunks[2 * devices - 1 - r]]) for r in range(devices)])


def _local_value_and_grads(impl, p, q, x, cot, rows, heads, blocks):
  """One device's share: queries `rows` and `heads` of q, every key; gradients of the whole p, q and x."""
  b, t, n, h = q.shape
  pos = jnp.asarray(_zigzag(t, 2))
  q_pos, cols = pos[rows], np.concatenate([np.arange(k * h, (k + 1) * h) for k in heads])

  def loss(p, q, x):
    d = n * h
    qf, ql = q[:, rows].reshape(b, len(rows), d), q[:, rows][:, :, heads]
    if impl == 'materialized':
      pl = {'w1': p['w1'], 'b1': p['b1'], 'w2': jnp.concatenate([p['w2'][:, cols], p['w2'][:, d + cols]], axis=1),
            'b2': jnp.concatenate([p['b2'][cols], p['b2'][d + cols]])}
      out = attn_lib.selective_materialized(attn_lib.MlpKV, pl, ql, x, q_pos, pos, 10000.0, qf=qf)
    else:
      fp = attn_lib.MlpKV.fused_params(p)
      fp = {**fp, 'w2k': fp['w2k'][:, cols], 'b2k': fp['b2k'][cols], 'w2v': fp['w2v'][:, cols],
            'b2v': fp['b2v'][cols]}
      out = attn_lib.selective_fused(attn_lib.MlpKV, fp, ql, x, q_pos, pos, 10000.0, blocks, qf=qf)
    return jnp.sum(out * cot), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(p, q, x)
  return out, grads


@pytest.mark.parametrize('split,rows,heads', [('seq', _zigzag(32, 2)[:16], [0, 1]),
                                              ('tensor', np.arange(32), [1])])
def test_mgpu_kernels_on_one_devices_share_under_a_mesh(split, rows, heads):
  # seq=2: device 0's queries (positions 0-7 and 24-31) against keys in the gathered zigzag order (not monotonic);
  # tensor=2: device 1's head, the generator fed the whole query. Tolerances of the single-device test above.
  del split
  p, q, x, _ = _inputs(11, 1, 32, 2, 8, 40)
  cot = jax.random.normal(jax.random.key(12), (1, len(rows), len(heads), 8))
  both = fused_lib.Blocks(forward='mgpu', backward='mgpu')
  got = _local_value_and_grads('fused', p, q, x, cot, rows, heads, both)
  errs = _errors(got, _local_value_and_grads('materialized', p, q, x, cot, rows, heads, both))
  assert errs['out'] <= 2e-3 and max(errs.values()) <= 5e-3, errs


def test_under_a_multi_device_mesh_the_interpreter_is_not_used(caplog):
  # Traced only, under an abstract 2-device mesh (as inside shard_map): the Triton kernels, one line each.
  both = fused_lib.Blocks(forward='mgpu', backward='mgpu')
  p, q, x, cot = _inputs(13, 1, 16, 2, 8, 40)
  pos = jnp.arange(16)

  def loss(p, q, x):
    out = attn_lib.selective_fused(attn_lib.MlpKV, attn_lib.MlpKV.fused_params(p), q, x, pos, pos, None, both)
    return jnp.sum(out * cot)

  fused_lib._log_once.cache_clear()
  mesh = jax.sharding.AbstractMesh((2,), ('seq',))
  with caplog.at_level(logging.WARNING), jax.sharding.use_abstract_mesh(mesh):
    jaxpr = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(p, q, x))
  assert 'selective_fused_fwd' in jaxpr and 'selective_fused_bwd_merged' in jaxpr and 'mgpu' not in jaxpr
  why = 'Mosaic GPU interpret mode fails under a 2-device mesh'
  assert [r.getMessage() for r in caplog.records if 'cannot take' in r.getMessage()] == [
      f'model.fused_forward=mgpu cannot take this call ({why}): running the Triton forward',
      f'model.fused_backward=mgpu cannot take this call ({why}): running the merged Triton backward']


@pytest.mark.slow  # 16-26 s: a subprocess compiling two meshes; the test above traces the same fallback
def test_meshes_on_the_cpu_fall_back_to_the_triton_kernels(tmp_path):
  # 2 fake CPU devices in a subprocess (tests/mesh_check.py fused_mgpu): seq=2 (zigzag) and tensor=2, against one
  # device's Triton kernels. The Triton kernels in float32 agree to rounding (1e-5); had the interpreted Mosaic GPU
  # kernels run, their bfloat16 key layer would differ by ~1e-3.
  res = mc.Worker(['fused_mgpu'], 2, str(tmp_path / 'fused_mgpu.log'), timeout=600).result()
  assert set(res) == set(mc.MGPU_MESHES)
  for name, r in res.items():
    assert r['kernels'] == ['selective_fused_bwd_merged', 'selective_fused_fwd'], (name, r)
    assert r['kernel_q'] == [[2, 16, 1 if name == 'tensor2' else 2, 2, 16]], (name, r)  # each device its share
    why = 'Mosaic GPU interpret mode fails under a 2-device mesh'
    assert r['lines'] == [f'model.fused_forward=mgpu cannot take this call ({why}): running the Triton forward',
                          f'model.fused_backward=mgpu cannot take this call ({why}): running the merged Triton '
                          'backward'], (name, r)
    assert r['leaves'] == 7 and r['max_rel_diff'] <= 1e-5, (name, r)


# ----------------------------------------------------------------------------------------------------------------
# bf16 models (model.dtype='bfloat16'): q, u, w, W2k arrive in bfloat16; both kernels take them as float32 (exact)
# and round the key layer's operands to bfloat16 as in float32 models, and fused.py casts the gradients back to
# the inputs' dtypes.

def test_bf16_model_runs_the_mgpu_kernels_and_trains_like_materialized(caplog):
  cfg = dict(vocab_size=7, attention='selective', kv_generator='mlp', kv_hidden=40, d_model=16, num_heads=2,
             selective_impl='fused', dtype='bfloat16')
  x = jax.random.normal(jax.random.key(3), (1, 37, 16))
  cot = jax.random.normal(jax.random.key(4), (1, 37, 16))
  params = None

  def run(impl, **kw):
    nonlocal params
    layer = attn_lib.SelectiveAttention(config_lib.ModelConfig(**{**cfg, **kw}), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(layer)
    params = state if params is None else params  # float32 parameters, the same for every variant

    def loss(params, x):
      out = nnx.merge(graphdef, params)(x, jnp.arange(x.shape[1]), impl=impl)
      return jnp.sum(out.astype(jnp.float32) * cot), out

    traced = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True)).trace(params, x)
    return traced.lower().compile()(params, x), str(traced.jaxpr)

  fused_lib._log_once.cache_clear()
  fused_lib._log_kernels.cache_clear()
  with caplog.at_level(logging.INFO):
    (got, jaxpr) = run(None, fused_forward='mgpu', fused_backward='mgpu')
  assert not [r for r in caplog.records if 'cannot take' in r.getMessage()]
  ran = [r.getMessage() for r in caplog.records if r.getMessage().startswith('selective_impl=fused runs')]
  assert ran == ['selective_impl=fused runs the Mosaic GPU forward and the Mosaic GPU backward'], ran
  for name in ('selective_fused_fwd_mgpu', 'selective_fused_bwd_query_mgpu', 'selective_fused_bwd_key_mgpu'):
    assert name in jaxpr, name  # the Mosaic GPU kernels ran, no fallback
  assert got[1].dtype == jnp.bfloat16  # the layer's output in the model's dtype
  # Every parameter's gradient, x's and the output.
  errs = lambda a, b: [_rel(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]  # noqa: E731
  # The Triton kernels in the same bf16 model round the same operands to bfloat16 (W2k arrives in bfloat16 and they
  # cast g to W2k's dtype for the key matmul), so they differ only in float32 summation order, below the bfloat16
  # rounding of G and of the gradients (seen: bit-identical).
  assert max(errs(got, run(None)[0])) <= 1e-4
  # Against float32 `materialized`: bfloat16 has 8 mantissa bits (2^-9 = 2e-3 relative per rounding) and q, x, u,
  # w, the parameters and the output are each rounded: seen <= 9.0e-3 of scale. `materialized` in the same bf16
  # model is further off (seen 5.4e-2 and 7.5e-2 on the bias gradients: it sums the [T, S] pairs' terms in
  # bfloat16), so its error (or 1e-2) bounds ours per array; a wrong index or mask gives O(1).
  f32 = run('materialized', dtype='float32')[0]
  mat16 = errs(run('materialized')[0], f32)
  ours = errs(got, f32)
  assert max(ours) <= 2e-2 and all(e <= max(m, 1e-2) for e, m in zip(ours, mat16)), (ours, mat16)
