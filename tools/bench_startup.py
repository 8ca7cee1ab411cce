#!/usr/bin/env python
"""Time to the first trained bucket, with a cold and a warm compilation cache.

Imports the graph once, then trains a fresh run up to the end of its first
bucket in a new process per setting: first with an empty persistent
compilation cache (every program compiles), then again with the cache that
run filled (every program loads). The seconds are the worker process's wall
time from its start (Python and JAX imports included) to the first bucket's
end, split into imports, the trainer's set-up (graph, tables, checkpoint)
and the first bucket (the wait for its compilation and its steps); a second
bucket trains at the compiled rate, so "startup" is the time to the first
bucket less what its edges take at that rate (the first bucket should not
be the only one: a config with one bucket an epoch needs 2 epochs):

  python tools/bench_startup.py                                   # the demo graph
  TWHIN_DATA_DIR=../shared/data python tools/bench_startup.py --config configs/fb15k237.py
  python tools/bench_startup.py --json --repeats 2

Prints a table, or one JSON object per (cache, repeat) with --json.
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# The trainer reads this variable (twhin_jax.train.COMPILATION_CACHE_ENV);
# named here so that the parent process does not import jax.
COMPILATION_CACHE_ENV = "TWHIN_JAX_CACHE_DIR"


def load(config_spec: str, overrides: list[str]):
  from twhin_jax import config as config_lib
  config = config_lib.load_config(config_spec, [f"--config.{o}" for o in overrides])
  config_lib.validate(config)
  return config


def worker(args) -> None:
  """In a fresh process: import (phase=import) or train one bucket (phase=train)."""
  process_started = float(args.process_started)
  from twhin_jax import train as train_lib  # after the clock started: imports count
  config = load(args.config, args.set)
  if args.phase == "import":
    train_lib.prepare_graph(config, args.workdir, progress=False)
    return
  before_trainer = time.time() - process_started
  trainer_started = time.perf_counter()
  trainer = train_lib.Trainer(config, args.workdir, progress=False)
  constructed = time.perf_counter() - trainer_started
  trainer.run(stop_after_buckets=2)
  trainer.close()
  with open(os.path.join(args.workdir, train_lib.METRICS_FILE)) as f:
    buckets = [r for r in map(json.loads, f) if "bucket_index" in r and "event" not in r]
  first, second = buckets[0], buckets[1]
  # The first bucket's seconds run from the start of Trainer.run and hold the
  # wait for its compilation; the second bucket trains at the compiled rate.
  to_first = before_trainer + constructed + first["seconds"]
  training = first["edges"] / max(second["edges_per_s"], 1e-9)
  print(json.dumps({"to_first_bucket_s": to_first, "imports_s": before_trainer,
                    "trainer_setup_s": constructed, "first_bucket_s": first["seconds"],
                    "first_bucket_edges": first["edges"],
                    "second_bucket_edges_per_s": second["edges_per_s"],
                    "startup_s": to_first - training}))


def remove_training_state(workdir: str) -> None:
  """Keeps the imported graph, drops everything a training wrote."""
  for name in os.listdir(workdir):
    if name != "graph":
      path = os.path.join(workdir, name)
      shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default=os.path.join(ROOT, "configs", "demo.py"),
                      help="path/to/config.py[:variant] (default: the demo)")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="a config override, e.g. --set train.batch_size=100")
  parser.add_argument("--repeats", type=int, default=1, help="runs per cache state")
  parser.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
  parser.add_argument("--json", action="store_true", help="one JSON object per run")
  parser.add_argument("--phase", choices=("import", "train"), help=argparse.SUPPRESS)
  parser.add_argument("--workdir", help=argparse.SUPPRESS)
  parser.add_argument("--process-started", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.phase:
    worker(args)
    return

  scratch = args.dir or tempfile.mkdtemp(prefix="twhin-startup-")
  workdir, cache = os.path.join(scratch, "run"), os.path.join(scratch, "compilation-cache")
  os.makedirs(workdir, exist_ok=True)
  shutil.rmtree(cache, ignore_errors=True)
  common = [sys.executable, os.path.abspath(__file__), "--config", args.config,
            "--workdir", workdir] + [item for o in args.set for item in ("--set", o)]
  env = dict(os.environ, **{COMPILATION_CACHE_ENV: cache})
  subprocess.run(common + ["--phase", "import", "--process-started", str(time.time())],
                 check=True, env=env)
  rows = []
  for state in ("cold", "warm"):
    for repeat in range(args.repeats):
      if state == "cold":
        shutil.rmtree(cache, ignore_errors=True)
      remove_training_state(workdir)
      out = subprocess.run(common + ["--phase", "train", "--process-started", str(time.time())],
                           check=True, env=env, stdout=subprocess.PIPE, text=True).stdout
      row = {"config": os.path.relpath(args.config, ROOT), "overrides": args.set,
             "cache": state, "repeat": repeat, **json.loads(out.strip().splitlines()[-1])}
      rows.append(row)
      if args.json:
        print(json.dumps(row), flush=True)
  if args.dir is None:
    shutil.rmtree(scratch, ignore_errors=True)
  if not args.json:
    print(f"\n{rows[0]['config']}: time to the first trained bucket\n")
    print("| compilation cache | repeat | process start to first bucket s | imports s | "
          "trainer set-up s | first bucket s | startup s (all but its training) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
      print(f"| {r['cache']} | {r['repeat']} | {r['to_first_bucket_s']:.1f} | "
            f"{r['imports_s']:.1f} | {r['trainer_setup_s']:.1f} | {r['first_bucket_s']:.1f} | "
            f"{r['startup_s']:.1f} |")


if __name__ == "__main__":
  main()
