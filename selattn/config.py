"""Configs: ml_collections at the command line, frozen dataclasses inside.

`from_config()` is the one place values are checked; a bad value raises `ConfigError` (a ValueError) whose
message names the key, e.g. "model.d_model=65 is not divisible by model.num_heads=2".
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

ATTENTIONS = ('standard', 'selective', 'reference')
SELECTIVE_IMPLS = ('auto', 'factored', 'fused', 'blockwise', 'materialized')
KV_GENERATORS = ('linear', 'mlp')
DTYPES = ('float32', 'bfloat16')
LR_SCHEDULES = ('constant', 'cosine')
NORMS = ('post', 'pre')
ACTIVATIONS = ('relu', 'gelu')
GELU_IMPLS = ('auto', 'jax', 'erf32', 'poly32')
POSITIONS = ('rope', 'learned', 'none')
INITS = ('original', 'nanogpt')
SELECTIVE_PARTS = ('both', 'keys', 'values')
DECAY_MASKS = ('all', 'matrices')
VOCABS = ('chars', 'bytes')
SPLITS = ('tail', 'enwik8')
FUSED_BACKWARDS = ('auto', 'split', 'merged', 'mgpu')
FUSED_FORWARDS = ('auto', 'triton', 'mgpu')
DROPOUT_RNGS = ('threefry', 'hash')
ATTN_KERNELS = ('auto', 'flash', 'dense')


class ConfigError(ValueError):
  """A config value that cannot work; the message names the key."""


def _check(ok: bool, msg: str) -> None:
  if not ok:
    raise ConfigError(msg)


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
  _check(value in choices, f'{name}={value!r} is not one of {", ".join(map(repr, choices))}')


def _positive(name: str, value: float, allow_zero: bool = False) -> None:
  _check(value >= 0 if allow_zero else value > 0,
         f'{name}={value!r} must be {"non-negative" if allow_zero else "positive"}')


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int
  attention: str = 'selective'
  selective_impl: str = 'auto'
  kv_generator: str = 'linear'
  kv_hidden: int = 256
  d_model: int = 64
  num_heads: int = 2
  num_layers: int = 4
  ffn_mult: int = 4
  positions: str = 'rope'
  rope_theta: float = 10000.0
  norm: str = 'post'
  attn_out_proj: bool = False
  activation: str = 'relu'
  gelu_impl: str = 'auto'
  linear_bias: bool = False
  norm_bias: bool = True
  head_bias: bool = True
  tie_embeddings: bool = False
  init: str = 'original'
  selective_parts: str = 'both'
  dropout: float = 0.0
  attn_dropout: float = 0.0
  dtype: str = 'float32'
  block_q: int = 128
  block_k: int = 128
  fused_block_q: int = 16
  fused_block_k: int = 16
  fused_block_f: int = 32
  fused_backward: str = 'auto'
  fused_forward: str = 'auto'
  fused_heads_per_program: int = 0
  fused_fwd_splits: int = 1
  fused_bwd_splits: int = 1
  fused_num_warps: int = 8
  fused_num_stages: int = 1
  attn_kernel: str = 'auto'
  dropout_rng: str = 'threefry'
  flash_block_q: int = 64
  flash_block_k: int = 64
  flash_num_warps: int = 4
  flash_num_stages: int = 2
  remat: bool = False
  # Rows of the learned position table: data.seq_len when positions='learned', else 0 (set by from_config).
  max_len: int = 0
  # The old boolean spelling of `positions`, still read from old configs and config.json files: True is 'rope',
  # False 'none'. Always set to (positions == 'rope') after validation, so `cfg.rope` reads "RoPE is on".
  rope: bool | None = None

  def __post_init__(self):
    p = 'model.'
    if self.rope is not None and self.positions == 'rope' and not self.rope:
      object.__setattr__(self, 'positions', 'none')  # an old config's rope=False
    _choice(p + 'positions', self.positions, POSITIONS)
    _check(self.rope is None or self.rope == (self.positions == 'rope'),
           f'model.rope={self.rope!r} contradicts model.positions={self.positions!r} (rope is the old spelling: '
           'set only model.positions)')
    if self.attention == 'reference' and self.positions == 'rope':
      object.__setattr__(self, 'positions', 'none')  # flax's MHA applies no RoPE (the default 'rope' means none)
    object.__setattr__(self, 'rope', self.positions == 'rope')
    _choice(p + 'attention', self.attention, ATTENTIONS)
    _choice(p + 'selective_impl', self.selective_impl, SELECTIVE_IMPLS)
    _choice(p + 'kv_generator', self.kv_generator, KV_GENERATORS)
    _choice(p + 'dtype', self.dtype, DTYPES)
    _choice(p + 'norm', self.norm, NORMS)
    _choice(p + 'activation', self.activation, ACTIVATIONS)
    _choice(p + 'gelu_impl', self.gelu_impl, GELU_IMPLS)
    _choice(p + 'init', self.init, INITS)
    _choice(p + 'selective_parts', self.selective_parts, SELECTIVE_PARTS)
    _choice(p + 'fused_backward', self.fused_backward, FUSED_BACKWARDS)
    _choice(p + 'fused_forward', self.fused_forward, FUSED_FORWARDS)
    _choice(p + 'attn_kernel', self.attn_kernel, ATTN_KERNELS)
    _choice(p + 'dropout_rng', self.dropout_rng, DROPOUT_RNGS)
    for k in ('vocab_size', 'd_model', 'num_heads', 'num_layers', 'ffn_mult', 'kv_hidden', 'block_q', 'block_k'):
      _positive(p + k, getattr(self, k))
    _positive(p + 'rope_theta', self.rope_theta)
    _positive(p + 'max_len', self.max_len, allow_zero=True)
    _positive(p + 'fused_heads_per_program', self.fused_heads_per_program, allow_zero=True)
    for k in ('fused_fwd_splits', 'fused_bwd_splits', 'fused_num_stages', 'flash_num_stages'):
      _positive(p + k, getattr(self, k))
    for k in ('fused_num_warps', 'flash_num_warps'):
      _check(getattr(self, k) in (1, 2, 4, 8, 16),
             f'model.{k}={getattr(self, k)!r} must be 1, 2, 4, 8 or 16 (warps of a Triton program)')
    _check(self.fused_heads_per_program == 0 or self.num_heads % self.fused_heads_per_program == 0,
           f'model.fused_heads_per_program={self.fused_heads_per_program} does not divide '
           f'model.num_heads={self.num_heads}')
    for k in ('dropout', 'attn_dropout'):
      _check(0.0 <= getattr(self, k) < 1.0, f'model.{k}={getattr(self, k)!r} must be in [0, 1)')
    for k in ('fused_block_f', 'flash_block_q', 'flash_block_k'):
      v = getattr(self, k)
      _check(v >= 16 and v & (v - 1) == 0, f'{p}{k}={v!r} must be a power of two >= 16 (a GPU matmul tile)')
    for k in ('fused_block_q', 'fused_block_k'):
      v = getattr(self, k)
      _check(v >= 1 and v & (v - 1) == 0, f'{p}{k}={v!r} must be a power of two')
    _check(self.fused_block_q * self.fused_block_k >= 16,
           f'{p}fused_block_q * {p}fused_block_k = {self.fused_block_q * self.fused_block_k} must be >= 16 (the '
           "pairs of a tile are a GPU matmul's rows)")
    _check(self.d_model % self.num_heads == 0,
           f'model.d_model={self.d_model} is not divisible by model.num_heads={self.num_heads}')
    _check(self.positions != 'learned' or self.max_len > 0,
           "model.positions='learned' needs the table size model.max_len (from_config sets it to data.seq_len)")
    if self.attention == 'reference':
      _check(not self.attn_out_proj, 'model.attn_out_proj=True: the reference attention (flax MHA) has its own '
             'output projection already')
      _check(self.attn_dropout == 0.0, "model.attn_dropout needs model.attention='standard' or 'selective'")
    if self.selective_parts != 'both':
      _check(self.attention == 'selective' and self.kv_generator == 'linear',
             f"model.selective_parts={self.selective_parts!r} needs model.attention='selective' with "
             "model.kv_generator='linear' (an ablation of the linear generator's two halves)")
    if self.rope:
      _check(self.head_dim % 2 == 0,
             "model.positions='rope' needs an even head dim, got "
             f'model.d_model/model.num_heads={self.head_dim}')
    if self.attention == 'selective' and self.selective_impl == 'factored':
      _check(self.kv_generator == 'linear',
             "model.selective_impl='factored' needs model.kv_generator='linear' (the identity holds only for a "
             "linear K/V generator); use 'blockwise' or 'materialized' for 'mlp'")

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @property
  def impl(self) -> str:
    """The selective implementation that actually runs ('auto' resolved)."""
    if self.selective_impl != 'auto':
      return self.selective_impl
    if self.kv_generator == 'linear':
      return 'factored'
    import jax  # pylint: disable=g-import-not-at-top  (only 'auto' needs to know the backend)
    # The fused kernels are Triton kernels on GPU; elsewhere they run interpreted (tests), far slower than XLA.
    # On an H200 they beat blockwise at its best tiles in float32 at kv_hidden 64 and 256, and in bf16 at 64; in
    # bf16 at 256 blockwise is 1.1x faster with 33-38x the temporary memory (BENCHMARKS.md, the MLP generator section).
    return 'fused' if jax.default_backend() == 'gpu' else 'blockwise'

  @property
  def ffn_dim(self) -> int:
    return self.ffn_mult * self.d_model


@dataclasses.dataclass(frozen=True)
class DataConfig:
  path: str = ''
  vocab: str = 'chars'
  split: str = 'tail'
  store_dir: str = ''
  seq_len: int = 299
  val_fraction: float = 0.2
  worker_count: int = 0
  prefetch: int = 2

  def __post_init__(self):
    _choice('data.vocab', self.vocab, VOCABS)
    _choice('data.split', self.split, SPLITS)
    _positive('data.seq_len', self.seq_len)
    _check(0.0 < self.val_fraction < 1.0, f'data.val_fraction={self.val_fraction!r} must be in (0, 1)')
    _positive('data.worker_count', self.worker_count, allow_zero=True)
    _positive('data.prefetch', self.prefetch, allow_zero=True)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  seed: int = 0
  num_steps: int = 200_000
  batch_size: int = 16
  learning_rate: float = 1e-4
  lr_schedule: str = 'constant'
  warmup_steps: int = 0
  min_learning_rate: float = 0.0
  lr_decay_steps: int = 0
  b1: float = 0.9
  b2: float = 0.999
  weight_decay: float = 1e-4
  weight_decay_mask: str = 'all'
  grad_clip: float = 0.0
  flat_optimizer: bool = False
  steps_per_call: int = 1
  unroll_steps: bool = False
  log_every: int = 100
  eval_every: int = 5000
  eval_batches: int = 0
  checkpoint_every: int = 5000
  keep_checkpoints: int = 3
  sample_length: int = 200
  sample_prompt: str = ''
  profile_steps: int = 0
  xla_options: str = ''

  def __post_init__(self):
    p = 'train.'
    _choice(p + 'lr_schedule', self.lr_schedule, LR_SCHEDULES)
    _choice(p + 'weight_decay_mask', self.weight_decay_mask, DECAY_MASKS)
    _check(not (self.flat_optimizer and self.weight_decay_mask != 'all'),
           f'train.weight_decay_mask={self.weight_decay_mask!r} needs train.flat_optimizer=False (the flat '
           'optimizer sees one vector, not the parameter shapes the mask is about)')
    _check(not self.lr_decay_steps or self.lr_decay_steps > self.warmup_steps,
           f'train.lr_decay_steps={self.lr_decay_steps} must be 0 (decay to train.num_steps) or more than '
           f'train.warmup_steps={self.warmup_steps}')
    for k in ('num_steps', 'warmup_steps', 'lr_decay_steps', 'eval_every', 'eval_batches', 'grad_clip', 'weight_decay',
              'min_learning_rate', 'sample_length', 'profile_steps'):
      _positive(p + k, getattr(self, k), allow_zero=True)
    for k in ('batch_size', 'learning_rate', 'steps_per_call', 'log_every', 'checkpoint_every', 'keep_checkpoints'):
      _positive(p + k, getattr(self, k))
    for k in ('b1', 'b2'):
      _check(0.0 <= getattr(self, k) < 1.0, f'train.{k}={getattr(self, k)!r} must be in [0, 1)')
    for k in ('log_every', 'eval_every', 'checkpoint_every'):
      v = getattr(self, k)
      _check(v % self.steps_per_call == 0,
             f'train.{k}={v} must be a multiple of train.steps_per_call={self.steps_per_call}')
    xla_compile_options(self.xla_options)  # the format; train.compiler_options asks XLA about the names


def xla_compile_options(text: str) -> dict[str, Any]:
  """train.xla_options, 'xla_name=value,...', as jax.jit's compiler_options (true/false as bools, numbers as
  numbers): XLA's debug options for this run's steps only, where XLA_FLAGS would set them for the process."""
  options: dict[str, Any] = {}
  for item in (s.strip() for s in text.split(',')):
    if not item:
      continue
    name, _, value = (part.strip() for part in item.partition('='))
    _check(name.startswith('xla_') and value != '',
           f'train.xla_options: {item!r} is not xla_<name>=<value> (e.g. xla_gpu_enable_triton_gemm=false)')
    if value.lower() in ('true', 'false'):
      options[name] = value.lower() == 'true'
      continue
    for kind in (int, float):
      try:
        options[name] = kind(value)
        break
      except ValueError:
        pass
    else:
      options[name] = value
  return options


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  data: int = -1
  fsdp: int = 1
  seq: int = 1
  tensor: int = 1

  def __post_init__(self):
    sizes = dataclasses.asdict(self)
    for k, v in sizes.items():
      _check(v == -1 or v >= 1, f'mesh.{k}={v} must be -1 (the rest) or >= 1')
    _check(sum(v == -1 for v in sizes.values()) <= 1, 'only one mesh axis may be -1')

  def resolve(self, num_devices: int) -> dict[str, int]:
    """Axis sizes with -1 filled in; raises ConfigError unless they multiply to num_devices."""
    sizes = dataclasses.asdict(self)
    known = 1
    for v in sizes.values():
      known *= v if v > 0 else 1
    for k, v in sizes.items():
      if v == -1:
        _check(num_devices % known == 0,
               f'mesh sizes {sizes} do not divide the {num_devices} devices')
        sizes[k] = num_devices // known
    total = 1
    for v in sizes.values():
      total *= v
    _check(total == num_devices,
           f'mesh data*fsdp*seq*tensor = {total} ({sizes}) but there are {num_devices} devices')
    return sizes


@dataclasses.dataclass(frozen=True)
class Config:
  model: ModelConfig
  data: DataConfig
  train: TrainConfig
  mesh: MeshConfig

  def __post_init__(self):
    # The dropout mask is a function of global (batch row, head, query, key) indices; inside the `seq` split's
    # shard_map the rows and heads are local, so the split would draw another mask.
    _check(self.model.attn_dropout == 0.0 or self.mesh.seq == 1,
           f'model.attn_dropout={self.model.attn_dropout} is not supported with mesh.seq={self.mesh.seq} > 1')

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def _section(cls, cfg, name: str, **extra):
  fields = {f.name for f in dataclasses.fields(cls)}
  values = dict(cfg) if cfg is not None else {}
  unknown = set(values) - fields
  _check(not unknown, f'unknown config key(s): {", ".join(sorted(f"{name}.{k}" for k in unknown))}')
  values.update(extra)
  for f in dataclasses.fields(cls):
    if f.name in values and f.type in ('int', 'float', 'bool', 'str'):
      v = values[f.name]
      want = {'int': int, 'float': float, 'bool': bool, 'str': str}[f.type]
      if want is float and isinstance(v, int) and not isinstance(v, bool):
        v = float(v)
      _check(isinstance(v, want) and not (want is int and isinstance(v, bool)),
             f'{name}.{f.name}={v!r} must be of type {f.type}')
      # inf and nan pass most range checks (inf > 0) and then poison a run (a NaN loss at step 1, or inf RoPE
      # angles): every float key must be a finite number.
      _check(want is not float or math.isfinite(v), f'{name}.{f.name}={v!r} must be a finite number')
      values[f.name] = v
  return cls(**values)


def from_config(cfg, vocab_size: int) -> Config:
  """Checks an ml_collections config (or a nested dict) and returns frozen dataclasses."""
  cfg = cfg.to_dict() if hasattr(cfg, 'to_dict') else dict(cfg)
  unknown = set(cfg) - {'model', 'data', 'train', 'mesh'}
  _check(not unknown, f'unknown config section(s): {", ".join(sorted(unknown))}')
  data = _section(DataConfig, cfg.get('data'), 'data')
  model = dict(cfg.get('model') or {})
  # The learned position table has one row per position of the context, so its size is data.seq_len.
  learned = model.get('positions') == 'learned'
  return Config(
      model=_section(ModelConfig, model, 'model', vocab_size=vocab_size, max_len=data.seq_len if learned else 0),
      data=data,
      train=_section(TrainConfig, cfg.get('train'), 'train'),
      mesh=_section(MeshConfig, cfg.get('mesh'), 'mesh'),
  )
