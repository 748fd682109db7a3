"""Training metrics (retro_jax.training.metrics): the logged window's
loss, throughput and MFU, and the console line."""

import io
import math

import pytest

from retro_jax.core import accelerators
from retro_jax.training import metrics


def test_format_duration():
  assert metrics.format_duration(59.6) == "1m00s"
  assert metrics.format_duration(3725) == "1h02m05s"
  assert metrics.format_duration(float("nan")) == "?"


def test_device_peak_flops_override():
  assert accelerators.device_peak_flops(123.0) == 123.0


def test_a_window_is_averaged_and_timed(tmp_path):
  stream = io.StringIO()
  logger = metrics.MetricsLogger(
      str(tmp_path), total_steps=10, tokens_per_step=100, flops_per_step=1e6,
      peak_flops=1e9, num_devices=2, schedule=lambda step: 1e-3,
      stream=stream)
  assert logger.write(1) == {}  # An empty window writes nothing.
  logger.start_timer(0)
  for loss in (1.0, 3.0):
    logger.add({"loss": loss, "grad_norm": loss / 10})
  out = logger.write(2)
  logger.close()
  assert out["loss"] == pytest.approx(2.0)
  assert out["perplexity"] == pytest.approx(math.exp(2.0))
  assert out["bits_per_token"] == pytest.approx(2.0 / math.log(2))
  assert out["grad_norm"] == pytest.approx(0.3)  # The window's last.
  assert out["learning_rate"] == pytest.approx(1e-3)
  assert out["tokens_per_s"] == pytest.approx(100 * out["steps_per_s"])
  # MFU: achieved FLOP/s over the peak of both devices.
  assert out["mfu"] == pytest.approx(out["steps_per_s"] * 1e6 / 2e9)
  line = stream.getvalue()
  assert line.startswith("step      2/10  loss 2.0000") and "MFU" in line
  assert any(p.name.startswith("events.out.tfevents")
             for p in tmp_path.iterdir())
