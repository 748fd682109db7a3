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
# Environment: RUNTIME (TPU software version, default tpu-ubuntu2204-base),
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
RUNTIME=${RUNTIME:-tpu-ubuntu2204-base}
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

# 2. Install on every worker (idempotent: pulls if already cloned).
ssh_all "set -e; if [ -d retro_jax ]; then git -C retro_jax fetch -q && \
git -C retro_jax checkout -q $BRANCH && git -C retro_jax pull -q; else \
git clone -q -b $BRANCH $REPO retro_jax; fi; cd retro_jax && \
python3 -m venv .venv && .venv/bin/pip install -q -U pip && \
.venv/bin/pip install -q -e . 'jax[tpu]==0.10.2' \
-f https://storage.googleapis.com/jax-releases/libtpu_releases.html"

# 3. The same train command on every worker; jax.distributed initialises
#    itself on TPU VMs (--distributed=auto), each host reads its data shard.
ARGS=$(printf '%q ' "$@")
ssh_all "cd retro_jax && TF_CPP_MIN_LOG_LEVEL=3 nohup .venv/bin/python \
scripts/train.py --distributed=auto $ARGS > ~/retro_train.log 2>&1 &"
echo "started on all workers of $NAME; follow with:"
echo "  gcloud compute tpus tpu-vm ssh $NAME --zone=$ZONE --worker=0 --command='tail -f ~/retro_train.log'"
