"""JAX's persistent compilation cache for the CLIs (`--compilation_cache`): a restarted run, a second sample or
evaluation of a run, loads the programs it compiled before instead of compiling them again.

Where: the flag's directory; without the flag $JAX_COMPILATION_CACHE_DIR (JAX reads it itself), else
$XDG_CACHE_HOME/selattn/jax (~/.cache/selattn/jax). `none` turns it off. A directory that cannot be used costs the
cache, not the command: one warning line. JAX caches programs that took a second or more to compile
(jax_persistent_cache_min_compile_time_secs), keyed by the program, its compile options, jax and the backend.
"""

from __future__ import annotations

import os

from absl import logging

from selattn import workdir

FLAG_HELP = ("JAX's persistent compilation cache, so that a restarted or repeated command loads the programs it "
             'compiled before instead of compiling them again: a directory, or none to turn it off. Default: '
             '$JAX_COMPILATION_CACHE_DIR if set, else $XDG_CACHE_HOME/selattn/jax (~/.cache/selattn/jax).')


def use(value: str | None) -> str:
  """Points JAX's cache at `value` (the flag's; None = the default); returns the directory, or 'off'. Call it
  before the first compilation."""
  import jax  # noqa: PLC0415 (the CLIs import jax after parsing their flags)

  if value is None and os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    return os.environ['JAX_COMPILATION_CACHE_DIR']  # JAX reads it itself
  if value is not None and value.strip().lower() in ('', 'none', 'off'):
    jax.config.update('jax_compilation_cache_dir', None)
    return 'off'
  path = os.path.abspath(os.path.expanduser(workdir.user_cache_dir('jax') if value is None else value))
  try:
    os.makedirs(path, exist_ok=True)
    if not os.access(path, os.W_OK | os.X_OK):
      raise PermissionError(f'{path} is not writable')
  except OSError as e:
    logging.warning('compilation cache off: cannot use %s (%s); programs compile on every start', path, e)
    jax.config.update('jax_compilation_cache_dir', None)
    return 'off'
  jax.config.update('jax_compilation_cache_dir', path)
  return path
