"""The original's selective-attention run: D64 L4 N2, 299-char context, batch 16, AdamW 1e-4, 200k steps.

`--config configs/selective.py:quick` is a first look on a CPU: 1,500 steps ending with a text sample (README.md
gives its time measured on a 2-core VM).
"""

from configs import base


def get_config(variant: str = ''):
  return base.original_run('selective', variant)
