#!/usr/bin/env python
"""Out-of-core training at scale: a generated graph larger than memory would
like, P partitions, against in-memory training on a graph that fits.

  python tools/bench_out_of_core.py                       # 10M nodes, 100M edges, P=16
  python tools/bench_out_of_core.py --nodes 2000000 --edges 20000000 --partitions 8
  python tools/bench_out_of_core.py --nodes 1000000 --edges 10000000 --repeats 3

Steps, each in its own process so its peak memory is its own:
  1. generate   twhin_jax.generate.power_law streams the TSV (bounded memory)
  2. import     our importer, P x P buckets (tools/bench_train.py --phase import)
  3. train      one epoch with P partitions (bench_train.py --phase train): only
                the two partitions of the current bucket are resident, the
                next one prefetched, write-back in the background
  4. baseline   in-memory training, P=1, on a graph that fits (--base-nodes,
                --base-edges), the same model and negatives
Steps 3 and 4 run --repeats times, alternating; edges/s is each setting's
median run, peak RSS its largest. Prints a table (or --json): peak RSS of
each step, the tables' full size (V x (d + 1) x 4 bytes, embeddings plus
Adagrad), edges/s, and the slowdown of out-of-core against in-memory edges/s.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def child_peak_mib() -> float:
  return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def run_step(command: list[str]) -> tuple[str, float, float]:
  """(stdout, seconds, peak RSS MiB) of a child process.

  RUSAGE_CHILDREN reports the largest child so far, so steps run in
  increasing order of expected memory, or in a fresh wrapper process each.
  """
  wrapper = [sys.executable, "-c",
             "import resource, subprocess, sys, json, time\n"
             "t = time.perf_counter()\n"
             "out = subprocess.run(sys.argv[1:], check=True, capture_output=True, text=True)\n"
             "sys.stderr.write(out.stderr[-2000:])\n"
             "print(out.stdout)\n"
             "print(json.dumps({'__seconds': time.perf_counter() - t, '__peak_mib': "
             "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))\n"] + command
  out = subprocess.run(wrapper, check=True, capture_output=True, text=True)
  lines = out.stdout.strip().splitlines()
  stats = json.loads(lines[-1])
  return "\n".join(lines[:-1]), stats["__seconds"], stats["__peak_mib"]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--nodes", type=int, default=10_000_000)
  parser.add_argument("--edges", type=int, default=100_000_000)
  parser.add_argument("--partitions", type=int, default=16)
  parser.add_argument("--base-nodes", type=int, default=1_000_000)
  parser.add_argument("--base-edges", type=int, default=10_000_000)
  parser.add_argument("--dim", type=int, default=128)
  parser.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
  parser.add_argument("--repeats", type=int, default=1,
                      help="train each setting this many times, alternating, and compare "
                           "medians (one run on a busy 2-core machine varies by up to 30%%)")
  parser.add_argument("--json", action="store_true")
  args = parser.parse_args()
  scratch = args.dir or tempfile.mkdtemp(prefix="twhin-ooc-")
  os.makedirs(scratch, exist_ok=True)
  bench = os.path.join(HERE, "bench_train.py")
  rows = {}

  def log(message):
    print(f"[out-of-core {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

  settings = (("in_memory", args.base_nodes, args.base_edges, 1, 2),
              ("out_of_core", args.nodes, args.edges, args.partitions, 1))
  commands = {}
  for name, nodes, edges, parts, epochs in settings:
    graph_file = os.path.join(scratch, f"{name}.tsv")
    workdir = os.path.join(scratch, name)
    row = {"setting": name, "nodes": nodes, "edges": edges, "partitions": parts, "dim": args.dim}
    if not os.path.exists(graph_file):
      log(f"{name}: generating {edges:,} edges")
      _, seconds, peak = run_step([sys.executable, "-c",
          "import sys; from twhin_jax import generate; generate.power_law(sys.argv[1], "
          "num_nodes=int(sys.argv[2]), num_edges=int(sys.argv[3]), num_relations=4, seed=0, "
          "progress=False)", graph_file, str(nodes), str(edges)])
      row.update(generate_seconds=seconds, generate_peak_mib=peak)
    common = [sys.executable, bench, "--graph-file", graph_file, "--workdir", workdir,
              "--worker-partitions", str(parts), "--dim", str(args.dim), "--epochs", str(epochs),
              "--relations", "4"]
    if not os.path.exists(os.path.join(workdir, "graph", "manifest.json")):
      log(f"{name}: importing (P={parts})")
      _, seconds, peak = run_step(common + ["--phase", "import"])
      row.update(import_seconds=seconds, import_peak_mib=peak,
                 import_edges_per_s=edges / seconds)
    rows[name], commands[name] = row, common + ["--phase", "train"]
  # Alternating the settings spreads slow spells of the machine over both.
  runs = {name: [] for name in rows}
  for repeat in range(args.repeats):
    for name, *_, epochs in settings:
      log(f"{name}: training {epochs} epoch(s), run {repeat + 1}/{args.repeats}")
      out, seconds, peak = run_step(commands[name])
      result = json.loads(out.strip().splitlines()[-1])
      runs[name].append(dict(train_seconds=seconds, train_peak_mib=peak,
                             edges_per_s=result["edges_per_s"],
                             epoch_seconds=result["epoch_seconds"],
                             table_mib=result["table_mib"]))
      log(f"{name}: {result['edges_per_s']:,.0f} edges/s, peak RSS {peak:,.0f} MiB, "
          f"tables {result['table_mib']:,.0f} MiB")
  for name, row in rows.items():
    median = sorted(runs[name], key=lambda run: run["edges_per_s"])[(args.repeats - 1) // 2]
    row.update(median, train_peak_mib=max(run["train_peak_mib"] for run in runs[name]),
               runs_edges_per_s=[run["edges_per_s"] for run in runs[name]])
  slowdown = rows["in_memory"]["edges_per_s"] / rows["out_of_core"]["edges_per_s"]
  for row in rows.values():
    row["slowdown_vs_in_memory"] = rows["in_memory"]["edges_per_s"] / row["edges_per_s"]
  # Each repeat's own ratio: in memory and out of core ran back to back.
  rows["out_of_core"]["run_slowdowns"] = [
      base["edges_per_s"] / run["edges_per_s"]
      for base, run in zip(runs["in_memory"], runs["out_of_core"])]
  if args.json:
    for row in rows.values():
      print(json.dumps(row))
    return
  print(f"\nd={args.dim}, 50 batch + 50 uniform negatives, batch 1000, logistic\n")
  print("| setting | nodes | edges | P | full tables MiB | train peak RSS MiB | "
        "import peak RSS MiB | edges/s | slowdown |")
  print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
  for r in rows.values():
    print(f"| {r['setting']} | {r['nodes']:,} | {r['edges']:,} | {r['partitions']} | "
          f"{r['table_mib']:,.0f} | {r['train_peak_mib']:,.0f} | "
          f"{r.get('import_peak_mib', float('nan')):,.0f} | {r['edges_per_s']:,.0f} | "
          f"{r['slowdown_vs_in_memory']:.2f} |")
  print(f"\nout-of-core / in-memory slowdown: {slowdown:.2f}x", end="")
  if args.repeats > 1:
    each = ", ".join(f"{x:.2f}" for x in rows["out_of_core"]["run_slowdowns"])
    print(f" (medians of {args.repeats} alternating runs; run by run: {each})", end="")
  print()


if __name__ == "__main__":
  main()
