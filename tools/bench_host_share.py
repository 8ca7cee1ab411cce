"""Per-host reads: edges, bytes and peak RSS of every training process, one
process against several (jax.distributed on localhost, fake CPU devices).

  python tools/bench_host_share.py --edges 1000000 --nodes 100000 --partitions 1 4

Generates a power-law graph (twhin_jax.generate.power_law), imports it once
per partition count P (buckets grouped by cell, bucket_index.py), then trains
one epoch on a mesh of ``--devices`` devices, first in one process (every
device local: it reads every edge), then in each count of ``--processes``
(devices split evenly: each process reads the cells of its own devices).
Prints one row per process (or --json, one object each): edges and bytes it
read from the bucket files (bucket_index.READ_STATS), the edges its devices
trained, its peak RSS (including the JAX runtime) and the epoch's edges/s.
The model is bench_train.py's (d from --dim).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def worker(args) -> None:
  """One training process (its own jax; jax.distributed when several)."""
  sys.path.insert(0, HERE)
  from bench_train import bench_config

  from twhin_jax import bucket_index
  from twhin_jax import distributed
  from twhin_jax import train as train_lib
  if int(os.environ.get(distributed.ENV_NUM_PROCESSES, "1")) > 1:
    distributed.initialize()
  config = bench_config(args.graph_file, args.worker_partitions, args.dim, 1, args.relations,
                        devices=args.devices)
  config.train.batch_preparation = "host"
  trainer = train_lib.train(config, args.workdir, progress=False)
  last = trainer.history[-1]
  import jax
  stats = bucket_index.READ_STATS
  print("RESULT " + json.dumps({
      "partitions": args.worker_partitions, "processes": jax.process_count(),
      "process": jax.process_index(), "devices": trainer.num_shards,
      "local_devices": jax.local_device_count(), "bucket_edges": trainer.graph.num_edges(),
      "edges_read": stats.edges, "bytes_read": stats.bytes, "edges_trained_here": stats.kept,
      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      "epoch_seconds": last["seconds"], "edges_per_s": last["edges"] / last["seconds"]}),
      flush=True)
  trainer.close()


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run(args, graph_file: str, graph_dir: str, partitions: int, processes: int) -> list[dict]:
  """One epoch in ``processes`` processes; their RESULT objects."""
  workdir = tempfile.mkdtemp(prefix=f"p{partitions}-n{processes}-", dir=args.dir)
  os.symlink(graph_dir, os.path.join(workdir, "graph"))  # imported once, read by all
  port = free_port()
  procs = []
  for index in range(processes):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
               XLA_FLAGS=f"--xla_force_host_platform_device_count={args.devices // processes}")
    if processes > 1:
      env.update(TWHIN_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                 TWHIN_NUM_PROCESSES=str(processes), TWHIN_PROCESS_ID=str(index))
    procs.append(subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--phase", "train", "--graph-file",
         graph_file, "--workdir", workdir, "--worker-partitions", str(partitions),
         "--dim", str(args.dim), "--relations", str(args.relations),
         "--devices", str(args.devices)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  rows = []
  for proc in procs:
    out, _ = proc.communicate(timeout=3600)
    if proc.returncode:
      raise RuntimeError(f"a training process failed:\n{out[-3000:]}")
    rows.append(json.loads([x for x in out.splitlines() if x.startswith("RESULT ")][-1][7:]))
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--nodes", type=int, default=100_000)
  parser.add_argument("--edges", type=int, default=1_000_000)
  parser.add_argument("--relations", type=int, default=4)
  parser.add_argument("--dim", type=int, default=32)
  parser.add_argument("--partitions", type=int, nargs="+", default=[1, 4])
  parser.add_argument("--devices", type=int, default=4, help="devices of the mesh, all processes")
  parser.add_argument("--processes", type=int, nargs="+", default=[2],
                      help="process counts to compare with one process")
  parser.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
  parser.add_argument("--json", action="store_true")
  parser.add_argument("--phase", choices=("import", "train"), help=argparse.SUPPRESS)
  parser.add_argument("--graph-file", help=argparse.SUPPRESS)
  parser.add_argument("--workdir", help=argparse.SUPPRESS)
  parser.add_argument("--worker-partitions", type=int, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.phase == "train":
    worker(args)
    return
  if any(args.devices % n for n in args.processes):
    parser.error(f"--devices {args.devices} must divide evenly over --processes {args.processes}")

  from twhin_jax import generate
  args.dir = args.dir or tempfile.mkdtemp(prefix="twhin-host-share-")
  os.makedirs(args.dir, exist_ok=True)
  graph_file = os.path.join(args.dir, "power_law.tsv")
  if not os.path.exists(graph_file):
    generate.power_law(graph_file, num_nodes=args.nodes, num_edges=args.edges,
                       num_relations=args.relations, seed=0, progress=False)
  rows = []
  for partitions in args.partitions:
    base = os.path.join(args.dir, f"import_p{partitions}")
    if not os.path.exists(os.path.join(base, "graph", "manifest.json")):
      subprocess.run([sys.executable, os.path.join(HERE, "bench_train.py"), "--phase", "import",
                      "--graph-file", graph_file, "--workdir", base, "--worker-partitions",
                      str(partitions), "--relations", str(args.relations)],
                     check=True, env=dict(os.environ, PYTHONPATH=REPO))
    for processes in [1] + list(args.processes):
      started = time.perf_counter()
      for row in run(args, graph_file, os.path.join(base, "graph"), partitions, processes):
        row["wall_seconds"] = round(time.perf_counter() - started, 1)
        rows.append(row)
        if args.json:
          print(json.dumps(row), flush=True)
  if not args.json:
    print(f"\npower_law {args.nodes:,} nodes, {args.edges:,} edges, d={args.dim}, "
          f"{args.devices} devices in all, one epoch\n")
    print("| P | processes | process | edges read | MiB read | edges its devices trained "
          "| peak RSS MiB | edges/s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
      print(f"| {r['partitions']} | {r['processes']} | {r['process']} | {r['edges_read']:,} | "
            f"{r['bytes_read'] / 2 ** 20:,.1f} | {r['edges_trained_here']:,} | "
            f"{r['peak_rss_mib']:,.0f} | {r['edges_per_s']:,.0f} |")


if __name__ == "__main__":
  main()
