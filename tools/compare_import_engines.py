"""Spark vs DuckDB on a generated graph: time of each engine and whether
the two graph directories are identical (manifest hash, vocabulary files,
buckets, degrees, statistics).

  PYTHONPATH=. python tools/compare_import_engines.py [WORKDIR] [EDGES]
"""
import json, os, sys, time, shutil, resource
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy as np, pyarrow.parquet as pq, ml_collections
from bench_import import generate
from twhin_jax import config as config_lib, importer
from twhin_jax.graph import Graph
root = sys.argv[1] if len(sys.argv) > 1 else "compare_engines"
edges = int(sys.argv[2]) if len(sys.argv) > 2 else 10_000_000
os.makedirs(root, exist_ok=True)
path = os.path.join(root, "edges.tsv")
if not os.path.exists(path):
  generate(path, edges, edges // 10, 4)
config = config_lib.base_config()
config.entities.node = ml_collections.ConfigDict(dict(num_partitions=4, dim=0))
config.relations = [dict(name=f"rel{i}", source="node", target="node", operator="translation", weight=1.0) for i in range(4)]
config.data.files = [config_lib.file_spec(path, format="tsv")]
config.data.import_memory_limit = "2GB"
result = {}
for engine in ("spark", "duckdb"):
  out = os.path.join(root, engine); shutil.rmtree(out, ignore_errors=True)
  t = time.perf_counter(); c = time.process_time()
  importer.import_graph(config, out, progress=False, engine=engine)
  result[engine] = dict(seconds=round(time.perf_counter() - t, 1), driver_cpu_s=round(time.process_time() - c, 1))
  print(engine, result[engine], flush=True)
a, b = Graph(os.path.join(root, "duckdb")), Graph(os.path.join(root, "spark"))
same = a.manifest["hash"] == b.manifest["hash"] and a.bucket_sizes() == b.bucket_sizes()
for (i, j) in a.bucket_sizes():
  ea, eb = a.bucket_edges(i, j), b.bucket_edges(i, j)
  same &= all(np.array_equal(ea[k], eb[k]) for k in ("src", "dst", "rel"))
same &= np.array_equal(a.degrees("node"), b.degrees("node"))
for suffix in (".parquet", ".by_name.parquet"):
  ta = pq.read_table(os.path.join(a.path, "vocab", "node" + suffix))
  tb = pq.read_table(os.path.join(b.path, "vocab", "node" + suffix))
  same &= ta.equals(tb)
for k in ("quality", "coverage", "counts"):
  same &= a.manifest[k] == b.manifest[k]
result.update(edges=a.num_edges("train"), entities=a.entities["node"].count, identical=bool(same),
              peak_rss_mib_python=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
print(json.dumps(result))
