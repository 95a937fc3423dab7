"""SIGTERM and Ctrl-C (SIGINT): a flag the training loop polls, so it saves a checkpoint and stops.

The loop sees the flag between its jitted calls (train.steps_per_call steps each); with `exit_early` a line says at
once that the signal arrived, so a slow call (a large model, a CPU) does not look like a hang.

Before the loop starts there is nothing new to save, and the program may be deep in XLA compilation, where a
Python exception would unwind through C++ (tracebacks, then a segmentation fault). With `exit_early`, a signal
then ends the process at once with one line and EXIT_STOPPED: it leaves the workdir as a SIGKILL would, which the
workdir survives (atomic files, checkpoints committed by rename, the lock released by the OS).
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from absl import logging

EXIT_FINISHED = 0  # train.num_steps reached
EXIT_FAILED = 1  # an error (bad input, NaN, full disk, workdir in use): rerunning as is will not help
EXIT_STOPPED = 75  # stopped by SIGTERM/SIGINT, checkpoint saved (or nothing to save yet): rerun to resume

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignal:
  """Turns SIGTERM/SIGINT into `received` (a signal name) while installed (`with StopSignal(): ...`)."""

  def __init__(self, exit_early: bool = False):
    self.exit_early = exit_early
    self.received = None
    self.stopped_at = None  # the step the loop saved and stopped at, set by the loop
    self._loop_running = False
    self._old = {}
    self._old_wakeup = None
    self._pipe = None
    self._exit_lock = threading.Lock()
    self._acknowledged = False
    self.on_exit = []  # called with an early exit's line before it exits (train.py's: it goes to train.log too)

  def loop_started(self) -> None:
    """From now on a signal only sets the flag: the loop saves a checkpoint and stops at the next step."""
    self._loop_running = True

  def __enter__(self) -> StopSignal:
    if threading.current_thread() is not threading.main_thread():
      return self  # signal handlers can only be set from the main thread (a notebook worker, say): no handler
    for sig in _SIGNALS:
      self._old[sig] = signal.signal(sig, self._handle)
    if self.exit_early:
      # Python runs handlers only between bytecodes of the main thread, i.e. after a compilation returns. The C
      # handler also writes the signal number to this pipe at once; a thread waiting on it exits the process.
      r, w = os.pipe()
      os.set_blocking(w, False)
      self._pipe = (r, w)
      self._old_wakeup = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
      threading.Thread(target=self._watch, args=(r,), daemon=True, name='selattn-stop').start()
    return self

  def __exit__(self, *exc) -> None:
    for sig, old in self._old.items():
      signal.signal(sig, old)
    self._old.clear()
    if self._pipe is not None:
      signal.set_wakeup_fd(self._old_wakeup if self._old_wakeup is not None else -1)
      os.close(self._pipe[1])  # the watcher's read returns b'' and it ends
      self._pipe = None

  def _watch(self, fd: int) -> None:
    try:
      while True:
        data = os.read(fd, 1)
        if not data:
          return
        if data[0] in [int(s) for s in _SIGNALS]:
          name = signal.Signals(data[0]).name
          self._maybe_exit(name)
          self._acknowledge(name)
    except OSError:
      return
    finally:
      try:
        os.close(fd)
      except OSError:
        pass

  def _acknowledge(self, name: str) -> None:
    """In the loop, one line at once (from the watcher thread): the main thread sees the flag only when the jitted
    call in flight returns, which on a slow device can take minutes. Once per run."""
    if not self._loop_running:
      return
    with self._exit_lock:
      if self._acknowledged:
        return
      self._acknowledged = True
    logging.warning('%s received: the steps in flight finish, then the run saves a checkpoint and stops', name)

  def _handle(self, signum, frame) -> None:
    del frame
    self.received = signal.Signals(signum).name
    self._maybe_exit(self.received)

  def _maybe_exit(self, name: str) -> None:
    if not self.exit_early or self._loop_running:
      return
    with self._exit_lock:
      line = (f'stopped: {name} received before training started, nothing new to save; rerun the same command to '
              'resume')
      sys.stderr.write(line + '\n')
      sys.stderr.flush()
      for f in list(self.on_exit):
        try:
          f(line)
        except Exception:  # pylint: disable=broad-except  (the line is on stderr: exit as promised)
          pass
      os._exit(EXIT_STOPPED)  # pylint: disable=protected-access  (no unwinding through XLA, see above)
