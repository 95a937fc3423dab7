"""MetricWriter: what it writes is what TensorBoard reads back, and it never pulls in TensorFlow."""

import os
import sys

import jax.numpy as jnp
import numpy as np
from tensorboard.backend.event_processing import event_accumulator

from selattn import metrics

# 0 = keep every event of that kind (the default keeps a reservoir sample, which would make the asserts flaky).
_KEEP_ALL = {event_accumulator.SCALARS: 0, event_accumulator.TENSORS: 0}


def _read(logdir):
  acc = event_accumulator.EventAccumulator(logdir, size_guidance=_KEEP_ALL)
  acc.Reload()
  return acc


def test_scalars_and_texts_round_trip(tmp_path):
  logdir = str(tmp_path / 'tb')
  losses = {0: 4.25, 10: 3.5, 20: np.float32(2.75)}
  with metrics.MetricWriter(logdir) as w:
    for step, loss in losses.items():
      w.write_scalars(step, {'train/loss': loss, 'train/lr': np.float64(1e-4) * (step + 1)})
    w.write_scalars(20, {'eval/accuracy': np.array(0.5, np.float32)})
    w.write_texts(20, {'eval/sample': 'ROMEO: ünïcode\nline two'})
    w.flush()
  assert len(os.listdir(logdir)) == 1

  acc = _read(logdir)
  tags = acc.Tags()
  assert sorted(tags['scalars']) == ['eval/accuracy', 'train/loss', 'train/lr']
  assert tags['tensors'] == ['eval/sample']

  loss = acc.Scalars('train/loss')
  assert [e.step for e in loss] == [0, 10, 20]
  np.testing.assert_allclose([e.value for e in loss], [4.25, 3.5, 2.75])
  np.testing.assert_allclose([e.value for e in acc.Scalars('train/lr')], [1e-4, 11e-4, 21e-4], rtol=1e-6)
  assert [(e.step, e.value) for e in acc.Scalars('eval/accuracy')] == [(20, 0.5)]

  (text,) = acc.Tensors('eval/sample')
  assert text.step == 20
  # Stored as a Markdown code block, so TensorBoard keeps the lines apart.
  assert text.tensor_proto.string_val == ['    ROMEO: ünïcode\n    line two'.encode('utf-8')]
  assert acc.SummaryMetadata('eval/sample').plugin_data.plugin_name == 'text'

  assert 'tensorflow' not in sys.modules


def test_texts_render_verbatim_in_tensorboard():
  from tensorboard import plugin_util  # pylint: disable=g-import-not-at-top  (the text plugin's own renderer)
  sample = 'KING.\nWhat, *ho*! my_lord\n\n  <b>Exit.</b>'
  html = plugin_util.markdown_to_safe_html(metrics.preformatted(sample))
  assert html == '<pre><code>KING.\nWhat, *ho*! my_lord\n\n  &lt;b&gt;Exit.&lt;/b&gt;\n</code></pre>'
  # Without it the lines run together into paragraphs and *ho* turns into emphasis.
  assert '<em>' in plugin_util.markdown_to_safe_html(sample)


def test_jax_scalars_are_converted(tmp_path):
  with metrics.MetricWriter(str(tmp_path)) as w:
    w.write_scalars(3, {'train/loss': jnp.float32(1.5), 'train/grad_norm': jnp.sum(jnp.ones(4))})
  acc = _read(str(tmp_path))
  assert [(e.step, e.value) for e in acc.Scalars('train/loss')] == [(3, 1.5)]
  assert [(e.step, e.value) for e in acc.Scalars('train/grad_norm')] == [(3, 4.0)]


def test_disabled_writer_creates_nothing(tmp_path):
  logdir = tmp_path / 'tb'
  with metrics.MetricWriter(str(logdir), enabled=False) as w:
    w.write_scalars(0, {'train/loss': 1.0})
    w.write_texts(0, {'eval/sample': 'x'})
    w.flush()
  assert not logdir.exists()
  assert list(tmp_path.iterdir()) == []


def test_writes_after_close_are_dropped(tmp_path):
  w = metrics.MetricWriter(str(tmp_path))
  w.write_scalars(1, {'a': 1.0})
  w.close()
  w.write_scalars(2, {'a': 2.0})
  w.close()
  assert [e.step for e in _read(str(tmp_path)).Scalars('a')] == [1]


def test_two_writers_in_one_second_write_two_files(tmp_path):
  # A run resumed in the same process within a second (the tests do it) gets its own file, not an error.
  for step in (1, 2, 3):
    with metrics.MetricWriter(str(tmp_path)) as w:
      w.write_scalars(step, {'a': float(step)})
  names = sorted(os.listdir(tmp_path))
  assert len(names) == 3 and len({n.rsplit('.', 1)[0] for n in names}) <= 2, names
  assert sorted(e.step for n in names for e in _read(str(tmp_path / n)).Scalars('a')) == [1, 2, 3]
