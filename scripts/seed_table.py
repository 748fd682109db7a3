r"""Prints the seed table of docs/results.md from evaluated runs.

  python scripts/seed_table.py --dir=runs/quickstart/seeds [--reference=retro]

`--dir` holds one folder per model and seed, `<model>/seed_<s>`, each a
workdir that scripts/evaluate.py evaluated on the Task set (scripts/seeds.sh
lays them out). For every seed the table gives each model's held-out bits
per byte and the bits per byte the reference model saves over it, paired
chunk by chunk with a 95% bootstrap interval over sequences; for the
reference also retrieval on against off, the leakage probe's cut on chunks
with r(C) > 0.75 and the random-neighbour control, where they were
evaluated.
"""

import glob
import os
import sys
from typing import Dict, Optional

from absl import flags
import numpy as np

from retro_jax.core import cli
from retro_jax.evaluation import chunk_files
from retro_jax.evaluation import intervals
from retro_jax.evaluation import result_files

_DIR = flags.DEFINE_string("dir", "runs/quickstart/seeds",
                           "Folder of <model>/seed_<s> workdirs.")
_REFERENCE = flags.DEFINE_string("reference", "retro",
                                 "The model the others are compared with.")


def latest(workdir: str, probe: str = "") -> Optional[Dict]:
  """The Task set of the run's latest evaluation with neighbours `probe`
  ("" = the DB, "_leak", "_random"), or None."""
  found = result_files.find(workdir, "task", probe.lstrip("_") or "db")
  if not found:
    return None
  try:
    return found[-1]["sets"]["task"]
  except (KeyError, TypeError):
    raise ValueError(f"{workdir}/eval: no Task set (sets.task) in its "
                     "latest results: evaluate the run with "
                     "--config=configs/eval.py:task") from None


def gain_cell(g: Dict) -> str:
  return (f"{g['bpb_gain']:+.4f} [{g['ci95'][0]:+.4f}, {g['ci95'][1]:+.4f}]"
          f" ({100 * g['relative']:+.2f}%)")


def main(argv):
  del argv
  runs = {}  # {model: {seed: workdir}}
  for path in sorted(glob.glob(os.path.join(_DIR.value, "*", "seed_*"))):
    model, seed = path.split(os.sep)[-2], int(path.rsplit("_", 1)[1])
    runs.setdefault(model, {})[seed] = path
  ref = _REFERENCE.value
  if ref not in runs:
    cli.fail(f"{_DIR.value}: no {ref}/seed_<s> folder (found "
             f"{sorted(runs) or 'none'})")
  seeds = []
  for s in sorted(runs[ref]):
    if latest(runs[ref][s]) is None:
      print(f"{runs[ref][s]}: not evaluated, left out", file=sys.stderr)
    else:
      seeds.append(s)
  if not seeds:
    cli.fail(f"{_DIR.value}/{ref}: no evaluated seed")
  others = [m for m in sorted(runs) if m != ref]
  rows = {}
  ref_scores = {}
  for s in seeds:
    res = latest(runs[ref][s])
    ref_scores[s] = (res, chunk_files.load_chunk_scores(res["chunk_scores"]))
    seq_chunks = len(ref_scores[s][1].nll_on) // res["retrieval_gain"][
        "sequences"]
    rows.setdefault(f"{ref}, retrieval on", {})[s] = (
        f"{res['retrieval_on']['bits_per_byte']:.4f}")
    rows.setdefault(f"{ref}, retrieval off", {})[s] = (
        f"{res['retrieval_off']['bits_per_byte']:.4f}")
    rows.setdefault(f"{ref}: retrieval on vs off saves", {})[s] = gain_cell(
        res["retrieval_gain"])
    for probe, label in (("_leak", "leakage probe: r(C) > 0.75 cut"),
                         ("_random", "control (random neighbours) saves")):
      p = latest(runs[ref][s], probe)
      if p is None:
        continue
      rows.setdefault(f"{ref}, {label}", {})[s] = (
          f"{100 * p['overlap']['overlapping']['cut']:.1f}%" if probe ==
          "_leak" else gain_cell(p["retrieval_gain"]))
    for other in others:
      if s not in runs[other]:
        continue
      o = latest(runs[other][s])
      if o is None:
        continue
      rows.setdefault(other, {})[s] = (
          f"{o['retrieval_on']['bits_per_byte']:.4f}")
      oc = chunk_files.load_chunk_scores(o["chunk_scores"])
      if oc.nll_on.shape != ref_scores[s][1].nll_on.shape:
        cli.fail(f"{runs[other][s]} and {runs[ref][s]} were evaluated on "
                 f"different chunks: no pairing")
      rows.setdefault(f"{ref} saves over {other}", {})[s] = gain_cell(
          intervals.paired_gain(oc.nll_on, ref_scores[s][1].nll_on,
                                oc.bytes, seq_chunks))
  print("| held-out bits per byte | " +
        " | ".join(f"seed {s}" for s in seeds) + " | mean |")
  print("|---" * (len(seeds) + 2) + "|")
  for name, cells in rows.items():
    values = [cells.get(s, "") for s in seeds]
    nums = [float(v.split()[0].rstrip("%")) for v in values if v]
    mean = f"{np.mean(nums):+.4f}" if "saves" in name else (
        f"{np.mean(nums):.1f}%" if "cut" in name else f"{np.mean(nums):.4f}")
    print(f"| {name} | " + " | ".join(values) + f" | {mean} |")


if __name__ == "__main__":
  cli.run(main)  # A broken eval JSON or chunk file: one line, status 1.
