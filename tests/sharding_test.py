"""Scale-out on 8 fake CPU devices: every mesh trains the same model, really sharded, and refuses sizes that don't fit.

The 8-device work runs in subprocesses (tests/mesh_check.py; the device count must be set before jax is
imported), one after another from when the first test here needs one (on 2 cores, with the other pytest worker
busy, they cost less CPU in turn than all at once):
  - one worker trains each variant for 10 steps on the meshes single / (8 data) / (2 data x 4 seq) /
    (2 fsdp x 2 seq x 2 tensor), recording losses, shardings, the step's jaxpr shapes and its compiled HLO (one
    process, not one per variant: the variants share its warm-up and their parameters' init programs);
  - selattn.train.train runs 10 steps on (2 data x 2 fsdp x 2 seq), then resumes to step 20 on 2 devices, and an
    uninterrupted 20-step run on one device is the reference.
"""

import json
import os
import threading

import jax
from jax.sharding import AbstractMesh, AxisType
import pytest

import mesh_check as mc
import run_files
from configs import tiny
from selattn import config as config_lib
from selattn import sharding

REL_TOL = 1e-5
SHARDED = ('data8', 'data2_seq4', 'fsdp2_seq2_tensor2')
SEQ_MESHES = ('data2_seq4', 'fsdp2_seq2_tensor2')
T = S = mc.SEQ_LEN
N, H = 2, 16  # configs/tiny.py: d_model 32, 2 heads

# Restore onto another mesh (item 5).
TRAIN = {'train.log_every': 1, 'train.eval_batches': 1, 'train.sample_length': 0, 'train.eval_every': 0,
         'train.checkpoint_every': 10}
MESH_8 = {'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.seq': 2, 'mesh.tensor': 1}
MESH_2 = {'mesh.data': 1, 'mesh.fsdp': 2, 'mesh.seq': 1, 'mesh.tensor': 1}
MESH_1 = {'mesh.data': 1, 'mesh.fsdp': 1, 'mesh.seq': 1, 'mesh.tensor': 1}


class _Runs:
  """The module's subprocesses, started in turn by a thread, each when the one before has ended: the equivalence
  worker, the 8-device run, its resume (which continues that run's workdir) and the reference."""

  def __init__(self, tmp):
    self.tmp = tmp
    self.resume_dir, self.reference_dir = str(tmp / 'resume'), str(tmp / 'reference')
    self._jobs = {  # name: (mesh_check.py arguments, devices)
        # The selective variants with the same parameters first (one init program per mesh), the others after.
        'eq': (['equivalence', 'factored', 'materialized', 'blockwise', 'standard', 'blockwise_mlp', '--controls'],
               8),
        'first': (['train', self.resume_dir, _json(TRAIN, MESH_8, {'train.num_steps': 10})], 8),
        'resume': (['train', self.resume_dir, _json(TRAIN, MESH_2, {'train.num_steps': 20})], 2),
        'reference': (['train', self.reference_dir, _json(TRAIN, MESH_1, {'train.num_steps': 20})], 1),
    }
    self._workers, self._started = {}, {name: threading.Event() for name in self._jobs}
    self._lock, self._closed = threading.Lock(), False
    self._thread = threading.Thread(target=self._run_in_turn, daemon=True)
    self._thread.start()

  def _run_in_turn(self):
    for name, (args, devices) in self._jobs.items():
      with self._lock:
        if self._closed:
          break
        worker = self._workers[name] = mc.Worker(args, devices, str(self.tmp / f'{name}.log'))
      self._started[name].set()
      worker.proc.wait()
    for started in self._started.values():  # closed early: no one waits for a run that will not start
      started.set()

  def result(self, name) -> dict:
    self._started[name].wait()
    assert name in self._workers, f'{name} was not started: the module closed first'
    return self._workers[name].result()

  def equivalence(self, variant) -> dict:
    return self.result('eq')['variants'][variant]

  def close(self):
    with self._lock:
      self._closed = True
    for w in list(self._workers.values()):
      w.kill()
    self._thread.join()


def _json(*dicts):
  out = {}
  for d in dicts:
    out.update(d)
  return json.dumps(out)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  r = _Runs(tmp_path_factory.mktemp('sharding'))
  yield r
  r.close()


# ----------------------------------------------------------------------------------------------------------------
# 1. Every mesh gives the same losses, and the sharded runs are really sharded.

@pytest.mark.parametrize('variant', ['standard', 'factored', 'blockwise', 'blockwise_mlp', 'materialized'])
def test_every_mesh_gives_the_same_losses(runs, variant):
  res = runs.equivalence(variant)
  not_run = [m for m in res if res[m]['losses'] is None]
  assert not not_run, (f'{variant} not run on {not_run}: its step has collectives inside a lax.cond branch, which '
                       'deadlocks (see test_no_collective_inside_a_data_dependent_branch)')
  single = res['single']
  assert len(single['losses']) == mc.STEPS and single['losses'][-1] < single['losses'][0], single['losses']
  assert set(res) == set(mc.MESHES) - {m for v, m in mc.SKIP if v == variant}, sorted(res)
  for mesh in set(SHARDED) & set(res):
    diff = mc.max_rel_diff(res[mesh]['losses'], single['losses'])
    assert diff < REL_TOL, (mesh, diff, res[mesh]['losses'], single['losses'])


@pytest.mark.parametrize('variant', ['standard', 'factored', 'blockwise', 'blockwise_mlp', 'materialized'])
def test_sharded_meshes_really_are_sharded(runs, variant):
  res = runs.equivalence(variant)
  # Nothing is split on one device or over data alone; fsdp and tensor split most weights and the FFN kernel 2x2.
  for mesh in {'single', 'data8'} & set(res):
    assert res[mesh]['params_split'] == 0, (mesh, res[mesh]['params_split'])
    assert res[mesh]['ffn_in']['shard_shapes'] == [[32, 128]], res[mesh]['ffn_in']
  f = res['fsdp2_seq2_tensor2']
  assert f['params_split'] >= f['params_total'] // 2, (f['params_split'], f['params_total'])
  assert f['ffn_in']['shard_shapes'] == [[16, 64]], f['ffn_in']
  # Batches split over data x fsdp (and positions over seq); data-parallel steps all-reduce the gradients.
  for mesh in set(SHARDED) & set(res):
    assert res[mesh]['batch_spec'] == [None, ['data', 'fsdp'], 'seq'], res[mesh]['batch_spec']
  assert res['single']['collectives'] == dict.fromkeys(res['single']['collectives'], 0), res['single']['collectives']
  if 'data8' in res:
    assert res['data8']['collectives']['all-reduce'] > 0, res['data8']['collectives']
  # The seq split of the selective K/V is the shard_map path; standard and factored attention stay GSPMD.
  uses_shard_map = variant in ('blockwise', 'blockwise_mlp', 'materialized')
  for mesh in {'single', 'data8'} & set(res):
    assert not res[mesh]['shard_map'], mesh
  for mesh in SEQ_MESHES:
    assert res[mesh]['shard_map'] == uses_shard_map, (mesh, res[mesh]['shard_map'])


# ----------------------------------------------------------------------------------------------------------------
# 2. Under the seq split each device builds only its own K/V tiles; nothing gathers a [.., T, S, ..] tensor.

def _local(mesh: str, variant: str):
  data, fsdp, seq, tensor = mc.MESHES[mesh]
  heads = N // tensor if variant != 'blockwise_mlp' else N  # the MLP generator mixes heads: not split
  return mc.BATCH // (data * fsdp), T // seq, heads


@pytest.mark.parametrize('variant', ['blockwise', 'blockwise_mlp'])
def test_blockwise_seq_split_builds_local_tiles(runs, variant):
  res = runs.equivalence(variant)
  for mesh in SEQ_MESHES:
    b, t_local, n = _local(mesh, variant)
    assert mc.BLOCK_Q <= t_local
    tile = [b, mc.BLOCK_Q, mc.BLOCK_K, n, H]  # one [b, bq, bk, N, H] K or V tile
    assert tile in res[mesh]['shapes_5d_in_shard_map'], (mesh, tile, res[mesh]['shapes_5d_in_shard_map'])
    assert res[mesh]['full_qk_shapes'] == [], (mesh, res[mesh]['full_qk_shapes'])
  for mesh in res:
    assert res[mesh]['full_qk_shapes'] == [], (mesh, res[mesh]['full_qk_shapes'])


@pytest.mark.parametrize('variant', ['blockwise', 'blockwise_mlp', 'materialized'])
def test_no_collective_inside_a_data_dependent_branch(runs, variant):
  # Each seq device skips the causal tiles it can't see (lax.cond on its own positions), so the devices of a
  # collective's group take different branches: a collective in a branch waits forever for the ones that skip.
  res = runs.equivalence(variant)
  for mesh in SEQ_MESHES:
    assert res[mesh]['collectives_in_cond'] == [], (
        f'{variant} on {mesh}: {res[mesh]["collectives_in_cond"]} inside a lax.cond branch of the shard_map body '
        '(the transpose of an invariant->varying cast of the generator params inside the skipped-tile branch)')


def test_materialized_seq_split_builds_local_kv(runs):
  res = runs.equivalence('materialized')
  # The detector sees the literal [B, T, S, N, H] K on one device (so it can fail) ...
  assert [mc.BATCH, T, S, N, H] in res['single']['full_qk_shapes'], res['single']['full_qk_shapes']
  for mesh in SEQ_MESHES:
    b, t_local, n = _local(mesh, 'materialized')
    # ... and under the seq split each device holds [b, T/seq, S, N/tensor, H], no [*, T, S, ...] anywhere.
    assert [b, t_local, S, n, H] in res[mesh]['shapes_5d_in_shard_map'], (mesh, res[mesh]['shapes_5d_in_shard_map'])
    assert res[mesh]['full_qk_shapes'] == [], (mesh, res[mesh]['full_qk_shapes'])


@pytest.mark.parametrize('variant', ['blockwise', 'blockwise_mlp', 'materialized'])
def test_no_all_gather_of_a_query_key_tensor(runs, variant):
  res = runs.equivalence(variant)
  for mesh in SEQ_MESHES:
    gathers = [tuple(s) for s in res[mesh]['all_gather_shapes']]
    # The layer input x [b, T, D] is what is gathered over seq (its backward is a reduce-scatter).
    b, _, _ = _local(mesh, variant)
    assert (b, T, 32) in gathers, (mesh, gathers)
    assert res[mesh]['collectives']['reduce-scatter'] > 0, (mesh, res[mesh]['collectives'])
    assert mc.gathers_of_query_key_tensors(gathers, T, S) == [], (mesh, gathers)


def test_all_gather_detector_sees_a_real_gather_of_a_query_key_tensor(runs):
  # Compiled on 8 devices: a seq-split [2, T, S, 4] array made replicated is one all-gather of that shape.
  shapes = [tuple(s) for s in runs.result('eq')['controls']['gather_control']]
  assert mc.gathers_of_query_key_tensors(shapes, T, S) == [(2, T, S, 4)], shapes


@pytest.mark.parametrize('variant', list(mc.VARIANTS))
def test_no_activation_all_to_all(runs, variant):
  # Unpinned, GSPMD met fsdp-sharded weights by resharding activations to the weights' contracting dim (all-to-all)
  # and all-reducing full-batch partial sums: W4 fsdp=4 ran 4x slower than one GPU. Pinned activations leave FSDP's
  # weight all-gathers only.
  for mesh_name, info in runs.equivalence(variant).items():
    assert info['collectives']['all-to-all'] == 0, (mesh_name, info['collectives'])


def test_hlo_all_gather_parser():
  hlo = '\n'.join([
      '  %all-gather.3 = f32[4,48,32]{2,1,0} all-gather(f32[4,24,32]{2,1,0} %p), channel_id=1, dimensions={1}',
      '  %ags = (f32[2,24,48,2,16]{4,3,2,1,0}, f32[2,48,48,2,16]{4,3,2,1,0}) all-gather-start(%x), dimensions={1}',
      '  %add.1 = f32[4,48,48]{2,1,0} add(%a, %b)',
      '  %all-reduce.2 = f32[48,48]{1,0} all-reduce(%c), to_apply=%sum',
  ])
  shapes = mc.hlo_all_gather_shapes(hlo)
  assert shapes == [(4, 48, 32), (2, 24, 48, 2, 16), (2, 48, 48, 2, 16)], shapes
  assert mc.gathers_of_query_key_tensors(shapes, 48, 48) == [(2, 48, 48, 2, 16)]
  assert mc.gathers_of_query_key_tensors(shapes, 24, 48) == [(2, 24, 48, 2, 16)]
  assert mc.hlo_collectives(hlo) == {'all-reduce': 1, 'all-gather': 2, 'reduce-scatter': 0, 'all-to-all': 0,
                                     'collective-permute': 0}


# ----------------------------------------------------------------------------------------------------------------
# 3. Parameters and optimizer state are born sharded.

def test_parameters_and_optimizer_state_are_born_sharded(runs):
  res = runs.equivalence('blockwise')['fsdp2_seq2_tensor2']  # straight after create_state, before any step
  for name in ('ffn_in', 'ffn_in_mu', 'ffn_in_nu'):
    d = res[name]
    assert d['shape'] == [32, 128], d
    assert d['spec'] == ['fsdp', 'tensor'], (name, d)
    assert d['shard_shapes'] == [[16, 64]] and d['num_shards'] == 8, (name, d)


# ----------------------------------------------------------------------------------------------------------------
# 4. Mesh sizes that don't fit are refused with a one-line ConfigError naming the keys.

def _cfg(**changes):
  c = tiny.get_config()
  for key, value in changes.items():
    section, name = key.split('__')
    setattr(c[section], name, value)
  return config_lib.from_config(c, 83)


def _mesh(data=1, fsdp=1, seq=1, tensor=1):
  return AbstractMesh((data, fsdp, seq, tensor), sharding.AXES, axis_types=(AxisType.Auto,) * 4)


def _refusal(fn) -> str:
  with pytest.raises(config_lib.ConfigError) as e:
    fn()
  msg = str(e.value)
  assert '\n' not in msg and len(msg) < 200, msg
  return msg


def test_fitting_meshes_are_accepted():
  sharding.check_fits(_cfg(), _mesh(data=2, fsdp=2, seq=2, tensor=2))  # batch 16, 2 heads, T 32, F 128
  sharding.check_fits(_cfg(model__kv_generator='mlp', model__selective_impl='blockwise'), _mesh(tensor=2))


def test_mesh_product_must_match_the_devices(runs):
  msg = _refusal(lambda: sharding.make_mesh(config_lib.MeshConfig(data=2), jax.devices()))  # 1 device here
  assert 'mesh' in msg and '1 devices' in msg, msg
  errors = runs.result('eq')['controls']['mesh_errors']  # on 8 devices
  for name, msg in errors.items():
    assert msg is not None, f'{name}: accepted'
    assert '\n' not in msg and '8 devices' in msg, (name, msg)


def test_heads_must_divide_over_tensor():
  msg = _refusal(lambda: sharding.check_fits(_cfg(), _mesh(tensor=4)))
  assert 'model.num_heads=2' in msg and 'mesh.tensor=4' in msg, msg


def test_batch_must_divide_over_data_and_fsdp():
  msg = _refusal(lambda: sharding.check_fits(_cfg(train__batch_size=12), _mesh(data=2, fsdp=4)))
  assert 'train.batch_size=12' in msg and 'mesh.data*mesh.fsdp=8' in msg, msg


def test_flat_optimizer_needs_unsharded_parameters():
  for mesh in (_mesh(fsdp=2), _mesh(tensor=2)):
    msg = _refusal(lambda m=mesh: sharding.check_fits(_cfg(train__flat_optimizer=True), m))
    assert 'train.flat_optimizer=True' in msg and 'mesh.fsdp=1' in msg, msg
  sharding.check_fits(_cfg(train__flat_optimizer=True), _mesh(data=2, seq=2))  # replicated parameters: fine


def test_seq_len_must_divide_into_two_chunks_per_seq_device():
  # 34 divides by seq=2 but not into the 2*seq=4 zigzag chunks.
  msg = _refusal(lambda: sharding.check_fits(_cfg(data__seq_len=34), _mesh(seq=2)))
  assert 'data.seq_len=34' in msg and 'mesh.seq' in msg, msg
  sharding.check_fits(_cfg(data__seq_len=34), _mesh(seq=1))  # no seq split: any length


# ----------------------------------------------------------------------------------------------------------------
# 5. A checkpoint restores onto another mesh and training continues with the same losses.

def test_restore_onto_another_mesh_continues_with_the_same_losses(runs):
  first, resumed, reference = runs.result('first'), runs.result('resume'), runs.result('reference')
  assert (first['devices'], resumed['devices'], reference['devices']) == (8, 2, 1)
  files = run_files.event_files(runs.resume_dir)
  assert len(files) == 2, files  # one per run
  first_losses = run_files.scalars(runs.resume_dir, files=files[:1])
  resumed_losses = run_files.scalars(runs.resume_dir, files=files[1:])
  ref = run_files.scalars(runs.reference_dir)
  assert sorted(first_losses) == list(range(1, 11)), sorted(first_losses)
  # The second run started from the step-10 checkpoint: it logged steps 11..20 only.
  assert sorted(resumed_losses) == list(range(11, 21)), sorted(resumed_losses)
  assert sorted(ref) == list(range(1, 21)), sorted(ref)
  assert os.path.isdir(os.path.join(runs.resume_dir, 'checkpoints', '10'))
  for losses in (first_losses, resumed_losses):
    steps = sorted(losses)
    diff = mc.max_rel_diff([losses[s] for s in steps], [ref[s] for s in steps])
    assert diff < REL_TOL, (steps[0], diff, [losses[s] for s in steps], [ref[s] for s in steps])
  assert ref[20] < ref[1]
