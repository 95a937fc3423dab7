"""selattn.perf: the FLOP count, the device peaks, and what the trainer writes with them (step time and MFU
scalars, a jax.profiler window under train.profile_steps)."""

import glob
import os

from flax import nnx
import jax
import jax.numpy as jnp
import pytest

from configs import tiny
from run_files import scalars
from selattn import config as config_lib
from selattn import perf
from selattn import train
from selattn.model import Transformer, count_params


def _multiplying_params(cfg) -> int:
  """Counted from the parameter tree itself: every Param leaf but the lookup tables (the token embedding, unless
  tied to the head, which then multiplies; learned positions)."""
  with nnx.use_eager_sharding(False):
    model = Transformer(cfg.model, rngs=nnx.Rngs(0))
  total = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param)):
    name = jax.tree_util.keystr(path)
    if name.startswith("['pos_embed']") or (name.startswith("['embed']") and not cfg.model.tie_embeddings):
      continue
    total += leaf.size
  return total


@pytest.mark.parametrize('attention,overrides,d_qk', [
    ('standard', {}, 32), ('selective', {}, 64), ('selective', {'positions': 'none'}, 32),
    ('standard', {'positions': 'learned', 'tie_embeddings': True, 'attn_out_proj': True}, 32)])
def test_flops_per_token(attention, overrides, d_qk):
  c = tiny.get_config(attention)
  for k, v in overrides.items():
    setattr(c.model, k, v)
  cfg = config_lib.from_config(c, 65)
  with nnx.use_eager_sharding(False):
    num_params = count_params(Transformer(cfg.model, rngs=nnx.Rngs(0)))
  # 2 FLOPs per multiply-add, x3 for forward and backward; scores (d_qk) and weighted sum (d_v = D) over T keys.
  want = 6 * _multiplying_params(cfg) + 6 * cfg.model.num_layers * cfg.data.seq_len * (d_qk + cfg.model.d_model)
  assert cfg.model.d_model == 32 and perf.flops_per_token(cfg, num_params) == want


def test_peak_flops_by_device_kind():
  assert perf.peak_flops('NVIDIA H200') == perf.peak_flops('NVIDIA H100 80GB HBM3') == 790e12
  assert perf.peak_flops('cpu') is None and perf.peak_flops('NVIDIA A100-SXM4-80GB') is None


def test_trainer_writes_step_time_and_mfu_and_a_profile(tmp_path, monkeypatch):
  monkeypatch.setitem(perf.PEAK_FLOPS, 'cpu', 1e9)  # pretend the CPU's peak is known, so MFU is written
  c = tiny.get_config()
  c.train.num_steps, c.train.log_every, c.train.steps_per_call, c.train.eval_every = 8, 2, 1, 0
  c.train.sample_length, c.train.eval_batches, c.train.profile_steps = 0, 1, 3
  workdir = str(tmp_path)
  train.train(c, workdir)
  cfg = config_lib.from_config(c, 83)
  rate, step_ms = scalars(workdir, 'train/tokens_per_second'), scalars(workdir, 'train/step_time_ms')
  mfu = scalars(workdir, 'train/mfu')
  assert sorted(rate) == sorted(step_ms) == sorted(mfu) == [2, 4, 6, 8]
  tokens_per_step = c.train.batch_size * c.data.seq_len
  with nnx.use_eager_sharding(False):
    num_params = count_params(Transformer(cfg.model, rngs=nnx.Rngs(0)))
  for s in rate:
    # Two views of one window: tokens per step = rate x step time; MFU = model FLOP/s over peak x devices.
    assert rate[s] * step_ms[s] / 1000 == pytest.approx(tokens_per_step, rel=1e-4)
    assert mfu[s] == pytest.approx(perf.flops_per_token(cfg, num_params) * rate[s] / (1e9 * jax.device_count()),
                                   rel=1e-4)
  # Steps 2-4 (the second call to the fourth) traced where TensorBoard's profile tab looks.
  traces = glob.glob(os.path.join(workdir, 'plugins', 'profile', '*', '*.xplane.pb'))
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0


def test_no_mfu_where_the_peak_is_unknown_and_no_profile_by_default(tmp_path):
  c = tiny.get_config()
  c.train.num_steps, c.train.log_every, c.train.steps_per_call, c.train.eval_every = 2, 2, 1, 0
  c.train.sample_length, c.train.eval_batches = 0, 1
  train.train(c, str(tmp_path))
  assert sorted(scalars(str(tmp_path), 'train/step_time_ms')) == [2]
  assert scalars(str(tmp_path), 'train/mfu') == {}
  assert not (tmp_path / 'plugins').exists()


def test_device_op_times_sums_each_op_of_the_device_plane_per_step(tmp_path):
  """A trace written as the GPU backend writes it (a device plane of stream lines, events named by metadata): the
  per-step time of each op and of each line; host planes are not device time."""
  text = '''
  planes { id: 2 name: "/host:CPU" lines { id: 9 name: "main" events { metadata_id: 1 duration_ps: 9000000000 } }
           event_metadata { key: 1 value { id: 1 name: "python" } } }
  planes { id: 1 name: "/device:GPU:0"
    lines { id: 1 name: "Stream #14(Compute)"
      events { metadata_id: 1 offset_ps: 0 duration_ps: 3000000 }
      events { metadata_id: 2 offset_ps: 4000000 duration_ps: 1000000 }
      events { metadata_id: 1 offset_ps: 6000000 duration_ps: 5000000 } }
    lines { id: 2 name: "Stream #15(MemcpyH2D)" events { metadata_id: 3 duration_ps: 2000000 } }
    event_metadata { key: 1 value { id: 1 name: "gemm" } }
    event_metadata { key: 2 value { id: 2 name: "gelu" } }
    event_metadata { key: 3 value { id: 3 name: "copy" } } }
  '''
  (tmp_path / 'plugins' / 'profile' / 'run').mkdir(parents=True)
  (tmp_path / 'plugins' / 'profile' / 'run' / 'host.xplane.pb').write_bytes(
      jax.profiler.ProfileData.text_proto_to_serialized_xspace(text))
  got = perf.device_op_times(str(tmp_path), steps=2)
  assert got['plane'] == '/device:GPU:0'
  compute = got['lines']['Stream #14(Compute)']
  assert compute['ms_per_step'] == pytest.approx(0.0045)
  assert compute['top'] == [{'name': 'gemm', 'ms_per_step': pytest.approx(0.004), 'calls_per_step': 1.0},
                            {'name': 'gelu', 'ms_per_step': pytest.approx(0.0005), 'calls_per_step': 0.5}]
  assert got['lines']['Stream #15(MemcpyH2D)']['ms_per_step'] == pytest.approx(0.001)
  assert perf.device_op_times(str(tmp_path / 'none'), steps=2) == {}


def _pad_then_sin(x):
  return jnp.sin(jnp.pad(x, ((0, 3), (0, 0)))) * 2.0  # the line the test looks for


def test_device_op_times_names_the_source_line_of_each_fusion(tmp_path):
  """A GPU kernel is named after its HLO instruction with '_' for '.': the profile says which line made it (here the
  line of `_pad_then_sin`, from a module compiled on this machine), and events that name no instruction get none."""
  hlo = jax.jit(lambda x: _pad_then_sin(x).sum(0)).lower(jnp.ones((5, 4))).compile().as_text()
  srcs = perf.hlo_sources(hlo)
  line = _pad_then_sin.__code__.co_firstlineno + 1
  ours = {n: s for n, s in srcs.items() if f'perf_test.py:{line}' in s}
  assert ours, srcs
  name = next(n for n in ours if '.' in n)  # e.g. 'pad.2'
  kernel = name.replace('.', '_')  # as the GPU's trace names it
  text = f'''
  planes {{ id: 1 name: "/device:GPU:0"
    lines {{ id: 1 name: "Stream #14(Compute)"
      events {{ metadata_id: 1 offset_ps: 0 duration_ps: 3000000 }}
      events {{ metadata_id: 2 offset_ps: 4000000 duration_ps: 1000000 }} }}
    event_metadata {{ key: 1 value {{ id: 1 name: "{kernel}" }} }}
    event_metadata {{ key: 2 value {{ id: 2 name: "selective_fused_bwd_key_mgpu_mosaic_gpu_kernel" }} }} }}
  '''
  (tmp_path / 'plugins' / 'profile' / 'run').mkdir(parents=True)
  (tmp_path / 'plugins' / 'profile' / 'run' / 'h.xplane.pb').write_bytes(
      jax.profiler.ProfileData.text_proto_to_serialized_xspace(text))
  top = perf.device_op_times(str(tmp_path), steps=1, hlo_text=hlo)['lines']['Stream #14(Compute)']['top']
  assert top[0]['name'] == kernel and f'perf_test.py:{line} (_pad_then_sin)' in top[0]['source'], top
  assert 'source' not in top[1]
