"""The docs name only files the repository has, their commands only flags, config keys and config files that
exist and only runs that another of their commands writes, and docs/reproduce_results.sh (the commands behind
RESULTS.md's figures) runs: in miniature on CPU, marked slow."""

import importlib
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from configs import base

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _repo_files() -> set[str]:
  """The committed files and their folders (git's list where there is one, else the working tree)."""
  try:
    out = subprocess.run(['git', 'ls-files', '-z'], cwd=REPO, capture_output=True, check=True).stdout
    files = {f for f in out.decode().split('\0') if f}
  except (OSError, subprocess.CalledProcessError):
    files = {os.path.relpath(os.path.join(d, f), REPO) for d, _, fs in os.walk(REPO) if '.git' not in d for f in fs}
  return files | {os.path.dirname(f) for f in files} | {os.path.dirname(os.path.dirname(f)) for f in files}


def _expand(path: str) -> list[str]:
  """Shell brace lists, as the docs write them: docs/bench/original_{standard,selective}_200k_log.txt."""
  m = re.search(r'\{([^{}]*)\}', path)
  if not m:
    return [path]
  return [q for alt in m.group(1).split(',') for q in _expand(path[:m.start()] + alt + path[m.end():])]


def named_paths(text: str) -> set[str]:
  """Every `docs/...` path in a markdown text, and every relative link target."""
  found = {p.rstrip('.,:;)') for p in re.findall(r'(?<![\w/.-])docs/[\w./{},*-]*[\w}/]', text)}
  found |= {t for t in re.findall(r'\]\(([^)#\s]+)', text) if not re.match(r'[a-z]+:', t)}
  return {q.rstrip('/') for p in found for q in _expand(p)}


def test_named_paths_parser():
  text = ('Logs: `docs/bench/original_{standard,selective}_200k_log.txt`. See [the figure](docs/a.png), '
          '[BENCHMARKS.md](BENCHMARKS.md#w1) and [x](https://example.com/docs/y). Runs: docs/runs/.')
  assert named_paths(text) == {'docs/bench/original_standard_200k_log.txt', 'docs/bench/original_selective_200k_log.txt',
                               'docs/a.png', 'BENCHMARKS.md', 'docs/runs'}


def test_docs_name_only_committed_files():
  files = _repo_files()
  docs = sorted(f for f in files if f.endswith('.md'))
  assert 'RESULTS.md' in docs and 'README.md' in docs
  missing = {}
  for doc in docs:
    with open(os.path.join(REPO, doc), encoding='utf-8') as f:
      text = f.read()
    base = os.path.dirname(doc)
    for path in named_paths(text):
      # docs/... paths are from the repo root (as commands are typed); links are relative to the doc.
      full = path if path.startswith('docs/') else os.path.normpath(os.path.join(base, path))
      if full not in files:
        missing.setdefault(doc, []).append(path)
  assert not missing, missing


def test_no_pointers_to_files_users_lack():
  pattern = re.compile(r'BASELINES|DESIGN\.md|STYLE\.md|\.\./shared')
  hits = []
  for f in sorted(_repo_files()):
    path = os.path.join(REPO, f)
    if os.path.isfile(path) and f.endswith(('.py', '.md', '.sh', '.toml', '.txt', '.sbatch', '.cfg')):
      with open(path, encoding='utf-8', errors='replace') as fh:
        hits += [f'{f}: {line.strip()}' for line in fh if pattern.search(line)]
  assert not [h for h in hits if not h.startswith('tests/docs_test.py')], hits


def test_readme_layout_names_every_module():
  with open(os.path.join(REPO, 'README.md'), encoding='utf-8') as f:
    layout = f.read().split('## Layout', 1)[1].split('\n## ', 1)[0]
  modules = {os.path.basename(f) for f in _repo_files() if f.startswith('selattn/') and f.endswith('.py')}
  assert 'main.py' in modules
  assert not {m for m in modules - {'__init__.py'} if f'`{m}`' not in layout}, layout


# The docs a user types commands from. BENCHMARKS.md and RESULTS.md also name keys of past commits, on purpose.
COMMAND_DOCS = ('README.md', 'launch/README.md')
SECTIONS = ('model', 'data', 'train', 'mesh')


def config_keys_named(text: str) -> set[str]:
  """Every `--config.<section>.<key>`, `<section>.{a, b}` list and `<section>.<key>` in backticks of a text."""
  found = set(re.findall(r'--config\.(\w+\.\w+)', text))
  text = re.sub(r'```.*?```', '', text, flags=re.S)  # inline spans only, from here
  for section, body in re.findall(rf'\b({"|".join(SECTIONS)})\.\{{([^{{}}]*)\}}', text):
    found |= {f'{section}.{k.strip()}' for k in body.split(',') if not k.strip().startswith('<')}
  for span in re.findall(r'`([^`]+)`', text):
    found |= {f'{s}.{k}' for s, k in re.findall(rf'(?<![\w.-])({"|".join(SECTIONS)})\.(\w+)\b(?![.(])', span)
              if k not in ('py', 'log')}  # file names: configs/base.py, train.log
  return found


def commands(text: str) -> list[list[str]]:
  """The commands of a text, as words: each line of its bash blocks (continuations joined, comments dropped,
  `&&` chains split) and each inline `python ...` in backticks, but templates (`<...>`)."""
  lines = []
  for block in re.findall(r'```bash\n(.*?)```', text, re.S):
    lines += block.replace('\\\n', ' ').splitlines()
  lines += re.findall(r'`(python3? [^`]+)`', re.sub(r'```.*?```', '', text, flags=re.S))
  out = []
  for line in lines:
    for part in re.sub(r'(^|\s)#.*', '', line).split('&&'):
      if part.strip() and '<' not in part:  # `--config <the job's config>` is a template, not a command
        out.append(shlex.split(part))
  return out


def cli_flags(module: str) -> set[str]:
  """The flags a project command line defines (absl or argparse), read from its source."""
  path = os.path.join(REPO, module) if module.endswith('.py') else os.path.join(REPO, *module.split('.')) + '.py'
  with open(path, encoding='utf-8') as f:
    src = f.read()
  names = re.findall(r"DEFINE_\w+\(\s*'(\w+)'", src) + re.findall(r"add_argument\(\s*'--(\w+)'", src)
  return {f'--{n}' for n in names}


def _check_args(program: str, args: list[str]) -> list[str]:
  """The flags of one command line that `program` does not define, and its --config that does not load."""
  problems, known = [], cli_flags(program)
  for i, a in enumerate(args):
    flag = a.split('=')[0]
    if a.startswith('--config.'):
      if '--config' not in known:
        problems.append(f'{program} {a}: takes no config overrides')
    elif a.startswith('--') and flag not in known:
      problems.append(f'{program} {flag}: no such flag')
    elif flag == '--config' and ('=' in a or i + 1 < len(args)):
      spec = a.split('=', 1)[1] if '=' in a else args[i + 1]
      file, _, variant = spec.partition(':')
      if not os.path.isfile(os.path.join(REPO, file)):
        problems.append(f'{program} --config {spec}: no such file')
        continue
      try:
        importlib.import_module(file[:-3].replace('/', '.')).get_config(variant)
      except (ValueError, TypeError) as e:
        problems.append(f'{program} --config {spec}: {e}')
  return problems


def check_commands(text: str) -> list[str]:
  """What is wrong with a doc's commands: a module or flag that does not exist, a config file or variant that does
  not load, or a run read (sample, evaluate, plot) that no command of the doc writes (--workdir)."""
  problems, written, read = [], set(re.findall(r'--workdir[ =](runs/[\w./-]+)', text)), []
  for words in commands(text):
    if words[:2] == ['python', '-m'] and words[2:3] and words[2].startswith('selattn.'):
      program, args = words[2], words[3:]
      path = os.path.join(REPO, *program.split('.')) + '.py'
    elif words[:1] == ['python'] and words[1:2] and words[1].startswith('launch/'):
      program, args = words[1], words[2:]
      path = os.path.join(REPO, program)
    else:
      continue
    if not os.path.isfile(path):
      problems.append(f'{program}: no such module')
      continue
    if program == 'launch/local.py' and '--' in args:  # what follows `--` goes to selattn.main
      problems += [f'{program} -- {p}' for p in _check_args('selattn.main', args[args.index('--') + 1:])]
      args = args[:args.index('--')]
    problems += _check_args(program, args)
    if program in ('selattn.sample', 'selattn.evaluate') and '--workdir' in args[:-1]:
      read.append(args[args.index('--workdir') + 1])
    elif program == 'selattn.plot':
      read += [a for j, a in enumerate(args) if not a.startswith('--') and (j == 0 or not args[j - 1].startswith('--'))]
  problems += [f'{run} is read but no command writes it' for run in read if run.startswith('runs/') and
               run not in written]
  return problems


def test_check_commands_finds_what_a_user_would_trip_on():
  text = """```bash
python -m selattn.main --config configs/tiny.py --workdir runs/a --config.train.num_steps=10 \\
  --config.train.nope=1   # a comment --not_a_flag
python -m selattn.sample --workdir runs/a --lenght 5 && python -m selattn.plot runs/a runs/b --out x.png
python -m selattn.nothing --x 1
python launch/local.py --num_processes 2 -- --config configs/selective.py:bad --workdir runs/c --bogus
```
Then `python -m selattn.evaluate --workdir runs/c --split val` and `model.{d_model, nope}`, `mesh.fsdp`, `data.py`."""
  assert check_commands(text) == [
      'selattn.sample --lenght: no such flag', 'selattn.nothing: no such module',
      "launch/local.py -- selattn.main --config configs/selective.py:bad: unknown config variant 'bad' (known: quick)",
      'launch/local.py -- selattn.main --bogus: no such flag', 'runs/b is read but no command writes it']
  keys = {f'{s}.{k}' for s in SECTIONS for k in base.get_config()[s]}
  assert config_keys_named(text) - keys == {'train.nope', 'model.nope'}
  assert {'train.num_steps', 'model.d_model', 'mesh.fsdp'} <= config_keys_named(text)


@pytest.mark.parametrize('doc', COMMAND_DOCS)
def test_doc_commands_name_flags_keys_configs_and_runs_that_exist(doc):
  with open(os.path.join(REPO, doc), encoding='utf-8') as f:
    text = f.read()
  keys = {f'{s}.{k}' for s in SECTIONS for k in base.get_config()[s]}
  assert not config_keys_named(text) - keys, sorted(config_keys_named(text) - keys)
  assert not check_commands(text), check_commands(text)


@pytest.mark.slow
def test_reproduce_results_in_miniature(tmp_path):
  pytest.importorskip('matplotlib')
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO, PYTHON=sys.executable, DEST=str(tmp_path), DEVICE='CPU',
             STEPS='20',
             EVAL_EVERY='10', BLOCKWISE_STEPS='20', BLOCKWISE_EVAL='10', CHECK_STEPS='20', MLP_STEPS='20',
             MLP_EVAL='10',
             EXTRA='--config.model.d_model=16 --config.data.seq_len=32 --config.model.block_q=16 '
                   '--config.model.block_k=16 --config.train.eval_batches=1 --config.train.log_every=10 '
                   '--config.train.sample_length=0')
  r = subprocess.run(['bash', os.path.join(REPO, 'docs', 'reproduce_results.sh')], env=env, capture_output=True,
                     text=True, timeout=1200, check=False)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  runs = ['original_200k/standard', 'original_200k/selective', 'original_200k/reference',
          'original_200k/standard_ffn5', 'identity_and_mlp/sel_blockwise', 'identity_and_mlp/sel_mlp',
          'identity_and_mlp/sel_linear_3k', 'selective_50k']
  for run in runs:
    names = os.listdir(tmp_path / 'runs' / run)
    assert 'config.json' in names and any(n.startswith('events.out.tfevents') for n in names), (run, names)
  for png in ('original_200k.png', 'identity_blockwise_vs_factored.png', 'mlp_vs_linear.png'):
    assert (tmp_path / png).read_bytes()[:4] == b'\x89PNG'
  # One checkpoint, three implementations, one held-out loss: the log RESULTS.md section 2 quotes.
  log = (tmp_path / 'runs' / 'selective_50k' / 'train.log').read_text()
  evals = re.findall(r'eval at step 20: loss ([\d.]+) \| accuracy ([\d.]+)', log)
  assert len(evals) == 3 and len(set(evals)) == 1, evals


@pytest.mark.slow
def test_reproduce_seeds_in_miniature(tmp_path):
  pytest.importorskip('matplotlib')
  corpus = tmp_path / 'tiny.txt'
  corpus.write_text('To be, or not to be, that is the question:\n' * 200)
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO, PYTHON=sys.executable, DEST=str(tmp_path), DEVICE='CPU',
             GPUS='none',
             SEEDS='2', STEPS='10', EVAL_EVERY='5', NANOGPT_STEPS='10', NANOGPT_BEST_UNTIL='5',
             EXTRA=f'--config.model.d_model=16 --config.model.num_heads=2 --config.model.num_layers=1 '
                   f'--config.data.seq_len=16 --config.train.batch_size=4 --config.train.eval_batches=1 '
                   f'--config.train.log_every=5 --config.train.sample_length=0 --config.train.warmup_steps=0 '
                   f'--config.train.steps_per_call=1 --config.train.eval_every=5 --config.data.path={corpus}')
  r = subprocess.run(['bash', os.path.join(REPO, 'docs', 'reproduce_seeds.sh')], env=env, capture_output=True,
                     text=True, timeout=1800, check=False)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  sweeps = {'original': ['standard', 'standard_ffn5', 'selective', 'values_only', 'keys_only'],
            'pre': ['standard', 'selective'], 'nanogpt': ['standard', 'selective']}
  for part, names in sweeps.items():
    for name in names:
      summary = json.loads((tmp_path / 'runs' / 'seeds' / part / name / 'summary.json').read_text())
      assert len(summary['seeds']) == (1 if part == 'pre' else 2), (part, name, summary)
  for png in ('seeds_original.png', 'seeds_pre.png', 'seeds_nanogpt.png'):
    assert (tmp_path / png).read_bytes()[:4] == b'\x89PNG'


@pytest.mark.parametrize('script', ['docs/reproduce_results.sh', 'docs/reproduce_seeds.sh'])
def test_reproduce_scripts_stop_at_once_on_an_interpreter_without_selattn(script, tmp_path):
  """A machine whose `python` is not selattn's environment (a GPU host with only python3): one line, exit 2,
  before any run starts or any folder is made."""
  r = subprocess.run(['bash', script], cwd=REPO, capture_output=True, text=True, timeout=60,
                     env=dict(os.environ, PYTHON=sys.executable + '-missing', DEST=str(tmp_path / 'dest')))
  assert r.returncode == 2, r.stdout + r.stderr
  assert r.stderr.count('\n') == 1 and 'cannot import selattn.main: set PYTHON' in r.stderr
  assert not (tmp_path / 'dest').exists()
