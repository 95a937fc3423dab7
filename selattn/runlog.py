"""A run's own log: what it logs (absl's lines, INFO and up) appended to a file beside its checkpoints.

`python -m selattn.main` logs to stderr; a terminal that is gone (a remote machine, a batch job whose output is
discarded) would take the run's history with it. So the process holding a workdir's lock also appends the lines
to WORKDIR/train.log, every start of the run after the one before: steps, evals, resumes, signals, and the error
that ended it. Each line is one write(2) on a file opened for appending without following links: a kill loses no
line, and a link in the workdir cannot send the log elsewhere (it is refused). A file that cannot be written (a
full disk, no permission) warns once on stderr and the run goes on without it: stderr still has every line, and
the checkpoints matter more than their log. selattn/stack.py writes each stacked seed's WORKDIR/seed<k>/train.log
through the same handler.
"""

from __future__ import annotations

import errno
import logging as py_logging
import os
import sys

from absl import logging

from selattn import workdir as workdir_lib

NAME = 'train.log'


class FileHandler(py_logging.Handler):
  """Appends each record, in absl's format, to `path` in one write; refuses a symbolic link (WorkdirError)."""

  def __init__(self, path: str):
    super().__init__(py_logging.INFO)
    self.setFormatter(logging.PythonFormatter())
    self.path = path
    self.failed = False
    self._fd = None
    try:
      self._fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
      # A line cut short (a full disk): the lines of this start begin on a line of their own.
      size = os.fstat(self._fd).st_size
      if size and os.pread(self._fd, 1, size - 1) != b'\n':
        self._write(b'\n')
    except OSError as e:
      if e.errno == errno.ELOOP:
        raise workdir_lib.WorkdirError(f'{path} is a symbolic link: a run\'s files must be regular files') from None
      self._fail(e)

  def _write(self, data: bytes) -> None:
    view = memoryview(data)
    while view:
      view = view[os.write(self._fd, view):]

  def emit(self, record):
    if self.failed:
      return
    try:
      self._write((self.format(record) + '\n').encode('utf-8', 'backslashreplace'))
    except OSError as e:
      self._fail(e)

  def _fail(self, e: OSError) -> None:
    self.failed = True  # first: the warning comes back through this handler
    logging.warning('cannot write %s (%s): the run goes on, its lines only on stderr', self.path,
                    workdir_lib.describe_os_error(e))

  def close(self):
    try:
      if self._fd is not None:
        os.close(self._fd)
        self._fd = None
    finally:
      super().close()


def error_record(e: Exception) -> py_logging.LogRecord:
  """The exception ending a run as a log record: selattn's own errors as their one-line message, anything else
  with its traceback; logged where it was raised."""
  tb = e.__traceback__
  while tb is not None and tb.tb_next is not None:
    tb = tb.tb_next
  filename, line = (tb.tb_frame.f_code.co_filename, tb.tb_lineno) if tb is not None else (__file__, 0)
  ours = type(e).__module__.startswith('selattn.')
  return py_logging.LogRecord('absl', py_logging.ERROR, filename, line, 'error: %s', (e,),
                              None if ours else (type(e), e, e.__traceback__))


class RunLog:
  """WORKDIR/train.log receiving every line logged (through the root logger, as absl's stderr handler) until
  `close`; open it only while holding the workdir's lock (a run refused by the lock never writes it)."""

  def __init__(self, workdir: str):
    self.handler = FileHandler(os.path.join(workdir, NAME))
    py_logging.getLogger().addHandler(self.handler)

  def error(self, e: Exception) -> None:
    """The exception ending the run, in the file only (main.py prints its `error:` line on stderr)."""
    self.handler.handle(error_record(e))

  def warning(self, line: str) -> None:
    """A line printed on stderr outside logging (stopping.py's, on a signal before the loop), in the file only."""
    caller = sys._getframe(1)  # pylint: disable=protected-access
    self.handler.handle(py_logging.LogRecord('absl', py_logging.WARNING, caller.f_code.co_filename, caller.f_lineno,
                                             '%s', (line,), None))

  def close(self) -> None:
    py_logging.getLogger().removeHandler(self.handler)
    self.handler.close()
