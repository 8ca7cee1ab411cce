# Helpers shared by launch/local_multiprocess.sh and launch/gpu_multinode.sh.
# Sourced, not run. See launch/README.md.

# twhin_command ARRAY: splits $TWHIN (default "twhin") into the named array, so
# TWHIN=".venv/bin/python -m twhin_jax.cli" works as well as a plain "twhin".
twhin_command() {
  local -n _out=$1
  read -r -a _out <<< "${TWHIN:-twhin}"
}

# quote_command ARGS...: the command as one shell-quoted line (for DRY_RUN and logs).
quote_command() {
  local out="" arg
  for arg in "$@"; do
    out+="$(printf '%q' "$arg") "
  done
  printf '%s\n' "${out% }"
}

# require_positive_int NAME: fails unless $NAME is an integer >= 1.
require_positive_int() {
  local name=$1 value=${!1}
  if ! [[ $value =~ ^[0-9]+$ ]] || (( value < 1 )); then
    echo "$name must be an integer >= 1, got '$value'" >&2
    exit 2
  fi
}

# wait_all PID...: waits for every process; when one fails, stops the others
# (SIGTERM, then SIGKILL after $KILL_GRACE_S seconds) and exits with its status.
# Ctrl-C or SIGTERM to the launcher stops them too.
wait_all() {
  local -a pids=("$@")
  local grace=${KILL_GRACE_S:-10}
  _stop_all() {
    local pid
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    local waited=0
    while (( waited < grace )); do
      local alive=0
      for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
      (( alive )) || break
      sleep 1
      waited=$((waited + 1))
    done
    for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  }
  trap '_stop_all; exit 130' INT TERM
  local -a running=("${pids[@]}")
  local status finished pid
  while (( ${#running[@]} > 0 )); do
    status=0
    finished=""
    wait -n -p finished "${running[@]}" || status=$?
    if (( status != 0 )); then
      echo "launch: process ${finished:-?} failed (exit $status); stopping the others" >&2
      _stop_all
      wait 2>/dev/null || true
      trap - INT TERM
      exit "$status"
    fi
    local -a still=()
    for pid in "${running[@]}"; do [[ $pid == "$finished" ]] || still+=("$pid"); done
    running=("${still[@]}")
  done
  trap - INT TERM
}
