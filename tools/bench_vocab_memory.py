"""Peak memory of the vocabulary's readers: export and warm start at any entity count.

Builds, per entity count N, two graph directories holding what these readers
touch (manifest and on-disk vocabulary of one type "user"): the new version
with N names and a parent that shares 90% of them, in another id order. Names
are zero-padded keys ("u0000000042"), so both files stream out of a seeded
permutation without holding a name list. Then, each in a fresh Python process
so that its peak RSS is its own:

  export      ``export.export_embeddings`` of a [N, dim] table (Parquet with
              names, .npy, names.txt, the vocabulary copy)
  warm_start  ``versions.id_map``: parent id of every new id, the join a
              warm start makes
  name_dict   ``Graph._name_index``: the whole vocabulary as a dict, what
              export and warm start built before (for comparison)

For each it prints the RSS before the step (Python, numpy, pyarrow, jax and
the step's inputs, e.g. the table, loaded), the peak during the step, and the
difference ("added"): the memory the step itself took. The peak is reset
before the step (``/proc/self/clear_refs``), so the inputs' set-up does not
count. "Arrow peak" is the most Arrow's memory pool held live at once (the
decoded row groups and chunks); RSS also holds what the allocators keep after
a free, which varies by some tens of MiB from run to run.

Expected: export adds no memory per name (past its 1M-row Parquet chunk,
which is only half full at 0.5M entities); warm start adds 8 bytes per entity
(its int64 id map) and nothing per name; the dict takes about 150 bytes per
entity. docs/scale.md has the figures.

  python tools/bench_vocab_memory.py                         # 0.5M and 5M entities
  python tools/bench_vocab_memory.py --entities 100000 --json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PHASES = ("export", "warm_start", "name_dict")
CHUNK = 1 << 20


def _names(keys: np.ndarray) -> pa.Array:
  """"u" + the key zero-padded to 10 digits: name order == key order."""
  return pc.binary_join_element_wise(
      "u", pc.utf8_lpad(pc.cast(pa.array(keys), pa.string()), 10, "0"), "")


def write_graph(graph_dir: str, count: int, first_key: int, seed: int) -> None:
  """A graph directory (manifest, vocab of "user") whose id i names key
  ``first_key + perm[i]``, streamed a chunk at a time."""
  from twhin_jax import config as config_lib
  from twhin_jax import vocabulary
  from twhin_jax.graph import FORMAT_VERSION

  perm = np.random.default_rng(seed).permutation(count)
  inverse = np.empty(count, np.int64)
  inverse[perm] = np.arange(count)
  by_id = (pa.table({"name": _names(first_key + perm[s:s + CHUNK])})
           for s in range(0, count, CHUNK))
  by_name = (pa.table({"name": _names(np.arange(s, min(s + CHUNK, count)) + first_key),
                       "id": pa.array(inverse[s:s + CHUNK])})
             for s in range(0, count, CHUNK))
  vocabulary.write_vocabulary_streams(graph_dir, "user", by_id, by_name)
  manifest = {
      "format_version": FORMAT_VERSION, "hash": f"bench-{count}-{seed}",
      "schema": {"entities": {"user": {"count": count, "num_partitions": 1}},
                 "relations": [dict(name="follows", source="user", target="user",
                                    operator="translation", weight=1.0)]},
      "counts": {s: 0 for s in config_lib.SPLITS}, "bucket_sizes": {},
  }
  with open(os.path.join(graph_dir, "manifest.json"), "w") as f:
    json.dump(manifest, f)


def _status_kib(field: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> bool:
  """Resets VmHWM to the current RSS (Linux >= 4.0); False if refused."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def measure(phase: str, work: str, dim: int) -> dict:
  """Runs one phase in this process; returns its memory and time."""
  import ml_collections

  from twhin_jax import config as config_lib
  from twhin_jax import export
  from twhin_jax import versions
  from twhin_jax.graph import Graph
  from twhin_jax.model import RelationLayout

  graph = Graph(os.path.join(work, "new"))
  count = graph.entities["user"].count
  if phase == "export":
    config = config_lib.base_config()
    config.entities["user"] = ml_collections.ConfigDict(dict(num_partitions=1, dim=0))
    config.relations = [dict(name="follows", source="user", target="user",
                             operator="translation", weight=1.0)]
    config.model.dim = dim
    layout = RelationLayout.from_config(config)
    params = {k: np.asarray(v) for k, v in layout.init_params().items()}
    table = np.ones((count, dim), np.float32)  # resident before the peak is reset
    run = lambda: export.export_embeddings(graph, {"user": table}, params, layout,
                                           os.path.join(work, "export"), comparator="dot")
  elif phase == "warm_start":
    parent = Graph(os.path.join(work, "old"))
    run = lambda: int((versions.id_map(graph, parent, "user") >= 0).sum())
  else:
    run = lambda: len(graph._name_index["user"])
  reset = _reset_peak()
  before = _status_kib("VmRSS")
  started = time.perf_counter()
  result = run()
  seconds = time.perf_counter() - started
  peak = _status_kib("VmHWM")
  return {"phase": phase, "entities": count, "seconds": round(seconds, 2),
          "rss_before_mib": round(before / 1024, 1), "peak_mib": round(peak / 1024, 1),
          "added_mib": round((peak - before) / 1024, 1), "peak_reset": reset,
          "arrow_peak_mib": round(pa.default_memory_pool().max_memory() / 2**20, 1),
          "shared": result if phase == "warm_start" else None}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--entities", type=int, nargs="+", default=[500_000, 5_000_000])
  parser.add_argument("--dim", type=int, default=4, help="embedding dim of the export")
  parser.add_argument("--phases", nargs="+", default=list(PHASES), choices=PHASES)
  parser.add_argument("--workdir", default=None, help="scratch directory (default: a temp dir)")
  parser.add_argument("--json", action="store_true")
  parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # child: a phase
  args = parser.parse_args(argv)
  if args.measure:
    print(json.dumps(measure(args.measure, args.workdir, args.dim)))
    return 0
  scratch = args.workdir or tempfile.mkdtemp(prefix="bench_vocab_")
  results = []
  try:
    for count in args.entities:
      work = os.path.join(scratch, f"n{count}")
      shutil.rmtree(work, ignore_errors=True)
      started = time.perf_counter()
      write_graph(os.path.join(work, "new"), count, first_key=count // 10, seed=1)
      write_graph(os.path.join(work, "old"), count, first_key=0, seed=2)
      print(f"{count:,} entities: graphs written in {time.perf_counter() - started:.1f} s",
            file=sys.stderr)
      for phase in args.phases:
        child = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--measure", phase,
             "--workdir", work, "--dim", str(args.dim)],
            check=True, capture_output=True, text=True)
        result = json.loads(child.stdout.strip().splitlines()[-1])
        if phase == "warm_start" and result["shared"] != count - count // 10:
          raise RuntimeError(f"warm start shared {result['shared']}, "
                             f"expected {count - count // 10}")
        results.append(result)
        if not args.json:
          print(f"  {phase:<11} {result['seconds']:>7.1f} s   RSS before "
                f"{result['rss_before_mib']:>7.1f} MiB   peak {result['peak_mib']:>7.1f} MiB"
                f"   added {result['added_mib']:>7.1f} MiB   Arrow peak "
                f"{result['arrow_peak_mib']:>6.1f} MiB", flush=True)
  finally:
    if args.workdir is None:
      shutil.rmtree(scratch, ignore_errors=True)
  if args.json:
    print(json.dumps(results, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
