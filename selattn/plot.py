"""Draws training curves from TensorBoard event files: `python -m selattn.plot RUN_DIR... --out docs/curves.png`.

Each RUN_DIR is a workdir (or any folder holding `events.out.tfevents*`); its name labels the curves. A sweep
folder of `python -m selattn.sweep` (seed<k>/ runs inside) is drawn as the mean over its seeds with a min-max
band. Needs matplotlib (`pip install -e '.[plots]'`).
"""

from __future__ import annotations

import argparse
import glob
import os
import re

from tensorboard.backend.event_processing import event_accumulator


def read_scalars(run_dir: str) -> dict[str, dict[int, float]]:
  """tag -> {step: value} over every events file of a run (a resumed run writes one file per start)."""
  out: dict[str, dict[int, float]] = {}
  for path in sorted(glob.glob(os.path.join(run_dir, 'events.out.tfevents*'))):
    acc = event_accumulator.EventAccumulator(path, size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    for tag in acc.Tags()['scalars']:
      out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
  return out


def seed_runs(run_dir: str) -> list[str]:
  """The seed<k>/ runs of a sweep folder that hold event files, in seed order; [run_dir] for a single run."""
  if glob.glob(os.path.join(run_dir, 'events.out.tfevents*')):
    return [run_dir]
  found = [(int(m.group(1)), d) for d in glob.glob(os.path.join(run_dir, 'seed*'))
           if (m := re.fullmatch(r'seed(\d+)', os.path.basename(d)))
           and glob.glob(os.path.join(d, 'events.out.tfevents*'))]
  return [d for _, d in sorted(found)] or [run_dir]


def band(curves: list[dict[int, float]]) -> tuple[list[int], list[float], list[float], list[float]]:
  """(steps, mean, min, max) over the curves, at the steps every curve has (a seed still running stops it)."""
  steps = sorted(set.intersection(*(set(c) for c in curves)))
  vals = [[c[s] for c in curves] for s in steps]
  return steps, [sum(v) / len(v) for v in vals], [min(v) for v in vals], [max(v) for v in vals]


def smooth(values: list[float], weight: float) -> list[float]:
  """TensorBoard's exponential moving average (0 = raw values)."""
  out, last = [], None
  for v in values:
    last = v if last is None else weight * last + (1 - weight) * v
    out.append(last)
  return out


def plot(run_dirs: list[str], out: str, tags=('train/loss', 'eval/loss', 'eval/accuracy'), labels=None,
         smoothing: float = 0.0, title: str = '', max_step: int = 0) -> None:
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise SystemExit("error: drawing needs matplotlib: pip install -e '.[plots]'") from None
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import matplotlib.ticker  # pylint: disable=g-import-not-at-top
  if labels and len(labels) != len(run_dirs):
    raise SystemExit(f'error: --labels has {len(labels)} names for {len(run_dirs)} runs')
  fig, axes = plt.subplots(1, len(tags), figsize=(5 * len(tags), 3.6), squeeze=False)
  axes = axes[0]
  for i, run in enumerate(run_dirs):
    if not os.path.isdir(run):
      raise SystemExit(f'error: {run}: no such directory')
    runs = seed_runs(run)
    per_seed = [read_scalars(r) for r in runs]
    if not all(per_seed):
      raise SystemExit(f'error: no TensorBoard scalars under {run}')
    for ax, tag in zip(axes, tags):
      curves = []
      for scalars in per_seed:
        if tag in scalars:
          steps = sorted(s for s in scalars[tag] if not max_step or s <= max_step)
          values = [scalars[tag][s] for s in steps]
          if tag.startswith('train/'):
            values = smooth(values, smoothing)  # each seed's own EMA, then the band over seeds
          curves.append(dict(zip(steps, values)))
      if not curves:
        continue
      label = labels[i] if labels else os.path.basename(os.path.normpath(run))
      if len(runs) > 1:
        label = f'{label} ({len(curves)} seeds)'
      steps, mean, lo, hi = band(curves)
      (line,) = ax.plot(steps, mean, label=label, marker='o' if len(steps) <= 30 else None, markersize=3)
      if len(curves) > 1:
        ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
  steps_fmt = matplotlib.ticker.FuncFormatter(lambda x, _: f'{x / 1000:g}k' if abs(x) >= 1000 else f'{x:g}')
  for ax, tag in zip(axes, tags):
    ax.xaxis.set_major_formatter(steps_fmt)
    ax.set_title(tag)
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=8)
    else:  # a run before its first eval has no eval/* yet (or a tag is mistyped): say so, not an empty legend box
      ax.text(0.5, 0.5, f'no {tag} in these runs', ha='center', va='center', transform=ax.transAxes, color='gray')
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=110)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('runs', nargs='+', help='run directories holding TensorBoard event files, or sweep folders')
  p.add_argument('--out', required=True, help='PNG to write')
  p.add_argument('--tags', default='train/loss,eval/loss,eval/accuracy',
                 help='comma-separated scalar tags, one panel each')
  p.add_argument('--labels', default='', help='comma-separated curve names (default: the run folder names)')
  p.add_argument('--smoothing', type=float, default=0.0, help='EMA weight in [0, 1) for train/* curves')
  p.add_argument('--title', default='', help='figure title')
  p.add_argument('--max_step', type=int, default=0, help='draw steps up to this one only (0 = all)')
  args = p.parse_args()
  if not 0.0 <= args.smoothing < 1.0:
    p.error(f'--smoothing={args.smoothing} must be in [0, 1)')
  plot(args.runs, args.out, tags=tuple(t for t in args.tags.split(',') if t),
       labels=args.labels.split(',') if args.labels else None, smoothing=args.smoothing,
       title=args.title, max_step=args.max_step)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
