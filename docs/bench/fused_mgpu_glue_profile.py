"""GPU: where a training step's device time goes around the Mosaic GPU kernels, op by op (every op, not the top 40).

selattn.bench.run_variant, 30 steps at the original config with the mlp generator (both Mosaic GPU kernels, float32),
traced: selattn.perf.device_op_times with top=400, so each XLA fusion around the kernels is listed with its source
line. HID sets kv_hidden (default 256). ROWS (comma-separated) times the forward's Triton combine
(`fused_mgpu._combine_live`) with that many queries a block, one run each in this process; without it, one run as
the code stands. Writes $OUT/glue_h{HID}[_rows{R}].json after each run. Records (one H200, jax 0.11.2, 2026-12-03):
fused_mgpu_glue_v11_h200.json (at commit 4308f8d) and fused_mgpu_glue_v12a_h200.json (at e0da30e), both by an
earlier copy of this script that named its file glue.json,
fused_mgpu_combine_h200.json (ROWS=32,16 at 687c127, condensed to the kernels' times).

  HID=256 OUT=. PYTHONPATH=$PWD python3 docs/bench/fused_mgpu_glue_profile.py
  ROWS=32,16 OUT=. PYTHONPATH=$PWD python3 docs/bench/fused_mgpu_glue_profile.py
"""
import json
import os
import sys

sys.path.insert(0, os.getcwd())
from selattn import bench, perf  # noqa: E402
from selattn.model import fused_mgpu as fm  # noqa: E402

perf.device_op_times.__defaults__ = (400, None)  # top: every op
OUT, HID = os.environ['OUT'], int(os.environ.get('HID', '256'))
OVER = {'model.num_layers': 4, 'train.steps_per_call': 10, 'train.flat_optimizer': True, 'model.kv_generator': 'mlp',
        'model.dtype': 'float32', 'model.selective_impl': 'fused', 'model.fused_forward': 'mgpu',
        'model.fused_backward': 'mgpu', 'model.kv_hidden': HID}
for rows in [int(x) for x in os.environ['ROWS'].split(',')] if os.environ.get('ROWS') else [None]:
  if rows:
    fm._COMBINE_ROWS = rows  # pylint: disable=protected-access
  name = f'glue_h{HID}' + (f'_rows{rows}' if rows else '')
  r = bench.run_variant(name, OVER, 1, 30, '', profile_dir=f'/tmp/{name}')
  with open(os.path.join(OUT, f'{name}.json'), 'w') as f:
    json.dump({k: r[k] for k in ('ms_per_step', 'final_loss', 'profile') if k in r}, f, indent=1)
  print(name, 'ms/step', r['ms_per_step'], flush=True)
