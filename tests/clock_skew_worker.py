"""Run by tests/test_checkpoint_interval.py as one process of a 2-process
job: ``twhin train`` where process 1's clock runs a million times faster
than process 0's, so that the two would disagree on every checkpoint that
train.checkpoint_every_seconds may skip, unless they share one decision."""

import os
import sys
import time

from twhin_jax import cli
from twhin_jax import distributed

if os.environ.get(distributed.ENV_PROCESS_ID) == "1":
  _real = time.perf_counter
  _start = _real()
  time.perf_counter = lambda: _start + (_real() - _start) * 1e6

if __name__ == "__main__":
  sys.exit(cli.main(sys.argv[1:]))
