"""selattn.bench runs its workloads end to end on a CPU (--small) and writes the table and JSON."""

import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_bench_small_seed_writes_every_variant(tmp_path):
  out = tmp_path / 'w1.json'
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO))
  p = subprocess.run([sys.executable, '-m', 'selattn.bench', '--workload', 'seed', '--small', '--steps', '10',
                      '--variants', 'standard,selective-factored,selective-blockwise-b128', f'--out={out}'],
                     cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-3000:]
  results = json.loads(out.read_text())
  assert [r['variant'] for r in results] == ['standard', 'selective-factored', 'selective-blockwise-b128']
  for r in results:
    assert 'error' not in r, r
    assert r['ms_per_step'] > 0 and r['tokens_per_s'] > 0 and r['compile_s'] > 0
    assert 0 < r['mfu'] < 1
    assert r['seq_len'] == 64 and r['batch'] == 4
  # The same data and seed: all selective implementations train the same function; standard is another model.
  std, fac, blk = (r['final_loss'] for r in results)
  assert abs(fac - blk) < 1e-4 * abs(fac)
  assert results[1]['num_params'] == results[2]['num_params'] != results[0]['num_params']
  assert 'standard' in p.stdout and 'ms/step' in p.stdout  # the printed table
