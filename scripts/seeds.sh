#!/usr/bin/env bash
# Seeds of the quickstart's models on its DB and cache, then the table of
# docs/results.md (scripts/seed_table.py): RETRO against the same-size
# baseline and baselines 2x and 4x its non-embedding parameters, all trained
# on the same data for the same steps; RETRO also with the leakage probe and
# the random-neighbour control.
#
#   bash scripts/quickstart.sh                 # first: the DB and cache
#   bash scripts/seeds.sh [--seeds=0,1,2] \
#       [--models=retro,baseline,baseline_2x,baseline_4x] [quickstart args]
#
# Runs go to <workdir>/seeds/<model>/seed_<s>; seed 0 of retro and baseline
# are the quickstart's own runs. Every run resumes like the quickstart's.
set -euo pipefail
cd "$(dirname "$0")/.."

EXTRA_ARGS="--seeds=* --models=*"
source scripts/quickstart_args.sh
SEEDS=0,1,2
MODELS=retro,baseline,baseline_2x,baseline_4x
for arg in "${REST[@]+"${REST[@]}"}"; do
  case "$arg" in
    --seeds=*) SEEDS="${arg#*=}" ;;
    --models=*) MODELS="${arg#*=}" ;;
  esac
done
export TF_CPP_MIN_LOG_LEVEL=3 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${VENV:-.venv}/bin/python"
for need in "$W/db" "$W/cache"; do
  [[ -d "$need" ]] || { echo "$need: missing; run scripts/quickstart.sh" \
                             "--workdir=$W first" >&2; exit 2; }
done

# Non-embedding parameters (scripts/count_params.py counts them the same
# way): RETRO 1.38M, baseline 0.79M, 2x 2.76M, 4x 5.42M.
model_args() {
  case "$1" in
    retro) ;;
    baseline) echo "${BASELINE[@]}" ;;
    baseline_2x) echo "${BASELINE[@]} --config.model.d_model=240" \
                      "--config.model.num_heads=8 --config.model.head_dim=30" \
                      "--config.model.d_ff=960" ;;
    baseline_4x) echo "${BASELINE[@]} --config.model.d_model=336" \
                      "--config.model.num_heads=12 --config.model.head_dim=28" \
                      "--config.model.d_ff=1344" ;;
    *) echo "unknown model $1 (retro, baseline, baseline_2x, baseline_4x)" >&2
       exit 2 ;;
  esac
}

for seed in ${SEEDS//,/ }; do
  for model in ${MODELS//,/ }; do
    dir="$W/seeds/$model/seed_$seed"
    if [[ $seed == 0 && -d "$W/$model" ]]; then   # The quickstart's run.
      mkdir -p "$(dirname "$dir")"
      ln -sfn "$(cd "$W/$model" && pwd)" "$dir"
    else
      printf '\n== %s, seed %s\n' "$model" "$seed"
      # shellcheck disable=SC2046
      "$PY" scripts/train.py "${TRAIN[@]}" --config.train.seed="$seed" \
        --workdir="$dir" $(model_args "$model")
    fi
    "$PY" scripts/evaluate.py "${EVAL[@]}" --workdir="$dir"
    if [[ $model == retro ]]; then
      for probe in leak random; do
        "$PY" scripts/evaluate.py "${EVAL[@]}" --workdir="$dir" \
          --config.eval.neighbours=$probe
      done
    fi
  done
done
"$PY" scripts/seed_table.py --dir="$W/seeds"
