"""The decoder-only transformer: the original's block by default (post-LN, ReLU, no output projection, RoPE),
nanoGPT's by config (pre-LN, GELU, output projection, learned positions, tied embeddings, its init)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from selattn import sharding
from selattn.config import ModelConfig
from selattn.model import attention as attn_lib
from selattn.model import dropout as dropout_lib

ATTENTION = {'standard': attn_lib.StandardAttention, 'selective': attn_lib.SelectiveAttention,
             'reference': attn_lib.ReferenceAttention}


def dropout(x: Array, rate: float, key: jax.Array | None, rng: str = 'threefry') -> Array:
  """Inverted dropout. rng (model.dropout_rng): 'threefry' draws the mask with jax.random (its stream since the
  first runs); 'hash' keeps element e iff mix32(seed ^ mix32(e)) >= rate 2^32, e the element's flat index and
  seed 32 bits drawn from the key: a few integer ops fused into the surrounding elementwise work instead of a
  random-number kernel (nanoGPT's step: 0.5 ms of 5.6 go to threefry masks on an H200), a different stream."""
  if key is None or rate == 0.0:
    return x
  if rng == 'hash':
    keep = dropout_lib.element_keep(jax.random.bits(key, (), jnp.uint32), x.shape, rate)
  else:
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def gelu(x: Array) -> Array:
  """The exact (erf) GELU x Phi(x), nanoGPT's nn.GELU() (jax's default is the tanh approximation), in x's dtype:
  with bf16 inputs each of its few ops rounds to bf16 (model.gelu_impl='jax', the default). Its erf is
  compute-bound on a GPU: a custom VJP that saved only x and recomputed erf in the backward pass made the GELU
  kernels of nanoGPT's step slower on an H200 (90 and 77 us a layer against 82 and 62; BENCHMARKS.md, W2), so
  autodiff keeps erf's intermediates."""
  return jax.nn.gelu(x, approximate=False)


def gelu_erf32(x: Array) -> Array:
  """The exact GELU computed in float32 (lax.erf) and rounded once to x's dtype (model.gelu_impl='erf32')."""
  return jax.nn.gelu(x.astype(jnp.promote_types(x.dtype, jnp.float32)), approximate=False).astype(x.dtype)


# Numerical Recipes' erfcc (a Chebyshev fit): erfc(z) = t exp(-z^2 + P(t)), t = 1 / (1 + z / 2), z >= 0, with
# relative error below 1.2e-7 everywhere, so the tails keep float32 accuracy too.
_ERFC = (-1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806, 0.27886807, -1.13520398, 1.48851587,
         -0.82215223, 0.17087277)


def _gelu_poly_parts(x: Array) -> tuple[Array, Array]:
  """(x, Phi(x)) in float32 (float64 for float64 x)."""
  xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  z = jnp.abs(xf) * (1 / math.sqrt(2))
  t = 1 / (1 + 0.5 * z)
  poly = _ERFC[-1]
  for a in _ERFC[-2::-1]:
    poly = a + t * poly
  tail = 0.5 * t * jnp.exp(poly - z * z)  # Phi(-|x|) = erfc(|x| / sqrt 2) / 2
  return xf, jnp.where(xf >= 0, 1 - tail, tail)


@jax.custom_jvp
def gelu_poly32(x: Array) -> Array:
  """The exact GELU with erf from Numerical Recipes' erfcc (one exp and one division, relative error < 1.2e-7),
  computed in float32 and rounded once to x's dtype (model.gelu_impl='poly32'). Its derivative is the exact form
  Phi(x) + x phi(x) (custom JVP), not the derivative of the fit."""
  xf, cdf = _gelu_poly_parts(x)
  return (xf * cdf).astype(x.dtype)


@gelu_poly32.defjvp
def _gelu_poly32_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  xf, cdf = _gelu_poly_parts(x)
  slope = cdf + xf * jnp.exp(-0.5 * xf * xf) * (1 / math.sqrt(2 * math.pi))
  return (xf * cdf).astype(x.dtype), (slope * dx.astype(slope.dtype)).astype(dx.dtype)


GELUS = {'jax': gelu, 'erf32': gelu_erf32, 'poly32': gelu_poly32}


def activation(cfg: ModelConfig):
  """The FFN's activation. model.gelu_impl='auto' takes 'poly32' under bf16 compute: one rounding of an
  accurate float32 value, more accurate than jax.nn.gelu's per-op bf16 rounding and faster on a GPU (nanoGPT's
  step on an H200: 5.10 against 5.25 ms; BENCHMARKS.md, W2). Float32 compute keeps 'jax' (lax.erf in float32)."""
  if cfg.activation == 'relu':
    return jax.nn.relu
  impl = cfg.gelu_impl
  if impl == 'auto':
    impl = 'poly32' if cfg.dtype == 'bfloat16' else 'jax'
  return GELUS[impl]


def embedding_init(cfg: ModelConfig) -> nnx.Initializer:
  return nnx.initializers.normal(1.0 if cfg.init == 'original' else attn_lib.NANOGPT_STD)


class LayerNorm(nnx.Module):
  """LayerNorm with scale and (model.norm_bias) bias, eps 1e-5, computed in float32."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.dtype = jnp.dtype(cfg.dtype)
    self.norm = nnx.LayerNorm(cfg.d_model, epsilon=1e-5, dtype=jnp.float32, param_dtype=jnp.float32,
                              use_bias=cfg.norm_bias,
                              scale_init=nnx.with_partitioning(nnx.initializers.ones, (sharding.REPLICATED,)),
                              bias_init=nnx.with_partitioning(nnx.initializers.zeros, (sharding.REPLICATED,)),
                              rngs=rngs)

  def __call__(self, x):
    return self.norm(x.astype(jnp.float32)).astype(self.dtype)


class Block(nnx.Module):
  """post (the original): x = LN1(x + A(x)); x = LN2(x + FFN(x)).  pre: x = x + A(LN1(x)); x = x + FFN(LN2(x)).

  A is the attention, then Linear(D, D) if model.attn_out_proj; FFN = Linear(D, F) -> ReLU | GELU -> Linear(F, D).
  Each branch's output goes through dropout (model.dropout) before the residual add.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d = cfg.d_model
    # nanoGPT scales the init of the projections that write into the residual stream by 1/sqrt(2L).
    resid_init = (None if cfg.init == 'original'
                  else nnx.initializers.normal(attn_lib.NANOGPT_STD / math.sqrt(2 * cfg.num_layers)))
    self.attn = ATTENTION[cfg.attention](cfg, rngs=rngs)
    self.ln1 = LayerNorm(cfg, rngs=rngs)
    self.attn_proj = (attn_lib.dense(cfg, d, d, (sharding.HEADS, sharding.EMBED), use_bias=cfg.linear_bias,
                                     rngs=rngs, init=resid_init) if cfg.attn_out_proj else None)
    self.ffn_in = attn_lib.dense(cfg, d, cfg.ffn_dim, (sharding.EMBED, sharding.HEADS), use_bias=cfg.linear_bias,
                                 rngs=rngs)
    self.ffn_out = attn_lib.dense(cfg, cfg.ffn_dim, d, (sharding.HEADS, sharding.EMBED), use_bias=cfg.linear_bias,
                                  rngs=rngs, init=resid_init)
    self.ln2 = LayerNorm(cfg, rngs=rngs)

  def attn_input(self, x: Float[Array, 'B T D']) -> Float[Array, 'B T D']:
    """What the attention reads: LN1(x) pre-LN, x post-LN."""
    return self.ln1(x) if self.cfg.norm == 'pre' else x

  def ffn(self, x: Float[Array, 'B T D']) -> Float[Array, 'B T D']:
    return self.ffn_out(sharding.constrain_activations(activation(self.cfg)(self.ffn_in(x))))

  def finish(self, x: Float[Array, 'B T D'], a: Float[Array, 'B T D'], key: jax.Array | None
             ) -> Float[Array, 'B T D']:
    """The rest of the layer, given the attention's output `a` (before the output projection)."""
    k1, k2 = jax.random.split(key) if key is not None else (None, None)
    rate, rng = self.cfg.dropout, self.cfg.dropout_rng
    if self.attn_proj is not None:
      a = self.attn_proj(a)
    if self.cfg.norm == 'pre':
      x = sharding.constrain_activations(x + dropout(a, rate, k1, rng))
      return sharding.constrain_activations(x + dropout(self.ffn(self.ln2(x)), rate, k2, rng))
    x = sharding.constrain_activations(self.ln1(x + dropout(a, rate, k1, rng)))
    return sharding.constrain_activations(self.ln2(x + dropout(self.ffn(x), rate, k2, rng)))

  def __call__(self, x: Float[Array, 'B T D'], positions: Int[Array, 'T'], contiguous: bool,
               key: jax.Array | None) -> Float[Array, 'B T D']:
    # fold_in, not a third split: the residual dropout keeps the stream it had before attention dropout existed.
    attn_key = jax.random.fold_in(key, 2) if key is not None and self.cfg.attn_dropout > 0 else None
    a = self.attn(self.attn_input(x), positions, contiguous, dropout_key=attn_key)
    return self.finish(x, a, key)


class Transformer(nnx.Module):
  """Tokens [B, T] -> logits [B, T, V] (float32)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    # The lookup stays float32: its backward is a scatter-add of B*T rows into V (a few dozen) rows, and
    # bfloat16 atomics under that contention made a bf16 nanoGPT-size step 4x slower (47 vs 12 ms, H200).
    self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, param_dtype=jnp.float32, dtype=jnp.float32,
                           embedding_init=nnx.with_partitioning(embedding_init(cfg),
                                                                (sharding.VOCAB, sharding.EMBED)),
                           rngs=rngs)
    self.pos_embed = (nnx.Embed(cfg.max_len, cfg.d_model, param_dtype=jnp.float32, dtype=jnp.float32,
                                embedding_init=nnx.with_partitioning(embedding_init(cfg),
                                                                     (sharding.REPLICATED, sharding.EMBED)),
                                rngs=rngs) if cfg.positions == 'learned' else None)
    self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.ln_f = LayerNorm(cfg, rngs=rngs) if cfg.norm == 'pre' else None
    if cfg.tie_embeddings:
      self.head = None
      self.head_bias = (nnx.Param(jnp.zeros((cfg.vocab_size,), jnp.float32)) if cfg.head_bias else None)
    else:
      self.head = attn_lib.dense(cfg, cfg.d_model, cfg.vocab_size, (sharding.EMBED, sharding.VOCAB),
                                 use_bias=cfg.head_bias, rngs=rngs)

  def embed_inputs(self, tokens: Int[Array, 'B T'], positions: Int[Array, 'T']) -> Float[Array, 'B T D']:
    """Token (plus learned position) embeddings in the compute dtype, before dropout."""
    x = self.embed(tokens)
    if self.pos_embed is not None:
      x = x + self.pos_embed(positions)[None]
    return x.astype(jnp.dtype(self.cfg.dtype))

  def logits(self, x: Float[Array, 'B T D']) -> Float[Array, 'B T V']:
    """The last layer's output -> float32 logits (final LN when pre-LN; the transposed embedding when tied)."""
    if self.ln_f is not None:
      x = self.ln_f(x)
    if self.head is not None:
      return self.head(x).astype(jnp.float32)
    out = jnp.einsum('BTD,VD->BTV', x, self.embed.embedding[...].astype(x.dtype)).astype(jnp.float32)
    if self.head_bias is not None:
      out = out + self.head_bias[...].reshape(1, 1, -1)
    return out

  def __call__(self, tokens: Int[Array, 'B T'], positions: Int[Array, 'T'] | None = None, *,
               dropout_key: jax.Array | None = None) -> Float[Array, 'B T V']:
    """`positions` (default 0..T-1) are the tokens' places in the sequence: RoPE angles, learned positions and
    the causal mask use them, so a permuted sequence (the zigzag order of the `seq` split) computes the same
    function."""
    cfg = self.cfg
    if cfg.positions == 'learned' and tokens.shape[1] > cfg.max_len:
      raise ValueError(f'{tokens.shape[1]} tokens but the learned position table has model.max_len={cfg.max_len} '
                       'rows (data.seq_len of the run)')
    contiguous = positions is None
    if positions is None:
      positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)
    keys = (jax.random.split(dropout_key, cfg.num_layers + 1) if dropout_key is not None
            else [None] * (cfg.num_layers + 1))
    x = sharding.constrain_activations(dropout(self.embed_inputs(tokens, positions), cfg.dropout, keys[0],
                                                   cfg.dropout_rng))
    for layer, key in zip(self.layers, keys[1:]):
      if cfg.remat:
        x = nnx.remat(lambda lyr, x, k: lyr(x, positions, contiguous, k))(layer, x, key)
      else:
        x = layer(x, positions, contiguous, key)
    return sharding.constrain_activations(self.logits(x))


def count_params(model: nnx.Module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
