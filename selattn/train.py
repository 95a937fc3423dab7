"""Training: one pure jitted step over the split (model, optimizer) state, evaluation, and the loop.

The loop never syncs with the device between log steps: the host builds the next batches while the device runs the
current step, and metrics are read only at log and checkpoint steps. It logs progress with an ETA, evaluates on
fixed held-out windows, writes TensorBoard scalars and a text sample, saves Orbax checkpoints (asynchronously; on
SIGTERM/SIGINT too) and resumes from the latest one on start.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
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
from selattn import perf
from selattn import runlog
from selattn import sharding
from selattn import stopping
from selattn import store as store_lib
from selattn import workdir as workdir_lib
from selattn.model import Transformer, count_params

# Model keys that only choose how the same function is computed: a run may resume with other values.
EXECUTION_KEYS = ('selective_impl', 'block_q', 'block_k', 'fused_block_q', 'fused_block_k', 'fused_block_f',
                  'fused_backward', 'fused_forward', 'fused_heads_per_program', 'fused_fwd_splits', 'fused_bwd_splits',
                  'fused_num_warps', 'fused_num_stages', 'attn_kernel', 'flash_block_q', 'flash_block_k',
                  'flash_num_warps', 'flash_num_stages', 'remat', 'dtype', 'gelu_impl', 'dropout', 'dropout_rng',
                  'attn_dropout')


class TrainingError(RuntimeError):
  """The run cannot continue (NaN loss, incompatible workdir, full disk); the message says why, in one line."""


def lr_schedule(t: config_lib.TrainConfig) -> optax.Schedule:
  """Linear warmup to learning_rate, then constant or cosine decay to min_learning_rate at lr_decay_steps (0: at
  num_steps), the floor after it. A run stopped short of the horizon follows the longer run's rates."""
  if t.lr_schedule == 'cosine':
    horizon = t.lr_decay_steps or t.num_steps
    decay = optax.cosine_decay_schedule(t.learning_rate, max(horizon - t.warmup_steps, 1),
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


def dropout_base_key(seed: int) -> jax.Array:
  """The key a run's dropout masks derive from (folded with each step's number): from train.seed."""
  return jax.random.key(seed + 1)


def make_train_step(graphdef: nnx.GraphDef, cfg: config_lib.Config, positions: np.ndarray | None):
  """A pure (state, batches[K, B, T]) -> (state, metrics) doing K optimizer steps."""
  keyed = make_keyed_train_step(graphdef, cfg, positions)
  base_key = dropout_base_key(cfg.train.seed)
  return lambda state, batches: keyed(state, batches, base_key)


def make_keyed_train_step(graphdef: nnx.GraphDef, cfg: config_lib.Config, positions: np.ndarray | None):
  """make_train_step's step with the dropout base key as an argument: (state, batches, base_key) -> (state,
  metrics). selattn.stack maps it over seeds (each seed's state, batches and key)."""
  use_dropout = cfg.model.dropout > 0 or cfg.model.attn_dropout > 0

  def loss_fn(model, batch, key):
    pos = None if positions is None else jnp.asarray(positions)
    logits = model(batch['inputs'], pos, dropout_key=key)
    sums = cross_entropy(logits, batch['targets'], jnp.ones(batch['targets'].shape, jnp.float32))
    return sums['loss'] / sums['weight']

  def one_step(state, batch, base_key):
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

  def step(state, batches, base_key):
    # Unrolled, the K steps are one straight-line program (longer compile, no loop between steps).
    state, metrics = jax.lax.scan(functools.partial(one_step, base_key=base_key), state, batches,
                                  unroll=cfg.train.unroll_steps)
    return state, jax.tree.map(jnp.mean, metrics)

  return step


def make_eval_step(graphdef: nnx.GraphDef, positions: np.ndarray | None):
  def step(state, batch):
    model, _ = nnx.merge(graphdef, state)
    logits = model(batch['inputs'], None if positions is None else jnp.asarray(positions))
    return cross_entropy(logits, batch['targets'], batch['weights'])
  return step


def call_summary(step: int, progress: Progress) -> str:
  """'this call trained N steps in T': what this call (of a run that may have resumed) did by `step`."""
  took = _fmt_time(time.perf_counter() - progress.run_start)
  return f'this call trained {step - progress.step:,} steps in {took}'


def finished_line(step: int, loss: float, progress: Progress, checkpoints: str, workdir: str) -> str:
  """A finished run's last line (its train.log's too): the step, the last held-out loss, the call's steps and time,
  where the checkpoint is and how to sample from it."""
  return (f'finished at step {step}: held-out loss {loss:.4f} | {call_summary(step, progress)} | checkpoint in '
          f'{checkpoints}; sample from it with: python -m selattn.sample --workdir {workdir}')


def _fmt_time(seconds: float) -> str:
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  return f'{h}h{rem // 60:02d}m' if h else f'{rem // 60}m{rem % 60:02d}s'


class _StopPoll:
  """Whether to stop at a step: a signal caught by `stop` (one process), or JAX's preemption sync point (several
  processes must stop at the same step; its service handles SIGTERM, so no handler of ours replaces it)."""

  def __init__(self, stop: stopping.StopSignal):
    self.stop = stop

  def __call__(self, step: int) -> str | None:
    if jax.process_count() > 1:
      return 'SIGTERM' if multihost_utils.reached_preemption_sync_point(step) else None
    return self.stop.received


def read_saved_config(workdir: str) -> dict | None:
  """The workdir's config.json ({'config': ..., ...}), None if there is none; a damaged one is a TrainingError."""
  path = os.path.join(workdir, 'config.json')
  text = workdir_lib.read_text(path)
  if text is None:
    return None
  try:
    saved = json.loads(text)
    if not isinstance(saved['config']['model'], dict):
      raise TypeError('"model" is not a dict')
  except (ValueError, KeyError, TypeError) as e:
    raise TrainingError(f'{path} is damaged ({type(e).__name__}: {e}); restore it, or remove it to resume with '
                        'the config given now') from None
  return saved


def check_compatible(workdir: str, cfg: config_lib.Config) -> None:
  """Refuses to reuse a workdir whose run has another model (other parameters): the checkpoints stay as they are."""
  saved = read_saved_config(workdir)
  if saved is None:
    return
  # Through ModelConfig: an older run's config.json (model.rope, no newer keys) reads as the model it was.
  try:
    old = dataclasses.asdict(config_lib.ModelConfig(**saved['config']['model']))
  except (TypeError, ValueError) as e:
    raise TrainingError(f'{os.path.join(workdir, "config.json")}: cannot read its model config ({e}); use a new '
                        '--workdir') from None
  new = dataclasses.asdict(cfg.model)
  diff = [k for k in new if k not in EXECUTION_KEYS and old.get(k) != new[k]]
  if diff:
    changes = ', '.join(f'model.{k}: {old.get(k)!r} -> {new[k]!r}' for k in diff)
    raise TrainingError(f'{workdir} holds a run with another model ({changes}); use a new --workdir or the same '
                        'model config')
  old_flat = saved['config'].get('train', {}).get('flat_optimizer', False)
  if old_flat != cfg.train.flat_optimizer:
    raise TrainingError(f'{workdir} holds a run with train.flat_optimizer={old_flat} (another optimizer state '
                        f'layout); resume it with --config.train.flat_optimizer={old_flat}')


def _data_name(path: str) -> str:
  return f'data.path={path!r}' + (' (the embedded corpus)' if not path else '')


def _same_path(old: str, new: str) -> bool:
  """Whether two data.path values name the same corpus: the same text after normalizing, or (an absolute path
  against a relative one, or another spelling through a link) the same existing file seen from here."""
  if not old or not new:
    return old == new  # '' is the embedded corpus
  if os.path.normpath(old) == os.path.normpath(new):
    return True
  try:
    return os.path.samefile(old, new)
  except OSError:  # either is missing from here: only the spelling could have matched
    return False


def check_same_data(workdir: str, saved: dict | None, data_cfg) -> None:
  """Refuses to resume a run on other data: another data.path, data.split or (the 'tail' split's) data.val_fraction
  (`data_cfg`, the command line's data section). Checked before the corpus is read, whose vocabulary error would
  hide the real mistake."""
  if saved is None:
    return
  data = saved['config'].get('data', {})
  old = data.get('path', '')
  if not _same_path(old, data_cfg.path):
    raise TrainingError(f'{workdir} was trained on {_data_name(old)}, not {_data_name(data_cfg.path)}; to '
                        'continue it on other data, pass --allow_data_change')
  old_split = data.get('split', 'tail')
  if old_split != data_cfg.split:
    raise TrainingError(f'{workdir} was trained with data.split={old_split!r}, not {data_cfg.split!r} (other '
                        'training and held-out tokens); to continue it so, pass --allow_data_change')
  # The 'tail' split holds out the last val_fraction: another fraction moves tokens between training and held-out.
  old_fraction = data.get('val_fraction', data_cfg.val_fraction)
  if data_cfg.split == 'tail' and old_fraction != data_cfg.val_fraction:
    raise TrainingError(f'{workdir} was trained with data.val_fraction={old_fraction!r}, not '
                        f'{data_cfg.val_fraction!r} (other training and held-out tokens); to continue it so, pass '
                        '--allow_data_change')


def check_same_text(workdir: str, saved: dict | None, data_sha256: str) -> None:
  """Refuses to resume a run on the same data.path holding another text (after check_same_data, once it is read)."""
  if saved is not None and saved.get('data_sha256') not in (None, data_sha256):
    old = saved['config'].get('data', {}).get('path', '')
    raise TrainingError(f'the text of {_data_name(old)} has changed since {workdir} was trained on it; to '
                        'continue on the new text, pass --allow_data_change')


def read_vocab(workdir: str) -> data_lib.AnyVocab | None:
  """The workdir's vocab.json, None if there is none; a damaged one is a DataError naming it."""
  path = os.path.join(workdir, 'vocab.json')
  text = workdir_lib.read_text(path)
  if text is None:
    return None
  try:
    return data_lib.vocab_from_json(text)
  except data_lib.DataError as e:
    raise data_lib.DataError(f'{path}: {e}') from None


def check_same_vocab(workdir: str, vocab: data_lib.AnyVocab | None, kind: str) -> None:
  """Refuses to resume a run of characters on bytes or the reverse (its model reads other symbols)."""
  if vocab is not None and data_lib.vocab_kind(vocab) != kind:
    old = data_lib.vocab_kind(vocab)
    raise TrainingError(f'{workdir} holds a run with data.vocab={old!r} ({vocab.size} symbols in vocab.json), not '
                        f'data.vocab={kind!r}; resume it with --config.data.vocab={old} or use a new --workdir')


def unit(vocab: data_lib.AnyVocab) -> str:
  """What a token is: 'byte' or 'char' (eval/bpb or eval/bpc: bits per byte or per character)."""
  return 'byte' if data_lib.vocab_kind(vocab) == 'bytes' else 'char'


def device_memory_limit() -> int | None:
  """Bytes one local device may use: the accelerator's limit, or on CPU the host's RAM shared by its devices."""
  device = jax.local_devices()[0]
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except  (not implemented on some backends)
    stats = None
  if stats and stats.get('bytes_limit'):
    return int(stats['bytes_limit'])
  if device.platform == 'cpu':
    try:
      ram = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    except (ValueError, OSError):
      return None
    return ram // len(jax.local_devices())
  return None


def _fmt_bytes(n: float) -> str:
  for unit in ('B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'):
    if n < 1024 or unit == 'PiB':
      return f'{n:.1f} {unit}' if unit != 'B' else f'{int(n)} B'
    n /= 1024
  return f'{n:.1f} PiB'


def memory_needed(compiled) -> int | None:
  """XLA's per-device peak for a compiled program: arguments + outputs (less donated buffers) + temporaries."""
  mem = compiled.memory_analysis()
  if mem is None:
    return None
  return (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
          + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)


def check_memory(compiled, cfg: config_lib.Config, what: str = 'the train step') -> None:
  """Refuses, before it runs, a step that cannot fit in device memory, giving XLA's estimate."""
  need, limit = memory_needed(compiled), device_memory_limit()
  if need is None or limit is None or need <= limit:
    return
  raise TrainingError(
      f'{what} needs about {_fmt_bytes(need)} per device (XLA\'s estimate for data.seq_len='
      f'{cfg.data.seq_len}, train.batch_size={cfg.train.batch_size}) but a device has {_fmt_bytes(limit)}; lower '
      'them, or use more devices, model.remat=True or (selective) model.selective_impl=blockwise')


def _resource_exhausted(e: Exception) -> bool:
  return 'RESOURCE_EXHAUSTED' in str(e) or 'Out of memory' in str(e)


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


def compiler_options(cfg: config_lib.Config) -> dict | None:
  """train.xla_options for jax.jit (None when there are none); a name XLA does not know is a TrainingError (the
  trainers ask once before the run touches its workdir)."""
  options = config_lib.xla_compile_options(cfg.train.xla_options)
  if options:
    _check_xla_options(cfg.train.xla_options)
  return options or None


@functools.lru_cache(maxsize=None)
def _check_xla_options(text: str) -> None:
  """Compiles a trivial function with these options: XLA names an option it does not know. Once per text."""
  try:
    jax.jit(lambda: 0, compiler_options=config_lib.xla_compile_options(text)).lower().compile()
  except Exception as e:  # pylint: disable=broad-except (XLA's error type differs across jax versions)
    raise TrainingError(f'train.xla_options={text!r}: {str(e).splitlines()[0]}') from None


def build_steps(cfg: config_lib.Config, mesh, graphdef: nnx.GraphDef, state: nnx.State) -> Steps:
  """jits the train and eval steps with the state's and the batches' shardings on `mesh`."""
  perm = positions_for(mesh, cfg.data.seq_len)
  shard = sharding.batch_sharding(mesh)
  stacked = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, *shard.spec))
  state_sh = sharding.state_shardings(state, mesh)
  with jax.set_mesh(mesh):
    options = compiler_options(cfg)
    train_step = jax.jit(make_train_step(graphdef, cfg, perm), in_shardings=(state_sh, stacked),
                         out_shardings=(state_sh, None), donate_argnums=0, compiler_options=options)
    eval_step = jax.jit(make_eval_step(graphdef, perm), in_shardings=(state_sh, shard), compiler_options=options)
  return Steps(train=train_step, eval=eval_step, shard=shard, stacked=stacked, perm=perm)


def train_batches(corpus: data_lib.Corpus, cfg: config_lib.Config):
  """The run's training batches: the data order of train.seed, this process's rows of each global batch."""
  t = cfg.train
  ds = data_lib.train_dataset(corpus.train, seq_len=cfg.data.seq_len, global_batch_size=t.batch_size, seed=t.seed,
                              process_index=jax.process_index(), process_count=jax.process_count())
  return data_lib.train_iterator(ds, prefetch=cfg.data.prefetch, worker_count=cfg.data.worker_count)


def resume(ckpt: ckpt_lib.Checkpointer, state, corpus: data_lib.Corpus, cfg: config_lib.Config, log=logging):
  """(step, state, unlogged losses, data iterator) from the latest usable checkpoint, or (0, state, [], a fresh
  iterator) without one; `log` says which (a stacked seed's own log, or absl's)."""
  data_iter = train_batches(corpus, cfg)
  had_checkpoints = bool(ckpt.manager.all_steps())
  restored = ckpt.restore_latest(ckpt_lib.abstract(state), data_iter)
  if restored is not None:
    step, state, meta = restored
    log.info('resumed from %s at step %d', ckpt.directory, step)
    # The losses since the last log: the next logged train/loss averages them too, as an uninterrupted run's.
    return step, state, [np.float32(v) for v in meta.get('unlogged_losses', [])], data_iter
  if had_checkpoints:
    data_iter = train_batches(corpus, cfg)  # a failed restore may have moved it
    log.warning('no usable checkpoint left in %s: training from scratch', ckpt.directory)
  return 0, state, [], data_iter


def eval_scalars(totals: dict, vocab: data_lib.AnyVocab, step: int, log=logging) -> dict[str, float]:
  """One run's held-out sums (loss, correct, weight) -> its eval scalars, logged in one line."""
  loss = float(totals['loss'] / totals['weight'])
  bits = f'eval/bp{unit(vocab)[0]}'  # eval/bpc, or eval/bpb for bytes: loss in bits per token
  res = {'eval/loss': loss, 'eval/accuracy': float(totals['correct'] / totals['weight']), bits: loss / math.log(2)}
  log.info('eval at step %d: loss %.4f | accuracy %.4f | %s %.4f (%d held-out %ss)', step, loss,
           res['eval/accuracy'], bits[5:], res[bits], int(totals['weight']), unit(vocab))
  return res


def sample(model, corpus: data_lib.Corpus, prompt: str, cfg: config_lib.Config, step: int, mesh) -> str:
  """The eval sample at `step`: train.sample_length characters from `prompt` at temperature 1."""
  with jax.set_mesh(mesh):
    return generate_lib.generate(model, corpus.vocab, prompt, cfg.train.sample_length, temperature=1.0, top_k=0,
                                 seed=step, max_len=cfg.data.seq_len)


def run_record(cfg: config_lib.Config, num_params: int, corpus: data_lib.Corpus) -> str:
  """WORKDIR/config.json's text: every key of the run, its size, vocabulary, data and jax version."""
  return json.dumps({'config': cfg.to_dict(), 'num_params': num_params, 'vocab_size': corpus.vocab.size,
                     'data_sha256': corpus.sha256, 'jax_version': jax.__version__}, indent=2) + '\n'


@dataclasses.dataclass
class Progress:
  """A log line's timing: the window since the last log (its optimizer steps and seconds) and the run's ETA."""
  t: config_lib.TrainConfig
  step: int  # the step the run (re)started at
  tokens_per_step: int

  def __post_init__(self):
    self.schedule = lr_schedule(self.t)
    self.run_start = time.perf_counter()
    self.restart()

  def restart(self) -> None:
    self.start, self.steps = time.perf_counter(), 0

  def line(self, step: int) -> tuple[float, float, float, str]:
    """(seconds of the window, learning rate of the last step, tokens/s, ETA) at `step`."""
    dt = time.perf_counter() - self.start
    eta = (self.t.num_steps - step) * (time.perf_counter() - self.run_start) / max(step - self.step, 1)
    return dt, float(self.schedule(step - 1)), self.steps * self.tokens_per_step / dt, _fmt_time(eta)


def save_checkpoint(ckpt: ckpt_lib.Checkpointer, writer: metrics_lib.MetricWriter, step: int, state, data_iter,
                    model_cfg, unlogged: list, kept, who: str = '') -> None:
  """Saves a run's checkpoint at `step`: refused if a parameter is not finite (a finite loss and gradient can still
  give non-finite parameters: an update that overflows), after everything logged up to `step` reaches the event
  file (after a kill the resumed run logs from step + 1 on, so nothing logged before it may be lost with the
  process's buffers). `kept()` says which checkpoint survives; `who` prefixes the error (a stacked seed)."""
  finite, sums = jax.device_get(ckpt_lib.fingerprint(state))
  if not finite:
    raise TrainingError(f'{who}the parameters are not finite after step {step}: stopping; {kept()}')
  ckpt.check_space()
  writer.flush()
  ckpt.save(step, state, data_iter, {
      'step': step, 'model': dataclasses.asdict(model_cfg), 'checksum': ckpt_lib.checksum(sums),
      'unlogged_losses': [float(v) for v in unlogged]})


def _header(cfg: config_lib.Config, num_params: int, mesh, workdir: str) -> str:
  """The run in one line (every key is in WORKDIR/config.json); each start's, in train.log, names its devices."""
  m, t = cfg.model, cfg.train
  attention = f'{m.attention} attention' + (f' ({m.impl}, {m.kv_generator} K/V)' if m.attention == 'selective' else '')
  sizes = 'x'.join(str(v) for v in dict(mesh.shape).values())
  devices = f'{mesh.devices.size} x {mesh.devices.flat[0].device_kind}'
  return (f'{attention}, D{m.d_model} L{m.num_layers} N{m.num_heads}, {num_params:,} parameters, {m.dtype} | '
          f'{_data_name(cfg.data.path)} ({cfg.data.vocab}, split {cfg.data.split}), seq_len {cfg.data.seq_len}, '
          f'batch {t.batch_size} | {t.num_steps} steps, '
          f'lr {t.learning_rate:g} {t.lr_schedule}, seed {t.seed} | mesh {sizes} (data x fsdp x seq x tensor) on '
          f'{devices}, JAX {jax.__version__} | all keys in {os.path.join(workdir, "config.json")}')


def _take_lock(workdir: str, is_main: bool) -> workdir_lib.Lock | None:
  """Process 0 locks the workdir for the run; every process fails together if it is in use."""
  lock, error = None, None
  if is_main:
    try:
      os.makedirs(workdir, exist_ok=True)
      lock = workdir_lib.Lock(workdir)
      lock.acquire()
    except OSError as e:
      error = workdir_lib.WorkdirError(f'cannot create --workdir={workdir}: {workdir_lib.describe_os_error(e)}')
    except workdir_lib.WorkdirError as e:
      error = e
  if jax.process_count() > 1:
    failed = bool(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
    if failed and error is None:
      error = workdir_lib.WorkdirError(f'process 0 cannot lock {workdir} (its error says why)')
  if error is not None:
    raise error
  return lock


def train(config, workdir: str, *, allow_data_change: bool = False,
          stop: stopping.StopSignal | None = None) -> dict[str, float]:
  """Trains (or resumes) the run in `workdir`; returns the last eval metrics.

  `stop`: an installed StopSignal (the command line's); by default one is installed for the loop. When the loop
  stops on a signal, it saves a checkpoint and sets `stop.stopped_at`.
  """
  workdir = os.path.abspath(workdir)
  workdir_lib.check_is_dir(workdir)
  saved = read_saved_config(workdir)
  vocab = read_vocab(workdir)
  dcfg = config.data
  if not allow_data_change:
    check_same_data(workdir, saved, dcfg)
  check_same_vocab(workdir, vocab, dcfg.vocab)
  corpus = store_lib.open_config(dcfg, vocab)
  cfg = config_lib.from_config(config, corpus.vocab.size)
  data_lib.check_seq_len(corpus, cfg.data.seq_len, val_fraction=cfg.data.val_fraction, path=cfg.data.path,
                         split=cfg.data.split)
  check_compatible(workdir, cfg)
  if not allow_data_change:
    check_same_text(workdir, saved, corpus.sha256)
  mesh = sharding.make_mesh(cfg.mesh)
  sharding.check_fits(cfg, mesh)
  compiler_options(cfg)

  # Nothing above wrote anything: a refused start leaves the workdir as it was.
  lock = _take_lock(workdir, jax.process_index() == 0)
  own_stop = stop is None
  if own_stop:
    stop = stopping.StopSignal()
    if jax.process_count() == 1:
      stop.__enter__()
  log = None
  try:
    # The lock holder's lines, from here on, also go to WORKDIR/train.log (a run refused above never wrote there).
    if lock is not None:
      log = runlog.RunLog(workdir)
      stop.on_exit.append(log.warning)  # a signal before the loop: its line too
    return _run(cfg, corpus, mesh, workdir, stop)
  except Exception as e:  # pylint: disable=broad-except  (recorded, then raised on)
    if log is not None:
      log.error(e)
    raise
  finally:
    close_run(stop, own_stop, [log] if log is not None else [], [lock] if lock is not None else [])


def close_run(stop: stopping.StopSignal, own_stop: bool, logs: list, locks: list) -> None:
  """What train and stack.train open around a run, closed: the stop signal they own, their run logs (off the stop's
  early-exit hooks), then the workdir locks, released even if closing the rest failed."""
  try:
    if own_stop:
      stop.__exit__(None, None, None)
    for log in logs:
      stop.on_exit.remove(log.warning)
      log.close()
  finally:
    for lock in locks:
      lock.release()


def _run(cfg: config_lib.Config, corpus: data_lib.Corpus, mesh, workdir: str,
         stop: stopping.StopSignal) -> dict[str, float]:
  """train's run once the workdir is locked: state, resume, compiled steps, the loop; closes what it opened."""
  t = cfg.train
  is_main = jax.process_index() == 0
  vocab_path = os.path.join(workdir, 'vocab.json')
  ckpt = writer = None
  try:
    graphdef, state = create_state(cfg, mesh)
    num_params = count_params(nnx.merge(graphdef, state)[0])
    logging.info('run: %s', _header(cfg, num_params, mesh, workdir))

    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints'), keep=t.keep_checkpoints)
    step, state, unlogged, data_iter = resume(ckpt, state, corpus, cfg)

    steps = build_steps(cfg, mesh, graphdef, state)
    # Read from the split at each evaluation (a large held-out split is never all in memory).
    evals = data_lib.eval_batches(
        corpus.val, seq_len=cfg.data.seq_len, global_batch_size=t.batch_size, num_batches=t.eval_batches,
        process_index=jax.process_index(), process_count=jax.process_count())
    writer = metrics_lib.MetricWriter(workdir, enabled=is_main)  # its file is created at the first write

    compiled_eval = []
    # The eval samples' prompt; '' takes the first line of the corpus (selattn.sample's default too).
    prompt = t.sample_prompt or generate_lib.corpus_prompt(
        corpus.vocab.decode(np.asarray(corpus.train[:generate_lib.PROMPT_SCAN])))

    def evaluate(state, step, write=True):
      with jax.set_mesh(mesh):
        if not compiled_eval:
          compiled_eval.append(steps.eval.lower(state, steps.eval_batch(evals[0])).compile())
          check_memory(compiled_eval[0], cfg, 'an eval step')
        totals = None
        for b in evals:
          sums = compiled_eval[0](state, steps.eval_batch(b))
          totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
        totals = jax.device_get(totals)
      res = eval_scalars(totals, corpus.vocab, step)
      if not write:
        return res
      writer.write_scalars(step, res)
      if t.sample_length:
        # Every process runs the (jitted, globally sharded) generation; only process 0 writes it.
        text = sample(nnx.merge(graphdef, state)[0], corpus, prompt, cfg, step, mesh)
        writer.write_texts(step, {'sample': text})
        if is_main:
          logging.info('sample at step %d:\n%s', step, text)
      return res

    if step >= t.num_steps:
      # Its eval and sample at this step are in the event files already: log the eval, write nothing.
      logging.info('step %d already reached train.num_steps=%d: nothing to train', step, t.num_steps)
      return evaluate(state, step, write=False)

    def record_run():
      """Once the step is known to fit: the files that describe the run (none is touched by a refused start)."""
      if is_main:
        # Written only when they change, atomically: a kill at any moment leaves the old or the new file.
        workdir_lib.write_text(vocab_path, corpus.vocab.to_json() + '\n')
        workdir_lib.write_text(os.path.join(workdir, 'config.json'), run_record(cfg, num_params, corpus))
      ckpt.check_space()

    # Step time and MFU scalars; a jax.profiler window from the second call on, traced by process 0 only.
    speed = perf.Speed(cfg, num_params, workdir, step + t.steps_per_call, t.profile_steps if is_main else 0,
                       mesh.size)
    return _loop(cfg, mesh, steps, state, step, unlogged, data_iter, ckpt, writer, evaluate, stop, record_run,
                 speed)
  except (metrics_lib.MetricsError, workdir_lib.WorkdirError) as e:
    raise TrainingError(f'{e}: stopping; {ckpt.describe_intact() if ckpt else "no checkpoint was touched"}') from None
  except jax.errors.JaxRuntimeError as e:
    if _resource_exhausted(e):
      raise TrainingError(f'out of device memory (data.seq_len={cfg.data.seq_len}, train.batch_size='
                          f'{cfg.train.batch_size}): {ckpt_lib.one_line(e)}') from None
    raise
  finally:
    try:
      if ckpt is not None:
        ckpt.close()
    finally:
      if writer is not None:
        writer.close()


def _loop(cfg, mesh, steps: Steps, state, step: int, unlogged: list, data_iter, ckpt: ckpt_lib.Checkpointer,
          writer: metrics_lib.MetricWriter, evaluate, stop: stopping.StopSignal, record_run,
          speed: perf.Speed) -> dict[str, float]:
  """The training loop from `step` to train.num_steps (or a stop signal); returns the last eval metrics."""
  t = cfg.train
  result: dict[str, float] = {}
  tokens_per_step = t.batch_size * cfg.data.seq_len

  def next_batches():
    return steps.train_batches([next(data_iter) for _ in range(t.steps_per_call)])

  batches = next_batches()
  t0 = time.perf_counter()
  logging.info('compiling the train step')
  try:
    with jax.set_mesh(mesh):
      compiled = steps.train.lower(state, batches).compile()
  except jax.errors.JaxRuntimeError as e:
    if _resource_exhausted(e):
      raise TrainingError(f'the train step does not fit in device memory (data.seq_len={cfg.data.seq_len}, '
                          f'train.batch_size={cfg.train.batch_size}): {ckpt_lib.one_line(e)}') from None
    raise
  need = memory_needed(compiled)
  logging.info('compiled the train step in %.1fs; device memory: %s', time.perf_counter() - t0,
               'n/a' if need is None else f'{_fmt_bytes(need)} per device')
  check_memory(compiled, cfg)
  record_run()
  pending = []  # (step, metrics) of dispatched calls not yet read: read at log and checkpoint steps only
  progress = Progress(t, step, tokens_per_step)
  grad_norm = float('nan')

  def flush() -> None:
    """Reads the pending metrics (one device sync) and stops the run on a non-finite loss or gradient."""
    nonlocal grad_norm
    got = jax.device_get([m for _, m in pending])
    for (s, _), m in zip(pending, got):
      if not (np.isfinite(m['loss']) and np.isfinite(m['grad_norm'])):
        raise TrainingError(f'the loss is not finite after step {s} (loss {m["loss"]}, grad norm '
                            f'{m["grad_norm"]}): stopping; {kept()}')
      unlogged.append(m['loss'])
      grad_norm = float(m['grad_norm'])
    pending.clear()

  def kept() -> str:
    try:
      ckpt.wait()  # a save still in flight is only good once it is on disk
    except ckpt_lib.CheckpointError as e:
      return f'and {e}'
    if ckpt.intact is None:
      return f'no checkpoint was saved in {ckpt.directory}'
    return f'the last good checkpoint (step {ckpt.intact}) is kept in {ckpt.directory}'

  poll = _StopPoll(stop)
  stop.loop_started()
  logging.info('training from step %d to %d', step, t.num_steps)
  try:
    while step < t.num_steps:
      with speed.profile.step(step), jax.transfer_guard('disallow'):
        state, metrics = compiled(state, batches)
      step += t.steps_per_call
      speed.profile.after(step, state)
      pending.append((step, metrics))
      progress.steps += t.steps_per_call
      last = step >= t.num_steps
      ckpt.poll()  # a failed asynchronous save stops the run now, not at the next save
      # One read of the flag per step: a signal arriving later in this step is handled at the next one.
      stopping_now = poll(step)
      save = step % t.checkpoint_every == 0 or last or stopping_now
      if not (last or save):
        # The host builds the next batches while the device runs this step. At a checkpoint step this waits
        # until after the save: the saved iterator state must be that of step + 1's batches.
        batches = next_batches()
      if step % t.log_every == 0 or last:
        flush()
        dt, lr, rate, eta = progress.line(step)
        # The mean over every step since the last log, whichever run computed them (see `unlogged_losses`).
        loss = float(np.mean(unlogged))
        unlogged.clear()
        logging.info('step %d/%d | loss %.4f | lr %.2e | grad norm %.3f | %s tok/s | %.2f ms/step | ETA %s',
                     step, t.num_steps, loss, lr, grad_norm, f'{rate:,.0f}', 1000 * dt / progress.steps, eta)
        writer.write_scalars(step, {'train/loss': loss, 'train/learning_rate': lr, 'train/grad_norm': grad_norm,
                                    'train/tokens_per_second': rate, **speed.scalars(progress.steps, dt)})
        progress.restart()
      if (t.eval_every and step % t.eval_every == 0) or last:
        result = evaluate(state, step)
        progress.start = time.perf_counter()  # eval time is not training time
      if save:
        flush()
        save_checkpoint(ckpt, writer, step, state, data_iter, cfg.model, unlogged, kept)
        if not last and not stopping_now:
          batches = next_batches()
      if stopping_now:
        ckpt.wait()
        stop.stopped_at = step
        logging.warning('%s received: saved a checkpoint at step %d and stopping; rerun the same command to '
                        'resume', stopping_now, step)
        break
    jax.block_until_ready(state)  # before exiting: a peer process may still be in a collective with us
    if step >= t.num_steps and stop.stopped_at is None:
      ckpt.wait()  # the line names a checkpoint that is on disk
      logging.info('%s', finished_line(step, result['eval/loss'], progress, ckpt.directory,
                                       os.path.dirname(ckpt.directory)))
  except jax.errors.JaxRuntimeError as e:
    if _resource_exhausted(e):
      raise TrainingError(f'out of device memory near step {step}: {ckpt_lib.one_line(e)}; {kept()}') from None
    raise
  except ckpt_lib.CheckpointError as e:
    raise TrainingError(str(e)) from None
  finally:
    speed.profile.close(step)
  return result
