#!/usr/bin/env bash
# Installs what is needed (scripts/setup_env.sh) and runs the main job on the
# embedded default corpus: a tiny RETRO trained on the Python standard library.
#   bash scripts/quickstart.sh [--config.train.steps=200 ...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export TF_CPP_MIN_LOG_LEVEL=3
exec "${VENV:-.venv}/bin/python" scripts/train.py --config=configs/tiny.py \
  --workdir=runs/quickstart "$@"
