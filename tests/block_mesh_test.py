"""nanoGPT's block (pre-LN, GELU, output projection, learned positions, tied embeddings, its init) with residual
and attention dropout trains with the same losses on 8 fake CPU devices (data x fsdp x tensor) as on one: the
dropout masks and the tied, learned and sharded parameters do not depend on the mesh."""

import json

import mesh_check as mc
import run_files

BLOCK = {'model.norm': 'pre', 'model.activation': 'gelu', 'model.positions': 'learned', 'model.attn_out_proj': True,
         'model.tie_embeddings': True, 'model.init': 'nanogpt', 'model.linear_bias': True, 'model.norm_bias': False,
         'model.head_bias': False, 'model.dropout': 0.1, 'model.attn_dropout': 0.1,
         'train.weight_decay_mask': 'matrices', 'train.grad_clip': 0.5}
TRAIN = {'train.num_steps': 8, 'train.log_every': 1, 'train.eval_batches': 1, 'train.sample_length': 0,
         'train.eval_every': 0, 'train.checkpoint_every': 8}
MESHES = {8: {'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.seq': 1, 'mesh.tensor': 2},
          1: {'mesh.data': 1, 'mesh.fsdp': 1, 'mesh.seq': 1, 'mesh.tensor': 1}}


def test_nanogpt_block_with_dropout_trains_alike_on_any_mesh(tmp_path):
  # Selective (factored) on the block: its kept-mass value term, and the tied head under fsdp and tensor splits.
  workers = {n: mc.Worker(['train', str(tmp_path / f'd{n}'), json.dumps({**BLOCK, **TRAIN, **mesh,
                                                                         'model.attention': 'selective'})],
                          n, str(tmp_path / f'd{n}.log'), timeout=900)
             for n, mesh in MESHES.items()}
  results = {n: w.result() for n, w in workers.items()}
  assert {n: r['devices'] for n, r in results.items()} == {8: 8, 1: 1}
  losses = {n: run_files.scalars(str(tmp_path / f'd{n}')) for n in MESHES}
  assert sorted(losses[8]) == sorted(losses[1]) == list(range(1, 9))
  steps = sorted(losses[1])
  diff = mc.max_rel_diff([losses[8][s] for s in steps], [losses[1][s] for s in steps])
  assert diff < 1e-5, (diff, losses)
  assert losses[1][8] < losses[1][1]
