#!/usr/bin/env python
"""Training throughput and peak memory against the partition count.

Generates a power-law graph (default 1M nodes, 10M edges, 4 relations),
imports it once per partition count P, and trains it in a fresh process per P
(translation + dot, logistic loss, d=128, chunks of 50 edges with 50 batch +
50 uniform negatives, batch 1000, Adagrad lr 0.1 — PyTorch-BigGraph's settings
in ../shared/TOOLCHAIN.md). Prints a table, or one JSON object per setting
with --json:

  python tools/bench_train.py                    # P = 1, 4, 16
  python tools/bench_train.py --edges 1000000 --nodes 100000 --partitions 1 4
  python tools/bench_train.py --partitions 1 --batch-preparation host device

--batch-preparation sets train.batch_preparation (host: numpy in threads,
batching.py; device: inside jit, device_batching.py, one device only; auto:
device on GPU/TPU); each value is a row.

edges_per_s is measured over the last epoch (steady state: compiled, tables
initialised); it includes the checkpoint that ends the epoch before (every
epoch is checkpointed: the whole table at P=1), or with background
checkpoints (--background-checkpoints, on by default on a GPU or TPU) the
wait for its writes, if any is left, and the sync that puts them on disk
(--sync: storage.sync); with --checkpoint-every-seconds longer than the
run only the last epoch saves, after its time is taken; peak_rss_mib is the training process's maximum resident set,
including the JAX runtime (~0.3 GB on its own). The tables' full size
(V x d x 4 bytes + V x 4 for Adagrad) is printed beside it: with P partitions
only about 2V/P rows are resident.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def bench_config(graph_file: str, partitions: int, dim: int, epochs: int, relations: int,
                 chunk: int = 50, uniform: int = 50, batch: int = 1000, devices: int = 0):
  from twhin_jax import config as config_lib
  from twhin_jax import generate
  config = config_lib.base_config()
  config.name = f"bench-p{partitions}"
  entities, rels = generate.power_law_schema(num_partitions=partitions, num_relations=relations)
  config.entities = entities
  config.relations = rels
  config.data.files = [config_lib.file_spec(graph_file, source=0, relation=1, target=2)]
  config.model.dim = dim
  config.model.init_scale = 1e-3
  config.train.epochs = epochs
  config.train.batch_size = batch
  config.train.lr = 0.1
  config.train.relation_lr = 0.1
  config.train.loss = "logistic"
  config.train.bucket_order = "affinity"
  config.train.checkpoint_every_buckets = 0  # checkpoint at epoch ends only
  config.train.eval_every_epochs = 0
  config.negatives.chunk_size = chunk
  config.negatives.num_uniform = uniform
  config.mesh.num_devices = devices
  return config


def remove_training_state(workdir: str) -> None:
  """Deletes a run directory's tables, checkpoints, bucket records and
  config, keeping its imported graph: the next training starts from scratch
  instead of resuming (or counting) an earlier run on the same graph."""
  from twhin_jax import train as train_lib  # imports jax, in the worker only
  for name in ("checkpoints", "tables", train_lib.METRICS_FILE, train_lib.CONFIG_FILE):
    path = os.path.join(workdir, name)
    if os.path.isdir(path):
      shutil.rmtree(path)
    elif os.path.exists(path):
      os.remove(path)


def worker(args) -> None:
  """Runs in its own process: import (phase=import) or train (phase=train)."""
  from twhin_jax import train as train_lib
  config = bench_config(args.graph_file, args.worker_partitions, args.dim, args.epochs,
                        args.relations, args.chunk, args.uniform, args.batch, args.devices)
  config.model.matmul_precision = args.precision
  config.train.batch_preparation = args.worker_batch_preparation
  config.train.background_checkpoints = args.background_checkpoints
  config.storage.sync = args.sync
  config.train.checkpoint_every_seconds = (None if args.checkpoint_every_seconds == "auto"
                                           else float(args.checkpoint_every_seconds))
  if args.phase == "import":
    train_lib.prepare_graph(config, args.workdir, progress=False)
    return
  # Train from scratch on the imported graph (an earlier setting's tables and
  # checkpoints would be resumed, or refused for a different config).
  remove_training_state(args.workdir)
  started = time.perf_counter()
  if args.profile:
    # Where the trainer's main thread spends its wall time (waits on the
    # device or on checkpoint writes included); worker threads are not seen.
    import cProfile  # only with --profile
    import io
    import pstats
    profiler = cProfile.Profile()
    trainer = profiler.runcall(train_lib.train, config, args.workdir, progress=False)
    report = io.StringIO()
    pstats.Stats(profiler, stream=report).sort_stats("cumulative").print_stats(45)
    with open(args.profile, "w") as f:
      f.write(report.getvalue())
  else:
    trainer = train_lib.train(config, args.workdir, progress=False)
  total = time.perf_counter() - started
  last = trainer.history[-1]
  nodes = sum(e.count for e in trainer.graph.entities.values())
  trainer.close()
  import jax
  from twhin_jax import device_batching
  from twhin_jax import model
  device = jax.devices()[0]
  preparation = device_batching.resolve_path(config.train.batch_preparation, trainer.num_shards,
                                             jax.process_count(), device.platform)
  stats = device.memory_stats() or {}
  print(json.dumps({
      "partitions": args.worker_partitions,
      "batch": args.batch,
      "precision": model.resolve_matmul_precision(args.precision),  # auto -> per backend
      "batch_preparation": preparation,  # auto -> the path that ran
      "background_checkpoints": train_lib.background_checkpoints(config, trainer.mesh),
      "sync": args.sync,
      # auto -> 60 on a GPU or TPU, 0 on CPU
      "checkpoint_every_seconds": train_lib.checkpoint_interval(config, trainer.mesh),
      "device": f"{device.platform}:{getattr(device, 'device_kind', '')} x{trainer.num_shards}",
      "device_peak_mib": stats.get("peak_bytes_in_use", 0) / 2 ** 20,
      "edges": last["edges"],
      "epoch_seconds": last["seconds"],
      "edges_per_s": last["edges"] / last["seconds"],
      "total_seconds": total,
      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      "table_mib": nodes * (args.dim + 1) * 4 / 2 ** 20,
  }))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--nodes", type=int, default=1_000_000)
  parser.add_argument("--edges", type=int, default=10_000_000)
  parser.add_argument("--relations", type=int, default=4)
  parser.add_argument("--dim", type=int, default=128)
  parser.add_argument("--epochs", type=int, default=2)
  parser.add_argument("--partitions", type=int, nargs="+", default=[1, 4, 16])
  parser.add_argument("--chunk", type=int, default=50, help="C: edges per chunk = batch negatives")
  parser.add_argument("--uniform", type=int, default=50, help="U: uniform negatives per chunk")
  parser.add_argument("--batch", type=int, default=1000, help="edges per step")
  parser.add_argument("--devices", type=int, default=0, help="mesh.num_devices (0: all)")
  parser.add_argument("--precision", default="auto",
                      help="model.matmul_precision: auto, float32, tf32 (GPU), bfloat16")
  parser.add_argument("--batch-preparation", nargs="+", default=["auto"],
                      choices=("auto", "host", "device"),
                      help="train.batch_preparation; several values: a row each")
  parser.add_argument("--background-checkpoints", default="auto", choices=("auto", "on", "off"),
                      help="train.background_checkpoints (auto: on on a GPU or TPU)")
  parser.add_argument("--sync", default="checkpoint", choices=("checkpoint", "write", "none"),
                      help="storage.sync: when table writes reach the disk")
  parser.add_argument("--checkpoint-every-seconds", default="auto",
                      help="train.checkpoint_every_seconds: seconds (0: a checkpoint every "
                           "epoch) or auto (60 on a GPU or TPU, 0 on CPU)")
  parser.add_argument("--profile", default=None,
                      help="write the training process's cProfile (cumulative, top 45) here")
  parser.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
  parser.add_argument("--json", action="store_true", help="one JSON object per setting")
  # internal: the per-setting worker process
  parser.add_argument("--phase", choices=("import", "train"), help=argparse.SUPPRESS)
  parser.add_argument("--graph-file", help=argparse.SUPPRESS)
  parser.add_argument("--workdir", help=argparse.SUPPRESS)
  parser.add_argument("--worker-partitions", type=int, help=argparse.SUPPRESS)
  parser.add_argument("--worker-batch-preparation", default="auto", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.phase:
    worker(args)
    return

  from twhin_jax import generate
  scratch = args.dir or tempfile.mkdtemp(prefix="twhin-bench-")
  graph_file = os.path.join(scratch, "power_law.tsv")
  if not os.path.exists(graph_file):
    generate.power_law(graph_file, num_nodes=args.nodes, num_edges=args.edges,
                       num_relations=args.relations, seed=0, progress=not args.json)
  rows = []
  settings = [(p, prep) for p in args.partitions for prep in args.batch_preparation]
  for partitions, preparation in settings:
    workdir = os.path.join(scratch, f"p{partitions}")
    common = [sys.executable, os.path.abspath(__file__), "--graph-file", graph_file,
              "--workdir", workdir, "--worker-partitions", str(partitions),
              "--dim", str(args.dim), "--epochs", str(args.epochs),
              "--relations", str(args.relations), "--chunk", str(args.chunk),
              "--uniform", str(args.uniform), "--batch", str(args.batch),
              "--devices", str(args.devices), "--precision", args.precision,
              "--worker-batch-preparation", preparation,
              "--background-checkpoints", args.background_checkpoints, "--sync", args.sync,
              "--checkpoint-every-seconds", str(args.checkpoint_every_seconds)]
    if args.profile:
      common += ["--profile", args.profile]
    if not os.path.exists(os.path.join(workdir, "graph", "manifest.json")):
      subprocess.run(common + ["--phase", "import"], check=True)
    # stdout carries the row; stderr passes through, so a failing worker's
    # traceback reaches the user.
    out = subprocess.run(common + ["--phase", "train"], check=True, stdout=subprocess.PIPE,
                         text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    result.update(graph=f"power_law {args.nodes:,} nodes {args.edges:,} edges", dim=args.dim)
    rows.append(result)
    if args.json:
      print(json.dumps(result), flush=True)
  if not args.json:
    print(f"\n{rows[0]['graph']}, d={args.dim}, {args.chunk} batch + {args.uniform} uniform "
          f"negatives, batch {args.batch}, logistic\n")
    print("| P | device | batches | edges/s (last epoch) | epoch s | peak RSS MiB "
          "| device peak MiB | full tables MiB |")
    print("|---:|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
      print(f"| {r['partitions']} | {r['device']} | {r['batch_preparation']} | "
            f"{r['edges_per_s']:,.0f} | "
            f"{r['epoch_seconds']:.1f} | {r['peak_rss_mib']:,.0f} | {r['device_peak_mib']:,.0f} "
            f"| {r['table_mib']:,.0f} |")


if __name__ == "__main__":
  main()
