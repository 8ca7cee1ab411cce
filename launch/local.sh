#!/usr/bin/env bash
# One training process on this machine (all of its devices).
#
#   CONFIG=configs/kinship.py:test WORKDIR=runs/kinship launch/local.sh [--config.train.lr=0.05 ...]
#
# Required: CONFIG (configs/NAME.py[:variant]), WORKDIR (the run directory).
# Optional: TWHIN   the twhin command (default "twhin"; e.g. ".venv/bin/python -m twhin_jax.cli")
#           DRY_RUN=1  print the command instead of running it
# Extra arguments go to `twhin train` (config overrides). See launch/README.md.
set -euo pipefail
: "${CONFIG:?set CONFIG to a config file, e.g. configs/kinship.py:test}"
: "${WORKDIR:?set WORKDIR to the run directory, e.g. runs/kinship}"
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

twhin_command twhin
cmd=("${twhin[@]}" train --config "$CONFIG" --workdir "$WORKDIR" "$@")
if [[ ${DRY_RUN:-0} == 1 ]]; then
  quote_command "${cmd[@]}"
  exit 0
fi
exec "${cmd[@]}"
