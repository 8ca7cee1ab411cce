"""ScaNN vs exact (JAX brute-force) retrieval on clustered random vectors.

    .venv/bin/python tools/bench_retrieval.py [--json] [--n 1000000 --d 128 --queries 1000]

Data: N rows from a Gaussian mixture (``--clusters`` centers ~ N(0, I), rows =
center + ``--noise`` * N(0, I)), as trained embeddings are clustered; the
queries are fresh draws from the same mixture. Metric: inner product (the
default dot comparator). Ground truth is ``retrieval.ExactSearcher`` (a
jitted scan over 16k-row blocks, queries in batches of 1024); ScaNN uses
``retrieval.choose_settings(N, d, "dot")`` and answers all queries in one
``search_batched_parallel`` call (batch = all queries, both cores). Also
sweeps the query-time knobs (leaves searched, candidates reordered).

recall@10 = |ScaNN top-10 ∩ exact top-10| / 10, averaged over queries.
QPS = queries / wall seconds of the search call (after one warm-up call).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from twhin_jax import retrieval


def mixture(n: int, d: int, clusters: int, noise: float, rng: np.random.Generator,
            centers: np.ndarray | None = None, chunk: int = 1 << 17):
  """Rows of a Gaussian mixture, generated in chunks (float32 [n, d])."""
  if centers is None:
    centers = rng.standard_normal((clusters, d), dtype=np.float32)
  out = np.empty((n, d), np.float32)
  for start in range(0, n, chunk):
    m = min(chunk, n - start)
    out[start:start + m] = centers[rng.integers(clusters, size=m)]
    out[start:start + m] += noise * rng.standard_normal((m, d), dtype=np.float32)
  return out, centers


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
  k = truth.shape[1]
  hits = [len(np.intersect1d(a[:k], b)) for a, b in zip(found, truth)]
  return float(np.mean(hits)) / k


def timed(fn, repeats: int = 1):
  fn()  # warm-up (compilation, caches)
  started = time.perf_counter()
  for _ in range(repeats):
    result = fn()
  return result, (time.perf_counter() - started) / repeats


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--n", type=int, default=1_000_000)
  parser.add_argument("--d", type=int, default=128)
  parser.add_argument("--queries", type=int, default=1000)
  parser.add_argument("--k", type=int, default=10)
  parser.add_argument("--clusters", type=int, default=1000)
  parser.add_argument("--noise", type=float, default=0.7)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--sweep", default="10:100,20:100,20:250,50:250",
                      help="leaves_to_search:reorder pairs to try at query time")
  parser.add_argument("--json", action="store_true", help="print one JSON object")
  args = parser.parse_args(argv)

  rng = np.random.default_rng(args.seed)
  started = time.perf_counter()
  table, centers = mixture(args.n, args.d, args.clusters, args.noise, rng)
  queries, _ = mixture(args.queries, args.d, args.clusters, args.noise, rng, centers)
  generate_s = time.perf_counter() - started

  started = time.perf_counter()
  exact = retrieval.ExactSearcher(table, "dot_product")
  exact_setup_s = time.perf_counter() - started
  (truth, _), exact_s = timed(lambda: exact.search(queries, args.k))
  del exact

  settings = retrieval.choose_settings(args.n, args.d, "dot")
  started = time.perf_counter()
  searcher = retrieval.build_scann(table, settings, k=args.k)
  build_s = time.perf_counter() - started

  def scann_run(leaves: int, reorder: int):
    return searcher.search_batched_parallel(
        queries, final_num_neighbors=args.k, leaves_to_search=leaves,
        pre_reorder_num_neighbors=reorder)

  (found, _), scann_s = timed(lambda: scann_run(settings.num_leaves_to_search, settings.reorder),
                              repeats=3)
  sweep = []
  for pair in filter(None, args.sweep.split(",")):
    leaves, reorder = (int(v) for v in pair.split(":"))
    (ids, _), seconds = timed(lambda: scann_run(leaves, reorder), repeats=3)
    sweep.append({"leaves_to_search": leaves, "reorder": reorder,
                  "recall_at_10": recall_at(ids, truth), "qps": args.queries / seconds})

  result = {
      "n": args.n, "d": args.d, "queries": args.queries, "k": args.k,
      "clusters": args.clusters, "noise": args.noise,
      "recall_at_10": recall_at(found, truth),
      "scann_qps": args.queries / scann_s,
      "exact_qps": args.queries / exact_s,
      "speedup": exact_s / scann_s,
      "build_seconds": build_s,
      "exact_setup_seconds": exact_setup_s,
      "generate_seconds": generate_s,
      "settings": settings.to_json(),
      "batch": {"scann": f"{args.queries} queries per search_batched_parallel call",
                "exact": f"{min(args.queries, 1024)} queries per jitted call, 16384-row blocks"},
      "sweep": sweep,
  }
  if args.json:
    print(json.dumps(result))
    return 0
  print(f"{args.n} x {args.d} rows ({args.clusters}-center Gaussian mixture, noise "
        f"{args.noise}), {args.queries} queries, top-{args.k}, inner product\n")
  print("| method | recall@10 | QPS | build s |")
  print("|---|---|---|---|")
  print(f"| exact (JAX brute force) | 1.000 | {result['exact_qps']:.0f} | "
        f"{exact_setup_s:.1f} (device copy) |")
  print(f"| ScaNN {settings.num_leaves} leaves, search {settings.num_leaves_to_search}, "
        f"AH 2 dims/block, reorder {settings.reorder} | {result['recall_at_10']:.3f} | "
        f"{result['scann_qps']:.0f} | {build_s:.1f} |")
  print(f"\nspeed-up over exact: {result['speedup']:.1f}x\n\nquery-time sweep:\n")
  print("| leaves_to_search | reorder | recall@10 | QPS |")
  print("|---|---|---|---|")
  for row in sweep:
    print(f"| {row['leaves_to_search']} | {row['reorder']} | {row['recall_at_10']:.3f} | "
          f"{row['qps']:.0f} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
