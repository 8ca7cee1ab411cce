#!/usr/bin/env python
"""The knowledge graphs of docs/results.md, measured by one command.

Trains Kinship, Nations and UMLS (by default; any shipped config
``NAME[:VARIANT]``, e.g. ``fb15k237:complex_diagonal``) with their shipped
configs (configs/NAME.py, early stopping on validation MRR), evaluates the
test split with filtered
ranking, prints a Markdown table, and writes the raw records beside the docs
(``--out``, default docs/results/kg_small.jsonl) so the table in the docs is
the committed output of this script, not a number typed in by hand.

  TWHIN_DATA_DIR=../shared/data python tools/kg_small.py
  python tools/kg_small.py --datasets nations --workdir /tmp/kg --out /tmp/kg.jsonl
  python tools/kg_small.py --datasets fb15k237:translation,fb15k237:complex_diagonal \
      --out docs/results/fb15k237_operators.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402

from twhin_jax import config as config_lib  # noqa: E402
from twhin_jax import evaluation  # noqa: E402
from twhin_jax import rundir  # noqa: E402
from twhin_jax import train as train_lib  # noqa: E402

COLUMNS = ("mrr", "mr", "hits@1", "hits@3", "hits@10")


def measure(name: str, workdir: str, overrides: list[str] = ()) -> dict:
  """``name``: a shipped config, ``NAME`` or ``NAME:VARIANT`` (configs/NAME.py);
  ``overrides``: ``FIELD=VALUE`` settings on top of it (recorded in the row)."""
  module, _, variant = name.partition(":")
  config_path = os.path.join("configs", f"{module}.py") + (f":{variant}" if variant else "")
  config = config_lib.load_config(os.path.join(ROOT, config_path),
                                  [f"--config.{item}" for item in overrides])
  started = time.perf_counter()
  trainer = train_lib.train(config, workdir, progress=False)
  seconds = time.perf_counter() - started
  best_epoch = trainer.early_stop.best_epoch
  epochs_run = len(trainer.history)
  trainer.close()
  metrics = evaluation.evaluate_run(rundir.open_run(workdir), "test", progress=False)
  return {"dataset": name, **{k: float(metrics[k]) for k in COLUMNS},
          "epochs_run": epochs_run, "best_epoch": best_epoch, "seconds": round(seconds, 1),
          "config": config_path, "overrides": list(overrides), "operator": config.relations[0]["operator"],
          "dim": int(config.model.dim), "max_epochs": int(config.train.epochs),
          "device": f"{jax.default_backend()}:{jax.devices()[0].device_kind}"}


def markdown(rows: list[dict]) -> str:
  lines = ["| dataset | test MRR | MR | Hits@1 | Hits@3 | Hits@10 | stopped at epoch | wall |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(f"| {r['dataset']} | {r['mrr']:.3f} | {r['mr']:.2f} | {r['hits@1']:.3f} | "
                 f"{r['hits@3']:.3f} | {r['hits@10']:.3f} | {r['best_epoch'] + 1} of "
                 f"{r['epochs_run']} | {r['seconds']:.1f} s |")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--datasets", default="kinship,nations,umls")
  parser.add_argument("--workdir", default=None, help="runs (default: a temporary folder)")
  parser.add_argument("--out", default=os.path.join(ROOT, "docs", "results", "kg_small.jsonl"))
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="a config override for every dataset, e.g. --set train.lr=0.05")
  args = parser.parse_args(argv)
  workdir = args.workdir or tempfile.mkdtemp(prefix="kg_small_")
  rows = []
  try:
    for name in args.datasets.split(","):
      run = os.path.join(workdir, name.replace(":", "-"))
      shutil.rmtree(run, ignore_errors=True)
      rows.append(measure(name, run, args.set))
      print(json.dumps(rows[-1]), flush=True)
  finally:
    if args.workdir is None:
      shutil.rmtree(workdir, ignore_errors=True)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
  print(markdown(rows))
  return 0


if __name__ == "__main__":
  sys.exit(main())
