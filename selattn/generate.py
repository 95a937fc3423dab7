"""Text generation from a model, with a K/V cache where the math allows; used by the trainer's eval samples and by
the sampling command line (selattn.sample).

What the cache holds, per layer, for positions [0, S) (S = max_len = data.seq_len, the window the model saw):
  - standard attention: the rotated keys R_j k_j and the values v_j, [1, S, N, H] each;
  - selective attention with the linear generator (any selective_impl: the parameters are the same): the factored
    form's augmented keys [R_j k_j ; cos(j th) ; sin(j th)] ([1, S, N, 2H]; [1, S, N, H] without RoPE) and values
    v_j = E x_j. A new query needs only its own u_i = A q_i and c_i = C q_i (the identity derived in
    `attention.selective_factored`), so a token costs O(S D), like standard attention, instead of the literal
    O(S D^2);
  - reference attention (flax's MHA) and the 'mlp' generator: no cache. An mlp K_ij is nonlinear in [q_i ; x_j],
    so a new query needs every key recomputed anyway. There the "cache" is the token window, and every token
    re-runs the full forward over it (O(S^2 D) per token for the mlp).
Positions stay in [0, S): when the cache is full it is refilled from the last S // 2 tokens (a sliding window).
"""

from __future__ import annotations

import functools
import math
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from selattn import config as config_lib
from selattn import data as data_lib
from selattn import sharding
from selattn.model import attention as attn_lib
from selattn.model import rope as rope_lib
from selattn.model.transformer import Transformer

# A prompt taken from the corpus is at most this long: a speaker's name or a title, not a paragraph.
PROMPT_CHARS = 40
# ... and is looked for in the corpus's first PROMPT_SCAN characters (the trainer has them as tokens).
PROMPT_SCAN = 100_000


def corpus_prompt(text: str) -> str:
  """The default prompt: the first line of `text` that is not blank, without trailing spaces, cut to
  PROMPT_CHARS characters (the first character if every line is blank). Every symbol is in the corpus's vocabulary."""
  for line in text.splitlines():
    if line.strip():
      return line.rstrip()[:PROMPT_CHARS]
  return text[:1]


Cache = Any  # per layer (keys, values) [1, S, N, Hk] and [1, S, N, H]; or the token window [1, S]


def has_cache(cfg: config_lib.ModelConfig) -> bool:
  """Whether generation caches keys and values (standard, selective linear) or recomputes the window."""
  return cfg.attention == 'standard' or (cfg.attention == 'selective' and cfg.kv_generator == 'linear')


def _qkv(attn: nnx.Module, x: jax.Array, positions: jax.Array):
  """Query, cacheable key and value [B, T, N, .], and the per-query output term (selective) or None."""
  if isinstance(attn, attn_lib.StandardAttention):
    return (*attn.qkv(x, positions), None)
  # Selective, linear generator, as in `attention.selective_factored` but keeping the augmented key and value.
  cfg = attn.cfg
  n, h = cfg.num_heads, cfg.head_dim
  p = attn.kv.arrays(jnp.dtype(cfg.dtype))
  q = attn.wq(x)
  (u, c), (k, v) = attn_lib.LinearKV.split(p, q, x.astype(jnp.dtype(cfg.dtype)))
  q, u, c, k, v = (a.reshape(*a.shape[:-1], n, h) for a in (q, u, c, k, v))
  if cfg.rope:
    cos, sin = rope_lib.angles(positions, h, cfg.rope_theta)
    q, k = rope_lib.apply(q, cos, sin), rope_lib.apply(k, cos, sin)
    qa, qb = jnp.split(q, 2, axis=-1)
    u1, u2 = jnp.split(u, 2, axis=-1)
    q = jnp.concatenate([q, qa * u1 + qb * u2, qb * u1 - qa * u2], axis=-1)  # augmented query
    trig = jnp.concatenate([cos, sin], axis=-1).astype(k.dtype)  # [T, H]
    k = jnp.concatenate([k, jnp.broadcast_to(trig[None, :, None, :], k.shape)], axis=-1)  # augmented key
  return q, k, v, c


def _forward(model: Transformer, tokens: jax.Array) -> jax.Array:
  """The model's own forward over the window int[1, S]: logits [S, V]. Under a mesh that splits `seq`, its
  shard_map needs as many rows as the batch axes have devices: repeat the window (each device gets one copy)."""
  mesh = jax.sharding.get_abstract_mesh()
  rows = 1 if mesh.empty else math.prod(mesh.shape.get(a, 1) for a in sharding.BATCH)
  return model(jnp.broadcast_to(tokens, (rows, tokens.shape[1])))[0]


def _block(layer: nnx.Module, x: jax.Array, attn_out: jax.Array, c: jax.Array | None) -> jax.Array:
  """The rest of the layer after attention (output projection, residuals, norms, FFN), as the model's own."""
  if c is not None:
    attn_out = attn_out + c
  return layer.finish(x, attn_out.reshape(x.shape), None)


def prefill(model: Transformer, tokens: jax.Array, n: jax.Array) -> tuple[Cache, jax.Array]:
  """Runs the window tokens int[1, S] (the first n real, the rest any padding); returns its cache and the
  float32 logits [V] after token n-1. Causality makes the padding invisible to positions < n."""
  cfg = model.cfg
  if not has_cache(cfg):
    return tokens, _forward(model, tokens)[n - 1]
  positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)
  scale = 1.0 / math.sqrt(cfg.head_dim)
  x = model.embed_inputs(tokens, positions)
  cache = []
  for layer in model.layers:
    q, k, v, c = _qkv(layer.attn, layer.attn_input(x), positions)
    cache.append((k, v))
    x = _block(layer, x, attn_lib.attend(q, k, v, positions, positions, scale, contiguous=True), c)
  last = jax.lax.dynamic_slice_in_dim(x, n - 1, 1, axis=1)  # [1, 1, D]
  return tuple(cache), model.logits(last)[0, 0]


def decode_step(model: Transformer, cache: Cache, token: jax.Array, pos: jax.Array) -> tuple[Cache, jax.Array]:
  """Feeds `token` at position `pos` < S (the cache holds positions < pos); returns the cache and the logits [V]
  after it. O(S D) per layer with a cache; a full forward over the window without one."""
  cfg = model.cfg
  token = jnp.reshape(token, (1, 1)).astype(jnp.int32)
  if not has_cache(cfg):
    tokens = jax.lax.dynamic_update_slice(cache, token, (0, pos))
    return tokens, _forward(model, tokens)[pos]
  q_pos = jnp.reshape(pos, (1,)).astype(jnp.int32)
  k_pos = jnp.arange(cache[0][0].shape[1], dtype=jnp.int32)
  scale = 1.0 / math.sqrt(cfg.head_dim)
  x = model.embed_inputs(token, q_pos)
  new_cache = []
  for layer, (k_cache, v_cache) in zip(model.layers, cache):
    q, k, v, c = _qkv(layer.attn, layer.attn_input(x), q_pos)
    k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k, pos, axis=1)
    v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v, pos, axis=1)
    new_cache.append((k_cache, v_cache))
    x = _block(layer, x, attn_lib.dense_attention(q, k_cache, v_cache, q_pos, k_pos, scale), c)
  return tuple(new_cache), model.logits(x)[0, 0]


def _sample(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_k: jax.Array) -> jax.Array:
  """A token from float32 logits [V]: argmax at temperature 0, else softmax(logits / temperature) over the top_k
  likeliest (all when top_k is 0). Both traced, so one compilation serves every setting."""
  kth = jnp.sort(logits)[::-1][jnp.clip(top_k - 1, 0, logits.shape[0] - 1)]
  logits = jnp.where((top_k > 0) & (logits < kth), -jnp.inf, logits)
  sampled = jax.random.categorical(key, logits / jnp.where(temperature > 0, temperature, 1.0))
  return jnp.where(temperature > 0, sampled, jnp.argmax(logits)).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames='graphdef')
def _segment(state: nnx.State, window: jax.Array, n: jax.Array, steps: jax.Array, key: jax.Array,
             offset: jax.Array, temperature: jax.Array, top_k: jax.Array, *, graphdef: nnx.GraphDef) -> jax.Array:
  """Prefills window int[S] (n real tokens) and samples `steps` <= S - n + 1 tokens: int[S + 1], first `steps`
  valid. Token i of the whole generation uses key fold_in(key, i), so the result does not depend on segmenting.
  Compiled once per (graphdef, S); everything else is traced."""
  model = nnx.merge(graphdef, state)
  cache, logits = prefill(model, window[None], n)
  tok = _sample(logits, jax.random.fold_in(key, offset), temperature, top_k)
  out = jnp.zeros(window.shape[0] + 1, jnp.int32).at[0].set(tok)

  def body(i, carry):
    cache, tok, out = carry
    cache, logits = decode_step(model, cache, tok, n + i - 1)
    tok = _sample(logits, jax.random.fold_in(key, offset + i), temperature, top_k)
    return cache, tok, out.at[i].set(tok)

  return jax.lax.fori_loop(1, steps, body, (cache, tok, out))[2]


def generate(model: Transformer, vocab: data_lib.Vocab, prompt: str, length: int, *, temperature: float = 1.0,
             top_k: int = 0, seed: int = 0, max_len: int) -> str:
  """Returns `prompt` followed by `length` sampled characters (temperature 0: greedy; top_k 0: no truncation).

  The context is the last max_len tokens at most, positions 0..max_len-1 as in training. Runs under the
  caller's mesh, if any."""
  for name, value in (('length', length), ('temperature', temperature), ('top_k', top_k)):
    if not 0 <= value < math.inf:  # also refuses nan and inf
      raise ValueError(f'{name}={value} must be a finite, non-negative number')
  if max_len < 1:
    raise ValueError(f'max_len={max_len} must be positive')
  if not prompt:
    raise ValueError('the prompt is empty: generation needs at least one character')
  try:
    seq = [int(t) for t in vocab.encode(prompt)]
  except data_lib.DataError as e:
    raise ValueError(f'bad prompt: {e}') from None
  graphdef, state = nnx.split(model)
  key = jax.random.key(seed)
  temperature, top_k = np.float32(temperature), np.int32(top_k)
  keep = max(1, max_len // 2)
  n = min(len(seq), max_len)
  done = 0
  while done < length:
    steps = min(length - done, max_len - n + 1)
    window = np.zeros(max_len, np.int32)
    window[:n] = seq[-n:]
    out = _segment(state, window, np.int32(n), np.int32(steps), key, np.int32(done), temperature, top_k,
                   graphdef=graphdef)
    seq += [int(t) for t in np.asarray(out)[:steps]]
    done += steps
    n = keep  # the cache is full (or we are done): restart from the last max_len // 2 tokens
  return prompt + vocab.decode(seq[len(seq) - length:]) if length else prompt
