"""GPU: one Mosaic GPU forward and backward call of a selective layer (B16 T299 N2 H32, RoPE, kv_hidden from FS,
backward Options from OPTS), for Nsight Compute to profile, e.g. (docs/bench/fused_mgpu_ncu_f64_h200.txt):

  FS=64 PYTHONPATH=$PWD ncu --kernel-name regex:selective_fused --launch-count 3 --set full --import-source no \
    --page details --print-units base python3 docs/bench/fused_mgpu_ncu_driver.py

At kv_hidden 256 (2026-12-03, commit 376eb8f) the key kernel alone, with its stall reasons and pipes
(docs/bench/fused_mgpu_ncu_key256_h200.txt; the full command is in BENCHMARKS.md, "eighth version"): FS=256 ncu
--kernel-name regex:bwd_key --launch-count 1 with the SpeedOfLight, SchedulerStats, WarpStateStats and
InstructionStats sections and --metrics; the query kernel (docs/bench/fused_mgpu_ncu_query256_h200.txt) with
--kernel-name regex:selective_fused_bwd --launch-count 2, whose second launch (the key kernel) ran past its time
limit.

FWD_ONLY=1 stops after the forward (which mgpu_layer runs first, for the backward's residuals): the forward at
kv_hidden 256 (2026-12-03, docs/bench/fused_mgpu_ncu_fwd256_h200.txt; command in BENCHMARKS.md, "eleventh version").
"""
import os, sys
sys.path.insert(0, os.getcwd())
import bench_record  # noqa: E402 (docs/bench, the script's folder)
import jax
from selattn.model import fused_mgpu_bwd as fmb
B, T, N, H = 16, 299, 2, 32
for f in [int(x) for x in os.environ.get('FS', '64').split(',')]:
  scale, _, args = bench_record.mgpu_layer(f, B, T, N, H)
  if os.environ.get('FWD_ONLY') == '1':
    jax.block_until_ready(args)
    print('done (forward)', f, flush=True)
    continue
  opts = bench_record.options(fmb.Options, os.environ.get('OPTS', ''))
  out = jax.jit(lambda *a: fmb.backward(*a, scale=scale, opts=opts))(*args)
  jax.block_until_ready(out)
  print('done', f, flush=True)
