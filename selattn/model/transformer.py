"""The original decoder-only transformer: embedding, L post-LN layers, ReLU FFN, logits with bias."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from selattn import sharding
from selattn.config import ModelConfig
from selattn.model import attention as attn_lib

ATTENTION = {'standard': attn_lib.StandardAttention, 'selective': attn_lib.SelectiveAttention,
             'reference': attn_lib.ReferenceAttention}


def dropout(x: Array, rate: float, key: jax.Array | None) -> Array:
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm with scale and bias, eps 1e-5, computed in float32."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.dtype = jnp.dtype(cfg.dtype)
    self.norm = nnx.LayerNorm(cfg.d_model, epsilon=1e-5, dtype=jnp.float32, param_dtype=jnp.float32,
                              scale_init=nnx.with_partitioning(nnx.initializers.ones, (sharding.REPLICATED,)),
                              bias_init=nnx.with_partitioning(nnx.initializers.zeros, (sharding.REPLICATED,)),
                              rngs=rngs)

  def __call__(self, x):
    return self.norm(x.astype(jnp.float32)).astype(self.dtype)


class Block(nnx.Module):
  """Post-LN: x = LN1(x + MHA(x)); x = LN2(x + FFN(x)); FFN = Linear(D, F) -> ReLU -> Linear(F, D), no bias."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.attn = ATTENTION[cfg.attention](cfg, rngs=rngs)
    self.ln1 = LayerNorm(cfg, rngs=rngs)
    self.ffn_in = attn_lib.dense(cfg, cfg.d_model, cfg.ffn_dim, (sharding.EMBED, sharding.HEADS), use_bias=False,
                                 rngs=rngs)
    self.ffn_out = attn_lib.dense(cfg, cfg.ffn_dim, cfg.d_model, (sharding.HEADS, sharding.EMBED),
                                  use_bias=False, rngs=rngs)
    self.ln2 = LayerNorm(cfg, rngs=rngs)

  def __call__(self, x: Float[Array, 'B T D'], positions: Int[Array, 'T'], contiguous: bool,
               key: jax.Array | None) -> Float[Array, 'B T D']:
    k1, k2 = jax.random.split(key) if key is not None else (None, None)
    x = sharding.constrain_activations(
        self.ln1(x + dropout(self.attn(x, positions, contiguous), self.cfg.dropout, k1)))
    h = self.ffn_out(sharding.constrain_activations(jax.nn.relu(self.ffn_in(x))))
    return sharding.constrain_activations(self.ln2(x + dropout(h, self.cfg.dropout, k2)))


class Transformer(nnx.Module):
  """Tokens [B, T] -> logits [B, T, V] (float32)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    # The lookup stays float32: its backward is a scatter-add of B*T rows into V (a few dozen) rows, and
    # bfloat16 atomics under that contention made a bf16 nanoGPT-size step 4x slower (47 vs 12 ms, H200).
    self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, param_dtype=jnp.float32, dtype=jnp.float32,
                           embedding_init=nnx.with_partitioning(nnx.initializers.normal(1.0),
                                                                (sharding.VOCAB, sharding.EMBED)),
                           rngs=rngs)
    self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.head = attn_lib.dense(cfg, cfg.d_model, cfg.vocab_size, (sharding.EMBED, sharding.VOCAB), use_bias=True,
                               rngs=rngs)

  def __call__(self, tokens: Int[Array, 'B T'], positions: Int[Array, 'T'] | None = None, *,
               dropout_key: jax.Array | None = None) -> Float[Array, 'B T V']:
    """`positions` (default 0..T-1) are the tokens' places in the sequence: RoPE angles and the causal mask use
    them, so a permuted sequence (the zigzag order of the `seq` split) computes the same function."""
    contiguous = positions is None
    if positions is None:
      positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)
    keys = (jax.random.split(dropout_key, self.cfg.num_layers + 1) if dropout_key is not None
            else [None] * (self.cfg.num_layers + 1))
    x = sharding.constrain_activations(
        dropout(self.embed(tokens).astype(jnp.dtype(self.cfg.dtype)), self.cfg.dropout, keys[0]))
    for layer, key in zip(self.layers, keys[1:]):
      if self.cfg.remat:
        x = nnx.remat(lambda lyr, x, k: lyr(x, positions, contiguous, k))(layer, x, key)
      else:
        x = layer(x, positions, contiguous, key)
    return sharding.constrain_activations(self.head(x).astype(jnp.float32))


def count_params(model: nnx.Module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
