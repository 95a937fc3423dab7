"""The block options (pre-LN, GELU, output projection, biases, learned positions, tied embeddings, nanoGPT's init
and weight decay): a numpy transcription of nanoGPT's GPT, its parameter count, old configs still loading, cached
sampling through the new block, and short training runs with dropout."""

from __future__ import annotations

import dataclasses
import json
import math
import os

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import nanogpt, tiny
from generate_test import _decode, _prefill  # jitted over (graphdef, state)
from rel_error import rel as _rel
from run_files import scalars
from selattn import config as config_lib
from selattn import sharding
from selattn import train
from selattn.config import ModelConfig
from selattn.model import Transformer, count_params

NANOGPT_BLOCK = dict(norm='pre', activation='gelu', positions='learned', attn_out_proj=True, tie_embeddings=True,
                     init='nanogpt', linear_bias=False, norm_bias=False, head_bias=False)


# ----------------------------------------------------------------------------------------------------------------
# nanoGPT's parameter count, from its own formula.

def nanogpt_num_params(vocab: int, d: int, layers: int) -> int:
  """nanoGPT's get_num_params() with bias=False: the position table left out, lm_head tied to wte.

  Per layer: c_attn 3D^2, attn c_proj D^2, mlp c_fc 4D^2 and c_proj 4D^2, ln_1 and ln_2 weights D each. Plus wte
  V D and ln_f's weight D."""
  return layers * (12 * d * d + 2 * d) + vocab * d + d


@pytest.mark.parametrize('variant', ['', 'selective'])
def test_nanogpt_config_has_nanogpts_parameter_count(variant):
  cfg = config_lib.from_config(nanogpt.get_config(variant), vocab_size=65)  # tinyshakespeare's 65 symbols
  with nnx.use_eager_sharding(False):
    model = nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0)))
  without_positions = count_params(model) - model.pos_embed.embedding.size
  assert model.pos_embed.embedding.shape == (256, 384)
  expected = nanogpt_num_params(65, 384, 6)
  assert expected == 10_646_784 and round(expected / 1e6, 2) == 10.65  # nanoGPT prints "10.65M"
  if variant == 'selective':
    expected += 6 * 2 * 384 * 384  # W_k and W_v read [q_i ; x_j]: 2D inputs instead of D
  assert without_positions == expected


# ----------------------------------------------------------------------------------------------------------------
# The forward pass against a numpy transcription of nanoGPT's model.py (GPT, Block, CausalSelfAttention, MLP).

def np_layernorm(x, w, b):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-5) * w + (0.0 if b is None else b)


_erf = np.vectorize(math.erf)


def np_gelu(x):
  return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def np_gpt(idx, p, n_head, gelu=np_gelu):
  """nanoGPT's GPT.forward in eval mode (dropout off): logits [B, T, V]."""
  b, t = idx.shape
  x = p['wte'][idx] + p['wpe'][np.arange(t)]
  d = x.shape[-1]
  hs = d // n_head
  for blk in p['h']:
    h = np_layernorm(x, blk['ln_1_w'], blk['ln_1_b'])
    qkv = h @ blk['c_attn_w'] + blk['c_attn_b']
    q, k, v = (a.reshape(b, t, n_head, hs).transpose(0, 2, 1, 3) for a in np.split(qkv, 3, axis=-1))
    att = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hs)
    att = np.where(np.tril(np.ones((t, t), bool)), att, -np.inf)
    att = np.exp(att - att.max(-1, keepdims=True))
    att = att / att.sum(-1, keepdims=True)
    y = (att @ v).transpose(0, 2, 1, 3).reshape(b, t, d)
    x = x + (y @ blk['c_proj_w'] + blk['c_proj_b'])
    h = np_layernorm(x, blk['ln_2_w'], blk['ln_2_b'])
    x = x + (gelu(h @ blk['c_fc_w'] + blk['c_fc_b']) @ blk['mlp_proj_w'] + blk['mlp_proj_b'])
  x = np_layernorm(x, p['ln_f_w'], p['ln_f_b'])
  return x @ p['wte'].T  # lm_head tied to wte, no bias


def _as_nanogpt(model: Transformer) -> dict:
  """Our parameters under nanoGPT's names (c_attn = [Wq | Wk | Wv]; a missing bias is 0, a missing LN bias None)."""
  a = lambda x: np.asarray(x[...], np.float64)
  bias = lambda lin: a(lin.bias) if lin.bias is not None else 0.0
  norm_b = lambda ln: a(ln.norm.bias) if ln.norm.bias is not None else None
  layers = []
  for layer in model.layers:
    at = layer.attn
    layers.append({
        'ln_1_w': a(layer.ln1.norm.scale), 'ln_1_b': norm_b(layer.ln1),
        'c_attn_w': np.concatenate([a(at.wq.kernel), a(at.wk.kernel), a(at.wv.kernel)], axis=1),
        'c_attn_b': (np.concatenate([bias(at.wq), bias(at.wk), bias(at.wv)]) if at.wq.bias is not None else 0.0),
        'c_proj_w': a(layer.attn_proj.kernel), 'c_proj_b': bias(layer.attn_proj),
        'ln_2_w': a(layer.ln2.norm.scale), 'ln_2_b': norm_b(layer.ln2),
        'c_fc_w': a(layer.ffn_in.kernel), 'c_fc_b': bias(layer.ffn_in),
        'mlp_proj_w': a(layer.ffn_out.kernel), 'mlp_proj_b': bias(layer.ffn_out)})
  return {'wte': a(model.embed.embedding), 'wpe': a(model.pos_embed.embedding), 'h': layers,
          'ln_f_w': a(model.ln_f.norm.scale), 'ln_f_b': norm_b(model.ln_f)}


def _randomise(model: Transformer, seed: int) -> None:
  """nanoGPT's init leaves biases at 0 and LN scales at 1, where a wrong use of them would not show: perturb all."""
  state = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  leaves = [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  nnx.update(model, jax.tree.unflatten(treedef, leaves))


@pytest.mark.parametrize('bias', [False, True])  # nanoGPT's bias=False and bias=True
def test_forward_matches_a_numpy_transcription_of_nanogpt(bias):
  cfg = ModelConfig(vocab_size=11, attention='standard', d_model=16, num_heads=2, num_layers=2, max_len=8,
                    **{**NANOGPT_BLOCK, 'linear_bias': bias, 'norm_bias': bias})
  with nnx.use_eager_sharding(False):
    model = Transformer(cfg, rngs=nnx.Rngs(0))
  _randomise(model, 1)
  tokens = np.asarray(jax.random.randint(jax.random.key(2), (2, 7), 0, 11))
  got = model(jnp.asarray(tokens))
  ref = np_gpt(tokens, _as_nanogpt(model), n_head=2)
  assert _rel(got, ref) < 1e-5, _rel(got, ref)
  # The comparison can fail: the tanh GELU (jax's default) is measurably another function here.
  tanh_gelu = lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
  assert _rel(np_gpt(tokens, _as_nanogpt(model), n_head=2, gelu=tanh_gelu), ref) > 1e-5


# ----------------------------------------------------------------------------------------------------------------
# nanoGPT's init.

def test_nanogpt_init():
  layers, d = 4, 128
  cfg = ModelConfig(vocab_size=65, attention='standard', d_model=d, num_heads=4, num_layers=layers, max_len=256,
                    **NANOGPT_BLOCK)
  with nnx.use_eager_sharding(False):
    model = Transformer(cfg, rngs=nnx.Rngs(0))
  resid = 0.02 / math.sqrt(2 * layers)
  std = lambda x: float(np.asarray(x[...]).std())
  checks = {'embed': (std(model.embed.embedding), 0.02), 'pos_embed': (std(model.pos_embed.embedding), 0.02)}
  for i, layer in enumerate(model.layers):
    for name in ('wq', 'wk', 'wv'):
      checks[f'{i}.{name}'] = (std(getattr(layer.attn, name).kernel), 0.02)
    checks[f'{i}.ffn_in'] = (std(layer.ffn_in.kernel), 0.02)
    checks[f'{i}.attn_proj'] = (std(layer.attn_proj.kernel), resid)
    checks[f'{i}.ffn_out'] = (std(layer.ffn_out.kernel), resid)
    for ln in (layer.ln1, layer.ln2):
      np.testing.assert_array_equal(ln.norm.scale[...], np.ones(d))
      assert ln.norm.bias is None
  for name, (got, want) in checks.items():
    assert abs(got / want - 1) < 0.05, (name, got, want)
  assert model.head is None and model.head_bias is None  # tied, no bias: the logits reuse the embedding
  # With biases, nanoGPT's init zeroes them (the original's draws them uniformly).
  with nnx.use_eager_sharding(False):
    biased = Transformer(dataclasses.replace(cfg, linear_bias=True), rngs=nnx.Rngs(0))
  assert not np.any(np.asarray(biased.layers[0].ffn_in.bias[...]))


def test_original_block_is_unchanged_by_default():
  """The defaults build the original's tree: no output projection, final LN, position table or tied head."""
  with nnx.use_eager_sharding(False):
    model = Transformer(ModelConfig(vocab_size=83, attention='standard'), rngs=nnx.Rngs(0))
  paths = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))}
  assert not any(name in p for p in paths for name in ('attn_proj', 'ln_f', 'pos_embed'))
  assert "['head']['bias']" in ''.join(sorted(paths)) and count_params(model) == 191_955


# ----------------------------------------------------------------------------------------------------------------
# Old configs: the `rope` boolean and config.json files without the new keys.

def test_old_rope_key_still_loads():
  assert ModelConfig(vocab_size=13, rope=False).positions == 'none'
  assert ModelConfig(vocab_size=13, rope=True).positions == 'rope'
  assert ModelConfig(vocab_size=13, positions='learned', max_len=8).rope is False
  with pytest.raises(config_lib.ConfigError, match='model.rope'):
    ModelConfig(vocab_size=13, rope=True, positions='learned', max_len=8)
  old = tiny.get_config().to_dict()
  del old['model']['positions']
  old['model']['rope'] = False  # an old config file's spelling
  assert config_lib.from_config(old, vocab_size=13).model.positions == 'none'


def _old_model_dict() -> dict:
  """The `model` section of a config.json written before the block options existed (the original's standard)."""
  return {'vocab_size': 83, 'attention': 'standard', 'selective_impl': 'auto', 'kv_generator': 'linear',
          'kv_hidden': 256, 'd_model': 64, 'num_heads': 2, 'num_layers': 4, 'ffn_mult': 4, 'rope': True,
          'rope_theta': 10000.0, 'dropout': 0.0, 'dtype': 'float32', 'block_q': 128, 'block_k': 128, 'remat': False}


def test_a_run_from_before_the_block_options_resumes(tmp_path):
  # The workdir's config.json as a run from before the block options wrote it.
  (tmp_path / 'config.json').write_text(
      json.dumps({'config': {'model': _old_model_dict(), 'train': {'flat_optimizer': True}}}))
  cfg = config_lib.from_config(_config_dict('standard'), vocab_size=83)
  train.check_compatible(str(tmp_path), cfg)  # the same model: accepted
  other = config_lib.from_config(_config_dict('standard', norm='pre'), vocab_size=83)
  with pytest.raises(train.TrainingError, match="model.norm: 'post' -> 'pre'"):
    train.check_compatible(str(tmp_path), other)
  # Attention dropout only changes how the same parameters train: a run may resume with it.
  train.check_compatible(str(tmp_path), config_lib.from_config(_config_dict('standard', attn_dropout=0.1), 83))


def _config_dict(name, **model):
  from configs import standard  # pylint: disable=g-import-not-at-top
  c = standard.get_config().to_dict()
  c['model'].update(model)
  return c


# ----------------------------------------------------------------------------------------------------------------
# Weight decay on matrices only: one hand-written AdamW against optax's.

def test_weight_decay_on_matrices_only_matches_a_handwritten_adamw():
  t = config_lib.TrainConfig(learning_rate=0.01, weight_decay=0.1, weight_decay_mask='matrices', b2=0.99)
  tx = train.make_optimizer(t)
  rng = np.random.default_rng(0)
  params = {'kernel': rng.normal(size=(3, 4)), 'bias': rng.normal(size=(4,)), 'embedding': rng.normal(size=(5, 3)),
            'scale': rng.normal(size=(3,))}
  params = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
  state = tx.init(params)
  ref = {k: np.asarray(v, np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in ref.items()}
  v2 = {k: np.zeros_like(v) for k, v in ref.items()}
  for step in range(1, 4):
    grads = {k: rng.normal(size=v.shape) for k, v in ref.items()}
    updates, state = tx.update({k: jnp.asarray(g, jnp.float32) for k, g in grads.items()}, state, params)
    params = optax.apply_updates(params, updates)
    for k in ref:
      m[k] = 0.9 * m[k] + 0.1 * grads[k]
      v2[k] = 0.99 * v2[k] + 0.01 * grads[k] ** 2
      mhat, vhat = m[k] / (1 - 0.9 ** step), v2[k] / (1 - 0.99 ** step)
      decay = 0.1 * ref[k] if ref[k].ndim >= 2 else 0.0
      ref[k] = ref[k] - 0.01 * (mhat / (np.sqrt(vhat) + 1e-8) + decay)
  for k in ref:
    assert _rel(params[k], ref[k]) < 1e-5, k
  # ... and the mask matters: decaying everything moves the vectors too.
  all_tx = train.make_optimizer(dataclasses.replace(t, weight_decay_mask='all'))
  p0 = {'bias': jnp.ones(4)}
  upd, _ = all_tx.update({'bias': jnp.zeros(4)}, all_tx.init(p0), p0)
  assert np.abs(np.asarray(upd['bias'])).max() > 0
  with pytest.raises(config_lib.ConfigError, match='train.flat_optimizer'):
    dataclasses.replace(t, flat_optimizer=True)


# ----------------------------------------------------------------------------------------------------------------
# Cached sampling runs the same block as the model.

@pytest.mark.parametrize('attention', ['standard', 'selective'])
def test_cached_sampling_matches_the_forward_of_the_modern_block(attention):
  s = 8
  cfg = ModelConfig(vocab_size=11, attention=attention, d_model=16, num_heads=2, num_layers=2, max_len=s,
                    dropout=0.2, attn_dropout=0.2, **{**NANOGPT_BLOCK, 'linear_bias': True})
  with nnx.use_eager_sharding(False):
    model = Transformer(cfg, rngs=nnx.Rngs(3))
  _randomise(model, 4)
  graphdef, state = nnx.split(model)
  toks = jax.random.randint(jax.random.key(5), (s,), 0, 11)
  ref = jax.jit(lambda st, t: nnx.merge(graphdef, st)(t[None])[0])(state, toks)  # [S, V]
  cache, logits = _prefill(graphdef, state, jnp.pad(toks[:3], (0, s - 3))[None], 3)
  errs = [_rel(logits, ref[2])]
  for p in range(3, s):
    cache, logits = _decode(graphdef, state, cache, toks[p], p)
    errs.append(_rel(logits, ref[p]))
  assert max(errs) < 1e-4, errs


# ----------------------------------------------------------------------------------------------------------------
# Training with dropout.

def _modern_tiny(**model):
  c = tiny.get_config()
  c.model.update({**NANOGPT_BLOCK, 'dropout': 0.1, 'attn_dropout': 0.1, **model})
  c.train.update(dict(num_steps=20, log_every=1, steps_per_call=1, checkpoint_every=10, eval_every=20,
                      sample_length=8, warmup_steps=5, lr_schedule='cosine', grad_clip=0.5,
                      weight_decay_mask='matrices', weight_decay=0.1))
  return c


def test_training_with_dropout_learns_and_resumes_exactly(tmp_path):
  """Selective attention (factored) on the nanoGPT block with every dropout, warmup and clipping: the loss falls;
  a run resumed from its step-10 checkpoint gives the uninterrupted run's losses (the masks follow the step)."""
  full, part = str(tmp_path / 'full'), str(tmp_path / 'part')
  c = _modern_tiny()
  c.train.lr_schedule = 'constant'  # a cosine's shape depends on num_steps, which the resumed run changes
  result = train.train(c, full)
  losses = scalars(full)
  assert sorted(losses) == list(range(1, 21))
  assert np.mean([losses[s] for s in range(16, 21)]) < np.mean([losses[s] for s in range(1, 6)]) - 0.3
  assert math.isfinite(result['eval/loss'])
  assert max(scalars(full, 'train/grad_norm').values()) > c.train.grad_clip  # the clipping clips
  c.train.num_steps, c.train.sample_length = 10, 0
  train.train(c, part)
  c.train.num_steps = 20
  train.train(c, part)
  assert scalars(part) == losses
  assert json.load(open(os.path.join(full, 'config.json')))['config']['model']['max_len'] == 32


def test_dropout_changes_the_training_step():
  """The same state and batch give another loss with dropout on: the masks are really applied in training."""
  vals = {}
  for name, rates in (('off', (0.0, 0.0)), ('attn', (0.0, 0.3))):  # residual dropout: train_test's nanoGPT
    cfg = config_lib.from_config(_modern_tiny(dropout=rates[0], attn_dropout=rates[1]), vocab_size=13)
    mesh = sharding.make_mesh(config_lib.MeshConfig(data=1), devices=jax.devices()[:1])
    graphdef, state = train.create_state(cfg, mesh)
    step = jax.jit(train.make_train_step(graphdef, cfg, None))
    batch = {k: jax.random.randint(jax.random.key(0), (1, 4, 32), 0, 13) for k in ('inputs', 'targets')}
    with jax.set_mesh(mesh):
      vals[name] = float(step(state, batch)[1]['loss'])
  assert vals['attn'] != vals['off'], vals


@pytest.mark.parametrize('kw,named', [
    (dict(norm='mid'), 'model.norm'), (dict(activation='swish'), 'model.activation'),
    (dict(positions='alibi'), 'model.positions'), (dict(init='xavier'), 'model.init'),
    (dict(positions='learned'), 'model.max_len'), (dict(attention='reference', attn_out_proj=True),
                                                   'model.attn_out_proj'),
])
def test_bad_block_options_name_the_key(kw, named):
  with pytest.raises(config_lib.ConfigError, match=named.replace('.', r'\.')) as e:
    ModelConfig(vocab_size=13, **kw)
  assert '\n' not in str(e.value)


def test_nanogpt_config_without_its_corpus_says_how_to_fetch_it(tmp_path, monkeypatch):
  from selattn import data  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(tmp_path)  # no data/ folder here
  path = nanogpt.get_config().data.path
  with pytest.raises(data.DataError) as e:
    data.load_text(path)
  assert str(e.value) == ('data.path=data/tinyshakespeare.txt: no such file '
                          '(python -m selattn.corpora.fetch tinyshakespeare downloads it)')
