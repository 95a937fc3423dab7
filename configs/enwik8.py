"""enwik8, byte-level: a 12-layer, 512-wide model at context 512, the size of the classic 12-layer character
transformer (Al-Rfou et al. 2018, 1.11 bits per byte on enwik8's test split).

enwik8 is the first 100,000,000 bytes of an English Wikipedia XML dump (Hutter prize), cut mid-character: not
valid UTF-8 at its end, so it is read as bytes (data.vocab='bytes', 256 symbols). The standard protocol
(data.split='enwik8'): the first 90M bytes train, the next 5M validate, the last 5M test, scored in bits per byte.
The file is not shipped or fetched; from the repo root:

  mkdir -p data && cd data && wget http://mattmahoney.net/dc/enwik8.zip && unzip enwik8.zip && cd ..
  python -m selattn.prepare --config configs/enwik8.py        # optional: the trainer prepares it on first use
  python -m selattn.main --config configs/enwik8.py --workdir runs/enwik8
  python -m selattn.evaluate --workdir runs/enwik8 --split test

The block is nanoGPT's (pre-LN, GELU, an attention output projection, normal(0.02) init) with RoPE, 8 heads
(head dim 64), untied embeddings, dropout 0.1, bf16. The run: batch 64 x 512 bytes, AdamW 6e-4 with 2,000 warmup
steps and cosine decay to 6e-5 at step 100,000 (about 36 passes over the training bytes), weight decay 0.1 on
matrices, clipping at 1.0; the whole validation split every 5,000 steps. These are a starting point, not tuned
values: no full run of this config has been measured. `:selective` swaps in selective attention.
"""

from configs import base


def get_config(variant: str = ''):
  c = base.get_config()
  m, d, t = c.model, c.data, c.train
  m.attention = 'standard'
  m.d_model, m.num_heads, m.num_layers, m.ffn_mult, m.dtype = 512, 8, 12, 4, 'bfloat16'
  m.norm, m.activation, m.positions, m.attn_out_proj, m.tie_embeddings, m.init = (
      'pre', 'gelu', 'rope', True, False, 'nanogpt')
  m.linear_bias, m.norm_bias, m.head_bias = False, False, False
  m.dropout = 0.1
  d.path, d.vocab, d.split, d.seq_len = 'data/enwik8', 'bytes', 'enwik8', 512
  t.batch_size, t.num_steps = 64, 100_000
  t.learning_rate, t.min_learning_rate, t.lr_schedule, t.warmup_steps = 6e-4, 6e-5, 'cosine', 2000
  t.b1, t.b2, t.weight_decay, t.weight_decay_mask, t.grad_clip = 0.9, 0.95, 0.1, 'matrices', 1.0
  t.log_every, t.eval_every, t.checkpoint_every, t.eval_batches = 100, 5000, 5000, 0
  t.steps_per_call, t.sample_length = 10, 300
  for v in filter(None, variant.split(',')):
    if v == 'selective':
      m.attention = 'selective'
    else:
      base.apply_variant(c, v)
  return c
