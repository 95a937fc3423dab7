"""Flash attention with the shared index-hash dropout mask: causal attention in Pallas kernels, O(B T N H) memory.

Dimensions: B batch, T query positions, S key positions, N heads, Hq the query/key head dim, Hv the value head dim
(they may differ: factored selective attention passes augmented keys and values with an extra all-ones column).

Why a kernel of our own. cuDNN's fused attention draws its own dropout mask; this project drops weight (b, n, i, j)
iff a hash of (seed, b, n, i, j) says so (dropout.py), so that the dense, literal, blockwise and factored forms all
drop the same weights. Without a kernel that evaluates that mask on chip, attention dropout meant the dense
[B, N, T, S] softmax in XLA. This kernel evaluates it per tile: the caller hashes the chain up to the query
position once per [B, N, T] row (`dropout.row_hash`, global batch and head indices), the kernel finishes each
weight with one more `mix32` of the key position. The mask is a function of the seed and the indices only, so a
run drops exactly the weights it dropped with the dense path: checkpoints and results are unaffected.

Forward (FlashAttention-2, one program per (query tile, batch row, head), online softmax over key tiles). With
s_ij = scale q_i . k_j (causal by positions: -inf where q_pos_i < k_pos_j), p_ij = exp(s_ij - lse_i) the softmax,
m_ij in {0, 1} the keep mask and r the rate, dropout's output is
  o_i = sum_j p_ij m_ij v_j / (1 - r)                     (the normaliser sums every weight, dropped ones too)
so the running sum l_i adds exp(s_ij - m) over all visible keys while the accumulator adds only the kept terms;
o_i = acc_i / l_i / (1 - r) at the end, and lse_i = m_i + log l_i is saved for the backward.
Backward (p recomputed from lse, the mask recomputed from the same hashes). With d_ij = m_ij / (1 - r):
  dv_j = sum_i p_ij d_ij do_i
  dp_ij = d_ij (do_i . v_j)                               (the cotangent of the softmax weight p_ij)
  ds_ij = p_ij (dp_ij - Delta_i),  Delta_i = sum_j p_ij dp_ij = do_i . o_i     (o the dropped-out output)
  dq_i = scale sum_j ds_ij k_j,   dk_j = scale sum_i ds_ij q_i
One kernel per key tile (dk, dv, looping over the query tiles that see it) and one per query tile (dq, looping over
key tiles): each recomputes its tiles, no atomics, deterministic. Tiles wholly above the causal diagonal are
skipped: by a test of their positions (any token order), or, when the caller says positions are 0..T-1
(`contiguous`), by loop bounds from the tile indices.

Padding. Head dims are zero-padded to powers of two >= 16 (zero columns add nothing to q . k, and give zero output
columns, which are cut off); T and S are padded to whole tiles with query position -1 (sees no key) and key
position int32 max (seen by no query). Off GPU the same kernels run with `interpret=True` (the CPU tests).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, Int, UInt32

from selattn.model import dropout as dropout_lib
from selattn.model import tiles

_MASKED = -1e30  # a finite "minus infinity": exp(_MASKED - m) is 0 and _MASKED - _MASKED is not NaN


@dataclasses.dataclass(frozen=True)
class Blocks:
  """Tile sizes (powers of two >= 16: a GPU matmul tile) and Triton launch parameters of the flash kernels."""
  block_q: int = 64
  block_k: int = 64
  num_warps: int = 4
  num_stages: int = 2


@dataclasses.dataclass(frozen=True)
class _Static:
  scale: float
  rate: float  # 0: no dropout (the row hashes are not read)
  # Positions are 0..T-1 for queries and keys alike: the visible tiles are known from the tile indices, so the
  # loops run over them alone with bounds (no per-tile test, so Triton may pipeline the loads), as jax's own mha.
  prefix: bool
  bq: int
  bk: int
  num_warps: int
  num_stages: int
  interpret: bool


def _keep(st: _Static, rows, kpos):
  """The dropout keep mask of a tile: [bq, bk] from the row hashes [bq] and the key positions [bk]."""
  return dropout_lib.keep_from_row(rows[:, None], kpos[None, :], st.rate)


def _fold_visible(st: _Static, n: int, size: int, pos_ref, other_pos, step, init, key_side: bool):
  """Folds `step(tile_start, tile_pos, carry)` over the tiles of `pos_ref` that share a visible pair with this
  program's tile (grid axis 0), whose positions are `other_pos`: key tiles for a query tile (`key_side`), or query
  tiles for a key tile."""
  if st.prefix:  # positions 0..T-1: a query tile sees the key tiles up to its last row, a key tile the query
    # tiles from its first row on (in whole tiles: the masks inside cut the diagonal tiles)
    own = st.bq if key_side else st.bk
    edge = pl.program_id(0) * own
    if key_side:
      lo, hi = 0, jnp.minimum(jax.lax.div(edge + own + size - 1, size), n)
    else:
      lo, hi = jax.lax.div(edge, size), n
    return jax.lax.fori_loop(lo, hi, lambda idx, c: step(idx * size, pos_ref[pl.ds(idx * size, size)], c), init)

  def body(idx, carry):
    start = idx * size
    pos = pos_ref[pl.ds(start, size)]
    visible = jnp.min(pos) <= jnp.max(other_pos) if key_side else jnp.min(other_pos) <= jnp.max(pos)
    return jax.lax.cond(visible, lambda c: step(start, pos, c), lambda c: c, carry)

  return jax.lax.fori_loop(0, n, body, init)


# ----------------------------------------------------------------------------------------------------------------
# Forward: one program per (query tile, batch row, head).

def _fwd_kernel(q_ref, k_ref, v_ref, qpos_ref, kpos_ref, rows_ref, o_ref, lse_ref, *, st: _Static, n_k: int):
  q = q_ref[...]
  qpos = qpos_ref[...]
  rows = rows_ref[...] if st.rate > 0 else None

  def step(start, kpos, carry):
    acc, m, l = carry
    k, v = k_ref[pl.ds(start, st.bk), :], v_ref[pl.ds(start, st.bk), :]
    mask = qpos[:, None] >= kpos[None, :]
    s = jnp.where(mask, tiles.dot(q, k, trans_b=True) * st.scale, _MASKED)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    corr = jnp.exp(m - m_new)
    p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
    l = l * corr + jnp.sum(p, axis=1)  # every visible weight, kept or dropped: softmax before dropout
    if rows is not None:
      p = jnp.where(_keep(st, rows, kpos), p, 0.0)
    return acc * corr[:, None] + tiles.dot(p.astype(v.dtype), v), m_new, l

  init = (jnp.zeros((st.bq, v_ref.shape[-1]), jnp.float32), jnp.full((st.bq,), _MASKED, jnp.float32),
          jnp.zeros((st.bq,), jnp.float32))
  acc, m, l = _fold_visible(st, n_k, st.bk, kpos_ref, qpos, step, init, key_side=True)
  # A query that sees no key (padding rows) has l = 0: output 0, and an lse that makes p = 0 in the backward.
  l_safe = jnp.where(l > 0, l, 1.0)
  o_ref[...] = (acc * (1.0 / ((1.0 - st.rate) * l_safe))[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log(l_safe)


# ----------------------------------------------------------------------------------------------------------------
# Backward: the tile's gradient terms, then one kernel per key tile (dk, dv) and one per query tile (dq).

def _tile(st: _Static, q, k, v, do, qpos, kpos, lse, delta, rows):
  """p_ij d_ij (for dv) and ds_ij scaled (for dq and dk) of one [bq, bk] tile."""
  mask = qpos[:, None] >= kpos[None, :]
  p = jnp.where(mask, jnp.exp(tiles.dot(q, k, trans_b=True) * st.scale - lse[:, None]), 0.0)
  dp = tiles.dot(do, v, trans_b=True)
  pd = p
  if rows is not None:
    keep = _keep(st, rows, kpos)
    inv = 1.0 / (1.0 - st.rate)
    pd = jnp.where(keep, p * inv, 0.0)
    dp = jnp.where(keep, dp * inv, 0.0)
  return pd, p * (dp - delta[:, None]) * st.scale


def _bwd_kv_kernel(q_ref, k_ref, v_ref, do_ref, qpos_ref, kpos_ref, rows_ref, lse_ref, delta_ref, dk_ref, dv_ref,
                   *, st: _Static, n_q: int):
  """One program per (key tile, batch row, head): dk and dv over the query tiles that see the tile."""
  k, v, kpos = k_ref[...], v_ref[...], kpos_ref[...]

  def step(start, qpos, carry):
    dk, dv = carry
    sl = pl.ds(start, st.bq)
    q, do = q_ref[sl, :], do_ref[sl, :]
    rows = rows_ref[sl] if st.rate > 0 else None
    pd, ds = _tile(st, q, k, v, do, qpos, kpos, lse_ref[sl], delta_ref[sl], rows)
    return dk + tiles.dot(ds.astype(q.dtype), q, trans_a=True), dv + tiles.dot(pd.astype(do.dtype), do, trans_a=True)

  init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  dk, dv = _fold_visible(st, n_q, st.bq, qpos_ref, kpos, step, init, key_side=False)
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _bwd_q_kernel(q_ref, k_ref, v_ref, do_ref, qpos_ref, kpos_ref, rows_ref, lse_ref, delta_ref, dq_ref, *,
                  st: _Static, n_k: int):
  """One program per (query tile, batch row, head): dq over the key tiles it sees."""
  q, do, qpos, lse, delta = q_ref[...], do_ref[...], qpos_ref[...], lse_ref[...], delta_ref[...]
  rows = rows_ref[...] if st.rate > 0 else None

  def step(start, kpos, dq):
    k = k_ref[pl.ds(start, st.bk), :]
    _, ds = _tile(st, q, k, v_ref[pl.ds(start, st.bk), :], do, qpos, kpos, lse, delta, rows)
    return dq + tiles.dot(ds.astype(k.dtype), k)

  dq = _fold_visible(st, n_k, st.bk, kpos_ref, qpos, step, jnp.zeros(q.shape, jnp.float32), key_side=True)
  dq_ref[...] = dq.astype(dq_ref.dtype)


# ----------------------------------------------------------------------------------------------------------------
# pallas_call wrappers and the custom VJP, on padded arrays:
#   q, k [B, Tp|Sp, N, Hq]  v [B, Sp, N, Hv]  qpos [Tp], kpos [Sp] int32  rows [B, N, Tp] uint32
#   -> o [B, Tp, N, Hv], lse [B, N, Tp] float32

def _specs(q, k, v, tile: int, by_query: bool):
  """Block specs for a grid (tile, batch, head): the tiled side's rows by the tile, the other side whole."""
  _, tp, _, hq = q.shape
  sp, hv = k.shape[1], v.shape[-1]

  def rows_of(length, size, tiled):
    if tiled:
      return size, (lambda i, b, n: (b, i, n, 0)), (lambda i, b, n: (i,)), (lambda i, b, n: (b, n, i))
    return length, (lambda i, b, n: (b, 0, n, 0)), (lambda i, b, n: (0,)), (lambda i, b, n: (b, n, 0))

  qr, qmap, qpmap, qrowmap = rows_of(tp, tile, by_query)
  kr, kmap, kpmap, _ = rows_of(sp, tile, not by_query)
  return dict(
      q=pl.BlockSpec((None, qr, None, hq), qmap), k=pl.BlockSpec((None, kr, None, hq), kmap),
      v=pl.BlockSpec((None, kr, None, hv), kmap), do=pl.BlockSpec((None, qr, None, hv), qmap),
      o=pl.BlockSpec((None, qr, None, hv), qmap), dq=pl.BlockSpec((None, qr, None, hq), qmap),
      dk=pl.BlockSpec((None, kr, None, hq), kmap), dv=pl.BlockSpec((None, kr, None, hv), kmap),
      qpos=pl.BlockSpec((qr,), qpmap), kpos=pl.BlockSpec((kr,), kpmap), row=pl.BlockSpec((None, None, qr), qrowmap))


def _forward(st: _Static, q, k, v, qpos, kpos, rows):
  bsz, tp, n, _ = q.shape
  sp = k.shape[1]
  sp_ = _specs(q, k, v, st.bq, by_query=True)
  return pl.pallas_call(
      functools.partial(_fwd_kernel, st=st, n_k=sp // st.bk), grid=(tp // st.bq, bsz, n),
      in_specs=[sp_['q'], sp_['k'], sp_['v'], sp_['qpos'], sp_['kpos'], sp_['row']],
      out_specs=[sp_['o'], sp_['row']],
      out_shape=[jax.ShapeDtypeStruct(q.shape[:3] + v.shape[-1:], v.dtype),
                 jax.ShapeDtypeStruct((bsz, n, tp), jnp.float32)],
      compiler_params=tiles.compiler_params(st), interpret=st.interpret, name='flash_attention_fwd',
  )(q, k, v, qpos, kpos, rows)


def _backward(st: _Static, res, do):
  q, k, v, qpos, kpos, rows, o, lse = res
  bsz, tp, n, _ = q.shape
  sp = k.shape[1]
  delta = jnp.einsum('BTNH,BTNH->BNT', do.astype(jnp.float32), o.astype(jnp.float32))  # Delta_i = do_i . o_i
  args = (q, k, v, do, qpos, kpos, rows, lse, delta)
  by_k = _specs(q, k, v, st.bk, by_query=False)
  dk, dv = pl.pallas_call(
      functools.partial(_bwd_kv_kernel, st=st, n_q=tp // st.bq), grid=(sp // st.bk, bsz, n),
      in_specs=[by_k[a] for a in ('q', 'k', 'v', 'do', 'qpos', 'kpos', 'row', 'row', 'row')],
      out_specs=[by_k['dk'], by_k['dv']],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=tiles.compiler_params(st), interpret=st.interpret, name='flash_attention_bwd_kv',
  )(*args)
  by_q = _specs(q, k, v, st.bq, by_query=True)
  dq = pl.pallas_call(
      functools.partial(_bwd_q_kernel, st=st, n_k=sp // st.bk), grid=(tp // st.bq, bsz, n),
      in_specs=[by_q[a] for a in ('q', 'k', 'v', 'do', 'qpos', 'kpos', 'row', 'row', 'row')],
      out_specs=by_q['dq'], out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=tiles.compiler_params(st), interpret=st.interpret, name='flash_attention_bwd_q',
  )(*args)
  return dq, dk, dv, None, None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st, q, k, v, qpos, kpos, rows):
  return _forward(st, q, k, v, qpos, kpos, rows)[0]


def _flash_fwd(st, q, k, v, qpos, kpos, rows):
  o, lse = _forward(st, q, k, v, qpos, kpos, rows)
  return o, (q, k, v, qpos, kpos, rows, o, lse)


_flash.defvjp(_flash_fwd, _backward)


# ----------------------------------------------------------------------------------------------------------------
# The public entry: unpadded arrays in, attention out.


def unsupported(q: Array, k: Array, v: Array, blocks: Blocks = Blocks()) -> str | None:
  """Why the kernels cannot take these inputs or tiles (the caller falls back to dense attention), or None."""
  for name in ('block_q', 'block_k'):
    size = getattr(blocks, name)
    if size < 16 or size & (size - 1):
      return f'{name}={size} is not a power of two >= 16'
  if not q.dtype == k.dtype == v.dtype or q.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
    return f'dtypes {q.dtype}, {k.dtype}, {v.dtype} (the kernel takes one of float32, bfloat16, float16)'
  if max(q.shape[-1], v.shape[-1]) > 256:
    return f'head dims {q.shape[-1]} and {v.shape[-1]}: more than 256'
  return None


def attention(q: Float[Array, 'B T N Hq'], k: Float[Array, 'B S N Hq'], v: Float[Array, 'B S N Hv'],
              q_pos: Int[Array, 'T'], k_pos: Int[Array, 'S'], scale: float,
              rows: UInt32[Array, 'B N T'] | None = None, rate: float = 0.0, blocks: Blocks = Blocks(),
              contiguous: bool = False, interpret: bool | None = None) -> Float[Array, 'B T N Hv']:
  """Causal attention by positions, with dropout at `rate` by the row hashes `rows` (dropout.row_hash of the global
  batch row, head and query position) when given: `dense_attention`'s function, computed tile by tile.
  `contiguous`: the caller promises q_pos = k_pos = 0..T-1 (tiles are then skipped by index, not by position)."""
  b, t, n, hq = q.shape
  s, hv = k.shape[1], v.shape[-1]
  interpret = jax.default_backend() != 'gpu' if interpret is None else interpret
  # Tiles no longer than the padded sequence (a T = 1 call runs one 16-row tile, not 64).
  bq, bk = min(blocks.block_q, max(16, tiles.pow2(t))), min(blocks.block_k, max(16, tiles.pow2(s)))
  tp, sp = -(-t // bq) * bq, -(-s // bk) * bk
  hqp, hvp = max(16, tiles.pow2(hq)), max(16, tiles.pow2(hv))
  st = _Static(scale=float(scale), rate=float(rate) if rows is not None else 0.0, prefix=contiguous and t == s,
               bq=bq, bk=bk, num_warps=blocks.num_warps, num_stages=blocks.num_stages, interpret=interpret)
  qp = tiles.pad(tiles.pad(q, 3, hqp), 1, tp)
  kp = tiles.pad(tiles.pad(k, 3, hqp), 1, sp)
  vp = tiles.pad(tiles.pad(v, 3, hvp), 1, sp)
  qpos = tiles.pad(q_pos.astype(jnp.int32), 0, tp, -1)
  kpos = tiles.pad(k_pos.astype(jnp.int32), 0, sp, jnp.iinfo(jnp.int32).max)
  rows = jnp.zeros((b, n, tp), jnp.uint32) if rows is None else tiles.pad(rows.astype(jnp.uint32), 2, tp)
  return _flash(st, qp, kp, vp, qpos, kpos, rows)[:, :t, :, :hv]
