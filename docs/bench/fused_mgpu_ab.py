"""GPU (Hopper): one layer's Mosaic GPU forward and backward, this checkout's kernels against an earlier commit's, in
one process (B16 T299 N2 H32, RoPE, float32; kv_hidden 64 and 256; default Options, approx_math on in both; three
rounds of old and new, median of 30 calls each). Writes $OUT/ab.json after each measurement. The earlier kernels are
read from git into scratch/ (the command below), the old backward made to import the old forward:

  mkdir -p scratch && git show 9cd3d75:selattn/model/fused_mgpu.py > scratch/old_fwd.py && \
    git show 9cd3d75:selattn/model/fused_mgpu_bwd.py | \
    sed 's/from selattn.model import fused_mgpu as fm/import old_fwd as fm/' > scratch/old_bwd.py && \
    OUT=. PYTHONPATH=$PWD python3 docs/bench/fused_mgpu_ab.py

Recorded on one H200 (jax 0.11.2, 2026-12-01, 9cd3d75 against 2c86c37): docs/bench/fused_mgpu_ab_h200.json. On
2026-12-02 (the old kernels from the commit named first): fused_mgpu_ab_gelu_h200.json (0bc899e against the tree
that became 6feb3bb, before its key kernel took one head a program first), fused_mgpu_ab_overlap_h200.json (6feb3bb
against 6feb3bb plus docs/bench/fused_mgpu_overlap.diff), fused_mgpu_ab_kps_h200.json (0bc899e against 41a8415).
"""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.getcwd(), 'scratch'))
import bench_record  # noqa: E402 (docs/bench, the script's folder)
import jax  # noqa: E402
import old_bwd  # noqa: E402
import old_fwd  # noqa: E402

from selattn.model import fused_mgpu as fm  # noqa: E402
from selattn.model import fused_mgpu_bwd as fmb  # noqa: E402

out = {'jax': jax.__version__, 'device': jax.devices()[0].device_kind, 'items': []}


def save():
  with open(os.path.join(os.environ.get('OUT', '.'), 'ab.json'), 'w') as f:
    json.dump(out, f, indent=1)


for f in (64, 256):
  scale, fargs, bargs = bench_record.mgpu_layer(f, 16, 299, 2, 32)
  fns = {'fwd new': jax.jit(lambda *a: fm.forward(*a, scale=scale)),
         'fwd old': jax.jit(lambda *a: old_fwd.forward(*a, scale=scale, opts=old_fwd.Options(approx_math=True))),
         'bwd new': jax.jit(lambda *a: fmb.backward(*a, scale=scale)),
         'bwd old': jax.jit(lambda *a: old_bwd.backward(*a, scale=scale))}
  for rep in range(3):
    for name, fn in fns.items():
      args = fargs if name.startswith('fwd') else bargs
      ms = bench_record.median_ms(fn, args, 30)
      out['items'].append({'f': f, 'name': name, 'rep': rep, 'ms': ms})
      save()
      print(f, name, rep, round(ms, 4), flush=True)
