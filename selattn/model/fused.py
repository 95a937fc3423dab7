"""Fused selective attention: the literal [q_i ; x_j] computation in Pallas kernels, per-pair work kept on chip.

Dimensions: B batch, T query positions, S key positions, N heads, H head dim (D = N H), F the generator's hidden
width (`model.kv_hidden`), R = block_q * block_k query/key pairs of one tile.

The algebra (the MLP generator; the linear one is the special case below). With q_i the projected query, x_j the
layer input, and the first layer split by input half, W1 = [W1q ; W1x]:
  h_ij = u_i + w_j,   u_i = W1q^T q_i,   w_j = W1x^T x_j + b1            (per query + per key: no per-pair matmul)
  g_ij = gelu(h_ij)                                                      ([F] per pair: the irreducible part)
  K_ij = W2k^T g_ij + b2k,   V_ij = W2v^T g_ij + b2v                       (W2 = [W2k | W2v], D columns each)
Values. Per head n the softmax weights sum to one, so
  o_i = sum_j p_ij V_ij = W2v_n^T G_i + b2v_n,   G_i = sum_j p_ij g_ij      ([F] per query and head).
  The kernel accumulates G (N F numbers per query) and the second value layer runs once per query, outside:
  no per-pair V, no per-pair second layer on the value side.
Keys with RoPE. The logit is s_ij = (R_i q_i) . (R_j K_ij) / sqrt(H), and R_j acts on K_ij after the second layer,
  so K_ij = W2k_n^T g_ij + b2k_n must exist per pair: one [R, F] x [F, H] matmul per tile and head (tensor cores).
  Moving the rotation to the query side, s_ij = (W2k_n R_{i-j} q_i) . g_ij + ..., needs an [F] vector per pair
  and relative offset: the same F H multiply-adds per pair, without a shared matmul. So with RoPE the cheapest
  exact form keeps the per-pair key matmul; with a, b the halves of R_i q_i and k1, k2 those of K_ij,
  s_ij = sum_f cos(j th_f) (a_f k1_f + b_f k2_f) + sin(j th_f) (b_f k1_f - a_f k2_f), all on chip.
  Without RoPE the same kernel runs with cos = 1, sin = 0.
Backward (flash-attention style, p recomputed from the saved log-sum-exp). With dG_i the cotangent of G_i:
  dp_ij = dG_i . g_ij,   ds_ij = p_ij (dp_ij - Delta_i),   Delta_i = dG_i . G_i
  dg_ij = sum_n p^n_ij dG^n_i + W2k dK_ij,   dK^n_ij = ds^n_ij / sqrt(H) R_j^T (R_i q^n_i)
  dh_ij = dg_ij * gelu'(h_ij);  du_i = sum_j dh_ij;  dw_j = sum_i dh_ij
  d(R_i q^n_i) = sum_j ds^n_ij / sqrt(H) R_j K^n_ij;  dW2k = sum_ij g_ij dK_ij^T;  db2k = sum_ij dK_ij
  Merged (the default): one kernel per key tile loops over the query tiles that see it, recomputes each tile once,
  keeps dw, dW2k, db2k in its own output blocks and adds du_i, d(R_i q_i) into place with atomic adds. Split: one
  kernel per query tile (du, dq) and one per key tile (dw, dW2k, db2k), each recomputing its tiles: the key layer
  runs 5 times per pair (1 forward, 2 + 2 backward) against merged's 4, and the GELU 3 times against 2.
  On an H200 (B16 T299 N2 H32, kv_hidden 64, float32, one layer forward + backward): split 4.9 ms, merged 3.4,
  merged with 8 warps 2.7; `blockwise` 6.9 (docs/bench/fused_sweep_h200.jsonl).
The linear generator is the special case F = 2D (per head: its K columns, then its V columns), identity activation,
  W2k = [I ; 0], W2v = [0 ; I]: the literal computation of the original, for comparison with `factored`.

Memory: O(B T N F) for G and O(B T F) for u and w; nothing of size T S. Tiles above the causal diagonal (by
positions, so the zigzag order of the `seq` split works) are skipped. Off GPU the same kernels run with
`interpret=True`, which is how the CPU tests check them against `materialized`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

from absl import logging
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, Int

from selattn.model import tiles

_MASKED = -1e30  # a finite "minus infinity": exp(_MASKED - m) is 0 and _MASKED - _MASKED is not NaN
_GELU_C = math.sqrt(2.0 / math.pi)
_GELU_A = 0.044715


@dataclasses.dataclass(frozen=True)
class Blocks:
  """Tile sizes (powers of two) and Triton launch parameters of the fused kernels."""
  block_q: int = 16
  block_k: int = 16
  block_f: int = 32  # hidden units per chunk: a tile holds [block_q, block_k, block_f] of g at a time
  num_warps: int = 8  # per-layer on an H200 (docs/bench/fused_sweep_h200.jsonl): 8 beat 4 by 1.2-1.3x, merged
  num_stages: int = 1
  # 'merged': one backward kernel per key tile that also adds du, dq into place with atomic adds; 'split': two
  # (per query tile: du, dq; per key tile: dw, dW2k, db2k), each recomputing the tiles, deterministic. merged does
  # one tile recompute fewer (1.5x faster training steps on an H200), but sums floats in a varying order, so on a
  # GPU its gradients are not bit-reproducible run to run. 'mgpu': Mosaic GPU kernels (fused_mgpu_bwd.py: Hopper,
  # bfloat16 matmul operands), falling back to 'merged' with one logged line where they cannot run. 'auto': 'mgpu'
  # compiled on a Hopper GPU outside a multi-device mesh, else 'merged' (`resolve_auto`).
  backward: str = 'merged'
  # 'triton': `_forward` (this module); 'mgpu': the Mosaic GPU forward of fused_mgpu.py (Hopper: wgmma, bfloat16
  # key-layer operands), the same residuals (G, lse) for the same backward. Where it cannot run (another GPU, its
  # shared memory, the linear generator's identity activation) the Triton forward runs, with one logged line.
  # 'auto': as the backward's.
  forward: str = 'triton'
  # Parallelism beyond one program per (batch, tile): heads per program (0 = all; fewer = more programs and fewer
  # live accumulators per program, the GELU recomputed once per head group), and the key tiles of a query tile
  # (forward) or the query tiles of a key tile (backward key kernel) dealt round-robin to this many programs whose
  # partial results are combined outside (forward: like flash-decoding, by their running max and sum). Under a
  # `tensor` split a device holds fewer heads: the kernels then take the largest common divisor. On an H200 none
  # beat the defaults per layer by more than 0.3% at the original config or 1.4% at B4 T4096 N4 (the kernels are
  # not short of programs: docs/bench/fused_sweep_par_h200.jsonl, fused_sweep_long_h200.jsonl); one head per
  # program was 1.2x slower (the GELU recomputed per head).
  heads_per_program: int = 0
  fwd_splits: int = 1
  bwd_splits: int = 1


@dataclasses.dataclass(frozen=True)
class _Static:
  scale: float
  act: str  # 'gelu' (tanh approximation, jax.nn.gelu's default) | 'identity'
  bq: int
  bk: int
  fc: int
  num_warps: int
  num_stages: int
  interpret: bool
  backward: str  # Blocks.backward
  forward: str  # Blocks.forward (after the fallback check)
  hp: int  # heads per program
  ks: int  # forward: programs per query tile (key tiles dealt round-robin)
  qs: int  # backward key kernel: programs per key tile (query tiles dealt round-robin)


def _act(h, act):
  if act == 'identity':
    return h
  return 0.5 * h * (1.0 + jnp.tanh(_GELU_C * (h + _GELU_A * h * h * h)))


def _act_grad(h, act):
  if act == 'identity':
    return jnp.ones_like(h)
  t = jnp.tanh(_GELU_C * (h + _GELU_A * h * h * h))
  return 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * _GELU_C * (1.0 + 3.0 * _GELU_A * h * h)


# ----------------------------------------------------------------------------------------------------------------
# The tile, shared by the three kernels. Heads are unrolled (few); hidden chunks run in a loop (unrolling them made
# Triton compile for minutes at F = 256), with per-chunk accumulators kept in the kernel's own output blocks.

def _loop(n: int, body, init):
  """body(c, carry) over hidden chunks c: inline for one chunk, a loop otherwise."""
  return body(0, init) if n == 1 else jax.lax.fori_loop(0, n, body, init)


def _hidden(st: _Static, u_ref, w_ref, rows, k_start, c):
  """h_ij = u_i + w_j and g_ij = act(h_ij) for hidden chunk c of the tile: [bq, bk, fc] each, float32."""
  uc = u_ref[rows, pl.ds(c * st.fc, st.fc)].astype(jnp.float32)
  wc = w_ref[pl.ds(k_start, st.bk), pl.ds(c * st.fc, st.fc)].astype(jnp.float32)
  h = uc[:, None, :] + wc[None, :, :]
  return h, _act(h, st.act)


def _keys(st: _Static, n_heads, n_chunks, qa, qb, u_ref, rows, w_ref, w2_ref, b2, k_start, cos, sin, dgo_ref=None):
  """Pass 1 over hidden chunks: rotated keys R_j K_ij (halves, per head [bq, bk, H2]) and logits per head
  [bq, bk]; with `dgo_ref` also dp_ij = dG_i . g_ij per head. `cache` is (h, g) when there is a single chunk."""
  bq, bk, fc = st.bq, st.bk, st.fc
  h2 = qa[0].shape[-1]

  def body(c, carry):
    k1, k2, dp, _ = carry
    h, g = _hidden(st, u_ref, w_ref, rows, k_start, c)
    g2 = g.reshape(bq * bk, fc).astype(w2_ref.dtype)
    k1 = tuple(k1[n] + tiles.dot(g2, w2_ref[pl.ds(c * fc, fc), n, 0, :]) for n in range(n_heads))
    k2 = tuple(k2[n] + tiles.dot(g2, w2_ref[pl.ds(c * fc, fc), n, 1, :]) for n in range(n_heads))
    if dgo_ref is not None:
      dp = tuple(dp[n] + jnp.sum(g * dgo_ref[rows, n, pl.ds(c * fc, fc)].astype(jnp.float32)[:, None, :], axis=2)
                 for n in range(n_heads))
    return k1, k2, dp, ((h, g) if n_chunks == 1 else ())

  zeros = tuple(jnp.zeros((bq * bk, h2), jnp.float32) for _ in range(n_heads))
  dp0 = tuple(jnp.zeros((bq, bk), jnp.float32) for _ in range(n_heads)) if dgo_ref is not None else ()
  k1, k2, dp, cache = _loop(n_chunks, body, (zeros, zeros, dp0, ()))
  kr1, kr2, logits = [], [], []
  for n in range(n_heads):
    a = (k1[n] + b2[n][0][None, :]).reshape(bq, bk, h2)
    b = (k2[n] + b2[n][1][None, :]).reshape(bq, bk, h2)
    r1 = a * cos[None] - b * sin[None]  # R_j K_ij, non-interleaved halves
    r2 = a * sin[None] + b * cos[None]
    kr1.append(r1)
    kr2.append(r2)
    logits.append(jnp.sum(qa[n][:, None, :] * r1 + qb[n][:, None, :] * r2, axis=2) * st.scale)
  return kr1, kr2, logits, dp, cache or None


def _zero_chunks(st, ref, n_chunks, index, shape):
  """Zeroes an output block one `shape` piece per hidden chunk: Triton takes only power-of-two shapes, and the
  padded hidden width (a multiple of fc) and the heads of a program need not be powers of two."""
  for c in range(n_chunks):
    ref[index(pl.ds(c * st.fc, st.fc))] = jnp.zeros(shape, ref.dtype)


def _chunk(st, u_ref, w_ref, rows, k_start, c, cache):
  return cache if cache is not None else _hidden(st, u_ref, w_ref, rows, k_start, c)


def _load_query(q_ref, n_heads, rows=slice(None)):
  qa = [q_ref[rows, n, 0, :].astype(jnp.float32) for n in range(n_heads)]
  qb = [q_ref[rows, n, 1, :].astype(jnp.float32) for n in range(n_heads)]
  return qa, qb


def _load_b2(b2_ref, n_heads):
  return [(b2_ref[n, 0, :].astype(jnp.float32), b2_ref[n, 1, :].astype(jnp.float32)) for n in range(n_heads)]


def _visible(qpos, kpos):
  """Whether any key of the tile is visible to any query of it (positions, so any token order works)."""
  return jnp.min(kpos) <= jnp.max(qpos)


def _dealt(n: int, split, n_splits: int, body, init):
  """Folds `body(tile, carry)` over tiles split, split + n_splits, ... < n: one program's share of n tiles."""
  if n_splits == 1:
    return jax.lax.fori_loop(0, n, body, init)

  def each(k, carry):
    tile = split + k * n_splits
    # A clamped index keeps the loads in bounds; the tile past the end is skipped.
    return jax.lax.cond(tile < n, lambda c: body(jnp.minimum(tile, n - 1), c), lambda c: c, carry)

  return jax.lax.fori_loop(0, -(-n // n_splits), each, init)


def _over_key_tiles(st, n_k, qpos, kpos_ref, cos_ref, sin_ref, step, init, split=0, n_splits=1):
  """Folds `step(start, mask, cos, sin, carry)` over this program's share of the key tiles that hold a key
  visible to the query tile."""
  bk = st.bk

  def body(kb, carry):
    start = kb * bk
    kpos = kpos_ref[pl.ds(start, bk)]

    def compute(carry):
      cos, sin = cos_ref[pl.ds(start, bk), :], sin_ref[pl.ds(start, bk), :]
      return step(start, qpos[:, None] >= kpos[None, :], cos, sin, carry)

    return jax.lax.cond(_visible(qpos, kpos), compute, lambda c: c, carry)

  return _dealt(n_k, split, n_splits, body, init)


# ----------------------------------------------------------------------------------------------------------------
# Forward: one program per (batch, query tile, head group, key split), online softmax over its key tiles; the
# unnormalised G accumulates in its output block, beside the running max m and sum l (combined in `_forward`).

def _fwd_kernel(q_ref, u_ref, w_ref, w2_ref, b2_ref, cos_ref, sin_ref, qpos_ref, kpos_ref, g_ref, m_ref, l_ref, *,
                st: _Static, n_heads: int, n_chunks: int, n_k: int):
  bq, fc = st.bq, st.fc
  rows = slice(None)
  qa, qb = _load_query(q_ref, n_heads)
  b2 = _load_b2(b2_ref, n_heads)
  qpos = qpos_ref[...]
  for n in range(n_heads):
    _zero_chunks(st, g_ref, n_chunks, lambda cols, n=n: (slice(None), n, cols), (bq, fc))

  def step(start, mask, cos, sin, carry):
    m, l = list(carry[0]), list(carry[1])
    _, _, logits, _, cache = _keys(st, n_heads, n_chunks, qa, qb, u_ref, rows, w_ref, w2_ref, b2, start, cos, sin)
    p, corr = [], []
    for n in range(n_heads):
      s = jnp.where(mask, logits[n], _MASKED)
      m_new = jnp.maximum(m[n], jnp.max(s, axis=1))
      corr.append(jnp.exp(m[n] - m_new))
      p.append(jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0))
      l[n] = l[n] * corr[n] + jnp.sum(p[n], axis=1)
      m[n] = m_new

    def values(c, carry):
      _, g = _chunk(st, u_ref, w_ref, rows, start, c, cache)
      for n in range(n_heads):
        cols = (slice(None), n, pl.ds(c * fc, fc))
        g_ref[cols] = g_ref[cols] * corr[n][:, None] + jnp.sum(p[n][:, :, None] * g, axis=1)
      return carry

    _loop(n_chunks, values, 0)
    return tuple(m), tuple(l)

  init = (tuple(jnp.full((bq,), _MASKED, jnp.float32) for _ in range(n_heads)),
          tuple(jnp.zeros((bq,), jnp.float32) for _ in range(n_heads)))
  m, l = _over_key_tiles(st, n_k, qpos, kpos_ref, cos_ref, sin_ref, step, init, pl.program_id(2) % st.ks, st.ks)
  for n in range(n_heads):
    m_ref[n, :] = m[n]
    l_ref[n, :] = l[n]


# ----------------------------------------------------------------------------------------------------------------
# Backward.

def _tile_grads(st, n_heads, qa, qb, logits, dp, mask, lse, delta, cos, sin):
  """p, and the key cotangents dK (unrotated halves, per head [R, H2]) and ds (scaled) per head."""
  bq, bk = st.bq, st.bk
  h2 = qa[0].shape[-1]
  p, ds, dk1, dk2 = [], [], [], []
  for n in range(n_heads):
    pn = jnp.where(mask, jnp.exp(logits[n] - lse[n][:, None]), 0.0)
    dsn = pn * (dp[n] - delta[n][:, None]) * st.scale
    # s = scale a . R_j K with a = R_i q: dK = scale ds R_j^T a = scale ds [a1 cos + a2 sin ; a2 cos - a1 sin].
    a1, a2 = qa[n][:, None, :], qb[n][:, None, :]
    dk1.append((dsn[:, :, None] * (a1 * cos[None] + a2 * sin[None])).reshape(bq * bk, h2))
    dk2.append((dsn[:, :, None] * (a2 * cos[None] - a1 * sin[None])).reshape(bq * bk, h2))
    p.append(pn)
    ds.append(dsn)
  return p, ds, dk1, dk2


def _dh(st, n_heads, c, h, g, p, dk1, dk2, w2_ref, dgo_ref, rows):
  """dh_ij of hidden chunk c: (sum_n p^n_ij dG^n_i + W2k dK_ij) * act'(h_ij), [bq, bk, fc]."""
  bq, bk, fc = st.bq, st.bk, st.fc
  dg = jnp.zeros((bq * bk, fc), jnp.float32)
  for n in range(n_heads):
    dg += tiles.dot(dk1[n].astype(w2_ref.dtype), w2_ref[pl.ds(c * fc, fc), n, 0, :], trans_b=True)
    dg += tiles.dot(dk2[n].astype(w2_ref.dtype), w2_ref[pl.ds(c * fc, fc), n, 1, :], trans_b=True)
  dg = dg.reshape(bq, bk, fc)
  for n in range(n_heads):
    dg += p[n][:, :, None] * dgo_ref[rows, n, pl.ds(c * fc, fc)].astype(jnp.float32)[:, None, :]
  return dg * _act_grad(h, st.act)


def _bwd_query_kernel(q_ref, u_ref, w_ref, w2_ref, b2_ref, cos_ref, sin_ref, qpos_ref, kpos_ref, lse_ref,
                      delta_ref, dgo_ref, du_ref, dq_ref, *, st: _Static, n_heads: int, n_chunks: int, n_k: int):
  """One program per (batch, query tile): du (accumulated in its output block) and dq, looping over key tiles."""
  bq, fc = st.bq, st.fc
  rows = slice(None)
  qa, qb = _load_query(q_ref, n_heads)
  b2 = _load_b2(b2_ref, n_heads)
  lse = [lse_ref[n, :] for n in range(n_heads)]
  delta = [delta_ref[n, :] for n in range(n_heads)]
  qpos = qpos_ref[...]
  h2 = qa[0].shape[-1]
  _zero_chunks(st, du_ref, n_chunks, lambda cols: (slice(None), cols), (bq, fc))

  def step(start, mask, cos, sin, carry):
    dqa, dqb = list(carry[0]), list(carry[1])
    kr1, kr2, logits, dp, cache = _keys(st, n_heads, n_chunks, qa, qb, u_ref, rows, w_ref, w2_ref, b2, start,
                                        cos, sin, dgo_ref)
    p, ds, dk1, dk2 = _tile_grads(st, n_heads, qa, qb, logits, dp, mask, lse, delta, cos, sin)
    for n in range(n_heads):  # d(R_i q_i) = scale sum_j ds_ij R_j K_ij (ds is already scaled)
      dqa[n] += jnp.sum(ds[n][:, :, None] * kr1[n], axis=1)
      dqb[n] += jnp.sum(ds[n][:, :, None] * kr2[n], axis=1)

    def hidden(c, carry):
      h, g = _chunk(st, u_ref, w_ref, rows, start, c, cache)
      cols = (slice(None), pl.ds(c * fc, fc))
      du_ref[cols] += jnp.sum(_dh(st, n_heads, c, h, g, p, dk1, dk2, w2_ref, dgo_ref, rows), axis=1)
      return carry

    _loop(n_chunks, hidden, 0)
    return tuple(dqa), tuple(dqb)

  zeros = tuple(jnp.zeros((bq, h2), jnp.float32) for _ in range(n_heads))
  dqa, dqb = _over_key_tiles(st, n_k, qpos, kpos_ref, cos_ref, sin_ref, step, (zeros, zeros))
  for n in range(n_heads):
    dq_ref[:, n, 0, :] = dqa[n]
    dq_ref[:, n, 1, :] = dqb[n]


def _bwd_key_kernel(q_ref, u_ref, w_ref, w2_ref, b2_ref, cos_ref, sin_ref, qpos_ref, kpos_ref, lse_ref, delta_ref,
                    dgo_ref, *out_refs, st: _Static, n_heads: int, n_chunks: int, n_q: int, merged: bool):
  """One program per (batch, key tile, head group, query split), looping over its share of the query tiles that
  see the key tile: dw, and its share of dW2k and db2k, all accumulated in the program's own output blocks.
  Merged (`out_refs` = du0, dq0, dw, dW2k, db2k, du, dq; du0/dq0 are the zeros aliased to du/dq): also du and dq,
  whole per batch, by atomic adds, so each tile is computed once in the backward pass. Split (`out_refs` = dw,
  dW2k, db2k): `_bwd_query_kernel` does those."""
  if merged:
    from jax.experimental.pallas import triton as plgpu  # noqa: PLC0415 (atomic adds: GPU, or interpreted)
    _, _, dw_ref, dw2_ref, db2_ref, du_ref, dq_ref = out_refs
  else:
    dw_ref, dw2_ref, db2_ref = out_refs
  bq, bk, fc = st.bq, st.bk, st.fc
  start = pl.program_id(1) * bk
  kpos = kpos_ref[pl.ds(start, bk)]
  cos, sin = cos_ref[pl.ds(start, bk), :], sin_ref[pl.ds(start, bk), :]
  b2 = _load_b2(b2_ref, n_heads)
  _zero_chunks(st, dw_ref, n_chunks, lambda cols: (slice(None), cols), (bk, fc))
  for n in range(n_heads):
    for half in (0, 1):
      _zero_chunks(st, dw2_ref, n_chunks, lambda cols, n=n, half=half: (cols, n, half, slice(None)),
                   (fc, dw2_ref.shape[-1]))
      db2_ref[n, half, :] = jnp.zeros(db2_ref.shape[-1:], db2_ref.dtype)

  def body(qb_idx, carry):
    rows = pl.ds(qb_idx * bq, bq)
    qpos = qpos_ref[rows]

    def compute(carry):
      qa, qb = _load_query(q_ref, n_heads, rows)
      lse = [lse_ref[n, rows] for n in range(n_heads)]
      delta = [delta_ref[n, rows] for n in range(n_heads)]
      mask = qpos[:, None] >= kpos[None, :]
      kr1, kr2, logits, dp, cache = _keys(st, n_heads, n_chunks, qa, qb, u_ref, rows, w_ref, w2_ref, b2, start,
                                          cos, sin, dgo_ref)
      p, ds, dk1, dk2 = _tile_grads(st, n_heads, qa, qb, logits, dp, mask, lse, delta, cos, sin)
      for n in range(n_heads):
        if merged:  # d(R_i q_i) += scale sum_j ds_ij R_j K_ij; scalar indices as arrays (the interpreter's rule)
          head, half = jnp.int32(n), (jnp.int32(0), jnp.int32(1))
          plgpu.atomic_add(dq_ref, (rows, head, half[0], slice(None)), jnp.sum(ds[n][:, :, None] * kr1[n], axis=1))
          plgpu.atomic_add(dq_ref, (rows, head, half[1], slice(None)), jnp.sum(ds[n][:, :, None] * kr2[n], axis=1))
        db2_ref[n, 0, :] += jnp.sum(dk1[n], axis=0)
        db2_ref[n, 1, :] += jnp.sum(dk2[n], axis=0)

      def hidden(c, carry):
        h, g = _chunk(st, u_ref, w_ref, rows, start, c, cache)
        cols = (slice(None), pl.ds(c * fc, fc))
        dh = _dh(st, n_heads, c, h, g, p, dk1, dk2, w2_ref, dgo_ref, rows)
        dw_ref[cols] += jnp.sum(dh, axis=0)
        if merged:
          plgpu.atomic_add(du_ref, (rows, pl.ds(c * fc, fc)), jnp.sum(dh, axis=1))
        g2 = g.reshape(bq * bk, fc).astype(w2_ref.dtype)
        for n in range(n_heads):
          dw2_ref[pl.ds(c * fc, fc), n, 0, :] += tiles.dot(g2, dk1[n].astype(g2.dtype), trans_a=True)
          dw2_ref[pl.ds(c * fc, fc), n, 1, :] += tiles.dot(g2, dk2[n].astype(g2.dtype), trans_a=True)
        return carry

      _loop(n_chunks, hidden, 0)
      return carry

    return jax.lax.cond(_visible(qpos, kpos), compute, lambda c: c, carry)

  _dealt(n_q, pl.program_id(2) % st.qs, st.qs, body, 0)


# ----------------------------------------------------------------------------------------------------------------
# pallas_call wrappers and the custom VJP, on padded arrays:
#   q [B, Tp, N, 2, H2]  u [B, Tp, Fp]  w [B, Sp, Fp]  w2 [Fp, N, 2, H2]  b2 [N, 2, H2]  cos, sin [Sp, H2]
#   qpos [Tp], kpos [Sp] (int32)  ->  G [B, Tp, N, Fp], lse [B, N, Tp]
# Grids are (B, tiles, head groups x splits): the third index z holds head group z // splits and split z % splits.

def _common_in_specs(st, q, u, w, w2, b2, cos, qpos, kpos, query_tiled: bool, splits: int):
  """Block specs of the shared inputs: query-side inputs tiled or whole, head-side ones of the program's group."""
  _, tp, _, _, h2 = q.shape
  sp, fp = w.shape[1], w.shape[2]
  rows = st.bq if query_tiled else tp
  tile = (lambda i: i) if query_tiled else (lambda i: 0)
  group = lambda z: z // splits
  return [
      pl.BlockSpec((None, rows, st.hp, 2, h2), lambda b, i, z: (b, tile(i), group(z), 0, 0)),
      pl.BlockSpec((None, rows, fp), lambda b, i, z: (b, tile(i), 0)),
      pl.BlockSpec((None, sp, fp), lambda b, i, z: (b, 0, 0)),
      pl.BlockSpec((fp, st.hp, 2, h2), lambda b, i, z: (0, group(z), 0, 0)),
      pl.BlockSpec((st.hp, 2, h2), lambda b, i, z: (group(z), 0, 0)),
      pl.BlockSpec(cos.shape, lambda b, i, z: (0, 0)),
      pl.BlockSpec(cos.shape, lambda b, i, z: (0, 0)),
      pl.BlockSpec((rows,), lambda b, i, z: (tile(i),)),
      pl.BlockSpec(kpos.shape, lambda b, i, z: (0,)),
  ]


def _forward(st: _Static, q, u, w, w2, b2, cos, sin, qpos, kpos):
  bsz, tp, n, _, _ = q.shape
  sp, fp = w.shape[1], w.shape[2]
  ks, groups = st.ks, n // st.hp
  kernel = functools.partial(_fwd_kernel, st=st, n_heads=st.hp, n_chunks=fp // st.fc, n_k=sp // st.bk)
  g, m, l = pl.pallas_call(
      kernel, grid=(bsz, tp // st.bq, groups * ks),
      in_specs=_common_in_specs(st, q, u, w, w2, b2, cos, qpos, kpos, query_tiled=True, splits=ks),
      out_specs=[pl.BlockSpec((None, None, st.bq, st.hp, fp), lambda b, i, z: (b, z % ks, i, z // ks, 0)),
                 pl.BlockSpec((None, None, st.hp, st.bq), lambda b, i, z: (b, z % ks, z // ks, i)),
                 pl.BlockSpec((None, None, st.hp, st.bq), lambda b, i, z: (b, z % ks, z // ks, i))],
      out_shape=[jax.ShapeDtypeStruct((bsz, ks, tp, n, fp), jnp.float32),
                 jax.ShapeDtypeStruct((bsz, ks, n, tp), jnp.float32),
                 jax.ShapeDtypeStruct((bsz, ks, n, tp), jnp.float32)],
      compiler_params=tiles.compiler_params(st), interpret=st.interpret, name='selective_fused_fwd',
  )(q, u, w, w2, b2, cos, sin, qpos, kpos)
  # The splits' partial softmaxes, each relative to its own running max m_s, rescaled to the common max M.
  m_all = jnp.max(m, axis=1)  # [B, N, Tp]
  scale = jnp.exp(m - m_all[:, None])  # [B, ks, N, Tp]; a split that saw no key has l_s = 0 and G_s = 0
  l_all = jnp.sum(scale * l, axis=1)
  # A query that sees no key (only padding rows) has l = 0: G = 0 there, and its lse makes p = 0 in backward.
  l_safe = jnp.where(l_all > 0, l_all, 1.0)
  g = jnp.einsum('bsnt,bstnf->btnf', scale, g) / jnp.transpose(l_safe, (0, 2, 1))[..., None]
  return g, m_all + jnp.log(l_safe)


def _backward(st: _Static, res, dg_out):
  q, u, w, w2, b2, cos, sin, qpos, kpos, g, lse = res
  bsz, tp, n, _, h2 = q.shape
  sp, fp = w.shape[1], w.shape[2]
  n_chunks, n_q, n_k = fp // st.fc, tp // st.bq, sp // st.bk
  qs, groups, hp = st.qs, n // st.hp, st.hp
  delta = jnp.einsum('btnf,btnf->bnt', dg_out, g)  # Delta_i = dG_i . G_i per head
  args = (q, u, w, w2, b2, cos, sin, qpos, kpos, lse, delta, dg_out)
  group = lambda z: z // qs
  whole_rows = [pl.BlockSpec((None, hp, tp), lambda b, i, z: (b, group(z), 0)),
                pl.BlockSpec((None, hp, tp), lambda b, i, z: (b, group(z), 0)),
                pl.BlockSpec((None, tp, hp, fp), lambda b, i, z: (b, 0, group(z), 0))]
  # Per program: dw [bk, Fp] of its head group and split, its share of dW2k and db2k (summed below).
  key_out_specs = [pl.BlockSpec((None, None, st.bk, fp), lambda b, i, z: (b, z, i, 0)),
                   pl.BlockSpec((None, None, None, fp, hp, 2, h2), lambda b, i, z: (b, i, z % qs, 0, group(z), 0, 0)),
                   pl.BlockSpec((None, None, None, hp, 2, h2), lambda b, i, z: (b, i, z % qs, group(z), 0, 0))]
  key_out_shapes = [jax.ShapeDtypeStruct((bsz, groups * qs, sp, fp), jnp.float32),
                    jax.ShapeDtypeStruct((bsz, n_k, qs, fp, n, 2, h2), jnp.float32),
                    jax.ShapeDtypeStruct((bsz, n_k, qs, n, 2, h2), jnp.float32)]
  key_in_specs = _common_in_specs(st, q, u, w, w2, b2, cos, qpos, kpos, query_tiled=False, splits=qs) + whole_rows
  kernel = functools.partial(_bwd_key_kernel, st=st, n_heads=hp, n_chunks=n_chunks, n_q=n_q,
                             merged=st.backward == 'merged')
  if st.backward == 'merged':
    query_outs = [pl.BlockSpec((None, tp, fp), lambda b, i, z: (b, 0, 0)),
                  pl.BlockSpec((None, tp, hp, 2, h2), lambda b, i, z: (b, 0, group(z), 0, 0))]
    zeros = (jnp.zeros((bsz, tp, fp), jnp.float32), jnp.zeros((bsz, tp, n, 2, h2), jnp.float32))
    dw, dw2, db2, du, dq = pl.pallas_call(
        kernel, grid=(bsz, n_k, groups * qs), in_specs=key_in_specs + query_outs,
        out_specs=key_out_specs + query_outs,
        out_shape=key_out_shapes + [jax.ShapeDtypeStruct(z.shape, z.dtype) for z in zeros],
        input_output_aliases={len(args): 3, len(args) + 1: 4},
        compiler_params=tiles.compiler_params(st), interpret=st.interpret, name='selective_fused_bwd_merged',
    )(*args, *zeros)
  else:
    du, dq = _backward_query(st, args, bsz, tp, n, h2, fp, n_chunks, n_q, n_k)
    dw, dw2, db2 = pl.pallas_call(
        kernel, grid=(bsz, n_k, groups * qs), in_specs=key_in_specs, out_specs=key_out_specs,
        out_shape=key_out_shapes,
        compiler_params=tiles.compiler_params(st), interpret=st.interpret, name='selective_fused_bwd_key',
    )(*args)
  return (dq.astype(q.dtype), du.astype(u.dtype), dw.sum(1).astype(w.dtype), dw2.sum((0, 1, 2)).astype(w2.dtype),
          db2.sum((0, 1, 2)).astype(b2.dtype), None, None, None, None)


def _backward_query(st, args, bsz, tp, n, h2, fp, n_chunks, n_q, n_k):
  """Split backward, per (batch, query tile, head group): du of the group (summed over groups) and dq."""
  q, u, w, w2, b2, cos, _, qpos, kpos = args[:9]
  hp = st.hp
  row_specs = [pl.BlockSpec((None, hp, st.bq), lambda b, i, z: (b, z, i)),
               pl.BlockSpec((None, hp, st.bq), lambda b, i, z: (b, z, i)),
               pl.BlockSpec((None, st.bq, hp, fp), lambda b, i, z: (b, i, z, 0))]
  du, dq = pl.pallas_call(
      functools.partial(_bwd_query_kernel, st=st, n_heads=hp, n_chunks=n_chunks, n_k=n_k),
      grid=(bsz, n_q, n // hp),
      in_specs=_common_in_specs(st, q, u, w, w2, b2, cos, qpos, kpos, query_tiled=True, splits=1) + row_specs,
      out_specs=[pl.BlockSpec((None, None, st.bq, fp), lambda b, i, z: (b, z, i, 0)),
                 pl.BlockSpec((None, st.bq, hp, 2, h2), lambda b, i, z: (b, i, z, 0, 0))],
      out_shape=[jax.ShapeDtypeStruct((bsz, n // hp, tp, fp), jnp.float32),
                 jax.ShapeDtypeStruct((bsz, tp, n, 2, h2), jnp.float32)],
      compiler_params=tiles.compiler_params(st), interpret=st.interpret, name='selective_fused_bwd_query',
  )(*args)
  return du.sum(1), dq


def _forward_any(st: _Static, *args):
  """(G, lse) from the forward kernel `st.forward` names: the same layout and meaning either way."""
  if st.forward == 'mgpu':
    from selattn.model import fused_mgpu  # noqa: PLC0415 (imports this module)
    return fused_mgpu.forward(*args, scale=st.scale, interpret=fused_mgpu.interpreter() if st.interpret else None)
  return _forward(st, *args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(st, q, u, w, w2, b2, cos, sin, qpos, kpos):
  return _forward_any(st, q, u, w, w2, b2, cos, sin, qpos, kpos)[0]


def _fused_fwd(st, q, u, w, w2, b2, cos, sin, qpos, kpos):
  g, lse = _forward_any(st, q, u, w, w2, b2, cos, sin, qpos, kpos)
  return g, (q, u, w, w2, b2, cos, sin, qpos, kpos, g, lse)


def _backward_any(st: _Static, res, dg_out):
  """The backward kernels `st.backward` names: Triton's (merged, split) or Mosaic GPU's."""
  if st.backward == 'mgpu':
    from selattn.model import fused_mgpu, fused_mgpu_bwd  # noqa: PLC0415 (they import this module)
    q, u, w, w2, b2 = res[:5]
    grads = fused_mgpu_bwd.backward(*res, dg_out, scale=st.scale,
                                    interpret=fused_mgpu.interpreter() if st.interpret else None)
    return tuple(x.astype(y.dtype) for x, y in zip(grads, (q, u, w, w2, b2))) + (None, None, None, None)
  return _backward(st, res, dg_out)


_fused.defvjp(_fused_fwd, _backward_any)


# ----------------------------------------------------------------------------------------------------------------
# The public entry: unpadded arrays in, selective attention out.


@functools.cache
def _log_once(msg: str) -> None:
  """One line per distinct reason, not one per layer and trace."""
  logging.warning(msg)


_FORWARDS = {'triton': 'the Triton forward', 'mgpu': 'the Mosaic GPU forward'}
_BACKWARDS = {'merged': 'the merged Triton backward', 'split': 'the split Triton backward',
              'mgpu': 'the Mosaic GPU backward'}


@functools.cache
def _log_kernels(forward: str, backward: str) -> None:
  """Which kernels `fused` runs (after 'auto' and any fallback), once per pair: a run's log says what it timed."""
  logging.info('selective_impl=fused runs %s and %s', _FORWARDS[forward], _BACKWARDS[backward])


def _halves(x: Array, h2: int) -> Array:
  """[..., H] -> [..., 2, H2]: the RoPE halves, each zero-padded to H2 (zeros add nothing to any dot product)."""
  half = (x.shape[-1] + 1) // 2
  x = tiles.pad(x, x.ndim - 1, 2 * half)
  return tiles.pad(x.reshape(*x.shape[:-1], 2, half), x.ndim, h2)


def unsupported(head_dim: int, blocks: Blocks = Blocks(), num_heads: int | None = None) -> str | None:
  """Why the fused kernels cannot take these sizes or tiles (the caller falls back to `blockwise`), or None."""
  for name in ('heads_per_program', 'fwd_splits', 'bwd_splits'):
    if getattr(blocks, name) < (0 if name == 'heads_per_program' else 1):
      return f'{name}={getattr(blocks, name)} is out of range'
  if num_heads is not None and blocks.heads_per_program and num_heads % blocks.heads_per_program:
    return f'heads_per_program={blocks.heads_per_program} does not divide the {num_heads} heads'
  for name in ('block_q', 'block_k', 'block_f'):
    v = getattr(blocks, name)
    if v < 1 or v & (v - 1):
      return f'{name}={v} is not a power of two'
  if blocks.block_q * blocks.block_k < 16 or blocks.block_f < 16:
    return (f'tiles of {blocks.block_q} x {blocks.block_k} pairs by {blocks.block_f} hidden units: a GPU matmul '
            'needs at least 16 in each dimension')
  if head_dim > 256:
    return f'head dim {head_dim} > 256'
  return None


def _asked(which: str, asked: dict) -> str:
  name = f'model.fused_{which}={asked[which]}'
  return name if asked[which] == 'mgpu' else f'{name} (the Mosaic GPU kernels)'


def resolve_auto(forward: str, backward: str, interpret: bool, act: str = 'gelu') -> dict:
  """'auto' kernels: the Mosaic GPU ones compiled on a Hopper GPU outside a multi-device mesh, where they were
  measured (one H200, the original config: a training step 3.0-3.2x faster at kv_hidden 64 and 3.2x at 256,
  BENCHMARKS.md) and trained (RESULTS.md: the same losses as the Triton kernels over 20k steps); else Triton's
  (forward, merged backward). Explicit names are kept; shapes the Mosaic GPU kernels cannot take still fall back."""
  if 'auto' not in (forward, backward):
    return {'forward': forward, 'backward': backward}
  from selattn.model import fused_mgpu  # noqa: PLC0415 (imports this module)
  dev = jax.devices()[0]
  hopper = (act == 'gelu' and not interpret and dev.platform == 'gpu'  # the kernels compute the MLP's GELU alone
            and str(getattr(dev, 'compute_capability', '')).startswith('9.')
            and fused_mgpu._mesh_devices() == 1)  # pylint: disable=protected-access
  return {'forward': ('mgpu' if hopper else 'triton') if forward == 'auto' else forward,
          'backward': ('mgpu' if hopper else 'merged') if backward == 'auto' else backward}


def attention(q: Float[Array, 'B T N H'], u: Float[Array, 'B T F'], w: Float[Array, 'B S F'],
              w2k: Float[Array, 'F D'], b2k: Float[Array, 'D'], w2v: Float[Array, 'F D'], b2v: Float[Array, 'D'],
              q_pos: Int[Array, 'T'], k_pos: Int[Array, 'S'], rope_theta: float | None, act: str,
              blocks: Blocks = Blocks(), interpret: bool | None = None) -> Float[Array, 'B T N H']:
  """Selective attention with K_ij = W2k^T act(u_i + w_j) + b2k, V_ij likewise (module docstring), causal by
  positions; RoPE rotates q_i by i and K_ij by j. q is the unrotated projected query (heads of D = N H)."""
  from selattn.model import rope as rope_lib  # noqa: PLC0415  (rope imports nothing of ours; kept local for clarity)

  _, t, n, h = q.shape
  s, f = w.shape[1], w.shape[2]
  interpret = jax.default_backend() != 'gpu' if interpret is None else interpret
  fc = min(blocks.block_f, max(16, tiles.pow2(f)))
  h2 = max(16, tiles.pow2((h + 1) // 2))
  st = _Static(scale=1.0 / math.sqrt(h), act=act, bq=blocks.block_q, bk=blocks.block_k, fc=fc,
               num_warps=blocks.num_warps, num_stages=blocks.num_stages, interpret=interpret,
               backward=blocks.backward, forward=blocks.forward, hp=math.gcd(blocks.heads_per_program or n, n),
               ks=blocks.fwd_splits, qs=blocks.bwd_splits)
  asked = {'forward': st.forward, 'backward': st.backward}
  st = dataclasses.replace(st, **resolve_auto(st.forward, st.backward, interpret, act))
  mq, mk, mf = blocks.block_q, blocks.block_k, fc
  if 'mgpu' in (st.forward, st.backward):
    # The Mosaic GPU kernels tile queries, keys and hidden units by 64: padded to those here, once, so that they
    # pad and slice back nothing (each such copy of a [B, T, F] array is a pass over it).
    from selattn.model import fused_mgpu  # noqa: PLC0415 (imports this module)
    mq, mk, mf = math.lcm(mq, fused_mgpu.BQ), math.lcm(mk, fused_mgpu.BQ), math.lcm(mf, fused_mgpu.FC)
  tp, sp, fp = -(-t // mq) * mq, -(-s // mk) * mk, -(-f // mf) * mf

  if rope_theta is not None:
    q = rope_lib.apply(q, *rope_lib.angles(q_pos, h, rope_theta))
    cos, sin = rope_lib.angles(k_pos, h, rope_theta)
  else:  # the identity rotation
    cos, sin = jnp.ones((s, (h + 1) // 2), jnp.float32), jnp.zeros((s, (h + 1) // 2), jnp.float32)
  big = jnp.iinfo(jnp.int32).max
  # Padding: queries at position -1 see no key, keys at the largest position are seen by no query, hidden units
  # with zero weights in and out have g = act(0) = 0 and add nothing, zero head-dim columns add nothing.
  qh = tiles.pad(_halves(q, h2), 1, tp)
  u_p = tiles.pad(tiles.pad(u, 2, fp), 1, tp)
  w_p = tiles.pad(tiles.pad(w, 2, fp), 1, sp)
  w2 = tiles.pad(_halves(w2k.reshape(f, n, h), h2), 0, fp)
  b2 = _halves(b2k.reshape(n, h), h2)
  cos, sin = (tiles.pad(tiles.pad(a, 1, h2), 0, sp) for a in (cos, sin))
  qpos = tiles.pad(q_pos.astype(jnp.int32), 0, tp, -1)
  kpos = tiles.pad(k_pos.astype(jnp.int32), 0, sp, big)
  if st.forward == 'mgpu':
    from selattn.model import fused_mgpu  # noqa: PLC0415 (imports this module)
    if (why := fused_mgpu.cannot_run(act, interpret, qh, w_p)) is not None:
      _log_once(f'{_asked("forward", asked)} cannot take this call ({why}): running the Triton forward')
      st = dataclasses.replace(st, forward='triton')
  if st.backward == 'mgpu':
    from selattn.model import fused_mgpu_bwd  # noqa: PLC0415 (imports this module)
    if (why := fused_mgpu_bwd.cannot_run(act, interpret, qh, w_p)) is not None:
      _log_once(f'{_asked("backward", asked)} cannot take this call ({why}): running the merged Triton backward')
      st = dataclasses.replace(st, backward='merged')
  _log_kernels(st.forward, st.backward)
  # G stays padded ([B, Tp, N, Fp] float32; zero in padding rows, finite in padding hidden units) and meets W2v padded
  # with zero rows: slicing it first would copy it, and its gradient would be padded back by another copy.
  g = _fused(st, qh, u_p, w_p, w2, b2, cos, sin, qpos, kpos)
  w2v_p = tiles.pad(w2v.reshape(f, n, h), 0, fp)
  out = jnp.einsum('BTNF,FNH->BTNH', g.astype(w2v.dtype), w2v_p, preferred_element_type=jnp.float32)[:, :t]
  return (out + b2v.reshape(1, 1, n, h).astype(jnp.float32)).astype(q.dtype)
