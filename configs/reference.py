"""The original's third baseline: Flax's nnx.MultiHeadAttention (output projection, no RoPE)."""

from configs import base


def get_config(variant: str = ''):
  return base.original_run('reference', variant)
