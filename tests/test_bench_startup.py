"""tools/bench_startup.py: a cold run fills the compilation cache that the
warm run then reads, and each row splits the time to the first bucket."""

from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cold_then_warm_rows_on_the_test_demo(tmp_path):
  out = subprocess.run([sys.executable, os.path.join(REPO, "tools", "bench_startup.py"),
                        "--config", os.path.join(REPO, "configs", "demo.py:test"),
                        "--dir", str(tmp_path), "--json"],
                       check=True, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, JAX_PLATFORMS="cpu")).stdout
  rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
  assert [r["cache"] for r in rows] == ["cold", "warm"]
  for r in rows:
    assert r["first_bucket_edges"] > 0
    parts = r["imports_s"] + r["trainer_setup_s"] + r["first_bucket_s"]
    assert abs(parts - r["to_first_bucket_s"]) < 1e-6
  cache = tmp_path / "compilation-cache"
  assert cache.is_dir() and any(cache.iterdir()), "the runs wrote no compiled programs"
