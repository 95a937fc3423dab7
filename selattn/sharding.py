"""The mesh and the logical-axis table: which mesh axes each named array dimension is split over.

Axes: `data` and `fsdp` split the batch; `fsdp` also splits parameters and optimizer state; `seq` splits the
query positions of the selective K/V (inside `jax.shard_map`, see model/attention.py); `tensor` splits heads.
"""

from __future__ import annotations

from flax import nnx
import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from selattn.config import ConfigError

AXES = ('data', 'fsdp', 'seq', 'tensor')
BATCH = ('data', 'fsdp')  # the batch dimension of activations and input batches

# Parameter dimensions (logical name -> mesh axis). One table; modules annotate with these names' values.
EMBED = 'fsdp'  # model width D of weight matrices
HEADS = 'tensor'  # the N*H output of Q/K/V projections, the FFN hidden width
VOCAB = None  # the vocabulary (83 symbols) is never split
REPLICATED = None


def constrain(x: jax.Array, spec: P) -> jax.Array:
  """`with_sharding_constraint(x, spec)` under a mesh (`jax.set_mesh`); `x` unchanged without one."""
  return x if jax.sharding.get_abstract_mesh().empty else jax.lax.with_sharding_constraint(x, spec)


def constrain_activations(x: jax.Array) -> jax.Array:
  """Pins a [B, T, ...] activation to the batch's sharding (B over data x fsdp, T over seq) under a mesh.

  Without it GSPMD may follow the fsdp-sharded weights instead and compute the whole batch on every fsdp
  device (measured: 4x slower with fsdp=4); pinned, the only sharded choice left is FSDP's weight all-gather.
  """
  return constrain(x, P(BATCH, 'seq', *(None,) * (x.ndim - 2)))


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
  """The one mesh, axes ('data', 'fsdp', 'seq', 'tensor') over all global devices, GSPMD (Auto) axes."""
  devices = jax.devices() if devices is None else devices
  sizes = mesh_cfg.resolve(len(devices))
  shape = tuple(sizes[a] for a in AXES)
  return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def check_fits(cfg, mesh: jax.sharding.Mesh) -> None:
  """Refuses mesh sizes that don't divide the model or the batch, with a one-line error naming the keys."""
  m, sizes = cfg.model, dict(mesh.shape)
  batch_ways = sizes['data'] * sizes['fsdp']
  checks = [
      (cfg.train.batch_size % batch_ways == 0,
       f'train.batch_size={cfg.train.batch_size} is not divisible by mesh.data*mesh.fsdp={batch_ways}'),
      (cfg.train.batch_size % jax.process_count() == 0,
       f'train.batch_size={cfg.train.batch_size} is not divisible by the {jax.process_count()} processes'),
      (m.d_model % sizes['fsdp'] == 0, f'model.d_model={m.d_model} is not divisible by mesh.fsdp={sizes["fsdp"]}'),
      (m.num_heads % sizes['tensor'] == 0,
       f'model.num_heads={m.num_heads} is not divisible by mesh.tensor={sizes["tensor"]}'),
      (m.ffn_dim % sizes['tensor'] == 0 and (m.kv_generator != 'mlp' or m.kv_hidden % sizes['tensor'] == 0),
       f'the FFN width {m.ffn_dim} and model.kv_hidden={m.kv_hidden} must be divisible by mesh.tensor='
       f'{sizes["tensor"]}'),
      (not cfg.train.flat_optimizer or (sizes['fsdp'] == 1 and sizes['tensor'] == 1),
       f'train.flat_optimizer=True keeps the optimizer state as one replicated vector: it needs mesh.fsdp=1 and '
       f'mesh.tensor=1 (got {sizes["fsdp"]} and {sizes["tensor"]}); set --config.train.flat_optimizer=False'),
      (sizes['seq'] == 1 or cfg.data.seq_len % (2 * sizes['seq']) == 0,
       f'data.seq_len={cfg.data.seq_len} must be divisible by 2*mesh.seq={2 * sizes["seq"]} (zigzag chunks)'),
  ]
  for ok, msg in checks:
    if not ok:
      raise ConfigError(msg)


def zigzag(seq_len: int, n: int):
  """Position order for the `seq` split: device i holds chunks i and 2n-1-i, balancing causal work."""
  if n == 1:
    return np.arange(seq_len)
  chunks = np.arange(seq_len).reshape(2 * n, -1)
  return np.concatenate([np.concatenate([chunks[i], chunks[2 * n - 1 - i]]) for i in range(n)])


def state_shardings(state, mesh: jax.sharding.Mesh):
  """NamedShardings of an nnx state from its variables' `out_sharding` metadata."""
  return nnx.get_named_sharding(state, mesh)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """[B, T] batches: rows over data x fsdp, positions over seq (activations are then sequence-split)."""
  return NamedSharding(mesh, P(BATCH, 'seq'))
