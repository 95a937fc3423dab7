"""Every config key selattn knows, with its default and a one-line comment.

Other config files start from `get_config()` here and change a few keys. The defaults are the original
repository's model and training run (pierrot-lc/selective-attention): D64, 2 heads, 4 layers, 299-char
context, batch 16, AdamW 1e-4, 200k steps.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  c.model = m = ml_collections.ConfigDict()
  m.attention = 'selective'  # 'standard' | 'selective' | 'reference' (flax nnx.MultiHeadAttention, no RoPE)
  m.selective_impl = 'auto'  # 'auto' | 'factored' | 'fused' | 'blockwise' | 'materialized' (same params, same function)
  m.kv_generator = 'linear'  # 'linear' (the original: W[q_i; x_j]) | 'mlp' (Linear -> GELU -> Linear)
  m.kv_hidden = 256  # hidden width of the 'mlp' K/V generator
  m.d_model = 64  # D, model width
  m.num_heads = 2  # N, attention heads (head dim H = D / N)
  m.num_layers = 4  # L, transformer layers
  m.ffn_mult = 4  # FFN width F = ffn_mult * D
  m.positions = 'rope'  # 'rope' (the original's non-interleaved halves) | 'learned' (a data.seq_len x D table) | 'none'
  m.rope_theta = 10000.0  # RoPE base
  m.norm = 'post'  # 'post' (the original: x = LN(x + f(x))) | 'pre' (x = x + f(LN(x)), a final LN before the logits)
  m.attn_out_proj = False  # a Linear(D, D) on the attention output (the original has none)
  m.activation = 'relu'  # FFN activation: 'relu' (the original) | 'gelu' (exact, erf: nanoGPT's nn.GELU)
  m.gelu_impl = 'auto'  # exact GELU's arithmetic: 'poly32' under bf16, else 'jax' | 'jax' | 'erf32' | 'poly32'
  m.linear_bias = False  # biases in the attention (Q, K/V generator, output) and FFN Linears (the original: none)
  m.norm_bias = True  # LayerNorm bias (nanoGPT's bias=False: none)
  m.head_bias = True  # bias of the logits Linear (the original has one; nanoGPT none)
  m.tie_embeddings = False  # logits from the transposed input embedding instead of their own Linear(D, V) kernel
  m.init = 'original'  # 'original' (U(+-1/sqrt(fan_in)), embeddings N(0, 1)) | 'nanogpt' (N(0, 0.02); transformer.py)
  m.selective_parts = 'both'  # linear generator ablations: 'keys' (V from x_j alone) | 'values' (K from x_j alone)
  m.dropout = 0.0  # dropout on the embeddings and on each residual branch's output (0 = the original)
  m.attn_dropout = 0.0  # dropout on the attention probabilities (standard and selective; 0 = the original)
  m.dtype = 'float32'  # compute dtype: 'float32' | 'bfloat16' (params and softmax statistics stay float32)
  m.block_q = 128  # blockwise selective: query tile size
  m.block_k = 128  # blockwise selective: key tile size
  m.fused_block_q = 16  # fused selective (Pallas): query tile size (a power of two; block_q * block_k >= 16)
  m.fused_block_k = 16  # fused selective: key tile size (a power of two)
  m.fused_block_f = 32  # fused selective: generator hidden units per chunk (a power of two >= 16)
  m.fused_backward = 'auto'  # 'auto' (mgpu on one Hopper GPU, else merged) | 'merged' | 'split' (deterministic)|'mgpu'
  m.fused_forward = 'auto'  # 'auto' (mgpu on one Hopper GPU, else triton) | 'triton' | 'mgpu' (Mosaic GPU, Hopper)
  m.fused_heads_per_program = 0  # fused: heads per kernel program (0 = all; fewer = more programs in parallel)
  m.fused_fwd_splits = 1  # fused forward: programs per query tile (its key tiles dealt among them, then combined)
  m.fused_bwd_splits = 1  # fused backward: programs per key tile (its query tiles dealt among them)
  m.fused_num_warps = 8  # fused kernels: warps per program (Triton launch parameter)
  m.fused_num_stages = 1  # fused kernels: Triton pipeline stages of their loops' loads
  m.dropout_rng = 'threefry'  # dropout masks: 'threefry' (jax.random) | 'hash' (index hash: faster on GPU, other masks)
  m.attn_kernel = 'auto'  # standard/factored: 'auto' (flash kernel for attn_dropout on GPU) | 'flash' | 'dense'
  m.flash_block_q = 64  # flash attention kernel (Pallas): query tile size (a power of two >= 16)
  m.flash_block_k = 64  # flash attention kernel: key tile size (a power of two >= 16)
  m.flash_num_warps = 4  # flash attention kernel: warps per program (Triton launch parameter)
  m.flash_num_stages = 2  # flash attention kernel: software pipelining stages (Triton launch parameter)
  m.remat = False  # rematerialise each layer in the backward pass (saves activation memory)

  c.data = d = ml_collections.ConfigDict()
  d.path = ''  # corpus file to train on ('chars': UTF-8 text; 'bytes': any file); '' = the embedded Shakespeare corpus
  d.vocab = 'chars'  # 'chars' (the text's distinct characters) | 'bytes' (256 byte values; eval in bits per byte)
  d.split = 'tail'  # 'tail' (the last val_fraction is held out) | 'enwik8' (first 90% train, next 5% val, last 5% test)
  d.store_dir = ''  # where a file's token store goes; '' = beside it (<path>.selattn/), or ~/.cache if read-only
  d.seq_len = 299  # model context T; windows are seq_len + 1 characters
  d.val_fraction = 0.2  # data.split='tail': last fraction of the corpus held out (chronological split)
  d.worker_count = 0  # grain worker processes (0 = in the main process)
  d.prefetch = 2  # batches prefetched by a background thread

  c.train = t = ml_collections.ConfigDict()
  t.seed = 0  # parameter init, data order and dropout
  t.num_steps = 200_000  # train up to this step (a resumed run continues to it)
  t.batch_size = 16  # global batch, in windows
  t.learning_rate = 1e-4  # peak learning rate
  t.lr_schedule = 'constant'  # 'constant' | 'cosine' (decays to min_learning_rate at num_steps)
  t.warmup_steps = 0  # linear warmup from 0 to learning_rate
  t.min_learning_rate = 0.0  # end of the cosine decay
  t.lr_decay_steps = 0  # cosine: the step where it reaches min_learning_rate (0 = num_steps; nanoGPT's lr_decay_iters)
  t.b1 = 0.9  # AdamW beta1
  t.b2 = 0.999  # AdamW beta2
  t.weight_decay = 1e-4  # AdamW decoupled weight decay (optax default)
  t.weight_decay_mask = 'all'  # decayed: 'all' parameters (optax) | 'matrices' (ndim >= 2, embeddings too: nanoGPT)
  t.grad_clip = 0.0  # clip the global gradient norm to this (0 = off)
  t.flat_optimizer = False  # AdamW on one concatenated vector: ~5% faster for tiny models (mesh.fsdp = mesh.tensor = 1)
  t.steps_per_call = 10  # optimizer steps fused in one jitted call (amortises launch overhead; divides the *_every)
  t.unroll_steps = False  # unroll those steps into straight-line code (compiles ~5x longer; a few % faster if tiny)
  t.log_every = 100  # log and write train scalars every this many steps
  t.eval_every = 5000  # evaluate (and write a text sample) every this many steps (0 = only at the end)
  t.eval_batches = 0  # held-out batches per eval (fixed, deterministic windows); 0 = the whole held-out split
  t.checkpoint_every = 5000  # save a checkpoint every this many steps (and at the end)
  t.keep_checkpoints = 3  # checkpoints kept on disk
  t.sample_length = 200  # characters in the text sample written at each eval
  t.sample_prompt = ''  # prompt of that sample ('' = the first line of the corpus, up to 40 characters)
  t.profile_steps = 0  # steps traced by jax.profiler (from the 2nd call) into WORKDIR/plugins/profile; 0 = off
  t.xla_options = ''  # XLA options for this run's steps, 'xla_name=value,...' (e.g. xla_gpu_enable_triton_gemm=false)

  c.mesh = s = ml_collections.ConfigDict()
  s.data = -1  # data-parallel axis size (-1 = all devices left over)
  s.fsdp = 1  # parameter/optimizer sharding axis size (batch is split over data x fsdp)
  s.seq = 1  # query-position split of the selective K/V (shard_map; blockwise/materialized)
  s.tensor = 1  # head split

  return c


def original_run(attention: str, variant: str = '') -> ml_collections.ConfigDict:
  """One of the original's three runs (standard.py, selective.py, reference.py): these defaults with `attention`."""
  c = get_config()
  c.model.attention = attention
  c.model.positions = 'none' if attention == 'reference' else 'rope'  # the original's equinox MHA has no RoPE
  c.train.flat_optimizer = True  # a tiny model: one AdamW update over all parameters is faster (BENCHMARKS.md)
  if variant:
    apply_variant(c, variant)
  return c


def apply_variant(c: ml_collections.ConfigDict, variant: str) -> None:
  """Named variants after the colon in `--config configs/x.py:variant`."""
  if variant == 'quick':
    # A first look on a CPU: 1,500 steps, ending with an eval and a text sample (README: measured times).
    c.train.num_steps, c.train.log_every, c.train.eval_every, c.train.checkpoint_every = 1500, 100, 500, 500
    c.train.learning_rate, c.train.eval_batches, c.train.sample_length = 3e-3, 10, 300
  else:
    raise ValueError(f'unknown config variant {variant!r} (known: quick)')
