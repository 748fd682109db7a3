#!/usr/bin/env bash
# Installs what the tests need (scripts/setup_env.sh) and runs them.
#   bash scripts/run_tests.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export TF_CPP_MIN_LOG_LEVEL=3
exec "${VENV:-.venv}/bin/python" -m pytest tests "$@"
