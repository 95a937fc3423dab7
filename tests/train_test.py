"""selattn.train in-process on configs/tiny.py: exact resume, TensorBoard output, config.json, learning, no
recompilation, and NaN handling. The command line, signals and error messages are in main_test.py."""

import json
import logging
import math
import os
import re
import shutil

from absl import logging as absl_logging
from flax import nnx
import jax
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from configs import tiny
from run_files import checkpoint_steps, event_files, new_event_files, restore_params, scalars
from selattn import config as config_lib
from selattn import data as data_lib
from selattn import sharding
from selattn import train
from selattn.model import Transformer, count_params

_KEEP_ALL = {event_accumulator.SCALARS: 0, event_accumulator.TENSORS: 0}


def tiny_config(**train_overrides):
  """configs/tiny.py, logging every step and with no text sample unless asked (sampling compiles for ~2 s)."""
  c = tiny.get_config()
  c.train.log_every, c.train.steps_per_call, c.train.sample_length = 1, 1, 0
  for k, v in train_overrides.items():
    setattr(c.train, k, v)
  return c


def accumulators(workdir):
  """One EventAccumulator per event file (each run in a workdir writes its own file)."""
  out = []
  for f in event_files(workdir):
    acc = event_accumulator.EventAccumulator(f, size_guidance=_KEEP_ALL)
    acc.Reload()
    out.append(acc)
  return out


# ----------------------------------------------------------------------------------------------------------------
# Resume: the losses after a restart are bit-identical to an uninterrupted run's.

@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """An uninterrupted 40-step run with a checkpoint every 10 steps: (workdir, per-step losses)."""
  # A run extended from 20 to 40 steps matches a 40-step run only if num_steps does not shape the schedule.
  assert tiny.get_config().train.lr_schedule == 'constant'
  workdir = str(tmp_path_factory.mktemp('reference'))
  train.train(tiny_config(num_steps=40, checkpoint_every=10, keep_checkpoints=10), workdir)
  assert checkpoint_steps(workdir) == [10, 20, 30, 40]
  losses = scalars(workdir)
  assert sorted(losses) == list(range(1, 41))
  return workdir, losses


def test_resume_after_the_last_step_is_bit_identical(tmp_path, reference):
  _, reference_losses = reference
  workdir = str(tmp_path)
  train.train(tiny_config(num_steps=20), workdir)
  assert checkpoint_steps(workdir) == [20]
  first = event_files(workdir)
  train.train(tiny_config(num_steps=40), workdir)
  resumed = scalars(workdir, files=new_event_files(workdir, first))
  assert sorted(resumed) == list(range(21, 41))  # the second run started at step 21: it did resume
  assert len(set(resumed.values())) > 1  # the losses are real per-step values, not a constant
  assert resumed == {s: reference_losses[s] for s in range(21, 41)}
  assert scalars(workdir, files=first) == {s: reference_losses[s] for s in range(1, 21)}


def test_resume_from_a_mid_run_checkpoint_is_bit_identical(tmp_path, reference):
  # A checkpoint taken in the middle of a run (not at its last step), as a preempted or crashed run resumes
  # from: the data iterator must resume at the next step's batch.
  reference_dir, reference_losses = reference
  workdir = str(tmp_path / 'run')
  shutil.copytree(reference_dir, workdir)
  for step in (20, 30, 40):
    shutil.rmtree(os.path.join(workdir, 'checkpoints', str(step)))
  first = event_files(workdir)
  train.train(tiny_config(num_steps=40, checkpoint_every=10, keep_checkpoints=10), workdir)
  resumed = scalars(workdir, files=new_event_files(workdir, first))
  assert sorted(resumed) == list(range(11, 41))
  mismatched = [s for s in resumed if resumed[s] != reference_losses[s]]
  assert not mismatched, f'resumed from step 10, the losses differ from step {mismatched[0]} on'


def test_flat_optimizer_run_resumes_bit_identically(tmp_path):
  # The flat optimizer's state is one vector per AdamW moment: it must checkpoint and restore like the tree.
  cfg = lambda n: tiny_config(num_steps=n, checkpoint_every=10, flat_optimizer=True, steps_per_call=2, log_every=2)
  straight, split = str(tmp_path / 'straight'), str(tmp_path / 'split')
  train.train(cfg(20), straight)
  train.train(cfg(10), split)
  first = event_files(split)
  train.train(cfg(20), split)
  want, got = scalars(straight), scalars(split, files=new_event_files(split, first))
  assert sorted(got) == list(range(12, 21, 2))
  assert all(got[s] == want[s] for s in got), (got, want)


# ----------------------------------------------------------------------------------------------------------------
# One real tiny run (200 steps, evals at 100 and 200 with text samples): TensorBoard, config.json, learning.

@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('tiny'))
  config = tiny.get_config()  # unchanged: 200 steps, log every 20, eval every 100 with a 40-char sample
  result = train.train(config, workdir)
  return workdir, config, result


def test_tensorboard_has_every_tag(tiny_run):
  workdir, config, result = tiny_run
  accs = accumulators(workdir)
  assert len(accs) == 1
  tags = accs[0].Tags()
  want = {'train/loss', 'train/learning_rate', 'train/grad_norm', 'train/tokens_per_second', 'eval/loss',
          'eval/accuracy', 'eval/bpc'}
  assert want <= set(tags['scalars'])
  steps = {tag: sorted(scalars(workdir, tag)) for tag in want}
  assert steps['train/loss'] == list(range(20, 201, 20))
  assert steps['eval/loss'] == [100, 200]
  assert all(steps[t] == steps['train/loss'] for t in want if t.startswith('train/'))
  assert all(steps[t] == steps['eval/loss'] for t in want if t.startswith('eval/'))
  lr = scalars(workdir, 'train/learning_rate')
  assert all(v == pytest.approx(config.train.learning_rate) for v in lr.values())
  assert all(v > 0 for v in scalars(workdir, 'train/tokens_per_second').values())
  loss, bpc = scalars(workdir, 'eval/loss'), scalars(workdir, 'eval/bpc')
  assert bpc[200] == pytest.approx(loss[200] / math.log(2), rel=1e-5)
  assert loss[200] == pytest.approx(result['eval/loss'], rel=1e-6)
  assert 0 < scalars(workdir, 'eval/accuracy')[200] < 1

  text_tags = [t for t in tags['tensors'] if 'sample' in t]
  assert text_tags, tags
  samples = accs[0].Tensors(text_tags[0])
  assert [e.step for e in samples] == [100, 200]
  text = '\n'.join(line[4:] for line in samples[-1].tensor_proto.string_val[0].decode('utf-8').split('\n'))
  # The default prompt: the corpus's first line (the embedded corpus opens with a play's title).
  assert config.train.sample_prompt == '' and text.startswith("ALL'S WELL THAT ENDS WELL")
  assert len(text) == len("ALL'S WELL THAT ENDS WELL") + config.train.sample_length


def test_config_json_and_vocab(tiny_run):
  workdir, config, _ = tiny_run
  vocab = data_lib.Vocab.load(os.path.join(workdir, 'vocab.json'))
  assert vocab == data_lib.Vocab.from_text(data_lib.load_text(''))
  with open(os.path.join(workdir, 'config.json')) as f:
    saved = json.load(f)
  cfg = config_lib.from_config(config, vocab.size)
  assert saved['config'] == json.loads(json.dumps(cfg.to_dict()))  # resolved: vocab_size filled in
  assert saved['config']['model']['vocab_size'] == saved['vocab_size'] == vocab.size
  # A freshly built model (abstract: its parameters' shapes are all count_params needs; tracing it needs a mesh).
  with jax.set_mesh(sharding.make_mesh(cfg.mesh)):
    model = nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0)))
  assert saved['num_params'] == count_params(model)
  assert saved['num_params'] > 10_000


def test_tiny_learns(tiny_run):
  workdir, _, result = tiny_run
  corpus = data_lib.load_corpus('', 0.2)
  p = np.bincount(corpus.train, minlength=corpus.vocab.size) / len(corpus.train)
  p = p[p > 0]
  unigram_entropy = float(-(p * np.log(p)).sum())  # nats: the best loss without context
  assert result['eval/loss'] < unigram_entropy - 0.5, (result, unigram_entropy)
  train_loss = scalars(workdir)
  assert train_loss[200] < train_loss[20] - 0.5


# ----------------------------------------------------------------------------------------------------------------
# No recompilation across steps.

class _Recorder(logging.Handler):
  """Backend compilations and absl log lines, in the order they happen."""

  def __init__(self):
    super().__init__(logging.INFO)
    self.events = []

  def emit(self, record):
    self.events.append(('log', record.getMessage()))

  def on_duration(self, event, duration, **kwargs):
    del duration
    if event == '/jax/core/compile/backend_compile_duration':
      self.events.append(('compile', kwargs.get('fun_name', '?')))


@pytest.mark.usefixtures('no_compilation_cache')  # a program from conftest's cache would not show as a compile
def test_the_loop_never_recompiles(tmp_path, monkeypatch):
  traces = []
  make_train_step = train.make_train_step

  def make_named_train_step(*args, **kwargs):
    step = make_train_step(*args, **kwargs)

    def train_step_under_test(state, batches):
      traces.append(1)
      return step(state, batches)
    return train_step_under_test

  monkeypatch.setattr(train, 'make_train_step', make_named_train_step)
  rec = _Recorder()
  absl_logger = logging.getLogger('absl')
  old_level, old_verbosity = absl_logger.level, absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.INFO)
  absl_logger.addHandler(rec)
  jax.monitoring.register_event_duration_secs_listener(rec.on_duration)
  try:
    # Three evals with samples: the eval step and the sampler must not recompile either.
    train.train(tiny_config(num_steps=30, eval_every=10, sample_length=8), str(tmp_path))
  finally:
    jax.monitoring.unregister_event_duration_listener(rec.on_duration)
    absl_logger.removeHandler(rec)
    absl_logging.set_verbosity(old_verbosity)
    absl_logger.setLevel(old_level)

  compiles = [name for kind, name in rec.events if kind == 'compile']
  assert len(traces) == 1
  assert sum('train_step_under_test' in name for name in compiles) == 1, compiles
  logs = [i for i, (kind, msg) in enumerate(rec.events) if kind == 'log']
  messages = {i: rec.events[i][1] for i in logs}

  def index(pattern):
    found = [i for i in logs if re.match(pattern, messages[i])]
    assert found, (pattern, list(messages.values())[:20])
    return found[0]

  # Everything compiles before step 2 or during the first eval and sample; nothing after.
  after_first_eval = index(r'sample at step 10\b')
  between = [rec.events[i][1] for i in range(index(r'step 2/30\b'), index(r'step 10/30\b'))
             if rec.events[i][0] == 'compile']
  # (Up to the last sample: the final checkpoint is the first, and Orbax may compile for it.)
  late = [name for kind, name in rec.events[after_first_eval:index(r'sample at step 30\b')] if kind == 'compile']
  assert not between and not late, (between, late)


# ----------------------------------------------------------------------------------------------------------------
# NaN: the run stops with a message naming the step and the last good checkpoint, and no checkpoint holds a
# non-finite state. (The command-line view of this is in main_test.py.)

def test_nan_in_a_fresh_run_says_there_is_no_checkpoint(tmp_path):
  # lr 1e30: step 1's update makes the params ~1e30 (finite), and step 2's loss is NaN.
  with pytest.raises(train.TrainingError) as e:
    train.train(tiny_config(num_steps=40, learning_rate=1e30), str(tmp_path))
  msg = str(e.value)
  assert re.search(r'\bnan\b', msg) and re.search(r'(at|after) step 2\b', msg), msg
  assert checkpoint_steps(str(tmp_path)) == []
  assert 'None' not in msg, f'the message should say that no checkpoint was saved: {msg}'


@pytest.mark.filterwarnings('ignore:overflow encountered in cast:RuntimeWarning')  # 1e39 -> float32: the point
def test_a_checkpoint_never_holds_a_non_finite_state(tmp_path):
  # lr 1e39 is inf in float32: step 1's loss and gradients are finite, but its update makes the params
  # non-finite. With a checkpoint every step, step 1's state must not be saved as "the last good checkpoint".
  workdir = str(tmp_path)
  with pytest.raises(train.TrainingError) as e:
    train.train(tiny_config(num_steps=40, learning_rate=1e39, checkpoint_every=1), workdir)
  assert re.search(r'step \d', str(e.value)), str(e.value)
  for step, params in restore_params(workdir, checkpoint_steps(workdir)).items():
    assert all(np.isfinite(p).all() for p in params), f'checkpoint {step} holds non-finite params: {e.value}'


# ----------------------------------------------------------------------------------------------------------------
# train.flat_optimizer: one AdamW update over the concatenated parameters is the same optimizer.

def _copy_batch():
  t = np.random.default_rng(1).integers(0, 83, (16, 32)).astype(np.int32)
  return {'inputs': t, 'targets': t}


def _steps_with(flat: bool, grad_clip: float, unroll: bool = False):
  c = tiny_config(flat_optimizer=flat, grad_clip=grad_clip, steps_per_call=3, log_every=3, eval_every=0,
                  checkpoint_every=3, weight_decay=0.1, unroll_steps=unroll)
  cfg = config_lib.from_config(c, 83)
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  graphdef, state = train.create_state(cfg, mesh)
  return cfg, mesh, graphdef, state, train.build_steps(cfg, mesh, graphdef, state)


@pytest.mark.parametrize('grad_clip,unroll', [(0.0, False), (0.5, True)])
def test_flat_optimizer_trains_exactly_like_the_per_array_update(grad_clip, unroll):
  """Also: the unrolled K-step call is the same computation as the scanned one."""
  runs = {}
  for flat in (False, True):
    cfg, mesh, graphdef, state, steps = _steps_with(flat, grad_clip, unroll=flat and unroll)
    if flat and unroll:
      with jax.set_mesh(mesh):
        hlo = steps.train.lower(state, steps.train_batches([_copy_batch()] * 3)).as_text()
      assert 'stablehlo.while' not in hlo  # (the scanned step has one: checked below)
    elif unroll:
      with jax.set_mesh(mesh):
        assert 'stablehlo.while' in steps.train.lower(state, steps.train_batches([_copy_batch()] * 3)).as_text()
    model, opt = nnx.merge(graphdef, state)
    opt_leaves, num_params = jax.tree.leaves(nnx.state(opt.opt_state)), count_params(model)
    rng = np.random.default_rng(0)
    losses, grad_norms = [], []
    with jax.set_mesh(mesh):
      for _ in range(4):  # fresh random batches, the same for both runs
        tokens = [rng.integers(0, 83, (16, 32)).astype(np.int32) for _ in range(3)]
        host = [{'inputs': t, 'targets': t} for t in tokens]  # copy the input: learnable in a few steps
        state, metrics = steps.train(state, steps.train_batches(host))
        losses.append(float(metrics['loss']))
        grad_norms.append(float(metrics['grad_norm']))
    params = [np.asarray(x) for x in jax.tree.leaves(nnx.state(nnx.merge(graphdef, state)[0], nnx.Param))]
    runs[flat] = (losses, params, [x.shape for x in opt_leaves], num_params, grad_norms)
  (l0, p0, shapes0, n, g0), (l1, p1, shapes1, _, g1) = runs[False], runs[True]
  np.testing.assert_allclose(g1, g0, rtol=1e-5)  # the flat vector's norm is the per-array norm
  assert (n,) in shapes1 and (n,) not in shapes0  # the flat state really is one vector of all parameters
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  assert l0[-1] < l0[0] - 0.5  # it trained (lr 3e-3)
  for a, b in zip(p0, p1):
    # Float rounding only: one step moves ~3e-3. Adam divides by sqrt(v): where a gradient is near zero, rounding
    # differences grow to a few percent of a step (5.6e-5 seen, unoptimised XLA).
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# train.xla_options: XLA options for this run's jitted steps.

def test_xla_options_parse():
  parse = config_lib.xla_compile_options
  assert parse('') == {}
  got = parse('xla_a=true, xla_b=FALSE,xla_c=3,xla_d=0.5,xla_e=fast,')
  assert got == {'xla_a': True, 'xla_b': False, 'xla_c': 3, 'xla_d': 0.5, 'xla_e': 'fast'}
  # 3 == 3.0 in Python, but XLA refuses 3.0 for an int option ("'4' is not a valid int32 value"): the types too.
  assert [type(got[k]) for k in sorted(got)] == [bool, bool, int, float, str]
  assert parse('xla_dump_hlo_pass_re=a=b') == {'xla_dump_hlo_pass_re': 'a=b'}  # split at the first '=' only


@pytest.mark.parametrize('bad', ['gpu_enable_triton_gemm=false', 'xla_gpu_enable_triton_gemm', 'xla_a='])
def test_xla_options_of_another_form_are_refused_in_one_line(bad):
  c = tiny_config()
  c.train.xla_options = bad
  with pytest.raises(config_lib.ConfigError, match='train.xla_options: .* is not xla_<name>=<value>') as e:
    config_lib.from_config(c, 65)
  assert '\n' not in str(e.value)


@pytest.mark.parametrize('stacked', [False, True])
def test_an_xla_option_xla_does_not_know_stops_before_the_workdir_is_touched(tmp_path, stacked):
  from selattn import stack  # pylint: disable=g-import-not-at-top
  c = tiny_config(num_steps=2, xla_options='xla_no_such_option=1')
  with pytest.raises(train.TrainingError, match=r"train.xla_options='xla_no_such_option=1': .*xla_no_such_option"):
    if stacked:
      stack.train(c, str(tmp_path), [0, 1])
    else:
      train.train(c, str(tmp_path))
  assert os.listdir(tmp_path) == []


def test_xla_options_reach_the_jitted_steps(tmp_path, monkeypatch):
  seen = []
  jit = jax.jit

  def spy(fn, **kwargs):
    seen.append(kwargs.get('compiler_options'))
    return jit(fn, **kwargs)

  monkeypatch.setattr(jax, 'jit', spy)
  train._check_xla_options.cache_clear()  # pylint: disable=protected-access  (the name check is once per text)
  # A GPU option: accepted by XLA:CPU, where it changes nothing.
  train.train(tiny_config(num_steps=2, xla_options='xla_gpu_enable_triton_gemm=false'), str(tmp_path))
  # The name check, then the train and eval steps.
  assert seen.count({'xla_gpu_enable_triton_gemm': False}) >= 3, seen


def test_xla_options_reach_the_stacked_train_and_eval_steps(tmp_path, monkeypatch):
  """selattn/stack.py jits its own vmapped steps: the options reach both (the train step donates its state, the
  eval step takes (state, batch) shardings and donates nothing)."""
  from selattn import stack  # pylint: disable=g-import-not-at-top
  options = {'xla_gpu_enable_triton_gemm': False}
  seen = []
  jit = jax.jit

  def spy(fn, **kwargs):
    seen.append(kwargs)
    return jit(fn, **kwargs)

  monkeypatch.setattr(jax, 'jit', spy)
  c = tiny_config(num_steps=1, eval_batches=1, xla_options='xla_gpu_enable_triton_gemm=false')
  c.model.num_layers, c.data.seq_len, c.train.batch_size = 1, 16, 4
  stack.train(c, str(tmp_path), [0])
  steps = [k for k in seen if 'in_shardings' in k]
  trains = [k for k in steps if 'donate_argnums' in k]
  evals = [k for k in steps if 'donate_argnums' not in k]
  assert len(trains) == len(evals) == 1, seen
  assert trains[0]['compiler_options'] == evals[0]['compiler_options'] == options


# ----------------------------------------------------------------------------------------------------------------
# A log line's timing (train.Progress), on a clock set by hand.

def test_progress_line_of_a_resumed_run(monkeypatch):
  clock = [100.0]
  monkeypatch.setattr(train.time, 'perf_counter', lambda: clock[0])
  t = config_lib.TrainConfig(num_steps=3700, learning_rate=0.1, warmup_steps=100, lr_schedule='constant')
  progress = train.Progress(t, step=40, tokens_per_step=10)  # resumed at step 40
  clock[0] += 20.0  # 20 steps in 20 s: 1 s a step since the resume
  progress.steps += 20
  dt, lr, rate, eta = progress.line(60)
  assert dt == 20.0 and rate == 20 * 10 / 20.0
  assert lr == pytest.approx(0.1 * 59 / 100)  # step 60's update is update 59 of the warmup
  assert eta == '1h00m'  # 3640 steps left at 1 s each (not 1/3 s: the 40 steps before the resume took no time here)
  progress.restart()
  clock[0] += 60.0
  progress.steps += 940
  dt, _, rate, eta = progress.line(1000)
  assert (dt, rate) == (60.0, 940 * 10 / 60.0)  # the window since the last log only
  assert eta == '3m45s'  # 2700 steps left at 80 s / 960 steps
