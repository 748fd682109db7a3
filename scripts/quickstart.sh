#!/usr/bin/env bash
# RETRO end to end on the embedded default corpus, the Python standard
# library: installs what is needed (scripts/setup_env.sh), then
#   1. vocabulary + retrieval DB      scripts/build_db.py (the training
#                                     split: chunks, BERT embeddings once
#                                     (Beam), index, neighbour table)
#   2. neighbours for every chunk     scripts/cache_tasks.py (train: looked
#                                     up in the table; validation: embedded)
#   3. train RETRO                    scripts/train.py
#   4. train the baseline (no CCA)    scripts/train.py --config.model.cca_layers="()"
#   5. evaluate both                  scripts/evaluate.py (bits per byte with
#                                     retrieval on / off, leakage table + plot),
#                                     then RETRO's leakage probe (the held-out
#                                     text retrievable too) and its control
#                                     (random neighbours)
#   6. sample with retrieval          scripts/sample.py --show_neighbours
# Every stage resumes: after Ctrl-C or `kill`, run the command again.
#
#   bash scripts/quickstart.sh [--steps=N] [--data_bytes=N] [--corpus=SPEC]
#                              [--workdir=DIR]
# (scripts/quickstart_args.sh says what each argument does.)
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/quickstart_args.sh

bash scripts/setup_env.sh
export TF_CPP_MIN_LOG_LEVEL=3 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${VENV:-.venv}/bin/python"
mkdir -p "$W"
T0=$SECONDS

stage() {  # stage NAME: prints a banner and the elapsed time.
  printf '\n== %s  (%d s elapsed)\n' "$1" $((SECONDS - T0))
}

stage "1/6 vocabulary and retrieval DB (the training split: $DATA_BYTES bytes of $CORPUS)"
"$PY" scripts/build_db.py "${DATA[@]}"

stage "2/6 neighbours of every 64-token chunk (seqio cache, Beam; train: table lookups)"
"$PY" scripts/cache_tasks.py "${DATA[@]}"

stage "3/6 train RETRO ($STEPS steps)"
"$PY" scripts/train.py "${TRAIN[@]}" --workdir="$W/retro"

stage "4/6 train the baseline: the same model without CCA ($STEPS steps)"
"$PY" scripts/train.py "${TRAIN[@]}" --workdir="$W/baseline" "${BASELINE[@]}"

stage "5/6 evaluate on held-out files"
"$PY" scripts/evaluate.py "${EVAL[@]}" --workdir="$W/retro"
"$PY" scripts/evaluate.py "${EVAL[@]}" --workdir="$W/baseline"
for probe in leak random; do
  "$PY" scripts/evaluate.py "${EVAL[@]}" --workdir="$W/retro" \
    --config.eval.neighbours=$probe
done

stage "6/6 sample a continuation, retrieving at every chunk boundary"
"$PY" scripts/sample.py --workdir="$W/retro" --num_tokens=128 \
  --temperature=0.8 --top_k=40 --show_neighbours --prompt='import os
import sys


def main(argv):
    """Parses the command line and runs the program."""
'

stage "done"
"$PY" - "$W" <<'PYEOF'
import os, sys
import numpy as np
from retro_jax.data import cache_job
from retro_jax.evaluation import chunk_files, intervals, report, result_files
w = sys.argv[1]
cached = cache_job.cached_summary("retro_quickstart", os.path.join(w, "cache"))
short = {split: cached[split]["missing"] for split in ("train", "validation")}
print(f"chunks with fewer than k neighbours after the document filter: "
      f"{short}")
def result(run, probe="db"):
  """The run's latest evaluation of the Task set (with neighbours `probe`)."""
  return result_files.find(os.path.join(w, run), "task", probe)[-1]["sets"]["task"]
retro, base = result("retro"), result("baseline")
leak, control = result("retro", "leak"), result("retro", "random")
on, off = (retro[s]["bits_per_byte"] for s in ("retrieval_on", "retrieval_off"))
print(f"held-out bits per byte: RETRO {on:.4f} (retrieval off {off:.4f}), "
      f"baseline without CCA {base['retrieval_on']['bits_per_byte']:.4f}")
# Paired over the same held-out chunks; the intervals resample sequences
# (which text was scored), not training seeds.
chunks = [chunk_files.load_chunk_scores(r["chunk_scores"]) for r in (retro, base)]
if not all(np.array_equal(getattr(chunks[0], f), getattr(chunks[1], f))
           for f in ("targets", "bytes")):
  sys.exit(f"{w}: RETRO and the baseline were evaluated on different chunks "
           f"({retro['chunk_scores']}, {base['chunk_scores']}): no pairing")
seq_chunks = len(chunks[0].nll_on) // retro["retrieval_gain"]["sequences"]
for what, g in (("retrieval on vs off", retro["retrieval_gain"]),
                ("RETRO vs baseline  ", intervals.paired_gain(
                    chunks[1].nll_on, chunks[0].nll_on, chunks[0].bytes,
                    seq_chunks))):
  print(f"  {what}: {g['bpb_gain']:+.4f} bpb saved ({100 * g['relative']:+.2f}%),"
        f" 95% interval [{g['ci95'][0]:+.4f}, {g['ci95'][1]:+.4f}]")
o = leak["overlap"]["overlapping"]
print(f"leakage probe (the held-out text retrievable too): {o['chunks']} "
      f"chunks with r(C) > 0.75: {o['bpb_on']:.4f} bpb with retrieval, "
      f"{o['bpb_off']:.4f} without ({report.relative_change(o['cut'])})")
g = control["retrieval_gain"]
print(f"control (random neighbours): retrieval saves {g['bpb_gain']:+.4f} bpb "
      f"({100 * g['relative']:+.2f}%), 95% interval [{g['ci95'][0]:+.4f}, "
      f"{g['ci95'][1]:+.4f}]")
PYEOF
cat <<EOF
TensorBoard logs:  $W/retro, $W/baseline   (tensorboard --logdir $W)
checkpoints:       $W/retro/checkpoints, $W/baseline/checkpoints
metrics JSON:      $W/retro/eval/, $W/baseline/eval/
leakage plot:      $W/retro/eval/*.png
retrieval DB:      $W/db      (python scripts/build_db.py --config=configs/quickstart.py --config.data.db_dir=$W/db --query="...")
EOF
