"""Training speed: model FLOPs per token and MFU (as nanoGPT counts them), and a window of steps traced with
jax.profiler. Used by the trainer (TensorBoard scalars, `train.profile_steps`) and by selattn.bench."""

from __future__ import annotations

import collections
import contextlib
import glob
import os
import re

from absl import logging
import jax

# Dense bf16 matmul FLOP/s per device, measured by the project on H100 and H200 (BENCHMARKS.md, Baselines): the
# MFU denominator, whatever the run's dtype, as nanoGPT's MFU is.
REFERENCE_PEAK = 790e12
PEAK_FLOPS = {'NVIDIA H100': REFERENCE_PEAK, 'NVIDIA H200': REFERENCE_PEAK}


def flops_per_token(cfg, num_params: int) -> float:
  """nanoGPT's count of a training step's FLOPs per token: 6 x the parameters that multiply (not the lookups: the
  token embedding unless it is tied to the output head, and learned positions), plus the attention scores and
  weighted sum 6 L T (d_qk + d_v), the causal mask not discounted. d_qk is the factored form's 2D for selective
  attention with RoPE (its augmented queries and keys)."""
  m = cfg.model
  dense = num_params - m.max_len * m.d_model - (0 if m.tie_embeddings else m.vocab_size * m.d_model)
  d_qk = 2 * m.d_model if (m.attention == 'selective' and m.rope) else m.d_model
  return 6 * dense + 6 * m.num_layers * cfg.data.seq_len * (d_qk + m.d_model)


def peak_flops(device_kind: str) -> float | None:
  """The MFU denominator per device of this kind, or None where the project has not measured it."""
  for prefix, peak in PEAK_FLOPS.items():
    if device_kind.startswith(prefix):
      return peak
  return None


class Speed:
  """What the trainer measures besides the losses: step time and MFU of each log window, and the profile window
  (`profile_steps` traced from `first_step` on; 0 = none)."""

  def __init__(self, cfg, num_params: int, logdir: str, first_step: int, profile_steps: int, num_devices: int):
    self.flops_per_step = flops_per_token(cfg, num_params) * cfg.train.batch_size * cfg.data.seq_len
    peak = peak_flops(jax.devices()[0].device_kind)
    # The devices the step runs on (its mesh), not all those the process sees: a stacked run uses one of them.
    self.total_peak = peak * num_devices if peak else None  # MFU only where the peak is known
    self.profile = ProfileWindow(logdir, first_step, profile_steps)

  def scalars(self, steps: int, seconds: float) -> dict[str, float]:
    """TensorBoard scalars of a window of `steps` optimizer steps that took `seconds`."""
    out = {'train/step_time_ms': 1000 * seconds / steps}
    if self.total_peak:
      out['train/mfu'] = self.flops_per_step * steps / seconds / self.total_peak
    return out


class ProfileWindow:
  """Traces `num_steps` training steps with jax.profiler into `logdir` (TensorBoard's profile tab reads
  logdir/plugins/profile/). The window opens at the first call at or after `first_step` and closes, once the
  device has finished them, after the call that completes num_steps (whole calls of train.steps_per_call)."""

  def __init__(self, logdir: str, first_step: int, num_steps: int):
    self.logdir, self.first_step, self.num_steps = logdir, first_step, num_steps
    self._start = None  # the step the trace began at, while tracing
    self._done = num_steps <= 0

  def step(self, step: int):
    """Context for the call that runs from `step`: starts the trace when due; annotated while tracing."""
    if not self._done and self._start is None and step >= self.first_step:
      jax.profiler.start_trace(self.logdir)
      self._start = step
    if self._start is None:
      return contextlib.nullcontext()
    return jax.profiler.StepTraceAnnotation('train', step_num=step)

  def after(self, step: int, state) -> None:
    """Closes the window once the calls up to `step` cover num_steps (waiting for the device to finish them)."""
    if self._start is not None and step - self._start >= self.num_steps:
      jax.block_until_ready(state)
      self._stop(step)

  def close(self, step: int) -> None:
    """Stops a trace still open (the run ended or failed inside the window)."""
    if self._start is not None:
      self._stop(step)

  def _stop(self, step: int) -> None:
    jax.profiler.stop_trace()
    logging.info('profiled steps %d-%d into %s (TensorBoard: the profile tab)', self._start + 1, step,
                 os.path.join(self.logdir, 'plugins', 'profile'))
    self._start, self._done = None, True


def hlo_sources(hlo_text: str) -> dict[str, str]:
  """Each instruction of a compiled module's text (`compiled.as_text()`) by name -> where it came from, from its
  metadata: 'op_name at file:line (function)', the line being the innermost frame jax kept (the user's code). A GPU
  profile names a fusion's kernel after its instruction (with '_' for '.'): this says which line of ours it is."""
  tables: dict[str, dict] = {}
  section = None
  srcs = {}
  for line in hlo_text.splitlines():
    if line in ('FileNames', 'FunctionNames', 'FileLocations', 'StackFrames'):
      section = line
      tables[section] = {}
      continue
    if section and (m := re.match(r'(\d+) (.*)$', line)):
      key, rest = int(m.group(1)), m.group(2)
      if section in ('FileNames', 'FunctionNames'):
        tables[section][key] = rest.strip('"')
      else:
        tables[section][key] = {k: int(v) for k, v in re.findall(r'(\w+)=(\d+)', rest)}
      continue
    section = None
    m = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = .*metadata=\{([^}]*)\}', line)
    if not m:
      continue
    meta = m.group(2)
    op = re.search(r'op_name="([^"]*)"', meta)
    where = ''
    if (f := re.search(r'source_file="([^"]*)" source_line=(\d+)', meta)):
      where = f'{f.group(1)}:{f.group(2)}'
    elif (sf := re.search(r'stack_frame_id=(\d+)', meta)):
      frame = tables.get('StackFrames', {}).get(int(sf.group(1)), {})
      loc = tables.get('FileLocations', {}).get(frame.get('file_location_id', -1), {})
      if loc:
        fname = tables.get('FileNames', {}).get(loc.get('file_name_id'), '?')
        func = tables.get('FunctionNames', {}).get(loc.get('function_name_id'), '?')
        where = f'{fname}:{loc.get("line")} ({func})'
    srcs[m.group(1)] = ' at '.join(x for x in ((op.group(1) if op else ''), where) if x)
  return srcs


def device_op_times(trace_dir: str, steps: int, top: int = 40, hlo_text: str | None = None) -> dict:
  """Device time per optimizer step from a jax.profiler trace in `trace_dir` (its newest .xplane.pb): the total of
  each timeline line of the first device plane (on a GPU: 'XLA Ops', the streams' kernels, ...) and the `top` events
  of each line by time, in ms per step over `steps` traced steps. {} when the trace has no device plane (CPU). With
  the step's compiled HLO text, each event that names one of its instructions says where it came from
  (`hlo_sources`: its 'source')."""
  files = sorted(glob.glob(os.path.join(trace_dir, '**', '*.xplane.pb'), recursive=True), key=os.path.getmtime)
  if not files:
    return {}
  data = jax.profiler.ProfileData.from_file(files[-1])
  planes = [p for p in data.planes if p.name.startswith('/device:')]
  if not planes:
    return {}
  plane = min(planes, key=lambda p: p.name)
  out = {'plane': plane.name, 'steps': steps, 'lines': {}}
  for line in plane.lines:
    times = collections.Counter()
    counts = collections.Counter()
    for ev in line.events:
      times[ev.name] += ev.duration_ns
      counts[ev.name] += 1
    if not times:
      continue
    out['lines'][line.name] = {
        'ms_per_step': sum(times.values()) / 1e6 / steps,
        'top': [{'name': n[:200], 'ms_per_step': t / 1e6 / steps, 'calls_per_step': counts[n] / steps}
                for n, t in times.most_common(top)]}
  if hlo_text:
    srcs = hlo_sources(hlo_text)
    for line in out['lines'].values():
      for ev in line['top']:
        found = srcs.get(ev['name']) or srcs.get(re.sub(r'_(\d+)$', r'.\1', ev['name']))
        if found:
          ev['source'] = found[:300]
  return out
