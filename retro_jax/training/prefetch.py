"""Input that never stalls the step: batches placed on the devices ahead.

`train()` would otherwise read a host batch (a seqio/tf.data read, a numpy
shard, a synthetic draw) and copy it to the devices between two steps, in the
thread that dispatches them, so the devices wait for the host every step.
`Prefetcher` moves both into a background thread that stays `depth` batches
ahead: while step N runs, batch N + 1 is already on the devices and batch
N + 2 is being read and transferred (depth 2, the default).

  source iterator ─► [thread: next(), place() = device_put + wait] ─► queue
                                                       consumer: next() ◄─┘

Guarantees the loop relies on:
  * order: one thread reads the source and a FIFO queue hands its items on,
    so batches come in exactly the source's order (resume positions and the
    rows record depend on it);
  * errors: whatever the source (or `place`) raises, StopIteration at the
    end of the data included, is raised by the consumer's next `next()` as
    the same exception object (type and message kept), never a hang;
  * cleanup: `close()` (also on leaving a `with` block, so on an exception
    or a SIGTERM break in the loop) stops the thread: it reads nothing more,
    closes the source iterator in its own thread (a generator cannot be
    closed from another thread while it runs) and is joined;
  * bounded read-ahead: at most `depth` items have been read from the source
    beyond those the consumer took, so at most depth + 1 batches (those and
    the one the step uses) are on the devices at once.

Placement (`place_batch`): in one process, `jax.device_put` with the batch
sharding; in a multi-process run, `sharding.global_batch`, which assembles the
global array from this process's rows (each process holds only its rows and
places them on its own devices; no collective, so a background thread can do
it independently of the other processes). Either way the thread waits until
the copy is done, so what the consumer gets is ready.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any, Callable, Dict, Iterable, Iterator, Mapping, Optional

import jax
import numpy as np

from retro_jax.core import sharding

DEPTH = 2           # Batches read ahead of the step: double buffering.
JOIN_TIMEOUT_S = 10.0   # close() waits this long for a read in progress.
_POLL_S = 0.05      # How often a waiting thread looks at the stop flag.


def place_batch(batch: Mapping[str, np.ndarray], mesh: sharding.Mesh,
                keys: Optional[Iterable[str]] = None) -> Dict[str, jax.Array]:
  """A host batch as global arrays sharded over the batch axes, transferred.

  Args:
    batch: this process's rows, e.g. {"tokens": int32 [b, n], "neighbours":
      int32 [b, L, k, r], "loss_mask": int32 [b, n]}; b = global batch / the
      number of row blocks the mesh gives the processes.
    mesh: the training mesh.
    keys: the entries to place (default: all); others are dropped.
  Returns:
    {key: jax.Array [B, ...]} with B the global batch, sharded by
    `sharding.batch_sharding(mesh, ndim)`; the copies have completed.
  """
  keys = list(batch) if keys is None else list(keys)
  if jax.process_count() == 1:
    placed = {k: jax.device_put(np.asarray(batch[k]), sharding.batch_sharding(
        mesh, np.ndim(batch[k]))) for k in keys}
  else:   # Each process's own rows -> one global array (no collective).
    placed = sharding.global_batch({k: batch[k] for k in keys}, mesh)
  return jax.block_until_ready(placed)


class _Failure:
  """What the source raised, handed to the consumer in order."""

  def __init__(self, error: BaseException):
    self.error = error


def _produce(source: Iterator[Any], place: Callable[[Any], Any],
             items: "queue.SimpleQueue", slots: threading.Semaphore,
             stop: threading.Event) -> None:
  """The thread: reads `source`, places each item, queues it, in order.

  It holds no reference to the `Prefetcher`, so a forgotten one can be
  garbage collected (its `__del__` stops this thread).
  """
  try:
    while not stop.is_set():
      # A free slot first: never more than `depth` items read ahead.
      while not slots.acquire(timeout=_POLL_S):
        if stop.is_set():
          return
      if stop.is_set():
        return
      try:
        item = next(source)
        if stop.is_set():   # Closed while reading: placing is wasted work.
          return
        item = place(item)
      except BaseException as e:  # pylint: disable=broad-except
        items.put(_Failure(e))    # StopIteration too: the end of the data.
        return
      items.put(item)
  finally:
    close = getattr(source, "close", None)
    if close is not None:   # A generator's `finally` (tf.data, files) runs.
      try:
        close()
      except Exception:  # pylint: disable=broad-except
        logging.exception("prefetch: closing the source failed")


class Prefetcher(Iterator[Any]):
  """`place(item)` for each item of `source`, prepared `depth` ahead in a
  background thread (see the module docstring). Use it as a context manager,
  or call `close()`; depth 0 reads and places in the consumer's thread (no
  thread), as a plain loop would."""

  def __init__(self, source: Iterable[Any],
               place: Optional[Callable[[Any], Any]] = None,
               depth: int = DEPTH, join_timeout_s: float = JOIN_TIMEOUT_S,
               name: str = "prefetch"):
    if depth < 0:
      raise ValueError(f"prefetch depth must be >= 0, got {depth}")
    self._source = iter(source)
    self._place = place or (lambda x: x)
    self._depth = depth
    self._join_timeout_s = join_timeout_s
    self._error: Optional[BaseException] = None
    self._closed = False
    self._thread = None
    if depth:
      self._items = queue.SimpleQueue()  # Bounded by the slots.
      self._slots = threading.Semaphore(depth)
      self._stop = threading.Event()
      self._thread = threading.Thread(
          target=_produce, name=name, daemon=True,  # Never blocks exit.
          args=(self._source, self._place, self._items, self._slots,
                self._stop))
      self._thread.start()

  @property
  def thread(self) -> Optional[threading.Thread]:
    """The reading thread (None with depth 0)."""
    return self._thread

  def __iter__(self) -> "Prefetcher":
    return self

  def __next__(self) -> Any:
    if self._error is not None:   # Every later next() raises it again.
      raise self._error
    if self._closed:
      raise StopIteration
    if self._thread is None:   # depth 0: the consumer's thread does it.
      try:
        return self._place(next(self._source))
      except BaseException as e:
        self._error = e
        raise
    while True:
      try:
        item = self._items.get(timeout=1.0)
        break
      except queue.Empty:
        # The thread always queues a _Failure before it ends on its own;
        # ending without one would be a bug here, not a reason to hang.
        if not self._thread.is_alive() and self._items.empty():
          self._error = RuntimeError("prefetch: the reading thread ended "
                                     "without a batch or an error")
          raise self._error  # pylint: disable=raise-missing-from
    if isinstance(item, _Failure):
      self._error = item.error
      raise self._error
    self._slots.release()   # The consumer took one: read one more.
    return item

  def close(self) -> None:
    """Stops the thread (it reads nothing more), closes the source and
    waits up to `join_timeout_s` for a read in progress to end. Idempotent.
    """
    if self._closed:
      return
    self._closed = True
    if self._thread is None:
      close = getattr(self._source, "close", None)
      if close is not None:
        close()
      return
    self._stop.set()
    self._thread.join(self._join_timeout_s)
    if self._thread.is_alive():   # Stuck inside the source's next().
      logging.warning("prefetch: the reading thread is still inside the "
                      "source after %.0f s; it stops when that read returns",
                      self._join_timeout_s)
    # Drop what was read ahead: device buffers are freed now, not at GC.
    while True:
      try:
        self._items.get_nowait()
      except queue.Empty:
        break

  def __enter__(self) -> "Prefetcher":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __del__(self):
    # A Prefetcher dropped without close(): stop its thread anyway.
    stop = getattr(self, "_stop", None)
    if stop is not None:
      stop.set()


def device_batches(host_batches: Iterable[Mapping[str, np.ndarray]],
                   mesh: sharding.Mesh, keys: Optional[Iterable[str]] = None,
                   depth: int = DEPTH) -> Prefetcher:
  """Host batches -> a Prefetcher of global arrays on `mesh` (`place_batch`).
  """
  keys = None if keys is None else list(keys)
  return Prefetcher(host_batches, lambda b: place_batch(b, mesh, keys),
                    depth=depth, name="prefetch-batches")
