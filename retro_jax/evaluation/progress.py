"""Progress lines of a long evaluation, on stderr (results go to stdout).

A whole corpus can take hours; every `every_s` seconds one plain line says
how far the set has got: documents and MB of text read, batches scored,
and the rate. Plain lines (no carriage returns) read well in log files.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, Optional, TextIO

from retro_jax.evaluation import stream


class Progress:
  """Prints "<set>: N documents, X MB of text read, B batches scored" lines.

  Args:
    name: the set being scored.
    read: () -> the `stream.DocumentStats` of what was read so far.
    every_s: seconds between lines (0: never).
    out: where lines go (default stderr).
  """

  def __init__(self, name: str, read: Callable[[], stream.DocumentStats],
               every_s: float = 10.0, out: Optional[TextIO] = None,
               clock: Callable[[], float] = time.monotonic):
    self.name, self.read, self.every_s = name, read, every_s
    self.out = out or sys.stderr
    self.clock = clock
    self.start = self.last = clock()
    self.batches = 0

  def line(self) -> str:
    done = self.read()
    seconds = max(self.clock() - self.start, 1e-9)
    return (f"{self.name}: {done.documents} documents, "
            f"{done.text_bytes / 1e6:.2f} MB of text read, {self.batches} "
            f"batches scored, {seconds:.0f} s "
            f"({done.text_bytes / 1e3 / seconds:.1f} kB/s)")

  def __call__(self, batches: int) -> None:
    """Called after each scored batch with the batches scored so far."""
    self.batches = batches
    now = self.clock()
    if self.every_s and now - self.last >= self.every_s:
      self.last = now
      print(self.line(), file=self.out, flush=True)

  def done(self) -> None:
    if self.every_s:
      print(self.line() + " (done)", file=self.out, flush=True)
