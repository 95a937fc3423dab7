"""Resuming a run on a changed corpus: the saved vocab.json decides the token ids, and a character it lacks (or
another vocabulary kind, bytes for characters) is refused before anything in the workdir changes."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest

from configs import tiny
from run_files import checkpoint_steps, scalars
from selattn import data as data_lib
from selattn import stack
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


# ----------------------------------------------------------------------------------------------------------------
# check_same_data (path, split, the tail split's val_fraction) and check_same_text (the text's sha256), directly.

def _saved(**data):
  return {'config': {'data': data}, 'data_sha256': 'abc'}


def _data(path='corpus.txt', split='tail', val_fraction=0.2):
  c = tiny.get_config().data
  c.path, c.split, c.val_fraction = path, split, val_fraction
  return c


def test_check_same_data_compares_each_key():
  saved = _saved(path='data/corpus.txt', split='tail', val_fraction=0.2)
  train.check_same_data('w', None, _data(path='other.txt'))  # a new run: nothing to compare
  train.check_same_data('w', saved, _data(path='./data//corpus.txt'))  # the same path, spelled otherwise
  train.check_same_data('w', {'config': {'data': {'path': 'data/corpus.txt'}}}, _data(path='data/corpus.txt'))  # an
  # older config.json without split or val_fraction: the defaults of its time, 'tail' and any fraction
  for data, words in [(_data(path='data/other.txt'), "was trained on data.path='data/corpus.txt', not "
                                                     "data.path='data/other.txt'"),
                      (_data(path=''), "not data.path='' (the embedded corpus)"),
                      (_data(path='data/corpus.txt', split='enwik8'), "data.split='tail', not 'enwik8'"),
                      (_data(path='data/corpus.txt', val_fraction=0.1), 'data.val_fraction=0.2, not 0.1')]:
    with pytest.raises(train.TrainingError, match=re.escape(words)) as e:
      train.check_same_data('w', saved, data)
    assert str(e.value).startswith('w ') and str(e.value).endswith('pass --allow_data_change')
  with pytest.raises(train.TrainingError, match=re.escape("data.split='tail', not 'enwik8'")):  # as 'tail' then
    train.check_same_data('w', {'config': {'data': {'path': 'c'}}}, _data(path='c', split='enwik8'))
  # The enwik8 split ignores val_fraction (its 90/5/5 bounds are fixed).
  train.check_same_data('w', _saved(path='e', split='enwik8', val_fraction=0.2),
                        _data(path='e', split='enwik8', val_fraction=0.1))


def test_check_same_data_takes_the_same_file_by_another_path(tmp_path, monkeypatch):
  # A run started with a relative data.path resumes with the absolute path of the same file (or through a link);
  # a path to another file with the same name, or to a missing file, is still refused.
  (tmp_path / 'data').mkdir()
  (tmp_path / 'data' / 'corpus.txt').write_text('abc')
  (tmp_path / 'other').mkdir()
  (tmp_path / 'other' / 'corpus.txt').write_text('abc')
  os.symlink(tmp_path / 'data', tmp_path / 'link')
  monkeypatch.chdir(tmp_path)
  saved = _saved(path='data/corpus.txt', split='tail', val_fraction=0.2)
  train.check_same_data('w', saved, _data(path=str(tmp_path / 'data' / 'corpus.txt')))
  train.check_same_data('w', saved, _data(path='link/corpus.txt'))
  train.check_same_data('w', _saved(path=str(tmp_path / 'data' / 'corpus.txt')), _data(path='data/corpus.txt'))
  for path in ('other/corpus.txt', str(tmp_path / 'missing.txt'), ''):
    with pytest.raises(train.TrainingError, match='was trained on'):
      train.check_same_data('w', saved, _data(path=path))
  with pytest.raises(train.TrainingError, match=re.escape("not data.path='data/corpus.txt'")):
    train.check_same_data('w', _saved(path=''), _data(path='data/corpus.txt'))


def test_check_same_text_compares_the_sha():
  train.check_same_text('w', None, 'def')
  train.check_same_text('w', _saved(path='c.txt'), 'abc')
  train.check_same_text('w', {'config': {'data': {'path': 'c.txt'}}}, 'def')  # an older run: no sha recorded
  with pytest.raises(train.TrainingError) as e:
    train.check_same_text('w', _saved(path='c.txt'), 'def')
  assert str(e.value) == ("the text of data.path='c.txt' has changed since w was trained on it; to continue on the "
                          'new text, pass --allow_data_change')


# ----------------------------------------------------------------------------------------------------------------
# The same checks through both trainers, before anything in the workdir changes.

def _moved_run(first_run, tmp_path, stacked):
  """A copy of the first run whose corpus is at tmp_path/corpus.txt (config.json rewritten to say so): the run
  itself, or a sweep folder holding it as seed 0. Returns (path, workdir given to the trainer, run folder)."""
  _, path, workdir = first_run
  new_path = str(tmp_path / 'corpus.txt')
  shutil.copy(path, new_path)
  top = tmp_path / 'sw' if stacked else tmp_path / 'run'
  run = top / 'seed0' if stacked else top
  shutil.copytree(workdir, run)
  saved = json.loads((run / 'config.json').read_text())
  saved['config']['data']['path'] = new_path
  (run / 'config.json').write_text(json.dumps(saved, indent=2) + '\n')
  return new_path, str(top), str(run)


def _start(stacked, config, workdir, **kwargs):
  if stacked:
    return stack.train(config, workdir, [0], **kwargs)
  return train.train(config, workdir, **kwargs)


@pytest.mark.parametrize('stacked', [False, True], ids=['unstacked', 'stacked'])
def test_an_edited_training_file_is_refused(first_run, tmp_path, stacked):
  new_path, workdir, run = _moved_run(first_run, tmp_path, stacked)
  _rewrite(new_path, TEXT.replace('quick', 'kciuq'))  # the same symbols, another text
  before = _snapshot(run)
  files = sorted(os.listdir(run))
  with pytest.raises(train.TrainingError) as e:
    _start(stacked, _config(new_path, 4), workdir)
  assert str(e.value) == (f'the text of data.path={new_path!r} has changed since {run} was trained on it; to '
                          'continue on the new text, pass --allow_data_change')
  assert _snapshot(run) == before and sorted(os.listdir(run)) == files


@pytest.mark.parametrize('stacked', [False, True], ids=['unstacked', 'stacked'])
@pytest.mark.parametrize('key,value,words', [
    ('path', '', "not data.path='' (the embedded corpus)"),
    ('split', 'enwik8', "data.split='tail', not 'enwik8'"),
    ('val_fraction', 0.3, 'data.val_fraction=0.2, not 0.3')])
def test_other_data_is_refused(first_run, tmp_path, stacked, key, value, words):
  new_path, workdir, run = _moved_run(first_run, tmp_path, stacked)
  before = _snapshot(run)
  files = sorted(os.listdir(run))
  config = _config(new_path, 4)
  setattr(config.data, key, value)
  with pytest.raises(train.TrainingError, match=re.escape(words)) as e:
    _start(stacked, config, workdir)
  assert str(e.value).startswith(f'{run} was trained ')
  assert _snapshot(run) == before and sorted(os.listdir(run)) == files
