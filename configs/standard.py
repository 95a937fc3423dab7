"""The original's standard-attention run (same hyperparameters as selective.py)."""

from configs import base


def get_config(variant: str = ''):
  c = base.get_config()
  c.model.attention = 'standard'
  if variant:
    base.apply_variant(c, variant)
  return c
