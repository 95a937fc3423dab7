"""GPU: training steps (selattn.bench.run_variant, 30 steps) at the original config with the mlp generator, by
kernel variant: triton (the Triton forward and merged backward) and mgpu-both (both Mosaic GPU kernels), the
latter with `+`-joined modifiers: wg2 / bq32 / bk32 / blf (the backward's warpgroups=2, block_q=32, block_k=32,
logits_first), fapprox
/ fwg2 / flf (the forward's approx_math, warpgroups=2, logits_first), nogemm
(train.xla_options=xla_gpu_enable_triton_gemm=false). Every modifier not named is set to its off value
(warpgroups=1, approx_math=False and logits_first=False in the forward; logits_first=False in the backward),
whatever the Options defaults are. `mgpu` is both Mosaic GPU kernels at their Options defaults, with `+`-joined
modifiers b:NAME=VALUE / f:NAME=VALUE setting one backward / forward Options field on top (e.g. mgpu+b:key_heads=1).
HIDDEN (kv_hidden values), VARIANTS (comma-separated), PROF=1 (default) also traces the steps
(selattn.perf.device_op_times: device time per op). Writes $OUT/step_prof.json after each variant. Records of the
`mgpu` form (one H200, jax 0.11.2, 2026-12-03): fused_mgpu_step_variants_v9_h200.json and
fused_mgpu_step_variants_kh_h200.json (the commands in BENCHMARKS.md, "The Mosaic GPU kernels, ninth version"),
fused_mgpu_step_variants_gmem_h200.json, _kv64_h200.json and _t2048_h200.json ("tenth version").

  PROF=0 HIDDEN=256 VARIANTS=triton,mgpu,mgpu+b:key_heads=1 OUT=. PYTHONPATH=$PWD \
    python3 docs/bench/fused_mgpu_step_variants.py

  PROF=0 HIDDEN=64 VARIANTS=triton,mgpu-both+wg2,mgpu-both+wg2+fapprox OUT=. PYTHONPATH=$PWD \
    python3 docs/bench/fused_mgpu_step_variants.py

CTX=T,B sets the context and batch (fused_mgpu_step_variants_t2048_h200.json: CTX=2048,4 HIDDEN=256
VARIANTS=mgpu,triton). The `mgpu` Options go to the kernels and to their cannot_run (fused.py's fallback check).
"""
import os, sys
sys.path.insert(0, os.getcwd())
import bench_record  # noqa: E402 (docs/bench, the script's folder)
from selattn import bench
from selattn.model import fused_mgpu as fm
from selattn.model import fused_mgpu_bwd as fmb

PROF = os.environ.get('PROF', '1') == '1'
BASE = {'model.num_layers': 4, 'train.steps_per_call': 10, 'train.flat_optimizer': True, 'model.kv_generator': 'mlp',
        'model.dtype': 'float32', 'model.selective_impl': 'fused'}
MGPU = {'model.fused_forward': 'mgpu', 'model.fused_backward': 'mgpu'}
VAR = {'triton': {'model.fused_forward': 'triton', 'model.fused_backward': 'merged'}, 'mgpu-both': MGPU, 'mgpu': MGPU}


def fields(mods, prefix):
  """The modifiers `prefix`NAME=VALUE as bench_record.options' comma-separated fields."""
  return ','.join(m[len(prefix):] for m in mods if m.startswith(prefix))

# CTX=T,B: context T and batch B instead of the original config's 299 and 16.
CTX = dict(zip(('data.seq_len', 'train.batch_size'), map(int, os.environ.get('CTX', '').split(',')))) \
    if os.environ.get('CTX') else {}
KEEP = ('ms_per_step', 'ms_per_step_synced_median', 'compile_s', 'final_loss', 'pair_tflops_per_s', 'profile')
REC = bench_record.Record('step_prof.json', budget_s=float('inf'), error_tail=400)
REC.res['items'] = []
for f in [int(x) for x in os.environ.get('HIDDEN', '64').split(',')]:
  for v in os.environ.get('VARIANTS', 'triton,mgpu-both').split(','):
    base, *mods = v.split('+')
    over = {**BASE, 'model.kv_hidden': f, **VAR[base], **CTX}
    if base == 'mgpu':
      fmb.backward.__kwdefaults__['opts'] = bench_record.options(fmb.Options, fields(mods, 'b:'))
      fm.forward.__kwdefaults__['opts'] = bench_record.options(fm.Options, fields(mods, 'f:'))
    else:
      fmb.backward.__kwdefaults__['opts'] = fmb.Options(warpgroups=2 if 'wg2' in mods else 1,
                                                        block_q=32 if 'bq32' in mods else 0,
                                                        block_k=32 if 'bk32' in mods else 0,
                                                        logits_first='blf' in mods)
      fm.forward.__kwdefaults__['opts'] = fm.Options(approx_math='fapprox' in mods,
                                                     warpgroups=2 if 'fwg2' in mods else 1, logits_first='flf' in mods)
    # fused.py asks cannot_run whether the kernels take a call, with these Options too.
    fm.cannot_run.__defaults__ = (fm.forward.__kwdefaults__['opts'],)
    fmb.cannot_run.__defaults__ = (fmb.backward.__kwdefaults__['opts'],)
    if 'nogemm' in mods:
      over['train.xla_options'] = 'xla_gpu_enable_triton_gemm=false'

    def body(v=v, f=f, over=over):
      r = bench.run_variant(f'{v}-h{f}', over, 1, 30, '', profile_dir='/tmp/sp' if PROF else None)
      return {k: r[k] for k in KEEP if k in r}

    REC.item(f'{v} F{f}', body)
REC.done()
