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


def test_cli_writes_png_and_rejects_bad_input(tmp_path):
  pytest.importorskip('matplotlib')
  _write_run(tmp_path / 'std', 0.0)
  _write_run(tmp_path / 'sel', -0.1)
  out = tmp_path / 'docs' / 'curves.png'
  cmd = [sys.executable, '-m', 'selattn.plot', str(tmp_path / 'std'), str(tmp_path / 'sel'), '--out', str(out),
         '--labels', 'standard,selective', '--smoothing', '0.6', '--tags', 'train/loss,eval/loss', '--max_step', '200']
  r = subprocess.run(cmd, capture_output=True, text=True, check=False)
  assert r.returncode == 0, r.stderr
  assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and os.path.getsize(out) > 5000
  r = subprocess.run(cmd[:-8] + ['--labels', 'only_one'], capture_output=True, text=True, check=False)
  assert r.returncode != 0 and 'error: --labels has 1 names for 2 runs' in r.stderr + r.stdout
  (tmp_path / 'empty').mkdir()
  r = subprocess.run([sys.executable, '-m', 'selattn.plot', str(tmp_path / 'empty'), '--out', str(out)],
                     capture_output=True, text=True, check=False)
  assert r.returncode != 0 and 'no TensorBoard scalars' in r.stderr + r.stdout
