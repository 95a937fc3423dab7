"""nanoGPT's train_shakespeare_char setting: 6 layers, 6 heads, D 384, context 256, batch 64, dropout 0.2.

lr 1e-3 with 100 warmup steps and cosine decay to 1e-4, beta2 0.99, 5000 steps, bf16 compute. Point it at the
tinyshakespeare text (nanoGPT's corpus: its split is 90/10): `--config.data.path=.../tinyshakespeare.txt`.
`:selective` switches to selective attention.
"""

from configs import base


def get_config(variant: str = ''):
  c = base.get_config()
  m, t = c.model, c.train
  m.attention = 'standard'
  m.d_model, m.num_heads, m.num_layers, m.dropout, m.dtype = 384, 6, 6, 0.2, 'bfloat16'
  c.data.seq_len = 256
  c.data.val_fraction = 0.1
  t.batch_size, t.num_steps = 64, 5000
  t.learning_rate, t.min_learning_rate, t.lr_schedule, t.warmup_steps = 1e-3, 1e-4, 'cosine', 100
  t.b2, t.weight_decay, t.grad_clip = 0.99, 0.1, 1.0
  t.log_every, t.eval_every, t.checkpoint_every, t.eval_batches = 100, 250, 1000, 0
  t.steps_per_call = 5
  for v in filter(None, variant.split(',')):
    if v == 'selective':
      m.attention = 'selective'
    else:
      base.apply_variant(c, v)
  return c
