"""retro_jax.training.prefetch: batches placed on the devices ahead of the
step by a background thread, in the source's order, with the source's
errors, a thread that is gone after close, and reading that overlaps the
consumer's work. The last test runs the training loop with it: preempted
mid-run, the loop leaves no reading thread behind and records exactly the
rows of the steps it trained."""

import json
import os
import signal
import threading
import time

import jax
import numpy as np
import pytest

from retro_jax.core import sharding
from retro_jax.data import train_sources
from retro_jax.training import loop as loop_lib
from retro_jax.training import prefetch

# conftest.py gives this process 8 simulated CPU devices.
MESH_AXES = {"data": 2, "fsdp": 2, "model": 2}


def host_batches(count, batch=8, seq_len=16, start=0):
  """`count` host batches {"tokens": int32 [b, n], "neighbours": int32
  [b, 1, 2, 4], "loss_mask": int32 [b, n]} whose values name the batch."""
  for i in range(start, start + count):
    tokens = np.arange(batch * seq_len, dtype=np.int32).reshape(
        batch, seq_len) + 1000 * i
    yield {"tokens": tokens,
           "neighbours": np.full((batch, 1, 2, 4), i, np.int32),
           "loss_mask": np.ones((batch, seq_len), np.int32)}


def wait_for(condition, timeout_s=10.0):
  deadline = time.time() + timeout_s
  while not condition():
    assert time.time() < deadline, "timed out"
    time.sleep(0.01)


def prefetch_threads():
  return [t for t in threading.enumerate() if t.name.startswith("prefetch")]


@pytest.fixture(autouse=True)
def no_thread_left():
  yield
  wait_for(lambda: not prefetch_threads())


def test_order_values_and_batch_sharding_on_an_8_device_mesh():
  mesh = sharding.make_mesh(MESH_AXES)
  want = list(host_batches(7))
  with prefetch.device_batches(host_batches(7), mesh) as batches:
    got = list(batches)
  assert len(got) == len(want)
  for g, w in zip(got, want):
    assert g.keys() == w.keys()
    for k in w:
      assert isinstance(g[k], jax.Array)
      assert g[k].sharding == sharding.batch_sharding(mesh, w[k].ndim), k
      assert g[k].sharding.spec[0] == ("data", "fsdp")  # Rows split 4 ways.
      assert len(g[k].addressable_shards) == 8
      np.testing.assert_array_equal(np.asarray(g[k]), w[k])


def test_keys_selects_what_is_placed():
  mesh = sharding.make_mesh({"data": -1})
  with prefetch.device_batches(host_batches(1), mesh,
                               keys=("tokens",)) as batches:
    assert list(next(batches)) == ["tokens"]


def test_depth_bounds_the_read_ahead():
  read = []

  def source():
    for i in range(100):
      read.append(i)
      yield i

  with prefetch.Prefetcher(source(), depth=2) as items:
    wait_for(lambda: len(read) >= 2)
    time.sleep(0.2)
    assert read == [0, 1]             # Two ahead, nothing taken yet.
    assert next(items) == 0
    wait_for(lambda: len(read) >= 3)
    time.sleep(0.2)
    assert read == [0, 1, 2]          # One taken: one more read.


def test_source_error_surfaces_with_its_type_and_message():
  class CorpusBroke(ValueError):
    pass

  def source():
    yield 1
    yield 2
    raise CorpusBroke("corpus.jsonl:3: not JSON")

  with prefetch.Prefetcher(source()) as items:
    assert next(items) == 1
    assert next(items) == 2
    for _ in range(2):   # And again on a later next(), never a hang.
      with pytest.raises(CorpusBroke, match=r"^corpus.jsonl:3: not JSON$"):
        next(items)


def test_a_place_error_surfaces_and_the_end_of_data_is_stop_iteration():
  def place(x):
    if x == 2:
      raise TypeError("cannot place 2")
    return x

  with prefetch.Prefetcher(iter([0, 1, 2]), place) as items:
    assert [next(items), next(items)] == [0, 1]
    with pytest.raises(TypeError, match="cannot place 2"):
      next(items)
  with prefetch.Prefetcher(iter([0, 1])) as items:
    assert list(items) == [0, 1]      # StopIteration ends the loop.
    with pytest.raises(StopIteration):
      next(items)


def test_close_stops_the_thread_and_closes_the_source():
  state = {"read": 0, "closed": False}

  def endless():
    try:
      while True:
        state["read"] += 1
        yield state["read"]
    finally:
      state["closed"] = True

  items = prefetch.Prefetcher(endless(), depth=2)
  assert next(items) == 1
  assert prefetch_threads() == [items.thread]
  items.close()
  assert not items.thread.is_alive()
  assert items.thread not in threading.enumerate()
  assert state["closed"]               # The generator's `finally` ran.
  read = state["read"]
  time.sleep(0.2)
  assert state["read"] == read         # Nothing read after close.
  with pytest.raises(StopIteration):
    next(items)


def test_close_while_the_source_blocks_waits_for_that_read():
  started, release = threading.Event(), threading.Event()

  def slow():
    yield 0
    started.set()
    release.wait(5)
    yield 1

  items = prefetch.Prefetcher(slow(), depth=1, join_timeout_s=0.1)
  assert next(items) == 0
  assert started.wait(5)
  items.close()                        # Gives up waiting after 0.1 s ...
  assert items.thread.is_alive()
  release.set()                        # ... and the thread ends after it.
  items.thread.join(5)
  assert not items.thread.is_alive()


def test_depth_0_reads_in_the_consumers_thread():
  threads = []

  def source():
    for i in range(3):
      threads.append(threading.current_thread())
      yield i

  items = prefetch.Prefetcher(source(), depth=0)
  assert items.thread is None and list(items) == [0, 1, 2]
  assert threads == [threading.current_thread()] * 3


def test_reading_overlaps_the_consumers_work():
  """N batches that each take S to read and S to use: about (N + 1) S with
  reading in the background, 2 N S without."""
  n, s = 8, 0.2

  def slow_source():
    for batch in host_batches(n):
      time.sleep(s)
      yield batch

  mesh = sharding.make_mesh({"data": -1})
  start = time.perf_counter()
  with prefetch.device_batches(slow_source(), mesh) as batches:
    for _ in range(n):
      next(batches)
      time.sleep(s)                    # The step.
  took = time.perf_counter() - start
  assert took < 0.75 * 2 * n * s, took  # Measured: about (n + 1) s.


@pytest.mark.slow
def test_preempted_loop_leaves_no_thread_and_records_trained_rows(tmp_path):
  from test_trainer import tiny_config  # pylint: disable=g-import-not-at-top
  config = tiny_config(steps=50)
  config.data.record_rows = True
  base = train_sources.make_source(config)

  def source(start):
    for i, batch in enumerate(base(start)):
      if start + i == 3:   # SIGTERM while batch 3 is read (ahead).
        os.kill(os.getpid(), signal.SIGTERM)
      yield batch

  summary = loop_lib.train(config, str(tmp_path), source=source,
                           devices=jax.devices()[:1])
  assert summary["status"] == "preempted"
  # Read ahead by up to 2 batches, so the stop comes 1 to 4 steps in.
  assert 1 <= summary["step"] <= 4
  assert not prefetch_threads()
  with open(loop_lib.rows_path(str(tmp_path), 0), encoding="utf-8") as f:
    lines = [json.loads(line) for line in f]
  # One line per trained step, none for the batches read ahead.
  assert [line["step"] for line in lines] == list(range(summary["step"]))
  want = [train_sources.rows_record(s, b)
          for s, b in zip(range(summary["step"]), base(0))]
  assert lines == want
