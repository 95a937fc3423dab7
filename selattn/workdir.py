"""A run's folder as one writer sees it: an exclusive lock, and small files written whole or not at all.

The lock is `fcntl.flock` on WORKDIR/lock, held by process 0 for the whole run: the OS releases it when the
process dies, however it dies, so there is no stale lock to clean up. Readers (sampling, tests) never take it.
Files are read and written without following symbolic links, so a link in the workdir cannot send a run's
writes elsewhere.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket

LOCK_NAME = 'lock'


class WorkdirError(RuntimeError):
  """The workdir cannot be used (in use, not a directory, unwritable, a link); the message is one line."""


def describe_os_error(e: OSError) -> str:
  """`[Errno 28] No space left on device` without the file name (messages name it themselves)."""
  return f'{e.strerror or e}' if e.errno is None else f'{os.strerror(e.errno)} (errno {e.errno})'


def user_cache_dir(name: str) -> str:
  """A folder of selattn's outside any run (token stores, compiled programs): $XDG_CACHE_HOME/selattn/<name>, by
  default ~/.cache/selattn/<name>."""
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'selattn', name)


def check_is_dir(workdir: str) -> None:
  """Refuses a workdir path that exists and is not a directory (a regular file, say)."""
  if os.path.lexists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f'--workdir={workdir} exists and is not a directory')


class Lock:
  """An exclusive lock on a workdir for this process's lifetime (or until `release`)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_NAME)
    self._fd = None

  def acquire(self) -> None:
    """Takes the lock or raises WorkdirError naming the holder's pid and host; never waits."""
    try:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
      raise WorkdirError(f'cannot open the lock file {self.path}: {describe_os_error(e)}') from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = _read_fd(fd).strip() or 'an unknown process'
      os.close(fd)
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise WorkdirError(f'{os.path.dirname(self.path)} is in use by another run ({holder}); wait for it to '
                           'end or use another --workdir') from None
      raise WorkdirError(f'cannot lock {self.path}: {describe_os_error(e)}') from None
    try:
      # Who holds it, for the error above; written after locking, so a reader never sees a half-written holder
      # unless it races this write (it then prints what it read: harmless).
      os.ftruncate(fd, 0)
      os.pwrite(fd, f'pid {os.getpid()} on {socket.gethostname()}\n'.encode(), 0)
    except OSError as e:
      os.close(fd)
      raise WorkdirError(f'cannot write the lock file {self.path}: {describe_os_error(e)}') from None
    self._fd = fd

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)  # closing drops the flock
      self._fd = None

  def __enter__(self) -> Lock:
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def _read_fd(fd: int) -> str:
  try:
    return os.pread(fd, 4096, 0).decode('utf-8', 'replace')
  except OSError:
    return ''


def read_text(path: str) -> str | None:
  """The file's UTF-8 text, or None if there is no file; a symbolic link is refused (WorkdirError)."""
  try:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
  except FileNotFoundError:
    return None
  except OSError as e:
    if e.errno == errno.ELOOP:
      raise WorkdirError(f'{path} is a symbolic link: a run\'s files must be regular files') from None
    raise WorkdirError(f'cannot read {path}: {describe_os_error(e)}') from None
  try:
    with os.fdopen(fd, 'rb') as f:
      return f.read().decode('utf-8')
  except (OSError, UnicodeDecodeError) as e:
    raise WorkdirError(f'cannot read {path}: {e}') from None


def _remove_leftovers(directory: str, name: str) -> None:
  """Removes the temporary files of writes killed midway (the caller holds the lock: no write is in progress)."""
  prefix = f'.{name}.tmp-'
  try:
    for entry in os.listdir(directory):
      if entry.startswith(prefix):
        os.unlink(os.path.join(directory, entry))
  except FileNotFoundError:
    pass
  except OSError as e:
    raise WorkdirError(f'cannot clean up {directory}: {describe_os_error(e)}') from None


def write_text(path: str, text: str) -> bool:
  """Writes `text` to `path` atomically (temporary file, fsync, rename) unless it already holds it.

  Returns whether the file was written. A crash at any moment leaves either the old or the new file, never a
  truncated one; the rename replaces a symbolic link at `path` rather than writing through it.
  """
  directory, name = os.path.split(path)
  _remove_leftovers(directory, name)
  if read_text(path) == text:
    return False
  tmp = os.path.join(directory, f'.{name}.tmp-{os.getpid()}')
  data = text.encode('utf-8')
  try:
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
      view = memoryview(data)
      while view:
        view = view[os.write(fd, view):]
      os.fsync(fd)
    finally:
      os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
      os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
      os.close(dir_fd)
  except OSError as e:
    try:
      os.unlink(tmp)
    except OSError:
      pass
    raise WorkdirError(f'cannot write {path}: {describe_os_error(e)}') from None
  return True
