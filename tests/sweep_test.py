"""selattn.sweep (one config over seeds: scheduling on GPUs, CPU fallback, resume, summary) and the seed bands of
selattn.plot."""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from selattn import metrics, plot, sweep

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _sweep(*args, cwd=ROOT, env=None):
  return subprocess.run([sys.executable, '-m', 'selattn.sweep', *args], capture_output=True, text=True, cwd=cwd,
                        check=False, env={**os.environ, 'PYTHONPATH': str(ROOT), **(env or {})})


def test_slots():
  assert sweep.slots([], 3) == [None]  # CPU: one run at a time
  assert sweep.slots(['0', '2'], 1) == [{'CUDA_VISIBLE_DEVICES': '0'}, {'CUDA_VISIBLE_DEVICES': '2'}]
  four = sweep.slots(['0', '2'], 2)
  assert [s['CUDA_VISIBLE_DEVICES'] for s in four] == ['0', '2', '0', '2']
  assert {s['XLA_PYTHON_CLIENT_MEM_FRACTION'] for s in four} == {'0.450'}


def test_detect_gpus_reads_cuda_visible_devices(monkeypatch):
  monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '1,3')
  assert sweep.detect_gpus() == ['1', '3']
  monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '')
  assert sweep.detect_gpus() == []
  monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '-1')  # CUDA's way of hiding every GPU
  assert sweep.detect_gpus() == []


def test_run_jobs_keeps_one_run_per_slot(tmp_path):
  """Five jobs on two GPUs: never more than two at once, each on a GPU of its own while it runs."""
  record = tmp_path / 'record.txt'
  code = ('import os, sys, time; t0 = time.time(); time.sleep(0.4); '
          f'open({str(record)!r}, "a").write(f"{{sys.argv[1]}} {{os.environ[\'CUDA_VISIBLE_DEVICES\']}} '
          '{t0} {time.time()}\\n"); sys.exit({3: 1, 4: 75}.get(int(sys.argv[1]), 0))')
  jobs = [sweep.Job(k, str(tmp_path / f'seed{k}'), [sys.executable, '-c', code, str(k)]) for k in range(5)]
  sweep.run_jobs(jobs, sweep.slots(['4', '6'], 1), poll=0.05)
  rows = [line.split() for line in record.read_text().splitlines()]
  assert sorted(int(r[0]) for r in rows) == list(range(5))
  spans = [(float(r[2]), float(r[3]), r[1]) for r in rows]
  for t, _, _ in spans:  # at each start, at most 2 runs are live, on different GPUs
    live = [g for s, e, g in spans if s <= t < e]
    assert len(live) <= 2 and len(set(live)) == len(live), spans
  assert {r[1] for r in rows} == {'4', '6'}
  assert [j.returncode for j in jobs] == [0, 0, 0, 1, 75]
  assert all((tmp_path / f'seed{k}' / 'output.log').exists() for k in range(5))  # each job's stdout and stderr
  # 75: a run stopped by a signal after saving (selattn.stopping.EXIT_STOPPED) is resumable, not failed.
  assert [sweep._outcome(j.returncode) for j in jobs[3:]] == [
      'failed (1)', 'stopped (75): resumable, rerun the same command']


def test_a_rerun_appends_to_the_seeds_output_log(tmp_path):
  """A rerun (a resume) adds its console output after the first start's: the crash that made you rerun stays."""
  for start in ('first', 'second'):
    job = sweep.Job(0, str(tmp_path / 'seed0'), [sys.executable, '-c', f'print("{start} start")'])
    sweep.run_jobs([job], [None], poll=0.05)
  assert (tmp_path / 'seed0' / 'output.log').read_text() == 'first start\nsecond start\n'


def test_sweep_on_cpu_trains_each_seed_resumably(tmp_path):
  work = tmp_path / 'sw'
  args = ['--config', 'configs/tiny.py', '--seeds', '2', '--workdir', str(work), '--gpus', 'none',
          '--config.train.num_steps=4', '--config.train.eval_every=2', '--config.train.checkpoint_every=4',
          '--config.train.sample_length=0', '--config.train.log_every=2']
  # Seed 1 runs seed 0's programs (the seed is data, not code): compiled once, through a fresh compilation cache.
  r = _sweep(*args, env={'JAX_COMPILATION_CACHE_DIR': str(tmp_path / 'jax_cache'),
                         'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
                         'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0'})
  assert r.returncode == 0, r.stdout + r.stderr
  summary = json.loads((work / 'summary.json').read_text())
  assert set(summary['seeds']) == {'0', '1'} and summary['failed'] == {}
  for k in (0, 1):
    cfg = json.loads((work / f'seed{k}' / 'config.json').read_text())['config']
    assert cfg['train']['seed'] == k and cfg['train']['num_steps'] == 4
    assert summary['seeds'][str(k)]['last_step'] == 4
  losses = [summary['seeds'][k]['last_eval_loss'] for k in ('0', '1')]
  assert losses[0] != losses[1]  # two seeds, two runs
  assert summary['last_eval_loss']['min'] == min(losses) and summary['last_eval_loss']['max'] == max(losses)
  assert abs(summary['last_eval_loss']['mean'] - sum(losses) / 2) < 1e-12
  assert 'last eval loss over 2 seeds: mean' in r.stdout
  # Each seed ran `python -m selattn.main` with its own workdir and seed, a command that resumes when rerun.
  # Its log, written by the run itself, holds each line once; its console output (the same lines) is apart.
  for k in (0, 1):
    log, output = ((work / f'seed{k}' / name).read_text() for name in ('train.log', 'output.log'))
    for line in ('] step 2/4 |', '] step 4/4 |', '] eval at step 2: loss', '] eval at step 4: loss'):
      assert log.count(line) == 1 and output.count(line) == 1, (k, line, log)
  jobs = sweep.build_jobs('configs/tiny.py', str(work), [0, 1], args[8:])
  assert jobs[1].argv[1:] == ['-m', 'selattn.main', '--config=configs/tiny.py', f'--workdir={work}/seed1',
                              '--config.train.seed=1', *args[8:]]
  # Summarize only (no training), the best taken up to step 2: nanoGPT's "best by step 2000" protocol in small.
  sweep.main(['--config', 'configs/tiny.py', '--seeds', '2', '--workdir', str(work), '--summarize',
              '--best_until', '2'])
  early = json.loads((work / 'summary.json').read_text())
  assert early['best_until'] == 2 and early['missing'] == []
  assert {r['best_step'] for r in early['seeds'].values()} == {2}
  assert early['seeds']['0']['last_eval_loss'] == summary['seeds']['0']['last_eval_loss']
  # ... and plot draws the sweep folder as one curve with a band.
  png = tmp_path / 'bands.png'
  plot.plot([str(work)], str(png), tags=('eval/loss',))
  assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_a_failing_seed_is_reported_in_one_line(tmp_path):
  r = _sweep('--config', 'configs/tiny.py', '--seeds', '1', '--workdir', str(tmp_path / 'bad'), '--gpus', 'none',
             '--config.model.d_model=33')
  assert r.returncode == 1
  output = tmp_path / 'bad' / 'seed0' / 'output.log'
  assert r.stderr.strip().splitlines()[-1] == (
      f'seed 0 failed: error: model.d_model=33 is not divisible by model.num_heads=2 (its output: {output})')
  assert 'error: model.d_model=33' in output.read_text()


def test_a_seed_that_crashes_at_start_leaves_its_traceback_where_the_sweep_says(tmp_path):
  """A child that dies before logging anything (here jax cannot start its backend): the traceback is in the file
  the sweep's message names, in the seed's folder."""
  r = _sweep('--config', 'configs/tiny.py', '--seeds', '1', '--workdir', str(tmp_path / 'sw'), '--gpus', 'none',
             env={'JAX_PLATFORMS': 'no_such_platform'})
  assert r.returncode == 1
  last = r.stderr.strip().splitlines()[-1]
  m = re.fullmatch(r'seed 0 failed: (.+) \(its output: (.+)\)', last)
  assert m, r.stderr
  named = pathlib.Path(m.group(2))
  assert named.parent == tmp_path / 'sw' / 'seed0'
  text = named.read_text()
  assert 'Traceback (most recent call last)' in text and 'no_such_platform' in text, text
  assert text.strip().splitlines()[-1] == m.group(1)
  assert not (tmp_path / 'sw' / 'seed0' / 'train.log').exists()  # the run never held the workdir


@pytest.mark.parametrize('args,message', [
    (['--seeds', '0'], '--seeds and --per_gpu must be at least 1'),
    (['--config.train.seed=3'], '--config.train.seed is set per run by the sweep'),
    (['--learning_rate=1'], 'unrecognized arguments: --learning_rate=1'),
])
def test_bad_arguments(tmp_path, args, message):
  r = _sweep('--config', 'configs/tiny.py', '--workdir', str(tmp_path / 'x'), *args)
  assert r.returncode == 2 and message in r.stderr, r.stderr
  assert not (tmp_path / 'x').exists()


def test_summarize_needs_a_sweep_folder(tmp_path):
  r = _sweep('--config', 'configs/tiny.py', '--workdir', str(tmp_path / 'none'), '--summarize')
  assert r.returncode == 2 and 'is not a folder' in r.stderr


def test_missing_config_file(tmp_path):
  r = _sweep('--config', 'configs/nope.py:selective', '--workdir', str(tmp_path / 'x'))
  assert r.returncode == 2 and 'no such file configs/nope.py' in r.stderr


# ----------------------------------------------------------------------------------------------------------------
# Bands over seeds in selattn.plot.

def _write(path, values):
  w = metrics.MetricWriter(str(path))
  for step, v in values.items():
    w.write_scalars(step, {'eval/loss': v})
  w.close()


def test_plot_reads_a_sweep_folder_as_seeds(tmp_path):
  _write(tmp_path / 'sw' / 'seed0', {100: 3.0, 200: 2.0, 300: 1.5})
  _write(tmp_path / 'sw' / 'seed1', {100: 3.2, 200: 2.4})  # still running: no step 300 yet
  _write(tmp_path / 'sw' / 'seed10', {100: 2.8, 200: 2.3, 300: 1.6})
  (tmp_path / 'sw' / 'seed2').mkdir()  # started, nothing written: not a seed curve yet
  runs = plot.seed_runs(str(tmp_path / 'sw'))
  assert [os.path.basename(r) for r in runs] == ['seed0', 'seed1', 'seed10']
  steps, mean, lo, hi = plot.band([plot.read_scalars(r)['eval/loss'] for r in runs])
  assert steps == [100, 200]
  assert mean == pytest.approx([3.0, (2.0 + 2.4 + 2.3) / 3])
  assert lo == pytest.approx([2.8, 2.0]) and hi == pytest.approx([3.2, 2.4])
  assert plot.seed_runs(str(tmp_path / 'sw' / 'seed0')) == [str(tmp_path / 'sw' / 'seed0')]  # a plain run


# ----------------------------------------------------------------------------------------------------------------
# The summary's numbers, on event files written here (no training): every figure against a hand computation.

# seed -> {step: eval/loss}. Seed 2's best is a tie (steps 200 and 300): the earlier step is the best. Seed 3 is
# still running (no step 300). Seed 0 exists but is outside --first_seed 1 --seeds 4; seed 4 has no evals yet.
_EVALS = {0: {100: 0.5, 200: 0.1, 300: 0.2},
          1: {100: 2.0, 200: 1.5, 300: 1.3},
          2: {100: 2.2, 200: 1.6, 300: 1.6},
          3: {100: 2.1, 200: 1.4}}


def _sweep_folder(root):
  for k, values in _EVALS.items():
    _write(root / f'seed{k}', values)
  (root / 'seed4').mkdir()
  return root


def _mean_std(values):
  """The sample mean and standard deviation (n - 1), written out."""
  mean = sum(values) / len(values)
  return mean, (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5


@pytest.mark.parametrize('best_until', [0, 200])
def test_summary_statistics_over_seeds(tmp_path, capsys, best_until):
  work = _sweep_folder(tmp_path / 'sw')
  argv = ['--config', str(ROOT / 'configs' / 'tiny.py'), '--workdir', str(work), '--first_seed', '1', '--seeds', '4',
          '--summarize']
  sweep.main(argv + (['--best_until', str(best_until)] if best_until else []))
  summary = json.loads((work / 'summary.json').read_text())
  # Best (up to step 200, or at any step) and last of seeds 1-3, by hand from _EVALS.
  best = {1: (1.5, 200) if best_until else (1.3, 300), 2: (1.6, 200), 3: (1.4, 200)}
  last = {1: (1.3, 300), 2: (1.6, 300), 3: (1.4, 200)}
  assert set(summary['seeds']) == {'1', '2', '3'}  # seed 0 is not in this sweep; seed 4 has no eval yet
  assert summary['missing'] == [4] and summary['failed'] == {} and summary['stopped'] == []
  for k in (1, 2, 3):
    got = summary['seeds'][str(k)]
    assert (got['best_eval_loss'], got['best_step']) == pytest.approx(best[k]), k
    assert (got['last_eval_loss'], got['last_step']) == pytest.approx(last[k]), k
  for key, table in (('best_eval_loss', best), ('last_eval_loss', last)):
    values = [table[k][0] for k in (1, 2, 3)]
    mean, std = _mean_std(values)
    assert summary[key] == pytest.approx({'mean': mean, 'std': std, 'min': min(values), 'max': max(values)}), key
  out = capsys.readouterr().out
  until = ' up to step 200' if best_until else ''
  assert f'seed 1: best eval/loss{until} {best[1][0]:.4f} (step {best[1][1]}), last 1.3000 (step 300)\n' in out
  mean, std = _mean_std([1.3, 1.6, 1.4])
  assert f'last eval loss over 3 seeds: mean {mean:.4f} std {std:.4f} min 1.3000 max 1.6000\n' in out


def test_the_summary_names_failed_and_stopped_seeds(tmp_path, monkeypatch, capsys):
  """The seeds' exit codes as run_jobs leaves them: 75 is stopped (resumable), anything else but 0 failed."""
  work = _sweep_folder(tmp_path / 'sw')
  codes = {1: 0, 2: 75, 3: 1}

  def fake_run_jobs(jobs, free):
    assert free == [None]  # --gpus none: one CPU slot
    for job in jobs:
      job.returncode = codes[job.seed]
      pathlib.Path(job.log).write_text(f'line one\nerror: seed {job.seed} broke\n\n')

  monkeypatch.setattr(sweep, 'run_jobs', fake_run_jobs)
  with pytest.raises(SystemExit) as e:
    sweep.main(['--config', str(ROOT / 'configs' / 'tiny.py'), '--workdir', str(work), '--first_seed', '1',
                '--seeds', '3', '--gpus', 'none'])
  assert e.value.code == 1
  summary = json.loads((work / 'summary.json').read_text())
  assert summary['failed'] == {'3': 'error: seed 3 broke'} and summary['stopped'] == [2]
  assert summary['missing'] == [] and set(summary['seeds']) == {'1', '2', '3'}
  err = capsys.readouterr().err
  assert err.strip().splitlines()[-1] == f'seed 3 failed: error: seed 3 broke (its output: {work}/seed3/output.log)'
