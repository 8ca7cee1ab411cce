#!/usr/bin/env bash
# A Cloud TPU pod slice (TPU VMs): copy this repository to every worker,
# install it, and start one `twhin train --distributed` per worker. On TPU
# pods jax.distributed.initialize() detects the pod itself, so no TWHIN_*
# variables are set.
#
#   TPU_NAME=my-v5e-32 ZONE=us-central2-b CONFIG=configs/fb15k237.py \
#     WORKDIR=/mnt/shared/runs/fb launch/tpu_pod.sh [--config.train.lr=0.05 ...]
#
# Required: TPU_NAME, ZONE, CONFIG, WORKDIR (a path every worker sees, e.g. a
#           Filestore/NFS mount; each worker reads and writes the same tables).
# Optional (defaults in brackets):
#   PROJECT []                 gcloud project (empty: gcloud's configured one)
#   REMOTE_DIR [twhin-jax]     checkout on the workers (relative to $HOME there)
#   JAX_SPEC [jax[tpu]]        what pip installs for jax on the workers
#   STEPS [copy,install,train] which steps to run (comma-separated)
#   TWHIN_DATA_DIR []          forwarded to the workers when set
#   DRY_RUN=1                  print the gcloud commands instead of running them
# The copy step ships `git archive HEAD` (committed files only).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME to the TPU VM (pod slice) name}"
: "${ZONE:?set ZONE to the TPU zone, e.g. us-central2-b}"
: "${CONFIG:?set CONFIG to a config file, e.g. configs/fb15k237.py}"
: "${WORKDIR:?set WORKDIR to the run directory (shared by all workers)}"
PROJECT=${PROJECT-}
REMOTE_DIR=${REMOTE_DIR:-twhin-jax}
JAX_SPEC=${JAX_SPEC:-jax[tpu]}
STEPS=${STEPS:-copy,install,train}
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

gcloud_tpu=(gcloud compute tpus tpu-vm)
where=(--zone "$ZONE")
[[ -n $PROJECT ]] && where+=(--project "$PROJECT")

run() {
  if [[ ${DRY_RUN:-0} == 1 ]]; then quote_command "$@"; else "$@"; fi
}
on_all_workers() {  # on_all_workers "remote shell command"
  run "${gcloud_tpu[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=all --command "$1"
}
has_step() { [[ ",$STEPS," == *",$1,"* ]]; }

if [[ ${DRY_RUN:-0} != 1 ]]; then
  command -v gcloud > /dev/null || { echo "gcloud not found: install the Google Cloud CLI" >&2; exit 2; }
fi
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
archive=${TMPDIR:-/tmp}/twhin-jax-$$.tar.gz

if has_step copy; then
  run git -C "$repo" archive --format=tar.gz -o "$archive" HEAD
  run "${gcloud_tpu[@]}" scp "$archive" "$TPU_NAME:twhin-jax.tar.gz" "${where[@]}" --worker=all
  on_all_workers "rm -rf $(printf '%q' "$REMOTE_DIR") && mkdir -p $(printf '%q' "$REMOTE_DIR") && tar -xzf twhin-jax.tar.gz -C $(printf '%q' "$REMOTE_DIR")"
  [[ ${DRY_RUN:-0} == 1 ]] || rm -f "$archive"
fi
if has_step install; then
  on_all_workers "cd $(printf '%q' "$REMOTE_DIR") && python3 -m venv .venv && .venv/bin/pip install -q -e . $(printf '%q' "$JAX_SPEC")"
fi
if has_step train; then
  train=(.venv/bin/twhin train --distributed --config "$CONFIG" --workdir "$WORKDIR" "$@")
  data=""
  [[ -n ${TWHIN_DATA_DIR:-} ]] && data="TWHIN_DATA_DIR=$(printf '%q' "$TWHIN_DATA_DIR") "
  on_all_workers "cd $(printf '%q' "$REMOTE_DIR") && ${data}$(quote_command "${train[@]}")"
fi
