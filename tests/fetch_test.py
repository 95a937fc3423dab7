"""selattn.corpora.fetch: checked downloads from local file:// URLs (no network)."""

import hashlib
import subprocess
import sys

from selattn.corpora import fetch


def _source(tmp_path, text: bytes) -> fetch.Source:
  src = tmp_path / 'mirror' / 'input.txt'
  src.parent.mkdir(exist_ok=True)
  src.write_bytes(text)
  return fetch.Source(url=src.as_uri(), sha256=hashlib.sha256(text).hexdigest(), filename='tiny.txt')


def test_fetch_writes_the_checked_file_once(tmp_path, monkeypatch):
  text = b'First Citizen:\nBefore we proceed any further, hear me speak.\n'
  source = _source(tmp_path, text)
  monkeypatch.setitem(fetch.CORPORA, 'tiny', source)
  dest = tmp_path / 'data'
  assert fetch.fetch('tiny', str(dest)) == (str(dest / 'tiny.txt'), True)
  assert (dest / 'tiny.txt').read_bytes() == text
  assert sorted(p.name for p in dest.iterdir()) == ['tiny.txt']  # no temporary file left behind
  # Already there with the right checksum: not downloaded again (the source is gone).
  (tmp_path / 'mirror' / 'input.txt').unlink()
  assert fetch.fetch('tiny', str(dest)) == (str(dest / 'tiny.txt'), False)
  # A damaged copy is replaced by a fresh download, not trusted.
  (dest / 'tiny.txt').write_bytes(b'damaged')
  _source(tmp_path, text)
  assert fetch.fetch('tiny', str(dest))[1] and (dest / 'tiny.txt').read_bytes() == text


def _cli(*args, cwd):
  return subprocess.run([sys.executable, '-m', 'selattn.corpora.fetch', *args], capture_output=True, text=True,
                        cwd=cwd, check=False)


def test_cli_refuses_a_file_that_fails_the_pinned_checksum(tmp_path):
  wrong = _source(tmp_path, b'not the corpus\n')
  r = _cli('tinyshakespeare', '--url', wrong.url, cwd=tmp_path)
  assert r.returncode == 1 and r.stdout == ''
  pinned = fetch.CORPORA['tinyshakespeare'].sha256
  assert r.stderr == f'error: {wrong.url}: sha256 {wrong.sha256} is not the pinned {pinned} (15 bytes); nothing written\n'
  assert not (tmp_path / 'data').exists()

  r = _cli('tinyshakespeare', '--url', (tmp_path / 'missing.txt').as_uri(), cwd=tmp_path)
  assert r.returncode == 1 and r.stderr.startswith('error: cannot download file://') and r.stderr.count('\n') == 1
  r = _cli('hamlet', cwd=tmp_path)
  assert (r.returncode, r.stderr) == (1, "error: unknown corpus 'hamlet' (known: tinyshakespeare)\n")


def test_cli_reports_the_path(tmp_path, monkeypatch):
  # The CLI in process, so the patched source applies; relative --dest as a user types it.
  monkeypatch.setitem(fetch.CORPORA, 'tinyshakespeare', _source(tmp_path, b'ROMEO:\nhi\n'))
  monkeypatch.chdir(tmp_path)
  assert fetch.main(['tinyshakespeare']) == 0
  assert (tmp_path / 'data' / 'tiny.txt').read_bytes() == b'ROMEO:\nhi\n'
