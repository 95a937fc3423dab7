"""GPU: device time per kernel (a jax.profiler trace, read back from its perfetto JSON) of one selective layer's
Mosaic GPU forward, Mosaic GPU backward and merged Triton backward at B16 T299 N2 H32, RoPE, float32 (kv_hidden 64
and 256; FS overrides), five calls each after warm-up; EXTRA adds backward Options (`;`-separated, e.g.
EXTRA='warpgroups=1'). Writes $OUT/prof.json after each item. Off GPU: tiny shapes, interpreted (a smoke test).

  OUT=. PYTHONPATH=$PWD python3 docs/bench/fused_mgpu_kernel_times.py

Records (one H200, jax 0.11.2): fused_mgpu_kernel_times_h200.json (2026-12-01); on 2026-12-02 with FS=256,
fused_mgpu_kernel_times_dk_h200.json (commit ebf14a7, EXTRA='du_by_keys=False': the backward before and after the
key kernel summed du) and fused_mgpu_kernel_times_holdw_h200.json (commit 8e8ea6b's kernels, but with hold_w on by
default as they ran then, and EXTRA='hold_w=False'); fused_mgpu_kernel_times_kh_h200.json (commit f8c0863's
kernels with a key_heads option added, EXTRA='key_heads=2,block_q=32;key_heads=2,warpgroups=1'),
fused_mgpu_kernel_times_spill_h200.json (a working tree before commit f98b58c: db2k still summed in the key kernel,
with f98b58c's overlap, logits_acc and hold_rope options) and fused_mgpu_kernel_times_db_h200.json (commit
f98b58c); the ptxas reports of those calls are in fused_mgpu_spill_h200.txt, with their commands. On 2026-12-03:
fused_mgpu_kernel_times_rounds_h200.json (FS=256, commit c88d04f, EXTRA='dw2_rounds=True'),
fused_mgpu_kernel_times_rope64_h200.json (FS=64, commit a517309 with a hold_rope option on by default,
EXTRA='hold_rope=False'; its ptxas report: fused_mgpu_spill_rope64_h200.txt) and
fused_mgpu_kernel_times_rope64b_h200.json (FS=64, the seventh version, EXTRA='hold_rope=True;keep_hidden=False');
fused_mgpu_kernel_times_holdw2_h200.json (FS=256, commit 376eb8f, EXTRA='hold_w=True'),
fused_mgpu_kernel_times_kh2a_h200.json (FS=256, the eighth version's code before its default changed,
EXTRA='key_heads=2,block_q=32') and fused_mgpu_kernel_times_kh2_h200.json (FS=256, with a dk_smem option since
removed, EXTRA='key_heads=2,block_q=32,dk_smem=True;dk_smem=True;key_heads=2,block_q=32'); their ptxas reports are
in fused_mgpu_spill_kh2_h200.txt. The ninth version's: fused_mgpu_kernel_times_v9_h200.json (FS=256, the tree of
commit 3a42863, EXTRA='wgmma_overlap=False,q_one_acc=False,dg_one_acc=False,du_block_rows=False;wgmma_overlap=False;
q_one_acc=False'), ptxas in fused_mgpu_spill_v9_h200.txt.
"""
import collections, glob, gzip, json, os, sys
import jax
sys.path.insert(0, os.getcwd())
import bench_record  # noqa: E402 (docs/bench, the script's folder)
from selattn.model import fused
from selattn.model import fused_mgpu as fm
from selattn.model import fused_mgpu_bwd as fmb

GPU = jax.default_backend() == 'gpu'
B, T, N, H = (16, 299, 2, 32) if GPU else (1, 37, 2, 8)
FS = tuple(int(x) for x in os.environ.get('FS', '64,256' if GPU else '40').split(','))
INTERP = None if GPU else fm.interpreter()
REC = bench_record.Record('prof.json', budget_s=float('inf'), error_tail=500)
REC.res['items'] = []


def case(f):
  return bench_record.mgpu_layer(f, B, T, N, H, INTERP)


def summarize(tdir):
  files = glob.glob(os.path.join(tdir, '**', '*perfetto*'), recursive=True) + glob.glob(os.path.join(tdir, '**', '*.trace.json.gz'), recursive=True)
  if not files:
    return {'files': os.listdir(tdir)}
  fn = max(files, key=os.path.getmtime)  # this trace's (the folder may hold an earlier run's)
  op = gzip.open if fn.endswith('.gz') else open
  tr = json.load(op(fn, 'rt'))
  evs = tr['traceEvents'] if isinstance(tr, dict) else tr
  pname, tname = {}, {}
  for e in evs:
    if e.get('ph') == 'M' and e.get('name') == 'process_name':
      pname[e['pid']] = e['args']['name']
    if e.get('ph') == 'M' and e.get('name') == 'thread_name':
      tname[(e['pid'], e['tid'])] = e['args']['name']
  agg = collections.defaultdict(lambda: [0, 0.0])
  for e in evs:
    if e.get('ph') == 'X' and 'dur' in e:
      p = pname.get(e['pid'], str(e['pid']))
      if 'GPU' in p or 'gpu' in p or 'stream' in tname.get((e['pid'], e['tid']), '').lower():
        a = agg[(p[:30], e['name'][:90])]
        a[0] += 1
        a[1] += float(e['dur'])
  rows = sorted(((v[1], v[0], k) for k, v in agg.items()), reverse=True)[:40]
  return {'procs': sorted(set(pname.values()))[:20], 'file': fn, 'gpu_events': [{'us_total': round(t, 1), 'count': c, 'proc': k[0], 'name': k[1]} for t, c, k in rows]}

def traced(name, fn, args, reps=5):
  def body():
    ms = bench_record.median_ms(fn, args, 10 if GPU else 1)
    tdir = os.path.join('/tmp/prof', name.replace(' ', '_'))
    with jax.profiler.trace(tdir, create_perfetto_trace=True):
      for _ in range(reps):
        jax.block_until_ready(fn(*args))
    return {'median_ms': ms, 'reps_in_trace': reps, **summarize(tdir)}
  REC.item(name, body)


for f in FS:
  scale, fargs, bargs = case(f)
  traced(f'F{f} mgpu forward', jax.jit(lambda *a: fm.forward(*a, scale=scale, interpret=INTERP)), fargs)
  traced(f'F{f} mgpu backward', jax.jit(lambda *a: fmb.backward(*a, scale=scale, interpret=INTERP)), bargs)
  if GPU:
    st = fm.triton_static(scale, N, f)
    traced(f'F{f} triton backward', jax.jit(lambda *a: fused._backward(st, a[:11], a[11])[:5]), bargs)
  for extra in os.environ.get('EXTRA', '').split(';'):
    if extra:
      opts = bench_record.options(fmb.Options, extra)
      traced(f'F{f} mgpu backward {extra}', jax.jit(lambda *a, o=opts: fmb.backward(*a, scale=scale, opts=o, interpret=INTERP)), bargs)
REC.done()
