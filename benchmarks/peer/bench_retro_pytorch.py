r"""Times retro-pytorch's RETRO training step on the shared `bench` config.

Runs in the peer's own environment (benchmarks/peer/setup.sh), never the
project's:

  PY=$(bash benchmarks/peer/setup.sh | tail -n1)
  $PY benchmarks/peer/bench_retro_pytorch.py [--threads N] [--warmup 2]
      [--steps 5] [--peak-gflops X]

The model is lucidrains' retro-pytorch 0.3.9 built for configs/bench.py:
vocab 8192, 512 tokens (8 chunks of 64), batch 2, k=2 neighbours of 128
tokens, decoder 512 wide x 6 layers with chunked cross-attention in layers 3
and 6 (retro-pytorch counts from 1), encoder 512 x 2 layers, 8 heads of 64,
feed-forward x4, no dropout. A step is forward(seq, retrieved,
return_loss=True), backward, then torch.optim.AdamW(lr=1e-4) with torch's
defaults, on random token ids from 1..8191 (0 is the pad id, which
retro-pytorch masks in the neighbours).

Per-step times go to stderr; the last stdout line is one JSON object: impl,
params, tokens_per_step, step_s_median, step_s_min, step_s_all, tokens_per_s,
threads, train_flops_per_step (forward + backward, counted by torch's
FlopCounterMode on the first warm-up step), achieved_gflops, losses, versions;
with --peak-gflops also mfu_median.
"""

import argparse
import json
import os
import statistics
import sys
import time

# The shared `bench` configuration (configs/bench.py on the JAX side).
VOCAB = 8192
SEQ_LEN = 512
BATCH = 2
CHUNK = 64
NEIGHBOURS = 2
NEIGHBOUR_LEN = 128          # A neighbour chunk and its continuation.
DIM = 512
DEC_DEPTH = 6
CCA_LAYERS = (3, 6)          # 1-based, as retro-pytorch counts.
ENC_DEPTH = 2
DIM_HEAD = 64                # 8 heads: retro-pytorch's default, not a knob.
LEARNING_RATE = 1e-4


def parse_args(argv=None):
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n", maxsplit=1)[0])
  parser.add_argument("--threads", type=int, default=0,
                      help="torch threads, and the process pinned to that "
                      "many cores (0 = torch's default, unpinned)")
  parser.add_argument("--warmup", type=int, default=2,
                      help="untimed steps (at least 1: the first counts FLOPs)")
  parser.add_argument("--steps", type=int, default=5,
                      help="timed steps; the median is reported")
  parser.add_argument("--peak-gflops", type=float, default=0.0,
                      help="float32 matmul peak (matmul_peak_torch.py) for "
                      "mfu_median; 0 = leave it out")
  parser.add_argument("--seed", type=int, default=0)
  return parser.parse_args(argv)


def log(msg):
  print(msg, file=sys.stderr, flush=True)


def pin_threads(threads: int):
  """Pins to the first `threads` cores, as benchmarks/train_step.py pins
  itself, so both sides run on the same cores."""
  if threads > 0:
    cpus = sorted(os.sched_getaffinity(0))[:threads]
    os.sched_setaffinity(0, cpus)


def main(argv=None):
  args = parse_args(argv)
  pin_threads(args.threads)
  # Imported after the flags, so --help works without torch.
  # pylint: disable=g-import-not-at-top
  import importlib.metadata
  import torch
  from torch.utils import flop_counter
  import retro_pytorch

  if args.threads > 0:
    torch.set_num_threads(args.threads)
  torch.manual_seed(args.seed)
  model = retro_pytorch.RETRO(
      num_tokens=VOCAB, max_seq_len=SEQ_LEN, chunk_size=CHUNK,
      enc_dim=DIM, enc_depth=ENC_DEPTH, dec_dim=DIM, dec_depth=DEC_DEPTH,
      dec_cross_attn_layers=CCA_LAYERS, dim_head=DIM_HEAD,
      enc_attn_dropout=0.0, enc_ff_dropout=0.0,
      dec_attn_dropout=0.0, dec_ff_dropout=0.0)
  model.train()   # return_loss needs training mode.
  optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
  params = sum(p.numel() for p in model.parameters())

  # One token more than the sequence: retro-pytorch shifts it into labels.
  seq = torch.randint(1, VOCAB, (BATCH, SEQ_LEN + 1))
  retrieved = torch.randint(
      1, VOCAB, (BATCH, SEQ_LEN // CHUNK, NEIGHBOURS, NEIGHBOUR_LEN))
  log(f"[peer] retro-pytorch, torch {torch.__version__}, "
      f"{torch.get_num_threads()} threads, {params:,} parameters")

  losses = []

  def step():
    t0 = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss = model(seq, retrieved, return_loss=True)
    loss.backward()
    optimizer.step()
    seconds = time.perf_counter() - t0
    losses.append(float(loss.detach()))
    log(f"[peer] step {len(losses)}: {seconds:.3f} s loss {losses[-1]:.4f}")
    return seconds

  counter = flop_counter.FlopCounterMode(display=False)
  with counter:   # Matmul FLOPs of forward + backward (AdamW has none).
    step()
  train_flops = counter.get_total_flops()
  for _ in range(args.warmup - 1):
    step()
  times = [step() for _ in range(args.steps)]

  median = statistics.median(times)
  tokens = BATCH * SEQ_LEN
  result = {
      "impl": "retro-pytorch",
      "params": params,
      "tokens_per_step": tokens,
      "step_s_median": round(median, 4),
      "step_s_min": round(min(times), 4),
      "step_s_all": [round(t, 4) for t in times],
      "tokens_per_s": round(tokens / median, 2),
      "threads": torch.get_num_threads(),
      "train_flops_per_step": train_flops,
      "achieved_gflops": round(train_flops / median / 1e9, 2),
      "losses": [round(x, 4) for x in losses],
      "versions": {"torch": torch.__version__,
                   "retro_pytorch": importlib.metadata.version(
                       "retro-pytorch")},
  }
  if args.peak_gflops > 0:
    result["peak_gflops"] = args.peak_gflops
    result["mfu_median"] = round(
        train_flops / median / 1e9 / args.peak_gflops, 4)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
