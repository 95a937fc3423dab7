"""selattn/runlog.py in-process: WORKDIR/train.log gets the root logger's lines in absl's format, appended; a link is
refused; a failed write warns once and never stops the run; the error ending a run is its last line. The command
line's train.log (resumes, a refused second run, sweeps) is tested in main_test.py and sweep_test.py."""

import errno
import logging as py_logging
import os
import re

from absl import logging
import pytest

from selattn import runlog
from selattn import workdir


@pytest.fixture
def info_level():
  """absl's INFO lines reach the handlers (pytest leaves the root logger at WARNING)."""
  loggers = [py_logging.getLogger(), py_logging.getLogger('absl')]
  old = [l.level for l in loggers]
  for l in loggers:
    l.setLevel(py_logging.INFO)
  yield
  for l, level in zip(loggers, old):
    l.setLevel(level)


def test_lines_are_appended_in_absl_format_and_stop_at_close(tmp_path, info_level):
  path = tmp_path / 'train.log'
  path.write_bytes(b'I1130 00:00:00.000000 1 train.py:1] an earlier start, cut sho')  # no newline: cut by a kill
  log = runlog.RunLog(str(tmp_path))
  logging.info('step %d/%d | loss %.4f', 3, 5, 1.5)
  logging.debug('not at INFO')
  log.close()
  logging.info('after close')
  lines = path.read_text().splitlines()
  assert lines[0].endswith('cut sho')  # kept as it was; the new lines start on a line of their own
  assert len(lines) == 2 and re.fullmatch(r'I\d{4} [\d:.]+ +\d+ runlog_test\.py:\d+\] step 3/5 \| loss 1\.5000',
                                          lines[1]), lines
  assert not [h for h in py_logging.getLogger().handlers if isinstance(h, runlog.FileHandler)]


def test_a_symlinked_train_log_is_refused_and_its_target_untouched(tmp_path):
  target = tmp_path / 'elsewhere.log'
  target.write_text('not ours\n')
  os.symlink(target, tmp_path / 'train.log')
  with pytest.raises(workdir.WorkdirError, match='train.log is a symbolic link'):
    runlog.RunLog(str(tmp_path))
  assert target.read_text() == 'not ours\n'


def test_a_failed_write_warns_once_and_the_run_goes_on(tmp_path, info_level, monkeypatch, caplog):
  log = runlog.RunLog(str(tmp_path))
  logging.info('written')

  def full(fd, data):
    raise OSError(errno.ENOSPC, 'No space left on device')

  monkeypatch.setattr(os, 'write', full)
  logging.info('lost 1')
  logging.info('lost 2')
  monkeypatch.undo()
  log.close()
  warnings = [r.getMessage() for r in caplog.records if r.getMessage().startswith('cannot write')]
  assert warnings == [f'cannot write {tmp_path}/train.log (No space left on device (errno 28)): the run goes on, '
                      'its lines only on stderr']
  assert (tmp_path / 'train.log').read_text().count('\n') == 1


def test_the_error_ending_a_run_is_its_last_line(tmp_path):
  log = runlog.RunLog(str(tmp_path))
  for e in (workdir.WorkdirError('the disk is full'), ValueError('a bug')):
    try:
      raise e
    except Exception as caught:  # pylint: disable=broad-except
      log.error(caught)
  log.close()
  text = (tmp_path / 'train.log').read_text()
  # selattn's own error: one line; anything else: its traceback, as a crash prints it.
  assert re.match(r'E\d{4} .* runlog_test\.py:\d+\] error: the disk is full\nE\d{4} .*\] error: a bug\n'
                  r'Traceback \(most recent call last\):\n', text), text
  assert text.rstrip().endswith('ValueError: a bug')


def test_a_short_write_is_finished(tmp_path, info_level, monkeypatch):
  """os.write may write less than asked (a signal, a filling disk): the rest of the line follows, not a cut line."""
  write = os.write
  monkeypatch.setattr(os, 'write', lambda fd, data: write(fd, bytes(data[:5])))  # at most 5 bytes a call
  log = runlog.RunLog(str(tmp_path))
  logging.info('a line longer than five bytes, %d', 42)
  logging.info('and the next one')
  log.close()
  lines = (tmp_path / 'train.log').read_text().splitlines()
  assert [l.split('] ', 1)[1] for l in lines] == ['a line longer than five bytes, 42', 'and the next one'], lines


def test_a_run_in_process_stops_writing_its_log_when_it_returns(tmp_path, info_level):
  """train.train (in a notebook, or the tests' many runs in one process): the log's handler leaves with the run, so
  what is logged after it, another run's lines included, never reaches its train.log."""
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from selattn import train  # pylint: disable=g-import-not-at-top
  c = tiny.get_config()
  c.model.num_layers, c.data.seq_len, c.train.batch_size = 1, 16, 4
  c.train.num_steps, c.train.log_every, c.train.eval_batches, c.train.sample_length = 1, 1, 1, 0
  handlers = list(py_logging.getLogger().handlers)
  train.train(c, str(tmp_path / 'a'))
  assert py_logging.getLogger().handlers == handlers
  logging.info('after the run')
  text = (tmp_path / 'a' / 'train.log').read_text()
  assert '] step 1/1 | loss' in text and 'after the run' not in text
