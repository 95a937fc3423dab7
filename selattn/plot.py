"""Draws training curves from TensorBoard event files: `python -m selattn.plot RUN_DIR... --out docs/curves.png`.

Each RUN_DIR is a workdir (or any folder holding `events.out.tfevents*`); its name labels the curves. Needs
matplotlib (`pip install -e '.[plots]'`).
"""

from __future__ import annotations

import argparse
import glob
import os

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


def plot(run_dirs: list[str], out: str, tags=('train/loss', 'eval/loss', 'eval/accuracy')) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, len(tags), figsize=(5 * len(tags), 3.6))
  for run in run_dirs:
    scalars = read_scalars(run)
    if not scalars:
      raise SystemExit(f'error: no TensorBoard scalars under {run}')
    for ax, tag in zip(axes, tags):
      if tag in scalars:
        steps = sorted(scalars[tag])
        ax.plot(steps, [scalars[tag][s] for s in steps], label=os.path.basename(os.path.normpath(run)))
  for ax, tag in zip(axes, tags):
    ax.set_title(tag)
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=110)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('runs', nargs='+', help='run directories holding TensorBoard event files')
  p.add_argument('--out', required=True, help='PNG to write')
  args = p.parse_args()
  plot(args.runs, args.out)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
