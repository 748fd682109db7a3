"""Training metrics: throughput, MFU, a progress line with ETA, writers.

Per logged step the loop reports (TensorBoard event files in the workdir via
clu metric writers, and a console line on process 0):

  loss            mean next-token NLL in nats over the logging window
  perplexity      exp(loss)
  bits_per_token  loss / ln 2
  learning_rate   the schedule's rate at that step
  grad_norm       global gradient norm (before clipping)
  steps_per_s     optimizer steps per second over the window
  tokens_per_s    input tokens per second (batch x sequence length)
  mfu             model FLOPs utilisation: analytic train FLOPs per step
                  (`flops.train_flops`) x steps/s over the devices' peak
"""

from __future__ import annotations

import math
import sys
import time
from typing import Dict, Optional

import jax
import numpy as np
from clu import metric_writers

# The devices' peak FLOP/s (the table and the matmul measurement) are in
# core/accelerators.py, which GPU hosts without TensorFlow import too.

def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  h, rest = divmod(seconds, 3600)
  m, s = divmod(rest, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class MetricsLogger:
  """Aggregates per-step metrics over a logging window and writes them."""

  def __init__(self, workdir: str, *, total_steps: int, tokens_per_step: int,
               flops_per_step: float, peak_flops: float, num_devices: int,
               schedule=None, stream=None):
    self.is_chief = jax.process_index() == 0
    self.writer = metric_writers.create_default_writer(
        workdir, just_logging=not self.is_chief, asynchronous=False)
    self.total_steps = total_steps
    self.tokens_per_step = tokens_per_step
    self.flops_per_step = flops_per_step
    self.peak = peak_flops * num_devices
    self.schedule = schedule
    self.stream = stream
    self._window = []
    self._t0: Optional[float] = None
    self._steps0 = 0

  def start_timer(self, step: int) -> None:
    """Starts timing after `step` (e.g. once the first step compiled)."""
    self._t0, self._steps0 = time.perf_counter(), step

  def add(self, metrics: Dict[str, float]) -> None:
    self._window.append(metrics)

  def write(self, step: int) -> Dict[str, float]:
    """Writes the window's summary at `step` and starts a new window."""
    if not self._window:
      return {}
    loss = float(np.mean([m["loss"] for m in self._window]))
    out = {"loss": loss, "perplexity": math.exp(min(loss, 80.0)),
           "bits_per_token": loss / math.log(2),
           "grad_norm": float(self._window[-1]["grad_norm"])}
    if self.schedule is not None:
      out["learning_rate"] = float(self.schedule(step - 1))
    now = time.perf_counter()
    rate = float("nan")
    if self._t0 is not None and step > self._steps0:
      rate = (step - self._steps0) / (now - self._t0)
      out["steps_per_s"] = rate
      out["tokens_per_s"] = rate * self.tokens_per_step
      out["mfu"] = rate * self.flops_per_step / self.peak
      self._t0, self._steps0 = now, step
    self._window = []
    self.writer.write_scalars(step, out)
    if self.is_chief:
      eta = (self.total_steps - step) / rate if rate > 0 else float("nan")
      line = (f"step {step:6d}/{self.total_steps}  loss {loss:.4f}  "
              f"ppl {out['perplexity']:.2f}  bpt {out['bits_per_token']:.3f}  "
              f"lr {out.get('learning_rate', float('nan')):.2e}  "
              f"gnorm {out['grad_norm']:.3f}")
      if "steps_per_s" in out:
        line += (f"  | {rate:.2f} steps/s  {out['tokens_per_s']:,.0f} tok/s  "
                 f"MFU {100 * out['mfu']:.1f}%  ETA {format_duration(eta)}")
      print(line, file=self.stream or sys.stdout, flush=True)
    return out

  def close(self) -> None:
    self.writer.flush()
    self.writer.close()
