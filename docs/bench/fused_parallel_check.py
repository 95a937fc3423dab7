"""GPU: the parallel forms (and the split backward) against the default fused kernels and materialized at highest
precision, outputs and every gradient. From the repo root: OUT=. PYTHONPATH=$PWD python docs/bench/fused_parallel_check.py
"""
import json, os, sys
sys.path.insert(0, 'tests')
import jax, jax.numpy as jnp, numpy as np
from fused_test import _inputs, _value_and_grads
from selattn.model import fused as fused_lib
res = []
for (rope, n, h, f, t) in [(True, 4, 8, 40, 53), (True, 2, 32, 64, 299)]:
  p, q, x, cot = _inputs(11, 4, t, n, h, f)
  with jax.default_matmul_precision('highest'):
    ref = _value_and_grads('materialized', p, q, x, cot, rope)
  base = _value_and_grads('fused', p, q, x, cot, rope, fused_lib.Blocks())
  for bl in [fused_lib.Blocks(), fused_lib.Blocks(16, 16, 16, heads_per_program=1, fwd_splits=2, bwd_splits=3),
             fused_lib.Blocks(16, 16, 16, heads_per_program=2, fwd_splits=3, bwd_splits=2, backward='split'),
             fused_lib.Blocks(heads_per_program=4, bwd_splits=2)]:
    out = _value_and_grads('fused', p, q, x, cot, rope, bl)
    leaves = lambda o: [o[0]] + [o[1][0][k] for k in sorted(o[1][0])] + [o[1][1], o[1][2]]
    rel = lambda a, b: float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max() / (np.abs(np.asarray(b, np.float64)).max() + 1e-30))
    r = {'case': [rope, n, h, f, t], 'blocks': bl.__dict__,
         'max_rel_vs_materialized_highest': max(rel(a, b) for a, b in zip(leaves(out), leaves(ref))),
         'max_rel_vs_default_fused': max(rel(a, b) for a, b in zip(leaves(out), leaves(base)))}
    print(json.dumps(r), flush=True)
    res.append(r)
json.dump({'jax': jax.__version__, 'device': jax.devices()[0].device_kind, 'results': res},
          open(os.path.join(os.environ.get('OUT', '.'), 'fused_parallel_gpu.json'), 'w'), indent=1)
