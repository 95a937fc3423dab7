"""Training: one pure jitted step over the split (model, optimizer) state, evaluation, and the loop.

The loop never syncs with the device between log steps: the host builds the next batches while the device
runs the current step, and metrics are read only at log and checkpoint steps. It logs progress with an ETA, evaluates on fixed held-out windows, writes TensorBoard scalars and a text sample, saves
Orbax checkpoints (asynchronously; on SIGTERM/SIGINT too) and resumes from the latest one on start.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from typing import Any

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
from jax.flatten_util import ravel_pytree
import numpy as np
import optax

from selattn import checkpoint as ckpt_lib
from selattn import config as config_lib
from selattn import data as data_lib
from selattn import generate as generate_lib
from selattn import metrics as metrics_lib
from selattn import sharding
from selattn.model import Transformer, count_params

# Model keys that only choose how the same function is computed: a run may resume with other values.
EXECUTION_KEYS = ('selective_impl', 'block_q', 'block_k', 'fused_block_q', 'fused_block_k', 'fused_block_f', 'remat',
                  'dtype', 'dropout', 'attn_dropout')


class TrainingError(RuntimeError):
  """The run cannot continue (NaN loss, incompatible workdir); the message says why."""


def lr_schedule(t: config_lib.TrainConfig) -> optax.Schedule:
  """Linear warmup to learning_rate, then constant or cosine decay to min_learning_rate at num_steps."""
  if t.lr_schedule == 'cosine':
    decay = optax.cosine_decay_schedule(t.learning_rate, max(t.num_steps - t.warmup_steps, 1),
                                        alpha=t.min_learning_rate / t.learning_rate)
  else:
    decay = optax.constant_schedule(t.learning_rate)
  if not t.warmup_steps:
    return decay
  warmup = optax.linear_schedule(0.0, t.learning_rate, t.warmup_steps)
  return optax.join_schedules([warmup, decay], [t.warmup_steps])


def decay_mask(params):
  """nanoGPT's weight-decay rule: matrices (ndim >= 2: kernels and embeddings) decay; biases and norms don't."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(t: config_lib.TrainConfig) -> optax.GradientTransformation:
  tx = optax.adamw(lr_schedule(t), b1=t.b1, b2=t.b2, weight_decay=t.weight_decay,
                   mask=decay_mask if t.weight_decay_mask == 'matrices' else None)
  if t.grad_clip:
    tx = optax.chain(optax.clip_by_global_norm(t.grad_clip), tx)
  # One concatenated vector instead of one update per parameter array: the same arithmetic in a few kernels
  # (a tiny model's step is bound by kernel count), at the cost of a concat/split per step.
  return optax.flatten(tx) if t.flat_optimizer else tx


def create_state(cfg: config_lib.Config, mesh) -> tuple[nnx.GraphDef, nnx.State]:
  """Model and optimizer, born sharded on `mesh` (no full host copy), split into (graphdef, state)."""
  with jax.set_mesh(mesh):
    model = Transformer(cfg.model, rngs=nnx.Rngs(cfg.train.seed))
    opt = nnx.Optimizer(model, make_optimizer(cfg.train), wrt=nnx.Param)
    return nnx.split((model, opt))


def cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> dict[str, jax.Array]:
  """Sums over weighted positions: loss (nats), correct top-1 predictions, weight."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return {'loss': jnp.sum(nll * weights), 'correct': jnp.sum(correct * weights), 'weight': jnp.sum(weights)}


def positions_for(mesh, seq_len: int) -> np.ndarray | None:
  """The token order inside the model: zigzag when queries are split over `seq`, else None (0..T-1)."""
  n = mesh.shape['seq']
  return None if n == 1 else sharding.zigzag(seq_len, n).astype(np.int32)


def make_train_step(graphdef: nnx.GraphDef, cfg: config_lib.Config, positions: np.ndarray | None):
  """A pure (state, batches[K, B, T]) -> (state, metrics) doing K optimizer steps."""
  base_key = jax.random.key(cfg.train.seed + 1)
  use_dropout = cfg.model.dropout > 0 or cfg.model.attn_dropout > 0

  def loss_fn(model, batch, key):
    pos = None if positions is None else jnp.asarray(positions)
    logits = model(batch['inputs'], pos, dropout_key=key)
    sums = cross_entropy(logits, batch['targets'], jnp.ones(batch['targets'].shape, jnp.float32))
    return sums['loss'] / sums['weight']

  def one_step(state, batch):
    model, opt = nnx.merge(graphdef, state)
    key = jax.random.fold_in(base_key, opt.step[...]) if use_dropout else None
    loss, grads = nnx.value_and_grad(loss_fn)(model, batch, key)
    opt.update(model, grads)
    if cfg.train.flat_optimizer:
      # The norm of the vector optax.flatten builds anyway (XLA merges the two): one reduction, not one per array.
      grad_norm = jnp.linalg.norm(ravel_pytree(grads)[0])
    else:
      grad_norm = optax.tree_utils.tree_norm(grads)
    return nnx.state((model, opt)), {'loss': loss, 'grad_norm': grad_norm}

  def step(state, batches):
    # Unrolled, the K steps are one straight-line program (longer compile, no loop between steps).
    state, metrics = jax.lax.scan(one_step, state, batches, unroll=cfg.train.unroll_steps)
    return state, jax.tree.map(jnp.mean, metrics)

  return step


@jax.jit
def all_finite(state) -> jax.Array:
  """Whether every array of the state is finite (not a norm: squares of finite ~1e20 values overflow)."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(state)]))


def make_eval_step(graphdef: nnx.GraphDef, positions: np.ndarray | None):
  def step(state, batch):
    model, _ = nnx.merge(graphdef, state)
    logits = model(batch['inputs'], None if positions is None else jnp.asarray(positions))
    return cross_entropy(logits, batch['targets'], batch['weights'])
  return step


def _fmt_time(seconds: float) -> str:
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  return f'{h}h{rem // 60:02d}m' if h else f'{rem // 60}m{rem % 60:02d}s'


class _StopSignal:
  """Turns SIGTERM/SIGINT into a flag the loop polls, so it can checkpoint and exit cleanly."""

  def __init__(self):
    self.received = None
    self._old = {}

  def __enter__(self):
    if jax.process_count() > 1:
      # Several processes must stop at the same step: JAX's own preemption service (it handles SIGTERM) agrees
      # on one, see `poll`. A handler here would replace it and let each process stop on its own.
      return self
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread (e.g. a notebook worker): no handler, no harm
        pass
    return self

  def poll(self, step: int) -> str | None:
    """The signal to stop at this step for, or None; the same answer on every process."""
    if jax.process_count() > 1 and multihost_utils.reached_preemption_sync_point(step):
      self.received = 'SIGTERM'
    return self.received

  def _handle(self, signum, frame):
    del frame
    self.received = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


def check_compatible(workdir: str, cfg: config_lib.Config) -> None:
  """Refuses to reuse a workdir whose run has another model (other parameters): the checkpoints stay as they are."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return
  with open(path) as f:
    saved = json.load(f)['config']
  # Through ModelConfig: an older run's config.json (model.rope, no newer keys) reads as the model it was.
  try:
    old = dataclasses.asdict(config_lib.ModelConfig(**saved['model']))
  except (TypeError, ValueError) as e:
    raise TrainingError(f'{path}: cannot read its model config ({e}); use a new --workdir') from None
  new = dataclasses.asdict(cfg.model)
  diff = [k for k in new if k not in EXECUTION_KEYS and old.get(k) != new[k]]
  if diff:
    changes = ', '.join(f'model.{k}: {old.get(k)!r} -> {new[k]!r}' for k in diff)
    raise TrainingError(f'{workdir} holds a run with another model ({changes}); use a new --workdir or the same '
                        'model config')
  old_flat = saved.get('train', {}).get('flat_optimizer', False)
  if old_flat != cfg.train.flat_optimizer:
    raise TrainingError(f'{workdir} holds a run with train.flat_optimizer={old_flat} (another optimizer state '
                        f'layout); resume it with --config.train.flat_optimizer={old_flat}')


def _device_batch(batch: dict[str, np.ndarray], shard, perm) -> dict[str, jax.Array]:
  """This process's rows -> one global array per key (rows over data x fsdp, positions over seq)."""
  out = {}
  for k, v in batch.items():
    if perm is not None:
      v = v[..., perm]
    global_shape = (v.shape[0] * jax.process_count(),) + v.shape[1:] if v.ndim == 2 else None
    if v.ndim == 3:  # [K, B, T] stacked steps
      global_shape = (v.shape[0], v.shape[1] * jax.process_count(), v.shape[2])
    out[k] = jax.make_array_from_process_local_data(shard, v, global_shape)
  return out


@dataclasses.dataclass(frozen=True)
class Steps:
  """A run's jitted train and eval steps on its mesh, and how host batches become their global inputs."""

  train: Any  # (state, batches[K, B, T]) -> (state, metrics), state donated
  eval: Any  # (state, batch[B, T]) -> weighted sums
  shard: jax.sharding.NamedSharding  # [B, T]
  stacked: jax.sharding.NamedSharding  # [K, B, T]
  perm: np.ndarray | None  # token order inside the model (zigzag under a seq split)

  def eval_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return _device_batch(batch, self.shard, self.perm)

  def train_batches(self, batches: list[dict[str, np.ndarray]]) -> dict[str, jax.Array]:
    """K host batches -> one [K, B, T] global batch per key, the input of one `train` call."""
    return _device_batch({k: np.stack([b[k] for b in batches]) for k in batches[0]}, self.stacked, self.perm)


def build_steps(cfg: config_lib.Config, mesh, graphdef: nnx.GraphDef, state: nnx.State) -> Steps:
  """jits the train and eval steps with the state's and the batches' shardings on `mesh`."""
  perm = positions_for(mesh, cfg.data.seq_len)
  shard = sharding.batch_sharding(mesh)
  stacked = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, *shard.spec))
  state_sh = sharding.state_shardings(state, mesh)
  with jax.set_mesh(mesh):
    train_step = jax.jit(make_train_step(graphdef, cfg, perm), in_shardings=(state_sh, stacked),
                         out_shardings=(state_sh, None), donate_argnums=0)
    eval_step = jax.jit(make_eval_step(graphdef, perm), in_shardings=(state_sh, shard))
  return Steps(train=train_step, eval=eval_step, shard=shard, stacked=stacked, perm=perm)


def train(config, workdir: str) -> dict[str, float]:
  """Trains (or resumes) the run in `workdir`; returns the last eval metrics."""
  workdir = os.path.abspath(workdir)
  vocab_path = os.path.join(workdir, 'vocab.json')
  vocab = data_lib.Vocab.load(vocab_path) if os.path.exists(vocab_path) else None
  dcfg = config.data
  corpus = data_lib.load_corpus(dcfg.path, dcfg.val_fraction, vocab)
  cfg = config_lib.from_config(config, corpus.vocab.size)
  data_lib.check_seq_len(corpus, cfg.data.seq_len, val_fraction=cfg.data.val_fraction, path=cfg.data.path)
  check_compatible(workdir, cfg)
  mesh = sharding.make_mesh(cfg.mesh)
  sharding.check_fits(cfg, mesh)
  t = cfg.train
  is_main = jax.process_index() == 0

  graphdef, state = create_state(cfg, mesh)
  num_params = count_params(nnx.merge(graphdef, state)[0])
  logging.info('model: %s attention (%s), %s parameters; mesh %s', cfg.model.attention,
               cfg.model.impl if cfg.model.attention == 'selective' else '-', f'{num_params:,}', dict(mesh.shape))

  ds = data_lib.train_dataset(corpus.train, seq_len=cfg.data.seq_len, global_batch_size=t.batch_size,
                              seed=t.seed, process_index=jax.process_index(), process_count=jax.process_count())
  data_iter = data_lib.train_iterator(ds, prefetch=cfg.data.prefetch, worker_count=cfg.data.worker_count)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints'), keep=t.keep_checkpoints)
  step = 0
  latest = ckpt.latest_step()
  if latest is not None:
    state, meta = ckpt.restore(latest, ckpt_lib.abstract(state), data_iter)
    step = int(meta['step'])
    logging.info('resumed from %s at step %d', ckpt.directory, step)

  if is_main:
    os.makedirs(workdir, exist_ok=True)
    corpus.vocab.save(vocab_path)
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      json.dump({'config': cfg.to_dict(), 'num_params': num_params, 'vocab_size': corpus.vocab.size,
                 'jax_version': jax.__version__}, f, indent=2)

  steps = build_steps(cfg, mesh, graphdef, state)
  evals = [steps.eval_batch(b) for b in data_lib.eval_batches(
      corpus.val, seq_len=cfg.data.seq_len, global_batch_size=t.batch_size, num_batches=t.eval_batches,
      process_index=jax.process_index(), process_count=jax.process_count())]

  def next_batches():
    return steps.train_batches([next(data_iter) for _ in range(t.steps_per_call)])

  # The eval samples' prompt; '' takes the first line of the corpus (selattn.sample's default too).
  prompt = t.sample_prompt or generate_lib.corpus_prompt(
      corpus.vocab.decode(corpus.train[:generate_lib.PROMPT_SCAN]))

  def evaluate(state, step):
    with jax.set_mesh(mesh):
      totals = None
      for b in evals:
        sums = steps.eval(state, b)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
      totals = jax.device_get(totals)
    loss = float(totals['loss'] / totals['weight'])
    res = {'eval/loss': loss, 'eval/accuracy': float(totals['correct'] / totals['weight']),
           'eval/bpc': loss / math.log(2)}
    logging.info('eval at step %d: loss %.4f | accuracy %.4f | bpc %.4f (%d held-out chars)', step, loss,
                 res['eval/accuracy'], res['eval/bpc'], int(totals['weight']))
    writer.write_scalars(step, res)
    if t.sample_length:
      # Every process runs the (jitted, globally sharded) generation; only process 0 writes it.
      model = nnx.merge(graphdef, state)[0]
      with jax.set_mesh(mesh):
        text = generate_lib.generate(model, corpus.vocab, prompt, t.sample_length, temperature=1.0, top_k=0,
                                     seed=step, max_len=cfg.data.seq_len)
      writer.write_texts(step, {'sample': text})
      if is_main:
        logging.info('sample at step %d:\n%s', step, text)
    return res

  writer = metrics_lib.MetricWriter(workdir, enabled=is_main)
  schedule = lr_schedule(t)
  result: dict[str, float] = {}
  tokens_per_step = t.batch_size * cfg.data.seq_len
  try:
    if step >= t.num_steps:
      logging.info('step %d already reached train.num_steps=%d: nothing to train', step, t.num_steps)
      return evaluate(state, step)
    batches = next_batches()
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
      compiled = steps.train.lower(state, batches).compile()
    mem = compiled.memory_analysis()
    logging.info('compiled the train step in %.1fs; device memory: %s', time.perf_counter() - t0,
                 f'temp {mem.temp_size_in_bytes / 2**20:.1f} MiB, args {mem.argument_size_in_bytes / 2**20:.1f} '
                 f'MiB' if mem is not None else 'n/a')
    pending = []  # (step, metrics) of dispatched calls not yet read: read at log and checkpoint steps only
    window_start, window_steps = time.perf_counter(), 0
    run_start, run_start_step = time.perf_counter(), step
    last_good_saved = latest

    def flush() -> list[dict]:
      """Reads the pending metrics (one device sync) and stops the run on a non-finite loss or gradient."""
      got = jax.device_get([m for _, m in pending])
      for (s, _), m in zip(pending, got):
        if not (np.isfinite(m['loss']) and np.isfinite(m['grad_norm'])):
          raise TrainingError(f'the loss is not finite after step {s} (loss {m["loss"]}, grad norm '
                              f'{m["grad_norm"]}): stopping; {kept()}')
      pending.clear()
      return got

    def kept() -> str:
      if last_good_saved is None:
        return f'no checkpoint was saved in {ckpt.directory}'
      return f'the last good checkpoint (step {last_good_saved}) is kept in {ckpt.directory}'

    with _StopSignal() as stop:
      while step < t.num_steps:
        with jax.transfer_guard('disallow'):
          state, metrics = compiled(state, batches)
        step += t.steps_per_call
        pending.append((step, metrics))
        window_steps += t.steps_per_call
        last = step >= t.num_steps
        # One read of the flag per step: a signal arriving later in this step is handled at the next one.
        stopping = stop.poll(step)
        save = step % t.checkpoint_every == 0 or last or stopping
        if not (last or save):
          # The host builds the next batches while the device runs this step. At a checkpoint step this waits
          # until after the save: the saved iterator state must be that of step + 1's batches.
          batches = next_batches()
        if step % t.log_every == 0 or last:
          got = flush()
          dt = time.perf_counter() - window_start
          lr = float(schedule(step - 1))
          rate = window_steps * tokens_per_step / dt
          eta = (t.num_steps - step) * (time.perf_counter() - run_start) / max(step - run_start_step, 1)
          loss = float(np.mean([m['loss'] for m in got]))
          grad_norm = float(got[-1]['grad_norm'])
          logging.info('step %d/%d | loss %.4f | lr %.2e | grad norm %.3f | %.3g tok/s | %.2f ms/step | ETA %s',
                       step, t.num_steps, loss, lr, grad_norm, rate, 1000 * dt / window_steps, _fmt_time(eta))
          writer.write_scalars(step, {'train/loss': loss, 'train/learning_rate': lr, 'train/grad_norm': grad_norm,
                                      'train/tokens_per_second': rate})
          window_start, window_steps = time.perf_counter(), 0
        if (t.eval_every and step % t.eval_every == 0) or last:
          result = evaluate(state, step)
          window_start = time.perf_counter()  # eval time is not training time
        if save:
          flush()
          # A finite loss and gradient can still give non-finite parameters (an update that overflows).
          if not bool(jax.device_get(all_finite(state))):
            raise TrainingError(f'the parameters are not finite after step {step}: stopping; {kept()}')
          ckpt.save(step, state, data_iter, {'step': step, 'model': dataclasses.asdict(cfg.model)})
          last_good_saved = step
          if not last and not stopping:
            batches = next_batches()
        if stopping:
          logging.warning('%s received: saved a checkpoint at step %d and stopping', stopping, step)
          break
    jax.block_until_ready(state)  # before exiting: a peer process may still be in a collective with us
    return result
  finally:
    ckpt.close()
    writer.close()
