"""Inspect a run's checkpoint without building the model (thin wrapper over `twhin inspect`).

  .venv/bin/python tools/inspect_checkpoint.py --workdir runs/demo            # versions, arrays, norms/NaNs
  .venv/bin/python tools/inspect_checkpoint.py --workdir runs/demo --neighbors user:u0 --k 5
  .venv/bin/python tools/inspect_checkpoint.py --diff runs/a runs/b --json

Every flag of `twhin inspect` works here; see twhin_jax/inspection.py.
"""

import sys

from twhin_jax import cli

if __name__ == "__main__":
  sys.exit(cli.main(["inspect", *sys.argv[1:]]))
