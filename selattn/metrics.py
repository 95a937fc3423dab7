"""TensorBoard event files without TensorFlow.

flax.metrics.tensorboard and clu import TensorFlow (seconds of start-up, and a second framework that may claim GPU
memory), so we write the protos ourselves with tensorboard's own pure-Python record format. Only process 0
should write: on the others `MetricWriter(..., enabled=False)` is a no-op that creates no file.

The file is written from the calling thread (not tensorboard's EventFileWriter thread, whose failures surface as
a thread traceback), created at the first write (a run that writes nothing leaves no empty file), and any
failure, a full disk say, is a `MetricsError` with a one-line message.
"""

from __future__ import annotations

from collections.abc import Mapping
import os
import socket
import time

from tensorboard.compat.proto import event_pb2
from tensorboard.compat.proto import summary_pb2
from tensorboard.compat.proto import tensor_pb2
from tensorboard.compat.proto import tensor_shape_pb2
from tensorboard.compat.proto import types_pb2
from tensorboard.plugins.text import metadata as text_metadata
from tensorboard.summary.writer.record_writer import RecordWriter

FLUSH_SECS = 30  # bounds how stale TensorBoard can be while a long run is in progress


class MetricsError(OSError):
  """The event file cannot be written; the message is one line naming it."""


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
    self.path = None  # the event file, once the first event is written
    self._writer = None
    self._closed = not enabled
    self._last_flush = 0.0

  def _open(self) -> RecordWriter:
    # The name tensorboard's own writer uses: TensorBoard sorts a logdir's files by it.
    name = f'events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}'
    self._guard(lambda: os.makedirs(self.logdir, exist_ok=True))
    # The last field counts the files this process started in the same second (a run resumed in-process).
    for i in range(1000):
      self.path = os.path.join(self.logdir, f'{name}.{i}')
      try:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        break
      except FileExistsError:
        continue
      except OSError as e:
        raise self._error(e) from None
    else:
      raise MetricsError(f'cannot create a TensorBoard event file in {self.logdir}: {name}.0 to .999 all exist')
    writer = RecordWriter(os.fdopen(fd, 'wb'))
    version = event_pb2.Event(wall_time=time.time(), file_version='brain.Event:2')
    self._guard(lambda: writer.write(version.SerializeToString()))
    return writer

  def _error(self, e: OSError) -> MetricsError:
    return MetricsError(f'cannot write the TensorBoard event file {self.path or self.logdir}: '
                        f'{os.strerror(e.errno) if e.errno else e}')

  def _guard(self, fn):
    try:
      return fn()
    except OSError as e:
      raise self._error(e) from None

  def _write(self, step: int, values: list[summary_pb2.Summary.Value]) -> None:
    if self._closed or not values:
      return
    if self._writer is None:
      self._writer = self._open()
    event = event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values))
    self._guard(lambda: self._writer.write(event.SerializeToString()))
    if time.monotonic() - self._last_flush > FLUSH_SECS:
      self.flush()

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    """Writes each scalar (Python, numpy or jax) under its tag, e.g. 'train/loss'."""
    if self._closed:
      return
    self._write(step, [_scalar_value(tag, value) for tag, value in scalars.items()])

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    """Writes each text under its tag, shown verbatim in TensorBoard's Text tab (see `preformatted`)."""
    if self._closed:
      return
    self._write(step, [_text_value(tag, preformatted(text)) for tag, text in texts.items()])

  def flush(self) -> None:
    if self._writer is not None:
      self._last_flush = time.monotonic()
      self._guard(self._writer.flush)

  def close(self) -> None:
    """Flushes and closes the file; later writes are dropped."""
    self._closed = True
    writer, self._writer = self._writer, None
    if writer is not None:
      try:
        self._guard(writer.flush)
      finally:
        try:
          writer.close()
        except OSError:
          pass  # the flush above already reported it

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
