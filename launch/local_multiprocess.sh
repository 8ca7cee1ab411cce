#!/usr/bin/env bash
# N training processes on this machine, joined by jax.distributed (a
# multi-host job in miniature: the same code path as SLURM or a GPU cluster).
#
#   NUM_PROCESSES=2 DEVICES_PER_PROCESS=2 CONFIG=configs/kinship.py:test \
#     WORKDIR=runs/k2 launch/local_multiprocess.sh [--config.train.lr=0.05 ...]
#
# Required: NUM_PROCESSES, CONFIG, WORKDIR.
# Optional: PORT                 coordinator port on 127.0.0.1 (default 12355)
#           DEVICES_PER_PROCESS  force N CPU devices per process (JAX_PLATFORMS=cpu
#                                and XLA_FLAGS=--xla_force_host_platform_device_count=N);
#                                unset: each process sees the machine's own devices
#           LOG_DIR              per-process logs (default $WORKDIR/logs); output is
#                                also shown here, prefixed with [process i]
#           TWHIN                the twhin command (default "twhin")
#           KILL_GRACE_S         seconds between SIGTERM and SIGKILL of the others
#                                when one process fails (default 10)
#           DRY_RUN=1            print the N commands instead of running them
# Waits for all; when one fails, stops the rest and exits with its status.
set -euo pipefail
: "${NUM_PROCESSES:?set NUM_PROCESSES to the number of processes to start}"
: "${CONFIG:?set CONFIG to a config file, e.g. configs/kinship.py:test}"
: "${WORKDIR:?set WORKDIR to the run directory, e.g. runs/kinship}"
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
require_positive_int NUM_PROCESSES
PORT=${PORT:-12355}
LOG_DIR=${LOG_DIR:-$WORKDIR/logs}

twhin_command twhin
cmd=("${twhin[@]}" train --distributed --config "$CONFIG" --workdir "$WORKDIR" "$@")
env_common=(TWHIN_COORDINATOR_ADDRESS="127.0.0.1:$PORT" TWHIN_NUM_PROCESSES="$NUM_PROCESSES")
if [[ -n ${DEVICES_PER_PROCESS:-} ]]; then
  require_positive_int DEVICES_PER_PROCESS
  env_common+=(JAX_PLATFORMS=cpu
               XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS")
fi

if [[ ${DRY_RUN:-0} == 1 ]]; then
  for ((i = 0; i < NUM_PROCESSES; i++)); do
    quote_command env "${env_common[@]}" TWHIN_PROCESS_ID="$i" "${cmd[@]}"
  done
  exit 0
fi

mkdir -p "$LOG_DIR"
pids=()
for ((i = 0; i < NUM_PROCESSES; i++)); do
  env "${env_common[@]}" TWHIN_PROCESS_ID="$i" "${cmd[@]}" \
    > >(tee "$LOG_DIR/process_$i.log" | sed -u "s/^/[process $i] /") 2>&1 &
  pids+=($!)
done
echo "launch: started $NUM_PROCESSES processes (pids ${pids[*]}), coordinator 127.0.0.1:$PORT, logs in $LOG_DIR" >&2
wait_all "${pids[@]}"
echo "launch: all $NUM_PROCESSES processes finished" >&2
