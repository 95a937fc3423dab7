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


def test_what_is_drawn_mean_band_smoothing_and_max_step(tmp_path, monkeypatch):
  """The drawn numbers, read back from the figure: a sweep folder's mean line and min-max band over the seeds at
  the steps all of them have, each seed's train/* smoothed before the band (eval/* never), steps past --max_step
  left out; a single run: its own curve and no band. Expected values written out by hand."""
  train = {0: {100: 4.0, 200: 2.0, 300: 1.0, 400: 9.0}, 1: {100: 6.0, 200: 6.0, 300: 3.0, 400: 9.0}}
  evals = {0: {100: 3.0, 200: 2.0, 300: 1.0}, 1: {100: 3.5, 200: 1.0, 300: 2.0}}
  for k in (0, 1):
    w = metrics.MetricWriter(str(tmp_path / 'sw' / f'seed{k}'))
    for step, v in train[k].items():
      w.write_scalars(step, {'train/loss': v, **({'eval/loss': evals[k][step]} if step in evals[k] else {})})
    w.close()
  w = metrics.MetricWriter(str(tmp_path / 'one'))
  w.write_scalars(100, {'train/loss': 5.0, 'eval/loss': 4.0})
  w.write_scalars(300, {'train/loss': 7.0, 'eval/loss': 3.0})
  w.close()
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  figures = []
  subplots = plt.subplots
  monkeypatch.setattr(plt, 'subplots', lambda *a, **k: figures.append(subplots(*a, **k)) or figures[-1])
  plot.plot([str(tmp_path / 'sw'), str(tmp_path / 'one')], str(tmp_path / 'x.png'), tags=('train/loss', 'eval/loss'),
            smoothing=0.5, max_step=300)
  fig, axes = figures[0]
  train_ax, eval_ax = axes[0]
  # EMA 0.5 per seed over steps 100-300 (step 400 is past max_step): seed 0 4, 3, 2; seed 1 6, 6, 4.5.
  want = {train_ax: ([100, 200, 300], [5.0, 4.5, 3.25], [4.0, 3.0, 2.0], [6.0, 6.0, 4.5]),
          eval_ax: ([100, 200, 300], [3.25, 1.5, 1.5], [3.0, 1.0, 1.0], [3.5, 2.0, 2.0])}
  for ax, (steps, mean, lo, hi) in want.items():
    sweep_line, single_line = ax.lines
    assert sweep_line.get_label() == 'sw (2 seeds)' and single_line.get_label() == 'one'
    assert list(sweep_line.get_xdata()) == steps
    assert list(sweep_line.get_ydata()) == pytest.approx(mean)
    (band,) = ax.collections  # the sweep's band only: one run has none
    for s, l, h in zip(steps, lo, hi):
      ys = {float(y) for x, y in band.get_paths()[0].vertices if x == s}
      assert sorted(ys) == pytest.approx([l, h]), (ax.get_title(), s, ys)
  assert list(train_ax.lines[1].get_ydata()) == pytest.approx([5.0, 6.0])  # EMA 0.5 of 5, 7
  assert list(eval_ax.lines[1].get_ydata()) == pytest.approx([4.0, 3.0])  # raw
  plt.close(fig)
