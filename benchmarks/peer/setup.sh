#!/usr/bin/env bash
# Sets up the environment of the PyTorch peer (retro-pytorch 0.3.9 on a CPU
# build of torch) and prints its python on the last line of stdout.
#
#   PY=$(bash benchmarks/peer/setup.sh | tail -n1)
#   bash benchmarks/peer/setup.sh --with-transformers   # + transformers, for
#       benchmarks/peer/embed_bert_torch.py and tools/make_bert_fixture.py
#
# The peer lives in a venv of its own, outside the repository, so torch never
# enters the project's environment: the benchmarks call it as a subprocess.
# Idempotent: a venv that already imports what is asked for is left as it is
# (a few seconds); anything missing or broken is (re)installed (about 1.5 min
# on a fresh venv). Everything pip prints goes to stderr.
#
# Environment:
#   PEER_VENV         the venv (default $HOME/.cache/retro-peer-venv)
#   PEER_BASE_PYTHON  the python that creates it (default python3)
#   PEER_TORCH        the torch requirement (default torch==2.13.0+cpu)
#   PEER_TORCH_INDEX  an extra index for CPU-only torch wheels, for a machine
#                     whose pip sources have no CPU build (PyPI's Linux x86_64
#                     torch wheels are CUDA builds of several GB), e.g.
#                     https://download.pytorch.org/whl/cpu
# torch is installed first, then pinned to exactly the installed version while
# retro-pytorch's dependencies are resolved, so pip never swaps in a CUDA build;
# those dependencies are pinned by constraints.txt beside this script.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

RETRO_PYTORCH="retro-pytorch==0.3.9"
TRANSFORMERS="transformers"
VENV="${PEER_VENV:-$HOME/.cache/retro-peer-venv}"
BASE_PYTHON="${PEER_BASE_PYTHON:-python3}"
TORCH="${PEER_TORCH:-torch==2.13.0+cpu}"

with_transformers=0
for arg in "$@"; do
  case "$arg" in
    --with-transformers) with_transformers=1 ;;
    -h|--help)
      echo "usage: bash $0 [--with-transformers]"
      sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'
      exit 0 ;;
    *) echo "setup.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done

PY="$VENV/bin/python"
modules="retro_pytorch"
if (( with_transformers )); then modules="$modules transformers"; fi

# Imports what the peer needs and checks that torch is a CPU build (a CUDA
# build would still run on the CPU, but is several GB and not what is timed).
check() {
  "$PY" - "$modules" <<'EOF' >&2
import importlib, sys
for name in sys.argv[1].split():
  importlib.import_module(name)
import torch
assert torch.version.cuda is None, f"torch {torch.__version__} is a CUDA build"
print(f"peer: torch {torch.__version__}, {sys.argv[1]} import", flush=True)
EOF
}

if [[ -x "$PY" ]] && check 2>/dev/null; then
  echo "peer: $VENV is ready" >&2
  echo "$PY"
  exit 0
fi

if [[ ! -x "$PY" ]]; then
  echo "peer: creating $VENV" >&2
  "$BASE_PYTHON" -m venv "$VENV" >&2
fi

pip_install() {
  "$PY" -m pip install --disable-pip-version-check --no-input \
    --constraint "$HERE/constraints.txt" "$@" >&2
}

torch_sources=()
if [[ -n "${PEER_TORCH_INDEX:-}" ]]; then
  torch_sources=(--extra-index-url "$PEER_TORCH_INDEX")
fi
pip_install "${torch_sources[@]}" "$TORCH"

# Pin the torch just installed, so resolving the rest cannot replace it.
pin="$(mktemp)"
trap 'rm -f "$pin"' EXIT
"$PY" -c "import torch; print('torch==' + torch.__version__)" > "$pin"
extras=()
if (( with_transformers )); then extras=("$TRANSFORMERS"); fi
pip_install "${torch_sources[@]}" --constraint "$pin" "$RETRO_PYTORCH" \
  "${extras[@]}"

check
echo "$PY"
