#!/usr/bin/env python
"""Training peak RSS with a timeline tagged by residency phase (issue 11, item 1).

  python tools/rss_timeline.py --graph-file G.tsv --workdir W --edges 1e7 --entities 4e6 \\
      --partitions 16 --buckets 40 --out timeline.json

W must hold the graph imported from G.tsv with the same --partitions (as
tools/bench_scale.py's import phase makes it; W's tables, checkpoints and
metrics are removed first). Trains --buckets buckets in this process while a
thread samples RSS every 50 ms; each sample names the Residency / Trainer
methods running (load, load_block, write_back, relayout, train_bucket, ...),
so a peak points at its phase. Prints one JSON object: peak RSS (sampled and
ru_maxrss), the phase at the peak, edges/s over the bucket seconds; --out
keeps the samples. Run it with another branch's twhin_jax first on the path
to compare branches on the same graph.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import shutil
import sys
import threading
import time

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

PHASES = {"Residency": ["load", "_load_block", "_write_back", "_bound_writes", "_relayout",
                        "flush", "_extract", "_fetch", "read_block"],
          "Trainer": ["train_bucket", "save_checkpoint"]}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--graph-file", required=True)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--edges", type=float, required=True)
  parser.add_argument("--entities", type=float, required=True)
  parser.add_argument("--partitions", type=int, required=True)
  parser.add_argument("--dim", type=int, default=128)
  parser.add_argument("--buckets", type=int, default=None)
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  import bench_scale  # noqa: E402 - tools/ is not a package
  from twhin_jax import residency
  from twhin_jax import train as train_lib
  for name in ("checkpoints", "tables", train_lib.METRICS_FILE, train_lib.CONFIG_FILE):
    path = os.path.join(args.workdir, name)
    if os.path.isdir(path):
      shutil.rmtree(path)
    elif os.path.exists(path):
      os.remove(path)
  process, start = psutil.Process(), time.perf_counter()
  samples, active, lock, stop = [], {}, threading.Lock(), threading.Event()

  def sample():
    while not stop.is_set():
      with lock:
        running = ",".join(sorted(k for k, v in active.items() if v > 0))
      samples.append((time.perf_counter() - start, process.memory_info().rss / 2**20, running))
      time.sleep(0.05)

  def tag(cls, name):
    fn = getattr(cls, name)

    @functools.wraps(fn)
    def tagged(*a, **k):
      with lock:
        active[name] = active.get(name, 0) + 1
      try:
        return fn(*a, **k)
      finally:
        with lock:
          active[name] -= 1
    setattr(cls, name, tagged)

  for cls in (residency.Residency, train_lib.Trainer):
    for name in PHASES[cls.__name__]:
      if hasattr(cls, name):  # the methods differ between branches
        tag(cls, name)
  threading.Thread(target=sample, daemon=True).start()
  row = {"edges": int(args.edges), "entities": int(args.entities),
         "partitions": args.partitions, "dim": args.dim, "max_buckets": args.buckets}
  trainer = train_lib.train(bench_scale.scale_config(args.graph_file, row), args.workdir,
                            progress=False, stop_after_buckets=args.buckets)
  trainer.close()
  stop.set()
  with open(os.path.join(args.workdir, train_lib.METRICS_FILE)) as f:
    buckets = [json.loads(line) for line in f if "bucket_index" in line]
  edges, seconds = sum(b["edges"] for b in buckets), sum(b["seconds"] for b in buckets)
  peak = max(samples, key=lambda s: s[1])
  result = {"peak_rss_mib": max(peak[1], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "peak_phase": peak[2], "peak_at_s": peak[0],
            "rss_bound_mib": bench_scale.rss_bound_bytes(row["entities"], args.partitions,
                                                         args.dim) / 2**20,
            "buckets": len(buckets), "edges": edges, "edges_per_s": edges / max(seconds, 1e-9)}
  print(json.dumps(result))
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"samples": samples, "result": result}, f)


if __name__ == "__main__":
  main()
