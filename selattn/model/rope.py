"""Rotary position embeddings in the original's convention: non-interleaved halves per head.

For a head vector x = [x1 ; x2] (halves of size H/2) at position p, with theta_f = base^(-2f/H):
  rope(x, p) = [x1 cos(p theta) - x2 sin(p theta) ; x2 cos(p theta) + x1 sin(p theta)].
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def frequencies(head_dim: int, base: float = 10000.0) -> Float[Array, 'half']:
  return base ** (-2.0 * jnp.arange(head_dim // 2, dtype=jnp.float32) / head_dim)


def angles(positions: Int[Array, 'T'], head_dim: int, base: float = 10000.0
           ) -> tuple[Float[Array, 'T half'], Float[Array, 'T half']]:
  """cos and sin of position * theta_f, in float32."""
  a = positions.astype(jnp.float32)[:, None] * frequencies(head_dim, base)[None, :]
  return jnp.cos(a), jnp.sin(a)


def apply(x: Float[Array, '*B T N H'], cos: Float[Array, 'T half'], sin: Float[Array, 'T half']
          ) -> Float[Array, '*B T N H']:
  """Rotates x (position axis -3, head dim last) by precomputed angles, in float32, returned in x's dtype."""
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  lead = (1,) * (x.ndim - 3)  # explicit ranks: tests run with jax_numpy_rank_promotion='raise'
  c = cos.reshape(*lead, cos.shape[0], 1, cos.shape[1])  # broadcast over leading dims and heads
  s = sin.reshape(*lead, sin.shape[0], 1, sin.shape[1])
  return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)
