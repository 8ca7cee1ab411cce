#!/usr/bin/env python
"""Training peak RSS with a timeline tagged by residency phase (issue 11, item 1).

  python tools/rss_timeline.py --graph-file G.tsv --workdir W --edges 1e7 --entities 4e6 \\
      --partitions 16 --buckets 40 --out timeline.json

W must hold the graph imported from G.tsv with the same --partitions (as
tools/bench_scale.py's import phase makes it; W's tables, checkpoints and
metrics are removed first). Trains --buckets buckets in this process while a
thread samples RSS every 50 ms; each sample names the Residency / Trainer
methods running (load, load_block, write_back, relayout, train_bucket, ...),
so a peak points at its phase. Each sample also splits RSS into anonymous
memory (heap, JAX buffers) and file-backed pages (RssAnon / RssFile of
/proc/self/status: pages of memory-mapped files, such as bucket files, count
in RSS while they stay mapped). After every bucket it records the
memory-mapped bucket files still open (their count and resident MiB, from
/proc/self/smaps) and glibc's heap (mallinfo2: bytes in use and bytes free
but kept). Prints one JSON object: peak RSS (sampled and ru_maxrss), the
phase at the peak, RssAnon and RssFile at the peak, the largest bucket-file
mapping seen, edges/s over the bucket seconds, the process's CPU seconds
(user + system, all threads; steadier than edges/s on a shared machine);
--out keeps the samples and
the per-bucket records. Run it with another branch's twhin_jax first on the
path to compare branches on the same graph.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import sys
import threading
import time

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

#: /proc/self/status fields sampled (kB there, MiB here).
STATUS_FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem")


def status_mib() -> dict[str, float]:
  """RSS and its anonymous / file-backed / shared parts, MiB (Linux)."""
  out = {}
  try:
    with open("/proc/self/status") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key in STATUS_FIELDS:
          out[key] = int(value.split()[0]) / 1024
  except OSError:
    pass
  return out


def mapped_files_mib(marker: str) -> dict[str, float]:
  """Memory mappings of files whose path contains ``marker``: how many, and
  their resident MiB (/proc/self/smaps)."""
  count, rss_kib, inside = 0, 0, False
  try:
    with open("/proc/self/smaps") as f:
      for line in f:
        first = line.split(maxsplit=5)
        if len(first) >= 5 and "-" in first[0] and not first[0].endswith(":"):
          inside = len(first) == 6 and marker in first[5]
          count += inside
        elif inside and line.startswith("Rss:"):
          rss_kib += int(line.split()[1])
  except OSError:
    pass
  return {"mapped_bucket_files": count, "mapped_bucket_mib": rss_kib / 1024}


def heap_mib() -> dict[str, float]:
  """glibc's heap (mallinfo2): bytes allocated and in use, free but kept."""
  from twhin_jax import residency  # after sys.path is set; imports jax
  info = residency.heap_info()
  if info is None:
    return {}
  return {"heap_in_use_mib": (info.uordblks + info.hblkhd) / 2**20,
          "heap_free_kept_mib": info.fordblks / 2**20}


PHASES = {"Residency": ["load", "_load_block", "_write_back", "_bound_writes", "_relayout",
                        "flush", "_slice_chunk", "_write_slices", "_fetch", "read_block"],
          "Trainer": ["train_bucket", "_finish_bucket", "save_checkpoint"]}


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
  import bench_train  # noqa: E402 - tools/ is not a package
  bench_train.remove_training_state(args.workdir)
  process, start = psutil.Process(), time.perf_counter()
  samples, active, lock, stop = [], {}, threading.Lock(), threading.Event()

  def sample():
    while not stop.is_set():
      with lock:
        running = ",".join(sorted(k for k, v in active.items() if v > 0))
      parts = status_mib()
      samples.append((time.perf_counter() - start, process.memory_info().rss / 2**20, running,
                      parts.get("RssAnon", 0.0), parts.get("RssFile", 0.0)))
      time.sleep(0.05)

  per_bucket = []
  bucket_marker = os.sep + "buckets" + os.sep
  original_finish = train_lib.Trainer._finish_bucket

  @functools.wraps(original_finish)
  def finish_bucket(self, done, bar):
    # After the bucket's steps have run (train_bucket only dispatches them).
    result = original_finish(self, done, bar)
    per_bucket.append({"at_s": time.perf_counter() - start, "epoch": done.epoch,
                       "bucket_index": done.index, **status_mib(),
                       **mapped_files_mib(bucket_marker), **heap_mib()})
    return result
  train_lib.Trainer._finish_bucket = finish_bucket

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
            "peak_rss_anon_mib": peak[3], "peak_rss_file_mib": peak[4],
            "max_rss_file_mib": max(s[4] for s in samples),
            "max_mapped_bucket_files": max((b["mapped_bucket_files"] for b in per_bucket), default=0),
            "max_mapped_bucket_mib": max((b["mapped_bucket_mib"] for b in per_bucket), default=0),
            "last_bucket": per_bucket[-1] if per_bucket else None,
            "rss_bound_mib": bench_scale.rss_bound_bytes(row["entities"], args.partitions,
                                                         args.dim) / 2**20,
            "buckets": len(buckets), "edges": edges, "edges_per_s": edges / max(seconds, 1e-9),
            "cpu_s": sum(os.times()[:2])}
  print(json.dumps(result))
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"samples": samples, "buckets": per_bucket, "result": result}, f)


if __name__ == "__main__":
  main()
