"""Benchmarks the real training step, data pipeline included: `python -m selattn.bench --workload seed`.

Workloads (ISSUE targets in BENCHMARKS.md):
  seed     W1: the original config (D64 L4 N2, context 299, batch 16, float32): standard, selective factored,
           blockwise and materialized (the literal form, the original's computation, as the baseline); and
           -stack3, three seeds in one step as `selattn.sweep --stack` trains them (ms/step: the stacked step).
  nanogpt  W2: nanoGPT's shakespeare-char config (6L 6H 384d, ctx 256, batch 64, bf16): standard, selective, with
           attention dropout in XLA's dense softmax and in the flash kernel; standard without attention dropout.
  long     W3: selective blockwise at B4 T4096 D256 N4 on 1 device, then with mesh.seq = all devices.
  mlp      the MLP K/V generator at the original config (kv_hidden 64 and 256, float32 and bfloat16): fused
           (Pallas; Triton's kernels, -mgpu: the Mosaic GPU forward, -mgpu2: its forward and backward, what
           'auto' picks on one Hopper GPU) against blockwise at its best tiles; the linear generator through fused
           beside factored.
  long-mlp the MLP generator (kv_hidden 256, bf16) at B4 T4096 D256 N4: fused and blockwise on 1 device, fused
           with mesh.seq = all devices.
  scale    W4: GPT-2-small shape as a char model (D768 L12 N12, T1024, bf16): standard and selective factored on
           1 device, then data-parallel (and fsdp) over all devices at the same per-device batch.
  data     the input pipeline alone, as the trainer builds it (token store, memory map, grain, --worker_count
           worker processes): tokens/s delivered at W4's shape (global batch 48 = 12 per GPU x 4, T1024), against
           the tokens/s W4's fastest 4-GPU step consumes (W4_HOST_TOKENS_PER_S). --data_path: the corpus (read
           as bytes); '' = a generated file of --corpus_mb MB of random bytes (100: enwik8's size).
Prints a table (ms/step, tokens/s, MFU against 790 TFLOP/s bf16, the compiled step's temporary memory, compile
time); --out writes JSON.
`--small` shrinks every workload so it runs on a CPU in seconds (for tests).
"""

from __future__ import annotations

import ast
import json
import math
import time

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from selattn import perf

_WORKLOAD = flags.DEFINE_enum('workload', 'seed', ['seed', 'nanogpt', 'long', 'scale', 'mlp', 'long-mlp', 'data'],
                              'Which workload.')
_STEPS = flags.DEFINE_integer('steps', 50, 'Timed optimizer steps per variant (after warm-up).')
_OUT = flags.DEFINE_string('out', None, 'Write the full results as JSON here.')
_DATA = flags.DEFINE_string('data_path', '', "Corpus for the runs ('' = the embedded Shakespeare).")
_ONLY = flags.DEFINE_list('variants', None, 'Run only these variants (names as printed).')
_SMALL = flags.DEFINE_bool('small', False, 'Shrink every workload to CPU size (for tests).')
_SET = flags.DEFINE_list('set', None, 'Config overrides added to every variant, key=value (e.g. '
                         'model.fused_bwd_splits=2); a variant that sets the same key keeps its own value.')
_PROFILE = flags.DEFINE_string('profile', None, 'Also trace each variant\'s pipelined steps with jax.profiler into '
                                'PROFILE/<variant> and add the device time per op (per step) to the JSON, '
                                'with the source line of each op that names an instruction of the compiled step.')
_CORPUS_MB = flags.DEFINE_integer('corpus_mb', 100, "data workload: size of the generated corpus when --data_path=''.")
_WORKERS = flags.DEFINE_list('worker_counts', ['0', '4', '8'],
                             'data workload: the data.worker_count values to measure (0 = a prefetch thread only).')

# The tokens per second W4's fastest 4-GPU configuration consumes on one host: standard attention, fsdp=4, global
# batch 48 x 1024 tokens, 19.26 ms/step on 4 H200s (docs/bench/w4_scale_h200.json, variant standard-fsdp4).
W4_HOST_TOKENS_PER_S = 2_551_704.86
W4_HOST_VARIANT = 'standard-fsdp4 (docs/bench/w4_scale_h200.json)'


def _variants(workload: str, n_dev: int, small: bool) -> list[tuple[str, dict, int]]:
  """(name, config overrides, number of devices) for each variant of a workload."""
  if workload == 'seed':
    # configs/{standard,selective}.py: the flat optimizer (one AdamW update over all parameters).
    base = {'model.num_layers': 4, 'train.steps_per_call': 10, 'train.flat_optimizer': True}
    out = [('standard', {**base, 'model.attention': 'standard'}, 1)]
    out.append(('selective-factored', {**base, 'model.selective_impl': 'factored'}, 1))
    out.append(('standard-per-array-adamw', {**base, 'model.attention': 'standard', 'train.flat_optimizer': False}, 1))
    out.append(('selective-factored-per-array-adamw', {**base, 'model.selective_impl': 'factored',
                                                       'train.flat_optimizer': False}, 1))
    out.append(('standard-unrolled', {**base, 'model.attention': 'standard', 'train.unroll_steps': True}, 1))
    out.append(('selective-factored-unrolled', {**base, 'model.selective_impl': 'factored',
                                                'train.unroll_steps': True}, 1))
    for block in (128, 320):  # 320 > 299: one tile, the literal form with rematerialisation
      out.append((f'selective-blockwise-b{block}', {**base, 'model.selective_impl': 'blockwise',
                                                    'model.block_q': block, 'model.block_k': block}, 1))
    out.append(('selective-materialized', {**base, 'model.selective_impl': 'materialized'}, 1))
    # Seeds stacked in one step (selattn.sweep --stack): 'stack' seeds' states vmapped; ms/step is the stacked step.
    out.append(('standard-stack3', {**base, 'model.attention': 'standard', 'stack': 3}, 1))
    out.append(('selective-factored-stack3', {**base, 'model.selective_impl': 'factored', 'stack': 3}, 1))
  elif workload == 'mlp':
    base = {'model.num_layers': 4, 'train.steps_per_call': 10, 'train.flat_optimizer': True,
            'model.kv_generator': 'mlp'}
    out = []
    for hid in (64, 256):
      for dt in ('float32', 'bfloat16'):
        v = {**base, 'model.kv_hidden': hid, 'model.dtype': dt}
        # fused-h*: the split backward (its name from before merged became the default, as in the committed JSON).
        out.append((f'fused-h{hid}-{dt[:4]}', {**v, 'model.selective_impl': 'fused', 'model.fused_backward': 'split'},
                    1))
        out.append((f'fused-merged-h{hid}-{dt[:4]}', {**v, 'model.selective_impl': 'fused',
                                                      'model.fused_backward': 'merged'}, 1))
        # The Mosaic GPU kernels (Hopper): the forward with the merged Triton backward, then both.
        out.append((f'fused-mgpu-h{hid}-{dt[:4]}', {**v, 'model.selective_impl': 'fused', 'model.fused_forward': 'mgpu',
                                                    'model.fused_backward': 'merged'}, 1))
        out.append((f'fused-mgpu2-h{hid}-{dt[:4]}', {**v, 'model.selective_impl': 'fused',
                                                     'model.fused_forward': 'mgpu', 'model.fused_backward': 'mgpu'}, 1))
        out.append((f'blockwise-b320-h{hid}-{dt[:4]}', {**v, 'model.selective_impl': 'blockwise',
                                                         'model.block_q': 320, 'model.block_k': 320}, 1))
    if n_dev > 1:
      # The Mosaic GPU kernels under a mesh of all devices, float32: the sequence split (the W3 path; its zigzag
      # chunks need data.seq_len divisible by 2 * mesh.seq, so 300 here for the original's 299), the head split
      # (mesh.tensor; the original config has 2 heads; the flat optimizer needs tensor 1) and data parallelism at
      # the same per-device batch.
      for hid in (64, 256):
        v = {**base, 'model.kv_hidden': hid, 'model.selective_impl': 'fused', 'model.fused_forward': 'mgpu',
             'model.fused_backward': 'mgpu', 'mesh.data': 1}
        seq_len = 2 * n_dev * math.ceil(299 / (2 * n_dev))
        out.append((f'fused-mgpu2-h{hid}-floa-seq{n_dev}', {**v, 'mesh.seq': n_dev, 'data.seq_len': seq_len}, n_dev))
        out.append((f'fused-mgpu2-h{hid}-floa-tensor{n_dev}', {**v, 'mesh.tensor': n_dev,
                                                               'train.flat_optimizer': False}, n_dev))
        out.append((f'fused-mgpu2-h{hid}-floa-data{n_dev}', {**v, 'mesh.data': n_dev,
                                                             'train.batch_size': 16 * n_dev}, n_dev))
    lin = {**base, 'model.kv_generator': 'linear'}
    out.append(('linear-factored', {**lin, 'model.selective_impl': 'factored'}, 1))
    out.append(('linear-fused', {**lin, 'model.selective_impl': 'fused', 'model.fused_backward': 'split'}, 1))
  elif workload == 'long-mlp':
    base = {'model.kv_generator': 'mlp', 'model.kv_hidden': 256, 'model.d_model': 256, 'model.num_heads': 4,
            'data.seq_len': 4096, 'train.batch_size': 4, 'model.dtype': 'bfloat16', 'train.steps_per_call': 1}
    out = [('fused-1dev', {**base, 'model.selective_impl': 'fused', 'model.fused_backward': 'split'}, 1),
           ('fused-merged-1dev', {**base, 'model.selective_impl': 'fused', 'model.fused_backward': 'merged'}, 1),
           ('blockwise-1dev', {**base, 'model.selective_impl': 'blockwise', 'model.block_q': 512,
                               'model.block_k': 512}, 1)]
    if n_dev > 1:
      out.append((f'fused-seq{n_dev}', {**base, 'model.selective_impl': 'fused', 'mesh.data': 1,
                                        'mesh.seq': n_dev}, n_dev))
  elif workload == 'nanogpt':
    base = {'config': 'nanogpt', 'train.steps_per_call': 5}
    # standard and selective-factored: attention dropout in the dense XLA softmax (what they measured before the
    # flash kernel, as in the committed JSON); -flash: the Pallas kernel with the same mask (the default on GPU),
    # at its default tiles and two others; standard-nodrop: no attention dropout, cuDNN's kernel (the ceiling).
    sel = {**base, 'model.attention': 'selective'}
    out = [('standard', {**base, 'model.attn_kernel': 'dense'}, 1),
           ('selective-factored', {**sel, 'model.attn_kernel': 'dense'}, 1),
           ('standard-flash', {**base, 'model.attn_kernel': 'flash'}, 1),
           ('selective-factored-flash', {**sel, 'model.attn_kernel': 'flash'}, 1)]
    for block in (32, 128):
      out.append((f'standard-flash-b{block}', {**base, 'model.attn_kernel': 'flash', 'model.flash_block_q': block,
                                               'model.flash_block_k': block}, 1))
    out.append(('standard-nodrop', {**base, 'model.attn_dropout': 0.0}, 1))
  elif workload == 'long':
    base = {'model.selective_impl': 'blockwise', 'model.d_model': 256, 'model.num_heads': 4, 'data.seq_len': 4096,
            'train.batch_size': 4, 'model.dtype': 'bfloat16', 'model.block_q': 512, 'model.block_k': 512}
    out = [('blockwise-1dev', base, 1)]
    if n_dev > 1:
      out.append((f'blockwise-seq{n_dev}', {**base, 'mesh.data': 1, 'mesh.seq': n_dev}, n_dev))
  else:
    base = {'model.d_model': 768, 'model.num_heads': 12, 'model.num_layers': 12, 'data.seq_len': 1024,
            'model.dtype': 'bfloat16', 'train.batch_size': 12}
    out = []
    for att, extra in (('standard', {'model.attention': 'standard'}), ('selective-factored', {})):
      out.append((f'{att}-1dev', {**base, **extra}, 1))
      if n_dev > 1:
        out.append((f'{att}-data{n_dev}', {**base, **extra, 'train.batch_size': 12 * n_dev}, n_dev))
        out.append((f'{att}-fsdp{n_dev}', {**base, **extra, 'train.batch_size': 12 * n_dev, 'mesh.data': 1,
                                           'mesh.fsdp': n_dev}, n_dev))
  # The fused variants name their kernels: Triton's unless a variant says mgpu (not 'auto', which picks by GPU),
  # so a variant measures the same kernels on every machine.
  for _, o, _ in out:
    if o.get('model.selective_impl') == 'fused' or o.get('model.kv_generator') == 'mlp':
      o.setdefault('model.fused_forward', 'triton')
      o.setdefault('model.fused_backward', 'merged')
  if small:
    shrink = {'model.d_model': 32, 'model.num_heads': 2, 'model.num_layers': 2, 'data.seq_len': 64,
              'model.block_q': 16, 'model.block_k': 16}
    kv = lambda o: {'model.kv_hidden': 16} if 'model.kv_hidden' in o else {}
    out = [(n, {**o, **shrink, 'train.batch_size': 4 * d, **kv(o)}, d) for n, o, d in out]
  return out


def _config(overrides: dict):
  from configs import base, nanogpt  # pylint: disable=g-import-not-at-top
  cfg = nanogpt.get_config() if overrides.get('config') == 'nanogpt' else base.get_config()
  for key, value in overrides.items():
    if key in ('config', 'stack'):  # the bench's own keys, not config keys
      continue
    section, name = key.split('.')
    cfg[section][name] = value
  return cfg


def pair_flops_per_step(cfg) -> float:
  """FLOPs of the literal per-pair generator work in one step (forward and backward, 3x the forward), over the
  causally visible (query, key) pairs: the first layer's sum, activation and second layer per pair. What
  `blockwise` computes per pair; the fused kernels do less (module docstring of selattn/model/fused.py), so this
  is an equivalent rate, comparable across implementations."""
  m = cfg.model
  if m.attention != 'selective':
    return 0.0
  if m.kv_generator == 'mlp':  # h = u + w and gelu (2 F), then the second layer to K and V (2 F 2D)
    per_pair = 2 * m.kv_hidden + 2 * m.kv_hidden * 2 * m.d_model
  else:  # K = u + k and V = c + v
    per_pair = 2 * m.d_model
  t = cfg.data.seq_len
  return 3.0 * per_pair * cfg.train.batch_size * m.num_layers * t * (t + 1) / 2


def run_variant(name: str, overrides: dict, n_dev: int, steps: int, data_path: str,
                profile_dir: str | None = None) -> dict:
  """Builds the trainer's own step and data pipeline for one variant and times `steps` optimizer steps."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from selattn import config as config_lib, data, sharding, store, train  # pylint: disable=g-import-not-at-top
  from selattn.model import count_params  # pylint: disable=g-import-not-at-top
  stack = int(overrides.get('stack', 0))
  raw = _config(overrides)
  raw.data.path = data_path
  corpus = store.open_config(raw.data)
  cfg = config_lib.from_config(raw, corpus.vocab.size)
  devices = jax.devices()[:n_dev]
  mesh = sharding.make_mesh(cfg.mesh, devices)
  sharding.check_fits(cfg, mesh)
  graphdef, state = train.create_state(cfg, mesh)
  num_params = count_params(nnx.merge(graphdef, state)[0])
  t = cfg.train
  fns = train.build_steps(cfg, mesh, graphdef, state)
  its = [data.train_iterator(data.train_dataset(corpus.train, seq_len=cfg.data.seq_len,
                                                global_batch_size=t.batch_size, seed=k), prefetch=2, worker_count=0)
         for k in range(max(stack, 1))]

  def unstacked_batches():
    return fns.train_batches([next(its[0]) for _ in range(t.steps_per_call)])

  next_batches = unstacked_batches
  if stack:  # as selattn.stack builds it: seed k's state, batches and dropout key on a leading axis
    import dataclasses  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    if mesh.size != 1:
      raise ValueError('stacked seeds train on one device')
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    states = [train.create_state(dataclasses.replace(cfg, train=dataclasses.replace(t, seed=k)), mesh)[1]
              for k in range(stack)]
    state = jax.device_put(jax.tree.map(lambda *xs: jnp.stack(xs), *states), rep)
    keys = jax.device_put(jnp.stack([train.dropout_base_key(k) for k in range(stack)]), rep)
    with jax.set_mesh(mesh):
      keyed = jax.jit(jax.vmap(train.make_keyed_train_step(graphdef, cfg, None)), in_shardings=(rep, rep, rep),
                      out_shardings=(rep, None), donate_argnums=0, compiler_options=train.compiler_options(cfg))

    def stacked_batches():
      per_seed = [[next(it) for _ in range(t.steps_per_call)] for it in its]
      return jax.device_put({k: np.stack([np.stack([b[k] for b in bs]) for bs in per_seed])
                             for k in per_seed[0][0]}, rep)

    next_batches = stacked_batches

  with jax.set_mesh(mesh):
    batches = next_batches()
    t0 = time.perf_counter()
    if stack:
      compiled_keyed = keyed.lower(state, batches, keys).compile()
      compiled = lambda s, b: compiled_keyed(s, b, keys)  # pylint: disable=unnecessary-lambda-assignment
    else:
      compiled = fns.train.lower(state, batches).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(2):  # warm-up
      state, metrics = compiled(state, next_batches())
    jax.block_until_ready(metrics)
    calls = max(steps // t.steps_per_call, 1)
    times = []
    for _ in range(calls):
      t0 = time.perf_counter()
      state, metrics = compiled(state, next_batches())
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - t0)
    # A pipelined pass as in training (no per-call sync): the honest steady-state throughput.
    t0 = time.perf_counter()
    for _ in range(calls):
      state, metrics = compiled(state, next_batches())
    jax.block_until_ready((state, metrics))
    pipelined = (time.perf_counter() - t0) / (calls * t.steps_per_call)
    profile = None
    if profile_dir:  # the same pipelined calls again, traced: where the device time of a step goes
      import os  # pylint: disable=g-import-not-at-top
      where = os.path.join(profile_dir, name)
      jax.profiler.start_trace(where)
      for _ in range(calls):
        state, metrics = compiled(state, next_batches())
      jax.block_until_ready((state, metrics))
      jax.profiler.stop_trace()
      hlo = (compiled_keyed if stack else compiled).as_text()
      profile = perf.device_op_times(where, calls * t.steps_per_call, hlo_text=hlo)  # each op's source line
      with open(os.path.join(where, 'step.hlo.txt'), 'w') as f:  # the fusions the profile names, as compiled
        f.write(hlo)
  ms_step = 1000 * pipelined
  tokens = t.batch_size * cfg.data.seq_len * max(stack, 1)  # a stacked step trains every seed's batch
  flops = perf.flops_per_token(cfg, num_params) * tokens
  stats = devices[0].memory_stats() or {}
  mem = (compiled_keyed if stack else compiled).memory_analysis()
  return {
      'variant': name, 'devices': n_dev, 'device_kind': devices[0].device_kind, 'num_params': num_params,
      'batch': t.batch_size, 'seq_len': cfg.data.seq_len, 'dtype': cfg.model.dtype,
      'ms_per_step': ms_step, 'ms_per_step_synced_median': 1000 * float(np.median(times)) / t.steps_per_call,
      'tokens_per_s': tokens / pipelined, 'mfu': flops / pipelined / (perf.REFERENCE_PEAK * n_dev),
      # The process's peak so far: it carries over from earlier variants of the same run (JAX cannot reset it), so
      # the table prints temp_mem_gib, the compiled step's own temporary memory.
      'peak_mem_gib': stats.get('peak_bytes_in_use', 0) / 2**30,
      'temp_mem_gib': (mem.temp_size_in_bytes / 2**30) if mem is not None else None,
      'pair_tflops_per_s': pair_flops_per_step(cfg) * max(stack, 1) / pipelined / 1e12,
      'compile_s': compile_s, 'final_loss': float(np.mean(jax.device_get(metrics['loss']))),  # over stacked seeds
      'final_losses': np.atleast_1d(jax.device_get(metrics['loss'])).tolist(),
      'seeds': max(stack, 1), 'ms_per_seed_step': ms_step / max(stack, 1),
      'jax': jax.__version__, 'overrides': overrides, **({'profile': profile} if profile_dir else {}),
  }


def run_data(data_path: str, worker_count: int, batches: int, small: bool, corpus_mb: int = 100) -> dict:
  """Times `batches` batches through the trainer's own input pipeline (after a warm-up) at W4's shape."""
  import os  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  from selattn import data, store  # pylint: disable=g-import-not-at-top
  seq_len, batch = (64, 8) if small else (1024, 48)
  with tempfile.TemporaryDirectory() as tmp:
    if not data_path:
      data_path = os.path.join(tmp, 'random.bin')
      with open(data_path, 'wb') as f:  # corpus_mb MB (1 MB with --small), in 1 MB pieces
        rng = np.random.default_rng(0)
        for _ in range(1 if small else corpus_mb):
          f.write(rng.integers(0, 256, 2**20, dtype=np.uint8).tobytes())
    t0 = time.perf_counter()
    corpus = store.open_corpus(data_path, kind='bytes', split='enwik8', store_dir=os.path.join(tmp, 'stores'))
    prepare_s = time.perf_counter() - t0
    ds = data.train_dataset(corpus.train, seq_len=seq_len, global_batch_size=batch, seed=0)
    it = data.train_iterator(ds, prefetch=2, worker_count=worker_count)
    try:
      for _ in range(max(20, 4 * worker_count)):  # warm-up: workers started, buffers full
        next(it)
      t0 = time.perf_counter()
      for _ in range(batches):
        b = next(it)
      dt = time.perf_counter() - t0
    finally:
      if hasattr(it, 'close'):
        it.close()
    assert b['inputs'].shape == (batch, seq_len)
    tokens_per_s = batches * batch * seq_len / dt
    return {'variant': f'workers{worker_count}-{os.path.getsize(data_path) >> 20}MB', 'worker_count': worker_count,
            'prefetch': 2, 'batch': batch, 'seq_len': seq_len, 'batches': batches, 'seconds': dt,
            'batches_per_s': batches / dt,
            'tokens_per_s': tokens_per_s, 'w4_tokens_per_s': W4_HOST_TOKENS_PER_S, 'w4_variant': W4_HOST_VARIANT,
            'ratio_to_w4': tokens_per_s / W4_HOST_TOKENS_PER_S, 'corpus_bytes': os.path.getsize(data_path),
            'prepare_s': prepare_s, 'cpu_count': os.cpu_count(),
            'cpus_usable': len(os.sched_getaffinity(0)), 'grain': getattr(__import__('grain'), '__version__', '?')}


def _main_data() -> None:
  results = []
  for w in _WORKERS.value:
    results.append(run_data(_DATA.value, int(w), _STEPS.value, _SMALL.value, _CORPUS_MB.value))
    if _OUT.value:
      with open(_OUT.value, 'w') as f:
        json.dump(results, f, indent=1)
  r0 = results[0]
  print(f'\ninput pipeline at batch {r0["batch"]} x T{r0["seq_len"]} ({r0["cpus_usable"]} CPUs usable), against '
        f'W4 {W4_HOST_VARIANT}: {W4_HOST_TOKENS_PER_S:,.0f} tok/s')
  print(f'{"variant":<18}{"batches/s":>12}{"tok/s":>14}{"x W4":>8}')
  for r in results:
    print(f'{r["variant"]:<18}{r["batches_per_s"]:>12.1f}{r["tokens_per_s"]:>14,.0f}{r["ratio_to_w4"]:>8.1f}')


def _parse_set(item: str) -> tuple[str, object]:
  """'section.key=value' -> (key, value): a Python literal when it parses as one, else the string."""
  key, sep, value = item.partition('=')
  if not sep or key.count('.') != 1:
    raise app.UsageError(f'--set {item!r}: expected section.key=value')
  try:
    return key, ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return key, value


def main(argv):
  del argv
  if _WORKLOAD.value == 'data':
    _main_data()
    return
  n_dev = jax.device_count()
  results = []
  extra = dict(_parse_set(item) for item in _SET.value or ())
  for name, overrides, d in _variants(_WORKLOAD.value, n_dev, _SMALL.value):
    if _ONLY.value and name not in _ONLY.value:
      continue
    overrides = {**extra, **overrides}
    logging.info('running %s', name)
    try:
      results.append(run_variant(name, overrides, d, _STEPS.value, _DATA.value, _PROFILE.value))
    except Exception as e:  # pylint: disable=broad-except
      # One variant failing (e.g. out of memory) must not lose the others' numbers.
      logging.exception('variant %s failed', name)
      results.append({'variant': name, 'devices': d, 'error': f'{type(e).__name__}: {str(e)[:300]}'})
    if _OUT.value:
      with open(_OUT.value, 'w') as f:
        json.dump(results, f, indent=1)
  print(f'\n{_WORKLOAD.value} on {jax.devices()[0].device_kind}, jax {jax.__version__}')
  print(f'{"variant":<26}{"dev":>4}{"ms/step":>10}{"tok/s":>12}{"MFU":>7}{"temp GiB":>10}{"compile s":>10}')
  for r in results:
    if 'error' in r:
      print(f'{r["variant"]:<26}{r["devices"]:>4}  FAILED: {r["error"][:80]}')
    else:
      print(f'{r["variant"]:<26}{r["devices"]:>4}{r["ms_per_step"]:>10.3f}{r["tokens_per_s"]:>12.3g}'
            f'{100 * r["mfu"]:>6.1f}%{r["temp_mem_gib"] or 0.0:>10.2f}{r["compile_s"]:>10.1f}')


if __name__ == '__main__':
  app.run(main)
