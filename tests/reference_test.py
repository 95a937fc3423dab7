"""The model against numpy transcriptions of its documented formulas, sharing no code with selattn.model.

model_test.py checks the implementations against each other; every path there calls the same RoPE angles, the same
K/V generator and the same block, so a wrong formula shared by all of them passes it. Here the formulas are
written out again in float64 numpy from the docstrings (rope.py, attention.py, transformer.py) and the README:
RoPE with literal frequencies, the literal selective K_ij = W [q_i ; x_j], the MLP generator with its GELU,
the post-LN block, dropout switched off without a key.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from selattn.config import ModelConfig
from selattn.model import Transformer
from selattn.model import rope as rope_lib

pytestmark = pytest.mark.usefixtures('no_mesh')  # conftest.py: parameters created unsharded, without a mesh


# ----------------------------------------------------------------------------------------------------------------
# numpy transcriptions (float64).

def np_rope(x: np.ndarray, positions: np.ndarray, base: float = 10000.0) -> np.ndarray:
  """rope.py's docstring: x = [x1 ; x2] per head, theta_f = base^(-2f/H), f = 0 .. H/2 - 1,
  rope(x, p) = [x1 cos(p theta) - x2 sin(p theta) ; x2 cos(p theta) + x1 sin(p theta)]. x: [..., T, N, H]."""
  h = x.shape[-1]
  theta = np.array([base ** (-2.0 * f / h) for f in range(h // 2)])
  a = positions.astype(np.float64)[:, None, None] * theta  # [T, 1, H/2]
  x1, x2 = x[..., :h // 2], x[..., h // 2:]
  return np.concatenate([x1 * np.cos(a) - x2 * np.sin(a), x2 * np.cos(a) + x1 * np.sin(a)], axis=-1)


def np_gelu_tanh(x: np.ndarray) -> np.ndarray:
  """GELU, tanh approximation (jax.nn.gelu's default, approximate=True)."""
  return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def np_layer_norm(x, scale, bias, eps=1e-5):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * scale + bias


def np_softmax(s, axis=-1):
  s = s - s.max(axis, keepdims=True)
  e = np.exp(s)
  return e / e.sum(axis, keepdims=True)


def _causal(pos):
  return pos[:, None] >= pos[None, :]  # query i sees key j iff j <= i (by position, not by index)


def np_standard_attention(p, x, pos, n, rope, base):
  """q, k, v = x Wq, x Wk, x Wv per head; RoPE on q and k; causal softmax(q.k / sqrt(H)) v; no out projection."""
  b, t, d = x.shape
  h = d // n
  q, k, v = ((x @ p[w]).reshape(b, t, n, h) for w in ('wq', 'wk', 'wv'))
  if rope:
    q, k = np_rope(q, pos, base), np_rope(k, pos, base)
  s = np.einsum('btnh,bsnh->bnts', q, k) / math.sqrt(h)
  s = np.where(_causal(pos), s, -np.inf)
  return np.einsum('bnts,bsnh->btnh', np_softmax(s), v).reshape(b, t, d)


def np_selective_attention(p, x, pos, n, rope, kv, base):
  """K_ij, V_ij = generator([q_i ; x_j]) (q_i the unrotated projected query, all heads); RoPE: q_i by i, K_ij by
  j; causal softmax over j of q_i.K_ij / sqrt(H); output sum_j p_ij V_ij; no output projection."""
  b, t, d = x.shape
  h = d // n
  q = x @ p['wq']  # [B, T, D]
  qx = np.concatenate([np.broadcast_to(q[:, :, None], (b, t, t, d)),
                       np.broadcast_to(x[:, None, :], (b, t, t, d))], axis=-1)  # [B, T(i), S(j), 2D]
  if kv == 'linear':
    k_full, v_full = qx @ p['wk'], qx @ p['wv']
  else:  # Linear(2D, hidden) -> GELU -> Linear(hidden, 2D), then split into K and V
    out = np_gelu_tanh(qx @ p['w1'] + p['b1']) @ p['w2'] + p['b2']
    k_full, v_full = out[..., :d], out[..., d:]
  q = q.reshape(b, t, n, h)
  k_full, v_full = k_full.reshape(b, t, t, n, h), v_full.reshape(b, t, t, n, h)
  if rope:
    q = np_rope(q, pos, base)
    # K_ij is rotated by key position j: apply per query row i (positions run along axis S).
    k_full = np.stack([np_rope(k_full[:, i], pos, base) for i in range(t)], axis=1)
  s = np.einsum('btnh,btsnh->bnts', q, k_full) / math.sqrt(h)
  s = np.where(_causal(pos), s, -np.inf)
  return np.einsum('bnts,btsnh->btnh', np_softmax(s), v_full).reshape(b, t, d)


def np_transformer(p, tokens, cfg: ModelConfig, positions=None):
  """Embed; per layer x = LN1(x + attn(x)); x = LN2(x + relu(x W_in) W_out); logits = x W_head + b_head."""
  pos = np.arange(tokens.shape[1]) if positions is None else np.asarray(positions)
  x = p['embed'][tokens]
  for lp in p['layers']:
    if cfg.attention == 'standard':
      a = np_standard_attention(lp['attn'], x, pos, cfg.num_heads, cfg.rope, cfg.rope_theta)
    else:
      a = np_selective_attention(lp['attn'], x, pos, cfg.num_heads, cfg.rope, cfg.kv_generator, cfg.rope_theta)
    x = np_layer_norm(x + a, *lp['ln1'])
    x = np_layer_norm(x + np.maximum(x @ lp['ffn_in'], 0.0) @ lp['ffn_out'], *lp['ln2'])
  return x @ p['head'] + p['head_b']


def _arr(v):
  return np.asarray(v[...], np.float64)


def numpy_params(model: Transformer) -> dict:
  """The model's parameters as a plain dict of float64 arrays, named by the formulas above."""
  layers = []
  for layer in model.layers:
    at = layer.attn
    if model.cfg.attention == 'standard':
      attn = {w: _arr(getattr(at, w).kernel) for w in ('wq', 'wk', 'wv')}
    elif model.cfg.kv_generator == 'linear':
      attn = {'wq': _arr(at.wq.kernel), 'wk': _arr(at.kv.wk.kernel), 'wv': _arr(at.kv.wv.kernel)}
    else:
      attn = {'wq': _arr(at.wq.kernel), 'w1': _arr(at.kv.kv1.kernel), 'b1': _arr(at.kv.kv1.bias),
              'w2': _arr(at.kv.kv2.kernel), 'b2': _arr(at.kv.kv2.bias)}
    layers.append({'attn': attn, 'ffn_in': _arr(layer.ffn_in.kernel), 'ffn_out': _arr(layer.ffn_out.kernel),
                   'ln1': (_arr(layer.ln1.norm.scale), _arr(layer.ln1.norm.bias)),
                   'ln2': (_arr(layer.ln2.norm.scale), _arr(layer.ln2.norm.bias))})
  return {'embed': _arr(model.embed.embedding), 'layers': layers, 'head': _arr(model.head.kernel),
          'head_b': _arr(model.head.bias)}


def randomize(model: nnx.Module, seed: int) -> None:
  """Every parameter drawn afresh (LayerNorm scales and biases too, which init to 1 and 0), in place."""
  params = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  new = []
  for x in leaves:
    fan_in = x.shape[0] if x.ndim == 2 else 4
    # Wide enough that attention is far from uniform and GELU far from linear, small enough to stay float32-exact.
    new.append(jnp.asarray(rng.normal(0.0, 1.5 / math.sqrt(fan_in), x.shape) + (x.ndim == 1) * 0.3, jnp.float32))
  nnx.update(model, jax.tree.unflatten(treedef, new))


def _model(seed=0, **kw) -> tuple[Transformer, ModelConfig]:
  base = dict(vocab_size=11, d_model=8, num_heads=2, num_layers=2, ffn_mult=2, kv_hidden=12, block_q=4, block_k=3,
              dropout=0.1, attn_dropout=0.1,  # dropout is off without a key: evaluation and generation pass none
              rope_theta=500.0)  # not the default: a path that ignores model.rope_theta shows
  base.update(kw)
  cfg = ModelConfig(**base)
  model = Transformer(cfg, rngs=nnx.Rngs(seed))
  randomize(model, seed + 1)
  return model, cfg


def run(model: Transformer, tokens, positions=None, dropout_key=None):
  """model(tokens, positions, dropout_key=...) in one jitted call (op by op, a forward takes seconds on CPU)."""
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda s, t, p, k: nnx.merge(graphdef, s)(t, p, dropout_key=k))
  return fn(state, jnp.asarray(tokens, jnp.int32), None if positions is None else jnp.asarray(positions, jnp.int32),
            dropout_key)


def _rel(got, ref) -> float:
  got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
  assert got.shape == ref.shape, (got.shape, ref.shape)
  return float(np.abs(got - ref).max() / np.abs(ref).max())


# ----------------------------------------------------------------------------------------------------------------
# RoPE: known values.

def test_rope_frequencies_are_the_documented_ones():
  # theta_f = 10000^(-2f/H): H=4 -> 1, 1/100; H=8 -> 1, 1/10, 1/100, 1/1000.
  np.testing.assert_allclose(rope_lib.frequencies(4), [1.0, 0.01], rtol=1e-6)
  np.testing.assert_allclose(rope_lib.frequencies(8), [1.0, 0.1, 0.01, 0.001], rtol=1e-6)
  np.testing.assert_allclose(rope_lib.frequencies(4, base=100.0), [1.0, 0.1], rtol=1e-6)
  cos, sin = rope_lib.angles(jnp.array([0, 1, 2, 50]), 4)
  np.testing.assert_allclose(cos, [[1, 1], [math.cos(1), math.cos(0.01)], [math.cos(2), math.cos(0.02)],
                                   [math.cos(50), math.cos(0.5)]], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(sin, [[0, 0], [math.sin(1), math.sin(0.01)], [math.sin(2), math.sin(0.02)],
                                   [math.sin(50), math.sin(0.5)]], rtol=1e-5, atol=1e-6)
  # Positions past 256 (bfloat16 holds integers exactly only up to there; the original's context is 299): angles
  # in float32 are good to ~1e-4 rad there.
  cos, sin = rope_lib.angles(jnp.array([257, 299, 1001]), 4)
  np.testing.assert_allclose(cos[:, 0], [math.cos(257), math.cos(299), math.cos(1001)], atol=3e-4)
  np.testing.assert_allclose(sin[:, 1], [math.sin(2.57), math.sin(2.99), math.sin(10.01)], atol=3e-4)


def test_rope_rotates_each_half_pair_with_the_documented_sign():
  # H = 4: pairs (0, 2) at angle p * 1 and (1, 3) at p * 0.01. At p = 1, [1, 0, 0, 0] -> [cos 1, 0, sin 1, 0]:
  # the second half gains + x1 sin, the first loses x2 sin.
  def rot(x, p):
    x = jnp.asarray(x, jnp.float32).reshape(1, 1, 4)  # [T=1, N=1, H=4]
    return np.asarray(rope_lib.apply(x, *rope_lib.angles(jnp.array([p]), 4))).reshape(4)

  np.testing.assert_allclose(rot([1, 0, 0, 0], 1), [0.5403023, 0, 0.8414710, 0], atol=1e-6)
  np.testing.assert_allclose(rot([0, 0, 1, 0], 1), [-0.8414710, 0, 0.5403023, 0], atol=1e-6)
  np.testing.assert_allclose(rot([0, 1, 0, 0], 100), [0, 0.5403023, 0, 0.8414710], atol=1e-5)
  np.testing.assert_allclose(rot([1, 2, 3, 4], 0), [1, 2, 3, 4])


def test_rope_matches_numpy_on_random_inputs():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 9, 3, 8))  # [B, T, N, H]
  pos = rng.permutation(40)[:9]  # arbitrary, unsorted positions: the zigzag layout passes such
  for base in (10000.0, 500.0):
    got = rope_lib.apply(jnp.asarray(x, jnp.float32), *rope_lib.angles(jnp.asarray(pos), 8, base))
    assert _rel(got, np_rope(x, pos, base)) < 1e-5


# ----------------------------------------------------------------------------------------------------------------
# The whole model against the numpy transcription, for every attention and implementation.

_MODELS = [
    dict(attention='standard'),
    dict(attention='standard', rope=False),
    dict(attention='selective', selective_impl='factored'),
    dict(attention='selective', selective_impl='blockwise'),
    dict(attention='selective', selective_impl='materialized'),
    dict(attention='selective', selective_impl='factored', rope=False),
    dict(attention='selective', kv_generator='mlp', selective_impl='blockwise'),
    dict(attention='selective', kv_generator='mlp', selective_impl='materialized'),
    dict(attention='selective', kv_generator='mlp', selective_impl='blockwise', rope=False),
    dict(attention='selective', kv_generator='mlp', selective_impl='fused', attn_dropout=0.0),  # Pallas, interpreted
]


@pytest.mark.parametrize('kw', _MODELS, ids=lambda kw: '-'.join(str(v) for v in kw.values()))
def test_transformer_matches_numpy(kw):
  model, cfg = _model(seed=len(str(kw)), **kw)
  tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 7))
  ref = np_transformer(numpy_params(model), tokens, cfg)
  got = run(model, tokens)
  assert got.dtype == jnp.float32
  assert np.abs(ref).max() > 1 and np.std(ref) > 0.5  # not a degenerate comparison
  assert _rel(got, ref) < 2e-5, _rel(got, ref)


@pytest.mark.parametrize('kw', [dict(attention='standard'), dict(attention='selective', selective_impl='blockwise'),
                                dict(attention='selective', kv_generator='mlp', selective_impl='materialized')],
                         ids=['standard', 'blockwise', 'mlp'])
def test_permuted_positions_match_numpy(kw):
  # The seq split lays tokens out in zigzag order and passes their positions: RoPE and the causal mask must
  # follow the positions, not the array index.
  model, cfg = _model(seed=7, **kw)
  tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 8))
  perm = np.array([0, 1, 6, 7, 2, 3, 4, 5])  # the zigzag of 8 over 2 devices
  ref = np_transformer(numpy_params(model), tokens, cfg)
  got = run(model, tokens[:, perm], perm)
  assert _rel(got, ref[:, perm]) < 2e-5


def test_mlp_generator_matches_an_explicit_numpy_mlp():
  # The generator alone, on wide pre-activations: with GELU replaced by identity, by ReLU or by the exact erf
  # GELU, K_ij and V_ij change well beyond float32 rounding.
  from selattn.model import attention as attn_lib  # pylint: disable=g-import-not-at-top
  cfg = ModelConfig(vocab_size=5, d_model=6, num_heads=2, rope=False, kv_generator='mlp', kv_hidden=10)
  gen = attn_lib.MlpKV(cfg, rngs=nnx.Rngs(0))
  randomize(gen, 3)
  p = gen.arrays(jnp.float32)
  rng = np.random.default_rng(4)
  qf, x = rng.normal(size=(2, 3, 6)) * 2, rng.normal(size=(2, 4, 6)) * 2
  k, v = jax.jit(attn_lib.MlpKV.full)(p, jnp.asarray(qf, jnp.float32), jnp.asarray(x, jnp.float32))
  np_p = {k_: np.asarray(a, np.float64) for k_, a in p.items()}
  qx = np.concatenate([np.broadcast_to(qf[:, :, None], (2, 3, 4, 6)), np.broadcast_to(x[:, None], (2, 3, 4, 6))], -1)
  pre = qx @ np_p['w1'] + np_p['b1']
  assert np.abs(pre).max() > 3  # reaches where the GELU variants and ReLU differ
  out = np_gelu_tanh(pre) @ np_p['w2'] + np_p['b2']
  assert _rel(k, out[..., :6]) < 1e-5 and _rel(v, out[..., 6:]) < 1e-5


# ----------------------------------------------------------------------------------------------------------------
# Dropout: off without a key, whatever the rate (every model above has dropout 0.1 and matches without a key).

def test_dropout_is_on_with_a_key():
  model, cfg = _model(seed=11, attention='standard', dropout=0.3)
  tokens = np.random.default_rng(5).integers(0, cfg.vocab_size, (2, 7))
  ref = np_transformer(numpy_params(model), tokens, cfg)
  assert _rel(run(model, tokens), ref) < 2e-5
  assert _rel(run(model, tokens, dropout_key=jax.random.key(0)), ref) > 1e-2  # the rate is used in training


# ----------------------------------------------------------------------------------------------------------------
# bfloat16 compute: the documented float32 islands (softmax statistics, LayerNorm, RoPE angles, the logits), and
# the result against the float64 reference.

_F32_PRIMS = {'exp', 'exp2', 'log', 'log1p', 'rsqrt', 'sqrt', 'cos', 'sin', 'reduce_max', 'argmax'}


def _eqns(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for v in eqn.params.values():
      for sub in (v if isinstance(v, (tuple, list)) else [v]):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          yield from _eqns(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          yield from _eqns(sub)


@pytest.mark.parametrize('kw', [dict(attention='standard'), dict(attention='selective', selective_impl='factored'),
                                dict(attention='selective', selective_impl='blockwise'),
                                dict(attention='selective', kv_generator='mlp', selective_impl='materialized')],
                         ids=['standard', 'factored', 'blockwise', 'mlp'])
def test_bfloat16_keeps_softmax_norm_and_rope_in_float32(kw):
  import jax.extend  # pylint: disable=g-import-not-at-top
  model, cfg = _model(seed=21, dtype='bfloat16', **kw)
  tokens = jnp.asarray(np.random.default_rng(6).integers(0, cfg.vocab_size, (2, 40)), jnp.int32)
  graphdef, state = nnx.split(model)
  jaxpr = jax.make_jaxpr(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens).jaxpr
  eqns = list(_eqns(jaxpr))
  dots = [e for e in eqns if e.primitive.name == 'dot_general']
  assert dots and all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars)  # it does compute in bf16
  low = sorted({f'{e.primitive.name}({v.aval.dtype})' for e in eqns if e.primitive.name in _F32_PRIMS
                for v in e.invars if jnp.issubdtype(v.aval.dtype, jnp.floating) and v.aval.dtype != jnp.float32})
  assert not low, low
  assert {e.primitive.name for e in eqns} >= {'exp', 'rsqrt', 'cos', 'sin'}
  # Numerically: within bfloat16 rounding of the float64 model, over 40 positions (RoPE angles up to 39 rad).
  got = run(model, tokens)
  assert got.dtype == jnp.float32
  ref = np_transformer(numpy_params(model), np.asarray(tokens), cfg)
  assert _rel(got, ref) < 2e-2, _rel(got, ref)  # measured 0.006-0.008


# ----------------------------------------------------------------------------------------------------------------
# The zigzag layout of the seq split, by its literal values and the balance it exists for.

def test_zigzag_literal_and_balanced():
  from selattn import sharding  # pylint: disable=g-import-not-at-top
  np.testing.assert_array_equal(sharding.zigzag(8, 2), [0, 1, 6, 7, 2, 3, 4, 5])
  np.testing.assert_array_equal(sharding.zigzag(8, 4), [0, 7, 1, 6, 2, 5, 3, 4])
  np.testing.assert_array_equal(sharding.zigzag(12, 2), [0, 1, 2, 9, 10, 11, 3, 4, 5, 6, 7, 8])
  np.testing.assert_array_equal(sharding.zigzag(5, 1), [0, 1, 2, 3, 4])
  for t, n in ((24, 2), (24, 3), (64, 4)):
    z = sharding.zigzag(t, n)
    assert sorted(z) == list(range(t))
    # Device d holds z[d*t/n:(d+1)*t/n]; query position p attends p + 1 keys: every device does equal work.
    work = [int(np.sum(z[d * t // n:(d + 1) * t // n] + 1)) for d in range(n)]
    assert len(set(work)) == 1, work


# ----------------------------------------------------------------------------------------------------------------
# Sampling: the token distribution against numpy's softmax(logits / temperature) over the top k.

@pytest.mark.parametrize('temperature,top_k', [(1.0, 0), (0.5, 0), (2.0, 3), (1.0, 1)])
def test_sampling_distribution(temperature, top_k):
  from selattn import generate  # pylint: disable=g-import-not-at-top
  logits = np.array([1.0, 2.5, -1.0, 2.0, 0.0, 1.5], np.float32)
  n = 40_000
  keys = jax.random.split(jax.random.key(0), n)
  draws = jax.jit(jax.vmap(generate._sample, in_axes=(None, 0, None, None)))(  # pylint: disable=protected-access
      jnp.asarray(logits), keys, np.float32(temperature), np.int32(top_k))
  freq = np.bincount(np.asarray(draws), minlength=6) / n
  z = logits.astype(np.float64) / temperature
  if top_k:
    z[np.argsort(-logits)[top_k:]] = -np.inf  # keep the top_k likeliest
  want = np.exp(z - z.max())
  want /= want.sum()
  # 40k draws: a frequency's standard error is at most 0.0025; the bugs this is for move some by > 0.03.
  np.testing.assert_allclose(freq, want, atol=0.012)
  sample = generate._sample  # pylint: disable=protected-access
  assert int(sample(jnp.asarray(logits), keys[0], np.float32(0.0), np.int32(top_k))) == 1  # temperature 0: argmax


# ----------------------------------------------------------------------------------------------------------------
# Vocabulary order: token i is chars[i], whatever order a saved vocabulary lists them in.

def test_vocab_ids_follow_the_saved_order():
  from selattn import data  # pylint: disable=g-import-not-at-top
  text = 'hello, world!\nzebra Zulu 1'
  v = data.Vocab.from_text(text)
  assert v.chars == ''.join(sorted(set(text)))  # code point order, the original's
  assert v.chars[:4] == '\n !,' and v.chars[-1] == 'z'
  for chars in (v.chars, v.chars[::-1], 'wz\nh1e, ldo!rZuba'):
    voc = data.Vocab(chars)
    ids = {c: i for i, c in enumerate(chars)}
    np.testing.assert_array_equal(voc.encode(text), [ids[c] for c in text])
    assert voc.decode([ids[c] for c in text]) == text


def test_residual_dropout_drops_at_the_rate_and_keeps_the_expectation():
  from selattn.model import transformer  # pylint: disable=g-import-not-at-top
  x = jnp.full((200_000,), 2.0, jnp.float32)
  y = np.asarray(transformer.dropout(x, 0.3, jax.random.key(1)))
  kept = y != 0
  assert abs(1 - kept.mean() - 0.3) < 0.005  # 200k draws: standard error 0.001
  np.testing.assert_allclose(y[kept], 2.0 / 0.7, rtol=1e-6)  # inverted dropout: E[y] = x
  assert np.array_equal(np.asarray(transformer.dropout(x, 0.3, None)), np.asarray(x))
