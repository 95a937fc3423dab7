"""Helpers for sharding_test.py and multiprocess_test.py, and the worker they run in fresh processes.

Multi-device work needs the fake-device count set before jax is imported, so it runs here, in a subprocess:

  python tests/mesh_check.py equivalence VARIANT...   # every mesh below, 10 steps each; needs 8 devices
  python tests/mesh_check.py train WORKDIR OVERRIDES_JSON  # selattn.train.train on configs/tiny.py
  python tests/mesh_check.py fused                      # fused selective attention on FUSED_MESHES vs one device
  python tests/mesh_check.py fused_mgpu                 # fused with the Mosaic GPU kernels (interpreted) on MGPU_MESHES
  python tests/mesh_check.py flash                      # the flash kernel with dropout on FLASH_MESHES vs one device

Each prints one line `RESULT <json>` that the tests parse. Importing this module does not import jax: the
helpers at the top (environment, HLO and TensorBoard parsing) are plain Python.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent

# The equivalence runs (item 1 of the "Scale out" issue). Sizes are chosen so that no two of B, T, D, block_q,
# block_k coincide where a shape check could confuse them: B 8, T = S 48, D 32, N 2, H 16, bq 6, bk 8.
BATCH, SEQ_LEN, BLOCK_Q, BLOCK_K, VOCAB, STEPS = 8, 48, 6, 8, 20, 10
VARIANTS = {
    'standard': dict(attention='standard'),
    'factored': dict(attention='selective', selective_impl='factored'),
    'blockwise': dict(attention='selective', selective_impl='blockwise'),
    'blockwise_mlp': dict(attention='selective', selective_impl='blockwise', kv_generator='mlp'),
    'materialized': dict(attention='selective', selective_impl='materialized'),
}
MESHES = {  # (data, fsdp, seq, tensor)
    'single': (1, 1, 1, 1),
    'data8': (8, 1, 1, 1),
    'data2_seq4': (2, 1, 4, 1),
    'fsdp2_seq2_tensor2': (1, 2, 2, 2),
}
AXES = ('data', 'fsdp', 'seq', 'tensor')
# Materialized attention matters only where its K/V is split: skip (8 data) to save a compile. Blockwise on (8
# data) is the single-device program with its batch split by GSPMD, no shard_map: blockwise_mlp on (8 data) runs that
# same path, and standard and factored the data-parallel all-reduce; its compile (the costliest here) is saved too.
SKIP = {('materialized', 'data8'), ('blockwise', 'data8')}


# ----------------------------------------------------------------------------------------------------------------
# Plain-Python helpers, used by the tests.

def subprocess_env(num_devices: int | None) -> dict[str, str]:
  """Environment of a worker: CPU, `num_devices` fake devices (None: leave the count to the caller)."""
  env = dict(os.environ)
  env['JAX_PLATFORMS'] = 'cpu'
  env['PYTHONPATH'] = str(ROOT)
  env.pop('JAX_NUM_CPU_DEVICES', None)
  # The backend's optimisation level does not change partitioning or collectives, only LLVM's work: level 0
  # halves compile time on this 2-core machine. Every run a test compares is compiled the same way.
  flags = [f for f in env.get('XLA_FLAGS', '').split()
           if not f.startswith(('--xla_force_host_platform_device_count', '--xla_backend_optimization_level'))]
  flags.append('--xla_backend_optimization_level=0')
  if num_devices is not None:
    flags.append(f'--xla_force_host_platform_device_count={num_devices}')
    env['JAX_NUM_CPU_DEVICES'] = str(num_devices)
  env['XLA_FLAGS'] = ' '.join(flags)
  return env


class Worker:
  """A `mesh_check.py` subprocess started now; `result()` waits for its RESULT line."""

  def __init__(self, args: list[str], num_devices: int, log_path: str, timeout: float = 600):
    self.args, self.log_path, self.timeout = args, log_path, timeout
    self._log = open(log_path, 'wb')
    self.start = time.monotonic()
    self.proc = subprocess.Popen([sys.executable, str(ROOT / 'tests' / 'mesh_check.py'), *args],
                                 env=subprocess_env(num_devices), cwd=ROOT, stdout=self._log,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    self._result = None

  def result(self) -> dict:
    if self._result is None:
      try:
        self.proc.wait(timeout=max(1.0, self.timeout - (time.monotonic() - self.start)))
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()
      self._log.close()
      self.seconds = time.monotonic() - self.start
      text = pathlib.Path(self.log_path).read_text(errors='replace')
      lines = [l for l in text.splitlines() if l.startswith('RESULT ')]
      if self.proc.returncode != 0 or not lines:
        tail = '\n'.join(text.splitlines()[-40:])
        raise AssertionError(f'mesh_check.py {" ".join(self.args)} exited with {self.proc.returncode} after '
                             f'{self.seconds:.0f}s; last lines of {self.log_path}:\n{tail}')
      self._result = json.loads(lines[-1][len('RESULT '):])
    return self._result

  def kill(self) -> None:
    if self.proc.poll() is None:
      self.proc.kill()
      self.proc.wait()
    if not self._log.closed:
      self._log.close()


_SHAPE = re.compile(r'\b[a-z]+[0-9]*\[([0-9,]*)\]')
_GATHER = re.compile(r'=\s*(.*?)\s*\ball-gather(?:-start)?\(')


def hlo_all_gather_shapes(hlo_text: str) -> list[tuple[int, ...]]:
  """Result shapes of every all-gather in an HLO module's text (async starts and tuple results included)."""
  shapes = []
  for line in hlo_text.splitlines():
    m = _GATHER.search(line)
    if m:
      shapes += [tuple(int(d) for d in s.split(',') if d) for s in _SHAPE.findall(m.group(1))]
  return shapes


def gathers_of_query_key_tensors(shapes, t: int, s: int) -> list[tuple[int, ...]]:
  """The all-gather results with both a T-sized and an S-sized dimension (a gathered [.., T, S, ..] tensor)."""
  out = []
  for shape in shapes:
    dims = list(shape)
    if t in dims:
      dims.remove(t)
      if s in dims:
        out.append(tuple(shape))
  return out


def hlo_collectives(hlo_text: str) -> dict[str, int]:
  """How many of each collective op the module holds."""
  ops = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute')
  return {op: len(re.findall(rf'\s{op}(?:-start)?\(', hlo_text)) for op in ops}


def max_rel_diff(a, b) -> float:
  return max(abs(x - y) / max(abs(y), 1e-30) for x, y in zip(a, b))


# ----------------------------------------------------------------------------------------------------------------
# The worker (runs in a subprocess with the device count set in its environment).

COLLECTIVES = frozenset({
    'psum', 'psum_invariant', 'pmax', 'pmin', 'ppermute', 'psend', 'precv', 'pbroadcast', 'all_to_all',
    'ragged_all_to_all', 'all_gather', 'all_gather_invariant', 'all_gather_reduced', 'reduce_scatter',
    'unreduced_reduce_scatter', 'unreduced_psum'})


def _subjaxprs(eqn):
  for param in eqn.params.values():
    for x in (param if isinstance(param, (list, tuple)) else [param]):
      if hasattr(x, 'eqns'):
        yield x
      elif hasattr(x, 'jaxpr') and hasattr(x.jaxpr, 'eqns'):
        yield x.jaxpr


def _walk(jaxpr, inside=False, in_cond=False, out=None):
  """Over a jaxpr and all its sub-jaxprs: primitive names, [(shape, inside a shard_map body)] of every value,
  and the collectives that sit in a `cond` branch inside a shard_map body."""
  if out is None:
    out = (set(), [], set())
  prims, shapes, cond_collectives = out
  for v in jaxpr.invars:
    shapes.append((tuple(v.aval.shape), inside))
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    prims.add(name)
    if in_cond and (name in COLLECTIVES or name.endswith('_start')):
      cond_collectives.add(name)
    for v in eqn.outvars:
      if hasattr(v.aval, 'shape'):
        shapes.append((tuple(v.aval.shape), inside))
    for sub in _subjaxprs(eqn):
      _walk(sub, inside or name == 'shard_map', in_cond or (inside and name == 'cond'), out)
  return out


def _eqns_named(jaxpr, name: str) -> list:
  """Every equation of primitive `name` in a jaxpr and its sub-jaxprs."""
  found = [e for e in jaxpr.eqns if e.primitive.name == name]
  for eqn in jaxpr.eqns:
    for sub in _subjaxprs(eqn):
      found += _eqns_named(sub, name)
  return found


def _spec_str(sharding) -> list:
  return [list(a) if isinstance(a, tuple) else a for a in sharding.spec]


def _describe(arr) -> dict:
  return {'shape': list(arr.shape), 'spec': _spec_str(arr.sharding),
          'shard_shapes': sorted({tuple(s.data.shape) for s in arr.addressable_shards}),
          'num_shards': len(arr.addressable_shards)}


def _equivalence(variants: list[str]) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from configs import tiny  # pylint: disable=g-import-not-at-top
  from selattn import config as config_lib, sharding, train  # pylint: disable=g-import-not-at-top

  assert jax.device_count() == 8, jax.devices()
  tokens = np.random.default_rng(0).integers(0, VOCAB, size=(STEPS, BATCH, SEQ_LEN + 1)).astype(np.int32)
  res = {'variants': {}, 'seconds': {}}
  for variant in variants:
    runs = res['variants'][variant] = {}
    for mesh_name, sizes in MESHES.items():
      if (variant, mesh_name) in SKIP:
        continue
      t0 = time.perf_counter()
      c = tiny.get_config()
      for k, v in VARIANTS[variant].items():
        setattr(c.model, k, v)
      c.data.seq_len, c.train.batch_size = SEQ_LEN, BATCH
      c.model.block_q, c.model.block_k = BLOCK_Q, BLOCK_K
      for k, v in zip(AXES, sizes):
        setattr(c.mesh, k, v)
      cfg = config_lib.from_config(c, VOCAB)
      # The trainer's own code path (train.train minus data, eval and checkpoints) on the first N devices.
      mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:int(np.prod(sizes))])
      sharding.check_fits(cfg, mesh)
      graphdef, state = train.create_state(cfg, mesh)
      steps = train.build_steps(cfg, mesh, graphdef, state)
      step = steps.train

      def batch(i):
        return steps.train_batches([{'inputs': tokens[i, :, :-1], 'targets': tokens[i, :, 1:]}])

      params = jax.tree.leaves(state[0])
      info = {
          # Parameters whose per-device shard is smaller than the array: really split, not just annotated.
          'params_split': sum(x.addressable_shards[0].data.shape != x.shape for x in params),
          'params_total': len(params),
          'batch_spec': _spec_str(batch(0)['inputs'].sharding),
          'ffn_in': _describe(state[0]['layers'][0]['ffn_in']['kernel'][...]),
      }
      if mesh_name == 'fsdp2_seq2_tensor2':
        opt = state[1]['opt_state'][0]
        info['ffn_in_mu'] = _describe(opt['mu']['layers'][0]['ffn_in']['kernel'][...])
        info['ffn_in_nu'] = _describe(opt['nu']['layers'][0]['ffn_in']['kernel'][...])
      b0 = batch(0)
      with jax.set_mesh(mesh):
        traced = step.trace(state, b0)
        compiled = traced.lower().compile()
      prims, shapes, cond_collectives = _walk(traced.jaxpr.jaxpr)
      info['shard_map'] = 'shard_map' in prims
      # A collective under a data-dependent branch deadlocks when devices of its group take different branches
      # (each device skips other causal tiles): the in-process CPU runtime then aborts after 40 s. Don't run it.
      info['collectives_in_cond'] = sorted(cond_collectives)
      info['shapes_5d_in_shard_map'] = sorted({s for s, inside in shapes if inside and len(s) == 5})
      # A full K or V: [*, T, S, ...] anywhere, inside a shard_map body or not.
      info['full_qk_shapes'] = sorted({s for s, _ in shapes if len(s) >= 4 and s[1:3] == (SEQ_LEN, SEQ_LEN)})
      hlo = compiled.as_text()
      info['all_gather_shapes'] = sorted(set(hlo_all_gather_shapes(hlo)))
      info['collectives'] = hlo_collectives(hlo)
      info['losses'] = None
      runs[mesh_name] = info
      if not cond_collectives:
        losses = []
        for i in range(STEPS):
          state, metrics = compiled(state, b0 if i == 0 else batch(i))
          losses.append(metrics['loss'])
        info['losses'] = [float(x) for x in jax.device_get(losses)]
      res['seconds'][f'{variant}/{mesh_name}'] = round(time.perf_counter() - t0, 2)
      print(f'{variant} {mesh_name}: {res["seconds"][f"{variant}/{mesh_name}"]}s, losses {info["losses"]}, '
            f'collectives in a cond branch: {info["collectives_in_cond"]}', flush=True)
  return res


def _controls() -> dict:
  """Positive controls for the checks above, and the mesh-size errors that need real devices."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top

  from selattn import config as config_lib, sharding  # pylint: disable=g-import-not-at-top

  # Gathering a seq-split [B, T, S, D] tensor must show up in the HLO parser as exactly such a gather.
  mesh = jax.make_mesh((8,), ('seq',), axis_types=(jax.sharding.AxisType.Auto,))
  x = jax.device_put(jnp.zeros((2, SEQ_LEN, SEQ_LEN, 4)), NamedSharding(mesh, P(None, 'seq')))
  hlo = jax.jit(lambda a: a * 2, out_shardings=NamedSharding(mesh, P())).lower(x).compile().as_text()
  errors = {}
  for name, mesh_cfg in {'product_3': config_lib.MeshConfig(data=3), 'product_16': config_lib.MeshConfig(data=2, fsdp=8),
                         'rest_not_dividing': config_lib.MeshConfig(data=-1, fsdp=3)}.items():
    try:
      sharding.make_mesh(mesh_cfg)
      errors[name] = None
    except config_lib.ConfigError as e:
      errors[name] = str(e)
  return {'gather_control': hlo_all_gather_shapes(hlo), 'mesh_errors': errors}


def _grad_of(graphdef, cot, *args, **kwargs):
  """(params, x) -> ((grads of params, grad of x), out) of sum(layer(x, *args, **kwargs) * cot), for one layer."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  def loss(params, x):
    out = nnx.merge(graphdef, params)(x, *args, **kwargs)
    return jnp.sum(out * cot), out
  return jax.grad(loss, argnums=(0, 1), has_aux=True)


def _leaves(grads_and_out) -> list:
  """The output and the gradients of ((grads, grad of x), out) as numpy arrays, the output first."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  (g, gx), out = grads_and_out
  return [np.asarray(a) for a in jax.tree.leaves((out, g, gx))]


def _on_mesh(grad_fn, params, x, sizes, ref) -> dict:
  """`grad_fn` (a _grad_of) jitted on the mesh of (data, fsdp, seq, tensor) `sizes` with x split over batch and
  seq: what its program runs (shard_map, the pallas_calls' names and padded query shapes) and its largest error
  against `ref`, one device's _leaves."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top

  from rel_error import rel  # pylint: disable=g-import-not-at-top
  from selattn import config as config_lib, sharding  # pylint: disable=g-import-not-at-top

  mesh = sharding.make_mesh(config_lib.MeshConfig(*sizes), jax.devices()[:int(np.prod(sizes))])
  with jax.set_mesh(mesh):
    xs = jax.device_put(x, NamedSharding(mesh, P(sharding.BATCH, 'seq', None)))
    traced = jax.jit(grad_fn).trace(params, xs)
    got = _leaves(traced.lower().compile()(params, xs))
  prims, _, _ = _walk(traced.jaxpr.jaxpr)
  calls = _eqns_named(traced.jaxpr.jaxpr, 'pallas_call')
  return {'shard_map': 'shard_map' in prims, 'pallas_call': 'pallas_call' in prims,
          # The shapes each device's kernels take: the padded query [b, T_local, N_local, ...] of every pallas_call.
          'kernel_q': sorted({tuple(e.invars[0].aval.shape) for e in calls}),
          'kernels': sorted({e.params['name'] for e in calls}),
          'max_rel_diff': max(rel(a, r) for a, r in zip(got, ref)), 'leaves': len(got)}


# A name ending in '_merged' runs model.fused_backward='merged' (one backward kernel, atomic adds of du and dq).
FUSED_MESHES = {'data2_seq4': (2, 1, 4, 1), 'data2_seq2_tensor2': (2, 1, 2, 2), 'fsdp2_tensor4': (1, 2, 1, 4),
                'data2_seq2_tensor2_merged': (2, 1, 2, 2)}


def _fused() -> dict:
  """One selective layer with the MLP generator, `fused`, RoPE on, tokens in a zigzag order (as the trainer lays
  them out under `seq`): output and the gradients of every parameter and of x, on each mesh and on one device
  (there with the split backward)."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from selattn import config as config_lib  # pylint: disable=g-import-not-at-top
  from selattn.model import attention as attn_lib  # pylint: disable=g-import-not-at-top

  b, t, d, n = 4, 16, 32, 4
  cfg = config_lib.ModelConfig(vocab_size=VOCAB, attention='selective', selective_impl='fused', kv_generator='mlp',
                               kv_hidden=48, d_model=d, num_heads=n, fused_backward='split')
  with nnx.use_eager_sharding(False):
    layer = attn_lib.SelectiveAttention(cfg, rngs=nnx.Rngs(3))
    merged = attn_lib.SelectiveAttention(dataclasses.replace(cfg, fused_backward='merged'), rngs=nnx.Rngs(3))
  graphdef, params = nnx.split(layer)
  graphdef_merged = nnx.split(merged)[0]  # the same parameters: the backward kernels are an execution choice
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
  cot = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
  # Zigzag for 4 seq devices: chunks (0, 7), (1, 6), (2, 5), (3, 4) of T / 8 positions each.
  chunks = np.arange(t).reshape(8, t // 8)
  positions = jnp.asarray(np.concatenate([np.concatenate([chunks[i], chunks[7 - i]]) for i in range(4)]), jnp.int32)

  ref = _leaves(jax.jit(_grad_of(graphdef, cot, positions, contiguous=False))(params, x))
  res = {}
  for name, sizes in FUSED_MESHES.items():
    grad_fn = _grad_of(graphdef_merged if name.endswith('_merged') else graphdef, cot, positions, contiguous=False)
    res[name] = _on_mesh(grad_fn, params, x, sizes, ref)
    print(name, res[name], flush=True)
  return res


MGPU_MESHES = {'seq2': (1, 1, 2, 1), 'tensor2': (1, 1, 1, 2)}


def _fused_mgpu() -> dict:
  """One selective layer, `fused` with model.fused_forward = fused_backward = 'mgpu', RoPE on, on each of
  MGPU_MESHES (2 devices) against one device running the Triton kernels: output, gradients of every parameter and
  of x, the kernels each mesh's program calls and the fallback lines logged (Mosaic GPU's interpret mode cannot run
  under a multi-device mesh, so on the CPU each device must run the Triton kernels)."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  import functools  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from selattn import config as config_lib  # pylint: disable=g-import-not-at-top
  from selattn.model import attention as attn_lib, fused as fused_lib  # pylint: disable=g-import-not-at-top
  from selattn.model import fused_mgpu  # pylint: disable=g-import-not-at-top

  fused_mgpu.INTERPRET_OFF_GPU = True  # as the tests' fixture mgpu_interpreter: the mesh, not the CPU, is the reason
  b, t, d, n = 2, 16, 16, 2
  cfg = config_lib.ModelConfig(vocab_size=VOCAB, attention='selective', selective_impl='fused', kv_generator='mlp',
                               kv_hidden=40, d_model=d, num_heads=n, fused_forward='mgpu', fused_backward='mgpu')
  with nnx.use_eager_sharding(False):
    graphdef, params = nnx.split(attn_lib.SelectiveAttention(cfg, rngs=nnx.Rngs(3)))
    triton = nnx.split(attn_lib.SelectiveAttention(
        dataclasses.replace(cfg, fused_forward='triton', fused_backward='merged'), rngs=nnx.Rngs(3)))[0]
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
  cot = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
  chunks = np.arange(t).reshape(4, t // 4)  # zigzag for 2 seq devices: chunks (0, 3), (1, 2)
  positions = jnp.asarray(np.concatenate([chunks[0], chunks[3], chunks[1], chunks[2]]), jnp.int32)

  ref = _leaves(jax.jit(_grad_of(triton, cot, positions, contiguous=False))(params, x))
  res = {}
  for name, sizes in MGPU_MESHES.items():
    lines = []
    fused_lib._log_once = functools.cache(lines.append)  # pylint: disable=protected-access
    res[name] = {**_on_mesh(_grad_of(graphdef, cot, positions, contiguous=False), params, x, sizes, ref),
                 'lines': lines}
    print(name, res[name], flush=True)
  return res


FLASH_MESHES = {'data4': (4, 1, 1, 1), 'data2_tensor2': (2, 1, 1, 2), 'fsdp2_tensor2': (1, 2, 1, 2)}
# The padded query [b_local, Tp, N_local, Hq] each device's flash kernels take (B 4, T 20 -> one 32-row tile, N 4,
# H 8 -> 16; selective's augmented keys 2H = 16).
FLASH_LOCAL = {'data4': (1, 32, 4, 16), 'data2_tensor2': (2, 32, 2, 16), 'fsdp2_tensor2': (2, 32, 2, 16)}


def _flash() -> dict:
  """Standard and factored selective attention with dropout and model.attn_kernel='flash' on each mesh, against
  one device's dense path (model.attn_kernel='dense'): output and the gradients of every parameter and of x."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from selattn import config as config_lib  # pylint: disable=g-import-not-at-top
  from selattn.model import attention as attn_lib  # pylint: disable=g-import-not-at-top

  b, t, d, n = 4, 20, 32, 4
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
  cot = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
  positions = jnp.arange(t, dtype=jnp.int32)
  res = {}
  for attention, cls in (('standard', attn_lib.StandardAttention), ('selective', attn_lib.SelectiveAttention)):
    cfg = config_lib.ModelConfig(vocab_size=VOCAB, attention=attention, selective_impl='factored', d_model=d,
                                 num_heads=n, attn_dropout=0.3, attn_kernel='dense')
    with nnx.use_eager_sharding(False):
      graphdef, params = nnx.split(cls(cfg, rngs=nnx.Rngs(3)))
      graphdef_flash = nnx.split(cls(dataclasses.replace(cfg, attn_kernel='flash'), rngs=nnx.Rngs(3)))[0]

    ref = _leaves(jax.jit(_grad_of(graphdef, cot, positions, dropout_key=jax.random.key(7)))(params, x))
    for name, sizes in FLASH_MESHES.items():
      grad_fn = _grad_of(graphdef_flash, cot, positions, dropout_key=jax.random.key(7))
      res.setdefault(name, {})[attention] = _on_mesh(grad_fn, params, x, sizes, ref)
      print(name, attention, res[name][attention], flush=True)
  return res


def _train(workdir: str, overrides: dict) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top

  from configs import tiny  # pylint: disable=g-import-not-at-top
  from selattn import train  # pylint: disable=g-import-not-at-top

  logging.set_verbosity(logging.INFO)
  c = tiny.get_config()
  for key, value in overrides.items():
    section, name = key.split('.')
    setattr(c[section], name, value)
  t0 = time.perf_counter()
  result = train.train(c, workdir)
  return {'devices': jax.device_count(), 'eval': result, 'seconds': time.perf_counter() - t0}


def main(argv: list[str]) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_numpy_rank_promotion', 'raise')  # as tests/conftest.py does in-process
  mode = argv[1]
  if mode == 'equivalence':
    res = _equivalence([a for a in argv[2:] if a != '--controls'])
    res['controls'] = _controls() if '--controls' in argv else None
  elif mode == 'train':
    res = _train(argv[2], json.loads(argv[3]))
  elif mode == 'fused':
    res = _fused()
  elif mode == 'fused_mgpu':
    res = _fused_mgpu()
  elif mode == 'flash':
    res = _flash()
  else:
    raise SystemExit(f'unknown mode {mode!r}')
  print('RESULT ' + json.dumps(res), flush=True)


if __name__ == '__main__':
  sys.path.insert(0, str(ROOT))
  main(sys.argv)
