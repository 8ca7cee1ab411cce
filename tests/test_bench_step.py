"""tools/bench_step.py --data-parallel: the data-parallel step is the
one-device step up to the order of the gradient sums."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from test_sharded import cpu_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_data_parallel_step_trains_the_one_device_model():
  out = subprocess.run(
      [sys.executable, os.path.join(REPO, "tools", "bench_step.py"), "--rows", "300", "--dim",
       "16", "--relations", "3", "--chunk", "10", "--uniform", "10", "--batch", "40",
       "--calls", "3", "--data-parallel", "2", "--rounds", "1", "--json"],
      env=cpu_env(2), capture_output=True, text=True, check=True, timeout=600)
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["devices"] == 2
  assert len(result["one_device_edges_per_s"]) == len(result["data_parallel_edges_per_s"]) == 1
  # Training moved the rows far from their 1e-3 initial scale ...
  assert result["max_abs_table"] > 0.05
  # ... and both variants moved them the same way: only float order differs.
  # (A device that dropped the other's gradients differs by ~lr per step.)
  assert result["max_abs_table_difference"] < 1e-4 * result["max_abs_table"]
