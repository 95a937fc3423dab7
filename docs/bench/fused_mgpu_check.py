"""GPU (Hopper): the Mosaic GPU forward prototype (selattn/model/fused_mgpu.py) against fused.py's Triton forward.

At the original config's shapes (B16 T299 N2 H32, RoPE, float32 inputs; kv_hidden 64 and 256): max relative error
of G and max absolute error of the log-sum-exp against the Triton forward and against the exact float32
transcription, and the median time of 20 calls (after warm-up) of each forward. A kernel that fails to compile or
run is recorded with its error and the script goes on. Writes $OUT/fused_mgpu_check.json after each step.

  OUT=. PYTHONPATH=$PWD python3 docs/bench/fused_mgpu_check.py

FS sets the kv_hidden values (default 64,256), VARIANTS (`;`-separated labels) the variants run after the
defaults. Recorded on one H200 (jax 0.11.2, 2026-12-01):
docs/bench/fused_mgpu_check_h200.json (its printed lines in docs/bench/fused_mgpu_check_h200_log.txt); with the
logits-first variants and FS=256,128,64: docs/bench/fused_mgpu_check_lf_h200.json (and its _log.txt).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np

import bench_record
from bench_record import median_ms, rel
from selattn.model import fused
from selattn.model import fused_mgpu as fm

BUDGET_S = 150  # stop starting new items past this (the whole run must stay under 3 minutes)
record = bench_record.Record('fused_mgpu_check.json', BUDGET_S, error_tail=600)
item = record.item
res = record.res
res.update(shapes='B16 T299 N2 H32, RoPE, float32', items=[])


def inputs(seed, b, t, n, h, f):
  ks = jax.random.split(jax.random.key(seed), 5)
  d = n * h
  q = jax.random.normal(ks[0], (b, t, n, h))
  u = jax.random.normal(ks[1], (b, t, f)) * 0.7
  w = jax.random.normal(ks[2], (b, t, f)) * 0.7
  w2k = jax.random.normal(ks[3], (f, d)) / np.sqrt(f)
  b2k = 0.3 * jax.random.normal(ks[4], (d,))
  pos = jnp.arange(t)
  return fm.fused_inputs(q, u, w, w2k, b2k, pos, pos, 10000.0)


GPU = jax.default_backend() == 'gpu'
# Off GPU (a smoke test of this script): small shapes, both kernels interpreted.
B, T, N, H = (16, 299, 2, 32) if GPU else (1, 70, 2, 8)
FS = tuple(int(f) for f in os.environ.get('FS', '64,256').split(',')) if GPU else (40, 100)
INTERPRET = None
if not GPU:
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
  INTERPRET = InterpretGPUParams()
  res['shapes'] = f'B{B} T{T} N{N} H{H}, RoPE, float32 (CPU smoke test, interpreted)'
cases = {}


def run_mgpu(F, opts):
  scale, args = cases[F]['args']
  ref = cases[F]['ref']
  d = fm._dims(args[0], args[2], opts)
  f = jax.jit(lambda *a: fm.forward(*a, scale=scale, opts=opts, interpret=INTERPRET))
  g, lse = f(*args)
  g, lse = np.asarray(g), np.asarray(lse)
  out = {'block_k': d.kb, 'programs': d.b * d.n_q * d.n_kb * (d.n // d.hp)}
  for key in ('triton', 'exact'):
    if key in ref:
      out[f'G_rel_vs_{key}'] = rel(g[:, :T], ref[key][0][:, :T])
      out[f'lse_abs_vs_{key}'] = float(np.abs(lse - ref[key][1])[:, :, :T].max())
  out['ms'] = median_ms(f, args, 20 if GPU else 2)
  return out


def exact(F):
  scale, args = cases[F]['args']
  with jax.default_matmul_precision('highest'):
    g, lse = jax.jit(lambda *a: fm.transcription(*a, scale=scale, opts=fm.Options(precision='float32')))(*args)
  cases[F]['ref']['exact'] = (np.asarray(g), np.asarray(lse))
  return {}


def run_triton(F):
  scale, args = cases[F]['args']
  ref = cases[F]['ref']
  triton = jax.jit(lambda *a: fused._forward(fm.triton_static(scale, N, F, interpret=not GPU), *a))
  g, lse = triton(*args)
  ref['triton'] = (np.asarray(g), np.asarray(lse))
  out = {}
  if 'exact' in ref:
    out = {'G_rel_vs_exact': rel(g[:, :T], ref['exact'][0][:, :T]),
           'lse_abs_vs_exact': float(np.abs(np.asarray(lse) - ref['exact'][1])[:, :, :T].max())}
  return {**out, 'ms': median_ms(triton, args, 20 if GPU else 2)}


def overhead(F):
  # The XLA work around the kernel (operand layout, combining the key blocks' partial results) alone.
  scale, args = cases[F]['args']
  d = fm._dims(args[0], args[2], fm.Options())

  def prep_combine(*a):
    ops = fm._layout(d, *a)
    part = jnp.zeros((d.b, d.n_kb, d.tq, d.n, d.fp), jnp.float32) + ops[1][:, None, :, None, :1]
    ml = jnp.zeros((d.b, d.n_kb, d.n, d.tq), jnp.float32) + ops[7][None, None, None, :].astype(jnp.float32)
    return fm._combine(d, part, ml, ml + 1.0), ops[3].astype(jnp.bfloat16)

  return {'block_k': d.kb, 'ms': median_ms(jax.jit(prep_combine), args, 20 if GPU else 2)}


# First what matters: the references and the Triton forward (before any MGPU kernel: a kernel that faults may leave
# the GPU unusable for the rest of the process), the MGPU forward with its default options; then the variants,
# while the time budget lasts.
for F in FS:
  cases[F] = {'args': inputs(F, B, T, N, H, F), 'ref': {}}
  item(f'F{F} exact float32 transcription', lambda F=F: exact(F))
  item(f'F{F} triton forward (fused.Blocks())', lambda F=F: run_triton(F))
for F in FS:
  item(f'F{F} mgpu forward (default Options)', lambda F=F: run_mgpu(F, fm.Options()))
for F in FS:
  item(f'F{F} mgpu layout + combine only (default block_k)', lambda F=F: overhead(F))
# The variants, most informative first, each at both sizes before the next (the budget may cut the tail).
# Two warpgroups per program last: interpreted on CPU they sometimes hung (see tests/fused_mgpu_test.py), so they
# are skipped there, and on a GPU a hang there loses only what comes after (the JSON is written after each item).
variants = [('one pass', {'logits_first': False}), ('logits first, warpgroups=1', {'logits_first': True, 'warpgroups': 1}),
            ('logits first, warpgroups=2', {'logits_first': True, 'warpgroups': 2}),
            ('approx_math', {'approx_math': True}), ('heads_per_program=1', {'heads_per_program': 1}),
            ('keep_q', {'keep_q': True}), ('keep_u', {'keep_u': True})]
variants += [(f'block_k={k}', {'block_k': k}) for k in (32, 128, 256)]
variants += [('warpgroups=2 heads_per_program=1', {'warpgroups': 2, 'heads_per_program': 1}),
             ('warpgroups=2', {'warpgroups': 2}), ('keys_per_step=2', {'keys_per_step': 2}),
             ('keys_per_step=4', {'keys_per_step': 4})]
if os.environ.get('VARIANTS'):  # only these labels, `;`-separated (e.g. VARIANTS='keys_per_step=2;keys_per_step=4')
  variants = [v for v in variants if v[0] in os.environ['VARIANTS'].split(';')]
for label, kw in variants:
  for F in FS:
    if not GPU and kw.get('warpgroups', 1) > 1:
      continue
    shape_args = cases[F]['args'][1]
    d = fm._dims(shape_args[0], shape_args[2], fm.Options(**kw))
    if fm.unsupported(d) or (label.startswith('block_k') and d.kb == fm._dims(shape_args[0], shape_args[2],
                                                                               fm.Options()).kb):
      continue
    item(f'F{F} mgpu forward {label}', lambda F=F, kw=kw: run_mgpu(F, fm.Options(**kw)))

record.done()
