"""GPU (Hopper): the Mosaic GPU backward (selattn/model/fused_mgpu_bwd.py) per layer, by its block options.

One selective layer's backward alone at the original config's shapes (B16 T299 N2 H32, RoPE, float32 inputs;
kv_hidden 64 and 256), on the forward's residuals (the MGPU forward's G and lse) and a random cotangent dG: the
median time of 20 calls after warm-up of fused.py's merged Triton backward and of the MGPU backward with each
`fused_mgpu_bwd.Options` that fits, and the largest relative error of each of the MGPU backward's five outputs
against its bfloat16 jnp transcription. Each item is recorded even when it fails (its error) and the script goes
on; $OUT/fused_mgpu_bwd_sweep.json is written after each. Off GPU: tiny shapes, interpreted (a smoke test).

  OUT=. PYTHONPATH=$PWD python3 docs/bench/fused_mgpu_bwd_sweep.py

Environment: FS (kv_hidden values, default 64,256), BUDGET_S (no new item past it, default 300) and OPTIONS
(instead of the built-in list, `;`-separated Options fields, e.g. OPTIONS='warpgroups=2;warpgroups=2,approx_math=True';
values as bench_record.options reads them). The ninth version's record: fused_mgpu_bwd_sweep_v9_h200.json.
"""

import os

import bench_record
import jax
import numpy as np

from selattn.model import fused
from selattn.model import fused_mgpu as fm
from selattn.model import fused_mgpu_bwd as fmb

GPU = jax.default_backend() == 'gpu'
B, T, N, H = (16, 299, 2, 32) if GPU else (1, 37, 2, 8)
FS = tuple(int(f) for f in os.environ.get('FS', '64,256').split(',')) if GPU else (40,)
CALLS = 20 if GPU else 1
INTERPRET = None if GPU else fm.interpreter()
REC = bench_record.Record('fused_mgpu_bwd_sweep.json', budget_s=int(os.environ.get('BUDGET_S', 300)))
REC.res.update({'shapes': f'B{B} T{T} N{N} H{H}, RoPE, float32', 'items': []})
item = REC.item


def median_ms(fn, args):
  return bench_record.median_ms(fn, args, CALLS)


def case(f):
  scale, _, args = bench_record.mgpu_layer(f, B, T, N, H, INTERPRET)
  return scale, args, {}


def reference(f, du_heads):
  """The bf16 transcription, du as the kernels sum it (du_heads: the key kernel's heads a program, 0: exact)."""
  scale, args, refs = cases[f]
  if du_heads not in refs:
    ref = jax.jit(lambda *a: fmb.transcription(*a, scale=scale, du_heads=du_heads))(*args)
    refs[du_heads] = [np.asarray(r, np.float64) for r in ref]
  return refs[du_heads]


cases = {}


def triton(f):
  scale, args, _ = cases[f]
  st = fm.triton_static(scale, N, f, interpret=not GPU)
  fn = jax.jit(lambda *a: fused._backward(st, a[:11], a[11])[:5])
  return {'ms': median_ms(fn, args)}


def mgpu(f, opts):
  scale, args, _ = cases[f]
  d = fmb._dims(args[0], args[2], opts)
  if isinstance(d, str):
    return {'cannot': d}
  ref = reference(f, d.hk if d.kdu else 0)
  fn = jax.jit(lambda *a: fmb.backward(*a, scale=scale, opts=opts, interpret=INTERPRET))
  got = fn(*args)
  errs = {}
  for k, a, r in zip(('dq', 'du', 'dw', 'dW2k', 'db2k'), got, ref):
    errs[k] = bench_record.rel(a, r)
  return {'blocks': {'block_k': d.kb, 'block_q': d.qb, 'heads_q': d.hq, 'heads_k': d.hk, 'warpgroups': d.wgs},
          'rel_err_vs_bf16_transcription': errs, 'ms': median_ms(fn, args)}


OPTIONS = [('default', fmb.Options()), ('keep_hidden=False', fmb.Options(keep_hidden=False)),
           ('approx_math', fmb.Options(approx_math=True)), ('warpgroups=2', fmb.Options(warpgroups=2)),
           ('warpgroups=2 approx_math', fmb.Options(warpgroups=2, approx_math=True)),
           ('block_k=32', fmb.Options(block_k=32)), ('block_q=32', fmb.Options(block_q=32)),
           ('heads_per_program=1', fmb.Options(heads_per_program=1)),
           ('warpgroups=2 heads_per_program=1', fmb.Options(warpgroups=2, heads_per_program=1))]
if os.environ.get('OPTIONS'):  # e.g. OPTIONS='warpgroups=2;warpgroups=2,approx_math=True'
  OPTIONS = [('default', fmb.Options())] + [
      (o, bench_record.options(fmb.Options, o))
      for o in os.environ['OPTIONS'].split(';')]
for f in FS:  # all of one kv_hidden, then the next; the baseline again at the end (drift)
  item(f'F{f} inputs (MGPU forward)', lambda f=f: cases.__setitem__(f, case(f)) or {})
  if f not in cases:
    continue
  item(f'F{f} triton backward (merged)', lambda f=f: triton(f))
  for label, opts in OPTIONS:
    item(f'F{f} mgpu backward {label}', lambda f=f, opts=opts: mgpu(f, opts))
  item(f'F{f} triton backward (merged) again', lambda f=f: triton(f))
REC.done()
