# Sourced by scripts/quickstart.sh and scripts/seeds.sh: their shared
# arguments and the data fields every stage of one quickstart reads.
#   --steps       training steps of each model (default 300)
#   --data_bytes  corpus text in the DB and the training Task (default 2 MB;
#                 at least ~300 kB for the 4096-piece vocabulary). A tenth
#                 as much text of held-out files is what evaluation scores.
#   --corpus      sources.open_corpus spec (default python_stdlib:shuffled,
#                 the library's files in a stable hashed order, so that the
#                 2 MB prefix samples every package)
#   --workdir     where everything goes (default runs/quickstart)
# A caller sets EXTRA_ARGS (glob patterns of its own arguments, separated
# by spaces, e.g. "--seeds=* --models=*") and handles them from the array
# REST.
STEPS=300
DATA_BYTES=2000000
CORPUS=python_stdlib:shuffled
W=runs/quickstart
REST=()
for arg in "$@"; do
  case "$arg" in
    --steps=*) STEPS="${arg#*=}" ;;
    --data_bytes=*) DATA_BYTES="${arg#*=}" ;;
    --corpus=*) CORPUS="${arg#*=}" ;;
    --workdir=*) W="${arg#*=}" ;;
    *)
      read -ra extra <<< "${EXTRA_ARGS:-}"   # No glob expansion.
      for pattern in "${extra[@]+"${extra[@]}"}"; do
        # shellcheck disable=SC2053
        if [[ $arg == $pattern ]]; then REST+=("$arg"); continue 2; fi
      done
      echo "unknown argument $arg; known: --steps= --data_bytes= --corpus=" \
           "--workdir= ${EXTRA_ARGS:-}" >&2
      exit 2 ;;
  esac
done

VAL_BYTES=$((DATA_BYTES / 10))   # Held-out text that evaluation scores.
# The same data fields for the DB build, the neighbour cache and training.
# configs/quickstart.py leaves data.spm_path "": the DB build trains the
# vocabulary at $W/spm.model and keeps a copy in $W/db/spm.model, which the
# cache job and training read.
DATA=(--config=configs/quickstart.py --config.data.corpus="$CORPUS"
      --config.data.max_bytes.train="$DATA_BYTES"
      --config.data.max_bytes.validation="$VAL_BYTES"
      --config.db.spm_train_bytes="$DATA_BYTES"
      --config.data.db_dir="$W/db"
      --config.data.cache_dir="$W/cache")
TRAIN=("${DATA[@]}" --config.train.steps="$STEPS")
# The baseline: the same decoder without CCA (and so without the encoder).
BASELINE=(--config.model.cca_layers="()")
# Evaluation of the Task's held-out split.
EVAL=(--config=configs/eval.py:task --config.eval.max_batches=64)
