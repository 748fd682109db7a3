r"""Checks the model on an accelerator, then times it: one script for a GPU
host's limited time (sized to finish within 8 minutes on one H100/H200 with
the defaults; not yet timed on one).

  python scripts/gpu_check.py [--batches=/data/batches_2048.npz]
      [--check_preset=bench] [--benchmark=false] [benchmark flags]

Checks, each on the default device (the accelerator), with bf16 compute and
attention "auto" (cuDNN flash attention on an NVIDIA GPU):
  1. causality: changing token t changes no logit before t; changing chunk
     u's neighbours changes no logit before position (u + 1) m - 1;
  2. the fused attention path (cuDNN on NVIDIA GPUs, XLA elsewhere) against
     the reference one: logits and parameter gradients;
  3. one train step on a 1-device mesh against the same step on the host
     CPU: loss, gradient norm and the parameter update.
Then (--benchmark, default on) benchmarks/accelerator.py's timing of the
172m and 425m presets with its fixed warm-up and timed steps. Exits 1 if a
check fails (after running all of them). Imports neither TensorFlow, seqio,
ScaNN nor Beam.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))   # The repository root: benchmarks/ is beside retro_jax/.

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import retro_jax
from benchmarks import accelerator
from retro_jax.core import accelerators
from retro_jax.core import cli
from retro_jax.core import sharding
from retro_jax.data import train_sources
from retro_jax.model import fused_attention
from retro_jax.training import step as step_lib

_PRESET = flags.DEFINE_string("check_preset", "bench", "Preset the checks "
                              "run (bf16): bench has the paper's head width "
                              "64; tiny is for CPU tests.")
_CHECK_SEQ = flags.DEFINE_integer("check_seq_len", 512, "Tokens per "
                                  "sequence in the checks.")
_BENCHMARK = flags.DEFINE_bool("benchmark", True, "Then time the presets "
                               "(benchmarks/accelerator.py's flags).")

# bf16 keeps 8 bits of mantissa (relative rounding 2^-9 = 0.2%); sums over
# hundreds of terms in another order differ by a few of those.
LOGITS_RTOL = 2e-2     # max |a - b| / max |b| of logits.
GRADS_RTOL = 5e-2      # ||a - b|| / ||b|| of all gradients together.
UPDATE_COSINE = 0.95   # Adam's first update: sign(g) where |g| >> eps.
# Positions that must not see a change: rows of a batch never interact, so
# anything above rounding noise (here 1e-5 of the logits' scale; a leak
# moves them by percent) is information from the future.
CAUSAL_RTOL = 1e-5


def relative(a, b) -> float:
  """||a - b|| / ||b|| over every leaf of two trees, in float32."""
  num = den = 0.0
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
    num += float(np.sum((x - y) ** 2))
    den += float(np.sum(y ** 2))
  return (num / max(den, 1e-30)) ** 0.5


def config(attention: str) -> retro_jax.RetroConfig:
  return retro_jax.RetroConfig.preset(
      _PRESET.value, compute_dtype="bfloat16", attention=attention)


def inputs(cfg, batch: int, seq_len: int, seed: int = 0):
  return train_sources.synthetic_batch(cfg, batch, seq_len, seed=seed, step=0)


class Checks:
  """Runs checks, records (name, passed, detail) and prints each."""

  def __init__(self):
    self.results = []

  def record(self, name: str, passed: bool, detail: str) -> None:
    self.results.append((name, passed, detail))
    print(f"{'PASS' if passed else 'FAIL'} {name}: {detail}", flush=True)


def check_causality(checks: Checks, cfg, params, batch) -> None:
  model = retro_jax.Retro(cfg)
  apply = jax.jit(model.apply)
  tokens, nbs = batch["tokens"][:1], batch["neighbours"][:1]
  m, n = cfg.chunk_size, tokens.shape[1]
  ts = [1, m - 1, m, n // 2 + 5, n - 1]
  rows = [tokens[0]]
  for t in ts:
    row = tokens[0].copy()
    row[t] = row[t] % (cfg.vocab_size - 1) + 1
    rows.append(row)
  logits = np.asarray(apply(params, np.stack(rows),
                            np.repeat(nbs, len(rows), 0)), np.float32)
  worst_before, least_at = 0.0, np.inf
  for i, t in enumerate(ts, start=1):
    worst_before = max(worst_before,
                       float(np.abs(logits[i, :t] - logits[0, :t]).max(
                           initial=0.0)))
    least_at = min(least_at, float(np.abs(logits[i, t] - logits[0, t]).max()))
  tol = CAUSAL_RTOL * float(np.abs(logits[0]).max())
  checks.record("causal in tokens", worst_before <= tol and least_at > tol,
                f"max change before the changed token {worst_before:.3g} "
                f"(at most {tol:.2g}), least change at it {least_at:.3g}")
  u = 1
  other = nbs.copy()
  other[:, u] = np.roll(other[:, u], 17, axis=-1)
  logits = np.asarray(apply(params, np.repeat(tokens, 2, 0),
                            np.concatenate([nbs, other])), np.float32)
  first = (u + 1) * m - 1
  before = float(np.abs(logits[1, :first] - logits[0, :first]).max())
  after = float(np.abs(logits[1, first] - logits[0, first]).max())
  tol = CAUSAL_RTOL * float(np.abs(logits[0]).max())
  checks.record("causal in neighbours", before <= tol and after > tol,
                f"chunk {u}'s neighbours: max change before position "
                f"{first} {before:.3g} (at most {tol:.2g}), at it "
                f"{after:.3g}")


def check_fused_against_reference(checks: Checks, params, batch) -> None:
  fused = "cudnn" if accelerators.is_nvidia_gpu() else "xla"
  out = {}
  for attention in (fused, "reference"):
    model = retro_jax.Retro(config(attention))

    def loss(p, model=model):
      return step_lib.loss_fn(model, p, batch)[0]
    logits = jax.jit(model.apply)(params, batch["tokens"], batch["neighbours"])
    out[attention] = (np.asarray(logits, np.float32),
                      jax.jit(jax.grad(loss))(params))
  (lf, gf), (lr, gr) = out[fused], out["reference"]
  err = float(np.abs(lf - lr).max() / np.abs(lr).max())
  checks.record(f"{fused} attention: logits", err <= LOGITS_RTOL,
                f"max |diff| / max |reference| = {err:.3g} "
                f"(tolerance {LOGITS_RTOL})")
  err = relative(gf, gr)
  checks.record(f"{fused} attention: gradients", err <= GRADS_RTOL,
                f"||diff|| / ||reference|| = {err:.3g} "
                f"(tolerance {GRADS_RTOL})")


def one_step(device, cfg, params, batch):
  """The project's jitted train step on a 1-device mesh of `device`."""
  model = retro_jax.Retro(cfg)
  # Constant rate, no weight decay: the update is the gradients' alone.
  optimizer = step_lib.make_optimizer(1e-3, 0, 0, weight_decay=0.0)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "model": 1}, [device])
  on_device = sharding.global_batch(batch, mesh)
  _, state_sh, _ = step_lib.state_shardings(model, optimizer, mesh, on_device)
  with jax.set_mesh(mesh):
    state = step_lib.TrainState(
        jax.device_put(params, state_sh.params),
        jax.device_put(optimizer.init(params), state_sh.opt_state),
        jax.device_put(jnp.zeros((), jnp.int32), state_sh.step))
    step = step_lib.jit_train_step(model, optimizer, mesh, state_sh,
                                   on_device)
    state, metrics = step(state, on_device)
  return (jax.device_get(state.params),
          {k: float(v) for k, v in metrics.items()})


def check_step_against_cpu(checks: Checks, cfg, params, batch) -> None:
  accel = jax.devices()[0]
  cpu = jax.devices("cpu")[0]
  p_acc, m_acc = one_step(accel, cfg, params, batch)
  p_cpu, m_cpu = one_step(cpu, cfg.replace(attention="reference"), params,
                          batch)
  loss_err = abs(m_acc["loss"] - m_cpu["loss"]) / abs(m_cpu["loss"])
  norm_err = (abs(m_acc["grad_norm"] - m_cpu["grad_norm"])
              / m_cpu["grad_norm"])
  before = jax.tree_util.tree_leaves(params)
  d_acc = np.concatenate([np.ravel(np.asarray(a, np.float32) - b) for a, b in
                          zip(jax.tree_util.tree_leaves(p_acc), before)])
  d_cpu = np.concatenate([np.ravel(np.asarray(a, np.float32) - b) for a, b in
                          zip(jax.tree_util.tree_leaves(p_cpu), before)])
  cosine = float(d_acc @ d_cpu / (np.linalg.norm(d_acc) *
                                  np.linalg.norm(d_cpu) + 1e-30))
  passed = (loss_err <= 1e-2 and norm_err <= GRADS_RTOL
            and cosine >= UPDATE_COSINE)
  checks.record(
      f"train step on {accel.platform} vs cpu", passed,
      f"loss {m_acc['loss']:.5f} vs {m_cpu['loss']:.5f} (rel "
      f"{loss_err:.2g}), grad norm rel {norm_err:.2g}, update cosine "
      f"{cosine:.4f} (>= {UPDATE_COSINE})")


def main(argv):
  del argv
  t0 = time.perf_counter()
  device = jax.devices()[0]
  cfg = config("auto")
  path = fused_attention.resolve_config(cfg)
  print(f"{device.device_kind} ({device.platform}), jax {jax.__version__}; "
        f"checks on the {_PRESET.value} preset in bf16, attention 'auto' -> "
        f"{path}", flush=True)
  if device.platform == "cpu":
    print("note: no accelerator found (set JAX_PLATFORMS=cuda to insist on "
          "one): the checks compare the CPU with itself", flush=True)
  batch = inputs(cfg, 2, _CHECK_SEQ.value)
  model = retro_jax.Retro(cfg)
  params = jax.device_get(jax.jit(model.init)(
      jax.random.key(0), batch["tokens"], batch["neighbours"]))
  checks = Checks()
  for name, check in (
      ("causality", lambda: check_causality(checks, cfg, params, batch)),
      ("fused attention", lambda: check_fused_against_reference(
          checks, params, batch)),
      ("train step", lambda: check_step_against_cpu(checks, cfg, params,
                                                    batch))):
    try:
      check()
    except Exception as e:  # pylint: disable=broad-except
      # A check that cannot run (a kernel the GPU refuses, say) fails, and
      # the others and the benchmark still run.
      checks.record(name, False,
                    f"raised {accelerator.short_error(e)}")
  failed = [name for name, passed, _ in checks.results if not passed]
  print(f"checks: {len(checks.results) - len(failed)} passed, "
        f"{len(failed)} failed in {time.perf_counter() - t0:.0f} s",
        flush=True)
  if _BENCHMARK.value:
    accelerator.main([])
  print(f"total {time.perf_counter() - t0:.0f} s", flush=True)
  if failed:
    cli.fail(f"failed checks: {', '.join(failed)}")


if __name__ == "__main__":
  cli.run(main)
