"""The fused backward (fused.py's `_backward`) as Mosaic GPU kernels for Hopper: `model.fused_backward='mgpu'`.

"Query rows" and "key rows", as the forward (fused_mgpu.py) does: a program holds 64 rows in registers and visits
the other side one at a time, so every accumulation is along rows and no reduction crosses rows.
With a = R_i q_i of a head (both RoPE halves), a' it with halves swapped, c_j = [cos_j, cos_j], s_j = [sin_j,
-sin_j] (the forward's notation), h = u_i + w_j, g = gelu(h), K = W2k^T g + b2k:
  s_ij = scale (a o c_j + a' o s_j) . K_ij = scale qr_ij . K_ij,   p_ij = exp(s_ij - lse_i)
  dp_ij = dG_i . g_ij,   ds_ij = p_ij (dp_ij - Delta_i),   Delta_i = dG_i . G_i (outside, per query and head)
  dK_ij = scale ds_ij qr_ij
  dg_ij = sum_n p^n_ij dG^n_i + sum_n W2k_n dK^n_ij,   dh_ij = dg_ij o gelu'(h_ij)
  du_i = sum_j dh_ij,   da_i = A1_i + swap(A2_i),  A1_i = sum_j scale ds_ij (c_j o K_ij),  A2_i = the same with s_j
  dw_j = sum_i dh_ij,   db2k = sum_ij dK_ij,   dW2k = sum_ij g_ij dK_ij^T
Query kernel (64 queries, a block of keys, one key at a time): du and A1, A2 in registers (rows), each key's K by
  one wgmma per head (g from registers) and its dg by one per head (dK from registers, W2k^T from shared memory).
Key kernel (64 keys, a block of queries, one query at a time): dw and db2k's rows in registers, dW2k by a wgmma of
  g^T (shared memory, transposed) by dK per query: an [F, 2 H2] accumulator per head.
Logits first (`Options.logits_first`, the default with several hidden chunks, kv_hidden > 64). In one pass du (or
  dw) takes F / 2 registers a thread, which spills at kv_hidden 256. Instead the query kernel's pass 1 visits the
  keys for p and ds (into shared memory, then out to the key kernel) and A1, A2; its pass 2 takes one hidden chunk
  at a time, du of that chunk over all keys (the warpgroups on alternate chunks). The key kernel reads p and ds
  (masked by visibility: pairs past a query tile's last visible key were never written) and only runs pass 2: dw
  and dW2k of a chunk over all queries (db2k is summed outside, from the query kernel's ds), each chunk's u, w, dG
  and W2k copied into the warpgroup's own buffers when it comes to it (a quarter of the shared memory at kv_hidden
  256: 64 queries a program). dg's B is then K's B read transposed (shared memory for p and ds). The query
  kernel's pass 1 takes two keys a step (`Options.keys_per_step`), reading each chunk of u and dG from shared
  memory once for both.
  du by keys (`Options.du_by_keys`, the default with the logits first): the key kernel, which computes dh_ij for
  dw anyway, sums du too, and the query kernel has no pass 2. Its rows are keys, so du_i = sum_j dh_ij is a sum
  down them: a wgmma per query and chunk, D [64 queries, FC] += A [64, 64 keys] B [64 keys, FC] with A one-hot
  (row i all ones, the rest 0: built in registers) and B = dh in bfloat16; partial du per key tile, summed outside.
  The GELU is then evaluated twice a pair and head in the backward instead of three times.
Partial results of the blocks (and head groups) are summed outside by XLA; swap(A2) is taken there too (it moves
columns between threads). The key layer's operands are bfloat16 as in the forward (so the recomputed logits are the
forward's and its lse normalises them), as are those of dg's and dW2k's matmuls; everything else is float32.
`transcription` computes the same formulation over whole [B, T, S, ...] arrays in jnp (with precision='float32'
exact float32: it must equal fused.py's `_backward`).
Shared memory decides the blocks (`Options` overrides them): at the original config (N2 H32) kv_hidden 64 takes
both heads and blocks of 64; kv_hidden 256 one head and 32 keys a query-kernel program, both heads (sharing each
pair's GELU) and 32 queries a key-kernel program. A program's shared memory fills most of an SM, so two
warpgroups share each program (they take turns over its keys or queries, each with its own accumulators, and write
their partials in turn), the GELU and its derivative share one approximate tanh, and a program with no visible
pair returns before copying its inputs (its partial outputs are masked outside).
Checked in Mosaic GPU's interpret mode (one warpgroup: two hang there) against `transcription` and `materialized`,
and lowered for cuda with both (tests/fused_mgpu_train_test.py). On one H200 (jax 0.11.2) one layer's backward at
the original config takes 0.67-0.79 ms at kv_hidden 64 (docs/bench/fused_mgpu_bwd_sweep_h200.json,
fused_mgpu_bwd_sweep_lf_h200.json) and at 256 1.94-2.01 ms with the logits first (fused_mgpu_bwd_sweep_kps_h200.json,
fused_mgpu_ab_kps_h200.json; 2.15 before the chunk copies and two keys a step, 3.41 in one pass), against 2.0-2.1
and 6.4-7.0 for the merged Triton backward. With du by keys its two kernels take 1,280 us of device time a layer at
kv_hidden 256 against 1,518 without (docs/bench/fused_mgpu_kernel_times_dk_h200.json,
fused_mgpu_kernel_times_holdw_h200.json), and 1,203 with db2k summed outside and RoPE's rows read per query (the
key kernel's register spills went from 332 to 4 bytes: fused_mgpu_kernel_times_db_h200.json,
fused_mgpu_spill_h200.txt); dW2k written out per round of chunks (dw2_rounds) took the key kernel from 789.5 to
748.3 us (fused_mgpu_kernel_times_rounds_h200.json), and RoPE's rows read per query in one pass (hold_rope off)
the kv_hidden 64 key kernel from 228.3 to 200.7 (fused_mgpu_kernel_times_rope64_h200.json); both heads in a
key-kernel program took it at kv_hidden 256 from 752.7-774.3 to 658.4-661.0 us (fused_mgpu_kernel_times_kh2_h200.json,
fused_mgpu_kernel_times_kh2a_h200.json), and dg's wgmmas issued before the GELU (Options.wgmma_overlap) took it to
559.9 against 592.7 in one call (docs/bench/fused_mgpu_kernel_times_v9_h200.json). With the MGPU forward a training
step took 2.94 and 7.57 ms against 9.18 and 31.5 before the last two changes (docs/bench/mlp_mgpu9_h200.json), and
6.86 at kv_hidden 256 after them (docs/bench/mlp_mgpu11_h200.json).
docs/bench/fused_mgpu_bwd_sweep.py times the backward alone by `Options`, docs/bench/fused_mgpu_kernel_times.py
each kernel's device time.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from selattn.model import fused_mgpu as fm

BQ = fm.BQ  # query rows of the query kernel
BK = 64  # key rows of the key kernel
FC = fm.FC
_MASKED = fm._MASKED
SMEM_BYTES = fm.SMEM_BYTES
_round_up = fm._round_up  # pylint: disable=protected-access


def _gelu_grad(h):
  t = jnp.tanh(fm._GELU_C * (h + fm._GELU_A * h * h * h))
  return 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * fm._GELU_C * (1.0 + 3.0 * fm._GELU_A * h * h)


def _gelu_both(h, half: bool = False):
  """(gelu(h), gelu'(h)) from one tanh; the first exactly as fused_mgpu._gelu computes it. With k = C (1 + 3 A h^2):
  gelu'(h) = (1 + t) / 2 + (h / 2) k (1 - t^2), five instructions after the GELU's (all fusable pairs).
  half: given h / 2 instead (u and w halved, `Options.half_hidden`), bit for bit the same values with one
  multiply fewer (fused_mgpu._gelu_t; k = C + 12 C A (h / 2)^2 rounds as C + 3 C A h^2)."""
  hh, t, x2 = fm._gelu_t(h, half)
  k = fm._GELU_C + ((12.0 * (fm._GELU_C * fm._GELU_A)) if half else (3.0 * fm._GELU_C * fm._GELU_A)) * x2
  g = hh + hh * t
  return g, (0.5 + 0.5 * t) + (hh * k) * (1.0 - t * t)


def _swap(x, h2):
  """[..., 2 H2] -> its RoPE halves swapped."""
  return jnp.concatenate([x[..., h2:], x[..., :h2]], axis=-1)


def transcription(q, u, w, w2, b2, cos, sin, qpos, kpos, g_res, lse, dgo, *, scale: float, precision: str = 'bf16',
                  du_heads: int = 0, pdg: bool = False):
  """fused.py's `_backward` outputs (dq, du, dw, dW2k, db2k) by this module's formulation, dense over pairs.
  du_heads > 0: du as the key kernel sums it (`Options.du_by_keys`): per group of du_heads heads (a program's),
  that group's part of dh rounded as precision says. pdg: dg's term p dG with both factors rounded as precision
  says (`Options.pdg_wgmma`)."""
  rnd = {'bf16': lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), 'float32': lambda x: x}[precision]
  b, t, n, _, h2 = q.shape
  f = u.shape[-1]
  hi = dict(precision='highest')
  a = q.astype(jnp.float32).reshape(b, t, n, 2 * h2)
  w2r = rnd(w2.astype(jnp.float32).reshape(f, n, 2 * h2))
  c = jnp.concatenate([cos, cos], axis=1).astype(jnp.float32)  # [S, Hd]
  s = jnp.concatenate([sin, -sin], axis=1).astype(jnp.float32)
  h = u.astype(jnp.float32)[:, :, None, :] + w.astype(jnp.float32)[:, None, :, :]  # [B, T, S, F]
  g = fm._gelu(h)
  k = jnp.einsum('btsf,fne->btsne', rnd(g), w2r, **hi) + b2.astype(jnp.float32).reshape(1, 1, 1, n, 2 * h2)
  qr = a[:, :, None] * c[None, None, :, None] + _swap(a, h2)[:, :, None] * s[None, None, :, None]
  logit = scale * jnp.sum(qr * k, axis=-1)  # [B, T, S, N]
  vis = (qpos[:, None] >= kpos[None, :])[None, :, :, None]
  p = jnp.where(vis, jnp.exp(logit - jnp.transpose(lse, (0, 2, 1))[:, :, None, :]), 0.0)
  dp = jnp.einsum('btsf,btnf->btsn', g, dgo, **hi)
  delta = jnp.einsum('btnf,btnf->btn', dgo, g_res, **hi)
  ds = p * (dp - delta[:, :, None])
  dk = scale * ds[..., None] * qr  # [B, T, S, N, Hd]
  p_g, dgo_g = (rnd(p), rnd(dgo)) if pdg else (p, dgo)  # dg's p dG term (pdg: rounded)
  dg = jnp.einsum('btsn,btnf->btsf', p_g, dgo_g, **hi) + jnp.einsum('btsne,fne->btsf', rnd(dk), w2r, **hi)
  gd = _gelu_grad(h)
  dh = dg * gd
  a1 = jnp.sum(scale * ds[..., None] * c[None, None, :, None] * k, axis=2)
  a2 = jnp.sum(scale * ds[..., None] * s[None, None, :, None] * k, axis=2)
  dq = (a1 + _swap(a2, h2)).reshape(b, t, n, 2, h2)
  dw2 = jnp.einsum('btsf,btsne->fne', rnd(g), rnd(dk), **hi).reshape(f, n, 2, h2)
  du = dh.sum(2)
  if du_heads:
    dg_n = jnp.einsum('btsn,btnf->btsnf', p_g, dgo_g, **hi) + jnp.einsum('btsne,fne->btsnf', rnd(dk), w2r, **hi)
    dg_n = dg_n.reshape(b, t, -1, n // du_heads, du_heads, f).sum(4)  # per head group
    du = rnd(dg_n * gd[:, :, :, None]).sum((2, 3))
  return dq, du, dh.sum(1), dw2, dk.sum((0, 1, 2)).reshape(n, 2, h2)


# ----------------------------------------------------------------------------------------------------------------
# The kernels.

@dataclasses.dataclass(frozen=True)
class _Dims:
  b: int
  t_in: int
  s_in: int
  f_in: int
  n: int
  h2: int
  tq: int  # queries padded to a multiple of BQ and of the key kernel's query block
  sk: int  # keys padded to a multiple of BK and of the query kernel's key block
  fp: int
  kb: int  # query kernel: keys per program
  qb: int  # key kernel: queries per program
  hq: int  # query kernel: heads per program
  hk: int  # key kernel: heads per program
  wgs: int = 1  # warpgroups per program (both kernels)
  lq: bool = False  # query kernel: logits first (Options.logits_first)
  kdu: bool = False  # logits first: du summed by the key kernel (Options.du_by_keys)
  gm: bool = False  # the per-tile tables read from global memory (Options.tables_in_gmem)

  @property
  def hd(self):
    return 2 * self.h2

  @property
  def nc(self):
    return self.fp // FC

  @property
  def q_table_len(self):  # the query kernel's keys-to-visit table, padded for TMA copies of whole 128-byte lines
    return _round_up(self.tq // BQ * (self.sk // self.kb), 32)

  @property
  def k_table_len(self):  # the key kernel's query ranges (lo, hi a tile pair), padded likewise
    return _round_up(2 * (self.tq // self.qb) * (self.sk // BK), 32)


def _q_smem(d: _Dims, kb: int, hp: int, t: int, s: int, lf: bool = False) -> int:
  """Logits first: p and ds of every key in place of dg's own copy of W2k (read transposed from K's)."""
  f32, hd, fp = 4, d.hd, d.fp
  return (BQ * 2 * hp * hd * f32 + BQ * fp * f32 + kb * fp * f32 + (1 if lf else 2) * fp * hp * hd * 2
          + hp * hd * f32 + 2 * kb * hd * f32 + (kb + BQ) * 4 + 2 * hp * BQ * f32 + BQ * hp * fp * f32
          + (0 if d.gm else _round_up(-(-t // BQ) * -(-s // kb), 32) * 4) + (2 * hp * kb * BQ * f32 if lf else 0))


def _k_smem(d: _Dims, qb: int, hp: int, t: int, s: int, wgs: int = 1, lf: bool = False, kdu: bool = False) -> int:
  """Logits first: u, w, dG and W2k of one hidden chunk per warpgroup (copied chunk by chunk) in place of all;
  with du summed here (kdu), dh in bfloat16 per warpgroup."""
  f32, hd, fp = 4, d.hd, d.fp
  per = wgs * FC if lf else fp  # hidden units held of u, w, dG and W2k
  return (qb * 2 * hp * hd * f32 + qb * per * f32 + BK * per * f32 + (1 if lf else 2) * per * hp * hd * 2
          + hp * hd * f32 + (2 * hp * qb * BK * f32 if lf else 0)
          + 2 * BK * hd * f32 + (BK + qb) * 4 + 2 * hp * qb * f32 + qb * hp * per * f32
          + (0 if d.gm else _round_up(2 * -(-t // qb) * -(-s // BK), 32) * 4)
          + wgs * ((BK * FC * (2 if kdu else 1) + hp * BK * hd) * 2)  # per warpgroup: g, dK (and dh) in bfloat16
          + BK * hd * f32)


@dataclasses.dataclass(frozen=True)
class Options:
  """Static settings of the Mosaic GPU backward; 0 = the largest that fits in shared memory (blocks of 64, then
  32; all heads, then one). Blocks of 32 at least: the TMA copies multiples of 128 bytes (positions, one head's
  lse)."""
  block_k: int = 0  # query kernel: keys per program (32, 64 or 128)
  block_q: int = 0  # key kernel: queries per program (32, 64 or 128)
  heads_per_program: int = 0  # both kernels
  # Key kernel only (overrides heads_per_program there): heads per program. Several heads share each pair's GELU
  # and its derivative (the elementwise work that bounds the kernel), but need more shared memory: at kv_hidden 256
  # both heads fit with blocks of 32 queries only.
  key_heads: int = 0
  # Key kernel: dg's products of all the program's heads into one wgmma accumulator, instead of one accumulator per
  # head added after (a [64, 64] float32 add a head fewer per query and chunk). Alone it was slower (631.4 us a
  # layer at kv_hidden 256 on one H200 against 592.7 with neither); with wgmma_overlap, 559.9
  # (docs/bench/fused_mgpu_kernel_times_v9_h200.json).
  dg_one_acc: bool = True
  # Key kernel summing du (du_by_keys) with blocks of fewer than 64 queries: du's partial output holds the block's
  # rows only, not the accumulator's 64 (half of them zero with blocks of 32).
  du_block_rows: bool = True
  # Query kernel: each key's K accumulated over the hidden chunks in one wgmma accumulator a head, read once after
  # the last chunk, instead of one accumulator a chunk read (waited for) at once and added. Off: on one H200 at
  # kv_hidden 256 it spilled 216 bytes and took 418.7 us a layer against 395.8 (fused_mgpu_kernel_times_v9_h200.json).
  q_one_acc: bool = False
  # Key kernel: dg's wgmmas issued before the pair's GELU is computed (which then overlaps them; with dg_one_acc),
  # and no wait for a query's dW2k and du wgmmas at its end: reading the next query's dg waits for them, before
  # their operands' buffers are written again. On one H200 a training step at kv_hidden 64 (one pass) took 2.848 ms
  # with both on against 2.964 with both off (docs/bench/fused_mgpu_step_variants_kv64_h200.json).
  wgmma_overlap: bool = True
  # Warpgroups per program (1 or 2), both kernels: they take turns over the program's keys (query kernel) or
  # queries (key kernel), sharing its shared-memory inputs, each with its own accumulators; their partial results
  # are summed outside like the blocks'. One program fills an SM's shared memory, so one warpgroup alone leaves the
  # SM one warp per scheduler to issue from (docs/bench/fused_mgpu_ncu_f64_h200.txt: 6% occupancy, an instruction
  # every 2.4 cycles). 0: two where
  # shared memory allows, else one; interpreted always one (two hang there in most runs: see the tests).
  warpgroups: int = 0
  # tanh.approx in the GELU and its derivative (about 2^-11 relative error, below the bfloat16 key layer's 2^-9):
  # on one H200 the backward at kv_hidden 256 takes a third of the time (accurate tanh: 12.5 ms a layer, 4.1 ms),
  # at 64 0.78 ms against 0.95 (docs/bench/fused_mgpu_bwd_sweep_h200.json).
  approx_math: bool = True
  # kv_hidden <= 64 (one hidden chunk): GELU'(h) kept in registers from the logits' pass to dg's instead of h and
  # the GELU recomputed there.
  keep_hidden: bool = True
  # Query kernel, None = with several hidden chunks (kv_hidden > 64): pass 1 over the keys computes p and ds
  # (into shared memory) and A1, A2; pass 2 takes one hidden chunk at a time (warpgroups on alternate chunks), its
  # du over all keys: 32 registers a thread for du instead of F / 2, which spills at kv_hidden 256.
  logits_first: bool | None = None
  # Query kernel with the logits first: keys per step of the logits' pass (1, 2 or 4; it divides the warpgroup's
  # share of a block, 16 keys at least), each hidden chunk's u and dG read from shared memory once per step.
  keys_per_step: int = 2
  # Query kernel with the logits first: its pass 2 holds the rotated queries in registers (2 Hd a thread per head)
  # instead of reading them from shared memory for every key and chunk.
  keep_q: bool = False
  # Logits first: the key kernel sums du too, and the query kernel has no pass 2 (one GELU evaluation a pair and
  # head fewer). The key kernel holds a tile's keys as rows, so du_i = sum_j dh_ij is a sum down its rows: one
  # wgmma per query and hidden chunk, A a one-hot [64, 64] (row i of the query block all ones, from registers), B
  # dh in bfloat16 (shared memory), accumulated in float32 over the queries of the block. So du's terms are
  # rounded to bfloat16 (as dW2k's factors are); blocks of at most 64 queries.
  du_by_keys: bool = True
  # Key kernel with the logits first: a hidden chunk's w rows of the tile held in registers across the queries
  # (32 registers a thread) instead of read from shared memory for each.
  hold_w: bool = False
  # Key kernel with the logits first: each hidden chunk's dW2k accumulators live through that chunk only (16
  # registers a thread a head, instead of all of the warpgroup's chunks' through the whole pass), written out after
  # each round of chunks (one chunk a warpgroup), the warpgroups in turn through the one staging buffer. On one
  # H200 at kv_hidden 256 the key kernel took 748.3 us a layer against 789.5 without
  # (docs/bench/fused_mgpu_kernel_times_rounds_h200.json).
  dw2_rounds: bool = True
  # Key kernel in one pass (kv_hidden <= 64): RoPE's cos and sin rows of the tile held in registers across the
  # queries (32 registers a thread) instead of read from shared memory for each, as the logits-first path reads
  # them. On one H200 at kv_hidden 64 reading them took the key kernel from 228.3 to 200.7 us a layer and its
  # spills from 444/460 to 300/300 bytes (docs/bench/fused_mgpu_kernel_times_rope64_h200.json).
  hold_rope: bool = False
  # Both kernels: the per-tile tables (the query kernel's keys to visit, the key kernel's range of queries) read
  # from global memory, two values a program, instead of copied whole into shared memory. Copied, they grow as the
  # square of the context: one TMA copy takes at most fused_mgpu.TMA_MAX entries (at the original config's heads
  # refused from T 705; until that refusal the kernels failed to lower there), and in shared memory they would cost
  # the key kernel its second head from T 1024. On one H200 at the original config (kv_hidden 256) a training step
  # took 6.795 ms with both kernels' tables in global memory against 6.781 with them copied
  # (docs/bench/fused_mgpu_step_variants_gmem_h200.json).
  tables_in_gmem: bool = True
  # Both kernels: u and w passed halved (exact), so the GELU and its derivative start from h / 2 with one multiply
  # fewer, bit for bit the same values (fused_mgpu.Options.half_hidden, fused_mgpu._gelu_t).
  half_hidden: bool = True
  # Key kernel with du summed there (du_by_keys) and dg_one_acc: dg's term sum_n p^n_ij dG^n_i by the wgmma that
  # computes its other term, instead of an FMA a value and head. The block's dG rows are copied in bfloat16, rows
  # (query, head) in order, so 16 // heads queries' rows make one [16, FC] B tile; A is [64 keys, 16], zero but for
  # query i's columns, which hold p of each head. So p and dG are rounded to bfloat16 in that term (as dK and W2k
  # are in the other), and dG takes half the shared memory (not counted: _k_smem counts it in float32). On one H200
  # at kv_hidden 256 the key kernel took 530 us a layer against 557 without, du's and dw's errors against the
  # unrounded transcription 3.8e-3 and 1.7e-3 of scale against 2.7e-3 and 1.0e-3
  # (docs/bench/fused_mgpu_step_variants_v11_h200.json, fused_mgpu_bwd_sweep_pdg_h200.json).
  pdg_wgmma: bool = True


def _dims(q, w, opts: Options = Options()) -> _Dims | str:
  b, t, n, _, h2 = q.shape
  s, f = w.shape[1], w.shape[2]
  fp = _round_up(f, FC)
  base = dict(b=b, t_in=t, s_in=s, f_in=f, n=n, h2=h2, fp=fp, gm=opts.tables_in_gmem)
  probe = _Dims(tq=0, sk=0, kb=0, qb=0, hq=0, hk=0, **base)
  for name in ('block_k', 'block_q'):
    if getattr(opts, name) not in (0, 32, 64, 128):
      return f'{name}={getattr(opts, name)} is not 32, 64 or 128'
  for name in ('heads_per_program', 'key_heads'):
    if getattr(opts, name) and n % getattr(opts, name):
      return f'{name}={getattr(opts, name)} does not divide the {n} heads'
  if opts.warpgroups not in (0, 1, 2):
    return f'warpgroups={opts.warpgroups} is not 1 or 2'
  if opts.keys_per_step not in (1, 2, 4):
    return f'keys_per_step={opts.keys_per_step} is not 1, 2 or 4'
  if not opts.warpgroups:
    two = _dims(q, w, dataclasses.replace(opts, warpgroups=2))
    return two if not isinstance(two, str) else _dims(q, w, dataclasses.replace(opts, warpgroups=1))
  wgs = opts.warpgroups
  heads = (opts.heads_per_program,) if opts.heads_per_program else (n, 1)
  kbs = (opts.block_k,) if opts.block_k else (64, 32)
  qbs = (opts.block_q,) if opts.block_q else (64, 32)
  lq = fp > FC if opts.logits_first is None else opts.logits_first
  kdu = lq and opts.du_by_keys
  if kdu and opts.block_q > 64:
    return f'block_q={opts.block_q} with du_by_keys: du is summed over at most 64 queries a program'
  # The key kernel takes all heads a program first, as the query kernel does: its heads share each pair's GELU and
  # derivative. On one H200 at kv_hidden 256 (B16 T299 N2 H32) both heads with 32 queries a program took 658-661 us
  # a layer against 752-774 for one head with 64 (docs/bench/fused_mgpu_kernel_times_kh2_h200.json); before its
  # register spills were cut (fused_mgpu_spill_h200.txt) it was the other way round (1,065 against 884,
  # docs/bench/fused_mgpu_kernel_times_kh_h200.json).
  k_heads = (opts.key_heads,) if opts.key_heads else heads
  q_fit = [(kb, hp) for hp in heads for kb in kbs if _q_smem(probe, kb, hp, t, s, lq) <= SMEM_BYTES]
  k_fit = [(qb, hp) for hp in k_heads for qb in qbs if _k_smem(probe, qb, hp, t, s, wgs, lq, kdu) <= SMEM_BYTES]
  if not q_fit or not k_fit:
    # The least that the kernel which does not fit would need, over its candidates (its own heads: key_heads may
    # differ from heads_per_program).
    short = []
    if not q_fit:
      short.append(('query', min(_q_smem(probe, kb, hp, t, s, lq) for hp in heads for kb in kbs)))
    if not k_fit:
      short.append(('key', min(_k_smem(probe, qb, hp, t, s, wgs, lq, kdu) for hp in k_heads for qb in qbs)))
    kernel, need = max(short, key=lambda x: x[1])
    return f'the backward needs {need} bytes of shared memory (> {SMEM_BYTES}) in its {kernel} kernel'
  (kb, hq), (qb, hk) = q_fit[0], k_fit[0]
  d = _Dims(tq=_round_up(t, max(BQ, qb)), sk=_round_up(s, max(BK, kb)), kb=kb, qb=qb, hq=hq, hk=hk, wgs=wgs, lq=lq,
            kdu=kdu, **base)
  if (why := fm.w_rows_unsupported(fp)) is not None:
    return why
  if not d.gm and (entries := max(d.q_table_len, d.k_table_len)) > fm.TMA_MAX:
    return f'its per-tile tables have {entries} entries (> {fm.TMA_MAX}, one TMA copy): use tables_in_gmem'
  return d


def folds_pdg(d: _Dims, opts: Options) -> bool:
  """Whether the key kernel computes dg's p dG term by wgmma (`Options.pdg_wgmma`): with du summed there, dg's
  heads in one accumulator, and a number of heads that divides 16 (a B tile's rows)."""
  return d.kdu and opts.pdg_wgmma and opts.dg_one_acc and 16 % d.hk == 0 and d.qb % (16 // d.hk) == 0


def cannot_run(act: str, interpret: bool, q, w, opts: Options = Options()) -> str | None:
  """Why `backward` (with `opts`) cannot take fused.py's padded q, w here, or None."""
  why = fm.cannot_run(act, interpret, q, w)
  if why is not None:
    return why
  d = _dims(q, w, opts)
  return d if isinstance(d, str) else None


def _ranges(qpos, kpos, n_qt: int, qt: int, n_kt: int, kt: int):
  """Per (query tile of qt, key tile of kt): [lo, hi) of the other side's rows that some row of the tile sees.
  Query tiles: one past the last key of the key tile seen by any of the tile's queries (lo 0). Key tiles: the first
  and one past the last query of the query tile that sees any key of the tile."""
  seen = qpos.reshape(n_qt, qt, 1, 1) >= kpos.reshape(1, 1, n_kt, kt)  # [nq, qt, nk, kt]
  idx_k = jnp.arange(1, kt + 1, dtype=jnp.int32)
  k_hi = jnp.max(jnp.where(jnp.any(seen, axis=1), idx_k, 0), axis=2).astype(jnp.int32)  # [nq, nk]
  any_q = jnp.any(seen, axis=3)  # [nq, qt, nk]
  idx_q = jnp.arange(qt, dtype=jnp.int32)[None, :, None]
  q_lo = jnp.min(jnp.where(any_q, idx_q, qt), axis=1).astype(jnp.int32)
  q_hi = jnp.max(jnp.where(any_q, idx_q + 1, 0), axis=1).astype(jnp.int32)
  return k_hi, q_lo, q_hi


def backward(q, u, w, w2, b2, cos, sin, qpos, kpos, g_res, lse, dgo, *, scale: float, opts: Options = Options(),
             interpret=None):
  """fused.py's `_backward` outputs (dq, du, dw, dW2k, db2k) for its padded arrays, by the two kernels."""
  from jax.experimental import pallas as pl  # noqa: PLC0415 (GPU-only module, imported on use)
  from jax.experimental.pallas import mosaic_gpu as plgpu  # noqa: PLC0415

  if interpret is not None and not opts.warpgroups:
    opts = dataclasses.replace(opts, warpgroups=1)  # interpreted, two warpgroups hang in most runs
  d = _dims(q, w, opts)
  if isinstance(d, str):
    raise ValueError(d)
  b, n, h2, hd, fp, nc = d.b, d.n, d.h2, d.hd, d.fp, d.nc
  f32 = jnp.float32
  big = jnp.iinfo(jnp.int32).max
  pad = fm._pad
  t_in, s_in = q.shape[1], w.shape[1]
  # Operands, as the forward lays them out (fused_mgpu._layout), padded to this module's tiles.
  qf = q.astype(f32)
  # Heads-major ([B, N, T, ...]): a head group's rows are one box for the TMA.
  a = jnp.concatenate([qf.reshape(b, t_in, n, hd), qf[:, :, :, ::-1].reshape(b, t_in, n, hd)], axis=3)
  a = pad(jnp.transpose(a, (0, 2, 1, 3)), 2, d.tq)  # [B, N, Tq, 2 Hd]: R_i q_i, then with halves swapped
  half = 0.5 if opts.half_hidden else 1.0  # halved (Options.half_hidden): u + w = h / 2
  u_ = pad(pad(half * u.astype(f32), 2, fp), 1, d.tq)
  w_ = pad(pad(half * w.astype(f32), 2, fp), 1, d.sk)
  w2f = pad(w2.astype(f32), 0, fp).reshape(fp, n, hd)
  w2b = w2f.reshape(nc, FC, n, hd).transpose(0, 2, 1, 3).astype(jnp.bfloat16)  # [nc, N, FC, Hd]: K's B
  w2t = w2f.reshape(nc, FC, n, hd).transpose(0, 2, 3, 1).astype(jnp.bfloat16)  # [nc, N, Hd, FC]: dg's B
  b2_ = b2.astype(f32).reshape(n, hd)
  cos_, sin_ = pad(cos.astype(f32), 0, d.sk), pad(sin.astype(f32), 0, d.sk)
  c = jnp.concatenate([cos_, cos_], axis=1)
  s = jnp.concatenate([sin_, -sin_], axis=1)
  qp = pad(qpos.astype(jnp.int32), 0, d.tq, -1)
  kp = pad(kpos.astype(jnp.int32), 0, d.sk, big)
  lse_ = pad(lse.astype(f32), 2, d.tq)  # [B, N, Tq] (padding rows see no key)
  delta = pad(jnp.einsum('btnf,btnf->bnt', dgo, g_res, precision='highest'), 2, d.tq)
  dgo_ = jnp.transpose(pad(pad(dgo.astype(f32), 3, fp), 1, d.tq), (0, 2, 1, 3))  # [B, N, Tq, Fp]

  wg = plgpu.Layout.WGMMA
  row = plgpu.Layout.WGMMA.reduce(1)
  col = plgpu.Layout.WGMMA.reduce(0)
  swz_hd = plgpu.find_swizzle(hd * 16)  # rows of Hd bfloat16
  hd_tf = (plgpu.TilingTransform((8, swz_hd // 2)), plgpu.SwizzleTransform(swz_hd))
  fc_tf = (plgpu.TilingTransform((8, FC)), plgpu.SwizzleTransform(128))  # rows of FC bfloat16
  k16_tf = (plgpu.TilingTransform((8, 16)), plgpu.SwizzleTransform(32))  # wgmma B tiles of K = 16 bfloat16 rows
  f_tf = (plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128))  # float32 tiles
  interp = interpret is not None
  with_w2t = not d.lq or interp  # dg's B in its own copy (compiled with the logits first: K's B read transposed)
  params = dict(compiler_params=plgpu.CompilerParams(approx_math=opts.approx_math))
  if d.wgs > 1:
    params.update(num_threads=d.wgs, thread_name='wg')

  def sync_barriers(wgs):
    """[all warpgroups are past their loops (the inputs' buffers are free), warpgroup i+1's turn to write out]."""
    return [plgpu.Barrier(num_arrivals=wgs), plgpu.Barrier(num_barriers=max(wgs - 1, 1))]

  def all_done(wgs, done):
    """Waits until every warpgroup has arrived here."""
    if wgs > 1:
      plgpu.barrier_arrive(done)
      plgpu.barrier_wait(done)

  def turn_of(i, wgs, turn, out, first=0):
    """Warpgroup i's turn (static i): after warpgroup i-1's, `out`, then warpgroup i+1's (on barriers first, first
    + 1, ... of `turn`)."""
    if i:
      plgpu.barrier_wait(turn.at[first + i - 1])
    out()  # ends with its copies out done, so the next may overwrite the buffers
    if i < wgs - 1:
      plgpu.barrier_arrive(turn.at[first + i])

  def in_turn(wgs, wgi, done, turn, out):
    """`out` (which writes through the inputs' buffers) by each warpgroup in turn, after all have finished."""
    if wgs == 1:
      out()
      return
    all_done(wgs, done)
    for i in range(wgs):
      pl.when(wgi == i)(functools.partial(turn_of, i, wgs, turn, out))

  def dg_b(w2t_s, w2b_s, ci, h):
    """dg's B operand, W2k^T of chunk ci and head h: its own copy, or (compiled, logits first) K's B transposed."""
    return w2t_s.at[ci, h] if w2t_s is not None else plgpu.transpose_ref(w2b_s.at[ci, h], (1, 0))

  def load(ref, idx, layout):
    return ref[idx] if interp else plgpu.load(ref, idx, layout=layout)

  def cast(x, layout):
    return x if interp else plgpu.layout_cast(x, layout)

  def bcast_col(v, rows, cols):  # [cols] -> [rows, cols]
    return jax.lax.broadcast_in_dim(v, (rows, cols), (1,))

  def bcast_row(v, cols):  # [rows] -> [rows, cols]
    return jax.lax.broadcast_in_dim(v, (v.shape[0], cols), (0,))

  def mm(a_val, a_scratch, b_ref, shape):
    """a_val [64, K] (registers, bfloat16) @ b_ref (shared memory) -> [64, N] float32."""
    def body(acc):
      a_op = a_val
      if interp:  # the interpreter's wgmma reads A from shared memory only
        a_scratch[...] = a_val
        a_op = a_scratch
      plgpu.wgmma(acc, a_op, b_ref)
      return acc[...]
    return pl.run_scoped(body, plgpu.ACC(shape, f32))

  # ------------------------------------------------------------------ query kernel: du, A1, A2
  kb, hq, wgs = d.kb, d.hq, d.wgs
  assert kb % (wgs * opts.keys_per_step) == 0, (kb, wgs, opts.keys_per_step)  # blocks of 32 at least
  n_q, n_kb, gq = d.tq // BQ, d.sk // kb, n // hq
  k_hi, _, _ = _ranges(qp, kp, n_q, BQ, n_kb, kb)
  cnt = pad(k_hi.reshape(-1), 0, d.q_table_len)
  keep = opts.keep_hidden and nc == 1

  def q_kernel(a_g, u_g, w_g, w2b_g, w2t_g, b2_g, c_g, s_g, qp_g, kp_g, cnt_g, lse_g, dl_g, dgo_g, *rest):
    du_out, rest = (None, rest) if d.kdu else (rest[0], rest[1:])  # du summed by the key kernel: none here
    da_out, rest = rest[0], rest[1:]
    pd_out, rest = (rest[0], rest[1:]) if d.lq else (None, rest)  # logits first: p and ds out for the key kernel
    a_s, u_s, w_s, w2b_s, b2_s, c_s, s_s, qp_s, kp_s, cnt_s, lse_s, dl_s, dgo_s, bars, done, turn, *more = rest
    extra = dict(zip(q_extras, more))
    w2t_s, pd_s, mid = extra.get('w2t'), extra.get('pd'), extra.get('mid')
    z, qi, bi = jax.lax.axis_index('z'), jax.lax.axis_index('q'), jax.lax.axis_index('b')
    wgi = jax.lax.axis_index('wg') if wgs > 1 else 0
    kbi, gi = z // gq, z % gq
    rows, keys, heads = pl.ds(qi * BQ, BQ), pl.ds(kbi * kb, kb), pl.ds(gi * hq, hq)
    copies = [*((u_g.at[bi, rows, pl.ds(ci * FC, FC)], u_s.at[ci]) for ci in range(nc)),  # u chunk-major
              (w_g.at[bi, keys], w_s), (b2_g.at[heads], b2_s), (c_g.at[keys], c_s), (s_g.at[keys], s_s),
              (qp_g.at[rows], qp_s),
              (kp_g.at[keys], kp_s), (lse_g.at[bi, heads, rows], lse_s),
              (dl_g.at[bi, heads, rows], dl_s)]
    # Per head and chunk: a copy of more has too many dimensions (with the tiling) for the TMA.
    copies += [(a_g.at[bi, gi * hq + h, rows], a_s.at[h]) for h in range(hq)]
    copies += [(dgo_g.at[bi, gi * hq + h, rows], dgo_s.at[h]) for h in range(hq)]
    copies += [(w2b_g.at[ci, gi * hq + h], w2b_s.at[ci, h]) for ci in range(nc) for h in range(hq)]
    if w2t_s is not None:
      copies += [(w2t_g.at[ci, gi * hq + h], w2t_s.at[ci, h]) for ci in range(nc) for h in range(hq)]

    count, = fm.table_entries(d.gm, cnt_g, cnt_s, bars, wgi, wgs, len(copies), qi * n_kb + kbi)

    def live():  # the rest: only where this program has pairs to visit (else its partial outputs are
      # masked outside)
      fm.copy_in(copies, bars, wgi, wgs)
      ga_s, dka_s = (extra['ga'].at[wgi], extra['dka'].at[wgi]) if interp else (None, None)
      qp_v = load(qp_s, (), row)
      lse_v = [load(lse_s.at[h], (), row) for h in range(hq)]
      dl_v = [load(dl_s.at[h], (), row) for h in range(hq)]

      def hidden(j, ci, uc=None):
        uc = load(u_s.at[ci], (), wg) if uc is None else uc
        wc = load(w_s.at[j], (pl.ds(ci * FC, FC),), col)
        return _gelu_both(uc + bcast_col(wc, BQ, FC), opts.half_hidden)  # (g, gelu'); an unused one is dead code

      def dgo_chunk(h, ci):
        return load(dgo_s.at[h], (slice(None), pl.ds(ci * FC, FC)), wg)

      def rotated(h):  # R_i q_i of head h and it with RoPE halves swapped: [64, Hd] each
        return (load(a_s.at[h], (slice(None), pl.ds(0, hd)), wg), load(a_s.at[h], (slice(None), pl.ds(hd, hd)), wg))

      def query(h, cj, sj, held=None):  # R_j^T R_i q_i of head h: [64, Hd]
        a, a_sw = held[h] if held else rotated(h)
        return a * cj + a_sw * sj

      def key_terms(js, a1, a2, keep_gd):
        """Keys js (a static number of them) against the tile's queries: per key and head p and scale ds ([64]
        each) and dK; A1 and A2 with their terms added; and GELU' if kept (one key, one hidden chunk). A chunk's u
        and dG are read from shared memory once for all of js (the pass's largest reads: 2 x 64 KB a key at
        kv_hidden 256)."""
        def products(*accs):  # with q_one_acc: K of key x and head h in accs[x * hq + h] over the chunks
          kv = None if accs else [[jnp.zeros((BQ, hd), f32) for _ in range(hq)] for _ in js]
          dp = [[jnp.zeros((BQ,), f32) for _ in range(hq)] for _ in js]
          kept = None
          for ci in range(nc):
            uc = load(u_s.at[ci], (), wg)
            dgo_c = [dgo_chunk(h, ci) for h in range(hq)]
            for x, j in enumerate(js):
              g, gd = hidden(j, ci, uc)
              kept = gd if keep_gd else None
              gb = g.astype(jnp.bfloat16)
              for h in range(hq):
                if accs:
                  a_op = gb
                  if interp:  # the interpreter's wgmma reads A from shared memory only (and runs each at once)
                    ga_s[...] = gb
                    a_op = ga_s
                  plgpu.wgmma(accs[x * hq + h], a_op, w2b_s.at[ci, h])
                else:
                  kv[x][h] = kv[x][h] + mm(gb, ga_s, w2b_s.at[ci, h], (BQ, hd))
                dp[x][h] = dp[x][h] + jnp.sum(g * dgo_c[h], axis=1)
          if accs:
            kv = [[accs[x * hq + h][...] for h in range(hq)] for x in range(len(js))]
          return kv, dp, kept

        if opts.q_one_acc:
          kv, dp, kept = pl.run_scoped(products, *[plgpu.ACC((BQ, hd), f32) for _ in range(len(js) * hq)])
        else:
          kv, dp, kept = products()
        p, ds, dk, new_a1, new_a2 = [], [], [], list(a1), list(a2)
        for x, j in enumerate(js):
          cj = bcast_col(load(c_s.at[j], (), col), BQ, hd)
          sj = bcast_col(load(s_s.at[j], (), col), BQ, hd)
          visible = qp_v >= kp_s[j]
          p.append([]), ds.append([]), dk.append([])
          for h in range(hq):
            k = kv[x][h] + bcast_col(load(b2_s.at[h], (), col), BQ, hd)
            qr = query(h, cj, sj)
            ph = jnp.where(visible, jnp.exp(jnp.sum(qr * k, axis=1) * scale - lse_v[h]), 0.0)
            dsv = ph * (dp[x][h] - dl_v[h]) * scale  # scale ds
            dsc = bcast_row(dsv, hd)  # broadcast along the row
            p[x].append(ph)
            ds[x].append(dsv)
            dk[x].append(dsc * qr)
            new_a1[h] = new_a1[h] + dsc * (cj * k)
            new_a2[h] = new_a2[h] + dsc * (sj * k)
        return p, ds, dk, tuple(new_a1), tuple(new_a2), kept

      def key_step(it, carry):
        du, a1, a2 = carry
        j = it * wgs + wgi  # warpgroups take turns over the keys
        (p,), _, (dk,), a1, a2, kept = key_terms((j,), a1, a2, keep)
        new_du = list(du)
        for ci in range(nc):
          gd = kept if keep else hidden(j, ci)[1]
          dg = jnp.zeros((BQ, FC), f32)
          for h in range(hq):
            dg = dg + mm(dk[h].astype(jnp.bfloat16), dka_s, dg_b(w2t_s, w2b_s, ci, h), (BQ, FC))
            dg = dg + bcast_row(p[h], FC) * dgo_chunk(h, ci)
          new_du[ci] = du[ci] + dg * gd
        return tuple(new_du), a1, a2

      def logits_first(my_keys):
        """Pass 1 (warpgroups take turns over the keys): p and ds of each key into shared memory, A1 and A2; pass 2
        (warpgroups take turns over the hidden chunks): du of a chunk over all keys."""
        kps = opts.keys_per_step

        def logit_step(it, carry):
          # This warpgroup's keys it * kps ... (it + 1) * kps - 1. The last step's may run past `count` but not past
          # the block (kps divides kb / wgs): such keys are seen by no query of the tile (count is one past the last
          # key any sees), so their p and ds are 0, as where `count` ends within a step of one key.
          js = [(it * kps + x) * wgs + wgi for x in range(kps)]
          p, ds, _, a1, a2, _ = key_terms(js, *carry, False)
          for x, j in enumerate(js):
            for h in range(hq):
              pd_s.at[0, h, j][...] = p[x][h]
              pd_s.at[1, h, j][...] = ds[x][h]
          return a1, a2

        a1, a2 = jax.lax.fori_loop(0, (my_keys + kps - 1) // kps, logit_step,
                                   (tuple(zeros(hd) for _ in range(hq)), tuple(zeros(hd) for _ in range(hq))))
        plgpu.commit_smem()
        if wgs > 1:  # every warpgroup's p and ds to all
          plgpu.barrier_arrive(mid)
          plgpu.barrier_wait(mid)

        def pd_copy():  # p and ds out for the key kernel (pairs past `count` are stale: it masks them)
          for x in range(2):
            for h in range(hq):
              plgpu.copy_smem_to_gmem(pd_s.at[x, h], pd_out.at[x, bi, gi * hq + h, keys, rows])
        pl.when(wgi == 0)(pd_copy) if wgs > 1 else pd_copy()

        def chunk(ci):
          uc = load(u_s.at[ci], (), wg)  # held across the keys, as dG's chunk
          dgo_c = [dgo_chunk(h, ci) for h in range(hq)]
          held = [rotated(h) for h in range(hq)] if opts.keep_q else None  # and the rotated queries

          def du_step(j, du):
            gd = hidden(j, ci, uc)[1]
            cj = bcast_col(load(c_s.at[j], (), col), BQ, hd)
            sj = bcast_col(load(s_s.at[j], (), col), BQ, hd)
            dg = jnp.zeros((BQ, FC), f32)
            for h in range(hq):
              ph = load(pd_s.at[0, h, j], (), row)
              dk = bcast_row(load(pd_s.at[1, h, j], (), row), hd) * query(h, cj, sj, held)
              dg = dg + mm(dk.astype(jnp.bfloat16), dka_s, dg_b(w2t_s, w2b_s, ci, h), (BQ, FC))
              dg = dg + bcast_row(ph, FC) * dgo_c[h]
            return du + dg * gd

          du = jax.lax.fori_loop(0, count, du_step, zeros(FC))
          u_s[ci] = du  # out through u's chunk: only this warpgroup reads it now
          plgpu.commit_smem()
          plgpu.copy_smem_to_gmem(u_s.at[ci], du_out.at[bi, z, rows, pl.ds(ci * FC, FC)])
          plgpu.wait_smem_to_gmem(0)

        if not d.kdu:  # pass 2 (du by keys: the key kernel sums du)
          for v in range(wgs):  # static chunk indices per warpgroup
            def mine(v=v):
              for ci in range(v, nc, wgs):
                chunk(ci)
            pl.when(wgi == v)(mine) if wgs > 1 else mine()
        plgpu.wait_smem_to_gmem(0)  # p and ds out (warpgroup 0) before the program ends
        return a1, a2

      zeros = lambda cols: cast(jnp.zeros((BQ, cols), f32), wg)  # noqa: E731
      my_keys = jnp.maximum(count - wgi + wgs - 1, 0) // wgs
      if d.lq:
        a1, a2 = logits_first(my_keys)
      else:
        init = (tuple(zeros(FC) for _ in range(nc)), tuple(zeros(hd) for _ in range(hq)),
                tuple(zeros(hd) for _ in range(hq)))
        du, a1, a2 = jax.lax.fori_loop(0, my_keys, key_step, init)

      def out():
        # Out through shared memory no warpgroup reads any more: du (one pass) in u's buffer, A1 and A2 in a's.
        if not d.lq:
          for ci in range(nc):
            u_s[ci] = du[ci]
          plgpu.commit_smem()
          for ci in range(nc):
            plgpu.copy_smem_to_gmem(u_s.at[ci], du_out.at[bi, z * wgs + wgi, rows, pl.ds(ci * FC, FC)])
        # A1 and A2 summed over the warpgroups here, in turn in a's buffer; the last one writes them out (one
        # partial a key block, not one a warpgroup: at kv_hidden 256 each is 2.6 MB that XLA reads back to sum).
        def put(added):
          for h in range(hq):
            for x, a_x in enumerate((a1, a2)):
              cols = pl.ds(x * hd, hd)
              a_s[h, :, cols] = a_x[h] + load(a_s.at[h], (slice(None), cols), wg) if added else a_x[h]
        if wgs > 1:
          pl.when(wgi == 0)(lambda: put(False))
          pl.when(wgi > 0)(lambda: put(True))
        else:
          put(False)

        def write():
          plgpu.commit_smem()
          for h in range(hq):
            plgpu.copy_smem_to_gmem(a_s.at[h], da_out.at[bi, kbi, gi * hq + h, rows])
          plgpu.wait_smem_to_gmem(0)
        pl.when(wgi == wgs - 1)(write) if wgs > 1 else write()

      in_turn(wgs, wgi, done, turn, out)

    pl.when(count > 0)(live)

  scratch = [plgpu.SMEM((hq, BQ, 2 * hd), f32, transforms=f_tf), plgpu.SMEM((nc, BQ, FC), f32, transforms=f_tf),
             plgpu.SMEM((kb, fp), f32), plgpu.SMEM((nc, hq, FC, hd), jnp.bfloat16, transforms=hd_tf),
             plgpu.SMEM((hq, hd), f32), plgpu.SMEM((kb, hd), f32), plgpu.SMEM((kb, hd), f32),
             plgpu.SMEM((BQ,), jnp.int32), plgpu.SMEM((kb,), jnp.int32),
             plgpu.SMEM((32,) if d.gm else cnt.shape, jnp.int32),  # the table (a placeholder when in global memory)
             plgpu.SMEM((hq, BQ), f32), plgpu.SMEM((hq, BQ), f32), plgpu.SMEM((hq, BQ, fp), f32, transforms=f_tf),
             plgpu.Barrier(num_barriers=9 + nc + 2 * hq + 2 * nc * hq), *sync_barriers(wgs)]
  extras = {}  # more scratch, by name
  if with_w2t:
    extras['w2t'] = plgpu.SMEM((nc, hq, hd, FC), jnp.bfloat16, transforms=hd_tf)
  if d.lq:  # p and ds of every (query, key), per head; the barrier between the passes
    extras['pd'] = plgpu.SMEM((2, hq, kb, BQ), f32)
    if wgs > 1:
      extras['mid'] = plgpu.Barrier(num_arrivals=wgs)
  if interp:
    extras.update(ga=plgpu.SMEM((wgs, BQ, FC), jnp.bfloat16, transforms=fc_tf),
                  dka=plgpu.SMEM((wgs, BQ, hd), jnp.bfloat16, transforms=hd_tf))
  q_extras = list(extras)
  scratch += list(extras.values())
  wdu = 1 if d.lq else wgs  # du's partials per program
  q_call = plgpu.kernel(
      q_kernel, out_type=[*([] if d.kdu else [jax.ShapeDtypeStruct((b, n_kb * gq * wdu, d.tq, fp), f32)]),
                          jax.ShapeDtypeStruct((b, n_kb, n, d.tq, 2 * hd), f32),
                          *([jax.ShapeDtypeStruct((2, b, n, d.sk, d.tq), f32)] if d.lq else [])],
      scratch_types=scratch, grid=(n_kb * gq, n_q, b), grid_names=('z', 'q', 'b'), interpret=interpret,
      kernel_name='selective_fused_bwd_query_mgpu', **params)
  outs = q_call(a, u_, w_, w2b, w2t, b2_, c, s, qp, kp, cnt, lse_, delta, dgo_)
  du_p, (da_p, *pd) = (None, outs) if d.kdu else (outs[0], outs[1:])
  pd_raw = pd[0] if d.lq else None  # [2, B, N, Sk, Tq]
  pd = [jnp.swapaxes(pd_raw, 3, 4)] if d.lq else []  # [2, B, N, Tq, Sk]: the key kernel's rows are queries
  # Programs with no pair to visit wrote nothing: their partials are masked.
  live_q = (k_hi > 0).T  # [key blocks, query tiles]
  if not d.kdu:
    du = jnp.where(live_q[None, :, None, :, None, None], du_p.reshape(b, n_kb, gq * wdu, n_q, BQ, fp), 0.0)
    du = du.sum((1, 2)).reshape(b, d.tq, fp)
  da = jnp.where(live_q[None, :, None, :, None, None], da_p.reshape(b, n_kb, n, n_q, BQ, 2 * hd), 0.0)
  da = jnp.transpose(da.sum(1).reshape(b, n, d.tq, 2 * hd), (0, 2, 1, 3)).reshape(b, d.tq, n, 2, hd)
  dq = (da[:, :, :, 0] + _swap(da[:, :, :, 1], h2)).reshape(b, d.tq, n, 2, h2)

  # ------------------------------------------------------------------ key kernel: dw, db2k, dW2k
  qb, hk = d.qb, d.hk
  n_qb, n_kt, gk = d.tq // qb, d.sk // BK, n // hk
  DQ = 64  # du's accumulator rows (wgmma M): the block's queries, qb <= 64 of them  # noqa: N806
  du_rows = qb if opts.du_block_rows else DQ  # of them written out
  _, q_lo, q_hi = _ranges(qp, kp, n_qb, qb, n_kt, BK)
  rng = pad(jnp.stack([q_lo, q_hi], axis=-1).reshape(-1), 0, d.k_table_len)
  fold = folds_pdg(d, opts)  # dg's p dG term by wgmma: dG in bfloat16, rows (query, head), R queries a B tile
  rq = 16 // hk if fold else 0
  # [B, head groups, Tq hk, Fp]: each query's heads in order, so rows 16 x ... 16 x + 15 (B tile x of a block) hold
  # queries x R ... (x + 1) R - 1. (Tiles as a dimension of their own made a TMA copy of 6 dimensions.)
  dgo_k = (dgo_.reshape(b, gk, hk, d.tq, fp).transpose(0, 1, 3, 2, 4).reshape(b, gk, d.tq * hk, fp)
           .astype(jnp.bfloat16)) if fold else dgo_

  def k_kernel(a_g, u_g, w_g, w2b_g, w2t_g, b2_g, c_g, s_g, qp_g, kp_g, rng_g, lse_g, dl_g, dgo_g, *rest):
    pd_g, rest = (rest[0], rest[1:]) if d.lq else (None, rest)  # logits first: the query kernel's p and ds
    (dw_out, db_out, dw2_out), rest = ((rest[0], None, rest[1]), rest[2:]) if d.lq else (rest[:3], rest[3:])
    du_out, rest = (rest[0], rest[1:]) if d.kdu else (None, rest)  # du summed here (logits first)
    (a_s, u_s, w_s, w2b_s, b2_s, c_s, s_s, qp_s, kp_s, rng_s, lse_s, dl_s, dgo_s, gs_s, dks_s, st_s, bars, done,
     turn, *more) = rest
    extra = dict(zip(k_extras, more))
    w2t_s, pd_s = extra.get('w2t'), extra.get('pd')
    z, ki, bi = jax.lax.axis_index('z'), jax.lax.axis_index('k'), jax.lax.axis_index('b')
    wgi = jax.lax.axis_index('wg') if wgs > 1 else 0
    qbi, gi = z // gk, z % gk
    qrows, keys, heads = pl.ds(qbi * qb, qb), pl.ds(ki * BK, BK), pl.ds(gi * hk, hk)

    def chunk_copies(ci, slot):
      """u, w, dG and W2k (and its transposed copy) of hidden chunk ci into buffer `slot` (logits first: this
      warpgroup's; one pass: the chunk's own)."""
      cols = pl.ds(ci * FC, FC)
      dgo_src = dgo_g.at[bi, gi, pl.ds(qbi * qb * hk, qb * hk), cols] if fold else dgo_g.at[bi, heads, qrows, cols]
      cps = [(u_g.at[bi, qrows, cols], u_s.at[slot]), (w_g.at[bi, keys, cols], w_s.at[slot]),
             (dgo_src, dgo_s.at[slot])]
      cps += [(w2b_g.at[ci, gi * hk + h], w2b_s.at[slot, h]) for h in range(hk)]
      if w2t_s is not None:
        cps += [(w2t_g.at[ci, gi * hk + h], w2t_s.at[slot, h]) for h in range(hk)]
      return cps

    copies = [(a_g.at[bi, heads, qrows], a_s), (b2_g.at[heads], b2_s), (c_g.at[keys], c_s), (s_g.at[keys], s_s),
              (qp_g.at[qrows], qp_s), (kp_g.at[keys], kp_s)]
    if pd_s is None:  # one pass: every chunk's inputs, and lse and Delta
      copies += [cp for ci in range(nc) for cp in chunk_copies(ci, ci)]
      copies += [(lse_g.at[bi, heads, qrows], lse_s), (dl_g.at[bi, heads, qrows], dl_s)]
    else:  # logits first: p and ds from the query kernel; a chunk's inputs when a warpgroup comes to it
      copies.append((pd_g.at[:, bi, heads, qrows, keys], pd_s))
    n_common = len(copies) + 1  # and the range table's
    assert len(chunk_copies(0, 0)) == per_chunk, (len(chunk_copies(0, 0)), per_chunk)  # the barriers' count

    def fetch_chunk(ci, slot):
      """Logits first: chunk ci's inputs into `slot`, issued and waited for by this warpgroup alone (its buffers
      are free: its last chunk's results went out through them, and wgmma_wait(0) ended each query)."""
      fm.copy_in(chunk_copies(ci, slot), bars, 0, 1, first=n_common + ci * per_chunk)

    base = 2 * (qbi * n_kt + ki)
    lo, hi = fm.table_entries(d.gm, rng_g, rng_s, bars, wgi, wgs, len(copies), base, base + 1)

    def live():  # the rest: only where this program has pairs to visit (else its partial outputs are
      # masked outside)
      fm.copy_in(copies, bars, wgi, wgs)
      # This warpgroup's buffers: g (bfloat16, read transposed as wgmma's A; interpreted: a transposed copy) and dK.
      gs_w, dks_w = (extra['gsT'] if interp else gs_s).at[wgi], dks_s.at[wgi]
      dhs_w = extra['dhs'].at[wgi] if d.kdu else None  # dh in bfloat16: B of du's wgmma
      ga_s, dka_s = (extra['ga'].at[wgi], extra['dka'].at[wgi]) if interp else (None, None)
      kp_v = load(kp_s, (), row)
      # RoPE's [cos, cos] and [sin, -sin] of the tile's keys: read for each query (held in registers across the
      # queries they take 32 registers a thread, and both paths spilled: docs/bench/fused_mgpu_spill_h200.txt,
      # fused_mgpu_spill_rope64_h200.txt); Options.hold_rope holds them in one pass.
      c_v, s_v = (None, None) if d.lq or not opts.hold_rope else (load(c_s, (), wg), load(s_s, (), wg))

      # Chunk ci's inputs are in buffer `slot`: ci itself in one pass, the warpgroup's own with the logits first.
      def hidden(i, slot, wc=None):
        wc = load(w_s.at[slot], (), wg) if wc is None else wc
        uc = load(u_s.at[slot, i], (), col)
        return _gelu_both(wc + bcast_col(uc, BK, FC), opts.half_hidden)  # (g, gelu')

      def dgo_row(i, h, slot):
        return bcast_col(load(dgo_s.at[slot, h, i], (), col), BK, FC)

      def pdg_a(p, i):
        """dg's p dG term's A ([64 keys, 16], bfloat16): column (i mod R) hk + h holds p of head h, the rest 0; its B
        is tile i // R of the block's dG rows."""
        cix = (jax.lax.broadcasted_iota(jnp.int32, (16,), 0) if interp
               else plgpu.broadcasted_iota(jnp.int32, (16,), 0, layout=col))
        cix = bcast_col(cix, BK, 16)
        base = (i % rq) * hk
        a_op = jnp.where(cix == base, bcast_row(p[0], 16), 0.0)
        for h in range(1, hk):
          a_op = jnp.where(cix == base + h, bcast_row(p[h], 16), a_op)
        return a_op.astype(jnp.bfloat16)

      def query(h, i):  # R_j^T R_i q_i of head h for the tile's keys: [64, Hd]
        ah = bcast_col(load(a_s.at[h, i], (pl.ds(0, hd),), col), BK, hd)
        ah_sw = bcast_col(load(a_s.at[h, i], (pl.ds(hd, hd),), col), BK, hd)
        if c_v is None:
          return ah * load(c_s, (), wg) + ah_sw * load(s_s, (), wg)
        return ah * c_v + ah_sw * s_v

      def logits(i, keep_g):
        """Per head: p and scale ds of query i against the tile's keys ([64] each), dK, and (g, gelu') if keep_g
        (one hidden chunk)."""
        kv = [jnp.zeros((BK, hd), f32) for _ in range(hk)]
        dp = [jnp.zeros((BK,), f32) for _ in range(hk)]
        kept = None
        for ci in range(nc):
          g, gd = hidden(i, ci)
          kept = (g, gd) if keep_g else None
          gb = g.astype(jnp.bfloat16)
          for h in range(hk):
            kv[h] = kv[h] + mm(gb, ga_s, w2b_s.at[ci, h], (BK, hd))
            dp[h] = dp[h] + jnp.sum(g * dgo_row(i, h, ci), axis=1)
        visible = kp_v <= qp_s[i]
        p, ds, dk = [], [], []
        for h in range(hk):
          k = kv[h] + bcast_col(load(b2_s.at[h], (), col), BK, hd)
          qr = query(h, i)
          ph = jnp.where(visible, jnp.exp(jnp.sum(qr * k, axis=1) * scale - lse_s[h, i]), 0.0)
          dsv = ph * (dp[h] - dl_s[h, i]) * scale
          p.append(ph)
          ds.append(dsv)
          dk.append(bcast_row(dsv, hd) * qr)
        return p, ds, dk, kept

      def chunk_step(i, slot, hid, p, dk, dw_c, dw2_acc, du_acc=None):
        """dw's chunk += dh = dg o gelu', dW2k's += g^T dK (wgmma, g and dK through this warpgroup's buffers); the
        chunk's inputs in buffer `slot`; hid: (g, gelu') or a function computing them (with wgmma_overlap, called
        while dg's wgmmas run). With du_acc ([64 queries of the block, FC]): its row for query i (of the block) +=
        the sum of dh down the keys, by a wgmma with a one-hot A. Reading dg waits for every wgmma issued before, so
        the previous query's (which read g's, dK's and dh's buffers) are done before they are written."""
        early = opts.wgmma_overlap and opts.dg_one_acc and callable(hid)
        if callable(hid) and not early:
          hid = hid()
        if opts.dg_one_acc:  # every head's product into one accumulator
          def dg_products(acc):
            for h in range(hk):
              a_op = dk[h].astype(jnp.bfloat16)
              if interp:  # the interpreter's wgmma reads A from shared memory only (and runs each at once)
                dka_s[...] = a_op
                a_op = dka_s
              plgpu.wgmma(acc, a_op, dg_b(w2t_s, w2b_s, slot, h))
            if fold:  # + sum_h p^h dG^h_i
              a_op = pdg_a(p, i)
              if interp:
                extra['pa'].at[wgi][...] = a_op
                a_op = extra['pa'].at[wgi]
              plgpu.wgmma(acc, a_op, dgo_s.at[slot, pl.ds(pl.multiple_of(i // rq * 16, 16), 16)])
            return acc[...], (hid() if early else hid)  # the GELU while the wgmmas run
          dg, (g, gd) = pl.run_scoped(dg_products, plgpu.ACC((BK, FC), f32))
        else:
          g, gd = hid
          dg = jnp.zeros((BK, FC), f32)
          for h in range(hk):
            dg = dg + mm(dk[h].astype(jnp.bfloat16), dka_s, dg_b(w2t_s, w2b_s, slot, h), (BK, FC))
        for h in range(0 if fold else hk):
          dg = dg + bcast_row(p[h], FC) * dgo_row(i, h, slot)
        dh = dg * gd
        gb = g.astype(jnp.bfloat16)
        gs_w[...] = gb.T if interp else gb
        for h in range(hk):
          dks_w[h] = dk[h].astype(jnp.bfloat16)
        if du_acc is not None:
          dhs_w[...] = dh.astype(jnp.bfloat16)
        plgpu.commit_smem()
        a_op = gs_w if interp else plgpu.transpose_ref(gs_w, (1, 0))
        for h in range(hk):
          plgpu.wgmma(dw2_acc[h], a_op, dks_w.at[h])
        if du_acc is not None:  # a [64] row vector (a value or two a thread) compared, then broadcast along rows
          iota = (jax.lax.broadcasted_iota(jnp.int32, (DQ,), 0) if interp
                  else plgpu.broadcasted_iota(jnp.int32, (DQ,), 0, layout=row))
          one_hot = bcast_row(jnp.where(iota == i, 1.0, 0.0), BK).astype(jnp.bfloat16)
          if interp:  # A from shared memory only
            ga_s[...] = one_hot
            one_hot = ga_s
          plgpu.wgmma(du_acc, one_hot, dhs_w)
        if not opts.wgmma_overlap:
          plgpu.wgmma_wait(0)  # before g's, dK's and dh's buffers are written again (else: dg's read waits)
        return dw_c + dh

      zeros = lambda r, cols: cast(jnp.zeros((r, cols), f32), wg)  # noqa: E731
      my_queries = jnp.maximum(hi - lo - wgi + wgs - 1, 0) // wgs

      def one_pass(dw2_acc):  # dW2k's accumulators stay wgmma accumulators across the loop
        def query_step(it, carry):
          dw, db = carry
          i = lo + it * wgs + wgi  # warpgroups take turns over the queries
          p, _, dk, kept = logits(i, keep)
          new_dw = list(dw)
          for ci in range(nc):
            hid = kept if keep else functools.partial(hidden, i, ci)
            new_dw[ci] = chunk_step(i, ci, hid, p, dk, dw[ci], dw2_acc[ci * hk:(ci + 1) * hk])
          return tuple(new_dw), tuple(db[h] + dk[h] for h in range(hk))

        init = (tuple(zeros(BK, FC) for _ in range(nc)), tuple(zeros(BK, hd) for _ in range(hk)))
        dw, db = jax.lax.fori_loop(0, my_queries, query_step, init)
        return dw, db, [acc[...] for acc in dw2_acc]

      def out_db(db, split):
        for h in range(hk):
          st_s[...] = db[h]
          plgpu.commit_smem()
          plgpu.copy_smem_to_gmem(st_s, db_out.at[bi, split, ki, :, pl.ds((gi * hk + h) * hd, hd)])
          plgpu.wait_smem_to_gmem(0)

      def out_dw2(split, ci, dw2):  # dW2k of chunk ci, per head
        for h in range(hk):
          st_s[...] = dw2[h]
          plgpu.commit_smem()
          cols = pl.ds((gi * hk + h) * hd, hd)
          plgpu.copy_smem_to_gmem(st_s, dw2_out.at[bi, split, ki, pl.ds(ci * FC, FC), cols])
          plgpu.wait_smem_to_gmem(0)

      if not d.lq:
        dw, db, dw2 = pl.run_scoped(one_pass, [plgpu.ACC((FC, hd), f32) for _ in range(nc * hk)])

        def out():  # through shared memory no warpgroup reads any more
          for ci in range(nc):
            w_s[ci] = dw[ci]
          plgpu.commit_smem()
          for ci in range(nc):
            plgpu.copy_smem_to_gmem(w_s.at[ci], dw_out.at[bi, z * wgs + wgi, keys, pl.ds(ci * FC, FC)])
          plgpu.wait_smem_to_gmem(0)
          out_db(db, qbi * wgs + wgi)
          for ci in range(nc):
            out_dw2(qbi * wgs + wgi, ci, dw2[ci * hk:(ci + 1) * hk])

        in_turn(wgs, wgi, done, turn, out)
        return

      # Logits first: p and ds from the query kernel (masked here: it leaves pairs no query of its tile sees
      # unwritten). Warpgroups take turns over the hidden chunks: dw and dW2k of a chunk over all queries, the
      # chunk's inputs copied into the warpgroup's own buffers (slot v) when it comes to it. db2k is summed
      # outside, from the query kernel's ds.
      def chunk_pass(v, ci, dw2_acc):
        """Chunk ci over all the block's queries, its inputs in buffer v: dw (and du) out, dW2k into dw2_acc."""
        fetch_chunk(ci, v)
        wc = load(w_s.at[v], (), wg) if opts.hold_w else None  # held across the queries, or read for each

        def q_step(i, dw_c, du_acc=None):
          visible = kp_v <= qp_s[i]
          p = [jnp.where(visible, load(pd_s.at[0, h, i], (), row), 0.0) for h in range(hk)]
          ds = [jnp.where(visible, load(pd_s.at[1, h, i], (), row), 0.0) for h in range(hk)]
          dk = [bcast_row(ds[h], hd) * query(h, i) for h in range(hk)]
          return chunk_step(i, v, functools.partial(hidden, i, v, wc), p, dk, dw_c, dw2_acc, du_acc)

        init = zeros(BK, FC)
        if d.kdu:  # du of the block's queries in a wgmma accumulator across them
          def with_du(du_acc):
            res = jax.lax.fori_loop(lo, hi, functools.partial(q_step, du_acc=du_acc), init)
            return res, du_acc[...]
          dw_c, du_c = pl.run_scoped(with_du, plgpu.ACC((DQ, FC), f32))
        else:
          dw_c = jax.lax.fori_loop(lo, hi, q_step, init)
        w_s[v] = dw_c  # out through w's buffer: only this warpgroup reads it
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(w_s.at[v], dw_out.at[bi, z, keys, pl.ds(ci * FC, FC)])
        plgpu.wait_smem_to_gmem(0)
        if d.kdu:  # then du's rows of the block, the same way
          w_s[v] = du_c
          plgpu.commit_smem()
          src = w_s.at[v] if du_rows == DQ else w_s.at[v, pl.ds(0, du_rows)]
          plgpu.copy_smem_to_gmem(src, du_out.at[bi, ki * gk + gi, qbi, :, pl.ds(ci * FC, FC)])
          plgpu.wait_smem_to_gmem(0)

      def pass2(v, dw2_acc):  # all of warpgroup v's chunks, then their dW2k out in turn
        for r, ci in enumerate(range(v, nc, wgs)):
          chunk_pass(v, ci, dw2_acc[r * hk:(r + 1) * hk])

        def out():  # this warpgroup's dW2k chunks, through st_s in turn
          for r, ci in enumerate(range(v, nc, wgs)):
            out_dw2(qbi, ci, [acc[...] for acc in dw2_acc[r * hk:(r + 1) * hk]])

        all_done(wgs, done)
        turn_of(v, wgs, turn, out)

      n_rounds = -(-nc // wgs)

      def round_of(v, r, dw2_acc):  # dw2_rounds: chunk v + r wgs (if any), then every warpgroup's dW2k out in turn
        ci = v + r * wgs
        if ci < nc:
          chunk_pass(v, ci, dw2_acc)

        def out():
          if ci < nc:
            out_dw2(qbi, ci, [acc[...] for acc in dw2_acc])

        all_done(wgs, extra['rdone'].at[r] if wgs > 1 else None)
        turn_of(v, wgs, extra['rturn'], out, first=r * (wgs - 1))

      for v in range(wgs):  # static chunk indices per warpgroup
        def mine(v=v):
          if opts.dw2_rounds:
            for r in range(n_rounds):
              pl.run_scoped(functools.partial(round_of, v, r), [plgpu.ACC((FC, hd), f32) for _ in range(hk)])
          else:
            pl.run_scoped(functools.partial(pass2, v), [plgpu.ACC((FC, hd), f32) for _ in range(n_rounds * hk)])
        pl.when(wgi == v)(mine) if wgs > 1 else mine()

    pl.when(hi > lo)(live)

  slots = wgs if d.lq else nc  # buffers of u, w, dG and W2k: per warpgroup (logits first) or per chunk
  per_chunk = 3 + hk * (2 if with_w2t else 1)  # copies of a chunk's inputs
  scratch = [plgpu.SMEM((hk, qb, 2 * hd), f32), plgpu.SMEM((slots, qb, FC), f32),
             plgpu.SMEM((slots, BK, FC), f32, transforms=f_tf),
             plgpu.SMEM((slots, hk, FC, hd), jnp.bfloat16, transforms=hd_tf), plgpu.SMEM((hk, hd), f32),
             plgpu.SMEM((BK, hd), f32, transforms=f_tf), plgpu.SMEM((BK, hd), f32, transforms=f_tf),
             plgpu.SMEM((qb,), jnp.int32), plgpu.SMEM((BK,), jnp.int32),
             plgpu.SMEM((32,) if d.gm else rng.shape, jnp.int32),  # the table (a placeholder when in global memory)
             plgpu.SMEM((hk, qb), f32), plgpu.SMEM((hk, qb), f32),
             (plgpu.SMEM((slots, qb * hk, FC), jnp.bfloat16, transforms=k16_tf) if fold
              else plgpu.SMEM((slots, hk, qb, FC), f32)),
             plgpu.SMEM((wgs, BK, FC), jnp.bfloat16, transforms=hd_tf),
             plgpu.SMEM((wgs, hk, BK, hd), jnp.bfloat16, transforms=hd_tf), plgpu.SMEM((BK, hd), f32, transforms=f_tf),
             plgpu.Barrier(num_barriers=10 + nc * per_chunk), *sync_barriers(wgs)]
  extras = {}  # more scratch, by name
  if with_w2t:
    extras['w2t'] = plgpu.SMEM((slots, hk, hd, FC), jnp.bfloat16, transforms=hd_tf)
  if d.lq:  # p and ds of every (query, key), per head, from the query kernel
    extras['pd'] = plgpu.SMEM((2, hk, qb, BK), f32)
  if d.kdu:
    extras['dhs'] = plgpu.SMEM((wgs, BK, FC), jnp.bfloat16, transforms=fc_tf)
  if d.lq and opts.dw2_rounds:  # per round of chunks: all warpgroups done, then each one's turn to write out
    n_rounds = -(-nc // wgs)
    extras.update(rdone=plgpu.Barrier(num_arrivals=wgs, num_barriers=n_rounds),
                  rturn=plgpu.Barrier(num_barriers=max(n_rounds * (wgs - 1), 1)))
  if interp and fold:  # A of dg's p dG term
    extras['pa'] = plgpu.SMEM((wgs, BK, 16), jnp.bfloat16, transforms=k16_tf)
  if interp:
    extras.update(gsT=plgpu.SMEM((wgs, FC, BK), jnp.bfloat16, transforms=hd_tf),
                  ga=plgpu.SMEM((wgs, BK, FC), jnp.bfloat16, transforms=fc_tf),
                  dka=plgpu.SMEM((wgs, BK, hd), jnp.bfloat16, transforms=hd_tf))
  k_extras = list(extras)
  scratch += list(extras.values())
  wdw = 1 if d.lq else wgs  # dw's, db's and dW2k's partials per program
  k_call = plgpu.kernel(
      k_kernel, out_type=[jax.ShapeDtypeStruct((b, n_qb * gk * wdw, d.sk, fp), f32),
                          *([] if d.lq else [jax.ShapeDtypeStruct((b, n_qb * wdw, n_kt, BK, n * hd), f32)]),
                          jax.ShapeDtypeStruct((b, n_qb * wdw, n_kt, fp, n * hd), f32),
                          *([jax.ShapeDtypeStruct((b, n_kt * gk, n_qb, du_rows, fp), f32)] if d.kdu else [])],
      scratch_types=scratch, grid=(n_qb * gk, n_kt, b), grid_names=('z', 'k', 'b'), interpret=interpret,
      kernel_name='selective_fused_bwd_key_mgpu', **params)
  outs = k_call(a, u_, w_, w2b, w2t, b2_, c, s, qp, kp, rng, lse_, delta, dgo_k, *pd)
  (dw_p, dw2_p, *du_k), db_p = ((outs[0], *outs[2:]), outs[1]) if not d.lq else (outs, None)
  live_qk = q_hi > q_lo  # [query blocks, key tiles]: the programs that wrote partials
  live_k = live_qk[None, :, None, :, None, None]
  if d.kdu:  # du's partials per key tile and head group, [B, parts, query blocks, du_rows (qb used), Fp]
    live_du = jnp.repeat(live_qk.T, gk, axis=0)[None, :, :, None, None]  # [parts, query blocks]
    du = jnp.where(live_du, du_k[0], 0.0)[:, :, :, :qb].sum(1).reshape(b, d.tq, fp)
  dw = jnp.where(live_k, dw_p.reshape(b, n_qb, gk * wdw, n_kt, BK, fp), 0.0).sum((1, 2)).reshape(b, d.sk, fp)
  if d.lq:  # db2k = sum_ij scale ds_ij (a_i o c_j + a'_i o s_j), from the query kernel's ds (visible pairs: written)
    # One product for both halves: [c_j, s_j] summed against ds over the keys ([B, N, Tq, 2 Hd]), then times
    # [a_i, a'_i] and summed over the queries.
    ds_ = jnp.where((qp[None, :] >= kp[:, None])[None, None], pd_raw[1], 0.0)  # [B, N, Sk, Tq]
    # Compiled, in three bfloat16 passes (about float32's accuracy, on the tensor cores): on one H200 at the
    # original config (kv_hidden 256) 43 us a step against 67 in float32 (BENCHMARKS.md, "twelfth version").
    prec = 'highest' if interp else jax.lax.DotAlgorithmPreset.BF16_BF16_F32_X3
    dsr = jnp.einsum('bnji,jd->bnid', ds_, jnp.concatenate([c, s], axis=1), precision=prec)
    db2 = (a * dsr).sum((0, 2))
    db2 = (db2[:, :hd] + db2[:, hd:]).reshape(n, 2, h2)
  else:
    db2 = jnp.where(live_k, db_p.reshape(b, n_qb, wdw, n_kt, BK, n * hd), 0.0).sum((0, 1, 2, 3, 4)).reshape(n, 2, h2)
  dw2 = jnp.where(live_k, dw2_p.reshape(b, n_qb, wdw, n_kt, fp, n * hd), 0.0).sum((0, 1, 2, 3)).reshape(fp, n, 2, h2)
  f_in = w2.shape[0]
  return dq[:, :t_in], du[:, :t_in, :u.shape[-1]], dw[:, :s_in, :w.shape[-1]], dw2[:f_in], db2
