"""The original's standard-attention run (same hyperparameters as selective.py)."""

from configs import base


def get_config(variant: str = ''):
  return base.original_run('standard', variant)
