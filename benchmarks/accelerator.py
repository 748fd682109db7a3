r"""Training and sampling speed of the paper's presets on one accelerator.

  python benchmarks/accelerator.py --presets=172m,425m \
      --batches=/data/batches_2048.npz [--profile_dir=/tmp/trace]

For each preset (bf16 compute, the batch size and remat policy of `RUNS`,
sequences of --seq_len tokens, attention path "auto": cuDNN flash attention
on NVIDIA GPUs) it reports:
  * step time and tokens/s of the jitted, donated train step, fed a batch
    already on the device (synthetic input: no input cost at all) and fed the
    real batches of an exported numpy shard of the cached seqio Task
    (scripts/export_batches.py) through the double-buffered device prefetch
    the training loop uses, and the ratio of the two;
  * MFU against the chip's datasheet bf16 peak (core/accelerators.py) and
    against a bf16 matmul peak measured in this run;
  * peak device memory (the allocator's high-water mark: cumulative over the
    presets of this run, so run one preset per process for a clean figure);
  * the KV-cached sampling rate (greedy, retrieval at every chunk boundary
    from fixed random neighbours: model time, no DB).
Prints one line per measurement to stderr and one JSON line last on stdout.
Imports neither TensorFlow, seqio, ScaNN nor Beam: GPU hosts may lack them.
Warm-up and measured steps are fixed flags, the same for every preset.
"""

import json
import sys
import time

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import retro_jax
from retro_jax.core import accelerators
from retro_jax.core import cli
from retro_jax.core import sharding
from retro_jax.data import numpy_shard
from retro_jax.data import train_sources
from retro_jax.inference import sampling
from retro_jax.model import flops
from retro_jax.model import fused_attention
from retro_jax.training import prefetch
from retro_jax.training import step as step_lib

# Per preset: the global batch (sequences) and the remat policy, sized for
# one 141 GB H200 from scripts/memory_plan.py's estimate of the reference
# attention path (172m, no remat: 101 GiB at batch 16; 425m: 106 GiB without
# remat, too close to the limit once XLA's temporaries come on top, 73 GiB
# with "dots"). Flash attention keeps no score matrices, so both need less.
# On an 80 GB GPU halve the batch (--batch_size). "tiny" is for CPU tests.
RUNS = {
    "tiny": dict(batch_size=2, remat="none"),
    "bench": dict(batch_size=4, remat="none"),
    "172m": dict(batch_size=16, remat="none"),
    "425m": dict(batch_size=16, remat="dots"),
}

_PRESETS = flags.DEFINE_list("presets", ["172m", "425m"],
                             f"Presets to time, of {sorted(RUNS)}.")
_SEQ = flags.DEFINE_integer("seq_len", 2048, "Tokens per sequence.")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Global batch; 0 = RUNS'.")
_REMAT = flags.DEFINE_string("remat", "", "none | dots | full; '' = RUNS'.")
_ATTENTION = flags.DEFINE_string("attention", "auto", "auto | reference | "
                                 "xla | cudnn (RetroConfig.attention).")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps (the first "
                               "compiles).")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per input kind.")
_BATCHES = flags.DEFINE_string("batches", "", "Numpy shard of real batches "
                               "(scripts/export_batches.py); '' = synthetic "
                               "input only.")
_SAMPLE_TOKENS = flags.DEFINE_integer("sample_tokens", 256, "Tokens to "
                                      "generate for the sampling rate; 0 = "
                                      "skip.")
_SAMPLE_BATCH = flags.DEFINE_integer("sample_batch", 1, "Sequences sampled "
                                     "at once.")
_MATMUL_N = flags.DEFINE_integer("matmul_n", 0, "Size of the bf16 matmul "
                                 "peak measurement; 0 = 8192 on "
                                 "accelerators, 1024 on CPU.")
_PROFILE = flags.DEFINE_string("profile_dir", "", "Write a jax.profiler "
                               "trace of 3 synthetic steps per preset here.")


def log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def short_error(error: BaseException) -> str:
  """An exception as one line: its type and the first line of its message
  (XLA's out-of-memory errors run to pages)."""
  lines = str(error).strip().splitlines()
  return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


def preset_config(name: str, remat: str, attention: str
                  ) -> retro_jax.RetroConfig:
  return retro_jax.RetroConfig.preset(
      name, compute_dtype="bfloat16", remat=remat, scan_layers=True,
      attention=attention)


def real_batches(path: str, cfg, batch: int, seq_len: int):
  """The shard's rows regrouped into batches of `batch` rows; checks that
  they fit the preset (sequence length, k, r, vocabulary)."""
  meta, shard = numpy_shard.read(path)
  rows = {k: np.concatenate([b[k] for b in shard]) for k in shard[0]}
  want = {"tokens": (seq_len,), "neighbours": (
      seq_len // cfg.chunk_size, cfg.num_neighbours, cfg.neighbour_len)}
  for key, shape in want.items():
    if key not in rows or rows[key].shape[1:] != shape:
      got = rows[key].shape[1:] if key in rows else "missing"
      raise cli.BadInput(f"{path}: field {key!r} has rows of shape {got}, "
                         f"the preset needs {shape} (export the shard with "
                         f"seq_len={seq_len}, k={cfg.num_neighbours}, "
                         f"r={cfg.neighbour_len})")
  if rows["tokens"].max() >= cfg.vocab_size:
    raise cli.BadInput(f"{path}: field 'tokens' holds id "
                       f"{rows['tokens'].max()} >= the preset's vocabulary "
                       f"{cfg.vocab_size}")
  rows.setdefault("loss_mask", np.ones_like(rows["tokens"]))
  n = len(rows["tokens"]) // batch
  if n == 0:
    raise cli.BadInput(f"{path}: {len(rows['tokens'])} rows, fewer than one "
                       f"batch of {batch}")
  log(f"  real input: {n} batches of {batch} from {path} "
      f"({meta.get('task_name', '?')}, split {meta.get('split', '?')})")
  return [{k: v[i * batch:(i + 1) * batch] for k, v in rows.items()}
          for i in range(n)]


def timed_steps(step, state, batches, count: int):
  """Runs `count` steps back to back (dispatch is asynchronous) and blocks
  once at the end: seconds per step as the device sees it, host gaps
  included. Returns (state, seconds per step, last loss)."""
  t0 = time.perf_counter()
  metrics = None
  for _ in range(count):
    state, metrics = step(state, next(batches))
  loss = float(metrics["loss"])       # Blocks on the last step.
  return state, (time.perf_counter() - t0) / count, loss


def forever(batch):
  while True:
    yield batch


def bench_train(name: str, batch: int, seq_len: int, remat: str,
                attention: str, peaks: dict, shard: str) -> dict:
  cfg = preset_config(name, remat, attention)
  rows = real_batches(shard, cfg, batch, seq_len) if shard else None
  model = retro_jax.Retro(cfg)
  optimizer = step_lib.make_optimizer(2e-4, 100, 10_000)
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "model": 1})
  host = train_sources.synthetic_batch(cfg, batch, seq_len, seed=0, step=0)
  device_batch = sharding.global_batch(host, mesh)
  _, state_sh, _ = step_lib.state_shardings(model, optimizer, mesh,
                                            device_batch)
  with jax.set_mesh(mesh):
    state = step_lib.init_sharded_state(model, optimizer, state_sh,
                                        jax.random.key(0), device_batch)
    step = step_lib.jit_train_step(model, optimizer, mesh, state_sh,
                                   device_batch)
    t0 = time.perf_counter()
    state, _, _ = timed_steps(step, state, forever(device_batch),
                              _WARMUP.value)
    warm_s = time.perf_counter() - t0
    state, synthetic_s, loss = timed_steps(step, state, forever(device_batch),
                                           _STEPS.value)
    real_s = None
    if rows:
      feed = prefetch.device_batches(
          (rows[i % len(rows)] for i in range(10 ** 9)), mesh)
      try:
        state, _, _ = timed_steps(step, state, feed, 1)  # Fill the buffer.
        state, real_s, _ = timed_steps(step, state, feed, _STEPS.value)
      finally:
        feed.close()
    if _PROFILE.value:
      jax.profiler.start_trace(f"{_PROFILE.value}/{name}")
      state, _, _ = timed_steps(step, state, forever(device_batch), 3)
      jax.profiler.stop_trace()
  model_flops = flops.train_flops(cfg, batch, seq_len)["total"]
  devices = jax.device_count()
  tokens = batch * seq_len
  out = {
      "preset": name, "params": retro_jax.count_params(state.params),
      "batch_size": batch, "seq_len": seq_len, "remat": remat,
      "attention": fused_attention.resolve_config(cfg),
      "warmup_steps": _WARMUP.value, "timed_steps": _STEPS.value,
      "warmup_s": warm_s, "step_s": synthetic_s,
      "tokens_per_s": tokens / synthetic_s, "loss": loss,
      "model_flops_per_step": model_flops,
      "real_input_step_s": real_s,
      "real_over_synthetic": real_s / synthetic_s if real_s else None,
      "peak_memory_gib": (accelerators.peak_memory_bytes() or 0) / 2 ** 30
                         or None,
  }
  for kind, peak in peaks.items():
    out[f"mfu_{kind}"] = (model_flops / synthetic_s / (peak * devices)
                          if peak else None)
  log(f"{name}: batch {batch} x {seq_len}, remat {remat}, attention "
      f"{out['attention']}: {synthetic_s * 1e3:.1f} ms/step, "
      f"{out['tokens_per_s']:,.0f} tokens/s, MFU "
      + ", ".join(f"{v:.1%} of the {k[4:].replace('_', ' ')} peak"
                  for k, v in out.items()
                  if k.startswith("mfu_") and v is not None)
      + (f"; real input {real_s * 1e3:.1f} ms/step "
         f"({out['real_over_synthetic']:.3f}x)" if real_s else ""))
  return out


def bench_sampling(name: str, attention: str, tokens: int, batch: int
                   ) -> dict:
  """KV-cached greedy generation with random parameters."""
  cfg = preset_config(name, "none", attention)
  model = retro_jax.Retro(cfg)
  m, k, r = cfg.chunk_size, cfg.num_neighbours, cfg.neighbour_len
  rng = np.random.default_rng(1)
  params = jax.jit(model.init)(
      jax.random.key(0), jnp.ones((1, m), jnp.int32),
      jnp.ones((1, 1, k, r), jnp.int32))
  fixed = rng.integers(1, cfg.vocab_size, (batch, k, r)).astype(np.int32)
  sampler = sampling.Sampler(model)
  prompt = np.full((batch, 1), 7, np.int32)
  sampler.generate(params, prompt, min(tokens, 2 * m),
                   lambda chunks: fixed)               # Compiles.
  run = sampler.generate(params, prompt, tokens, lambda chunks: fixed)
  rate = batch * tokens / run.seconds
  log(f"{name}: KV-cached sampling {rate:,.1f} tokens/s ({batch} x {tokens} "
      f"tokens in {run.seconds:.2f} s)")
  return {"preset": name, "sample_batch": batch, "sample_tokens": tokens,
          "sample_tokens_per_s": rate}


def main(argv):
  del argv
  unknown = [p for p in _PRESETS.value if p not in RUNS]
  if unknown:
    raise cli.BadInput(f"--presets: unknown {unknown}; known {sorted(RUNS)}")
  device = jax.devices()[0]
  on_accelerator = device.platform != "cpu"
  n = _MATMUL_N.value or (8192 if on_accelerator else 1024)
  measured = accelerators.matmul_peak_flops(n, dtype=jnp.bfloat16)
  peaks = {"datasheet": accelerators.datasheet_peak_flops(),
           "measured_matmul": measured}
  sheet = peaks["datasheet"]
  log(f"{jax.device_count()} x {device.device_kind} ({device.platform}), jax "
      f"{jax.__version__}: bf16 matmul {n}^3 {measured / 1e12:.3g} TFLOP/s, "
      f"datasheet " + (f"{sheet / 1e12:.0f} TFLOP/s" if sheet else
                       "peak unknown for this device kind"))
  results = []
  for name in _PRESETS.value:
    run = RUNS[name]
    batch = _BATCH.value or run["batch_size"]
    try:
      row = bench_train(name, batch, _SEQ.value, _REMAT.value or run["remat"],
                        _ATTENTION.value, peaks, _BATCHES.value)
      if _SAMPLE_TOKENS.value:
        row.update(bench_sampling(name, _ATTENTION.value,
                                  _SAMPLE_TOKENS.value, _SAMPLE_BATCH.value))
    except cli.BadInput:
      raise
    except Exception as e:  # pylint: disable=broad-except
      # One preset out of memory (say) must not cost the others' figures on
      # a host lent for minutes: the error is reported in its row instead.
      message = short_error(e)
      log(f"{name}: failed: {message}")
      row = {"preset": name, "batch_size": batch, "error": message}
    results.append(row)
  print(json.dumps({"device": device.device_kind,
                    "devices": jax.device_count(),
                    "jax": jax.__version__,
                    "datasheet_bf16_flops": peaks["datasheet"],
                    "measured_bf16_matmul_flops": measured,
                    "presets": results}), flush=True)
  failed = [row["preset"] for row in results if "error" in row]
  if failed:
    cli.fail(f"presets that failed: {', '.join(failed)} (their rows say why)")


if __name__ == "__main__":
  cli.run(main)
