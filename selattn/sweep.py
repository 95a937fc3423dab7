"""One config over several seeds: `python -m selattn.sweep --config configs/nanogpt.py --seeds 3 --workdir runs/x`.

Seed k trains in its own workdir WORKDIR/seed<k> with --config.train.seed=k (parameter init, data order and
dropout), through `python -m selattn.main`, which logs to WORKDIR/seed<k>/train.log (each line once) as every run
does; the process's console (those lines again, and whatever is not a log line: a crash's traceback, XLA's own
messages) goes to WORKDIR/seed<k>/output.log, which a failed seed's message names. Runs go one per GPU
(CUDA_VISIBLE_DEVICES), --per_gpu at a time on each; without a GPU they run one after another. Like every run,
each seed resumes from its latest checkpoint: rerun the same command after a crash or to raise num_steps. Any
`--config.KEY=VALUE` is passed to every seed. At the end it prints each seed's best and last held-out loss and
their mean, std, min and max over seeds, and writes them to WORKDIR/summary.json; `python -m selattn.plot WORKDIR`
draws the mean with a min-max band.

--stack trains the seeds stacked instead: one process per GPU (the seeds dealt round-robin over --gpus; without a
GPU, one process), each one jitted step over its seeds' states stacked on a leading axis (selattn/stack.py). A small
model does little arithmetic per kernel (the original config: 1.2% MFU on an H200), and two processes on one GPU
took turns in our runs; stacked seeds share each step's kernels. Each WORKDIR/seed<k> is still an ordinary run, the
same numbers as unstacked (init, data order, dropout, evals, samples, checkpoints, event files, train.log): the
unstacked command resumes it, `selattn.sample` reads it. A process's own log is WORKDIR/stack.log (with several
GPUs, WORKDIR/stack-<its seeds>.log). A rerun of the same stacked command resumes every seed; the seeds of one
process must stand at the same step: seeds at different steps (a kill
between two seeds' saves, a seed added) are refused in one line saying how to bring them level (this command
without --stack, up to the leaders' step). Mesh sizes other than 1 and --per_gpu > 1 are refused too.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time

from selattn import stopping


@dataclasses.dataclass
class Job:
  """One process: seed `seed`'s run, or with `seeds` several seeds stacked; its stdout and stderr go to `log`."""
  seed: int
  workdir: str
  argv: list[str]
  proc: subprocess.Popen | None = None
  slot: str | None = None
  returncode: int | None = None
  seeds: list[int] | None = None  # the seeds it trains (default [seed])
  log: str | None = None  # default WORKDIR/output.log (the run itself writes WORKDIR/train.log)

  def __post_init__(self):
    self.seeds = self.seeds or [self.seed]
    self.log = self.log or os.path.join(self.workdir, 'output.log')

  @property
  def name(self) -> str:
    return f'seed {self.seed}' if len(self.seeds) == 1 else f'seeds {",".join(map(str, self.seeds))} (stacked)'


def detect_gpus() -> list[str]:
  """GPU ids to use: CUDA_VISIBLE_DEVICES if set, else those `nvidia-smi -L` lists; [] without an NVIDIA GPU."""
  visible = os.environ.get('CUDA_VISIBLE_DEVICES')
  if visible is not None:
    return [g for g in visible.split(',') if g.strip() and g.strip() != '-1']
  if shutil.which('nvidia-smi') is None:
    return []
  try:
    out = subprocess.run(['nvidia-smi', '-L'], capture_output=True, text=True, timeout=60, check=False).stdout
  except (OSError, subprocess.TimeoutExpired):
    return []
  return [str(i) for i, line in enumerate(l for l in out.splitlines() if l.startswith('GPU '))]


def slots(gpus: list[str], per_gpu: int) -> list[dict[str, str] | None]:
  """One entry per concurrent run: the environment it adds (its GPU), or None for the one CPU slot."""
  if not gpus:
    return [None]  # CPU: one run at a time, each using every core
  out = []
  for _ in range(per_gpu):
    for g in gpus:
      env = {'CUDA_VISIBLE_DEVICES': g}
      if per_gpu > 1:
        # JAX preallocates 75% of a GPU's memory per process: share it among the runs on one GPU.
        env['XLA_PYTHON_CLIENT_MEM_FRACTION'] = f'{0.9 / per_gpu:.3f}'
      out.append(env)
  return out


def run_jobs(jobs: list[Job], free: list[dict[str, str] | None], poll: float = 1.0) -> None:
  """Runs the jobs, at most one per free slot at a time; SIGTERM/SIGINT are passed on to the running ones (they
  checkpoint and stop), and no new job starts after one."""
  pending, running = list(jobs), []
  stop = []

  def handle(signum, frame):
    del frame
    stop.append(signum)
    for job in running:
      job.proc.send_signal(signal.SIGTERM)

  old = {s: signal.signal(s, handle) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    while pending or running:
      while pending and free and not stop:
        job, env = pending.pop(0), free.pop(0)
        os.makedirs(job.workdir, exist_ok=True)
        job.slot = env
        with open(job.log, 'ab') as log:
          job.proc = subprocess.Popen(job.argv, stdout=log, stderr=subprocess.STDOUT,
                                      env={**os.environ, **(env or {})})
        running.append(job)
        where = f'GPU {env["CUDA_VISIBLE_DEVICES"]}' if env else 'CPU'
        print(f'[sweep] {job.name} started on {where}: {job.workdir}', flush=True)
      if stop and not running:
        break
      time.sleep(poll)
      for job in list(running):
        if job.proc.poll() is not None:
          job.returncode = job.proc.returncode
          running.remove(job)
          free.append(job.slot)
          print(f'[sweep] {job.name} {_outcome(job.returncode)}', flush=True)
  finally:
    for s, h in old.items():
      signal.signal(s, h)
  if stop:
    raise SystemExit(f'error: stopped by a signal; rerun the same command to resume '
                     f'({sum(len(j.seeds) for j in pending)} seed(s) not started)')


def _outcome(returncode: int) -> str:
  if returncode == stopping.EXIT_FINISHED:
    return 'finished'
  if returncode == stopping.EXIT_STOPPED:
    return f'stopped ({returncode}): resumable, rerun the same command'
  return f'failed ({returncode})'


def _last_line(path: str) -> str:
  try:
    with open(path, errors='replace') as f:
      lines = [l.strip() for l in f if l.strip()]
  except OSError:
    return ''
  return lines[-1] if lines else ''


def _stats(values: list[float]) -> dict[str, float]:
  return {'mean': statistics.fmean(values), 'std': statistics.stdev(values) if len(values) > 1 else 0.0,
          'min': min(values), 'max': max(values)}


def summarize(workdir: str, seeds: list[int], best_until: int = 0) -> dict:
  """Each seed's best (up to step `best_until`, 0 = any) and last eval/loss, and their statistics over seeds."""
  from selattn import plot  # pylint: disable=g-import-not-at-top  (tensorboard: only once runs are done)
  per_seed = {}
  for k in seeds:
    all_evals = plot.read_scalars(os.path.join(workdir, f'seed{k}')).get('eval/loss', {})
    last = max(all_evals) if all_evals else None
    evals = {s: v for s, v in all_evals.items() if not best_until or s <= best_until}
    if evals:
      best = min(evals, key=lambda s: (evals[s], s))
      per_seed[k] = {'best_eval_loss': evals[best], 'best_step': best, 'last_eval_loss': all_evals[last],
                     'last_step': last}
  out = {'seeds': per_seed, 'best_until': best_until}
  if per_seed:
    out['best_eval_loss'] = _stats([r['best_eval_loss'] for r in per_seed.values()])
    out['last_eval_loss'] = _stats([r['last_eval_loss'] for r in per_seed.values()])
  return out


def build_jobs(config: str, workdir: str, seeds: list[int], overrides: list[str]) -> list[Job]:
  """Seed k: `python -m selattn.main` into WORKDIR/seed<k> with train.seed=k; the same command every time, so a
  rerun resumes each seed from its own checkpoints."""
  jobs = []
  for k in seeds:
    wd = os.path.join(workdir, f'seed{k}')
    jobs.append(Job(k, wd, [sys.executable, '-m', 'selattn.main', f'--config={config}', f'--workdir={wd}',
                            f'--config.train.seed={k}', *overrides]))
  return jobs


def build_stacked_job(config: str, workdir: str, seeds: list[int], overrides: list[str], log: str = 'stack.log'
                      ) -> Job:
  """These seeds in one `python -m selattn.main --stack_seeds=...` process (selattn/stack.py), seed k still in
  WORKDIR/seed<k> with its own train.log; the process's log is WORKDIR/<log>."""
  return Job(seeds[0], workdir, [sys.executable, '-m', 'selattn.main', f'--config={config}', f'--workdir={workdir}',
                                 f'--stack_seeds={",".join(map(str, seeds))}', *overrides],
             seeds=seeds, log=os.path.join(workdir, log))


def build_stacked_jobs(config: str, workdir: str, seeds: list[int], overrides: list[str], n_gpus: int) -> list[Job]:
  """One stacked process per GPU (at most one per seed), the seeds dealt round-robin: the same dealing on every
  rerun with the same GPU count. One process (no GPU, or one) logs to stack.log, several to stack-<seeds>.log."""
  n = max(1, min(n_gpus, len(seeds)))
  groups = [seeds[i::n] for i in range(n)]
  return [build_stacked_job(config, workdir, g, overrides,
                            'stack.log' if n == 1 else f'stack-{"-".join(map(str, g))}.log') for g in groups]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                              epilog='Other arguments must be --config.KEY=VALUE overrides, passed to every seed.')
  p.add_argument('--config', required=True, help='config file, e.g. configs/nanogpt.py[:variant]')
  p.add_argument('--workdir', required=True, help='sweep folder: seed k trains in WORKDIR/seed<k>')
  p.add_argument('--seeds', type=int, default=3, help='number of seeds')
  p.add_argument('--first_seed', type=int, default=0, help='seeds are first_seed .. first_seed + seeds - 1')
  p.add_argument('--gpus', default='auto', help="comma-separated GPU ids, 'auto' (CUDA_VISIBLE_DEVICES or all "
                 "nvidia-smi lists) or 'none' (CPU, one run at a time)")
  p.add_argument('--per_gpu', type=int, default=1, help='runs at a time on each GPU')
  p.add_argument('--stack', action='store_true',
                 help='train the seeds stacked, one process per GPU (seeds dealt round-robin), each one jitted '
                      'step over its seeds\' states: for small models (selattn/stack.py)')
  p.add_argument('--best_until', type=int, default=0,
                 help='the summary\'s best eval loss is taken over steps <= this one (0 = all)')
  p.add_argument('--summarize', action='store_true', help='only summarize the seeds already run; train nothing')
  args, overrides = p.parse_known_args(argv)
  bad = [a for a in overrides if not a.startswith('--config.')]
  if bad:
    p.error(f'unrecognized arguments: {" ".join(bad)} (only --config.KEY=VALUE overrides are passed on)')
  if any(a.startswith('--config.train.seed') for a in overrides):
    p.error('--config.train.seed is set per run by the sweep; use --seeds and --first_seed')
  if args.seeds < 1 or args.per_gpu < 1 or args.first_seed < 0:
    p.error('--seeds and --per_gpu must be at least 1, --first_seed at least 0')
  if args.stack and args.per_gpu > 1:
    p.error('--stack trains one process per GPU: --per_gpu does not apply (run several sweeps to share GPUs)')
  config_file = args.config.split(':', 1)[0]
  if not os.path.isfile(config_file):
    p.error(f'--config={args.config}: no such file {config_file}')
  gpus = (detect_gpus() if args.gpus == 'auto' else [] if args.gpus == 'none'
          else [g.strip() for g in args.gpus.split(',') if g.strip()])
  if gpus and args.gpus != 'auto' and not detect_gpus():
    # Not refused: nvidia-smi may be missing where GPUs are not (some containers). But say where the runs go.
    print(f'[sweep] warning: --gpus {args.gpus}, but nvidia-smi shows no GPU here: each run gets its '
          'CUDA_VISIBLE_DEVICES and trains on the devices JAX finds (--gpus none: one run at a time on the CPU)',
          file=sys.stderr, flush=True)

  seeds = list(range(args.first_seed, args.first_seed + args.seeds))
  if args.stack:
    jobs = build_stacked_jobs(args.config, args.workdir, seeds, overrides, len(gpus))
    gpus = gpus[:len(jobs)]
    where = (f'GPU{"s" if len(gpus) > 1 else ""} {",".join(gpus)}, stacked: one process per GPU' if gpus
             else 'the CPU, stacked in one process')
  else:
    jobs = build_jobs(args.config, args.workdir, seeds, overrides)
    where = f'GPUs {",".join(gpus)} ({args.per_gpu} per GPU)' if gpus else 'the CPU, one at a time'
  if args.summarize and not os.path.isdir(args.workdir):
    p.error(f'--summarize: {args.workdir} is not a folder')
  if not args.summarize:
    print(f'[sweep] {len(seeds)} seeds of {args.config} into {args.workdir} on {where}', flush=True)
    run_jobs(jobs, slots(gpus, args.per_gpu))

  summary = summarize(args.workdir, seeds, args.best_until)
  summary.update(config=args.config, overrides=overrides,
                 failed={k: _last_line(j.log) for j in jobs for k in j.seeds
                         if j.returncode not in (None, stopping.EXIT_FINISHED, stopping.EXIT_STOPPED)},
                 stopped=[k for j in jobs for k in j.seeds if j.returncode == stopping.EXIT_STOPPED],
                 missing=[k for k in seeds if k not in summary['seeds']])
  with open(os.path.join(args.workdir, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=2)
  for k, r in summary['seeds'].items():
    until = f' up to step {args.best_until}' if args.best_until else ''
    print(f'seed {k}: best eval/loss{until} {r["best_eval_loss"]:.4f} (step {r["best_step"]}), '
          f'last {r["last_eval_loss"]:.4f} (step {r["last_step"]})')
  for key in ('best_eval_loss', 'last_eval_loss'):
    if key in summary:
      s = summary[key]
      print(f'{key.replace("_", " ")} over {len(summary["seeds"])} seeds: mean {s["mean"]:.4f} std {s["std"]:.4f} '
            f'min {s["min"]:.4f} max {s["max"]:.4f}')
  print(f'wrote {os.path.join(args.workdir, "summary.json")}')
  if summary['failed']:
    output = {k: j.log for j in jobs for k in j.seeds}
    for k, line in summary['failed'].items():
      # The last line says what (an `error:` line, a traceback's end); the file holds the whole story.
      print(f'seed {k} failed: {line} (its output: {output[k]})', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  main()
