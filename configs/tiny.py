"""A tiny model that trains in seconds on a CPU: for tests, CI and trying things out."""

from configs import base


def get_config(variant: str = ''):
  c = base.get_config()
  m, t = c.model, c.train
  m.attention = variant or 'selective'
  m.d_model, m.num_heads, m.num_layers, m.kv_hidden, m.block_q, m.block_k = 32, 2, 2, 32, 16, 16
  if m.attention == 'reference':
    m.positions = 'none'
  c.data.seq_len = 32
  t.batch_size, t.num_steps, t.learning_rate = 16, 200, 3e-3
  t.log_every, t.eval_every, t.checkpoint_every, t.eval_batches = 20, 100, 100, 4
  t.steps_per_call = 1
  t.sample_length = 40
  return c
