"""Resuming a run on a changed corpus: the saved vocab.json decides the token ids, and a character it lacks (or
another vocabulary kind, bytes for characters) is refused before anything in the workdir changes."""

from __future__ import annotations

import os
import shutil

import pytest

from configs import tiny
from run_files import checkpoint_steps, scalars
from selattn import data as data_lib
from selattn import train

TEXT = 'the quick brown fox jumps over the lazy dog. ' * 40  # 1800 chars, 28 symbols


def _config(path, num_steps):
  c = tiny.get_config()
  c.data.path, c.data.seq_len = path, 16
  c.model.attention = 'standard'  # the corpus is the point here; standard compiles fastest
  c.model.num_layers = 1
  t = c.train
  t.num_steps, t.checkpoint_every, t.log_every, t.eval_every, t.sample_length = num_steps, 2, 1, 0, 0
  return c


def _snapshot(workdir):
  """The bytes of vocab.json and config.json, and the checkpoint steps."""
  files = {}
  for name in ('vocab.json', 'config.json'):
    with open(os.path.join(workdir, name), 'rb') as f:
      files[name] = f.read()
  return files, checkpoint_steps(workdir)


@pytest.fixture(scope='module')
def first_run(tmp_path_factory):
  root = tmp_path_factory.mktemp('vocab')
  path = str(root / 'corpus.txt')
  with open(path, 'w') as f:
    f.write(TEXT)
  workdir = str(root / 'run')
  train.train(_config(path, 2), workdir)
  return root, path, workdir


def _rewrite(path, text):
  with open(path, 'w') as f:
    f.write(text)


@pytest.mark.parametrize('change,char', [
    (lambda t: t[:900] + '~' + t[900:], '~'),  # one more symbol: the vocabulary would grow
    (lambda t: t.replace('z', 'Z'), 'Z'),  # same number of symbols, one different: sizes alone would not tell
], ids=['added', 'replaced'])
def test_resume_on_a_corpus_with_a_new_character_is_refused(first_run, tmp_path, change, char):
  root, path, workdir = first_run
  new_path = str(tmp_path / 'corpus.txt')
  _rewrite(new_path, change(TEXT))
  before = _snapshot(workdir)
  events = sorted(os.listdir(workdir))
  with pytest.raises(data_lib.DataError) as e:  # other data allowed: the vocabulary is what refuses it
    train.train(_config(new_path, 4), workdir, allow_data_change=True)
  msg = str(e.value)
  assert repr(char) in msg and 'vocabulary' in msg and new_path in msg and '\n' not in msg, msg
  assert _snapshot(workdir) == before  # vocab.json, config.json and the checkpoints untouched
  assert sorted(os.listdir(workdir)) == events  # not even a new event file


def test_resume_on_a_corpus_lacking_a_character_keeps_the_saved_ids(first_run, tmp_path):
  # Every character is in the saved vocabulary: the run continues, with the saved ids (the new text's own sorted
  # vocabulary would number every symbol after 'z' differently).
  root, path, workdir = first_run
  work = str(tmp_path / 'run')
  shutil.copytree(workdir, work)
  new_path = str(tmp_path / 'corpus.txt')
  _rewrite(new_path, TEXT.replace('z', 'y'))
  (vocab_before, _), _ = _snapshot(work)
  train.train(_config(new_path, 4), work, allow_data_change=True)  # another data.path: allowed explicitly
  (vocab_after, _), steps = _snapshot(work)
  assert vocab_after == vocab_before
  assert steps == [2, 4] and sorted(scalars(work)) == [1, 2, 3, 4]
  saved = data_lib.Vocab.load(os.path.join(work, 'vocab.json'))
  assert saved.chars == ''.join(sorted(set(TEXT))) and 'z' in saved.chars


def test_resume_with_the_other_vocab_kind_is_refused(first_run):
  # A character run resumed as bytes (or the reverse) would read other symbols: refused, the workdir untouched.
  root, path, workdir = first_run
  before = _snapshot(workdir)
  events = sorted(os.listdir(workdir))
  config = _config(path, 4)
  config.data.vocab = 'bytes'
  with pytest.raises(train.TrainingError) as e:
    train.train(config, workdir)
  assert str(e.value) == (f'{workdir} holds a run with data.vocab=\'chars\' (28 symbols in vocab.json), not '
                          "data.vocab='bytes'; resume it with --config.data.vocab=chars or use a new --workdir")
  assert _snapshot(workdir) == before and sorted(os.listdir(workdir)) == events


def test_resume_with_another_split_is_refused(first_run):
  root, path, workdir = first_run
  before = _snapshot(workdir)
  config = _config(path, 4)
  config.data.split = 'enwik8'
  with pytest.raises(train.TrainingError) as e:
    train.train(config, workdir)
  assert str(e.value) == (f"{workdir} was trained with data.split='tail', not 'enwik8' (other training and held-out "
                          'tokens); to continue it so, pass --allow_data_change')
  assert _snapshot(workdir) == before


def test_resume_on_another_path_names_the_path_before_reading_it(first_run, tmp_path):
  # The embedded corpus has characters this run's vocabulary lacks: the path is the mistake, and the message says
  # so (not the vocabulary error reading that corpus would give).
  root, path, workdir = first_run
  before = _snapshot(workdir)
  events = sorted(os.listdir(workdir))
  with pytest.raises(train.TrainingError) as e:
    train.train(_config('', 4), workdir)
  assert str(e.value) == (f"{workdir} was trained on data.path={path!r}, not data.path='' (the embedded corpus); "
                          'to continue it on other data, pass --allow_data_change')
  assert _snapshot(workdir) == before and sorted(os.listdir(workdir)) == events
