#!/usr/bin/env bash
# One process per GPU node (each with all of its GPUs), started over ssh from
# this machine, joined by jax.distributed with explicit TWHIN_* variables.
# For clusters without SLURM (see slurm.sbatch for those).
#
#   HOSTS="gpu-node-1 gpu-node-2" CONFIG=configs/fb15k237.py \
#     WORKDIR=/shared/runs/fb launch/gpu_multinode.sh [--config.train.lr=0.05 ...]
#
# Required: HOSTS (space- or comma-separated; the first runs the coordinator),
#           CONFIG, WORKDIR (a path every node sees).
# Optional (defaults in brackets):
#   REMOTE_DIR [$PWD]          the repository on every node (same path everywhere)
#   TWHIN [.venv/bin/twhin]    the twhin command, relative to REMOTE_DIR or absolute
#   PORT [12355]               coordinator port on the first host
#   COORDINATOR_HOST [first of HOSTS]  its address as the other nodes reach it
#   SSH [ssh]  SSH_OPTS [-tt -o BatchMode=yes]  (-tt: a remote process dies with
#                                its ssh session when this launcher stops it)
#   TWHIN_DATA_DIR []          forwarded to the nodes when set
#   KILL_GRACE_S [10]          seconds between SIGTERM and SIGKILL of the others
#   DRY_RUN=1                  print the ssh commands instead of running them
# Waits for all nodes; when one fails, stops the rest and exits with its status.
set -euo pipefail
: "${HOSTS:?set HOSTS to the GPU nodes, e.g. HOSTS=\"gpu-node-1 gpu-node-2\"}"
: "${CONFIG:?set CONFIG to a config file, e.g. configs/fb15k237.py}"
: "${WORKDIR:?set WORKDIR to the run directory (shared by all nodes)}"
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
read -r -a hosts <<< "${HOSTS//,/ }"
(( ${#hosts[@]} > 0 )) || { echo "HOSTS is empty" >&2; exit 2; }
REMOTE_DIR=${REMOTE_DIR:-$PWD}
TWHIN=${TWHIN:-.venv/bin/twhin}
PORT=${PORT:-12355}
COORDINATOR_HOST=${COORDINATOR_HOST:-${hosts[0]}}
read -r -a ssh_cmd <<< "${SSH:-ssh} ${SSH_OPTS--tt -o BatchMode=yes}"

twhin_command twhin
num=${#hosts[@]}
pids=()
for i in "${!hosts[@]}"; do
  env_vars=(TWHIN_COORDINATOR_ADDRESS="$COORDINATOR_HOST:$PORT" TWHIN_NUM_PROCESSES="$num"
            TWHIN_PROCESS_ID="$i")
  [[ -n ${TWHIN_DATA_DIR:-} ]] && env_vars+=(TWHIN_DATA_DIR="$TWHIN_DATA_DIR")
  remote="cd $(printf '%q' "$REMOTE_DIR") && exec $(quote_command env "${env_vars[@]}" \
    "${twhin[@]}" train --distributed --config "$CONFIG" --workdir "$WORKDIR" "$@")"
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    quote_command "${ssh_cmd[@]}" "${hosts[$i]}" "$remote"
    continue
  fi
  "${ssh_cmd[@]}" "${hosts[$i]}" "$remote" < /dev/null \
    > >(sed -u "s/^/[${hosts[$i]}] /") 2>&1 &
  pids+=($!)
done
[[ ${DRY_RUN:-0} == 1 ]] && exit 0
echo "launch: $num nodes, coordinator $COORDINATOR_HOST:$PORT" >&2
wait_all "${pids[@]}"
echo "launch: all $num nodes finished" >&2
