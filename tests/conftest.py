"""Test-wide JAX and Flax settings."""

import jax
import pytest
from flax import nnx

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
