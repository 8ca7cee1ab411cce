"""G devices train the model one device trains: Kinship on 4 fake CPU devices
(mesh.schedule = "tournament", global candidates) within 0.02 test MRR of one
device, in its own process (tests/sharded_quality_worker.py).

The settings isolate the device schedule. Ten epochs (about a minute and a
half on 2 CPU cores). Chunks of 20 edges, not the config's 50: a 4-device
(round, device) cell holds about 12 edges of a relation, so at C = 50 its
chunks are a quarter full and every edge has a quarter of one device's batch
negatives, which alone moves test MRR by about 0.07 on one device (0.597 at
C = 50, 0.664 at C = 20). With one pass through the tournament's rounds per
bucket (mesh.round_passes = 1, main's order before the passes) the 4-device
run falls outside the bound; the automatic passes bring it inside.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from test_sharded import REPO, cpu_env

DATA = os.environ.get("TWHIN_DATA_DIR")
SETTINGS = ["--config.train.epochs=10", "--config.train.eval_every_epochs=0",
            "--config.train.checkpoint_every_buckets=0", "--config.negatives.chunk_size=20",
            "--config.mesh.schedule=tournament", "--config.negatives.global_candidates=auto"]
#: The issue's bound for this test (issue 12: "Kinship on 4 fake devices
#: within 0.02 MRR of 1 device").
MRR_BOUND = 0.02
SEEDS = (0, 1, 2)


@pytest.mark.multidevice
@pytest.mark.slow
@pytest.mark.skipif(not DATA or not os.path.isdir(os.path.join(DATA or "", "kg", "kinship")),
                    reason="TWHIN_DATA_DIR is not set or has no kg/kinship (point it at ../shared/data)")
def test_kinship_on_four_devices_matches_one_device():
  """The mean test MRR over seeds 0-2 of 4 devices is within MRR_BOUND of
  one device's: a single seed varies by about 0.015 either way (Kinship's
  2k test triples), which a bound of 0.02 cannot take, while main's round
  order before the passes fell 0.08 short."""
  ones, manys = [], []
  for seed in SEEDS:
    out = subprocess.run([sys.executable, os.path.join(REPO, "tests", "sharded_quality_worker.py"),
                          "4", *SETTINGS, f"--config.train.seed={seed}"],
                         env={**cpu_env(4), "TWHIN_DATA_DIR": DATA},
                         capture_output=True, text=True, timeout=900, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    one, many = result["one"]["mrr"], result["many"]["mrr"]
    assert one > 0.5, f"one device learnt too little to compare with (test MRR {one:.3f})"
    ones.append(one)
    manys.append(many)
  gap = sum(manys) / len(manys) - sum(ones) / len(ones)
  assert abs(gap) <= MRR_BOUND, (
      f"4 devices: mean test MRR {manys} vs one device {ones} over seeds {SEEDS}: "
      f"gap {gap:+.4f} (bound {MRR_BOUND})")
