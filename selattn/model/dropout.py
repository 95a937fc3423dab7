"""Dropout masks that are functions of the indices: on attention probabilities (below), and `element_keep`, the
embedding and residual mask of model.dropout_rng='hash'.

Weight (b, n, i, j) (batch row b, head n, query position i, key position j) is kept iff a counter-based hash of
(seed, b, n, i, j) is >= rate * 2^32, and kept weights are scaled by 1 / (1 - rate). Every implementation (the
dense [B, N, T, S] softmax, the literal [B, T, S, N, H] one, each blockwise tile, the factored form, the flash
kernel of flash.py) evaluates the same function on its own index ranges, so they drop the same weights without a
[B, N, T, S] random array that a tiled kernel could not hold. Positions, not array indices: a permuted sequence
drops the same pairs.

The hash is chained, h = mix(mix(mix(mix(seed ^ mix(b)) ^ n) ^ i) ^ j), so its prefix up to the query position
(`row_hash`, one number per [B, N, T] row) can be computed once outside a kernel that then finishes each weight
with a single `mix` (`keep_from_row`). The mask is a function of the seed and the indices only: which kernel
evaluates it does not change it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array


class AttnDropout(NamedTuple):
  """The dropout of one attention call: a uint32 seed (fresh per step and layer) and the drop rate."""
  seed: Array
  rate: float

  @classmethod
  def from_key(cls, key: jax.Array | None, rate: float) -> AttnDropout | None:
    """None (no dropout) when there is no key (evaluation) or the rate is 0."""
    if key is None or rate == 0.0:
      return None
    return cls(jax.random.bits(key, (), jnp.uint32), rate)

  def apply(self, p: Array, b: Array, n: Array, i: Array, j: Array) -> Array:
    """p with dropped weights zeroed and kept ones scaled; b, n, i, j broadcast against p."""
    keep = dropout_keep(self.seed, b, n, i, j, self.rate)
    return jnp.where(keep, p / (1.0 - self.rate), 0.0).astype(p.dtype)


def mix32(x: Array) -> Array:
  """lowbias32 (C. Wellons' hash-prospector): a bijective uint32 hash with good avalanche."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def _u32(a) -> Array:
  return jnp.asarray(a).astype(jnp.uint32)


def threshold(rate: float) -> Array:
  """The uint32 a weight's hash must reach to be kept."""
  return jnp.uint32(min(round(rate * 2.0**32), 2**32 - 1))


def row_hash(seed: Array, b: Array, n: Array, i: Array) -> Array:
  """The hash chain up to the query position: one uint32 per (b, n, i) row (broadcast shapes)."""
  h = mix32(_u32(seed) ^ mix32(_u32(b)))
  for idx in (n, i):
    h = mix32(h ^ _u32(idx))
  return h


def keep_from_row(row: Array, j: Array, rate: float) -> Array:
  """Whether weight (row, j) survives: the chain's last link, then the threshold."""
  return mix32(row ^ _u32(j)) >= threshold(rate)


def dropout_keep(seed: Array, b: Array, n: Array, i: Array, j: Array, rate: float) -> Array:
  """Whether weight (b, n, i, j) survives dropout: hash(seed, b, n, i, j) >= rate * 2^32 (broadcast shapes)."""
  # The small [B, N, T, 1] row prefix is hashed once per query row.
  return keep_from_row(row_hash(seed, b, n, i), j, rate)


def element_keep(seed: Array, shape: tuple[int, ...], rate: float) -> Array:
  """Embedding/residual dropout's 'hash' mask (model.dropout_rng): element e of an array of `shape` survives iff
  mix32(seed ^ mix32(e)) >= rate 2^32, e its row-major flat index (wrapping past 2^32 elements)."""
  flat = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    flat = flat + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % 2**32)
    stride *= shape[axis]
  return mix32(_u32(seed) ^ mix32(flat)) >= threshold(rate)
