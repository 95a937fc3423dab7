"""What the GPU bench scripts here share: a JSON record written after every item, and their timing and error measures.

A script in this folder imports it by name (`import bench_record`): Python puts the script's own folder first on
sys.path, so that works however the script is started (`PYTHONPATH=$PWD python3 docs/bench/<script>.py`).
"""

import ast
import json
import os
import time
import traceback

import jax
import numpy as np


def options(cls, fields: str):
  """`cls` (a kernel's Options dataclass) with comma-separated NAME=VALUE fields set, each VALUE a Python literal or
  else a bare string: options(fmb.Options, 'key_heads=1,logits_first=None,precision=bf16')."""
  def value(text):
    try:
      return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
      return text.strip()
  pairs = (field.split('=', 1) for field in fields.split(',') if field)
  return cls(**{name.strip(): value(text) for name, text in pairs})


class Record:
  """A script's results `res` (jax's version and the device, then what the script adds), written to $OUT/`name`
  after every item; no new item starts past `budget_s` seconds from now."""

  def __init__(self, name: str, budget_s: float, error_tail: int = 800):
    self.t0 = time.time()
    self.path = os.path.join(os.environ.get('OUT', '.'), name)
    self.budget_s, self.error_tail = budget_s, error_tail
    self.res = {'jax': jax.__version__, 'device': jax.devices()[0].device_kind}

  def save(self):
    with open(self.path, 'w') as f:
      json.dump(self.res, f, indent=1)

  def item(self, name: str, body):
    """Runs `body()` (a dict of results) as item `name` and records it, or its error, or that the budget ran out;
    returns what `body` returned (None when it failed or did not run). A failure is recorded and the script goes
    on: one kernel that does not compile must not lose the figures of the others."""
    if time.time() - self.t0 > self.budget_s:
      self.res['items'].append({'name': name, 'skipped': 'time budget'})
      self.save()
      return None
    t = time.time()
    try:
      out = body()
      rec = {'name': name, **out}
    except Exception:  # noqa: BLE001 (record any failure, go on)
      rec = {'name': name, 'error': traceback.format_exc()[-3000:]}
      out = None
    rec['wall_s'] = round(time.time() - t, 1)
    self.res['items'].append(rec)
    print(json.dumps({k: v for k, v in rec.items() if k != 'error'}), rec.get('error', '')[-self.error_tail:],
          flush=True)
    self.save()
    return out

  def done(self):
    """Records the script's total time, writes the record a last time and says so."""
    self.res['total_s'] = round(time.time() - self.t0, 1)
    self.save()
    print('done in', self.res['total_s'], 's')


def median_ms(fn, args, calls: int) -> float:
  """The median time in ms of `calls` calls of fn(*args), after a first (compiling) call and one more."""
  jax.block_until_ready(fn(*args))
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(calls):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return 1e3 * float(np.median(times))


def rel(a, b) -> float:
  """max |a - b| / max |b|, in float64."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


def mgpu_layer(f: int, b: int, t: int, n: int, h: int, interpret=None):
  """One selective layer at kv_hidden f (RoPE, float32; random, seeded by f) as the Mosaic GPU kernels take it:
  (scale, the forward's padded args, the backward's args: those with the MGPU forward's G and lse and a random
  cotangent dG)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from selattn.model import fused_mgpu as fm  # pylint: disable=g-import-not-at-top

  ks = jax.random.split(jax.random.key(f), 6)
  d = n * h
  scale, args = fm.fused_inputs(jax.random.normal(ks[0], (b, t, n, h)), 0.7 * jax.random.normal(ks[1], (b, t, f)),
                                0.7 * jax.random.normal(ks[2], (b, t, f)),
                                jax.random.normal(ks[3], (f, d)) / np.sqrt(f), 0.3 * jax.random.normal(ks[4], (d,)),
                                jnp.arange(t), jnp.arange(t), 10000.0)
  g, lse = jax.jit(lambda *a: fm.forward(*a, scale=scale, interpret=interpret))(*args)
  return scale, args, (*args, g, lse, jax.random.normal(ks[5], g.shape))
