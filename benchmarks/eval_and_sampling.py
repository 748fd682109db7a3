r"""Evaluation and sampling speed on the bench preset (CPU figures).

  python benchmarks/eval_and_sampling.py [--config=configs/bench.py] \
      [--tokens=512]

1. Evaluation tokens/s: the jitted scoring forward (per-token NLL) on
   batches of the bench shape (2 x 512 tokens, k=2, r=128), retrieval on;
   and the whole `evaluate_batches` (retrieval on + off + leakage r(C)).
2. Sampling tokens/s at --tokens generated tokens (1-token prompt, greedy,
   retrieval at every chunk boundary), KV cache vs. no cache.
   * cached: the whole generation is timed (after one untimed warm-up
     generation that compiles both step variants);
   * uncached: every step re-runs the full forward on the prefix padded to
     the next multiple of 64, so a step costs what a forward of that length
     costs. Running all 512 steps would take minutes on 2 cores: each padded
     length (64, 128, ..., 576) is compiled, then timed (median of
     --repeats), and the total is the sum over the 512 steps of the time of
     their length: an extrapolation from measured forwards, not a full run.
   The retrieval function returns deterministic pseudo-random neighbours
   (no DB), so both figures are model time; BERT + search per chunk come on
   top, once per 64 tokens, equally for both.
Parameters are random (speed does not depend on training).
"""

import statistics
import time

from absl import app
from absl import flags
from ml_collections import config_flags

from retro_jax.core import cli
import jax
import jax.numpy as jnp
import numpy as np

import retro_jax
from retro_jax.evaluation import scores
from retro_jax.inference import sampling

_CONFIG = config_flags.DEFINE_config_file("config", "configs/bench.py",
                                          "Benchmark config (bench preset).")
_TOKENS = flags.DEFINE_integer("tokens", 512, "Tokens to generate.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats (median).")
_EVAL_BATCHES = flags.DEFINE_integer("eval_batches", 3, "Timed eval batches.")


def median_time(fn, repeats):
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main(argv):
  del argv
  config = _CONFIG.value
  cfg = retro_jax.RetroConfig.from_dict(config.model)
  b, n = config.train.batch_size, config.train.seq_len
  m, k, r = cfg.chunk_size, cfg.num_neighbours, cfg.neighbour_len
  model = retro_jax.Retro(cfg)
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, cfg.vocab_size, (b, n)).astype(np.int32)
  nbs = rng.integers(1, cfg.vocab_size, (b, n // m, k, r)).astype(np.int32)
  params = model.init(jax.random.key(0), tokens, nbs)
  print(f"bench preset: {retro_jax.count_params(params):,} parameters, "
        f"batch {b} x {n} tokens, k={k}, r={r}, {jax.device_count()} "
        f"{jax.devices()[0].platform} device(s)", flush=True)

  # -- 1. evaluation --------------------------------------------------------------
  token_nll = scores.make_token_nll(model)
  jax.block_until_ready(token_nll(params, tokens, nbs))
  jax.block_until_ready(token_nll(params, tokens, None))
  t = median_time(lambda: token_nll(params, tokens, nbs), _REPEATS.value)
  print(f"eval forward (retrieval on): {b * n / t:,.0f} tokens/s "
        f"({t * 1e3:.0f} ms per {b}x{n} batch)", flush=True)
  table = np.ones(cfg.vocab_size, np.int64)
  batches = [{"tokens": tokens, "neighbours": nbs}] * _EVAL_BATCHES.value
  t0 = time.perf_counter()
  scores.evaluate_batches(model, params, batches, table,
                            token_nll=token_nll)
  t = time.perf_counter() - t0
  print(f"evaluate_batches (on + off + leakage): "
        f"{len(batches) * b * n / t:,.0f} tokens/s", flush=True)

  # -- 2. sampling ----------------------------------------------------------------
  g = _TOKENS.value

  def retrieve(chunks):
    out = np.zeros((chunks.shape[0], k, r), np.int32)
    for i, row in enumerate(chunks):
      out[i] = np.random.default_rng(int(row.sum())).integers(
          1, cfg.vocab_size, (k, r))
    return out

  sampler = sampling.Sampler(model)
  prompt = np.asarray([[7]], np.int32)
  sampler.generate(params, prompt, g, retrieve)  # Compiles.
  cached = [sampler.generate(params, prompt, g, retrieve)
            for _ in range(_REPEATS.value)]
  t_cached = statistics.median(c.seconds for c in cached)
  print(f"sampling with KV cache: {g / t_cached:,.1f} tokens/s "
        f"({g} tokens in {t_cached:.2f} s)", flush=True)

  total = 1 + g
  seq = cached[0].tokens  # The tokens the cached run generated.
  per_length = {}
  for length in range(m, -(-total // m) * m + 1, m):
    prefix = np.zeros((1, length), np.int32)
    upto = min(length, total)
    prefix[:, :upto] = seq[:, :upto]
    nb = np.zeros((1, length // m, k, r), np.int32)
    for u, chunk_nb in enumerate(cached[0].neighbours[:length // m]):
      nb[:, u] = chunk_nb
    pos = jnp.int32(upto - 1)
    args = (params, jnp.asarray(prefix), jnp.asarray(nb), pos,
            jax.random.key(0), 0.0, 0, 1.0)
    jax.block_until_ready(sampler.full_step(*args))
    per_length[length] = median_time(
        lambda a=args: sampler.full_step(*a), _REPEATS.value)
  # Step t (feeding positions 0..t) runs at the padded length of t + 1.
  t_full = sum(per_length[-(-(pos + 1) // m) * m] for pos in range(g))
  print("uncached step time by padded prefix length: " + ", ".join(
      f"{length}: {s * 1e3:.0f} ms" for length, s in per_length.items()))
  print(f"sampling without cache (full re-forward per token, extrapolated "
        f"from the measured step times above): {g / t_full:,.2f} tokens/s "
        f"({g} tokens in {t_full:.1f} s)")
  print(f"KV cache speed-up at {g} generated tokens: {t_full / t_cached:.1f}x")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
