"""CPU: dp through the value vectors. The backward's dp_ij = dG_i . g_ij is a sum over the F hidden units of every
pair (float32 on the CUDA cores, with dG_i's rows in shared memory: that is what keeps the query kernel at one head
a program at kv_hidden 256). But dG_i = W2v dO_i, so dp_ij = dO_i . V_ij with V_ij = W2v^T g_ij, the pair's value
vector: a wgmma of g (as K's is) and a dot over the head's width instead of F. How much does rounding its operands
to bfloat16 cost? The backward's five outputs by fused_mgpu_bwd.transcription (bfloat16 as the kernels round, du
summed per two-head group) against its exact float32 form, scale-relative, at one sequence of the original config's
shapes with kv_hidden 256 (T299 N2 H32, RoPE; the tests' random inputs, dO and W2v random normal, W2v scaled by
1/sqrt(F); two seeds), with dp computed
  f32     as the kernels do now (g and dG in float32),
  v_bf16  as dO . (W2v^T g) with g and W2v in bfloat16 (one wgmma),
  v_w2    the same with W2v split into bfloat16 hi + lo (two wgmmas: g's rounding alone),
  v_g2    g split into bfloat16 hi + lo, W2v in bfloat16 (two wgmmas: W2v's rounding alone),
  v_3     g and W2v both split, the three largest products (g_hi W_hi + g_lo W_hi + g_hi W_lo: three wgmmas),
and with a c suffix (v_bf16c, v_g2c) the same with delta_i = dG_i . G_i (ds = p (dp - delta)) computed with the
same bfloat16 W2v, dO_i . (W2v^T G_i) (outside the kernels), so that dp and delta round alike.
About eight minutes on two cores.

  JAX_PLATFORMS=cpu PYTHONPATH=$PWD python3 docs/bench/dp_value_precision.py > docs/bench/dp_value_precision_cpu.txt
"""
import sys

import jax
import jax.numpy as jnp
jax.config.update('jax_default_matmul_precision', 'highest')
sys.path.insert(0, 'tests')  # the tests' inputs (run from the repository root)
import dp_precision  # noqa: E402 (docs/bench, the script's folder)
import fused_mgpu_train_test as T  # noqa: E402
from selattn.model import fused_mgpu_bwd as fmb  # noqa: E402

HI = dict(precision='highest')


def rnd(x):
  return x.astype(jnp.bfloat16).astype(jnp.float32)


def run(mode, do, w2v, scale, args, g_res, lse, dgo):
  """The transcription with its dp einsum (the only one of that spec) and, with a c suffix, its delta einsum computed
  as `mode` says."""
  def patched(orig, spec, *ops, **kw):
    def v(g, w):
      return orig('btsf,fnh->btsnh', g, w, **HI)

    if spec == 'btnf,btnf->btn' and mode.endswith('c'):  # delta = dG . G
      return orig('btnh,btnh->btn', do, orig('btnf,fnh->btnh', ops[1], rnd(w2v), **HI), **HI)
    if spec == 'btsf,btnf->btsn' and mode != 'f32':
      g = ops[0]
      gh, wh = rnd(g), rnd(w2v)
      if mode in ('v_bf16', 'v_bf16c'):
        val = v(gh, wh)
      elif mode == 'v_w2':
        val = v(gh, wh) + v(gh, rnd(w2v - wh))
      elif mode in ('v_g2', 'v_g2c'):
        val = v(gh, wh) + v(rnd(g - gh), wh)
      else:  # v_3
        val = v(gh, wh) + v(rnd(g - gh), wh) + v(gh, rnd(w2v - wh))
      return orig('btnh,btsnh->btsn', do, val, **HI)
    return orig(spec, *ops, **kw)
  return dp_precision.transcription_with(patched, scale, args, g_res, lse, dgo)


def main():
  for seed in (0, 1):
    scale, args, g, lse, _ = T._backward_args(seed, True, 2, 32, 256, 299)  # noqa: SLF001
    b, t, n, f = g.shape
    k1, k2 = jax.random.split(jax.random.key(seed + 7))
    do = jax.random.normal(k1, (b, t, n, 32))
    w2v = jax.random.normal(k2, (f, n, 32)) / f ** 0.5
    dgo = jnp.einsum('btnh,fnh->btnf', do, w2v, **HI)
    ref = fmb.transcription(*args, g, lse, dgo, scale=scale, precision='float32')
    for mode in ('f32', 'v_bf16', 'v_w2', 'v_g2', 'v_3', 'v_bf16c', 'v_g2c'):
      got = run(mode, do, w2v, scale, args, g, lse, dgo)
      print(seed, mode, {k: f'{e:.3e}' for k, e in T._errs5(got, ref).items()}, flush=True)  # noqa: SLF001


if __name__ == '__main__':
  main()
