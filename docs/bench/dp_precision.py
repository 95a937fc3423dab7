"""CPU: is dp = dG . g cheap as a wgmma? The backward's five outputs by fused_mgpu_bwd.transcription (bfloat16 as the
kernels round, du summed per two-head group) against its exact float32 form, scale-relative, at one sequence of the
original config's shapes with kv_hidden 256 (T299 N2 H32, RoPE, the tests' random inputs; two seeds), with dp
computed as the kernels do now (float32: 'f32') or as a wgmma would (g in bfloat16, and dG in bfloat16: 'bf16', or
split into bfloat16 hi + lo: 'hilo'). About four minutes on two cores.

  JAX_PLATFORMS=cpu PYTHONPATH=$PWD python3 docs/bench/dp_precision.py > docs/bench/dp_precision_cpu.txt
"""
import sys

import jax
import jax.numpy as jnp
jax.config.update('jax_default_matmul_precision', 'highest')
sys.path.insert(0, 'tests')  # the tests' inputs (run from the repository root)
import fused_mgpu_train_test as T
from selattn.model import fused_mgpu_bwd as fmb

def transcription_with(einsum, scale, args, g_res, lse, dgo):
  """fused_mgpu_bwd.transcription (bfloat16 as the kernels round, du summed per two-head group) with jnp.einsum
  replaced for the call by einsum(original einsum, spec, *operands, **kw)."""
  orig = jnp.einsum
  fmb.jnp.einsum = lambda spec, *ops, **kw: einsum(orig, spec, *ops, **kw)
  try:
    return fmb.transcription(*args, g_res, lse, dgo, scale=scale, du_heads=2)
  finally:
    fmb.jnp.einsum = orig


def run(mode, scale, args, g_res, lse, dgo):
  """The transcription with its dp einsum (the only one of that spec) rounded as `mode` says."""
  rnd = lambda x: x.astype(jnp.bfloat16).astype(jnp.float32)
  def patched(orig, spec, *ops, **kw):
    if spec == 'btsf,btnf->btsn' and mode != 'f32':
      g, d = ops
      if mode == 'bf16':
        return orig(spec, rnd(g), rnd(d), **kw)
      hi = rnd(d)
      return orig(spec, rnd(g), hi, **kw) + orig(spec, rnd(g), rnd(d - hi), **kw)
    return orig(spec, *ops, **kw)
  return transcription_with(patched, scale, args, g_res, lse, dgo)


def main():
  for seed in (0, 1):
    scale, args, g, lse, dgo = T._backward_args(seed, True, 2, 32, 256, 299)
    ref = fmb.transcription(*args, g, lse, dgo, scale=scale, precision='float32')
    for mode in ('f32', 'bf16', 'hilo'):
      got = run(mode, scale, args, g, lse, dgo)
      print(seed, mode, {k: f'{v:.3e}' for k, v in T._errs5(got, ref).items()}, flush=True)


if __name__ == '__main__':
  main()
