"""Config files and `from_config()`: every file loads and validates, the named runs keep their hyperparameters,
unknown keys and bad values are one-line errors naming the key, and configs/base.py documents every key."""

import ast
import importlib
import pathlib
import tokenize

from absl import flags
from ml_collections import config_flags
import pytest

from selattn import config as config_lib

CONFIGS_DIR = pathlib.Path(__file__).resolve().parent.parent / 'configs'
VOCAB_SIZE = 83  # the embedded corpus's vocabulary

# (module, variant): every file in configs/ and every variant it documents.
ALL_CONFIGS = [('base', None), ('standard', ''), ('selective', ''), ('selective', 'quick'), ('reference', ''),
               ('nanogpt', ''), ('nanogpt', 'selective'), ('nanogpt', 'original_block,selective'), ('tiny', ''),
               ('enwik8', ''), ('enwik8', 'selective')]


def _load(name, variant):
  module = importlib.import_module(f'configs.{name}')
  return module.get_config() if variant is None else module.get_config(variant)


def _load_like_the_cli(name, variant):
  """The config as `--config configs/NAME.py[:VARIANT]` gives it to selattn.main (locked, through absl)."""
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config file', flag_values=fv, lock_config=True)
  spec = str(CONFIGS_DIR / f'{name}.py') + (f':{variant}' if variant else '')
  fv(['prog', f'--config={spec}'])
  return fv.config


def test_every_config_file_is_listed():
  # A new config file must be added to ALL_CONFIGS, or nothing here would check it.
  files = {p.stem for p in CONFIGS_DIR.glob('*.py') if p.stem != '__init__'}
  assert files == {name for name, _ in ALL_CONFIGS}


@pytest.mark.filterwarnings('ignore:the load_module:DeprecationWarning')  # ml_collections' config loader
@pytest.mark.parametrize('name,variant', ALL_CONFIGS)
def test_config_loads_and_validates(name, variant):
  cfg = _load_like_the_cli(name, variant)
  assert cfg.is_locked
  assert cfg.to_dict() == _load(name, variant).to_dict()
  c = config_lib.from_config(cfg, vocab_size=VOCAB_SIZE)
  assert c.model.vocab_size == VOCAB_SIZE
  # from_config keeps every value it was given (no silent defaulting of a key the file set).
  as_dict = c.to_dict()
  for section in ('model', 'data', 'train', 'mesh'):
    for k, v in cfg[section].items():
      assert as_dict[section][k] == v, (section, k)


ORIGINAL = dict(d_model=64, num_heads=2, num_layers=4, seq_len=299, batch_size=16, learning_rate=1e-4,
                num_steps=200_000)


def _summary(c: config_lib.Config) -> dict:
  return dict(d_model=c.model.d_model, num_heads=c.model.num_heads, num_layers=c.model.num_layers,
              seq_len=c.data.seq_len, batch_size=c.train.batch_size, learning_rate=c.train.learning_rate,
              num_steps=c.train.num_steps)


@pytest.mark.parametrize('name,attention', [('base', 'selective'), ('standard', 'standard'),
                                            ('selective', 'selective'), ('reference', 'reference')])
def test_original_configs_keep_the_original_run(name, attention):
  c = config_lib.from_config(_load(name, None if name == 'base' else ''), VOCAB_SIZE)
  assert _summary(c) == ORIGINAL
  assert c.model.attention == attention
  assert c.train.lr_schedule == 'constant' and c.train.warmup_steps == 0 and c.model.dropout == 0.0
  assert c.model.positions == ('none' if attention == 'reference' else 'rope')


def test_quick_variant_changes_only_the_schedule():
  quick = config_lib.from_config(_load('selective', 'quick'), VOCAB_SIZE)
  full = config_lib.from_config(_load('selective', ''), VOCAB_SIZE)
  assert quick.model == full.model and quick.data == full.data
  assert quick.train.num_steps < full.train.num_steps


@pytest.mark.parametrize('variant,attention', [('', 'standard'), ('selective', 'selective')])
def test_nanogpt_config(variant, attention):
  c = config_lib.from_config(_load('nanogpt', variant), VOCAB_SIZE)
  m, t = c.model, c.train
  assert (m.attention, m.num_layers, m.num_heads, m.d_model, m.dropout) == (attention, 6, 6, 384, 0.2)
  # nanoGPT's model: pre-LN, GELU, output projection, learned positions, tied embeddings, its init, no biases.
  assert (m.norm, m.activation, m.attn_out_proj, m.positions, m.max_len, m.tie_embeddings, m.init) == (
      'pre', 'gelu', True, 'learned', 256, True, 'nanogpt')
  assert (m.linear_bias, m.norm_bias, m.head_bias, m.attn_dropout, m.dtype) == (False, False, False, 0.2, 'bfloat16')
  assert c.data.seq_len == 256 and c.data.val_fraction == 0.1 and c.data.path == 'data/tinyshakespeare.txt'
  assert t.batch_size == 64 and t.num_steps == 5000 and t.eval_every == 250
  assert (t.learning_rate, t.warmup_steps, t.lr_schedule, t.min_learning_rate) == (1e-3, 100, 'cosine', 1e-4)
  assert (t.b1, t.b2, t.weight_decay, t.weight_decay_mask, t.grad_clip) == (0.9, 0.99, 0.1, 'matrices', 1.0)
  # The W2 speed settings (the model is the same function).
  assert (m.dropout_rng, m.flash_num_stages, m.gelu_impl) == ('hash', 3, 'auto')
  assert t.xla_options == 'xla_gpu_enable_triton_gemm=false'


@pytest.mark.parametrize('variant,attention,params', [('', 'standard', 38_023_680),
                                                      ('selective', 'selective', 44_315_136)])
def test_enwik8_config(variant, attention, params):
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from selattn import sharding  # pylint: disable=g-import-not-at-top
  from selattn.model import Transformer, count_params  # pylint: disable=g-import-not-at-top
  c = config_lib.from_config(_load('enwik8', variant), 256)
  m, d = c.model, c.data
  # The classic 12-layer character transformer's size, byte-level, on enwik8's 90M/5M/5M protocol.
  assert (m.attention, m.num_layers, m.d_model, m.num_heads, d.seq_len) == (attention, 12, 512, 8, 512)
  assert (d.path, d.vocab, d.split) == ('data/enwik8', 'bytes', 'enwik8')
  with jax.set_mesh(sharding.make_mesh(c.mesh)):
    model = nnx.eval_shape(lambda: Transformer(m, rngs=nnx.Rngs(0)))
  assert count_params(model) == params  # the counts README.md gives (38.0M, 44.3M)


def test_unknown_variant_is_rejected():
  with pytest.raises(ValueError, match='nosuchvariant'):
    _load('selective', 'nosuchvariant')


@pytest.mark.parametrize('section,key', [('model', 'nonexistent'), ('train', 'num_step'), ('data', 'paths'),
                                         ('mesh', 'pipeline')])
def test_from_config_rejects_unknown_keys(section, key):
  cfg = _load('tiny', '').to_dict()
  cfg[section][key] = 1
  with pytest.raises(config_lib.ConfigError, match=f'{section}.{key}'):
    config_lib.from_config(cfg, VOCAB_SIZE)


def test_from_config_rejects_unknown_sections():
  cfg = _load('tiny', '').to_dict()
  cfg['optimizer'] = {'lr': 1.0}
  with pytest.raises(config_lib.ConfigError, match='optimizer'):
    config_lib.from_config(cfg, VOCAB_SIZE)


@pytest.mark.parametrize('section,key,value,named', [
    ('model', 'num_heads', 3, 'model.d_model'),
    ('model', 'attention', 'linear', 'model.attention'),
    ('model', 'dropout', 1.0, 'model.dropout'),
    ('model', 'fused_backward', 'atomic', "model.fused_backward='atomic'"),
    ('model', 'fused_forward', 'cuda', "model.fused_forward='cuda'"),
    ('model', 'fused_heads_per_program', 3, 'model.fused_heads_per_program=3 does not divide'),
    ('model', 'fused_bwd_splits', 0, 'model.fused_bwd_splits'),
    ('model', 'dropout_rng', 'philox', "model.dropout_rng='philox'"),
    ('data', 'val_fraction', 0.0, 'data.val_fraction'),
    ('data', 'vocab', 'words', 'data.vocab'),
    ('data', 'split', 'head', 'data.split'),
    ('train', 'batch_size', 0, 'train.batch_size'),
    ('train', 'log_every', 3, 'train.log_every'),  # with steps_per_call=2 below
    ('train', 'num_steps', '10', 'train.num_steps'),  # a string where an int belongs
    ('mesh', 'data', 0, 'mesh.data'),
])
def test_from_config_names_the_bad_key(section, key, value, named):
  cfg = _load('tiny', '').to_dict()
  config_lib.from_config(cfg, VOCAB_SIZE)  # the unmodified config is fine: the error below is the bad value's
  if key == 'log_every':
    cfg['train']['steps_per_call'] = 2
  cfg[section][key] = value
  with pytest.raises(config_lib.ConfigError, match=named.replace('.', r'\.')) as e:
    config_lib.from_config(cfg, VOCAB_SIZE)
  assert '\n' not in str(e.value)


def _base_key_lines() -> dict[str, int]:
  """'section.key' -> line number of every key assigned in configs/base.py's get_config()."""
  tree = ast.parse((CONFIGS_DIR / 'base.py').read_text())
  fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == 'get_config')
  sections = {}  # local alias -> section name, from `c.model = m = ml_collections.ConfigDict()`
  keys = {}
  for node in ast.walk(fn):
    if not isinstance(node, ast.Assign):
      continue
    targets = node.targets
    if (len(targets) == 2 and isinstance(targets[0], ast.Attribute) and isinstance(targets[1], ast.Name)):
      sections[targets[1].id] = targets[0].attr
      continue
    for t in targets:
      if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id in sections:
        keys[f'{sections[t.value.id]}.{t.attr}'] = t.lineno
  return keys


def test_every_base_key_has_a_comment_on_its_line():
  lines = _base_key_lines()
  # The parse found every key the config has (so a key it missed can't escape the check).
  declared = {f'{s}.{k}' for s, sub in _load('base', None).items() for k in sub}
  assert set(lines) == declared
  with open(CONFIGS_DIR / 'base.py', 'rb') as f:
    commented = {tok.start[0] for tok in tokenize.tokenize(f.readline) if tok.type == tokenize.COMMENT}
  missing = sorted(k for k, line in lines.items() if line not in commented)
  assert not missing, f'keys without a comment on their line in configs/base.py: {missing}'


def test_nanogpt_original_block_is_the_original_block_on_the_nanogpt_run():
  """`:original_block` is the original's model (base.py's block keys) with nanoGPT's sizes and run."""
  old = config_lib.from_config(_load('nanogpt', 'original_block'), VOCAB_SIZE)
  new = config_lib.from_config(_load('nanogpt', ''), VOCAB_SIZE)
  base = config_lib.from_config(_load('base', None), VOCAB_SIZE)
  block_keys = ('norm', 'activation', 'positions', 'attn_out_proj', 'tie_embeddings', 'init', 'linear_bias',
                'norm_bias', 'head_bias', 'attn_dropout', 'max_len')
  for k in block_keys:
    assert getattr(old.model, k) == getattr(base.model, k), k
  assert [k for k in block_keys if getattr(new.model, k) != getattr(base.model, k)] != []
  assert old.train.weight_decay_mask == 'all'
  assert (old.model.d_model, old.model.dropout, old.data, old.train.learning_rate) == (
      new.model.d_model, new.model.dropout, new.data, new.train.learning_rate)
