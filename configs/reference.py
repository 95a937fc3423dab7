"""The original's third baseline: Flax's nnx.MultiHeadAttention (output projection, no RoPE)."""

from configs import base


def get_config(variant: str = ''):
  c = base.get_config()
  c.model.attention = 'reference'
  c.model.rope = False
  c.train.flat_optimizer = True  # a tiny model: one AdamW update over all parameters is faster (BENCHMARKS.md)
  if variant:
    base.apply_variant(c, variant)
  return c
