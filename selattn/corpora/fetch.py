"""Downloads a corpus to train on, checked against a pinned sha256:

  python -m selattn.corpora.fetch tinyshakespeare            # -> data/tinyshakespeare.txt
  python -m selattn.main --config configs/nanogpt.py --workdir runs/ng --config.data.path=data/tinyshakespeare.txt

tinyshakespeare is karpathy's char-rnn corpus (1,115,394 characters, 65 symbols), the one nanoGPT's
shakespeare-char setting trains on. The file is written only when its checksum matches, so a half-finished or
altered download never becomes a corpus.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import sys
import tempfile
import urllib.error
import urllib.request


@dataclasses.dataclass(frozen=True)
class Source:
  url: str
  sha256: str
  filename: str


CORPORA = {
    'tinyshakespeare': Source(
        url='https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt',
        sha256='86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed',
        filename='tinyshakespeare.txt'),
}


class FetchError(Exception):
  """A download that cannot be used; the message is one line saying why."""


def _sha256(path: str) -> str:
  with open(path, 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()


def fetch(name: str, dest_dir: str = 'data', url: str | None = None) -> tuple[str, bool]:
  """Downloads corpus `name` into dest_dir (from `url` if given, else its pinned address); returns its path and
  whether it was downloaded (False: a file with the right checksum was already there)."""
  if name not in CORPORA:
    raise FetchError(f'unknown corpus {name!r} (known: {", ".join(sorted(CORPORA))})')
  source = CORPORA[name]
  path = os.path.join(dest_dir, source.filename)
  if os.path.isfile(path) and _sha256(path) == source.sha256:
    return path, False
  url = url or source.url
  try:
    with urllib.request.urlopen(url, timeout=60) as r:
      data = r.read()
  except (urllib.error.URLError, OSError, ValueError) as e:
    raise FetchError(f'cannot download {url}: {getattr(e, "reason", e)}') from None
  got = hashlib.sha256(data).hexdigest()
  if got != source.sha256:
    raise FetchError(f'{url}: sha256 {got} is not the pinned {source.sha256} ({len(data)} bytes); nothing written')
  os.makedirs(dest_dir, exist_ok=True)
  # Write beside the target and rename: the path only ever holds the whole, checked file.
  fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=f'.{source.filename}.')
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise
  return path, True


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('name', help=f'corpus to fetch: {", ".join(sorted(CORPORA))}')
  p.add_argument('--dest', default='data', help='folder to write it to (default: data/)')
  p.add_argument('--url', default=None, help='download from here instead (a mirror; the checksum still applies)')
  args = p.parse_args(argv)
  try:
    path, downloaded = fetch(args.name, args.dest, args.url)
  except (FetchError, OSError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(f'{"wrote" if downloaded else "already there:"} {path} (sha256 {CORPORA[args.name].sha256[:12]}... checked)')
  return 0


if __name__ == '__main__':
  sys.exit(main())
