#!/usr/bin/env bash
# Creates (or reuses) a Cloud TPU VM or pod slice, installs retro_jax on every
# worker and runs the same training command on all of them (--worker=all).
#
#   bash scripts/launch_tpu.sh NAME ZONE ACCELERATOR [train.py flags ...]
#   e.g.
#   bash scripts/launch_tpu.sh retro-c4 us-central2-b v4-32 \
#       --config=configs/retro.py:172m --workdir=gs://BUCKET/runs/172m \
#       --config.data.spm_path=gs://BUCKET/spm.model \
#       --config.data.db_dir=gs://BUCKET/db --config.data.cache_dir=gs://BUCKET/cache
#
# Environment: RUNTIME (TPU software version, default: the one Cloud TPU's
# docs name for the accelerator, cloud.google.com/tpu/docs/runtimes:
# tpu-ubuntu2204-base for v4 and older, v2-alpha-tpuv5-lite for v5e,
# v2-alpha-tpuv5 for v5p, v2-alpha-tpuv6e for v6e; all Ubuntu 22.04, whose
# python3 is 3.10, so the workers get Python 3.11 from uv when they lack it),
# REPO (git URL to clone on the workers, default: this checkout's origin),
# BRANCH (default main), SPOT=1 (spot capacity), DRY_RUN=1 (print the gcloud
# commands instead of running them). The training process on each worker runs
# under nohup, logging to ~/retro_train.log; rerunning the script resumes the
# run from the workdir's latest checkpoint (a preempted slice: just rerun).
set -euo pipefail

if [[ $# -lt 3 ]]; then
  sed -n '2,20p' "$0"; exit 2
fi
NAME=$1; ZONE=$2; ACCELERATOR=$3; shift 3
case "$ACCELERATOR" in
  v5litepod-*|v5e-*) DEFAULT_RUNTIME=v2-alpha-tpuv5-lite ;;
  v5p-*) DEFAULT_RUNTIME=v2-alpha-tpuv5 ;;
  v6e-*) DEFAULT_RUNTIME=v2-alpha-tpuv6e ;;
  *) DEFAULT_RUNTIME=tpu-ubuntu2204-base ;;
esac
RUNTIME=${RUNTIME:-$DEFAULT_RUNTIME}
REPO=${REPO:-$(git -C "$(dirname "$0")/.." remote get-url origin 2>/dev/null || true)}
BRANCH=${BRANCH:-main}
if [[ -z "$REPO" ]]; then
  echo "set REPO to a git URL the TPU workers can clone" >&2; exit 2
fi

run() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

# 1. The TPU VM / slice: reuse it if it exists, else create it.
if [[ "${DRY_RUN:-0}" != 1 ]] && gcloud compute tpus tpu-vm describe "$NAME" \
    --zone="$ZONE" >/dev/null 2>&1; then
  echo "reusing TPU $NAME in $ZONE"
else
  run gcloud compute tpus tpu-vm create "$NAME" --zone="$ZONE" \
    --accelerator-type="$ACCELERATOR" --version="$RUNTIME" \
    ${SPOT:+--spot}
fi

ssh_all() {
  run gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker=all \
    --command="$1"
}

# 2. Install on every worker (idempotent: pulls if already cloned; the
#    environment is scripts/setup_env.sh's, with the tpu extra). The images
#    ship Python 3.10; the package needs 3.11, which uv fetches once.
ssh_all "set -e; if [ -d retro_jax ]; then git -C retro_jax fetch -q && \
git -C retro_jax checkout -q $BRANCH && git -C retro_jax pull -q; else \
git clone -q -b $BRANCH $REPO retro_jax; fi; cd retro_jax && \
if ! command -v python3.11 >/dev/null; then \
python3 -m pip install -q --user uv && ~/.local/bin/uv python install 3.11 && \
export PYTHON=\$(~/.local/bin/uv python find 3.11); fi && \
bash scripts/setup_env.sh"

# 3. The same train command on every worker; jax.distributed initialises
#    itself on TPU VMs (--distributed=auto), each host reads its data shard.
ARGS=$(printf '%q ' "$@")
ssh_all "cd retro_jax && TF_CPP_MIN_LOG_LEVEL=3 nohup \${VENV:-.venv}/bin/python \
scripts/train.py --distributed=auto $ARGS > ~/retro_train.log 2>&1 &"
echo "started on all workers of $NAME; follow with:"
echo "  gcloud compute tpus tpu-vm ssh $NAME --zone=$ZONE --worker=0 --command='tail -f ~/retro_train.log'"
