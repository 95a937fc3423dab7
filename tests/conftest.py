"""Test-wide JAX and Flax settings."""

import os

# XLA's CPU backend at optimisation level 0: LLVM's passes are most of a tiny program's compile time, and the suite
# is mostly compiles (a third less time on 2 cores). Partitioning, fusion and collectives are XLA's, not LLVM's,
# so what the tests check is compiled the same way; subprocesses the tests start inherit the flag. Set before jax
# initialises its backend.
if '--xla_backend_optimization_level' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_backend_optimization_level=0').strip()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position
from flax import nnx  # pylint: disable=g-import-not-at-top,wrong-import-position

# An implicit broadcast between arrays of different ranks is an error in tests, not a silent reshape.
jax.config.update('jax_numpy_rank_promotion', 'raise')


@pytest.fixture
def no_mesh():
  """Builds models without a mesh: parameters carry `out_sharding` metadata, which eager sharding needs a mesh for.

  A fixture, not a global `nnx.use_eager_sharding(False)`: that would also make `train.create_state` (under
  `jax.set_mesh`) create replicated instead of sharded parameters in every other test module.
  """
  with nnx.use_eager_sharding(False):
    yield

