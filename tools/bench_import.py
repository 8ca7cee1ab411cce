"""Import throughput and memory benchmark.

Generates (or takes with --input) a TSV edge file ``head<TAB>relation<TAB>tail``
with power-law-ish entity popularity, imports it with ``import_graph`` into
P partitions, and prints edges, seconds, edges/s and the peak resident memory
of the import. The input is generated in chunks of 2M edges, so a 100M-edge
file takes no more memory than a small one.

The import runs in a fresh child process so that its peak RSS
(``ru_maxrss``) measures the importer alone, not the generator; the child's
RSS before the import (Python, numpy, pyarrow loaded) is printed as the
baseline.

  python tools/bench_import.py                 # 10M edges, 1M entities, P=4
  python tools/bench_import.py --edges 1000000 --json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv


def generate(path: str, num_edges: int, num_entities: int, num_relations: int,
             seed: int = 0, chunk_edges: int = 1 << 21) -> None:
  """Writes a TSV of ``num_edges`` edges. Ids are drawn as ``N * u**3``
  (density ~ x^(-2/3): a few hubs, a long tail), then relabelled with a
  random permutation so popularity is not correlated with the id."""
  rng = np.random.default_rng(seed)
  relabel = rng.permutation(num_entities)
  schema = pa.schema([("head", pa.string()), ("relation", pa.string()), ("tail", pa.string())])
  options = pacsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
  relation_names = pa.array([f"rel{i}" for i in range(num_relations)])

  def names(count: int) -> pa.Array:
    ids = relabel[(num_entities * rng.random(count) ** 3).astype(np.int64)]
    return pc.binary_join_element_wise("n", pc.cast(pa.array(ids), pa.string()), "")

  with pacsv.CSVWriter(path, schema, write_options=options) as writer:
    for start in range(0, num_edges, chunk_edges):
      count = min(chunk_edges, num_edges - start)
      relations = relation_names.take(pa.array(rng.integers(0, num_relations, count)))
      writer.write_table(pa.table([names(count), relations, names(count)], schema=schema))


def _import_in_child(path: str, graph_dir: str, partitions: int, num_relations: int,
                     engine: str, memory_limit: str, threads: int, results) -> None:
  import ml_collections
  import psutil
  from twhin_jax import config as config_lib
  from twhin_jax import importer

  config = config_lib.base_config()
  config.entities.node = ml_collections.ConfigDict(dict(num_partitions=partitions, dim=0))
  config.relations = [dict(name=f"rel{i}", source="node", target="node",
                           operator="translation", weight=1.0) for i in range(num_relations)]
  config.data.files = [config_lib.file_spec(path, format="tsv")]
  config.data.import_engine = engine
  config.data.import_memory_limit = memory_limit
  config.data.import_threads = threads
  baseline = psutil.Process().memory_info().rss
  before = resource.getrusage(resource.RUSAGE_SELF)
  cpu_before = before.ru_utime + before.ru_stime
  start = time.perf_counter()
  graph = importer.import_graph(config, graph_dir, progress=False)
  seconds = time.perf_counter() - start
  usage = resource.getrusage(resource.RUSAGE_SELF)
  peak_kib = usage.ru_maxrss  # KiB on Linux
  results.put(dict(edges=graph.num_edges("train"), entities=graph.entities["node"].count,
                   partitions=partitions, engine=engine, memory_limit=memory_limit,
                   threads=threads or os.cpu_count(), seconds=round(seconds, 2),
                   edges_per_s=round(graph.num_edges("train") / seconds),
                   # CPU time of the import (all threads): on a busy machine
                   # a steadier figure than wall time.
                   cpu_seconds=round(usage.ru_utime + usage.ru_stime - cpu_before, 2),
                   peak_rss_mib=round(peak_kib / 1024, 1),
                   baseline_rss_mib=round(baseline / 2 ** 20, 1)))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--edges", type=int, default=10_000_000)
  parser.add_argument("--entities", type=int, default=1_000_000)
  parser.add_argument("--relations", type=int, default=4)
  parser.add_argument("--partitions", type=int, default=4)
  parser.add_argument("--engine", default="duckdb", choices=("duckdb", "spark"))
  parser.add_argument("--memory-limit", default="1GB", help="data.import_memory_limit")
  parser.add_argument("--threads", type=int, default=0, help="data.import_threads (0: all)")
  parser.add_argument("--input", help="an existing TSV (head, relation rel0..relR-1, tail)")
  parser.add_argument("--workdir", help="where to put the generated file and graph "
                      "(default: a temporary folder, removed afterwards)")
  parser.add_argument("--json", action="store_true", help="print one JSON object")
  args = parser.parse_args(argv)

  workdir = args.workdir or tempfile.mkdtemp(prefix="bench_import_")
  os.makedirs(workdir, exist_ok=True)
  try:
    path = args.input
    generate_seconds = 0.0
    if path is None:
      path = os.path.join(workdir, "edges.tsv")
      start = time.perf_counter()
      generate(path, args.edges, args.entities, args.relations)
      generate_seconds = time.perf_counter() - start
    graph_dir = os.path.join(workdir, "graph")
    shutil.rmtree(graph_dir, ignore_errors=True)
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    child = context.Process(target=_import_in_child,
                            args=(path, graph_dir, args.partitions, args.relations, args.engine,
                                  args.memory_limit, args.threads, results))
    child.start()
    child.join()
    if child.exitcode != 0:
      sys.exit(f"import failed in the child process (exit code {child.exitcode})")
    result = results.get()
    result.update(input_mib=round(os.path.getsize(path) / 2 ** 20, 1),
                  generate_seconds=round(generate_seconds, 2))
  finally:
    if args.workdir is None:
      shutil.rmtree(workdir, ignore_errors=True)

  if args.json:
    print(json.dumps(result))
    return
  width = max(len(k) for k in result)
  for key, value in result.items():
    print(f"{key:<{width}}  {value:,}" if isinstance(value, int) else f"{key:<{width}}  {value}")


if __name__ == "__main__":
  main()
