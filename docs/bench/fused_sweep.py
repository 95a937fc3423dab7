"""GPU: per-layer times of the fused MLP-generator kernels over tile sizes, warps and backward kernels.

One selective layer at the original config's shapes (B16 T299 N2 H32, RoPE), the MLP generator at each
kv_hidden, forward alone and forward + backward (the gradients of every input), with `blockwise` at 320x320 tiles
as the baseline in the same process. Writes one JSON line per variant to $OUT/fused_sweep.jsonl as it goes (a
variant that fails to compile is recorded with its error). From the repo root, on a GPU machine:

  PYTHONPATH=$PWD OUT=. python docs/bench/fused_sweep.py [--quick]

SWEEP_SET=stages sweeps the Triton pipeline stages (1-3) at 8 and 4 warps; SWEEP_SET=shapes tiles of 256-1024
pairs by 16 or 32 hidden units (8 warps); SWEEP_SET=tall tall tiles (1-4 queries by 32-128 keys, the backward's
query tiles dealt to several programs). These three run every form at the first kv_hidden before the next.
SWEEP_SET=par sweeps the parallelism of the merged kernels instead (heads per program, forward and backward
splits; Blocks' fields) at 8 and 4 warps. The shape and the rest come from the environment: SWEEP_B, SWEEP_T,
SWEEP_N, SWEEP_H, SWEEP_F (comma-separated kv_hidden values), SWEEP_DTYPE, SWEEP_ITERS (timed calls per
variant), SWEEP_BLOCKWISE=0 (no baseline). The long-context layer of
`bench --workload long-mlp`, for example:

  SWEEP_SET=par SWEEP_B=4 SWEEP_T=4096 SWEEP_N=4 SWEEP_H=64 SWEEP_F=256 SWEEP_DTYPE=bfloat16 SWEEP_ITERS=3 \
    PYTHONPATH=$PWD OUT=. python docs/bench/fused_sweep.py
"""
import json
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from bench_record import median_ms
from selattn.model import attention as attn_lib
from selattn.model import fused

OUT = os.environ.get('OUT', '.')
ENV = os.environ.get
B, T = int(ENV('SWEEP_B', 16)), int(ENV('SWEEP_T', 299))  # small ones: a CPU try
N, H = int(ENV('SWEEP_N', 2)), int(ENV('SWEEP_H', 32))
D = N * H
ITERS = int(ENV('SWEEP_ITERS', 20))


def inputs(f, dtype):
  ks = jax.random.split(jax.random.key(f), 7)
  p = {'w1': jax.random.normal(ks[0], (2 * D, f)) / np.sqrt(2 * D), 'b1': 0.1 * jax.random.normal(ks[1], (f,)),
       'w2': jax.random.normal(ks[2], (f, 2 * D)) / np.sqrt(f), 'b2': 0.1 * jax.random.normal(ks[3], (2 * D,))}
  q, x = jax.random.normal(ks[4], (B, T, N, H)), jax.random.normal(ks[5], (B, T, D))
  cot = jax.random.normal(ks[6], (B, T, N, H))
  cast = lambda t: jax.tree.map(lambda a: a.astype(dtype), t)
  return cast(p), cast(q), cast(x), cot


def layer(impl, blocks):
  pos = jnp.arange(T)

  def out(p, q, x):
    if impl == 'blockwise':
      return attn_lib.selective_blockwise(attn_lib.MlpKV, p, q, x, pos, pos, 10000.0, 320, 320)
    return attn_lib.selective_fused(attn_lib.MlpKV, attn_lib.MlpKV.fused_params(p), q, x, pos, pos, 10000.0, blocks)

  def loss(p, q, x, cot):
    return jnp.sum(out(p, q, x).astype(jnp.float32) * cot)

  return jax.jit(out), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def pair_flops(f):
  """One pass of the key layer (K_ij = W2k^T g_ij, multiply-adds x 2) over every causal pair of one layer. The
  caller counts 4 passes, the minimum with recomputation (forward; backward: recomputed keys, dg = W2k dK, dW2k):
  merged does 4, split 6, so for split the rate is a lower bound."""
  pairs = B * T * (T + 1) / 2
  return pairs * 2 * f * D


def main():
  quick = '--quick' in sys.argv
  if ENV('SWEEP_SET', 'tiles') == 'par':  # (heads per program, forward splits, backward splits, warps)
    configs = [dict(heads_per_program=hp, fwd_splits=ks, bwd_splits=qs, num_warps=wp)
               for hp, ks, qs, wp in [(0, 1, 1, 8), (1, 1, 1, 8), (0, 2, 2, 8), (1, 2, 2, 8), (1, 4, 4, 8),
                                      (1, 2, 2, 4), (1, 4, 4, 4), (1, 8, 8, 8)]]
  elif ENV('SWEEP_SET') == 'stages':  # Triton pipeline stages of the loops' loads (warps, stages)
    configs = [dict(num_warps=w, num_stages=st) for w, st in [(8, 1), (8, 2), (8, 3), (4, 2), (4, 3)]]
  elif ENV('SWEEP_SET') == 'shapes':  # more pairs a tile, fewer hidden units a chunk (block_q, block_k, block_f)
    configs = [dict(block_q=q, block_k=k, block_f=f) for q, k, f in
               [(16, 16, 32), (16, 16, 16), (32, 16, 16), (16, 32, 16), (32, 32, 16), (32, 16, 32), (16, 32, 32)]]
  elif ENV('SWEEP_SET') == 'tall':  # few queries by many keys: (block_q, block_k, block_f, warps, bwd_splits)
    configs = [dict(zip(('block_q', 'block_k', 'block_f', 'num_warps', 'bwd_splits'), c)) for c in
               [(16, 16, 32, 8, 1), (1, 64, 32, 8, 4), (1, 64, 32, 4, 4), (1, 32, 32, 4, 4), (2, 32, 32, 8, 2),
                (1, 128, 32, 8, 4), (4, 32, 32, 8, 1), (1, 64, 64, 8, 4), (1, 64, 32, 8, 1)]]
  else:  # (block_q, block_k, block_f, warps, stages, backward)
    configs = [dict(zip(('block_q', 'block_k', 'block_f', 'num_warps', 'num_stages', 'backward'), c)) for c in
               [(16, 16, 32, 4, 1, 'split'), (16, 16, 32, 4, 1, 'merged'), (16, 16, 32, 8, 1, 'split'),
                (16, 16, 32, 8, 1, 'merged'), (16, 16, 64, 4, 1, 'split'), (16, 16, 64, 4, 1, 'merged'),
                (16, 16, 64, 8, 1, 'merged'), (16, 16, 16, 4, 1, 'merged')]]
  hiddens, dt = [int(f) for f in ENV('SWEEP_F', '64,256').split(',')], ENV('SWEEP_DTYPE', 'float32')
  # In order of interest: a time limit cuts the tail.
  variants = [(f, dt, 'blockwise', None) for f in hiddens] if ENV('SWEEP_BLOCKWISE', '1') == '1' else []
  if ENV('SWEEP_SET') in ('tall', 'stages', 'shapes'):  # each form at one kv_hidden, then the next
    variants += [(f, dt, 'fused', fused.Blocks(**c)) for f in hiddens for c in configs]
  else:
    for c in configs[:3] if quick else configs:
      variants += [(f, dt, 'fused', fused.Blocks(**c)) for f in hiddens]
  path = os.path.join(OUT, 'fused_sweep.jsonl')
  with open(path, 'a') as fh:
    for f, dt, impl, blocks in variants:
      rec = {'kv_hidden': f, 'dtype': dt, 'impl': impl, 'B': B, 'T': T, 'N': N, 'H': H,
             'blocks': None if blocks is None else blocks.__dict__, 'jax': jax.__version__,
             'device': jax.devices()[0].device_kind}
      try:
        fwd, grad = layer(impl, blocks)
        args = inputs(f, dt)
        t0 = time.perf_counter()
        jax.block_until_ready(grad(*args))
        rec['compile_s'] = time.perf_counter() - t0
        rec['fwd_ms'] = median_ms(fwd, args[:3], ITERS)
        rec['fwd_bwd_ms'] = median_ms(grad, args, ITERS)
        rec['key_layer_tflops'] = pair_flops(f) * 4 / (rec['fwd_bwd_ms'] * 1e-3) / 1e12
      except Exception:  # noqa: BLE001 (a variant the compiler refuses is a result too)
        rec['error'] = traceback.format_exc()[-1500:]
      print(json.dumps(rec), flush=True)
      fh.write(json.dumps(rec) + '\n')
      fh.flush()


if __name__ == '__main__':
  main()
