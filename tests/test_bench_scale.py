"""tools/bench_scale.py: the plan (d over RAM, fitting the disk) and a tiny
end-to-end run (generate, import, train in subprocesses; JSON, table, PNG)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "bench_scale.py")

_spec = importlib.util.spec_from_file_location("bench_scale", TOOL)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

GIB = 2 ** 30
ISSUE_KEYS = ("edges", "entities", "import_edges_per_s", "import_peak_rss_mib",
              "train_edges_per_s", "train_peak_rss_mib", "tables_mib")


def test_parse_sizes():
  assert bench.parse_sizes("1e7:1e6:4, 2000:100") == [
      dict(edges=10_000_000, entities=1_000_000, partitions=4),
      dict(edges=2000, entities=100, partitions=None)]
  for bad in ("1e7", "1e7:x", "1.5:10", "0:10", "1:2:3:4", ""):
    with pytest.raises(ValueError):
      bench.parse_sizes(bad)


def test_plan_puts_the_largest_tables_over_ram():
  sizes = bench.parse_sizes("1e7:1e6:4,1e8:1e7:16,5e8:5e7:32")
  ram = 24 * GIB
  rows, notes = bench.plan_rows(sizes, dim=128, max_dim=256, free_bytes=400 * GIB,
                                ram_bytes=ram, max_buckets=64)
  small, middle, large = rows
  assert (small["dim"], middle["dim"]) == (128, 128)
  assert small["max_buckets"] is None and middle["max_buckets"] is None
  assert large["max_buckets"] == 64
  assert large["dim"] % 8 == 0
  assert bench.tables_bytes(large["entities"], large["dim"]) > ram
  # ... and the smallest such d: 8 less would not be over RAM.
  assert bench.tables_bytes(large["entities"], large["dim"] - 8) <= ram
  assert (large["edges"], large["entities"]) == (500_000_000, 50_000_000)
  assert any("exceed RAM" in n for n in notes)
  # A machine with more RAM gets a larger d.
  rows, _ = bench.plan_rows(sizes, 128, 256, 400 * GIB, 30 * GIB, 64)
  assert rows[2]["dim"] == 168 and bench.tables_bytes(50_000_000, 168) > 30 * GIB


def test_plan_shrinks_the_largest_row_to_the_disk():
  sizes = bench.parse_sizes("1e7:1e6:4,5e8:5e7:32")
  free = 60 * GIB
  rows, notes = bench.plan_rows(sizes, dim=128, max_dim=256, free_bytes=free,
                                ram_bytes=30 * GIB, max_buckets=64)
  large = rows[1]
  assert bench.disk_bytes(large["edges"], large["entities"], large["dim"]) <= 0.9 * free
  assert large["dim"] == 128  # d goes back to --dim before the graph shrinks
  assert large["edges"] < 500_000_000 and large["entities"] < 50_000_000
  # Edges and entities shrink together (the same factor).
  assert large["edges"] / large["entities"] == pytest.approx(10, rel=1e-3)
  assert any(n.startswith("disk:") for n in notes)
  # With room to spare nothing shrinks.
  rows, _ = bench.plan_rows(sizes, 128, 256, 400 * GIB, 24 * GIB, 64)
  assert rows[1]["edges"] == 500_000_000


def test_rss_bound():
  # 2 partitions of ceil(10 / 4) = 3 rows, d + 1 = 9 floats each, + 1.5 GiB.
  assert bench.rss_bound_bytes(10, 4, 8) == 2 * 3 * 9 * 4 + 1.5 * GIB


def test_tiny_run(tmp_path):
  """One tiny row end to end: the issue's JSON keys, plausible values, the PNG."""
  png = tmp_path / "scale.png"
  env = dict(os.environ, PYTHONPATH=REPO)
  out = subprocess.run([sys.executable, TOOL, "--sizes", "20000:2000:2", "--dir",
                        str(tmp_path / "scratch"), "--plot", str(png), "--json"],
                       check=True, capture_output=True, text=True, env=env, timeout=900)
  rows = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
  assert len(rows) == 1
  row = rows[0]
  for key in ISSUE_KEYS + ("partitions", "import_s", "disk_used_mib", "rss_bound_mib"):
    assert key in row, key
  assert (row["edges"], row["entities"], row["partitions"], row["dim"]) == (20000, 2000, 2, 128)
  assert row["trained_edges"] == 20000  # one full epoch: every edge once
  assert row["buckets_trained"] == row["buckets_total"] == 4
  assert 0 < row["entities_imported"] <= 2000
  assert row["tables_mib"] == pytest.approx(2000 * 129 * 4 / 2 ** 20)
  for key in ("import_edges_per_s", "train_edges_per_s", "import_peak_rss_mib",
              "train_peak_rss_mib", "disk_used_mib"):
    assert row[key] > 0, key
  # JAX alone takes far more than the tiny tables; the bound holds easily.
  assert 100 < row["train_peak_rss_mib"] < row["rss_bound_mib"]
  # The row's input and run were deleted; its numbers stay in the results file.
  assert sorted(os.listdir(tmp_path / "scratch")) == ["bench_scale.jsonl"]
  with open(png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert png.stat().st_size > 10_000
  # The results file feeds the table.
  table = bench.format_table(bench.read_results(str(tmp_path / "scratch" / "bench_scale.jsonl")))
  assert "| 20,000 | 2,000 | 2 | 128 |" in table and "1 epoch" in table


def test_import_then_train_in_two_stages(tmp_path):
  """--stage import keeps the imported row; --stage train finishes it later
  with the import's columns, and refuses a row that was never imported."""
  scratch = tmp_path / "scratch"
  env = dict(os.environ, PYTHONPATH=REPO)
  base = [sys.executable, TOOL, "--sizes", "20000:2000:2", "--dir", str(scratch), "--json",
          "--plot", str(tmp_path / "scale.png")]
  missing = subprocess.run(base + ["--stage", "train"], capture_output=True, text=True, env=env,
                           timeout=300)
  assert missing.returncode != 0 and "run --stage import for this row first" in missing.stderr
  subprocess.run(base + ["--stage", "import"], check=True, capture_output=True, text=True,
                 env=env, timeout=900)
  (run_dir,) = [p for p in scratch.iterdir() if p.name.startswith("run_")]
  assert (run_dir / bench.IMPORTED_ROW_FILE).exists()
  assert not list(scratch.glob("*.tsv"))  # the input goes once imported
  assert not (scratch / "bench_scale.jsonl").exists()  # no row until it is trained
  # Bucket records of another run on the imported graph (tools/rss_timeline.py)
  # are neither resumed nor counted.
  stale = {"epoch": 0, "bucket": [0, 0], "bucket_index": 0, "edges": 12345, "seconds": 1.0}
  (run_dir / "metrics.jsonl").write_text(json.dumps(stale) + "\n")
  out = subprocess.run(base + ["--stage", "train"], check=True, capture_output=True, text=True,
                       env=env, timeout=900)
  (row,) = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
  recorded = json.loads((scratch / "bench_scale.jsonl").read_text())
  assert row["import_s"] == recorded["import_s"] > 0
  assert row["trained_edges"] == 20000 and row["train_peak_rss_mib"] > 0
  assert row["buckets_trained"] == row["buckets_total"] == 4
  assert sorted(os.listdir(scratch)) == ["bench_scale.jsonl"]
