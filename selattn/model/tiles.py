"""What the Pallas kernels (fused.py, flash.py) share: power-of-two sizes, padding to whole tiles, 2-D matmuls,
Triton launch parameters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array


def dot(a, b, trans_a=False, trans_b=False):
  """A 2-D matmul with float32 accumulation (a Triton dot; TF32 for float32 inputs, like XLA's default)."""
  dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def pow2(n: int) -> int:
  """The smallest power of two >= n (1 for n <= 1)."""
  return 1 << max(0, (n - 1).bit_length())


def pad(x: Array, axis: int, size: int, value=0) -> Array:
  """x padded with `value` along `axis` to `size` (unchanged when it already has that size)."""
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths, constant_values=value) if size != x.shape[axis] else x


def compiler_params(st):
  """Triton's warps and pipeline stages from a kernel's static settings; None when interpreted (off GPU)."""
  if st.interpret:
    return None
  from jax.experimental.pallas import triton as plgpu  # noqa: PLC0415 (GPU only)
  return plgpu.CompilerParams(num_warps=st.num_warps, num_stages=st.num_stages)
