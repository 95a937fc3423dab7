"""The tests' error measure against a reference: the largest error over the reference's largest magnitude."""

from __future__ import annotations

import numpy as np


def rel(got, ref) -> float:
  """max |got - ref| / max |ref| in float64; the shapes must match and the reference must not be all zero."""
  got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
  assert got.shape == ref.shape, (got.shape, ref.shape)
  scale = np.abs(ref).max()
  assert scale > 0, 'reference is all zero'
  assert np.isfinite(got).all(), 'not finite'  # a NaN error would slip past max() over several errors
  return float(np.abs(got - ref).max() / scale)
