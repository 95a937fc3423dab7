"""Standard, selective and reference causal multi-head attention.

Dimensions: B batch, T query positions, S key positions, D model width, N heads, H head dim (D = N H).

Selective attention (the original's): each query i gets its own keys and values,
  K_ij = W_k [q_i ; x_j],   V_ij = W_v [q_i ; x_j]        (q_i the projected query, concatenation first)
so K and V are [B, T, S, N, H]. Three implementations share one parameter tree (`wq`, `wk`, `wv`, or `wq`,
`kv1`, `kv2` for the MLP generator) and compute the same function:
  - `materialized`: the literal [B, T, S, ...] computation;
  - `blockwise`: the literal computation tile by tile with an online softmax, above-diagonal tiles skipped and
    every tile rematerialised in the backward pass, so memory is O(B block_q block_k D), not O(B T S D);
  - `factored`: the identity below (linear generator only), O(B T D) memory and fused-attention speed.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Bool, Float, Int

from selattn import sharding
from selattn.config import ModelConfig
from selattn.model import rope as rope_lib

NEG_INF = -jnp.inf


# ----------------------------------------------------------------------------------------------------------------
# Parameters: the original's initialisers (uniform(+-1/sqrt(fan_in)) for weights and biases, like equinox).

def fan_in_uniform() -> nnx.Initializer:
  # variance_scaling(1/3, fan_in, uniform) draws from U(-sqrt(1/fan_in), sqrt(1/fan_in)).
  return jax.nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def bias_uniform(fan_in: int) -> nnx.Initializer:
  def init(key, shape, dtype=jnp.float32):
    lim = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -lim, lim)
  return init


def dense(cfg: ModelConfig, fan_in: int, fan_out: int, spec: tuple, *, use_bias: bool, rngs: nnx.Rngs) -> nnx.Linear:
  """A Linear layer with the original's init, float32 params, compute in cfg.dtype, sharded by `spec`."""
  return nnx.Linear(
      fan_in, fan_out, use_bias=use_bias, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.float32,
      kernel_init=nnx.with_partitioning(fan_in_uniform(), spec),
      bias_init=nnx.with_partitioning(bias_uniform(fan_in), spec[-1:]), rngs=rngs)


def _bias(b: Array, ndim: int) -> Array:
  """A [F] bias shaped to broadcast against a rank-`ndim` [..., F] array without rank promotion."""
  return b.reshape((1,) * (ndim - 1) + (-1,))


def _heads(x: Float[Array, '*B D'], num_heads: int) -> Float[Array, '*B N H']:
  return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)


def _merge(x: Float[Array, '*B N H']) -> Float[Array, '*B D']:
  return x.reshape(*x.shape[:-2], -1)


def causal_mask(q_pos: Int[Array, 'T'], k_pos: Int[Array, 'S']) -> Bool[Array, 'T S']:
  return q_pos[:, None] >= k_pos[None, :]


# ----------------------------------------------------------------------------------------------------------------
# Standard attention kernels.

def dense_attention(q: Float[Array, 'B T N Hq'], k: Float[Array, 'B S N Hq'], v: Float[Array, 'B S N Hv'],
                    q_pos: Int[Array, 'T'], k_pos: Int[Array, 'S'], scale: float) -> Float[Array, 'B T N Hv']:
  """The obvious causal attention: float32 logits and softmax, masked by positions."""
  s = jnp.einsum('BTNH,BSNH->BNTS', q, k, preferred_element_type=jnp.float32) * scale
  s = jnp.where(causal_mask(q_pos, k_pos)[None, None], s, NEG_INF)
  p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
  return jnp.einsum('BNTS,BSNH->BTNH', p, v, preferred_element_type=jnp.float32).astype(v.dtype)


def _cudnn_ok(q: Array, v: Array) -> bool:
  return (jax.default_backend() == 'gpu' and q.dtype in (jnp.bfloat16, jnp.float16)
          and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0 and v.shape[-1] <= q.shape[-1])


def attend(q: Float[Array, 'B T N Hq'], k: Float[Array, 'B S N Hq'], v: Float[Array, 'B S N Hv'],
           q_pos: Int[Array, 'T'], k_pos: Int[Array, 'S'], scale: float, contiguous: bool
           ) -> Float[Array, 'B T N Hv']:
  """Causal attention; cuDNN's fused kernel on GPU in bf16 when positions are 0..T-1, else `dense_attention`."""
  if contiguous and q.shape[1] == k.shape[1] and _cudnn_ok(q, v):
    hv = v.shape[-1]
    # cuDNN wants equal q/k and v head dims: zero-padding V's head dim is exact (the padded outputs are zero).
    v_pad = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, q.shape[-1] - hv))) if hv < q.shape[-1] else v
    # cuDNN's partitioner wants q, k and v sharded alike; under fsdp GSPMD may shard them differently.
    spec = jax.sharding.PartitionSpec(sharding.BATCH, None, sharding.HEADS, None)
    q, k, v_pad = (sharding.constrain(a, spec) for a in (q, k, v_pad))
    out = jax.nn.dot_product_attention(q, k, v_pad, scale=scale, is_causal=True, implementation='cudnn')
    return out[..., :hv]
  return dense_attention(q, k, v, q_pos, k_pos, scale)


class StandardAttention(nnx.Module):
  """Causal MHA with RoPE; Wq, Wk, Wv: D -> D without bias and, as in the original, no output projection."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, spec = cfg.d_model, (sharding.EMBED, sharding.HEADS)
    self.wq = dense(cfg, d, d, spec, use_bias=False, rngs=rngs)
    self.wk = dense(cfg, d, d, spec, use_bias=False, rngs=rngs)
    self.wv = dense(cfg, d, d, spec, use_bias=False, rngs=rngs)

  def qkv(self, x: Float[Array, 'B T D'], positions: Int[Array, 'T']):
    """Rotated queries and keys, and values, each [B, T, N, H]."""
    n, h = self.cfg.num_heads, self.cfg.head_dim
    q, k, v = (_heads(w(x), n) for w in (self.wq, self.wk, self.wv))
    if self.cfg.rope:
      cos, sin = rope_lib.angles(positions, h, self.cfg.rope_theta)
      q, k = rope_lib.apply(q, cos, sin), rope_lib.apply(k, cos, sin)
    return q, k, v

  def __call__(self, x: Float[Array, 'B T D'], positions: Int[Array, 'T'], contiguous: bool = True
               ) -> Float[Array, 'B T D']:
    q, k, v = self.qkv(x, positions)
    scale = 1.0 / math.sqrt(self.cfg.head_dim)
    return _merge(attend(q, k, v, positions, positions, scale, contiguous))


class ReferenceAttention(nnx.Module):
  """Flax's own nnx.MultiHeadAttention (with its output projection, no RoPE): the validation baseline."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.mha = nnx.MultiHeadAttention(
        num_heads=cfg.num_heads, in_features=cfg.d_model, qkv_features=cfg.d_model, out_features=cfg.d_model,
        use_bias=False, kernel_init=fan_in_uniform(), dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.float32,
        decode=False, deterministic=True, rngs=rngs)

  def __call__(self, x: Float[Array, 'B T D'], positions: Int[Array, 'T'], contiguous: bool = True
               ) -> Float[Array, 'B T D']:
    del contiguous
    return self.mha(x, mask=causal_mask(positions, positions)[None, None], deterministic=True)


# ----------------------------------------------------------------------------------------------------------------
# Selective attention: K/V generators. Each gives the literal [B, T, S, D] K and V (`full`), and the same function
# split into a per-query part, a per-key part and a per-tile combination (`split`, `tile`) for the blockwise kernel.

class LinearKV(nnx.Module):
  """The original generator: K_ij = W_k [q_i ; x_j], V_ij = W_v [q_i ; x_j] (no bias)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, spec = cfg.d_model, (sharding.EMBED, sharding.HEADS)
    self.wk = dense(cfg, 2 * d, d, spec, use_bias=False, rngs=rngs)
    self.wv = dense(cfg, 2 * d, d, spec, use_bias=False, rngs=rngs)

  def arrays(self, dtype) -> dict[str, Array]:
    return {'wk': self.wk.kernel[...].astype(dtype), 'wv': self.wv.kernel[...].astype(dtype)}

  @staticmethod
  def full(p, qf: Float[Array, 'B T D'], x: Float[Array, 'B S D']):
    b, t, d = qf.shape
    s = x.shape[1]
    qx = jnp.concatenate([jnp.broadcast_to(qf[:, :, None], (b, t, s, d)),
                          jnp.broadcast_to(x[:, None, :], (b, t, s, d))], axis=-1)  # [B, T, S, 2D]: literal
    return qx @ p['wk'], qx @ p['wv']

  @staticmethod
  def split(p, qf: Float[Array, 'B T D'], x: Float[Array, 'B S D']):
    # W [q ; x] = W[:D]^T q + W[D:]^T x: the query half and the key half of the kernel (rows are inputs).
    d = qf.shape[-1]
    qpart = (qf @ p['wk'][:d], qf @ p['wv'][:d])
    xpart = (x @ p['wk'][d:], x @ p['wv'][d:])
    return qpart, xpart

  @staticmethod
  def tile(p, qpart, xpart):
    del p
    (uk, uv), (xk, xv) = qpart, xpart  # [B, bq, D], [B, bk, D]
    return uk[:, :, None] + xk[:, None], uv[:, :, None] + xv[:, None]


class MlpKV(nnx.Module):
  """A nonlinear generator: [q_i ; x_j] -> Linear(2D, hidden) -> GELU -> Linear(hidden, 2D) -> (K_ij, V_ij)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, hid = cfg.d_model, cfg.kv_hidden
    self.kv1 = dense(cfg, 2 * d, hid, (sharding.EMBED, sharding.HEADS), use_bias=True, rngs=rngs)
    self.kv2 = dense(cfg, hid, 2 * d, (sharding.HEADS, sharding.EMBED), use_bias=True, rngs=rngs)

  def arrays(self, dtype) -> dict[str, Array]:
    return {'w1': self.kv1.kernel[...].astype(dtype), 'b1': self.kv1.bias[...].astype(dtype),
            'w2': self.kv2.kernel[...].astype(dtype), 'b2': self.kv2.bias[...].astype(dtype)}

  @staticmethod
  def _out(p, h):
    kv = jax.nn.gelu(h) @ p['w2'] + _bias(p['b2'], h.ndim)
    return jnp.split(kv, 2, axis=-1)

  @staticmethod
  def full(p, qf, x):
    b, t, d = qf.shape
    s = x.shape[1]
    qx = jnp.concatenate([jnp.broadcast_to(qf[:, :, None], (b, t, s, d)),
                          jnp.broadcast_to(x[:, None, :], (b, t, s, d))], axis=-1)
    return MlpKV._out(p, qx @ p['w1'] + _bias(p['b1'], qx.ndim))

  @staticmethod
  def split(p, qf, x):
    d = qf.shape[-1]
    return qf @ p['w1'][:d], x @ p['w1'][d:] + _bias(p['b1'], x.ndim)

  @staticmethod
  def tile(p, qpart, xpart):
    return MlpKV._out(p, qpart[:, :, None] + xpart[:, None])


# ----------------------------------------------------------------------------------------------------------------
# Selective attention: the three implementations, as pure functions of arrays.

def selective_materialized(gen, p, q: Float[Array, 'B T N H'], x: Float[Array, 'B S D'],
                           q_pos: Int[Array, 'T'], k_pos: Int[Array, 'S'], rope_cfg, qf=None
                           ) -> Float[Array, 'B T N H']:
  """The literal computation: K, V of shape [B, T, S, N, H].

  `qf` is the generator's query input when `q` holds only some heads (the `tensor` split); default all of q.
  """
  b, t, n, h = q.shape
  s = x.shape[1]
  k_full, v_full = gen.full(p, _merge(q) if qf is None else qf, x)
  k_full, v_full = k_full.reshape(b, t, s, n, h), v_full.reshape(b, t, s, n, h)
  if rope_cfg is not None:
    q = rope_lib.apply(q, *rope_lib.angles(q_pos, h, rope_cfg))
    k_full = rope_lib.apply(k_full, *rope_lib.angles(k_pos, h, rope_cfg))  # K_ij rotated by j
  logits = jnp.einsum('BTNH,BTSNH->BTNS', q, k_full, preferred_element_type=jnp.float32) / math.sqrt(h)
  logits = jnp.where(causal_mask(q_pos, k_pos)[None, :, None, :], logits, NEG_INF)
  probs = jax.nn.softmax(logits, axis=-1).astype(v_full.dtype)
  return jnp.einsum('BTNS,BTSNH->BTNH', probs, v_full, preferred_element_type=jnp.float32).astype(q.dtype)


def _pad_to(x: Array, axis: int, multiple: int, value=0) -> Array:
  pad = -x.shape[axis] % multiple
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def _tiles(x: Array, axis: int, size: int) -> Array:
  """[..., n*size, ...] -> [n, ..., size, ...] (tile index first, for scan)."""
  shape = x.shape[:axis] + (x.shape[axis] // size, size) + x.shape[axis + 1:]
  return jnp.moveaxis(x.reshape(shape), axis, 0)


def _vma(x) -> frozenset:
  """The mesh axes x varies over inside shard_map (jax 0.10: aval.manual_axis_type.varying; later: aval.vma)."""
  aval = jax.typeof(x)
  mat = getattr(aval, 'manual_axis_type', None)
  return frozenset(mat.varying) if mat is not None else frozenset(getattr(aval, 'vma', ()))


def _varying_like(tree, refs):
  """pcasts `tree` to vary over every mesh axis any of `refs` varies over (a no-op outside shard_map)."""
  want = frozenset().union(*(_vma(r) for r in jax.tree.leaves(refs)))

  def cast(x):
    missing = tuple(sorted(want - _vma(x)))
    return jax.lax.pcast(x, missing, to='varying') if missing else x
  return jax.tree.map(cast, tree)


def selective_blockwise(gen, p, q: Float[Array, 'B T N H'], x: Float[Array, 'B S D'],
                        q_pos: Int[Array, 'T'], k_pos: Int[Array, 'S'], rope_cfg, block_q: int, block_k: int,
                        qf=None) -> Float[Array, 'B T N H']:
  """The literal computation tile by tile: online softmax over key tiles, rematerialised in the backward pass."""
  b, t, n, h = q.shape
  s = x.shape[1]
  bq, bk = min(block_q, t), min(block_k, s)
  scale = 1.0 / math.sqrt(h)
  # Inside shard_map: make the generator params vary like the activations here, once. Left to the tile code
  # inside the lax.cond below, that cast's transpose (a psum) would run only on devices taking the branch.
  p = _varying_like(p, (q, x))
  qpart, xpart = gen.split(p, _merge(q) if qf is None else qf, x)
  if rope_cfg is not None:
    q = rope_lib.apply(q, *rope_lib.angles(q_pos, h, rope_cfg))
  # Pad to whole tiles. Padded keys get a position no query reaches; padded queries one that sees no key.
  big = jnp.iinfo(jnp.int32).max
  qpos_t = _tiles(_pad_to(q_pos.astype(jnp.int32), 0, bq, -1), 0, bq)  # [nq, bq]
  kpos_t = _tiles(_pad_to(k_pos.astype(jnp.int32), 0, bk, big), 0, bk)  # [nk, bk]
  q_t = _tiles(_pad_to(q, 1, bq), 1, bq)  # [nq, B, bq, N, H]
  qpart_t = jax.tree.map(lambda a: _tiles(_pad_to(a, 1, bq), 1, bq), qpart)
  xpart_t = jax.tree.map(lambda a: _tiles(_pad_to(a, 1, bk), 1, bk), xpart)

  def key_step(q_tile, qp_tile, qpos, carry, inputs):
    xp_tile, kpos = inputs

    def compute(carry):
      o, m, l = carry  # [B, bq, N, H] f32, [B, bq, N] f32, [B, bq, N] f32
      k_tile, v_tile = gen.tile(p, qp_tile, xp_tile)  # [B, bq, bk, D] each
      k_tile = k_tile.reshape(b, bq, bk, n, h)
      v_tile = v_tile.reshape(b, bq, bk, n, h)
      if rope_cfg is not None:
        k_tile = rope_lib.apply(k_tile, *rope_lib.angles(jnp.minimum(kpos, 2**30), h, rope_cfg))
      logits = jnp.einsum('BTNH,BTSNH->BTNS', q_tile, k_tile, preferred_element_type=jnp.float32) * scale
      logits = jnp.where(causal_mask(qpos, kpos)[None, :, None, :], logits, NEG_INF)
      # The running max only shifts the softmax, which is invariant to it: no gradient needs to flow through it.
      m_new = jax.lax.stop_gradient(jnp.maximum(m, logits.max(-1)))
      m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
      probs = jnp.exp(logits - m_safe[..., None])
      corr = jnp.exp(m - m_safe)
      l = l * corr + probs.sum(-1)
      pv = jnp.einsum('BTNS,BTSNH->BTNH', probs.astype(v_tile.dtype), v_tile, preferred_element_type=jnp.float32)
      return o * corr[..., None] + pv, m_new, l

    # Tiles wholly above the causal diagonal hold no visible key: skip their work.
    visible = kpos.min() <= qpos.max()
    return jax.lax.cond(visible, jax.checkpoint(compute), lambda c: c, carry), None

  # No checkpoint here: the key steps are checkpointed, so a query tile keeps only its small carries
  # ([B, bq, N, H] per key tile) for the backward pass, and the tiles themselves are recomputed once, not twice.
  def query_tile(args):
    q_tile, qp_tile, qpos = args
    init = (jnp.zeros((b, bq, n, h), jnp.float32), jnp.full((b, bq, n), NEG_INF, jnp.float32),
            jnp.zeros((b, bq, n), jnp.float32))
    # Inside shard_map the carry must vary over the same mesh axes as the tiles it accumulates.
    init = _varying_like(init, (q_tile, qp_tile, qpos, xpart_t, kpos_t, p))
    (o, _, l), _ = jax.lax.scan(functools.partial(key_step, q_tile, qp_tile, qpos), init, (xpart_t, kpos_t))
    return (o / jnp.where(l > 0, l, 1.0)[..., None]).astype(q.dtype)

  out = jax.lax.map(query_tile, (q_t, qpart_t, qpos_t))  # [nq, B, bq, N, H]
  out = jnp.moveaxis(out, 0, 1).reshape(b, -1, n, h)
  return out[:, :t]


def selective_factored(p, q: Float[Array, 'B T N H'], x: Float[Array, 'B S D'], q_pos: Int[Array, 'T'],
                       k_pos: Int[Array, 'S'], rope_cfg, contiguous: bool) -> Float[Array, 'B T N H']:
  """Selective attention with a linear generator, computed as a standard attention.

  Split the kernels by input half: W_k = [A | B], W_v = [C | E]. With u_i = A q_i, k_j = B x_j, c_i = C q_i,
  v_j = E x_j (per head): K_ij = u_i + k_j and V_ij = c_i + v_j.
  Values: softmax weights sum to one, so sum_j p_ij V_ij = c_i + sum_j p_ij v_j.
  Keys without RoPE: q_i . K_ij = q_i . u_i + q_i . k_j; the first term is constant in j and cancels in softmax.
  Keys with RoPE: (R_i q_i) . (R_j u_i) depends on j. With a, b the halves of R_i q_i and u1, u2 those of u_i,
  per frequency f it is cos(j th_f)(a_f u1_f + b_f u2_f) + sin(j th_f)(b_f u1_f - a_f u2_f). So the logits are a
  plain dot product of the augmented query [R_i q_i ; a u1 + b u2 ; b u1 - a u2] (head dim 2H) with the
  augmented key [R_j k_j ; cos(j th) ; sin(j th)]. The scale stays 1/sqrt(H).
  """
  b, t, n, h = q.shape
  (u, c), (k, v) = LinearKV.split(p, _merge(q), x)
  u, c, k, v = (_heads(a, n) for a in (u, c, k, v))
  if rope_cfg is not None:
    q_cos, q_sin = rope_lib.angles(q_pos, h, rope_cfg)
    k_cos, k_sin = rope_lib.angles(k_pos, h, rope_cfg)
    q = rope_lib.apply(q, q_cos, q_sin)
    k = rope_lib.apply(k, k_cos, k_sin)
    qa, qb = jnp.split(q, 2, axis=-1)
    u1, u2 = jnp.split(u, 2, axis=-1)
    q = jnp.concatenate([q, qa * u1 + qb * u2, qb * u1 - qa * u2], axis=-1)
    trig = jnp.concatenate([k_cos, k_sin], axis=-1).astype(k.dtype)  # [S, H]
    k = jnp.concatenate([k, jnp.broadcast_to(trig[None, :, None, :], k.shape)], axis=-1)
  out = attend(q, k, v, q_pos, k_pos, 1.0 / math.sqrt(h), contiguous)
  return out + c


class SelectiveAttention(nnx.Module):
  """Selective causal MHA: Wq: D -> D; K and V generated per query from [q_i ; x_j]; no output projection."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.wq = dense(cfg, cfg.d_model, cfg.d_model, (sharding.EMBED, sharding.HEADS), use_bias=False, rngs=rngs)
    self.kv = (LinearKV if cfg.kv_generator == 'linear' else MlpKV)(cfg, rngs=rngs)

  def __call__(self, x: Float[Array, 'B T D'], positions: Int[Array, 'T'], contiguous: bool = True,
               impl: str | None = None) -> Float[Array, 'B T D']:
    cfg = self.cfg
    impl = impl or cfg.impl
    gen = type(self.kv)
    if impl == 'factored' and gen is not LinearKV:
      raise ValueError("model.selective_impl='factored' needs model.kv_generator='linear'")
    q = _heads(self.wq(x), cfg.num_heads)
    p = self.kv.arrays(jnp.dtype(cfg.dtype))
    x = x.astype(jnp.dtype(cfg.dtype))
    rope_cfg = cfg.rope_theta if cfg.rope else None
    if impl == 'factored':
      return _merge(selective_factored(p, q, x, positions, positions, rope_cfg, contiguous))
    if impl == 'materialized':
      fn = functools.partial(selective_materialized, gen, rope_cfg=rope_cfg)
    else:
      fn = functools.partial(selective_blockwise, gen, rope_cfg=rope_cfg, block_q=cfg.block_q,
                             block_k=cfg.block_k)
    if _seq_size() > 1:
      return _merge(_seq_split(fn, gen, p, q, x, positions))
    return _merge(fn(p, q, x, positions, positions))


def _seq_size() -> int:
  mesh = jax.sharding.get_abstract_mesh()
  return 1 if mesh.empty or 'seq' not in mesh.axis_names else mesh.shape['seq']


def _seq_split(fn, gen, p, q: Float[Array, 'B T N H'], x: Float[Array, 'B S D'], positions: Int[Array, 'T']
               ) -> Float[Array, 'B T N H']:
  """Runs the literal selective attention with query positions split over the mesh axis `seq`.

  Each device holds a block of queries (in the caller's order: the trainer lays tokens out in zigzag order so
  causal work is balanced), all-gathers the layer input x and the key positions over `seq` (the backward of that
  all-gather is a reduce-scatter), builds only its own [b, T/seq, S or block_k, ...] K/V tiles and attends
  locally. Heads are split over `tensor` for the linear generator, whose per-head K/V columns are independent;
  the MLP generator mixes heads in its hidden layer, so its K/V is computed whole on each `tensor` device.
  """
  batch, heads = sharding.BATCH, (sharding.HEADS if gen is LinearKV else None)
  qf = _merge(q)  # the generator's input q_i is the whole query (all heads)

  def local(p, q, qf, x, q_pos):
    x_all = jax.lax.all_gather(x, 'seq', axis=1, tiled=True)
    k_pos = jax.lax.all_gather(q_pos, 'seq', axis=0, tiled=True)
    if gen is LinearKV:
      # Only this device's head columns of W_k and W_v: the tile then holds only local heads.
      return fn(p, q, x_all, q_pos, k_pos, qf=qf)
    return fn(p, q, x_all, q_pos, k_pos)

  p_spec = jax.tree.map(lambda a: P(None, heads) if a.ndim == 2 else P(heads), p)
  return jax.shard_map(
      local, in_specs=(p_spec, P(batch, 'seq', heads, None), P(batch, 'seq', None), P(batch, 'seq', None),
                       P('seq')),
      out_specs=P(batch, 'seq', heads, None), check_vma=True)(p, q, qf, x, positions)
