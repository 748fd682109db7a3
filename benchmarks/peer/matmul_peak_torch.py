r"""The best float32 matmul speed torch reaches here, as one JSON line.

Runs in the peer's environment (benchmarks/peer/setup.sh):

  $PY benchmarks/peer/matmul_peak_torch.py [--threads N] [--repeats 5]

Times 2048^3 and 4096^3 torch.matmul (2 n^3 FLOPs each) and prints impl,
threads, gflops (per size) and best_gflops, the figure to pass to
bench_retro_pytorch.py --peak-gflops.
"""

import argparse
import json
import time

SIZES = (2048, 4096)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n", maxsplit=1)[0])
  parser.add_argument("--threads", type=int, default=0,
                      help="torch threads (0 = torch's default)")
  parser.add_argument("--repeats", type=int, default=5,
                      help="timed matmuls per size; the fastest counts")
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  import torch  # pylint: disable=g-import-not-at-top  # --help without torch.

  if args.threads > 0:
    torch.set_num_threads(args.threads)
  gflops = {}
  for n in SIZES:
    a = torch.randn(n, n, dtype=torch.float32)
    b = torch.randn(n, n, dtype=torch.float32)
    torch.matmul(a, b)  # Warm-up: thread pool and allocator.
    best = float("inf")
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      torch.matmul(a, b)
      best = min(best, time.perf_counter() - t0)
    gflops[str(n)] = round(2 * n**3 / best / 1e9, 2)
  print(json.dumps({"impl": f"torch {torch.__version__}",
                    "threads": torch.get_num_threads(),
                    "gflops": gflops,
                    "best_gflops": max(gflops.values())}))


if __name__ == "__main__":
  main()
