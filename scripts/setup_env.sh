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
want=$(cat setup.cfg pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing retro_jax and its pinned dependencies (a few minutes the first time)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e ".[test]"
  echo "$want" > "$stamp"
fi
"$VENV/bin/python" -c "import retro_jax, jax; print('[setup] retro_jax', retro_jax.__version__, 'on jax', jax.__version__)"
