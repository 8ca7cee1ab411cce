"""tools/gpu_check.sh --table: the step / trainer table and the FB15k-237
precision rows, printed from the committed raw output of an H200 run."""

from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(REPO, "docs", "gpu", "h200", "2026-11-29")


def test_table_of_a_committed_run(tmp_path):
  result = subprocess.run(["bash", os.path.join(REPO, "tools", "gpu_check.sh"), "--table", RUN],
                          capture_output=True, text=True, check=True,
                          env=dict(os.environ, PYTHON=sys.executable))
  lines = result.stdout.splitlines()
  # trainer / step = 5,216,602 / 25,179,488 for the device path at batch 40k.
  # Rows from before background checkpoints and storage.sync: foreground, each write synced.
  assert ("| 40000 | tf32 | device | foreground, sync write | 25,179,488 | 5,216,602 | 20.7% "
          "| 3,052 / 7,235 |") in lines
  assert ("| 40000 | tf32 | host | foreground, sync write | 25,179,488 | 3,974,644 | 15.8% "
          "| 3,052 / 3,671 |") in lines
  fb = {line.split("|")[1].strip(): line for line in lines if line.startswith("| float32")
        or line.startswith("| tf32 |") or line.startswith("| bfloat16 |")}
  assert "0.3052" in fb["float32"] and "0.3051" in fb["bfloat16"], lines
  with open(os.path.join(RUN, "table.md")) as f:
    assert f.read().strip() == result.stdout.strip()  # the committed table is this output


def test_table_of_the_checkpoint_sync_run():
  """The run that compared background and foreground checkpoints, synced
  once per checkpoint or never: its rows, one per setting."""
  run = os.path.join(REPO, "docs", "gpu", "h200", "2026-11-29-sync")
  result = subprocess.run(["bash", os.path.join(REPO, "tools", "gpu_check.sh"), "--table", run],
                          capture_output=True, text=True, check=True,
                          env=dict(os.environ, PYTHON=sys.executable))
  rows = [line for line in result.stdout.splitlines() if line.startswith("| 160000 |")]
  assert len(rows) == 4, result.stdout
  # 22,945,028 / 28,778,048: background checkpoints, no sync.
  assert ("| 160000 | tf32 | device | background, sync none | 28,778,048 | 22,945,028 | 79.7% "
          "| 4,780 / 8,815 |") in rows
  with open(os.path.join(run, "table.md")) as f:
    assert f.read().strip() == result.stdout.strip()
