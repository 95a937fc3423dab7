"""Test-wide JAX and Flax settings."""

import atexit
import os
import shutil
import tempfile

# XLA's CPU backend at optimisation level 0: LLVM's passes are most of a tiny program's compile time, and the suite
# is mostly compiles (a third less time on 2 cores). Partitioning, fusion and collectives are XLA's, not LLVM's,
# so what the tests check is compiled the same way; subprocesses the tests start inherit the flag. Set before jax
# initialises its backend.
# Likewise its fusions emitted by the LLVM IR emitters instead of the MLIR fusion emitters: which ops fuse is still
# XLA's decision, only the code emitted for a fusion differs, and it compiles in about half the time (measured on
# four of mesh_check.py's equivalence programs, created, compiled and run: 23.8 -> 14.7 CPU-s).
for _flag in ('--xla_backend_optimization_level=0', '--xla_cpu_use_fusion_emitters=false'):
  if _flag.split('=')[0] not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + _flag).strip()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position
from flax import nnx  # pylint: disable=g-import-not-at-top,wrong-import-position

# An implicit broadcast between arrays of different ranks is an error in tests, not a silent reshape.
jax.config.update('jax_numpy_rank_promotion', 'raise')

# A persistent compilation cache of this test process's own (each xdist worker its own, made fresh, removed at
# exit): the many tests that run the trainer several times on one config (resume, dropout, eval) compile the same
# train, eval and sample programs again in each call; from the cache they are compiled once (a fifth less time on
# those files). A cached executable is the program XLA compiled, so what a test computes is unchanged.
# In-process only (jax.config, not the environment): subprocesses the tests start keep their own settings.
_compile_cache = tempfile.mkdtemp(prefix='selattn-test-jax-cache-')
atexit.register(shutil.rmtree, _compile_cache, ignore_errors=True)
# Subprocesses: selattn.main's default cache is the user's (~/.cache/selattn/jax); the tests' runs use one of this
# process's instead, with JAX's default threshold (programs that compile in 1 s or more), unless a test sets its
# own (or none: main_test's runs that watch the compile).
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(_compile_cache, 'subprocesses'))
jax.config.update('jax_compilation_cache_dir', _compile_cache)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.1)  # not the many trivial eager-op programs
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


@pytest.fixture
def no_compilation_cache():
  """Turns the persistent compilation cache off for a test that watches the backend compile."""
  from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_enable_compilation_cache', False)
  compilation_cache.reset_cache()
  yield
  jax.config.update('jax_enable_compilation_cache', True)
  compilation_cache.reset_cache()


@pytest.fixture
def no_mesh():
  """Builds models without a mesh: parameters carry `out_sharding` metadata, which eager sharding needs a mesh for.

  A fixture, not a global `nnx.use_eager_sharding(False)`: that would also make `train.create_state` (under
  `jax.set_mesh`) create replicated instead of sharded parameters in every other test module.
  """
  with nnx.use_eager_sharding(False):
    yield



@pytest.fixture
def mgpu_interpreter(monkeypatch):
  """Lets the model run the Mosaic GPU kernels in their interpreter on the CPU (off by default: it falls back)."""
  from selattn.model import fused_mgpu  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(fused_mgpu, 'INTERPRET_OFF_GPU', True)
