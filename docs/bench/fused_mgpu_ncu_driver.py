"""GPU: one Mosaic GPU forward and backward call of a selective layer (B16 T299 N2 H32, RoPE, kv_hidden from FS,
backward Options from OPTS), for Nsight Compute to profile, e.g. (docs/bench/fused_mgpu_ncu_f64_h200.txt):

  FS=64 PYTHONPATH=$PWD ncu --kernel-name regex:selective_fused --launch-count 3 --set full --import-source no \
    --page details --print-units base python3 docs/bench/fused_mgpu_ncu_driver.py
"""
import os, sys
sys.path.insert(0, os.getcwd())
import jax, jax.numpy as jnp, numpy as np
from selattn.model import fused_mgpu as fm
from selattn.model import fused_mgpu_bwd as fmb
B, T, N, H = 16, 299, 2, 32
for f in [int(x) for x in os.environ.get('FS', '64').split(',')]:
  ks = jax.random.split(jax.random.key(f), 6)
  d = N * H
  scale, args = fm.fused_inputs(jax.random.normal(ks[0], (B, T, N, H)), 0.7 * jax.random.normal(ks[1], (B, T, f)),
                                0.7 * jax.random.normal(ks[2], (B, T, f)),
                                jax.random.normal(ks[3], (f, d)) / np.sqrt(f), 0.3 * jax.random.normal(ks[4], (d,)),
                                jnp.arange(T), jnp.arange(T), 10000.0)
  g, lse = jax.jit(lambda *a: fm.forward(*a, scale=scale))(*args)
  dgo = jax.random.normal(ks[5], g.shape)
  opts = eval('fmb.Options(' + os.environ.get('OPTS', '') + ')')
  out = jax.jit(lambda *a: fmb.backward(*a, scale=scale, opts=opts))(*args, g, lse, dgo)
  jax.block_until_ready(out)
  print('done', f, flush=True)
