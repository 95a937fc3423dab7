"""selattn.bench runs its workloads end to end on a CPU (--small) and writes the table and JSON."""

import json
import os
import pathlib
import subprocess
import sys
import types

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


def _bench(*args: str) -> subprocess.CompletedProcess:
  """`python -m selattn.bench ARGS` on the CPU from the repo root; fails the test with its stderr if it fails."""
  p = subprocess.run([sys.executable, '-m', 'selattn.bench', *args], cwd=REPO, capture_output=True, text=True,
                     env=dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO)), timeout=300)
  assert p.returncode == 0, p.stderr[-3000:]
  return p


def test_bench_small_seed_writes_every_variant(tmp_path):
  out = tmp_path / 'w1.json'
  p = _bench('--workload', 'seed', '--small', '--steps', '10',
             '--variants', 'standard,selective-factored,selective-blockwise-b128', f'--out={out}',
             '--set', 'model.block_k=32,model.fused_bwd_splits=2', f'--profile={tmp_path / "prof"}')
  results = json.loads(out.read_text())
  assert [r['variant'] for r in results] == ['standard', 'selective-factored', 'selective-blockwise-b128']
  for r in results:
    assert 'error' not in r, r
    assert r['ms_per_step'] > 0 and r['tokens_per_s'] > 0 and r['compile_s'] > 0
    assert 0 < r['mfu'] < 1
    assert r['seq_len'] == 64 and r['batch'] == 4
    # --set reaches every variant, but a variant's own value wins (--small sets every variant's tiles to 16).
    assert r['overrides']['model.fused_bwd_splits'] == 2
    assert r['overrides']['model.block_k'] == 16
  # The same data and seed: all selective implementations train the same function; standard is another model.
  std, fac, blk = (r['final_loss'] for r in results)
  assert abs(fac - blk) < 1e-4 * abs(fac)
  assert results[1]['num_params'] == results[2]['num_params'] != results[0]['num_params']
  assert 'standard' in p.stdout and 'ms/step' in p.stdout  # the printed table
  # --profile: a trace and the compiled HLO per variant; a CPU trace has no device plane, so no op times.
  for r in results:
    assert r['profile'] == {}
    assert 'HloModule' in (tmp_path / 'prof' / r['variant'] / 'step.hlo.txt').read_text()
    assert list((tmp_path / 'prof' / r['variant']).glob('plugins/profile/*/*.xplane.pb'))


def test_bench_stacked_seeds_train_each_seed_as_its_own_run(tmp_path):
  """The seed workload's -stack3 variants (selattn.sweep --stack's step): seed 0 of the stack trains what the
  unstacked variant trains (the same init, batches and steps), and a stacked step counts every seed's tokens."""
  out = tmp_path / 'stack.json'
  _bench('--workload', 'seed', '--small', '--steps', '10', '--variants', 'standard,standard-stack3', f'--out={out}')
  one, stacked = json.loads(out.read_text())
  assert (one['seeds'], stacked['seeds']) == (1, 3)
  assert len(stacked['final_losses']) == 3 and len(set(stacked['final_losses'])) == 3  # three different runs
  assert abs(stacked['final_losses'][0] - one['final_loss']) < 1e-5 * abs(one['final_loss'])
  for r in (one, stacked):
    tokens = r['seeds'] * r['batch'] * r['seq_len']
    assert abs(r['tokens_per_s'] - tokens / (r['ms_per_step'] / 1000)) < 1e-6 * r['tokens_per_s']
    assert abs(r['ms_per_seed_step'] - r['ms_per_step'] / r['seeds']) < 1e-9


def test_bench_data_times_the_input_pipeline_against_w4(tmp_path):
  out = tmp_path / 'data.json'
  p = _bench('--workload', 'data', '--small', '--steps', '30', '--worker_counts', '0', f'--out={out}')
  (r,) = json.loads(out.read_text())
  assert r['variant'] == 'workers0-1MB' and r['batches'] == 30 and (r['batch'], r['seq_len']) == (8, 64)
  assert r['tokens_per_s'] == r['batches'] * 8 * 64 / r['seconds']
  assert r['ratio_to_w4'] == r['tokens_per_s'] / r['w4_tokens_per_s']
  assert r['corpus_bytes'] == 2**20
  # The W4 figure is the committed measurement's, not a number typed in elsewhere.
  w4 = {v['variant']: v for v in json.loads((REPO / 'docs' / 'bench' / 'w4_scale_h200.json').read_text())}
  assert r['w4_tokens_per_s'] == round(w4['standard-fsdp4']['tokens_per_s'], 2)
  # ... and the fastest consumer among W4's 4-GPU (one-host) variants.
  assert w4['standard-fsdp4']['tokens_per_s'] == max(v['tokens_per_s'] for v in w4.values() if v['devices'] == 4)
  assert 'x W4' in p.stdout and 'workers0' in p.stdout


def test_bench_set_parses_literals_and_refuses_a_malformed_item():
  from absl import app  # pylint: disable=g-import-not-at-top
  from selattn import bench  # pylint: disable=g-import-not-at-top
  assert bench._parse_set('model.fused_bwd_splits=2') == ('model.fused_bwd_splits', 2)
  assert bench._parse_set('model.dtype=bfloat16') == ('model.dtype', 'bfloat16')
  for bad in ('fused_bwd_splits=2', 'model.remat'):
    with pytest.raises(app.UsageError, match='section.key=value'):
      bench._parse_set(bad)


def test_bench_nanogpt_old_names_keep_measuring_the_dense_path():
  from selattn import bench  # pylint: disable=g-import-not-at-top
  variants = {name: o for name, o, _ in bench._variants('nanogpt', 1, small=False)}  # pylint: disable=protected-access
  assert variants['standard']['model.attn_kernel'] == variants['selective-factored']['model.attn_kernel'] == 'dense'
  assert variants['standard-flash']['model.attn_kernel'] == 'flash'
  assert variants['standard-nodrop']['model.attn_dropout'] == 0.0


@pytest.mark.slow  # 20 s of CPU; the kernel's agreement with the dense path is flash_test's and attn_dropout_test's
def test_bench_nanogpt_flash_trains_as_the_dense_path(tmp_path):
  """W2's flash variant runs the trainer's step through the kernel (interpreted here) and, with the same seed and
  so the same dropout masks, ends at the dense path's loss."""
  out = tmp_path / 'w2.json'
  _bench('--workload', 'nanogpt', '--small', '--steps', '5', '--variants', 'standard,standard-flash', f'--out={out}')
  dense, flash = json.loads(out.read_text())
  assert (dense['variant'], flash['variant']) == ('standard', 'standard-flash')
  assert 'error' not in dense and 'error' not in flash
  # The tiny model barely uses its attention yet: measured, the same masks end 1.3e-6 apart (bf16 rounding), the
  # kernel with another seed's masks 6.5e-5 apart.
  assert abs(dense['final_loss'] - flash['final_loss']) < 1e-5 * abs(dense['final_loss'])


def test_bench_mlp_mesh_variants_split_the_mosaic_gpu_kernels_over_every_device():
  """With several devices the mlp workload adds the Mosaic GPU kernels under the seq, tensor and data splits: valid
  configs whose mesh uses every device, with the kernels named (not 'auto')."""
  from selattn import bench, config as config_lib, sharding  # pylint: disable=g-import-not-at-top
  one = {name for name, _, _ in bench._variants('mlp', 1, small=False)}  # pylint: disable=protected-access
  two = bench._variants('mlp', 2, small=False)  # pylint: disable=protected-access
  meshed = [(name, o, d) for name, o, d in two if d == 2]
  assert {name for name, _, d in two if d == 1} == one
  assert sorted(name for name, _, _ in meshed) == sorted(
      f'fused-mgpu2-h{h}-floa-{axis}2' for h in (64, 256) for axis in ('seq', 'tensor', 'data'))
  for name, o, _ in meshed:
    cfg = config_lib.from_config(bench._config(o), vocab_size=83)  # pylint: disable=protected-access
    sizes = cfg.mesh.resolve(2)
    axis = name.rsplit('-', 1)[1][:-1]
    assert sizes[axis] == 2 and all(v == 1 for k, v in sizes.items() if k != axis), (name, sizes)
    assert (cfg.model.fused_forward, cfg.model.fused_backward, cfg.model.kv_generator) == ('mgpu', 'mgpu', 'mlp')
    assert cfg.train.batch_size == (32 if axis == 'data' else 16), name
    assert cfg.data.seq_len == (300 if axis == 'seq' else 299), name
    sharding.check_fits(cfg, types.SimpleNamespace(shape=sizes))  # what the bench checks before it builds the step
