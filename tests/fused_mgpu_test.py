"""The Mosaic GPU forward prototype (fused_mgpu.py): its formulation, transcribed in jnp, against fused.py's forward
(interpreted) and `materialized`; the kernel itself lowered for cuda (running it needs a Hopper GPU:
docs/bench/fused_mgpu_check.py)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selattn.model import attention as attn_lib
from selattn.model import fused as fused_lib
from selattn.model import fused_mgpu as fm
from rel_error import rel as _rel

pytestmark = pytest.mark.usefixtures('no_mesh', 'mgpu_interpreter')


def _params(seed, b, t, n, h, f):
  d = n * h
  ks = jax.random.split(jax.random.key(seed), 6)
  p = {'w1': jax.random.normal(ks[0], (2 * d, f)) / np.sqrt(2 * d), 'b1': 0.3 * jax.random.normal(ks[1], (f,)),
       'w2': jax.random.normal(ks[2], (f, 2 * d)) / np.sqrt(f), 'b2': 0.3 * jax.random.normal(ks[3], (2 * d,))}
  return p, jax.random.normal(ks[4], (b, t, n, h)), jax.random.normal(ks[5], (b, t, d))


def _forward_args(p, q, x, rope):
  """The generator's (u, w, W2k, b2k) as selective_fused makes them, then fused.attention's padded arrays."""
  fp = attn_lib.MlpKV.fused_params(p)
  u, w, w2k, b2k, w2v, b2v, _ = attn_lib.MlpKV.fused_inputs(fp, q.reshape(*q.shape[:2], -1), x)
  pos = jnp.arange(q.shape[1])
  scale, args = fm.fused_inputs(q, u, w, w2k, b2k, pos, pos, 10000.0 if rope else None)
  return scale, args, (w2v, b2v)


def _output(g, w2v, b2v, n, h):
  """o_i = W2v_n^T G_i + b2v_n per head (fused.attention's last step)."""
  f = g.shape[-1]
  return jnp.einsum('btnf,fnh->btnh', g, w2v.reshape(f, n, h), precision='highest') + b2v.reshape(1, 1, n, h)


# T = 37 and 70 are not multiples of the 64-query tile (70: two query tiles, the second with 6 queries); F = 40
# and 100 are padded to 64 and 128 hidden units (one and two chunks); key blocks of 32 and 64 and the default
# (64): several blocks, their partial softmaxes combined, some invisible to a whole query tile.
@pytest.mark.parametrize('n,h,f,t,block_k,rope', [(2, 8, 40, 37, 32, True), (2, 6, 100, 70, 64, True),
                                                  (1, 8, 40, 70, 0, False)])
def test_transcription_matches_the_triton_forward_and_materialized(n, h, f, t, block_k, rope):
  p, q, x = _params(3 * t + f, 2, t, n, h, f)
  scale, args, (w2v, b2v) = _forward_args(p, q, x, rope)
  st = fm.triton_static(scale, n, f, interpret=True)
  g_ref, lse_ref = jax.jit(lambda *a: fused_lib._forward(st, *a))(*args)
  opts = fm.Options(block_k=block_k, precision='float32')
  g, lse = jax.jit(lambda *a: fm.transcription(*a, scale=scale, opts=opts))(*args)
  assert g.shape == g_ref.shape and lse.shape == lse_ref.shape
  assert _rel(g[:, :t], g_ref[:, :t]) <= 1e-5
  assert _rel(lse[:, :, :t], lse_ref[:, :, :t]) <= 1e-5
  pos = jnp.arange(t)
  ref = attn_lib.selective_materialized(attn_lib.MlpKV, p, q, x, pos, pos, 10000.0 if rope else None)
  assert _rel(_output(g[:, :t, :, :f], w2v, b2v, n, h), ref) <= 1e-5


def test_bf16_key_layer_error():
  # The kernel's key layer takes bfloat16 operands (g and W2k rounded, float32 accumulation). At the original
  # config's head and hidden sizes (N2 H32 F64, T 150) that moves G by 3.9e-4 of its scale against float32 (and
  # the log-sum-exp by 6e-3; 4.8e-4 and 3e-3 at F256), about the Triton forward's TF32 error (4.7e-4 on the output,
  # docs/bench/fused_agreement_h200.json).
  p, q, x = _params(5, 1, 150, 2, 32, 64)
  scale, args, _ = _forward_args(p, q, x, True)
  run = lambda prec: jax.jit(lambda *a: fm.transcription(*a, scale=scale, opts=fm.Options(precision=prec)))(*args)
  (g32, lse32), (g16, lse16) = run('float32'), run('bf16')
  err = _rel(g16, g32)
  assert 1e-5 < err < 1e-2, err  # rounded (not the float32 path) and close
  assert _rel(lse16, lse32) < 1e-2


def _gpu_interpreter():
  try:
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # noqa: PLC0415
  except ImportError:
    return None
  return InterpretGPUParams()


# The kernel itself in Mosaic GPU's interpret mode (CPU; simulated shared memory, barriers, wgmma; not register
# layouts): against the bf16 transcription, the same arithmetic. T = 70 is two query tiles (the second part
# padding), block_k 32 three key blocks (the last part padding, the first query tile sees one), F = 100 two hidden
# chunks (G of each head and chunk kept apart: a mixed-up index once passed N = 1 and F <= 64), two heads, the
# logits first (the default with several chunks), then the same in one pass, then 4 keys a step of the logits' pass
# (the second tile's last step runs past its last key); three heads without RoPE, u and the
# queries held in registers; RoPE with one head per program (three head groups). Not `warpgroups=2`: interpreted,
# it matched the transcription in most runs but hung in some (T = 70, kv_hidden 100 or one head per program; not
# understood), so it is only lowered here and run on the GPU (docs/bench/fused_mgpu_check.py).
@pytest.mark.skipif(_gpu_interpreter() is None, reason='no Mosaic GPU interpret mode in this jax')
@pytest.mark.parametrize('n,h,f,t,block_k,rope,opts', [(2, 6, 100, 70, 32, True, {}),
                                                       (2, 6, 100, 70, 32, True, {'logits_first': False}),
                                                       (2, 6, 100, 70, 32, True, {'keys_per_step': 4}),
                                                       (2, 6, 100, 70, 32, True, {'tables_in_gmem': False}),
                                                       (2, 6, 100, 70, 32, True, {'half_hidden': False}),
                                                       (2, 6, 100, 70, 32, True, {'combine_live': False}),
                                                       (3, 8, 40, 37, 0, False, {'keep_u': True, 'keep_q': True}),
                                                       (3, 8, 40, 37, 0, True, {'heads_per_program': 1})])
def test_kernel_interpreted_matches_the_transcription(n, h, f, t, block_k, rope, opts):
  p, q, x = _params(7 * t + f, 1, t, n, h, f)
  scale, args, _ = _forward_args(p, q, x, rope)
  opts = fm.Options(block_k=block_k, **opts)
  g, lse = jax.jit(lambda *a: fm.forward(*a, scale=scale, opts=opts, interpret=_gpu_interpreter()))(*args)
  g_ref, lse_ref = jax.jit(lambda *a: fm.transcription(*a, scale=scale, opts=opts))(*args)
  assert _rel(g[:, :t], g_ref[:, :t]) <= 1e-6
  assert _rel(lse[:, :, :t], lse_ref[:, :, :t]) <= 1e-6


# Options.combine_live: the partials combined by a Triton kernel that loads only those the programs wrote. Partials
# no program wrote hold NaN here (on a GPU: whatever the memory held), so a dead partial read or weighted by
# anything fails it; XLA's combine (what the forward ran before) on the same data, dead partials zeroed, is the
# reference. Hidden units of 192 per head take 64-unit column blocks, 256 take 128.
@pytest.mark.parametrize('f', [192, 256])
def test_the_live_partials_combine_matches_xla_and_reads_no_dead_partial(f):
  rng = np.random.default_rng(f)
  d = fm._dims(jnp.zeros((3, 130, 2, 2, 16)), jnp.zeros((3, 130, f)), fm.Options(block_k=32))
  splits = d.n_kb * d.per_block
  live = rng.random((splits, d.n_q)) < 0.6
  shape5 = (d.b, splits, d.n_q, fm.BQ, d.n * d.fp)
  g = rng.standard_normal(shape5).astype(np.float32)
  m = (3 * rng.standard_normal((d.b, splits, d.n, d.n_q, fm.BQ))).astype(np.float32)
  l = rng.random(m.shape).astype(np.float32)
  wrote5, wrote_ml = live[None, :, :, None, None], live[None, :, None, :, None]
  raw_g = np.where(wrote5, g, np.nan).reshape(d.b, splits, d.tq, d.n * d.fp)
  raw_m, raw_l = (np.where(wrote_ml, x, np.nan).reshape(d.b, splits, d.n, d.tq) for x in (m, l))
  got_g, got_lse = fm._combine_live(d, jnp.asarray(raw_g), jnp.asarray(raw_m), jnp.asarray(raw_l), jnp.asarray(live),
                                    interpret=True)
  want_g, want_lse = fm._combine(d, jnp.asarray(np.where(wrote5, g, 0.0)).reshape(d.b, splits, d.tq, d.n, d.fp),
                                 jnp.asarray(np.where(wrote_ml, m, fm._MASKED).reshape(raw_m.shape)),
                                 jnp.asarray(np.where(wrote_ml, l, 0.0).reshape(raw_l.shape)))
  assert np.isfinite(np.asarray(got_g)).all() and np.isfinite(np.asarray(got_lse)).all()
  assert _rel(got_g, want_g) <= 1e-6
  assert _rel(got_lse, want_lse) <= 1e-6


# Options.half_hidden: the kernels take u and w halved and start the GELU (and its derivative) from h / 2, one
# multiply fewer. The claim is bit-for-bit equality with the GELU of h, over magnitudes from subnormal to overflow
# (where both give the same infinities and NaNs); a wrong constant, 4 C A for 8 C A say, fails it by far.
def test_the_gelu_from_half_of_h_is_the_gelu_of_h_bit_for_bit():
  from selattn.model import fused_mgpu_bwd as fmb  # noqa: PLC0415

  rng = np.random.default_rng(0)
  with np.errstate(over='ignore'):
    h = np.concatenate([(rng.standard_normal(100_000) * 10.0 ** e).astype(np.float32)
                        for e in (-40, -30, -3, 0, 1, 2, 19, 38)] + [np.float32([0.0, -0.0, 1.0, -1.0])])
  h = jnp.asarray(h)
  half = 0.5 * h
  np.testing.assert_array_equal(jax.jit(fm._gelu)(h), jax.jit(lambda x: fm._gelu(x, half=True))(half))
  both = jax.jit(lambda x: fmb._gelu_both(x))(h)
  both_half = jax.jit(lambda x: fmb._gelu_both(x, half=True))(half)
  for x, y in zip(both, both_half):
    np.testing.assert_array_equal(x, y)
  moderate = h[200_000:500_000]  # and it is the GELU (tanh form)
  np.testing.assert_allclose(fm._gelu(moderate), jax.nn.gelu(moderate, approximate=True), rtol=2e-6, atol=1e-6)


def _lowers_for_cuda() -> bool:
  """Whether a trivial Mosaic GPU kernel lowers for cuda here."""
  try:
    from jax.experimental.pallas import mosaic_gpu as plgpu  # noqa: PLC0415

    def body(x_ref, o_ref):
      o_ref[...] = x_ref[...] + 1.0

    f = plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((128,), jnp.float32))
    jax.jit(f).trace(jnp.zeros(128, jnp.float32)).lower(lowering_platforms=('cuda',))
  except Exception:  # noqa: BLE001 (any failure means: no cuda lowering here)
    return False
  return True


# The original config's shapes: B16 T299 N2 H32, kv_hidden 64 and 256 (the latter needs 215 KB of shared memory).
# Lowering runs Mosaic GPU's Python lowering (layouts, wgmma operand checks, shared-memory budget), not
# ptxas.
@pytest.mark.skipif(not _lowers_for_cuda(), reason='lowering for cuda is unavailable here')
@pytest.mark.parametrize('f,opts', [(64, {}), (256, {}), (256, {'logits_first': False}),
                                    (256, {'heads_per_program': 1}), (256, {'keys_per_step': 2}),
                                    (64, {'keep_u': True, 'keep_q': True}),
                                    (256, {'warpgroups': 2, 'heads_per_program': 1}), ((4, 64, 256), {}),
                                    (256, {'tables_in_gmem': False})])
def test_kernel_lowers_for_cuda_at_the_original_config(f, opts):
  b, t, n, h = 16, 299, 2, 32
  if isinstance(f, tuple):  # heads of 64 at kv_hidden 256: one head a program (the fallback above)
    n, h, f = f
  shapes = fm.fused_inputs(jnp.zeros((b, t, n, h)), jnp.zeros((b, t, f)), jnp.zeros((b, t, f)),
                           jnp.zeros((f, n * h)), jnp.zeros((n * h,)), jnp.arange(t), jnp.arange(t), 10000.0)
  scale, args = shapes
  args = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
  opts = fm.Options(**opts)
  lowered = jax.jit(lambda *a: fm.forward(*a, scale=scale, opts=opts)).trace(*args).lower(lowering_platforms=('cuda',))
  assert 'mosaic_gpu' in lowered.as_text()
  assert ('selective_fused_fwd_combine' in lowered.as_text()) == opts.combine_live  # the Triton combine


def _dims_of(b, t, n, h, f, opts=fm.Options()):
  _, args = fm.fused_inputs(jnp.zeros((b, t, n, h)), jnp.zeros((b, t, f)), jnp.zeros((b, t, f)), jnp.zeros((f, n * h)),
                            jnp.zeros((n * h,)), jnp.arange(t), jnp.arange(t), 10000.0)
  return fm._dims(args[0], args[2], opts)


# Heads per program by shared memory: all heads where they fit (the original config: both heads, 32 keys at
# kv_hidden 256, 64 at 64), else fewer. Heads of 64 at kv_hidden 256 need 417,408 bytes with all 4 heads (> 224,256)
# and 190,848 with one; 128 hidden units 184,448 with 2 of the 4. An explicit heads_per_program is kept.
@pytest.mark.parametrize('shape,expect', [((16, 299, 2, 32, 256), (32, 2)), ((16, 299, 2, 32, 64), (64, 2)),
                                          ((16, 299, 4, 64, 256), (32, 1)), ((16, 299, 4, 64, 128), (32, 2)),
                                          ((16, 299, 4, 64, 64), (32, 4))])
def test_heads_per_program_fall_back_to_what_fits_in_shared_memory(shape, expect):
  d = _dims_of(*shape)
  assert (d.kb, d.hp) == expect and fm.unsupported(d) is None, d
  assert fm._smem_bytes(d) <= fm.SMEM_BYTES
  if d.hp < shape[2]:  # the next larger head group that divides the heads did not fit
    larger = min(h for h in range(d.hp + 1, shape[2] + 1) if shape[2] % h == 0)
    assert fm._smem_bytes(dataclasses.replace(d, hp=larger)) > fm.SMEM_BYTES
  assert _dims_of(*shape, fm.Options(heads_per_program=shape[2])).hp == shape[2]


# The keys-to-visit table grows as T^2 / (64 block_k). Read from global memory (tables_in_gmem, the default), the
# blocks of T 299 (both heads, 32 keys) stay at any length and the kernel lowers at T 1024. Copied into shared
# memory it is refused past one TMA copy's 256 entries (at T 1024 it has 512: before that refusal the kernel failed
# to lower there), and at 8192 it would not even fit in shared memory. (At 8192 the kernel is refused all the same,
# for its partial results' size: 256 key blocks.)
@pytest.mark.parametrize('t,copied', [(299, (32, 2)), (1024, 'has 512 entries'), (8192, 'shared memory')])
def test_the_table_in_global_memory_keeps_the_blocks_at_long_contexts(t, copied):
  d = _dims_of(1, t, 2, 32, 256, fm.Options(tables_in_gmem=False))
  if isinstance(copied, str):
    assert copied in fm.unsupported(d)
  else:
    assert (d.kb, d.hp) == copied and fm.unsupported(d) is None
  g = _dims_of(1, t, 2, 32, 256)
  assert (g.kb, g.hp) == (32, 2)
  assert fm.unsupported(g) is None if t < 8192 else 'partial results' in fm.unsupported(g)
  assert fm._smem_bytes(g) == fm._smem_bytes(_dims_of(1, 64, 2, 32, 256))


@pytest.mark.skipif(not _lowers_for_cuda(), reason='lowering for cuda is unavailable here')
def test_kernel_lowers_for_cuda_at_a_long_context():
  scale, args = fm.fused_inputs(jnp.zeros((1, 1024, 2, 32)), jnp.zeros((1, 1024, 256)), jnp.zeros((1, 1024, 256)),
                                jnp.zeros((256, 64)), jnp.zeros((64,)), jnp.arange(1024), jnp.arange(1024), 10000.0)
  args = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
  lowered = jax.jit(lambda *a: fm.forward(*a, scale=scale)).trace(*args).lower(lowering_platforms=('cuda',))
  assert 'mosaic_gpu' in lowered.as_text()


# One unnormalised G per key block goes out and XLA combines them: at B4 T4096 N4 H64 kv_hidden 256 (blocks of 32
# keys, one head a program: it fits in shared memory) that is 128 of them, 8 GiB, so the kernel refuses it (the
# Triton forward runs there); the original config's 10 take 105 MB.
def test_a_forward_whose_partial_results_would_not_fit_is_refused():
  d = _dims_of(4, 4096, 4, 64, 256)
  assert (d.kb, d.hp) == (32, 1) and fm._smem_bytes(d) <= fm.SMEM_BYTES
  assert fm.unsupported(d) == 'its partial results (one G per block of 32 keys: 128 of them) would take 8.0 GiB (> 1)'
  assert fm._partial_bytes(_dims_of(16, 299, 2, 32, 256)) == 16 * 10 * 320 * 2 * 256 * 4


@pytest.mark.parametrize('opts,match', [({'block_k': 48}, 'block_k=48 is not a multiple of 32'),
                                        ({'heads_per_program': 2}, 'heads_per_program=2 does not divide the 3 heads'),
                                        ({'precision': 'float32'}, "bf16 only, not 'float32'"),
                                        ({'keys_per_step': 3}, 'keys_per_step=3 is not 1, 2 or 4'),
                                        ({'block_k': 4096}, 'bytes of shared memory')])
def test_options_the_kernel_cannot_take_are_refused_in_one_line(opts, match):
  p, q, x = _params(1, 1, 37, 3, 8, 40)
  scale, args, _ = _forward_args(p, q, x, True)
  with pytest.raises(ValueError, match=match):
    fm.forward(*args, scale=scale, opts=fm.Options(**opts))
