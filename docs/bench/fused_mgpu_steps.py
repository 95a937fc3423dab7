"""GPU (Hopper): training steps with the Mosaic GPU forward (`model.fused_forward='mgpu'`) against the Triton one.

In one process, with selattn.bench.run_variant (the trainer's own step and data pipeline): the original config
(D64 L4 N2, context 299, batch 16, float32, flat AdamW, 10 steps a call), mlp generator at kv_hidden 64 and 256,
variants
  triton     `fused` as shipped (Triton forward, merged Triton backward): the baseline
  mgpu-fwd   the Mosaic GPU forward, the same Triton backward
  mgpu-both  the Mosaic GPU forward and backward (`model.fused_backward='mgpu'`), where this tree has one
interleaved over two rounds (the first variants of a process on a fresh GPU time slow), with the gradients of
every generator parameter, of q and of x against `materialized` at highest precision (B4 T299 N2 H32, RoPE, both
kv_hidden) and one layer's forward + backward alone (B16 T299, median of 20 calls). The MGPU backward comes
last (its kernels have not run on a GPU before: a fault there may leave the GPU unusable for the rest of the
process): triton and mgpu-fwd in two rounds, their gradients and layer times, then mgpu-both's first round,
gradients and layer time, then its second round beside the baseline's third. Each item is recorded even when it
fails (its error) and the script goes on; whether the MGPU kernels can run here at all (cannot_run) and any
fallback line logged are recorded too.
Writes $OUT/fused_mgpu_steps.json after every item. Off GPU it runs tiny shapes, interpreted (a smoke test).

  OUT=. PYTHONPATH=$PWD python3 docs/bench/fused_mgpu_steps.py

Compiling a step with the MGPU kernels took 37 s at kv_hidden 64 and 82 s at 256 on an H200, so the whole script
runs past its time budget (it then skips the remaining items, recorded as skipped). Environment variables choose
a part: HIDDEN (e.g. 64; default 64,256) and PARTS (any of steps, grads, layer; default all), e.g.
  OUT=. HIDDEN=64 PARTS=layer,steps PYTHONPATH=$PWD python3 docs/bench/fused_mgpu_steps.py
"""

import logging
import os
import traceback

import jax
import jax.numpy as jnp
import numpy as np

import bench_record
from bench_record import median_ms, rel
from selattn import bench
from selattn import config as config_lib
from selattn.model import attention as attn_lib
from selattn.model import fused
from selattn.model import fused_mgpu as fm

BUDGET_S = 320  # no new item past this: the whole call must end within 400 s
record = bench_record.Record('fused_mgpu_steps.json', BUDGET_S)
GPU = jax.default_backend() == 'gpu'
res = record.res
res.update(items=[], fallback_lines=[])


class _Lines(logging.Handler):
  def emit(self, record):
    msg = record.getMessage()
    if 'fused_forward' in msg or 'selective_impl=fused' in msg:
      res['fallback_lines'].append(msg)


logging.getLogger().addHandler(_Lines())


def item(name, body):
  part = 'grads' if 'gradients' in name else 'layer' if 'one layer' in name else 'steps' if 'steps' in name else ''
  if part and part not in PARTS:
    return
  record.item(name, body)


VARIANTS = {'triton': {'model.fused_forward': 'triton', 'model.fused_backward': 'merged'},
            'mgpu-fwd': {'model.fused_forward': 'mgpu', 'model.fused_backward': 'merged'}}
if 'mgpu' in getattr(config_lib, 'FUSED_BACKWARDS', ()):
  VARIANTS['mgpu-both'] = {'model.fused_forward': 'mgpu', 'model.fused_backward': 'mgpu'}
BASE = {'model.num_layers': 4, 'train.steps_per_call': 10, 'train.flat_optimizer': True, 'model.kv_generator': 'mlp',
        'model.dtype': 'float32', 'model.selective_impl': 'fused'}
HIDDEN = tuple(int(x) for x in os.environ.get('HIDDEN', '64,256').split(','))
PARTS = set(os.environ.get('PARTS', 'steps,grads,layer').split(','))
STEPS = 30
B, T, N, H = 4, 299, 2, 32  # gradient check
if not GPU:  # tiny and few: every interpreted kernel call takes seconds
  BASE.update({'model.num_layers': 1, 'model.d_model': 32, 'model.num_heads': 2, 'data.seq_len': 16,
               'train.batch_size': 1, 'train.steps_per_call': 1})
  HIDDEN, STEPS, (B, T, N, H) = (16,), 1, (1, 37, 2, 8)
res['config'] = {'base': BASE, 'variants': VARIANTS, 'steps': STEPS, 'grad_shapes': f'B{B} T{T} N{N} H{H}, RoPE',
                 'hidden': HIDDEN, 'parts': sorted(PARTS)}


def can_run(f):
  scale, args = fm.fused_inputs(jnp.zeros((16, 299, 2, 32)), jnp.zeros((16, 299, f)), jnp.zeros((16, 299, f)),
                                jnp.zeros((f, 64)), jnp.zeros((64,)), jnp.arange(299), jnp.arange(299), 1e4)
  del scale
  why = fm.cannot_run('gelu', not GPU, args[0], args[2])
  d = fm._dims(args[0], args[2], fm.Options())
  out = {}
  if 'mgpu-both' in VARIANTS:
    from selattn.model import fused_mgpu_bwd as fmb  # pylint: disable=g-import-not-at-top
    db = fmb._dims(args[0], args[2])
    out = {'backward_cannot_run': fmb.cannot_run('gelu', not GPU, args[0], args[2]),
           'backward_blocks': str(db)}
  return {**out, 'cannot_run': why, 'block_k': d.kb, 'smem_bytes': fm._smem_bytes(d),
          'compute_capability': str(getattr(jax.devices()[0], 'compute_capability', None))}


def step(f, variant):
  def body():
    r = bench.run_variant(f'{variant}-h{f}', {**BASE, 'model.kv_hidden': f, **VARIANTS[variant]}, 1, STEPS, '')
    keep = ('ms_per_step', 'ms_per_step_synced_median', 'temp_mem_gib', 'compile_s', 'final_loss',
            'pair_tflops_per_s')
    return {k: r[k] for k in keep}
  return body


def layer_inputs(ks, b, t, n, h, f):
  """One layer's MLP generator parameters, q [B, T, N, H] and x [B, T, D], drawn from the keys ks[0..5]."""
  d = n * h
  p = {'w1': jax.random.normal(ks[0], (2 * d, f)) / np.sqrt(2 * d), 'b1': 0.3 * jax.random.normal(ks[1], (f,)),
       'w2': jax.random.normal(ks[2], (f, 2 * d)) / np.sqrt(f), 'b2': 0.3 * jax.random.normal(ks[3], (2 * d,))}
  return p, jax.random.normal(ks[4], (b, t, n, h)), jax.random.normal(ks[5], (b, t, d))


def layer_ms(f, names):
  """One selective layer's forward + backward (jit of the gradient), B16 T299 N2 H32 RoPE float32: median ms."""
  b, t, n, h = (16, 299, 2, 32) if GPU else (1, 37, 2, 8)
  p, q, x = layer_inputs(jax.random.split(jax.random.key(f + 1), 6), b, t, n, h, f)
  pos = jnp.arange(t)
  out = {}
  for variant in names:
    over = VARIANTS[variant]
    blocks = fused.Blocks(forward=over['model.fused_forward'], backward=over['model.fused_backward'])
    fp = attn_lib.MlpKV.fused_params(p)
    fn = jax.jit(jax.grad(lambda fp, q, x, blocks=blocks: jnp.sum(attn_lib.selective_fused(
        attn_lib.MlpKV, fp, q, x, pos, pos, 10000.0, blocks) ** 2), argnums=(0, 1, 2)))
    try:
      out[variant] = median_ms(fn, (fp, q, x), 20 if GPU else 2)
    except Exception:  # noqa: BLE001
      out[variant] = traceback.format_exc()[-1500:]
  return {'layer_fwd_bwd_ms': out}


def grads(f, names):
  ks = jax.random.split(jax.random.key(f), 7)
  p, q, x = layer_inputs(ks, B, T, N, H, f)
  cot = jax.random.normal(ks[6], (B, T, N, H))
  pos = jnp.arange(T)

  def value_and_grads(blocks):
    def loss(p, q, x):
      if blocks is None:
        out = attn_lib.selective_materialized(attn_lib.MlpKV, p, q, x, pos, pos, 10000.0)
      else:
        out = attn_lib.selective_fused(attn_lib.MlpKV, attn_lib.MlpKV.fused_params(p), q, x, pos, pos, 10000.0,
                                       blocks)
      return jnp.sum(out * cot), out
    (_, out), g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(p, q, x)
    return jax.device_get((out, g))

  with jax.default_matmul_precision('highest'):
    ref_out, (rp, rq, rx) = value_and_grads(None)
  out = {}
  for variant in names:
    over = VARIANTS[variant]
    blocks = fused.Blocks(forward=over['model.fused_forward'], backward=over['model.fused_backward'])
    try:
      o, (gp, gq, gx) = value_and_grads(blocks)
      out[variant] = {'out': rel(o, ref_out), **{k: rel(gp[k], rp[k]) for k in rp}, 'q': rel(gq, rq),
                      'x': rel(gx, rx)}
    except Exception:  # noqa: BLE001
      out[variant] = {'error': traceback.format_exc()[-1500:]}
  return {'rel_err_vs_materialized_highest': out}


for f in HIDDEN:
  item(f'F{f} can the MGPU kernels run here', lambda f=f: can_run(f))
for rnd in (1, 2):
  for f in HIDDEN:
    for variant in ('triton', 'mgpu-fwd'):
      item(f'round {rnd} F{f} {variant} steps', step(f, variant))
for f in HIDDEN:
  item(f'F{f} gradients vs materialized (triton, mgpu-fwd)', lambda f=f: grads(f, ('triton', 'mgpu-fwd')))
for f in HIDDEN:
  item(f'F{f} one layer forward + backward (triton, mgpu-fwd)', lambda f=f: layer_ms(f, ('triton', 'mgpu-fwd')))
if 'mgpu-both' in VARIANTS:
  for f in HIDDEN:
    item(f'round 1 F{f} mgpu-both steps', step(f, 'mgpu-both'))
  for f in HIDDEN:
    item(f'F{f} gradients vs materialized (mgpu-both)', lambda f=f: grads(f, ('mgpu-both',)))
  for f in HIDDEN:
    item(f'F{f} one layer forward + backward (mgpu-both)', lambda f=f: layer_ms(f, ('mgpu-both',)))
  for f in HIDDEN:
    item(f'round 3 F{f} triton steps', step(f, 'triton'))
    item(f'round 2 F{f} mgpu-both steps', step(f, 'mgpu-both'))
record.done()
