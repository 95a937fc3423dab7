"""GPU microbenchmark: the Mosaic GPU kernels' per-pair GELU in float32 (as they compute it) against packed
half-precision arithmetic (two values a register and instruction: f16x2 or bf16x2, with tanh.approx.f16x2 /
.bf16x2), in the kernels' own form: a query tile's u rows [64, 64] held in registers (the wgmma layout), one key's
w row [64] from shared memory added down the rows, then the GELU's tanh form (hh + hh tanh(h (c + c a h^2))), summed
over the keys in the same dtype to keep it live.

Per program KEYS keys, PROGRAMS programs of one warpgroup. Prints and writes $OUT/gelu_packed.json: per variant the
median ms of 20 calls, GELU evaluations per second, and (from a run of one key) the GELU's largest error against a
float64 numpy transcription (which shares no code with the kernel), absolute and relative to the largest value; the
inputs are rounded to the variant's dtype, as the kernels would store them. On CPU (no Hopper GPU) it lowers each
variant for cuda and stops. Record (one H200, jax 0.11.2, 2026-12-03): gelu_packed_h200.json (BENCHMARKS.md,
"tenth version").

  OUT=. PYTHONPATH=$PWD python3 docs/bench/gelu_packed.py
"""
import json
import math
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl  # noqa: F401 (registers the Pallas primitives)
from jax.experimental.mosaic import gpu as mgpu
from jax.experimental.pallas import mosaic_gpu as plgpu

BQ = FC = 64
KEYS = int(os.environ.get('KEYS', 1024))
ROWS = 256  # distinct w rows (shared memory); key j takes row j % ROWS
PROGRAMS = int(os.environ.get('PROGRAMS', 132 * 8))
C, A = math.sqrt(2.0 / math.pi), 0.044715
WG = plgpu.Layout.WGMMA
COL = WG.reduce(0)
PACKED = {jnp.float16: ('tanh.approx.f16x2', 'tanh.approx.f16'),
          jnp.bfloat16: ('tanh.approx.bf16x2', 'tanh.approx.bf16')}


def tanh(x, dt):
  if dt == jnp.float32:
    return jnp.tanh(x)  # tanh.approx.f32 under approx_math

  @plgpu.inline_mgpu(arg_types=(WG,), return_type=plgpu.ShapeDtypeStruct((BQ, FC), dt, WG))
  def packed(_, v):
    return v._pointwise(mgpu.FragmentedArray._lift_fast_packed_instr(*PACKED[dt]))  # noqa: SLF001

  return packed(x)


def build(dt, keys=KEYS):
  def body(u_g, w_g, o_g, u_s, w_s, o_s, bars):
    plgpu.copy_gmem_to_smem(u_g, u_s, bars.at[0])
    plgpu.copy_gmem_to_smem(w_g, w_s, bars.at[1])
    plgpu.barrier_wait(bars.at[0])
    plgpu.barrier_wait(bars.at[1])
    uc = plgpu.load(u_s, (), layout=WG).astype(dt)

    def step(j, acc):
      h = uc + jax.lax.broadcast_in_dim(plgpu.load(w_s.at[j % ROWS], (), layout=COL), (BQ, FC), (1,))
      hh = 0.5 * h
      t = tanh(h * (C + (C * A) * (h * h)), dt)
      return acc + (hh + hh * t)

    acc = jax.lax.fori_loop(0, keys, step, plgpu.layout_cast(jnp.zeros((BQ, FC), dt), WG))
    o_s[...] = acc.astype(jnp.float32)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_s, o_g.at[jax.lax.axis_index('p')])
    plgpu.wait_smem_to_gmem(0)

  f32 = jnp.float32
  tr = (plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128))  # as the kernels' float32 tiles
  return plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((PROGRAMS, BQ, FC), f32),
                      scratch_types=[plgpu.SMEM((BQ, FC), f32, transforms=tr), plgpu.SMEM((ROWS, FC), dt),
                                     plgpu.SMEM((BQ, FC), f32, transforms=tr),
                                     plgpu.Barrier(num_barriers=2)],
                      grid=(PROGRAMS,), grid_names=('p',), compiler_params=plgpu.CompilerParams(approx_math=True),
                      kernel_name=f'gelu_{jnp.dtype(dt).name}_{keys}')


def main():
  rng = np.random.default_rng(0)
  u = rng.normal(0.0, 1.0, (BQ, FC)).astype(np.float32)
  w = rng.normal(0.0, 1.0, (ROWS, FC)).astype(np.float32)
  h = u.astype(np.float64) + w[0].astype(np.float64)  # key 0's pairs: [BQ, FC]
  ref = 0.5 * h * (1 + np.tanh(C * (h + A * h ** 3)))
  gpu = jax.default_backend() == 'gpu'
  out = {'jax': jax.__version__, 'device': jax.devices()[0].device_kind, 'keys': KEYS, 'programs': PROGRAMS,
         'variants': {}}
  for dt in (jnp.float32, jnp.float16, jnp.bfloat16):
    name = jnp.dtype(dt).name
    call = jax.jit(build(dt))
    args = (jnp.asarray(u), jnp.asarray(w, dt))
    if not gpu:
      call.trace(*args).lower(lowering_platforms=('cuda',))
      print(name, 'lowers for cuda')
      continue
    one = np.asarray(jax.jit(build(dt, 1))(*args)[0], np.float64)  # one key: the GELU itself, in this dtype
    call(*args).block_until_ready()
    ms = []
    for _ in range(20):
      t0 = time.perf_counter()
      call(*args).block_until_ready()
      ms.append(1e3 * (time.perf_counter() - t0))
    med = statistics.median(ms)
    out['variants'][name] = {'ms': med, 'gelu_per_s': PROGRAMS * KEYS * BQ * FC / (med * 1e-3),
                             'max_abs_err': float(np.max(np.abs(one - ref))),
                             'max_rel_err_of_max': float(np.max(np.abs(one - ref)) / np.max(np.abs(ref)))}
    print(name, out['variants'][name], flush=True)
  if gpu:
    with open(os.path.join(os.environ.get('OUT', '.'), 'gelu_packed.json'), 'w') as f:
      json.dump(out, f, indent=1)


if __name__ == '__main__':
  main()
