"""The mesh and the logical-axis table: which mesh axes each named array dimension is split over.

Axes: `data` and `fsdp` split the batch; `fsdp` also splits parameters and optimizer state; `seq` splits the
query positions of the selective K/V (inside `jax.shard_map`, see model/attention.py); `tensor` splits heads.
"""

from __future__ import annotations

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

AXES = ('data', 'fsdp', 'seq', 'tensor')
BATCH = ('data', 'fsdp')  # the batch dimension of activations and input batches

# Parameter dimensions (logical name -> mesh axis). One table; modules annotate with these names' values.
EMBED = 'fsdp'  # model width D of weight matrices
HEADS = 'tensor'  # the N*H output of Q/K/V projections, the FFN hidden width
VOCAB = None  # the vocabulary (83 symbols) is never split
REPLICATED = None


def batch_spec(ndim: int = 2) -> P:
  """PartitionSpec of a [B, ...] input batch."""
  return P(BATCH, *([None] * (ndim - 1)))
