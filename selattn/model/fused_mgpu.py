"""The fused forward (fused.py's `_forward`) as a Mosaic GPU kernel for Hopper: `model.fused_forward='mgpu'`.

Under fused.py's custom VJP it replaces the Triton forward and feeds the same residuals (G, lse: same layout, same
meaning) to either backward; fused.attention falls back to the Triton forward (one logged line) where
`cannot_run` says why; `model.fused_forward='auto'` picks it on one Hopper GPU. On one H200 (jax 0.11.2, B16 T299
N2 H32, RoPE; the accurate tanh then): 0.27 ms a layer against the Triton forward's 0.63 at kv_hidden 64, 2.26
against 2.16 at 256 (docs/bench/fused_mgpu_check_h200.json). Programs with no key to visit return before copying
their inputs (the combine skips or masks their partials).
Checked on CPU (tests/fused_mgpu_test.py, fused_mgpu_train_test.py): the formulation (`transcription`) against
fused.py's forward and `materialized`; the kernel in Mosaic GPU's interpret mode (which simulates shared memory,
barriers and wgmma, not register layouts or timing) against the transcription, alone and in the training path; and
the kernel lowered for cuda (Mosaic's own checks of layouts, wgmma operands and shared memory, not ptxas).

Gradients. The Triton backward recomputes p_ij = exp(s_ij - lse_i) with float32 (TF32 on a GPU) logits against
this kernel's lse from bfloat16 key-layer logits, so each row's p is off by about exp(lse32_i - lse16_i): with the
kernel's G but the float32 lse the gradients' error against `materialized` falls 3 to 6 times (interpreted, N2 H32
F64 T70 RoPE: 1.2e-3 -> 2.2e-4 of scale on W1, 2.4e-3 -> 4.2e-4 on x). Measured on CPU: output within 6e-4 and
gradients within 2.7e-3 of their scale (tests/fused_mgpu_train_test.py).

Formulation ("query rows"). A program takes 64 queries (the rows of every register array: one wgmma M tile per
warpgroup) and a block of keys, one key at a time, so no array is 3-D and no reduction crosses rows:
  h_j = U + 1 w_j^T              [64, F]: U the tile's u rows, w_j broadcast down the rows (a column vector)
  g_j = gelu(h_j)                [64, F] float32, cast to bfloat16 as the wgmma's A operand (from registers)
  K_j = g_j W2k_n + b_n          per head n [64, 2 H2], one wgmma (B from shared memory)
  s^n_j = scale * rowsum((a_n o c_j + a'_n o s_j) o K_j)   [64]: a_n = R_i q_i of head n, a'_n the same with its
       RoPE halves swapped (both fixed for the program), c_j = [cos_j, cos_j], s_j = [sin_j, -sin_j]: the first
       factor is R_j^T a_n, so this is (R_i q_i) . (R_j K_ij), and no column moves between threads
  online softmax per row over the keys (m, l per head), G^n = G^n * corr^n + p^n_j o g_j     (elementwise)
Hidden units run in chunks of 64 (one wgmma K group of bfloat16); with several chunks g is recomputed for the G
update rather than kept (registers). The program's partial (G, m, l) are combined over key blocks outside, as
fused.py's `fwd_splits` are: by a small Triton kernel that reads only the partials programs wrote (`_combine_live`),
or by XLA (`Options.combine_live=False`). Keys past a block's last key visible to the query tile are skipped
(counts computed outside from positions, so any token order works); masked keys inside are handled by the row mask.

Where the time should go (an estimate made before it ran on a GPU). Per key and program at the
original config (N2 H32, kv_hidden 64, one warpgroup): the GELU on 64 x 64 elements (~25 instructions each with
the accurate tanh: ~800 issue cycles; `approx_math` uses tanh.approx), two wgmmas of 64 x 64 x 32 (~130 cycles
of tensor core, waited on at once), the logits (~130) and the G update (~130): ~1,300 cycles, serial within a
program. With 240 programs of <= 64 keys and two per SM (registers), about 64 x 1,300 / 1.8 GHz ~ 45 us a layer
if two programs hide each other's latency, plus ~10 us of XLA around it, against 370 us for the Triton kernel.
At kv_hidden 256, G alone is F / 2 = 128 registers a thread per head (64 queries): with both heads the one-pass
kernel spills (Nsight Compute: 255 registers, docs/bench/fused_mgpu_ncu_f256_h200.txt) and took 1.89 ms a layer.
Hence "logits first" (`Options.logits_first`, the default with several hidden chunks): pass 1 over the keys
computes the logits into shared memory and the softmax's (m, l); pass 2 takes one hidden chunk at a time (the two
warpgroups take alternate chunks), its G over all keys with p = exp(s - m) final, no rescaling. The GELU is
computed twice, G needs 32 registers a thread per head: 0.59 ms a layer at kv_hidden 256 on one H200, and a
training step at the original config 13.46 ms against 17.03 (docs/bench/fused_mgpu_check_lf_h200.json,
docs/bench/fused_mgpu_step_lf_h200.json; 9.59 ms with the backward's logits first too, fused_mgpu_bwd.py).

Precision: the key layer's operands are bfloat16 (g and W2k rounded, products exact, float32 accumulation); h, the
GELU, the softmax and G are float32. `transcription` computes the same formulation in plain jnp (with
`precision='float32'` it is exact float32 and must equal fused.py's forward; with 'bf16' it rounds as the kernel).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

_MASKED = -1e30  # as fused.py
_GELU_C = math.sqrt(2.0 / math.pi)
_GELU_A = 0.044715
BQ = 64  # queries per program: the wgmma M tile
FC = 64  # hidden units per chunk: 128 bytes of bfloat16, one swizzled wgmma K group
SMEM_BYTES = 227 * 1024 - 8192  # an H100/H200 block's shared memory, less a margin for barriers and alignment
TMA_MAX = 256  # one TMA copy's most elements along a dimension (a per-tile table, a key's w row of hidden units)


@dataclasses.dataclass(frozen=True)
class Options:
  """Static settings of the Mosaic GPU forward."""
  # Keys per program (a multiple of 32); 0 = 64, or 32 where 64 does not fit in shared memory.
  # Short blocks for parallelism: the original config has 16 x 5 query tiles for 132 SMs, and a program runs its
  # keys one after another; key blocks of 64 make 240 programs of at most 64 keys (their partial results, 26 MB
  # at kv_hidden 64, are combined outside: `_combine_live`).
  block_k: int = 0
  precision: str = 'bf16'  # the key layer's operands: 'bf16' | 'float32' (transcription only: exact reference)
  # tanh.approx and ex2.approx (about 2^-11 relative error in tanh, below the bfloat16 key layer's 2^-9): a training
  # step at kv_hidden 64 on one H200 takes 3.00 ms with it against 3.15 without
  # (docs/bench/fused_mgpu_step_variants_h200.json).
  approx_math: bool = True
  # The tile's u rows held in registers across the key loop (F / 2 more registers a thread) instead of read from
  # shared memory for every key.
  keep_u: bool = False
  # Likewise the tile's rotated queries (both RoPE orders: 2 H2 registers a thread per head).
  keep_q: bool = False
  # Heads per program (0 = all, or the most that fit in shared memory with a block of 32 keys at least): fewer =
  # more programs and fewer registers for G (N F / 2 a thread for 64 queries), the GELU recomputed once per head
  # group.
  heads_per_program: int = 0
  # Warpgroups per program (1 or 2; 0 = two where the logits come first and the kernel runs compiled, else one).
  # One pass: each takes every other key of the block for the same 64 queries, sharing the program's shared-memory
  # inputs; their partial results are combined outside like the key blocks'. Logits first: they take turns over
  # the keys for the logits, then over the hidden chunks for G. Suspect interpreted: on CPU two matched in most
  # runs but hung in some (not understood), so interpreted runs take one.
  warpgroups: int = 0
  # Logits first (None = where kv_hidden > 64, several hidden chunks): a first pass over the keys computes the
  # logits (kept in shared memory) and the softmax's max and sum; a second takes one hidden chunk at a time, its
  # G accumulators (64 x 64 per head) over all keys with p = exp(s - m) final, so no rescaling. The GELU is
  # computed twice, but G no longer needs F / 2 registers a thread per head: at kv_hidden 256 the one-pass
  # kernel holds 256 (both heads) and spills.
  logits_first: bool | None = None
  # With the logits first: keys per step of the logits' pass (1, 2 or 4; it divides the warpgroup's share of a
  # block), each hidden chunk's u rows and the rotated queries read from shared memory once per step.
  keys_per_step: int = 1
  # The table of keys to visit per (query tile, key block) read from global memory, one value a program, instead of
  # copied whole into shared memory. Copied, it grows as the square of the context: one TMA copy takes at most
  # TMA_MAX entries (at the original config's heads, refused from T 705 at kv_hidden 256, 1025 at 64; until that
  # refusal the kernel failed to lower there), and in shared memory it would cost the kernel its second head at
  # T 4096. On one H200 at the original config (kv_hidden 256) a training step took 6.795 ms with both kernels'
  # tables in global memory against 6.781 with them copied (docs/bench/fused_mgpu_step_variants_gmem_h200.json).
  tables_in_gmem: bool = True
  # u and w passed halved (exact), so that the GELU starts from their sum h / 2 and needs no multiply by 1/2: the
  # same values bit for bit (`_gelu_t`), one float instruction of the GELU's seven fewer. Both kernels have
  # it (fused_mgpu_bwd.Options.half_hidden). On one H200 at kv_hidden 256 it took 3 us a layer off this kernel
  # (322 against 325), 7-11 off the backward's key kernel and 4-7 off its query kernel
  # (docs/bench/fused_mgpu_step_variants_v11_h200.json).
  half_hidden: bool = True
  # The partial results combined by a Triton kernel that reads only those the programs wrote (`_combine_live`),
  # instead of by XLA, which reads every partial.
  combine_live: bool = True


def _gelu_t(x, half: bool = False):
  """(h / 2, tanh(sqrt(2 / pi) (h + 0.044715 h^3)), x^2) of x = h: the tanh approximation's parts, in the form that
  costs the fewest float instructions (every add pairs with a multiply, which the compiler fuses): the GELU is the
  kernels' per-pair arithmetic, and the FMA pipe their busiest.
  half: x = h / 2, bit for bit the same values (`Options.half_hidden`: the kernels take u and w halved, exact in
  floating point, so their sum is h / 2 and the GELU needs no multiply by 1/2, one instruction of its seven: the
  sum u + w, x^2, t's argument in two, the tanh, h / 2, g's FMA). Every factor of 2 is exact: x^2 = h^2 / 4, so
  2 C + 8 C A x^2 = 2 (C + C A h^2) rounds alike, and x times it is h (C + C A h^2), the tanh's argument from h."""
  x2 = x * x
  if half:
    return x, jnp.tanh(x * (2.0 * _GELU_C + (8.0 * (_GELU_C * _GELU_A)) * x2)), x2
  return 0.5 * x, jnp.tanh(x * (_GELU_C + (_GELU_C * _GELU_A) * x2)), x2


def _gelu(x, half: bool = False):
  """0.5 h (1 + t), written hh + hh t: two instructions after the tanh (x = h, or h / 2 with half: `_gelu_t`)."""
  hh, t, _ = _gelu_t(x, half)
  return hh + hh * t


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


# ----------------------------------------------------------------------------------------------------------------
# Layout shared by the kernel and the transcription: from `_forward`'s padded arrays to 64-row tiles.

@dataclasses.dataclass(frozen=True)
class _Dims:
  b: int
  t_in: int  # `_forward`'s padded query count
  s_in: int
  f_in: int
  n: int
  h2: int
  tq: int  # queries padded to BQ
  sk: int  # keys padded to block_k
  fp: int  # hidden padded to FC
  kb: int  # keys per program
  hp: int  # heads per program
  wgs: int  # warpgroups per program
  lf: bool = False  # logits first (Options.logits_first)
  gm: bool = False  # the counts table read from global memory (Options.tables_in_gmem)
  hh: bool = False  # u and w halved (Options.half_hidden)

  @property
  def hd(self):  # per-head width, both RoPE halves: 2 H2
    return 2 * self.h2

  @property
  def n_q(self):
    return self.tq // BQ

  @property
  def n_kb(self):
    return self.sk // self.kb

  @property
  def per_block(self):  # partial results per key block: one, or one per warpgroup in one pass
    return 1 if self.lf else self.wgs

  @property
  def n_chunks(self):
    return self.fp // FC

  @property
  def table_len(self):  # entries of the keys-to-visit table, padded for TMA copies of whole 128-byte lines
    return _round_up(self.n_q * self.n_kb, 32)


def _dims(q, w, opts: Options, interpret: bool = False) -> _Dims:
  b, t, n, _, h2 = q.shape
  s, f = w.shape[1], w.shape[2]
  kb = opts.block_k
  if kb % 32 or kb < 0:
    raise ValueError(f'block_k={kb} is not a multiple of 32')
  if opts.heads_per_program and n % opts.heads_per_program:
    raise ValueError(f'heads_per_program={opts.heads_per_program} does not divide the {n} heads')
  if opts.warpgroups not in (0, 1, 2):
    raise ValueError(f'warpgroups={opts.warpgroups} is not 1 or 2')
  if opts.keys_per_step not in (1, 2, 4):
    raise ValueError(f'keys_per_step={opts.keys_per_step} is not 1, 2 or 4')
  fp = _round_up(f, FC)
  lf = fp > FC if opts.logits_first is None else opts.logits_first
  wgs = opts.warpgroups or (2 if lf and not interpret else 1)

  def dims(kb, hp):
    return _Dims(b=b, t_in=t, s_in=s, f_in=f, n=n, h2=h2, tq=_round_up(t, BQ), sk=_round_up(s, kb), fp=fp, kb=kb,
                 hp=hp, wgs=wgs, lf=lf, gm=opts.tables_in_gmem, hh=opts.half_hidden)

  # All heads a program first (the GELU shared by them), blocks of 64 keys before 32; then fewer heads.
  heads = [opts.heads_per_program] if opts.heads_per_program else [h for h in range(n, 0, -1) if n % h == 0]
  tries = [(k, h) for h in heads for k in ([kb] if kb else [64, 32])]
  fits = [d for d in (dims(k, h) for k, h in tries) if _smem_bytes(d) <= SMEM_BYTES]
  return fits[0] if fits else dims(*tries[-1])


def _pad(x, axis, size, value=0):
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths, constant_values=value) if size != x.shape[axis] else x


def _layout(d: _Dims, q, u, w, w2, b2, cos, sin, qpos, kpos):
  """The kernel's operands: a [B, Tq, N*2*Hd] (per head the rotated query, then it with RoPE halves swapped),
  u [B, Tq, Fp], w [B, Sk, Fp], w2 [Fp, N, Hd], b2 [N, Hd], c, s [Sk, Hd] ([cos, cos], [sin, -sin]), qpos [Tq],
  kpos [Sk], and counts [n_q, n_kb]: keys of each key block to visit for each query tile."""
  big = jnp.iinfo(jnp.int32).max
  q = q.astype(jnp.float32)
  a = jnp.stack([q.reshape(d.b, d.t_in, d.n, d.hd), q[:, :, :, ::-1].reshape(d.b, d.t_in, d.n, d.hd)], axis=3)
  a = _pad(a.reshape(d.b, d.t_in, d.n * 2 * d.hd), 1, d.tq)
  half = 0.5 if d.hh else 1.0  # halved: u + w = h / 2 (`_gelu_t`)
  u = _pad(_pad(half * u.astype(jnp.float32), 2, d.fp), 1, d.tq)
  w = _pad(_pad(half * w.astype(jnp.float32), 2, d.fp), 1, d.sk)
  w2 = _pad(w2.astype(jnp.float32), 0, d.fp)  # [Fp, N, 2, H2]
  w2 = w2.reshape(d.fp, d.n, d.hd)
  b2 = b2.astype(jnp.float32)
  b2 = b2.reshape(d.n, d.hd)
  cos = _pad(cos.astype(jnp.float32), 0, d.sk)
  sin = _pad(sin.astype(jnp.float32), 0, d.sk)
  c = jnp.concatenate([cos, cos], axis=1)
  s = jnp.concatenate([sin, -sin], axis=1)
  qpos = _pad(qpos.astype(jnp.int32), 0, d.tq, -1)
  kpos = _pad(kpos.astype(jnp.int32), 0, d.sk, big)
  # Count per (query tile, key block): one past the block's last key that some query of the tile sees (by
  # position), 0 when none: keys after it are invisible to the whole tile, keys before it are masked per row.
  qmax = qpos.reshape(d.n_q, BQ).max(axis=1)
  seen = kpos.reshape(1, d.n_kb, d.kb) <= qmax[:, None, None]  # [n_q, n_kb, kb]
  idx = jnp.arange(1, d.kb + 1, dtype=jnp.int32)
  counts = jnp.max(jnp.where(seen, idx, 0), axis=2).astype(jnp.int32)
  return a, u, w, w2, b2, c, s, qpos, kpos, counts


# Queries a block of `_combine_live`: on one H200 at kv_hidden 256, 16 took 118 us a step (4 layers) against 161
# with 32 (docs/bench/fused_mgpu_combine_h200.json, G then written [B, N, Tq, Fp], which XLA transposed for the W2v
# product: 21 us more). Written head-major it took 104 us against XLA's combine's 126 in one process, the step's
# device time 6.434 / 6.428 ms against 6.466 (docs/bench/fused_mgpu_step_variants_v12_h200.json).
_COMBINE_ROWS = 16


def _combine_live(d: _Dims, g, m, l, live, interpret: bool):
  """`_combine` reading only the partials programs wrote: raw kernel outputs g [B, splits, Tq, N Fp], m, l
  [B, splits, N, Tq] and live [splits, query tiles]. At the original config (kv_hidden 256) the partials are 105 MB
  a layer, 60% of them live (causal); XLA's combine reads them all. A Triton kernel (Pallas) per (batch, 16
  queries, 128 or 64 of a head's hidden units) adds the live splits' rows, each weighted by exp(m_s - M) / L (zero
  where dead; a masked load reads no memory)."""
  from jax.experimental import pallas as pl  # noqa: PLC0415 (GPU-only module, imported on use)
  from jax.experimental.pallas import triton as plt  # noqa: PLC0415

  splits = g.shape[1]
  lv = live[None, :, None, :, None]  # [1, splits, 1, query tiles, 1]
  m = jnp.where(lv, m.reshape(d.b, splits, d.n, d.n_q, BQ), _MASKED).reshape(m.shape)
  l = jnp.where(lv, l.reshape(d.b, splits, d.n, d.n_q, BQ), 0.0).reshape(l.shape)
  m_all = jnp.max(m, axis=1)
  scale = jnp.exp(m - m_all[:, None])
  l_all = jnp.sum(scale * l, axis=1)
  l_safe = jnp.where(l_all > 0, l_all, 1.0)
  coef = jnp.transpose(scale / l_safe[:, None], (0, 2, 1, 3))  # [B, N, splits, Tq]
  bf = 128 if d.fp % 128 == 0 else FC  # a block's hidden units, all of one head
  rb = _COMBINE_ROWS  # a block's queries (many small programs: each loads one [rb, bf] block a live split)
  per_head, per_tile = d.fp // bf, BQ // rb
  live_i = live.T.astype(jnp.int32)  # [query tiles, splits]

  def kernel(live_ref, coef_ref, g_ref, o_ref):
    bi, ri, ci = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    rows, hi = pl.ds(ri * rb, rb), ci // per_head
    acc = jnp.zeros((rb, bf), jnp.float32)
    for x in range(splits):
      xi = jnp.int32(x)
      wrote = jnp.broadcast_to(live_ref[ri // per_tile, xi] > 0, (rb, bf))
      part = plt.load(g_ref.at[bi, xi, rows, pl.ds(hi * d.fp + (ci % per_head) * bf, bf)], mask=wrote, other=0.0)
      acc += coef_ref[bi, hi, xi, rows][:, None] * part
    o_ref[...] = acc

  anywhere = pl.BlockSpec(memory_space=pl.ANY)
  # Written head-major, [N, B, Tq, Fp]: the W2v product (batched over heads) reads each head's [B Tq, Fp] rows.
  out = pl.pallas_call(
      kernel, grid=(d.b, d.tq // rb, d.n * per_head), in_specs=[anywhere, anywhere, anywhere],
      out_specs=pl.BlockSpec((None, None, rb, bf), lambda b, r, c: (c // per_head, b, r, c % per_head)),
      out_shape=jax.ShapeDtypeStruct((d.n, d.b, d.tq, d.fp), jnp.float32), interpret=interpret,
      compiler_params=None if interpret else plt.CompilerParams(num_warps=4, num_stages=1),  # Triton's lowering
      name='selective_fused_fwd_combine')(live_i, coef, g)
  out = jnp.transpose(out, (1, 2, 0, 3))
  return out[:, :d.t_in, :, :d.f_in], (m_all + jnp.log(l_safe))[:, :, :d.t_in]


def _combine(d: _Dims, g, m, l):
  """Partial (G [B, n_kb, Tq, N, Fp] unnormalised, m, l [B, n_kb, N, Tq]) -> `_forward`'s (G, lse)."""
  m_all = jnp.max(m, axis=1)
  scale = jnp.exp(m - m_all[:, None])
  l_all = jnp.sum(scale * l, axis=1)
  l_safe = jnp.where(l_all > 0, l_all, 1.0)
  g = jnp.einsum('bsnt,bstnf->btnf', scale, g, precision='highest') / jnp.transpose(l_safe, (0, 2, 1))[..., None]
  return g[:, :d.t_in, :, :d.f_in], (m_all + jnp.log(l_safe))[:, :, :d.t_in]


# ----------------------------------------------------------------------------------------------------------------
# The formulation in plain jnp (CPU reference for the kernel's arithmetic).

def transcription(q, u, w, w2, b2, cos, sin, qpos, kpos, *, scale: float, opts: Options = Options()):
  """`_forward`'s (G, lse) computed as the kernel does: 64-query tiles, key blocks, one key at a time."""
  d = _dims(q, w, opts)
  a, u, w, w2, b2, c, s, qpos, kpos, counts = _layout(d, q, u, w, w2, b2, cos, sin, qpos, kpos)
  if opts.precision == 'bf16':
    rnd = lambda x: x.astype(jnp.bfloat16).astype(jnp.float32)
  elif opts.precision == 'float32':
    rnd = lambda x: x
  else:
    raise ValueError(f'precision={opts.precision!r}')
  w2r = rnd(w2)  # [Fp, N, Hd]
  a_t = jnp.moveaxis(a.reshape(d.b, d.n_q, 1, BQ, d.n, 2, d.hd), 4, 3)  # [B, nq, 1, N, BQ, 2, Hd]
  u_t = u.reshape(d.b, d.n_q, 1, BQ, d.fp)
  qpos_t = qpos.reshape(1, d.n_q, 1, BQ)
  shape = (d.b, d.n_q, d.n_kb, BQ)

  def step(carry, jj):
    m, l, g_acc = carry  # [B, nq, nkb, N, BQ] x2, [B, nq, nkb, N, BQ, Fp]
    kidx = jnp.arange(d.n_kb) * d.kb + jj  # this step's key in each block
    wj = w[:, kidx]  # [B, nkb, Fp]
    h = u_t + wj[:, None, :, None, :]  # [B, nq, nkb, BQ, Fp]: h / 2 with u and w halved
    g = _gelu(h, d.hh)
    k = jnp.einsum('xyzif,fne->xyznie', rnd(g), w2r, precision='highest') + b2[None, None, None, :, None, :]
    qr = (a_t[..., 0, :] * c[kidx][None, None, :, None, None, :]
          + a_t[..., 1, :] * s[kidx][None, None, :, None, None, :])  # R_j^T R_i q_i
    logit = jnp.sum(qr * k, axis=-1) * scale  # [B, nq, nkb, N, BQ]
    vis = (qpos_t >= kpos[kidx][None, None, :, None]) & (jj < counts)[None, :, :, None]  # [1, nq, nkb, BQ]
    vis = vis[:, :, :, None, :]
    logit = jnp.where(vis, logit, _MASKED)
    m_new = jnp.maximum(m, logit)
    corr = jnp.exp(m - m_new)
    p = jnp.where(vis, jnp.exp(logit - m_new), 0.0)
    l = l * corr + p
    g_acc = g_acc * corr[..., None] + p[..., None] * g[:, :, :, None]
    return (m_new, l, g_acc), None

  init = (jnp.full(shape[:3] + (d.n, BQ), _MASKED, jnp.float32), jnp.zeros(shape[:3] + (d.n, BQ), jnp.float32),
          jnp.zeros(shape[:3] + (d.n, BQ, d.fp), jnp.float32))
  (m, l, g), _ = jax.lax.scan(step, init, jnp.arange(d.kb))
  # [B, nq, nkb, N, BQ, ...] -> [B, nkb, Tq, N, Fp] and [B, nkb, N, Tq]
  g = jnp.transpose(g, (0, 2, 1, 4, 3, 5)).reshape(d.b, d.n_kb, d.tq, d.n, d.fp)
  m = jnp.transpose(m, (0, 2, 3, 1, 4)).reshape(d.b, d.n_kb, d.n, d.tq)
  l = jnp.transpose(l, (0, 2, 3, 1, 4)).reshape(d.b, d.n_kb, d.n, d.tq)
  return _combine(d, g, m, l)


# ----------------------------------------------------------------------------------------------------------------
# The Mosaic GPU kernel.

def _smem_bytes(d: _Dims) -> int:
  f32 = 4
  base = (BQ * 2 * d.hp * d.hd * f32 + BQ * d.fp * f32 + d.kb * d.fp * f32 + d.fp * d.hp * d.hd * 2
          + 2 * d.kb * d.hd * f32 + d.hp * d.hd * f32 + (d.kb + BQ) * 4
          + (0 if d.gm else d.table_len * 4)
          + 2 * d.hp * BQ * f32)
  if d.lf:  # the logits, (m, l) exchanged between warpgroups
    return base + (d.hp * d.kb * BQ + d.wgs * 2 * d.hp * BQ) * f32
  return base + (d.wgs * (BQ * FC + 2 * d.hp * BQ) * f32 if d.wgs > 1 else 0)


def interpreter():
  """Mosaic GPU's interpret mode (simulated on the CPU), or None where this jax has none."""
  try:
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # noqa: PLC0415
  except ImportError:
    return None
  return InterpretGPUParams()


# Off a GPU the model runs these kernels in Mosaic GPU's interpreter only where this is set (the tests set it): the
# interpreter takes minutes for one small training step, and its callbacks trip the trainer's transfer guard, so
# elsewhere fused.py falls back to its Triton kernels (interpreted there) with one logged line.
INTERPRET_OFF_GPU = False


def _mesh_devices() -> int:
  """Devices of the mesh this trace runs under (1 without one)."""
  mesh = jax.sharding.get_abstract_mesh()
  return 1 if mesh.empty else math.prod(mesh.shape.values())


def cannot_run(act: str, interpret: bool, q, w, opts: Options = Options()) -> str | None:
  """Why `forward` cannot take fused.py's padded q [B, Tp, N, 2, H2], w [B, Sp, Fp] here, or None."""
  if act != 'gelu':
    return f'the kernel computes gelu, not the {act} activation'
  if interpret:
    if not INTERPRET_OFF_GPU:
      return f'the {jax.default_backend()} backend is not a Hopper GPU (the Mosaic GPU interpreter is for tests)'
    if interpreter() is None:
      return 'this jax has no Mosaic GPU interpret mode'
    # Inside shard_map over several (CPU) devices the interpreter's simulated GPU memory fails ("Barrier remains
    # allocated") and the program hangs (seen with jax 0.10.2 under mesh.seq=2): the per-device shapes themselves
    # are tested on one device (tests/fused_mgpu_train_test.py).
    if (size := _mesh_devices()) > 1:
      return f'Mosaic GPU interpret mode fails under a {size}-device mesh'
  else:
    dev = jax.devices()[0]
    cc = str(getattr(dev, 'compute_capability', ''))
    if dev.platform != 'gpu' or cc.split('.')[0] != '9':  # wgmma is Hopper's (sm_90a) alone
      return f'{dev.device_kind} is not a Hopper GPU (compute capability {cc or "none"}; wgmma needs 9.x)'
  return unsupported(_dims(q, w, opts, interpret))


def w_rows_unsupported(fp: int) -> str | None:
  """Why w rows of fp hidden units cannot be copied (both kernels copy a key's row whole), or None. Before this
  refusal, kv_hidden > 256 failed to lower where shared memory took it."""
  return f'its w rows of {fp} hidden units exceed one TMA copy ({TMA_MAX})' if fp > TMA_MAX else None


def unsupported(d: _Dims) -> str | None:
  """Why the kernel cannot take these sizes, or None."""
  if d.hd % 16:
    return f'per-head width 2*H2={d.hd} is not a multiple of 16'
  if d.hd > 256:
    return f'wgmma N = 2*H2 = {d.hd} > 256'
  if (need := _smem_bytes(d)) > SMEM_BYTES:
    return f'needs {need} bytes of shared memory (> {SMEM_BYTES}): use a smaller block_k'
  if (why := w_rows_unsupported(d.fp)) is not None:
    return why
  if not d.gm and d.table_len > TMA_MAX:
    return f'its table of keys to visit has {d.table_len} entries (> {TMA_MAX}, one TMA copy): use tables_in_gmem'
  if (part := _partial_bytes(d)) > PARTIAL_BYTES:
    return (f'its partial results (one G per block of {d.kb} keys: {d.n_kb} of them) would take '
            f'{part / 2**30:.1f} GiB (> {PARTIAL_BYTES / 2**30:.0f})')
  return None


# The kernel writes one unnormalised G [B, T, N, F] (float32) per key block (and warpgroup in one pass), combined
# by XLA: at the original config 10 of them, 105 MB at kv_hidden 256; at B4 T4096 N4 kv_hidden 256 with blocks of
# 32 keys 128, 8.6 GB. Past this the Triton forward (which loops over the keys inside a program) runs instead.
PARTIAL_BYTES = 2**30


def _partial_bytes(d: _Dims) -> int:
  return d.b * d.n_kb * d.per_block * d.tq * d.n * d.fp * 4


def copy_in(copies, bars, wgi, wgs: int, first: int = 0):
  """TMA copies of (global source, shared-memory destination) pairs on barriers first, first + 1, ...: issued by
  warpgroup 0, waited for by every warpgroup; with wgs=1 issued and waited for by the calling warpgroup alone
  (also inside one warpgroup's branch of a program that has several)."""
  from jax.experimental import pallas as pl  # noqa: PLC0415 (GPU-only module, imported on use)
  from jax.experimental.pallas import mosaic_gpu as plgpu  # noqa: PLC0415

  def issue():
    for i, (src, dst) in enumerate(copies):
      plgpu.copy_gmem_to_smem(src, dst, bars.at[first + i])

  pl.when(wgi == 0)(issue) if wgs > 1 else issue()
  for i in range(len(copies)):
    plgpu.barrier_wait(bars.at[first + i])


def table_entries(gm: bool, table_g, table_s, bars, wgi, wgs: int, first: int, *idx):
  """Entries idx of a per-tile table (the kernels' keys or queries to visit): read from global memory
  (Options.tables_in_gmem), or from shared memory after copying the whole table into table_s (on barrier first)."""
  if not gm:
    copy_in([(table_g, table_s)], bars, wgi, wgs, first=first)
  src = table_g if gm else table_s
  return tuple(src[i] for i in idx)


def forward(q, u, w, w2, b2, cos, sin, qpos, kpos, *, scale: float, opts: Options = Options(), interpret=None):
  """`_forward`'s inputs (its padded arrays) -> (G [B, T, N, F], lse [B, N, T]) through the Mosaic GPU kernel."""
  from jax.experimental import pallas as pl  # noqa: PLC0415 (GPU-only module, imported on use)
  from jax.experimental.pallas import mosaic_gpu as plgpu  # noqa: PLC0415

  d = _dims(q, w, opts, interpret is not None)
  if opts.precision != 'bf16':
    raise ValueError(f'the kernel computes the key layer in bf16 only, not {opts.precision!r}')
  if (why := unsupported(d)) is not None:
    raise ValueError(why)
  a, u, w, w2, b2, c, s, qpos, kpos, counts = _layout(d, q, u, w, w2, b2, cos, sin, qpos, kpos)
  n, hd, fp, kb, nc, hp, wgs = d.n, d.hd, d.fp, d.kb, d.n_chunks, d.hp, d.wgs
  groups = n // hp
  # B operand: [chunk, head, 64 hidden, 2 Hd] in bfloat16, tiled and swizzled for wgmma.
  w2b = w2.reshape(nc, FC, n, hd).transpose(0, 2, 1, 3).astype(jnp.bfloat16)
  live = jnp.repeat((counts > 0).T, d.per_block, axis=0)  # [splits, query tiles]: which wrote partials
  counts = _pad(counts.reshape(-1), 0, d.table_len)
  n_kb = d.n_kb
  wg = plgpu.Layout.WGMMA
  row = plgpu.Layout.WGMMA.reduce(1)  # [64] per-query vectors
  col = plgpu.Layout.WGMMA.reduce(0)  # [F] or [Hd] per-column vectors
  # B rows of Hd bfloat16 (64 bytes at H2 16): the widest swizzle they fill; A (g) is split into K groups to match.
  swz = plgpu.find_swizzle(hd * 16)
  b_transforms = (plgpu.TilingTransform((8, swz // 2)), plgpu.SwizzleTransform(swz))
  # float32 tiles read into the wgmma register layout: swizzled rows of 32 (conflict-free shared-memory loads).
  f_transforms = (plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128))

  def load(ref, idx, layout):
    # GPU interpret mode has no `plgpu.load`; a plain read computes the same values there.
    return ref[idx] if interpret is not None else plgpu.load(ref, idx, layout=layout)

  def cast(x, layout):  # nor layout casts
    return x if interpret is not None else plgpu.layout_cast(x, layout)

  def kernel(a_g, u_g, w_g, w2_g, b2_g, c_g, s_g, qpos_g, kpos_g, cnt_g, g_out, m_out, l_out,
             a_s, u_s, w_s, w2_s, b2_s, c_s, s_s, qpos_s, kpos_s, cnt_s, ml_s, bars, *more):
    z, qi, bi = jax.lax.axis_index('z'), jax.lax.axis_index('q'), jax.lax.axis_index('b')
    wgi = jax.lax.axis_index('wg') if wgs > 1 else 0
    extra = dict(zip(extra_names, more))
    kbi, gi = z // groups, z % groups  # key block, head group
    rows = pl.ds(qi * BQ, BQ)
    keys = pl.ds(kbi * kb, kb)
    heads = pl.ds(gi * hp, hp)
    copies = [(a_g.at[bi, rows, pl.ds(gi * hp * 2 * hd, hp * 2 * hd)], a_s),
              *((u_g.at[bi, rows, pl.ds(ci * FC, FC)], u_s.at[ci]) for ci in range(nc)),  # u chunk-major
              (w_g.at[bi, keys], w_s), (w2_g.at[:, heads], w2_s), (b2_g.at[heads], b2_s), (c_g.at[keys], c_s),
              (s_g.at[keys], s_s), (qpos_g.at[rows], qpos_s), (kpos_g.at[keys], kpos_s)]

    count, = table_entries(d.gm, cnt_g, cnt_s, bars, wgi, wgs, len(copies), qi * n_kb + kbi)

    def live():  # the rest: only where this program has keys to visit (else its partials are masked outside)
      copy_in(copies, bars, wgi, wgs)

      qpos_v = load(qpos_s, (), row)

      def queries():  # per head: R_i q_i, and it with RoPE halves swapped
        return ([load(a_s, (slice(None), pl.ds(2 * h * hd, hd)), wg) for h in range(hp)],
                [load(a_s, (slice(None), pl.ds((2 * h + 1) * hd, hd)), wg) for h in range(hp)])

      kept_q = queries() if opts.keep_q else None

      u_regs = [load(u_s.at[ci], (), wg) for ci in range(nc)] if opts.keep_u else None

      def hidden(j, ci, uc=None):
        if uc is None:
          uc = u_regs[ci] if u_regs else load(u_s.at[ci], (), wg)
        wc = load(w_s.at[j], (pl.ds(ci * FC, FC),), col)
        return _gelu(uc + jax.lax.broadcast_in_dim(wc, (BQ, FC), (1,)), d.hh)  # h / 2 if d.hh

      def key_logits(js):
        """Keys js (a static number of them), per key: per head its logits (masked), whether it is visible to each
        row, and g when one chunk and one key. A chunk's u rows and the rotated queries are read from shared memory
        once for all of js."""
        def keys_of(acc_refs):
          cached = None
          for ci in range(nc):
            uc = u_regs[ci] if u_regs else load(u_s.at[ci], (), wg)
            for x, j in enumerate(js):
              g = hidden(j, ci, uc)
              cached = g if nc == 1 and len(js) == 1 else None
              gb = g.astype(jnp.bfloat16)
              if interpret is not None:  # the interpreter's wgmma reads A from shared memory only
                extra['ga'].at[wgi][...] = gb
                gb = extra['ga'].at[wgi]
              for h in range(hp):
                plgpu.wgmma(acc_refs[x * hp + h], gb, w2_s.at[ci, h])
          return [r[...] for r in acc_refs], cached

        kv, cached = pl.run_scoped(keys_of, [plgpu.ACC((BQ, hd), jnp.float32) for _ in range(len(js) * hp)])
        a_heads, a_swapped = kept_q or queries()
        out = []
        for x, j in enumerate(js):
          cj = jax.lax.broadcast_in_dim(load(c_s.at[j], (), col), (BQ, hd), (1,))
          sj = jax.lax.broadcast_in_dim(load(s_s.at[j], (), col), (BQ, hd), (1,))
          visible = qpos_v >= kpos_s[j]
          logits = []
          for h in range(hp):
            k = kv[x * hp + h] + jax.lax.broadcast_in_dim(load(b2_s.at[h], (), col), (BQ, hd), (1,))
            qr = a_heads[h] * cj + a_swapped[h] * sj  # R_j^T R_i q_i
            logits.append(jnp.where(visible, jnp.sum(qr * k, axis=1) * scale, _MASKED))
          out.append((logits, visible))
        return out, cached

      def softmax_step(m, l, logits, visible):
        m_new, l_new, p, corr = [], [], [], []
        for h in range(hp):
          mn = jnp.maximum(m[h], logits[h])
          corr.append(jnp.exp(m[h] - mn))
          p.append(jnp.where(visible, jnp.exp(logits[h] - mn), 0.0))
          l_new.append(l[h] * corr[h] + p[h])
          m_new.append(mn)
        return m_new, l_new, p, corr

      def key_step(i, carry):
        m, l, gs = carry
        j = i * wgs + wgi  # warpgroups take turns over the keys
        ((logits, visible),), cached = key_logits((j,))
        m_new, l_new, p, corr = softmax_step(m, l, logits, visible)
        new_gs = list(gs)  # G of head h, chunk ci at h * nc + ci
        for ci in range(nc):
          g = cached if nc == 1 else hidden(j, ci)
          for h in range(hp):
            cb = jax.lax.broadcast_in_dim(corr[h], (BQ, FC), (0,))
            pb = jax.lax.broadcast_in_dim(p[h], (BQ, FC), (0,))
            new_gs[h * nc + ci] = gs[h * nc + ci] * cb + pb * g
        return tuple(m_new), tuple(l_new), tuple(new_gs)

      def logits_first(my_keys, m_init, l_init):
        """Pass 1 (warpgroups take turns over the keys): logits into shared memory, the softmax's (m, l); pass 2
        (warpgroups take turns over the hidden chunks): G of a chunk over all keys, p = exp(s - m) with m final."""
        lg_s = extra['lg']

        kps = opts.keys_per_step

        def logit_step(i, carry):
          # This warpgroup's keys i * kps ... (i + 1) * kps - 1. The last step's may run past `count` but not past
          # the block (kps divides kb / wgs): no query of the tile sees such keys (count is one past the last key
          # any sees), so their logits are masked and leave (m, l) as they were.
          m, l = carry
          js = [(i * kps + x) * wgs + wgi for x in range(kps)]
          for j, (logits, visible) in zip(js, key_logits(js)[0]):
            m, l, _, _ = softmax_step(m, l, logits, visible)
            for h in range(hp):
              lg_s.at[h, j][...] = logits[h]
          return tuple(m), tuple(l)

        m, l = jax.lax.fori_loop(0, (my_keys + kps - 1) // kps, logit_step, (m_init, l_init))
        if wgs > 1:  # every warpgroup's (m, l) to all; the barrier also publishes the logits
          xml_s = extra['xml']
          for h in range(hp):
            xml_s.at[wgi, 0, h][...] = m[h]
            xml_s.at[wgi, 1, h][...] = l[h]
          plgpu.commit_smem()
          plgpu.barrier_arrive(extra['done'])
          plgpu.barrier_wait(extra['done'])
          ms = [[load(xml_s.at[v, 0, h], (), row) for h in range(hp)] for v in range(wgs)]
          ls = [[load(xml_s.at[v, 1, h], (), row) for h in range(hp)] for v in range(wgs)]
          m = [functools.reduce(jnp.maximum, [ms[v][h] for v in range(wgs)]) for h in range(hp)]
          l = [sum(ls[v][h] * jnp.exp(ms[v][h] - m[h]) for v in range(wgs)) for h in range(hp)]

        def chunk(ci):
          uc = load(u_s.at[ci], (), wg)  # held across the keys

          def g_step(j, gs):
            g = hidden(j, ci, uc)
            visible = qpos_v >= kpos_s[j]
            new = []
            for h in range(hp):
              p = jnp.where(visible, jnp.exp(load(lg_s.at[h, j], (), row) - m[h]), 0.0)
              new.append(gs[h] + jax.lax.broadcast_in_dim(p, (BQ, FC), (0,)) * g)
            return tuple(new)

          zeros = tuple(cast(jnp.zeros((BQ, FC), jnp.float32), wg) for _ in range(hp))
          gs = jax.lax.fori_loop(0, count, g_step, zeros)
          st_w = u_s.at[ci]  # out through u's chunk: only this warpgroup reads it now
          for h in range(hp):
            st_w[...] = gs[h]
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(st_w, g_out.at[bi, kbi, rows, pl.ds((gi * hp + h) * fp + ci * FC, FC)])
            plgpu.wait_smem_to_gmem(0)

        for v in range(wgs):  # static chunk indices per warpgroup
          def mine(v=v):
            for ci in range(v, nc, wgs):
              chunk(ci)
            if v == 0:
              out_ml(ml_s, m, l, kbi)
          pl.when(wgi == v)(mine) if wgs > 1 else mine()

      def out_ml(buf, m, l, split):  # (m, l) out through buf [2, heads, 64]
        for h in range(hp):
          buf[0, h] = m[h]
          buf[1, h] = l[h]
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(buf.at[0], m_out.at[bi, split, heads, rows])
        plgpu.copy_smem_to_gmem(buf.at[1], l_out.at[bi, split, heads, rows])
        plgpu.wait_smem_to_gmem(0)

      m_init = tuple(cast(jnp.full((BQ,), _MASKED, jnp.float32), row) for _ in range(hp))
      l_init = tuple(cast(jnp.zeros((BQ,), jnp.float32), row) for _ in range(hp))
      my_keys = jnp.maximum(count - wgi + wgs - 1, 0) // wgs
      split = kbi * wgs + wgi
      if d.lf:
        logits_first(my_keys, m_init, l_init)
        return
      init = (m_init, l_init, tuple(cast(jnp.zeros((BQ, FC), jnp.float32), wg) for _ in range(hp * nc)))
      m, l, gs = jax.lax.fori_loop(0, my_keys, key_step, init)

      if wgs > 1:  # out through this warpgroup's own buffers, a chunk at a time (the other may still read u)
        st_s, mlw_s = extra['st'].at[wgi], extra['mlw'].at[wgi]
        for h in range(hp):
          for ci in range(nc):
            st_s[...] = gs[h * nc + ci]
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(st_s, g_out.at[bi, split, rows, pl.ds((gi * hp + h) * fp + ci * FC, FC)])
            plgpu.wait_smem_to_gmem(0)
        out_ml(mlw_s, m, l, split)
        return

      # Out through shared memory: G per head in u's buffer (u is no longer read), m and l in ml_s.
      for h in range(hp):
        for ci in range(nc):
          u_s[ci] = gs[h * nc + ci]
        plgpu.commit_smem()
        for ci in range(nc):
          plgpu.copy_smem_to_gmem(u_s.at[ci], g_out.at[bi, split, rows, pl.ds((gi * hp + h) * fp + ci * FC, FC)])
        plgpu.wait_smem_to_gmem(0)
      out_ml(ml_s, m, l, split)

    pl.when(count > 0)(live)

  f32 = jnp.float32
  scratch = [
      plgpu.SMEM((BQ, 2 * hp * hd), f32, transforms=f_transforms),
      plgpu.SMEM((nc, BQ, FC), f32, transforms=f_transforms),
      plgpu.SMEM((kb, fp), f32),
      plgpu.SMEM((nc, hp, FC, hd), jnp.bfloat16, transforms=b_transforms), plgpu.SMEM((hp, hd), f32),
      plgpu.SMEM((kb, hd), f32), plgpu.SMEM((kb, hd), f32), plgpu.SMEM((BQ,), jnp.int32),
      plgpu.SMEM((kb,), jnp.int32), plgpu.SMEM((32,) if d.gm else counts.shape, jnp.int32),
      plgpu.SMEM((2, hp, BQ), f32),
      plgpu.Barrier(num_barriers=9 + nc)]
  extras = {}  # more scratch, by name
  if d.lf:
    extras.update(lg=plgpu.SMEM((hp, kb, BQ), f32))
    if wgs > 1:
      extras.update(xml=plgpu.SMEM((wgs, 2, hp, BQ), f32), done=plgpu.Barrier(num_arrivals=wgs))
  elif wgs > 1:
    extras.update(st=plgpu.SMEM((wgs, BQ, FC), f32, transforms=f_transforms), mlw=plgpu.SMEM((wgs, 2, hp, BQ), f32))
  if interpret is not None:  # A in shared memory (interpreted only)
    extras.update(ga=plgpu.SMEM((wgs, BQ, FC), jnp.bfloat16, transforms=b_transforms))
  extra_names = list(extras)
  scratch += list(extras.values())
  splits = n_kb * d.per_block
  out_type = [jax.ShapeDtypeStruct((d.b, splits, d.tq, n * fp), f32),
              jax.ShapeDtypeStruct((d.b, splits, n, d.tq), f32), jax.ShapeDtypeStruct((d.b, splits, n, d.tq), f32)]
  threads = dict(num_threads=wgs, thread_name='wg') if wgs > 1 else {}
  call = plgpu.kernel(kernel, out_type=out_type, scratch_types=scratch, grid=(n_kb * groups, d.n_q, d.b),
                      grid_names=('z', 'q', 'b'), compiler_params=plgpu.CompilerParams(approx_math=opts.approx_math),
                      interpret=interpret, kernel_name='selective_fused_fwd_mgpu', **threads)
  g, m, l = call(a, u, w, w2b, b2, c, s, qpos, kpos, counts)
  if opts.combine_live:
    return _combine_live(d, g, m, l, live, interpret is not None)
  g = jnp.where(live[None, :, :, None, None], g.reshape(d.b, splits, d.n_q, BQ, n * fp), 0.0)
  m = jnp.where(live[None, :, None, :, None], m.reshape(d.b, splits, n, d.n_q, BQ), _MASKED).reshape(m.shape)
  l = jnp.where(live[None, :, None, :, None], l.reshape(d.b, splits, n, d.n_q, BQ), 0.0).reshape(l.shape)
  return _combine(d, g.reshape(d.b, splits, d.tq, n, fp), m, l)


# ----------------------------------------------------------------------------------------------------------------
# Unpadded model arrays in, as fused.attention prepares them (for the tests and the GPU check).

def fused_inputs(q, u, w, w2k, b2k, q_pos, k_pos, rope_theta, blocks=None):
  """fused.attention's preparation: (scale, `_forward`'s padded args) for the Triton forward's tiles `blocks`."""
  from selattn.model import fused, tiles  # noqa: PLC0415
  from selattn.model import rope as rope_lib  # noqa: PLC0415

  blocks = blocks or fused.Blocks()
  _, t, n, h = q.shape
  s, f = w.shape[1], w.shape[2]
  fc = min(blocks.block_f, max(16, tiles.pow2(f)))
  h2 = max(16, tiles.pow2((h + 1) // 2))
  tp, sp, fp = _round_up(t, blocks.block_q), _round_up(s, blocks.block_k), _round_up(f, fc)
  if rope_theta is not None:
    q = rope_lib.apply(q, *rope_lib.angles(q_pos, h, rope_theta))
    cos, sin = rope_lib.angles(k_pos, h, rope_theta)
  else:
    cos, sin = jnp.ones((s, (h + 1) // 2), jnp.float32), jnp.zeros((s, (h + 1) // 2), jnp.float32)
  big = jnp.iinfo(jnp.int32).max
  args = (tiles.pad(fused._halves(q, h2), 1, tp), tiles.pad(tiles.pad(u, 2, fp), 1, tp),
          tiles.pad(tiles.pad(w, 2, fp), 1, sp), tiles.pad(fused._halves(w2k.reshape(f, n, h), h2), 0, fp),
          fused._halves(b2k.reshape(n, h), h2),
          *(tiles.pad(tiles.pad(a, 1, h2), 0, sp) for a in (cos, sin)),
          tiles.pad(q_pos.astype(jnp.int32), 0, tp, -1), tiles.pad(k_pos.astype(jnp.int32), 0, sp, big))
  return 1.0 / math.sqrt(h), args


def triton_static(scale, n, f, blocks=None, interpret=False):
  """fused.py's static settings for `_forward` as fused.attention makes them (n heads, kv_hidden f)."""
  from selattn.model import fused, tiles  # noqa: PLC0415

  blocks = blocks or fused.Blocks()
  return fused._Static(scale=scale, act='gelu', bq=blocks.block_q, bk=blocks.block_k,
                       fc=min(blocks.block_f, max(16, tiles.pow2(f))), num_warps=blocks.num_warps,
                       num_stages=blocks.num_stages, interpret=interpret, backward=blocks.backward,
                       forward=blocks.forward, hp=math.gcd(blocks.heads_per_program or n, n), ks=blocks.fwd_splits,
                       qs=blocks.bwd_splits)
