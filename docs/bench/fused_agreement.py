"""GPU: fused kernel agreement (TF32 / bf16) against materialized at highest precision, and per-layer timings."""
import functools, json, os, sys, time, traceback
import jax, jax.numpy as jnp, numpy as np
from selattn.model import attention as A, fused

OUT = os.environ.get('OUT', '/tmp')
res = {'jax': jax.__version__, 'device': jax.devices()[0].device_kind, 'checks': [], 'timings': []}
def save():
  json.dump(res, open(f'{OUT}/check.json', 'w'), indent=1)

def mk(seed, B, T, N, H, F):
  D = N * H
  ks = jax.random.split(jax.random.key(seed), 8)
  p = {'w1': jax.random.normal(ks[0], (2*D, F)) / np.sqrt(2*D), 'b1': jax.random.normal(ks[1], (F,)) * 0.1,
       'w2': jax.random.normal(ks[2], (F, 2*D)) / np.sqrt(F), 'b2': jax.random.normal(ks[3], (2*D,)) * 0.1}
  q = jax.random.normal(ks[4], (B, T, N, H)); x = jax.random.normal(ks[5], (B, T, D))
  return p, q, x

def run(impl, p, q, x, rope, blocks=fused.Blocks(), bw=320):
  pos = jnp.arange(q.shape[1])
  rc = 10000.0 if rope else None
  if impl == 'materialized':
    return A.selective_materialized(A.MlpKV, p, q, x, pos, pos, rc)
  if impl == 'blockwise':
    return A.selective_blockwise(A.MlpKV, p, q, x, pos, pos, rc, bw, bw)
  return A.selective_fused(A.MlpKV, A.MlpKV.fused_params(p), q, x, pos, pos, rc, blocks)

def loss_fn(impl, rope, blocks=fused.Blocks(), bw=320):
  def f(p, q, x, cot):
    return jnp.sum(run(impl, p, q, x, rope, blocks, bw).astype(jnp.float32) * cot)
  return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))

def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / (np.abs(b).max() + 1e-30))

B, T, N, H = 16, 299, 2, 32
for F in (64, 256):
  for rope in (True,):
    for dt in (('float32', 'bfloat16') if F == 64 else ('float32',)):
      try:
        p, q, x = mk(F + rope, B, T, N, H, F)
        cot = jax.random.normal(jax.random.key(9), q.shape)
        with jax.default_matmul_precision('highest'):
          ref_out = jax.jit(functools.partial(run, 'materialized', rope=rope))(p, q, x)
          _, ref_g = loss_fn('materialized', rope)(p, q, x, cot)
        cast = lambda t: jax.tree.map(lambda a: a.astype(dt), t)
        out = jax.jit(functools.partial(run, 'fused', rope=rope))(cast(p), cast(q), cast(x))
        _, g = loss_fn('fused', rope)(cast(p), cast(q), cast(x), cot)
        errs = {'out': rel(out, ref_out)}
        errs.update({f'd{k}': rel(g[0][k], ref_g[0][k]) for k in p})
        errs['dq'], errs['dx'] = rel(g[1], ref_g[1]), rel(g[2], ref_g[2])
        res['checks'].append({'F': F, 'rope': rope, 'dtype': dt, 'rel_err': errs})
        print('check', F, rope, dt, errs, flush=True)
      except Exception as e:
        res['checks'].append({'F': F, 'rope': rope, 'dtype': dt, 'error': traceback.format_exc()[-3000:]})
        print('check FAILED', F, rope, dt, traceback.format_exc()[-3000:], flush=True)
      save()
      if 'error' in res['checks'][-1] and len(res['checks']) == 1:
        sys.exit(1)

