"""CPU: the Mosaic GPU kernels' lowered modules (before serialisation, no debug info) at the original config, this
checkout's against an earlier commit's, by operation counts: which operations one has more of than the other.
Lowering for cuda needs no GPU. The earlier kernels come from git into scratch/, as for fused_mgpu_ab.py:

  mkdir -p scratch && git show 9cd3d75:selattn/model/fused_mgpu.py > scratch/old_fwd.py && \
    git show 9cd3d75:selattn/model/fused_mgpu_bwd.py | \
    sed 's/from selattn.model import fused_mgpu as fm/import old_fwd as fm/' > scratch/old_bwd.py && \
    F=64 JAX_PLATFORMS=cpu OUT=. PYTHONPATH=$PWD python3 docs/bench/fused_mgpu_module_ops.py

Writes $OUT/fused_mgpu_module_ops.json. Recorded (kv_hidden 64, 9cd3d75 against 6b92b20, jax 0.10.2):
docs/bench/fused_mgpu_module_ops_f64.json.
"""
import collections
import json
import os
import re
import sys

sys.path.insert(0, os.path.join(os.getcwd(), 'scratch'))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental.mosaic.gpu import core  # noqa: E402

captured = []
_serde = core._run_serde_pass  # pylint: disable=protected-access


def _spy(module, **kw):  # the kernel's module as the lowering hands it on
  captured.append(module.operation.get_asm(enable_debug_info=False))
  return _serde(module, **kw)


core._run_serde_pass = _spy  # pylint: disable=protected-access
import old_bwd  # noqa: E402
import old_fwd  # noqa: E402

from selattn.model import fused_mgpu as fm  # noqa: E402
from selattn.model import fused_mgpu_bwd as fmb  # noqa: E402

B, T, N, H, F = 16, 299, 2, 32, int(os.environ.get('F', 64))
scale, args = fm.fused_inputs(jnp.zeros((B, T, N, H)), jnp.zeros((B, T, F)), jnp.zeros((B, T, F)),
                              jnp.zeros((F, N * H)), jnp.zeros((N * H,)), jnp.arange(T), jnp.arange(T), 10000.0)
tp, fp = args[0].shape[1], args[2].shape[2]
res = [jnp.zeros((B, tp, N, fp)), jnp.zeros((B, N, tp)), jnp.zeros((B, tp, N, fp))]
fwd_shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
bwd_shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (*args, *res)]


def modules(fn, shapes):
  captured.clear()
  jax.jit(fn).trace(*shapes).lower(lowering_platforms=('cuda',))
  return list(captured)


def op_counts(asm: str) -> collections.Counter:
  return collections.Counter(re.findall(r'(?:= |^\s+)"?([a-z_]+\.[a-z_.0-9]+)', asm, re.M))


out = {'jax': jax.__version__, 'kv_hidden': F, 'kernels': []}
kernels = [('forward', modules(lambda *a: old_fwd.forward(*a, scale=scale, opts=old_fwd.Options(approx_math=True)),
                               fwd_shapes), modules(lambda *a: fm.forward(*a, scale=scale), fwd_shapes)),
           ('backward', modules(lambda *a: old_bwd.backward(*a, scale=scale), bwd_shapes),
            modules(lambda *a: fmb.backward(*a, scale=scale), bwd_shapes))]
for name, olds, news in kernels:
  for k, (o, n) in enumerate(zip(olds, news)):
    co, cn = op_counts(o), op_counts(n)
    diff = {op: [co[op], cn[op]] for op in sorted(set(co) | set(cn)) if co[op] != cn[op]}
    floats = {op: [co[op], cn[op]] for op in sorted(set(co) | set(cn)) if re.match(r'(arith\.\w+f$|math\.)', op)}
    out['kernels'].append({'name': f'{name} kernel {k}', 'ops_old': sum(co.values()), 'ops_new': sum(cn.values()),
                           'differ [old, new]': diff, 'float ops [old, new]': floats})
    print(name, k, sum(co.values()), sum(cn.values()), diff)
with open(os.path.join(os.environ.get('OUT', '.'), 'fused_mgpu_module_ops.json'), 'w') as f:
  json.dump(out, f, indent=1)
