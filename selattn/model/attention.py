"""Standard, selective and reference causal multi-head attention.

Dimensions: B batch, T query positions, S key positions, D model width, N heads, H head dim (D = N H).

Selective attention (the original's): each query i gets its own keys and values,
  K_ij = W_k [q_i ; x_j],   V_ij = W_v [q_i ; x_j]        (q_i the projected query, concatenation first)
so K and V are [B, T, S, N, H]. Four implementations share one parameter tree (`wq`, `wk`, `wv`, or `wq`,
`kv1`, `kv2` for the MLP generator) and compute the same function:
  - `materialized`: the literal [B, T, S, ...] computation;
  - `blockwise`: the literal computation tile by tile with an online softmax, above-diagonal tiles skipped and
    every tile rematerialised in the backward pass, so memory is O(B block_q block_k D), not O(B T S D);
  - `factored`: the identity below (linear generator only), O(B T D) memory and fused-attention speed;
  - `fused`: the literal computation in Pallas GPU kernels (selattn/model/fused.py), per-pair work on chip.
Standard attention and `factored` share `attend`: cuDNN's fused kernel, or with attention dropout the flash kernel
of selattn/model/flash.py (cuDNN's dropout mask is not the shared one of selattn/model/dropout.py), or XLA's dense
softmax.
"""

from __future__ import annotations

import functools
import math

from absl import logging
import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Bool, Float, Int

from selattn import sharding
from selattn.config import ModelConfig
from selattn.model import dropout as dropout_lib
from selattn.model import flash as flash_lib
from selattn.model import fused as fused_lib
from selattn.model import rope as rope_lib
from selattn.model.dropout import AttnDropout, dropout_keep  # noqa: F401  (dropout_keep: this module's API)

NEG_INF = -jnp.inf


# ----------------------------------------------------------------------------------------------------------------
# Parameters: the original's initialisers (uniform(+-1/sqrt(fan_in)) for weights and biases, like equinox), or
# nanoGPT's (normal(0, 0.02) weights, zero biases) with model.init='nanogpt'.

NANOGPT_STD = 0.02

def fan_in_uniform() -> nnx.Initializer:
  # variance_scaling(1/3, fan_in, uniform) draws from U(-sqrt(1/fan_in), sqrt(1/fan_in)).
  return jax.nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def bias_uniform(fan_in: int) -> nnx.Initializer:
  def init(key, shape, dtype=jnp.float32):
    lim = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -lim, lim)
  return init


def kernel_init(cfg: ModelConfig) -> nnx.Initializer:
  return fan_in_uniform() if cfg.init == 'original' else nnx.initializers.normal(NANOGPT_STD)


def dense(cfg: ModelConfig, fan_in: int, fan_out: int, spec: tuple, *, use_bias: bool, rngs: nnx.Rngs,
          init: nnx.Initializer | None = None) -> nnx.Linear:
  """A Linear layer with cfg.init's initialisers (or kernel `init`), float32 params, compute in cfg.dtype."""
  b_init = bias_uniform(fan_in) if cfg.init == 'original' else nnx.initializers.zeros
  return nnx.Linear(
      fan_in, fan_out, use_bias=use_bias, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.float32,
      kernel_init=nnx.with_partitioning(init or kernel_init(cfg), spec),
      bias_init=nnx.with_partitioning(b_init, spec[-1:]), rngs=rngs)


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
# Dropout on attention probabilities: an index-hash mask (selattn/model/dropout.py) that every implementation shares.

def _bn_index(batch: int, heads: int, layout: str) -> tuple[Array, Array]:
  """Batch and head index arrays shaped to broadcast in a rank-4 `layout` ('BNTS' or 'BTNS')."""
  shape_b, shape_n = [1] * 4, [1] * 4
  shape_b[layout.index('B')], shape_n[layout.index('N')] = batch, heads
  return jnp.arange(batch).reshape(shape_b), jnp.arange(heads).reshape(shape_n)


# ----------------------------------------------------------------------------------------------------------------
# Standard attention kernels.

def dense_attention(q: Float[Array, 'B T N Hq'], k: Float[Array, 'B S N Hq'], v: Float[Array, 'B S N Hv'],
                    q_pos: Int[Array, 'T'], k_pos: Int[Array, 'S'], scale: float,
                    dropout: AttnDropout | None = None) -> Float[Array, 'B T N Hv']:
  """The obvious causal attention: float32 logits and softmax, masked by positions, optional dropout."""
  s = jnp.einsum('BTNH,BSNH->BNTS', q, k, preferred_element_type=jnp.float32) * scale
  s = jnp.where(causal_mask(q_pos, k_pos)[None, None], s, NEG_INF)
  p = jax.nn.softmax(s, axis=-1)
  if dropout is not None:
    b_idx, n_idx = _bn_index(q.shape[0], q.shape[2], 'BNTS')
    p = dropout.apply(p, b_idx, n_idx, q_pos[None, None, :, None], k_pos[None, None, None, :])
  p = p.astype(v.dtype)
  return jnp.einsum('BNTS,BSNH->BTNH', p, v, preferred_element_type=jnp.float32).astype(v.dtype)


def _kernel_args(cfg: ModelConfig) -> dict:
  """`attend`'s kernel choice and flash tiles from the config."""
  return dict(kernel=cfg.attn_kernel, blocks=flash_lib.Blocks(block_q=cfg.flash_block_q, block_k=cfg.flash_block_k,
                                                          num_warps=cfg.flash_num_warps,
                                                          num_stages=cfg.flash_num_stages))


def _cudnn_ok(q: Array, v: Array) -> bool:
  return (jax.default_backend() == 'gpu' and q.dtype in (jnp.bfloat16, jnp.float16)
          and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0 and v.shape[-1] <= q.shape[-1])


def attend(q: Float[Array, 'B T N Hq'], k: Float[Array, 'B S N Hq'], v: Float[Array, 'B S N Hv'],
           q_pos: Int[Array, 'T'], k_pos: Int[Array, 'S'], scale: float, contiguous: bool,
           dropout: AttnDropout | None = None, kernel: str = 'auto',
           blocks: flash_lib.Blocks = flash_lib.Blocks()) -> Float[Array, 'B T N Hv']:
  """Causal attention. `kernel` (model.attn_kernel): 'auto' runs the flash kernel (flash.py) with attention dropout
  on GPU, cuDNN's fused kernel without (GPU, bf16, positions 0..T-1), else `dense_attention`; 'flash' the flash
  kernel for every call (interpreted off GPU: tests); 'dense' never the flash kernel (the path before it)."""
  if kernel == 'flash' or (kernel == 'auto' and dropout is not None and jax.default_backend() == 'gpu'):
    why = flash_lib.unsupported(q, k, v, blocks) or _flash_mesh_unsupported(q)
    if why is None:
      return _flash_attend(q, k, v, q_pos, k_pos, scale, dropout, blocks, contiguous)
    _log_fallback(f'attention: the flash kernel cannot take this call ({why}): dense attention')
  if dropout is not None:
    # cuDNN draws its own dropout mask, not this module's index-hash mask that every implementation shares.
    return dense_attention(q, k, v, q_pos, k_pos, scale, dropout)
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


def _flash_mesh_unsupported(q: Array) -> str | None:
  """Why the flash kernel cannot be split over this mesh's batch and head axes, or None."""
  if _mesh_size() == 1:
    return None
  mesh = jax.sharding.get_abstract_mesh()
  batch_ways = math.prod(mesh.shape[a] for a in sharding.BATCH if a in mesh.axis_names)
  heads = mesh.shape[sharding.HEADS] if sharding.HEADS in mesh.axis_names else 1
  if q.shape[0] % batch_ways or q.shape[2] % heads:
    return f'batch {q.shape[0]} and {q.shape[2]} heads do not split over the mesh ({batch_ways} x {heads})'
  return None


def _flash_attend(q, k, v, q_pos, k_pos, scale, dropout, blocks, contiguous):
  """The flash kernel; under a mesh split by hand (a Pallas call is not partitioned by GSPMD) over batch and heads.

  The dropout row hashes are computed here, in the global view, from the global batch and head indices, so each
  device's kernel drops the weights the single-device run drops.
  """
  rows, rate = None, 0.0
  if dropout is not None:
    b_idx, n_idx = _bn_index(q.shape[0], q.shape[2], 'BNTS')
    rows, rate = dropout_lib.row_hash(dropout.seed, b_idx[..., 0], n_idx[..., 0], q_pos[None, None, :]), dropout.rate
  fn = functools.partial(flash_lib.attention, scale=scale, rate=rate, blocks=blocks, contiguous=contiguous)
  if _mesh_size() == 1:
    return fn(q, k, v, q_pos, k_pos, rows=rows)
  act = P(sharding.BATCH, None, sharding.HEADS, None)
  if rows is None:
    return jax.shard_map(lambda q, k, v, qp, kp: fn(q, k, v, qp, kp), in_specs=(act, act, act, P(), P()),
                         out_specs=act, check_vma=False)(q, k, v, q_pos, k_pos)
  return jax.shard_map(lambda q, k, v, qp, kp, r: fn(q, k, v, qp, kp, rows=r),
                       in_specs=(act, act, act, P(), P(), P(sharding.BATCH, sharding.HEADS, None)),
                       out_specs=act, check_vma=False)(q, k, v, q_pos, k_pos, rows)


class StandardAttention(nnx.Module):
  """Causal MHA with RoPE; Wq, Wk, Wv: D -> D (bias: model.linear_bias); the output projection is the block's."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, spec = cfg.d_model, (sharding.EMBED, sharding.HEADS)
    self.wq = dense(cfg, d, d, spec, use_bias=cfg.linear_bias, rngs=rngs)
    self.wk = dense(cfg, d, d, spec, use_bias=cfg.linear_bias, rngs=rngs)
    self.wv = dense(cfg, d, d, spec, use_bias=cfg.linear_bias, rngs=rngs)

  def qkv(self, x: Float[Array, 'B T D'], positions: Int[Array, 'T']):
    """Rotated queries and keys, and values, each [B, T, N, H]."""
    n, h = self.cfg.num_heads, self.cfg.head_dim
    q, k, v = (_heads(w(x), n) for w in (self.wq, self.wk, self.wv))
    if self.cfg.rope:
      cos, sin = rope_lib.angles(positions, h, self.cfg.rope_theta)
      q, k = rope_lib.apply(q, cos, sin), rope_lib.apply(k, cos, sin)
    return q, k, v

  def __call__(self, x: Float[Array, 'B T D'], positions: Int[Array, 'T'], contiguous: bool = True,
               dropout_key: jax.Array | None = None) -> Float[Array, 'B T D']:
    q, k, v = self.qkv(x, positions)
    scale = 1.0 / math.sqrt(self.cfg.head_dim)
    dropout = AttnDropout.from_key(dropout_key, self.cfg.attn_dropout)
    return _merge(attend(q, k, v, positions, positions, scale, contiguous, dropout, **_kernel_args(self.cfg)))


class ReferenceAttention(nnx.Module):
  """Flax's own nnx.MultiHeadAttention (with its output projection, no RoPE): the validation baseline."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.mha = nnx.MultiHeadAttention(
        num_heads=cfg.num_heads, in_features=cfg.d_model, qkv_features=cfg.d_model, out_features=cfg.d_model,
        use_bias=cfg.linear_bias, kernel_init=kernel_init(cfg), dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.float32,
        decode=False, deterministic=True, rngs=rngs)

  def __call__(self, x: Float[Array, 'B T D'], positions: Int[Array, 'T'], contiguous: bool = True,
               dropout_key: jax.Array | None = None) -> Float[Array, 'B T D']:
    del contiguous, dropout_key  # model.attn_dropout is refused for the reference (config.py)
    return self.mha(x, mask=causal_mask(positions, positions)[None, None], deterministic=True)


# ----------------------------------------------------------------------------------------------------------------
# Selective attention: K/V generators. Each gives the literal [B, T, S, D] K and V (`full`), and the same function
# split into a per-query part, a per-key part and a per-tile combination (`split`, `tile`) for the blockwise kernel.

class LinearKV(nnx.Module):
  """The original generator: K_ij = W_k [q_i ; x_j] (+ b_k), V_ij = W_v [q_i ; x_j] (+ b_v; model.linear_bias).

  model.selective_parts ablates one half: 'keys' builds W_v on x_j alone (V_ij = E x_j, no per-query value
  term), 'values' builds W_k on x_j alone (K_ij = B x_j, standard keys). `arrays` returns the missing query half
  as zero rows, so every implementation computes the ablated function unchanged (and no gradient reaches it).
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, spec = cfg.d_model, (sharding.EMBED, sharding.HEADS)
    k_in = 2 * d if cfg.selective_parts in ('both', 'keys') else d
    v_in = 2 * d if cfg.selective_parts in ('both', 'values') else d
    self.wk = dense(cfg, k_in, d, spec, use_bias=cfg.linear_bias, rngs=rngs)
    self.wv = dense(cfg, v_in, d, spec, use_bias=cfg.linear_bias, rngs=rngs)

  def arrays(self, dtype) -> dict[str, Array]:
    out = {}
    for name, lin in (('k', self.wk), ('v', self.wv)):
      w = lin.kernel[...].astype(dtype)
      if w.shape[0] == w.shape[1]:  # an ablated generator: D inputs (x_j), not 2D ([q_i ; x_j])
        w = jnp.concatenate([jnp.zeros_like(w), w], axis=0)
      out['w' + name] = w
      if lin.bias is not None:
        out['b' + name] = lin.bias[...].astype(dtype)
    return out

  @staticmethod
  def full(p, qf: Float[Array, 'B T D'], x: Float[Array, 'B S D']):
    b, t, d = qf.shape
    s = x.shape[1]
    qx = jnp.concatenate([jnp.broadcast_to(qf[:, :, None], (b, t, s, d)),
                          jnp.broadcast_to(x[:, None, :], (b, t, s, d))], axis=-1)  # [B, T, S, 2D]: literal
    k, v = qx @ p['wk'], qx @ p['wv']
    if 'bk' in p:
      k, v = k + _bias(p['bk'], k.ndim), v + _bias(p['bv'], v.ndim)
    return k, v

  @staticmethod
  def split(p, qf: Float[Array, 'B T D'], x: Float[Array, 'B S D']):
    # W [q ; x] + b = (W[:D]^T q + b) + W[D:]^T x: the query half (with the bias) and the key half of the kernel.
    d = qf.shape[-1]
    qpart = (qf @ p['wk'][:d], qf @ p['wv'][:d])
    if 'bk' in p:
      qpart = (qpart[0] + _bias(p['bk'], qf.ndim), qpart[1] + _bias(p['bv'], qf.ndim))
    xpart = (x @ p['wk'][d:], x @ p['wv'][d:])
    return qpart, xpart

  @staticmethod
  def tile(p, qpart, xpart):
    del p
    (uk, uv), (xk, xv) = qpart, xpart  # [B, bq, D], [B, bk, D]
    return uk[:, :, None] + xk[:, None], uv[:, :, None] + xv[:, None]

  @staticmethod
  def fused_params(p):
    return p  # wk, wv: their columns are per head, so a `tensor` split takes local columns as they are

  @staticmethod
  def fused_inputs(p, qf, x):
    """The fused kernel's generator for W[q ; x]: hidden = [K columns ; V columns] (2 D_local), identity
    activation, W2k = [I ; 0], W2v = [0 ; I], no bias: K_ij and V_ij exactly, computed per pair (the literal form)."""
    dl = p['wk'].shape[-1]
    (uk, uv), (xk, xv) = LinearKV.split(p, qf, x)  # the biases (model.linear_bias) ride with the query half
    u, w = jnp.concatenate([uk, uv], axis=-1), jnp.concatenate([xk, xv], axis=-1)
    eye, zero = jnp.eye(dl, dtype=u.dtype), jnp.zeros((dl, dl), u.dtype)
    bias = jnp.zeros((dl,), u.dtype)
    return u, w, jnp.concatenate([eye, zero]), bias, jnp.concatenate([zero, eye]), bias, 'identity'


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

  @staticmethod
  def fused_params(p):
    """w1, b1 whole (the hidden layer mixes heads); the second layer split into K and V halves, whose columns are
    per head, so a `tensor` split gives each device its own heads' K/V columns."""
    d = p['w2'].shape[-1] // 2
    return {'w1': p['w1'], 'b1': p['b1'], 'w2k': p['w2'][:, :d], 'b2k': p['b2'][:d], 'w2v': p['w2'][:, d:],
            'b2v': p['b2'][d:]}

  @staticmethod
  def fused_inputs(p, qf, x):
    d = qf.shape[-1]
    u, w = qf @ p['w1'][:d], x @ p['w1'][d:] + _bias(p['b1'], x.ndim)
    return u, w, p['w2k'], p['b2k'], p['w2v'], p['b2v'], 'gelu'


# ----------------------------------------------------------------------------------------------------------------
# Selective attention: the three implementations, as pure functions of arrays.

def selective_materialized(gen, p, q: Float[Array, 'B T N H'], x: Float[Array, 'B S D'],
                           q_pos: Int[Array, 'T'], k_pos: Int[Array, 'S'], rope_cfg, qf=None,
                           dropout: AttnDropout | None = None) -> Float[Array, 'B T N H']:
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
  probs = jax.nn.softmax(logits, axis=-1)
  if dropout is not None:
    b_idx, n_idx = _bn_index(b, n, 'BTNS')
    probs = dropout.apply(probs, b_idx, n_idx, q_pos[None, :, None, None], k_pos[None, None, None, :])
  probs = probs.astype(v_full.dtype)
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
                        qf=None, dropout: AttnDropout | None = None) -> Float[Array, 'B T N H']:
  """The literal computation tile by tile: online softmax over key tiles, rematerialised in the backward pass.

  With dropout the normaliser l sums every weight and the accumulator o only the kept ones (scaled): o / l is
  then sum_j p_ij keep_ij / (1 - rate) V_ij, the dropped-out softmax.
  """
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
      if dropout is not None:
        b_idx, n_idx = _bn_index(b, n, 'BTNS')
        probs = dropout.apply(probs, b_idx, n_idx, qpos[None, :, None, None], kpos[None, None, None, :])
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


def selective_fused(gen, p, q: Float[Array, 'B T N H'], x: Float[Array, 'B S D'], q_pos: Int[Array, 'T'],
                    k_pos: Int[Array, 'S'], rope_cfg, blocks: fused_lib.Blocks, qf=None) -> Float[Array, 'B T N H']:
  """The literal computation in fused Pallas kernels (selattn/model/fused.py); `p` from `gen.fused_params`."""
  u, w, w2k, b2k, w2v, b2v, act = gen.fused_inputs(p, _merge(q) if qf is None else qf, x)
  return fused_lib.attention(q, u, w, w2k, b2k, w2v, b2v, q_pos, k_pos, rope_cfg, act, blocks)


def selective_factored(p, q: Float[Array, 'B T N H'], x: Float[Array, 'B S D'], q_pos: Int[Array, 'T'],
                       k_pos: Int[Array, 'S'], rope_cfg, contiguous: bool, dropout: AttnDropout | None = None,
                       kernel: str = 'auto', blocks: flash_lib.Blocks = flash_lib.Blocks()) -> Float[Array, 'B T N H']:
  """Selective attention with a linear generator, computed as a standard attention.

  Split the kernels by input half: W_k = [A | B], W_v = [C | E]. With u_i = A q_i, k_j = B x_j, c_i = C q_i,
  v_j = E x_j (per head): K_ij = u_i + k_j and V_ij = c_i + v_j.
  Values: softmax weights sum to one, so sum_j p_ij V_ij = c_i + sum_j p_ij v_j.
  Keys without RoPE: q_i . K_ij = q_i . u_i + q_i . k_j; the first term is constant in j and cancels in softmax.
  Keys with RoPE: (R_i q_i) . (R_j u_i) depends on j. With a, b the halves of R_i q_i and u1, u2 those of u_i,
  per frequency f it is cos(j th_f)(a_f u1_f + b_f u2_f) + sin(j th_f)(b_f u1_f - a_f u2_f). So the logits are a
  plain dot product of the augmented query [R_i q_i ; a u1 + b u2 ; b u1 - a u2] (head dim 2H) with the
  augmented key [R_j k_j ; cos(j th) ; sin(j th)]. The scale stays 1/sqrt(H).
  Dropout on the probabilities: the weights become d_ij = p_ij m_ij / (1 - rate) (m_ij the 0/1 keep mask), and
  leave the logits (hence the keys' identity) alone. They no longer sum to one: with kappa_i = sum_j d_ij,
  sum_j d_ij V_ij = kappa_i c_i + sum_j d_ij v_j. One extra all-ones value column makes the same attention call
  return kappa_i beside sum_j d_ij v_j, with the same mask, so the per-query term is scaled by its row's kept mass.
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
  if dropout is None:
    return attend(q, k, v, q_pos, k_pos, 1.0 / math.sqrt(h), contiguous, kernel=kernel, blocks=blocks) + c
  ones = jnp.ones(v.shape[:-1] + (1,), v.dtype)
  out = attend(q, k, jnp.concatenate([v, ones], axis=-1), q_pos, k_pos, 1.0 / math.sqrt(h), contiguous, dropout,
               kernel, blocks)
  return out[..., :h] + out[..., h:] * c  # kappa_i [B, T, N, 1] broadcasts over c_i's head dim


class SelectiveAttention(nnx.Module):
  """Selective causal MHA: Wq: D -> D; K and V generated per query from [q_i ; x_j]; no output projection."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.wq = dense(cfg, cfg.d_model, cfg.d_model, (sharding.EMBED, sharding.HEADS), use_bias=cfg.linear_bias,
                    rngs=rngs)
    self.kv = (LinearKV if cfg.kv_generator == 'linear' else MlpKV)(cfg, rngs=rngs)

  def __call__(self, x: Float[Array, 'B T D'], positions: Int[Array, 'T'], contiguous: bool = True,
               impl: str | None = None, dropout_key: jax.Array | None = None) -> Float[Array, 'B T D']:
    cfg = self.cfg
    dropout = AttnDropout.from_key(dropout_key, cfg.attn_dropout)
    impl = impl or cfg.impl
    gen = type(self.kv)
    if impl == 'factored' and gen is not LinearKV:
      raise ValueError("model.selective_impl='factored' needs model.kv_generator='linear'")
    q = _heads(self.wq(x), cfg.num_heads)
    p = self.kv.arrays(jnp.dtype(cfg.dtype))
    x = x.astype(jnp.dtype(cfg.dtype))
    rope_cfg = cfg.rope_theta if cfg.rope else None
    if impl == 'factored':
      return _merge(selective_factored(p, q, x, positions, positions, rope_cfg, contiguous, dropout,
                                       **_kernel_args(cfg)))
    if impl == 'fused':
      blocks = fused_lib.Blocks(block_q=cfg.fused_block_q, block_k=cfg.fused_block_k, block_f=cfg.fused_block_f,
                                backward=cfg.fused_backward, forward=cfg.fused_forward,
                                heads_per_program=cfg.fused_heads_per_program, fwd_splits=cfg.fused_fwd_splits,
                                bwd_splits=cfg.fused_bwd_splits,
                                num_warps=cfg.fused_num_warps, num_stages=cfg.fused_num_stages)
      why = fused_lib.unsupported(cfg.head_dim, blocks, cfg.num_heads)
      if why is None and cfg.attn_dropout > 0:
        why = 'model.attn_dropout > 0: the kernels have no dropout mask'
      if why is None:
        fn = functools.partial(selective_fused, gen, rope_cfg=rope_cfg, blocks=blocks)
        p = gen.fused_params(p)
        if _mesh_size() > 1:  # a Pallas call is not partitioned by GSPMD: split it by hand
          return _merge(_shard_map_split(fn, gen, p, q, x, positions, fused=True))
        return _merge(fn(p, q, x, positions, positions))
      _log_fallback(f'model.selective_impl=fused cannot take this model ({why}): running blockwise')
      impl = 'blockwise'
    if impl == 'materialized':
      fn = functools.partial(selective_materialized, gen, rope_cfg=rope_cfg, dropout=dropout)
    else:
      fn = functools.partial(selective_blockwise, gen, rope_cfg=rope_cfg, block_q=cfg.block_q,
                             block_k=cfg.block_k, dropout=dropout)
    if _seq_size() > 1:
      return _merge(_shard_map_split(fn, gen, p, q, x, positions, fused=False))
    return _merge(fn(p, q, x, positions, positions))


@functools.cache
def _log_fallback(msg: str) -> None:
  """One line per distinct reason, not one per layer and trace."""
  logging.warning(msg)


def _mesh_size() -> int:
  mesh = jax.sharding.get_abstract_mesh()
  return 1 if mesh.empty else math.prod(mesh.shape.values())


def _seq_size() -> int:
  mesh = jax.sharding.get_abstract_mesh()
  return 1 if mesh.empty or 'seq' not in mesh.axis_names else mesh.shape['seq']


def _shard_map_split(fn, gen, p, q: Float[Array, 'B T N H'], x: Float[Array, 'B S D'],
                     positions: Int[Array, 'T'], fused: bool) -> Float[Array, 'B T N H']:
  """Runs the literal selective attention inside shard_map: batch over the batch axes, query positions over `seq`.

  Each device holds a block of queries (in the caller's order: the trainer lays tokens out in zigzag order so
  causal work is balanced), all-gathers the layer input x and the key positions over `seq` (the backward of that
  all-gather is a reduce-scatter), builds only its own [b, T/seq, S or block_k, ...] K/V tiles and attends
  locally. Heads are split over `tensor` where a device can compute its heads alone: the linear generator (its
  per-head K/V columns are independent) and the fused MLP generator (each device computes the shared hidden layer
  g_ij but only its own heads' keys, softmax and value sums, which are the bulk of the per-pair work). The
  blockwise and materialized MLP generator compute all of K/V on each `tensor` device.
  """
  split_heads = gen is LinearKV or fused
  batch, heads = sharding.BATCH, (sharding.HEADS if split_heads else None)
  qf = _merge(q)  # the generator's input q_i is the whole query (all heads)

  def local(p, q, qf, x, q_pos):
    x_all = jax.lax.all_gather(x, 'seq', axis=1, tiled=True)
    k_pos = jax.lax.all_gather(q_pos, 'seq', axis=0, tiled=True)
    if split_heads:
      # Only this device's head columns: the tile then holds only local heads.
      return fn(p, q, x_all, q_pos, k_pos, qf=qf)
    return fn(p, q, x_all, q_pos, k_pos)

  def spec(name, a):
    if name in ('w1', 'b1'):  # the MLP's hidden layer, whole on every device
      return P(*([None] * a.ndim))
    return P(None, heads) if a.ndim == 2 else P(heads)

  p_spec = {k: spec(k, a) for k, a in p.items()}
  return jax.shard_map(
      local, in_specs=(p_spec, P(batch, 'seq', heads, None), P(batch, 'seq', None), P(batch, 'seq', None),
                       P('seq')),
      out_specs=P(batch, 'seq', heads, None), check_vma=not fused)(p, q, qf, x, positions)
