"""nanoGPT's train_shakespeare_char, its model and its run: 6 layers, 6 heads, D 384, context 256, batch 64.

The model is nanoGPT's GPT with bias=False: pre-LN (and a final LN), GELU, an attention output projection,
learned positions, tied input/output embeddings, normal(0.02) init with the residual projections scaled by
1/sqrt(2L), dropout 0.2 on embeddings, attention probabilities and residual branches. 10.65M parameters on
tinyshakespeare's 65 symbols without the position table, as nanoGPT prints. The run: AdamW lr 1e-3, betas (0.9,
0.99), weight decay 0.1 on matrices only, 100 warmup steps then cosine decay to 1e-4 at step 5000 (also in a run
stopped earlier, as nanoGPT's lr_decay_iters), gradient clipping at 1.0, bf16 compute (the exact GELU in float32,
rounded once: model.gelu_impl='auto'). Held-out loss every 250 steps on the whole validation split (nanoGPT averages
200 random batches), its split: the first 90% trains, the last 10% validates.

The corpus is not shipped. data.path is where `python -m selattn.corpora.fetch tinyshakespeare` writes it
(data/tinyshakespeare.txt, relative to where you run; 1,115,394 characters); fetch it once from the repo root:

  python -m selattn.corpora.fetch tinyshakespeare
  python -m selattn.main --config configs/nanogpt.py --workdir runs/nanogpt

`:selective` swaps in selective attention on the same block (12.42M parameters). `:original_block` keeps this run
but the original's block (post-LN, ReLU, RoPE, no output projection, untied, its init and biases, no attention
dropout, decay on every parameter): the model this file described before it became nanoGPT's.
"""

from configs import base


def get_config(variant: str = ''):
  c = base.get_config()
  m, t = c.model, c.train
  m.attention = 'standard'
  m.d_model, m.num_heads, m.num_layers, m.dtype = 384, 6, 6, 'bfloat16'
  m.norm, m.activation, m.positions, m.attn_out_proj, m.tie_embeddings, m.init = (
      'pre', 'gelu', 'learned', True, True, 'nanogpt')
  m.linear_bias, m.norm_bias, m.head_bias = False, False, False
  m.dropout, m.attn_dropout = 0.2, 0.2
  # Speed, not the model (BENCHMARKS.md, W2: 4.87 ms a step on an H200 against 5.56 without these three and with
  # jax's bf16 GELU instead of model.gelu_impl='auto'): dropout masks from an index hash (another random stream
  # than jax.random's), 3 pipeline stages in the flash kernel, and cuBLAS for every matmul (XLA's Triton matmul
  # fusions off, for this run's steps only).
  m.dropout_rng, m.flash_num_stages = 'hash', 3
  t.xla_options = 'xla_gpu_enable_triton_gemm=false'
  c.data.path = 'data/tinyshakespeare.txt'  # written by `python -m selattn.corpora.fetch tinyshakespeare`
  c.data.seq_len = 256
  c.data.val_fraction = 0.1
  t.batch_size, t.num_steps = 64, 5000
  t.learning_rate, t.min_learning_rate, t.lr_schedule, t.warmup_steps = 1e-3, 1e-4, 'cosine', 100
  t.lr_decay_steps = 5000  # nanoGPT's lr_decay_iters: a shorter run (train.num_steps=2000) keeps its rates
  t.b1, t.b2, t.weight_decay, t.weight_decay_mask, t.grad_clip = 0.9, 0.99, 0.1, 'matrices', 1.0
  t.log_every, t.eval_every, t.checkpoint_every, t.eval_batches = 100, 250, 1000, 0
  t.steps_per_call = 5
  for v in filter(None, variant.split(',')):
    if v == 'selective':
      m.attention = 'selective'
    elif v == 'original_block':
      m.norm, m.activation, m.positions, m.attn_out_proj, m.tie_embeddings, m.init = (
          'post', 'relu', 'rope', False, False, 'original')
      m.linear_bias, m.norm_bias, m.head_bias, m.attn_dropout = False, True, True, 0.0
      t.weight_decay_mask = 'all'
    else:
      base.apply_variant(c, v)
  return c
