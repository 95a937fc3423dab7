"""selattn.plot: reading event files back, smoothing, and the PNG it writes."""

import os
import subprocess
import sys

import pytest

from selattn import metrics, plot


def _write_run(path, offset, steps=(100, 200, 300)):
  w = metrics.MetricWriter(str(path))
  for step in steps:
    w.write_scalars(step, {'train/loss': 3.0 - step / 100 + offset, 'eval/loss': 2.0 + offset})
  w.close()


def test_read_scalars_merges_event_files(tmp_path):
  _write_run(tmp_path / 'a', 0.0)
  _write_run(tmp_path / 'a', 0.5, steps=(400, 500))  # a resumed run writes a second file
  assert len(os.listdir(tmp_path / 'a')) == 2
  got = plot.read_scalars(str(tmp_path / 'a'))
  assert set(got) == {'train/loss', 'eval/loss'}
  assert sorted(got['train/loss']) == [100, 200, 300, 400, 500]
  assert got['train/loss'][200] == pytest.approx(1.0) and got['train/loss'][500] == pytest.approx(-1.5)


def test_smooth_matches_tensorboard_ema():
  assert plot.smooth([1.0, 3.0, 3.0], 0.0) == [1.0, 3.0, 3.0]
  assert plot.smooth([1.0, 3.0, 3.0], 0.5) == [1.0, 2.0, 2.5]


def _run_cli(*args, cwd):
  return subprocess.run([sys.executable, '-m', 'selattn.plot', *args], capture_output=True, text=True, cwd=cwd,
                        check=False)


def test_cli_writes_png_and_rejects_bad_input(tmp_path):
  # Relative paths from the folder holding the runs, as the docs type them (`runs/std ... --out docs/x.png`).
  _write_run(tmp_path / 'runs' / 'std', 0.0)
  _write_run(tmp_path / 'runs' / 'sel', -0.1)
  args = ['runs/std', 'runs/sel', '--out', 'docs/curves.png', '--labels', 'standard,selective', '--smoothing', '0.6',
          '--tags', 'train/loss,eval/loss', '--max_step', '200', '--title', 'std vs sel']
  r = _run_cli(*args, cwd=tmp_path)
  assert r.returncode == 0, r.stderr
  assert r.stdout == 'wrote docs/curves.png\n'
  png = (tmp_path / 'docs' / 'curves.png').read_bytes()
  assert png[:8] == b'\x89PNG\r\n\x1a\n' and len(png) > 5000
  r = _run_cli('runs/std', 'runs/sel', '--out', 'x.png', '--labels', 'only_one', cwd=tmp_path)
  assert (r.returncode, r.stderr) == (1, 'error: --labels has 1 names for 2 runs\n')
  (tmp_path / 'empty').mkdir()
  r = _run_cli('empty', '--out', 'x.png', cwd=tmp_path)
  assert (r.returncode, r.stderr) == (1, 'error: no TensorBoard scalars under empty\n')
  r = _run_cli('runs/missing', '--out', 'x.png', cwd=tmp_path)
  assert (r.returncode, r.stderr) == (1, 'error: runs/missing: no such directory\n')
  assert not (tmp_path / 'x.png').exists()


def test_a_run_before_its_first_eval_draws_without_warnings(tmp_path):
  # A run in progress, as users plot it: train/loss only, the default tags ask for eval/* too.
  w = metrics.MetricWriter(str(tmp_path / 'runs' / 'quick'))
  for step in (100, 200):
    w.write_scalars(step, {'train/loss': 3.0 - step / 100})
  w.close()
  r = _run_cli('runs/quick', '--out', 'curves.png', cwd=tmp_path)
  assert (r.returncode, r.stdout, r.stderr) == (0, 'wrote curves.png\n', '')
  assert (tmp_path / 'curves.png').read_bytes()[:4] == b'\x89PNG'


def test_without_matplotlib_one_line(tmp_path):
  _write_run(tmp_path / 'std', 0.0)
  # A None entry in sys.modules makes `import matplotlib` fail as it does where it is not installed.
  code = ("import runpy, sys; sys.modules['matplotlib'] = None; sys.argv = ['plot', 'std', '--out', 'x.png']; "
          "runpy.run_module('selattn.plot', run_name='__main__')")
  r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=tmp_path, check=False)
  assert (r.returncode, r.stderr) == (1, "error: drawing needs matplotlib: pip install -e '.[plots]'\n")
