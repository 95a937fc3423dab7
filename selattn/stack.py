"""Several seeds of one config trained in one process, stacked: what `python -m selattn.sweep --stack` runs.

`python -m selattn.main --config C --workdir W --stack_seeds=0,1,2` trains seed k in W/seed<k> as `python -m
selattn.main --config C --workdir W/seed<k> --config.train.seed=k` would (train.seed is set per seed): the same
parameter init, data order, dropout keys, eval windows, checkpoints, event files, config.json, vocab.json and
train.log lines, the numbers equal up to float summation order; but in one jitted step over the seeds' states
stacked on a leading axis (jax.vmap of train.py's step). A tiny model does little arithmetic per kernel (the
original config: 1.2% MFU): stacked seeds share each step's kernels. Each seed's workdir is an ordinary run: the
unstacked command resumes it, `selattn.sample` reads it. Rerunning the stacked command resumes every seed; they
must stand at the same step (else one line says which do not, and how to bring them level: the sweep without
--stack up to the leaders' step). One device per process (mesh sizes 1; `selattn.sweep --stack` starts one per GPU,
each with its share of the seeds). The process's own log (every seed's lines) goes to stdout; each seed's lines
also go to W/seed<k>/train.log. Speed scalars: train/step_time_ms is the stacked step's time, train/mfu the whole
process's; train/tokens_per_second counts each seed's own tokens.
"""

from __future__ import annotations

import dataclasses
import logging as py_logging
import os
import time

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from selattn import checkpoint as ckpt_lib
from selattn import config as config_lib
from selattn import data as data_lib
from selattn import generate as generate_lib
from selattn import metrics as metrics_lib
from selattn import perf
from selattn import runlog
from selattn import sharding
from selattn import stopping
from selattn import store as store_lib
from selattn import train as train_lib
from selattn import workdir as workdir_lib
from selattn.model import count_params

TrainingError = train_lib.TrainingError


def parse_seeds(text: str) -> list[int]:
  """'0,1,2' -> [0, 1, 2]; ConfigError (one line) for anything else."""
  try:
    seeds = [int(s) for s in text.split(',') if s.strip()]
  except ValueError:
    seeds = []
  if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
    raise config_lib.ConfigError(f'--stack_seeds={text!r} must be distinct non-negative seeds, e.g. 0,1,2')
  return seeds


def seed_dir(workdir: str, seed: int) -> str:
  return os.path.join(workdir, f'seed{seed}')


def checkpoint_steps(workdir: str) -> list[int]:
  """The committed checkpoint steps in a run's workdir (not the damaged or half-written ones)."""
  d = os.path.join(workdir, 'checkpoints')
  try:
    return sorted(int(n) for n in os.listdir(d) if n.isdigit())
  except OSError:
    return []


def _describe_steps(steps: dict[int, int | None]) -> str:
  return ', '.join(f'seed {k} at step {s or 0}' for k, s in steps.items())


def _check_same_step(steps: dict[int, int | None]) -> None:
  """Stacked seeds train from one step; a seed left behind (a kill between two seeds' saves, a seed added to a
  sweep) is refused with the commands that bring it level."""
  if len(set(s or 0 for s in steps.values())) > 1:
    top = max(s or 0 for s in steps.values())
    raise TrainingError(f'the stacked seeds stand at different steps ({_describe_steps(steps)}): bring them to step '
                        f'{top} by rerunning the sweep without --stack and with --config.train.num_steps={top}, then '
                        'rerun it with --stack')


def _check_mesh(mesh_cfg) -> None:
  bad = [f'mesh.{a}={v}' for a, v in dataclasses.asdict(mesh_cfg).items() if v not in (1, -1)]
  if bad:
    raise config_lib.ConfigError(f'stacked seeds train on one device: {", ".join(bad)} is not supported; drop '
                                 'it or train without --stack')


class _SeedLog:
  """A seed's lines, in absl's format, appended to its WORKDIR/seed<k>/train.log (as an unstacked run's log)."""

  def __init__(self, path: str, seed: int):
    self.logger = py_logging.getLogger(f'selattn.stack.seed{seed}.{id(self)}')
    self.logger.propagate = False
    self.logger.setLevel(py_logging.INFO)
    self.handler = runlog.FileHandler(path)  # as an unstacked run's train.log: appended, flushed per line
    self.logger.addHandler(self.handler)

  def info(self, msg, *args):
    self.logger.info(msg, *args, stacklevel=2)  # the caller's file and line in the prefix, as absl writes them

  def warning(self, msg, *args):
    self.logger.warning(msg, *args, stacklevel=2)

  def error(self, e: Exception) -> None:
    """The exception ending the run, as an unstacked run's train.log ends (runlog.RunLog.error)."""
    self.handler.handle(runlog.error_record(e))

  def close(self):
    self.logger.removeHandler(self.handler)
    self.handler.close()


@dataclasses.dataclass
class _Seed:
  """One seed's run: its config, workdir and the per-run objects an unstacked run has once."""
  seed: int
  workdir: str
  cfg: config_lib.Config
  saved: dict | None
  lock: workdir_lib.Lock | None = None
  log: _SeedLog | None = None
  data_iter: object = None
  ckpt: ckpt_lib.Checkpointer | None = None
  writer: metrics_lib.MetricWriter | None = None
  step: int = 0
  unlogged: list = dataclasses.field(default_factory=list)
  grad_norm: float = float('nan')


def train(config, workdir: str, seeds: list[int], *, allow_data_change: bool = False,
          stop: stopping.StopSignal | None = None) -> dict[int, dict[str, float]]:
  """Trains (or resumes) seed k of `config` in WORKDIR/seed<k> for every k, stacked; returns each seed's last
  eval metrics. `stop` as in train.train."""
  if jax.process_count() > 1:
    raise TrainingError('stacked seeds train in one process; run them without --stack on several processes')
  workdir = os.path.abspath(workdir)
  workdir_lib.check_is_dir(workdir)
  runs, vocab, vocab_from = [], None, None
  for k in seeds:
    wd = seed_dir(workdir, k)
    workdir_lib.check_is_dir(wd)
    v = train_lib.read_vocab(wd)
    train_lib.check_same_vocab(wd, v, config.data.vocab)
    if v is not None:
      if vocab is not None and v.to_json() != vocab.to_json():
        raise TrainingError(f'{wd}/vocab.json differs from {vocab_from}/vocab.json: these seeds were trained on '
                            'other symbols; train them without --stack')
      vocab, vocab_from = v, wd
    runs.append(_Seed(k, wd, None, train_lib.read_saved_config(wd)))
    if not allow_data_change:
      train_lib.check_same_data(wd, runs[-1].saved, config.data)
  corpus = store_lib.open_config(config.data, vocab)
  for r in runs:
    c = config.copy_and_resolve_references()
    c.train.seed = r.seed
    r.cfg = config_lib.from_config(c, corpus.vocab.size)
  cfg = runs[0].cfg  # every key but train.seed is the same for all seeds
  data_lib.check_seq_len(corpus, cfg.data.seq_len, val_fraction=cfg.data.val_fraction, path=cfg.data.path,
                         split=cfg.data.split)
  for r in runs:
    train_lib.check_compatible(r.workdir, r.cfg)
    if not allow_data_change:
      train_lib.check_same_text(r.workdir, r.saved, corpus.sha256)
  _check_mesh(cfg.mesh)
  mesh = sharding.make_mesh(cfg.mesh, devices=jax.devices()[:1])
  sharding.check_fits(cfg, mesh)
  train_lib.compiler_options(cfg)
  # Before anything is written: seeds at different steps are refused as they are on disk.
  _check_same_step({r.seed: (checkpoint_steps(r.workdir) or [None])[-1] for r in runs})

  own_stop = stop is None
  if own_stop:
    stop = stopping.StopSignal()
    stop.__enter__()
  try:
    for r in runs:
      r.lock = train_lib._take_lock(r.workdir, True)  # pylint: disable=protected-access
    # As an unstacked run's train.log (train.train): from the lock on, with a signal's line and the ending error.
    for r in runs:
      r.log = _SeedLog(os.path.join(r.workdir, 'train.log'), r.seed)
      stop.on_exit.append(r.log.warning)
    return _train(runs, cfg, corpus, mesh, workdir, stop)
  except Exception as e:  # pylint: disable=broad-except  (recorded, then raised on)
    for r in runs:
      if r.log is not None:
        r.log.error(e)
    raise
  finally:
    train_lib.close_run(stop, own_stop, [r.log for r in runs if r.log is not None],
                        [r.lock for r in runs if r.lock is not None])


def _train(runs: list[_Seed], cfg, corpus, mesh, workdir: str, stop) -> dict[int, dict[str, float]]:
  t = cfg.train
  seeds = [r.seed for r in runs]
  try:
    states, graphdef = [], None
    for r in runs:
      g, state = train_lib.create_state(r.cfg, mesh)
      if graphdef is None:
        graphdef, num_params = g, count_params(nnx.merge(g, state)[0])
      header = train_lib._header(r.cfg, num_params, mesh, r.workdir)  # pylint: disable=protected-access
      r.log.info('run: %s', header)
      r.log.info('stacked with seeds %s in one process (selattn.sweep --stack): its log is the sweep\'s '
                 'stack log', ','.join(map(str, seeds)))
      r.ckpt = ckpt_lib.Checkpointer(os.path.join(r.workdir, 'checkpoints'), keep=t.keep_checkpoints)
      r.step, state, r.unlogged, r.data_iter = train_lib.resume(r.ckpt, state, corpus, r.cfg, r.log)
      states.append(state)
    first = train_lib._header(cfg, num_params, mesh, runs[0].workdir)  # pylint: disable=protected-access
    logging.info('run: %d seeds %s stacked | seed %d\'s run: %s', len(runs), ','.join(map(str, seeds)),
                 runs[0].seed, first)
    # A damaged checkpoint set aside may have left a seed behind the others.
    _check_same_step({r.seed: r.step for r in runs})
    step = runs[0].step
    structure = jax.tree_util.tree_structure(states[0])
    if any(jax.tree_util.tree_structure(s) != structure for s in states):
      raise TrainingError('the seeds\' states differ in structure; train them without --stack')
    single_sh = jax.tree.map(lambda x: x.sharding, states[0])
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = jax.device_put(jax.tree.map(lambda *xs: jnp.stack(xs), *states), rep)
    del states
    perm = train_lib.positions_for(mesh, cfg.data.seq_len)
    keys = jnp.stack([train_lib.dropout_base_key(k) for k in seeds])
    with jax.set_mesh(mesh):
      options = train_lib.compiler_options(cfg)
      train_step = jax.jit(jax.vmap(train_lib.make_keyed_train_step(graphdef, cfg, perm)),
                           in_shardings=(rep, rep, rep), out_shardings=(rep, None), donate_argnums=0,
                           compiler_options=options)
      eval_step = jax.jit(jax.vmap(train_lib.make_eval_step(graphdef, perm), in_axes=(0, None)),
                          in_shardings=(rep, rep), compiler_options=options)
      # Seed i's state as an unstacked run holds it (its shardings): what is saved, sampled from, fingerprinted.
      take = jax.jit(lambda s, i: jax.tree.map(lambda x: x[i], s), out_shardings=single_sh)
    evals = data_lib.eval_batches(corpus.val, seq_len=cfg.data.seq_len, global_batch_size=t.batch_size,
                                  num_batches=t.eval_batches)
    for r in runs:
      r.writer = metrics_lib.MetricWriter(r.workdir)
    prompt = t.sample_prompt or generate_lib.corpus_prompt(
        corpus.vocab.decode(np.asarray(corpus.train[:generate_lib.PROMPT_SCAN])))
    compiled_eval = []

    def evaluate(state, step, write=True):
      with jax.set_mesh(mesh):
        if not compiled_eval:
          compiled_eval.append(eval_step.lower(state, jax.device_put(evals[0], rep)).compile())
          train_lib.check_memory(compiled_eval[0], cfg, 'an eval step')
        totals = None
        for b in evals:
          sums = compiled_eval[0](state, jax.device_put(b, rep))
          totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
        totals = jax.device_get(totals)
      out = {}
      for i, r in enumerate(runs):
        res = train_lib.eval_scalars({k: v[i] for k, v in totals.items()}, corpus.vocab, step, r.log)
        out[r.seed] = res
        if write:
          r.writer.write_scalars(step, res)
          if t.sample_length:
            text = train_lib.sample(nnx.merge(graphdef, take(state, i))[0], corpus, prompt, cfg, step, mesh)
            r.writer.write_texts(step, {'sample': text})
            r.log.info('sample at step %d:\n%s', step, text)
      logging.info('eval at step %d: loss %s', step, ' | '.join(f'seed {k} {v["eval/loss"]:.4f}'
                                                               for k, v in out.items()))
      return out

    if step >= t.num_steps:
      for r in runs:
        r.log.info('step %d already reached train.num_steps=%d: nothing to train', step, t.num_steps)
      logging.info('step %d already reached train.num_steps=%d: nothing to train', step, t.num_steps)
      return evaluate(state, step, write=False)

    def record_run():
      for r in runs:
        workdir_lib.write_text(os.path.join(r.workdir, 'vocab.json'), corpus.vocab.to_json() + '\n')
        workdir_lib.write_text(os.path.join(r.workdir, 'config.json'), train_lib.run_record(r.cfg, num_params,
                                                                                            corpus))
        r.ckpt.check_space()

    speed = perf.Speed(cfg, num_params, workdir, step + t.steps_per_call, t.profile_steps, mesh.size)
    return _loop(runs, cfg, mesh, train_step, take, state, keys, rep, step, evaluate, stop, record_run, speed)
  except (metrics_lib.MetricsError, workdir_lib.WorkdirError) as e:
    kept = '; '.join(r.ckpt.describe_intact() for r in runs if r.ckpt is not None)
    raise TrainingError(f'{e}: stopping; {kept or "no checkpoint was touched"}') from None
  except jax.errors.JaxRuntimeError as e:
    if train_lib._resource_exhausted(e):  # pylint: disable=protected-access
      raise TrainingError(f'out of device memory ({len(runs)} stacked seeds, data.seq_len={cfg.data.seq_len}, '
                          f'train.batch_size={t.batch_size}): {ckpt_lib.one_line(e)}') from None
    raise
  finally:
    errors = []
    for r in runs:
      try:
        if r.ckpt is not None:
          r.ckpt.close()
      except ckpt_lib.CheckpointError as e:
        errors.append(e)
      finally:
        if r.writer is not None:
          r.writer.close()
    if errors:
      raise errors[0]


def _loop(runs: list[_Seed], cfg, mesh, train_step, take, state, keys, rep, step: int, evaluate, stop,
          record_run, speed: perf.Speed) -> dict[int, dict[str, float]]:
  """train.py's loop over stacked seeds: the same steps, logs, evals and checkpoints for each seed."""
  t = cfg.train
  result = {}
  tokens_per_step = t.batch_size * cfg.data.seq_len

  def next_batches():
    # [S, K, B, T]: seed i's K batches, drawn from its own iterator as its unstacked run draws them.
    per_seed = [[next(r.data_iter) for _ in range(t.steps_per_call)] for r in runs]
    return jax.device_put({k: np.stack([np.stack([b[k] for b in bs]) for bs in per_seed])
                           for k in per_seed[0][0]}, rep)

  batches = next_batches()
  t0 = time.perf_counter()
  logging.info('compiling the stacked train step (%d seeds)', len(runs))
  try:
    with jax.set_mesh(mesh):
      compiled = train_step.lower(state, batches, keys).compile()
  except jax.errors.JaxRuntimeError as e:
    if train_lib._resource_exhausted(e):  # pylint: disable=protected-access
      raise TrainingError(f'the stacked train step ({len(runs)} seeds) does not fit in device memory: '
                          f'{ckpt_lib.one_line(e)}') from None
    raise
  need = train_lib.memory_needed(compiled)
  logging.info('compiled the train step in %.1fs; device memory: %s', time.perf_counter() - t0,
               'n/a' if need is None else f'{train_lib._fmt_bytes(need)}')  # pylint: disable=protected-access
  train_lib.check_memory(compiled, cfg, f'the stacked train step ({len(runs)} seeds)')
  record_run()
  pending = []
  progress = train_lib.Progress(t, step, tokens_per_step)

  def flush() -> None:
    got = jax.device_get([m for _, m in pending])
    for (s, _), m in zip(pending, got):
      for i, r in enumerate(runs):
        if not (np.isfinite(m['loss'][i]) and np.isfinite(m['grad_norm'][i])):
          raise TrainingError(f'seed {r.seed}: the loss is not finite after step {s} (loss {m["loss"][i]}, grad '
                              f'norm {m["grad_norm"][i]}): stopping; {kept()}')
        r.unlogged.append(m['loss'][i])
        r.grad_norm = float(m['grad_norm'][i])
    pending.clear()

  def kept() -> str:
    out = []
    for r in runs:
      try:
        r.ckpt.wait()
      except ckpt_lib.CheckpointError as e:
        out.append(str(e))
        continue
      out.append(f'seed {r.seed}: no checkpoint saved' if r.ckpt.intact is None else
                 f'seed {r.seed}: the last good checkpoint is step {r.ckpt.intact}')
    return '; '.join(out) + f' (in {os.path.dirname(runs[0].workdir)}/seed<k>/checkpoints)'

  poll = train_lib._StopPoll(stop)  # pylint: disable=protected-access
  stop.loop_started()
  for r in runs:
    r.log.info('training from step %d to %d', step, t.num_steps)
  logging.info('training %d stacked seeds from step %d to %d', len(runs), step, t.num_steps)
  try:
    while step < t.num_steps:
      with speed.profile.step(step), jax.transfer_guard('disallow'):
        state, metrics = compiled(state, batches, keys)
      step += t.steps_per_call
      speed.profile.after(step, state)
      pending.append((step, metrics))
      progress.steps += t.steps_per_call
      last = step >= t.num_steps
      for r in runs:
        r.ckpt.poll()
      stopping_now = poll(step)
      save = step % t.checkpoint_every == 0 or last or stopping_now
      if not (last or save):
        batches = next_batches()
      if step % t.log_every == 0 or last:
        flush()
        dt, lr, rate, eta = progress.line(step)
        scalars = speed.scalars(progress.steps, dt)
        if 'train/mfu' in scalars:
          scalars['train/mfu'] *= len(runs)  # the process's: every seed's FLOPs in the step's time
        losses = []
        for r in runs:
          loss = float(np.mean(r.unlogged))
          r.unlogged.clear()
          losses.append(f'seed {r.seed} {loss:.4f}')
          r.log.info('step %d/%d | loss %.4f | lr %.2e | grad norm %.3f | %s tok/s | %.2f ms/step | ETA %s',
                     step, t.num_steps, loss, lr, r.grad_norm, f'{rate:,.0f}', 1000 * dt / progress.steps, eta)
          r.writer.write_scalars(step, {'train/loss': loss, 'train/learning_rate': lr,
                                        'train/grad_norm': r.grad_norm, 'train/tokens_per_second': rate,
                                        **scalars})
        logging.info('step %d/%d | loss %s | lr %.2e | %s tok/s per seed | %.2f ms/step | ETA %s', step,
                     t.num_steps, ' | '.join(losses), lr, f'{rate:,.0f}', 1000 * dt / progress.steps, eta)
        progress.restart()
      if (t.eval_every and step % t.eval_every == 0) or last:
        result = evaluate(state, step)
        progress.start = time.perf_counter()  # eval time is not training time
      if save:
        flush()
        for i, r in enumerate(runs):
          train_lib.save_checkpoint(r.ckpt, r.writer, step, take(state, i), r.data_iter, cfg.model, r.unlogged,
                                    kept, who=f'seed {r.seed}: ')
        if not last and not stopping_now:
          batches = next_batches()
      if stopping_now:
        for r in runs:
          r.ckpt.wait()
          r.log.warning('%s received: saved a checkpoint at step %d and stopping; rerun the same command to '
                        'resume', stopping_now, step)
        stop.stopped_at = step
        logging.warning('%s received: saved every seed\'s checkpoint at step %d and stopping; rerun the same '
                        'command to resume', stopping_now, step)
        break
    jax.block_until_ready(state)
    if step >= t.num_steps and stop.stopped_at is None:
      for r in runs:
        r.ckpt.wait()  # the lines name checkpoints that are on disk
        r.log.info('%s', train_lib.finished_line(step, result[r.seed]['eval/loss'], progress, r.ckpt.directory,
                                                 r.workdir))
      logging.info('finished at step %d: held-out loss %s | %s | checkpoints in %s', step,
                   ' | '.join(f'seed {k} {v["eval/loss"]:.4f}' for k, v in result.items()),
                   train_lib.call_summary(step, progress), f'{os.path.dirname(runs[0].workdir)}/seed<k>/checkpoints')
  except jax.errors.JaxRuntimeError as e:
    if train_lib._resource_exhausted(e):  # pylint: disable=protected-access
      raise TrainingError(f'out of device memory near step {step}: {ckpt_lib.one_line(e)}; {kept()}') from None
    raise
  except ckpt_lib.CheckpointError as e:
    raise TrainingError(str(e)) from None
  finally:
    speed.profile.close(step)
  return result
