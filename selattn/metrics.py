"""TensorBoard event files without TensorFlow.

flax.metrics.tensorboard and clu import TensorFlow (seconds of start-up, and a second framework that may claim GPU
memory), so we write the protos ourselves through tensorboard's own pure-Python EventFileWriter. Only process 0
should write: on the others `MetricWriter(..., enabled=False)` is a no-op that creates no file.
"""

from __future__ import annotations

from collections.abc import Mapping
import time

from tensorboard.compat.proto import event_pb2
from tensorboard.compat.proto import summary_pb2
from tensorboard.compat.proto import tensor_pb2
from tensorboard.compat.proto import tensor_shape_pb2
from tensorboard.compat.proto import types_pb2
from tensorboard.plugins.text import metadata as text_metadata
from tensorboard.summary.writer.event_file_writer import EventFileWriter


def _scalar_value(tag: str, value: float) -> summary_pb2.Summary.Value:
  # simple_value is the legacy scalar encoding; TensorBoard's data loader still migrates it to the scalars plugin.
  return summary_pb2.Summary.Value(tag=tag, simple_value=float(value))


def preformatted(text: str) -> str:
  """`text` as a Markdown code block (every line indented by four spaces).

  TensorBoard renders texts as Markdown, which would run a sample's lines together into paragraphs and read its
  `*` and `_` as emphasis; a code block is shown as it is. Indenting, unlike a ``` fence, cannot be closed early
  by the text itself. The text is its lines with the first four characters dropped."""
  return '\n'.join('    ' + line for line in text.split('\n'))


def _text_value(tag: str, text: str) -> summary_pb2.Summary.Value:
  # The text plugin only reads rank-0..2 DT_STRING tensors tagged with its plugin name; Markdown is rendered.
  tensor = tensor_pb2.TensorProto(
      dtype=types_pb2.DT_STRING,
      tensor_shape=tensor_shape_pb2.TensorShapeProto(),
      string_val=[text.encode('utf-8')],
  )
  meta = text_metadata.create_summary_metadata(display_name=tag, description='')
  return summary_pb2.Summary.Value(tag=tag, metadata=meta, tensor=tensor)


class MetricWriter:
  """Writes scalars and texts to one TensorBoard event file in `logdir`; a no-op when not enabled."""

  def __init__(self, logdir: str, enabled: bool = True):
    self.logdir = logdir
    self.enabled = enabled
    # flush_secs bounds how stale TensorBoard can be while a long run is in progress.
    self._writer = EventFileWriter(logdir, max_queue_size=100, flush_secs=30) if enabled else None

  def _write(self, step: int, values: list[summary_pb2.Summary.Value]) -> None:
    if self._writer is None or not values:
      return
    event = event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values))
    self._writer.add_event(event)

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    """Writes each scalar (Python, numpy or jax) under its tag, e.g. 'train/loss'."""
    if self._writer is None:
      return
    self._write(step, [_scalar_value(tag, value) for tag, value in scalars.items()])

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    """Writes each text under its tag, shown verbatim in TensorBoard's Text tab (see `preformatted`)."""
    if self._writer is None:
      return
    self._write(step, [_text_value(tag, preformatted(text)) for tag, text in texts.items()])

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    """Flushes and closes the file; later writes are dropped."""
    if self._writer is not None:
      self._writer.close()
      self._writer = None

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
