"""GPU (Hopper): the Mosaic GPU backward (selattn/model/fused_mgpu_bwd.py) per layer, by its block options.

One selective layer's backward alone at the original config's shapes (B16 T299 N2 H32, RoPE, float32 inputs;
kv_hidden 64 and 256), on the forward's residuals (the MGPU forward's G and lse) and a random cotangent dG: the
median time of 20 calls after warm-up of fused.py's merged Triton backward and of the MGPU backward with each
`fused_mgpu_bwd.Options` that fits, and the largest relative error of each of the MGPU backward's five outputs
against its bfloat16 jnp transcription. Each item is recorded even when it fails (its error) and the script goes
on; $OUT/fused_mgpu_bwd_sweep.json is written after each. Off GPU: tiny shapes, interpreted (a smoke test).

  OUT=. PYTHONPATH=$PWD python3 docs/bench/fused_mgpu_bwd_sweep.py

Environment: FS (kv_hidden values, default 64,256), BUDGET_S (no new item past it, default 300) and OPTIONS
(instead of the built-in list, `;`-separated Options fields, e.g. OPTIONS='warpgroups=2;warpgroups=2,approx_math=True').
"""

import json
import os
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from selattn.model import fused
from selattn.model import fused_mgpu as fm
from selattn.model import fused_mgpu_bwd as fmb

OUT = os.environ.get('OUT', '.')
BUDGET_S = int(os.environ.get('BUDGET_S', 300))  # no new item past this
T0 = time.time()
GPU = jax.default_backend() == 'gpu'
B, T, N, H = (16, 299, 2, 32) if GPU else (1, 37, 2, 8)
FS = tuple(int(f) for f in os.environ.get('FS', '64,256').split(',')) if GPU else (40,)
CALLS = 20 if GPU else 1
INTERPRET = None if GPU else fm.interpreter()
res = {'jax': jax.__version__, 'device': jax.devices()[0].device_kind,
       'shapes': f'B{B} T{T} N{N} H{H}, RoPE, float32', 'items': []}


def save():
  with open(os.path.join(OUT, 'fused_mgpu_bwd_sweep.json'), 'w') as f:
    json.dump(res, f, indent=1)


def item(name, body):
  if time.time() - T0 > BUDGET_S:
    res['items'].append({'name': name, 'skipped': 'time budget'})
    save()
    return
  t = time.time()
  try:
    rec = {'name': name, **body()}
  except Exception:  # noqa: BLE001 (record any failure, go on)
    rec = {'name': name, 'error': traceback.format_exc()[-3000:]}
  rec['wall_s'] = round(time.time() - t, 1)
  res['items'].append(rec)
  print(json.dumps({k: v for k, v in rec.items() if k != 'error'}), rec.get('error', '')[-800:], flush=True)
  save()


def median_ms(fn, args):
  jax.block_until_ready(fn(*args))
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(CALLS):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return 1e3 * float(np.median(times))


def case(f):
  ks = jax.random.split(jax.random.key(f), 6)
  d = N * H
  scale, args = fm.fused_inputs(jax.random.normal(ks[0], (B, T, N, H)), 0.7 * jax.random.normal(ks[1], (B, T, f)),
                                0.7 * jax.random.normal(ks[2], (B, T, f)),
                                jax.random.normal(ks[3], (f, d)) / np.sqrt(f), 0.3 * jax.random.normal(ks[4], (d,)),
                                jnp.arange(T), jnp.arange(T), 10000.0)
  g, lse = jax.jit(lambda *a: fm.forward(*a, scale=scale, interpret=INTERPRET))(*args)
  dgo = jax.random.normal(ks[5], g.shape)
  args = (*args, g, lse, dgo)
  ref = jax.jit(lambda *a: fmb.transcription(*a, scale=scale))(*args)
  return scale, args, [np.asarray(r, np.float64) for r in ref]


cases = {}


def triton(f):
  scale, args, _ = cases[f]
  st = fm.triton_static(scale, N, f, interpret=not GPU)
  fn = jax.jit(lambda *a: fused._backward(st, a[:11], a[11])[:5])
  return {'ms': median_ms(fn, args)}


def mgpu(f, opts):
  scale, args, ref = cases[f]
  d = fmb._dims(args[0], args[2], opts)
  if isinstance(d, str):
    return {'cannot': d}
  fn = jax.jit(lambda *a: fmb.backward(*a, scale=scale, opts=opts, interpret=INTERPRET))
  got = fn(*args)
  errs = {}
  for k, a, r in zip(('dq', 'du', 'dw', 'dW2k', 'db2k'), got, ref):
    a = np.asarray(a, np.float64)
    errs[k] = float(np.abs(a - r).max() / np.abs(r).max())
  return {'blocks': {'block_k': d.kb, 'block_q': d.qb, 'heads_q': d.hq, 'heads_k': d.hk},
          'rel_err_vs_bf16_transcription': errs, 'ms': median_ms(fn, args)}


OPTIONS = [('default', fmb.Options()), ('keep_hidden=False', fmb.Options(keep_hidden=False)),
           ('approx_math', fmb.Options(approx_math=True)), ('warpgroups=2', fmb.Options(warpgroups=2)),
           ('warpgroups=2 approx_math', fmb.Options(warpgroups=2, approx_math=True)),
           ('block_k=32', fmb.Options(block_k=32)), ('block_q=32', fmb.Options(block_q=32)),
           ('heads_per_program=1', fmb.Options(heads_per_program=1)),
           ('warpgroups=2 heads_per_program=1', fmb.Options(warpgroups=2, heads_per_program=1))]
if os.environ.get('OPTIONS'):  # e.g. OPTIONS='warpgroups=2;warpgroups=2,approx_math=True'
  OPTIONS = [('default', fmb.Options())] + [
      (o, fmb.Options(**{k: int(v) if v.isdigit() else v == 'True' for k, v in (kv.split('=') for kv in o.split(','))}))
      for o in os.environ['OPTIONS'].split(';')]
for f in FS:  # all of one kv_hidden, then the next; the baseline again at the end (drift)
  item(f'F{f} inputs (MGPU forward)', lambda f=f: cases.__setitem__(f, case(f)) or {})
  if f not in cases:
    continue
  item(f'F{f} triton backward (merged)', lambda f=f: triton(f))
  for label, opts in OPTIONS:
    item(f'F{f} mgpu backward {label}', lambda f=f, opts=opts: mgpu(f, opts))
  item(f'F{f} triton backward (merged) again', lambda f=f: triton(f))
res['total_s'] = round(time.time() - T0, 1)
save()
print('done in', res['total_s'], 's')
