#!/usr/bin/env python
"""The low-coverage claim (paper, after Table 2): a relation few users have,
embedded alone vs co-embedded with the dense follow relation, measured for
those users by link prediction and a downstream classifier
(twhin_jax/low_coverage.py has the method).

  python tools/low_coverage.py [--datasets lastfm,flickr] [--seeds 0,1,2] [--json]

``--json`` prints one object per (dataset, setup, measure): setup is
``alone``, ``co_embedded`` or ``none`` (the downstream model without
embeddings); measure ``link`` (test ``mrr``, ``hits_at_10``) or
``downstream`` (``roc_auc``, ``rce``, ``pr_auc``); each with ``*_std`` over
``seeds``; then one object per dataset with the epochs chosen on validation.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twhin_jax import low_coverage  # noqa: E402
from twhin_jax import recipes  # noqa: E402


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--datasets", default="lastfm,flickr",
                      help=f"comma-separated ({', '.join(low_coverage.DATASETS)})")
  parser.add_argument("--config", help="a config file instead of --datasets")
  parser.add_argument("--follow-relation", help="with --config: the dense user -> user relation")
  parser.add_argument("--relation", help="with --config: the relation made low-coverage")
  parser.add_argument("--user-type", default="user")
  parser.add_argument("--item-type", help="with --config: the relation's target type")
  parser.add_argument("--name", help="with --config: the dataset name printed")
  parser.add_argument("--data-dir", help="datasets folder (default: $TWHIN_DATA_DIR)")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--coverage", type=float, default=0.1, help="share of users kept")
  parser.add_argument("--dim", type=int, default=recipes.DIM,
                      help="default: the recipes' one dimension, recipes.DIM")
  parser.add_argument("--max-epochs", type=int, default=40, help="the validation run's length")
  parser.add_argument("--eval-every", type=int, default=5)
  parser.add_argument("--workdir", help="keep runs here (default: a temp dir)")
  parser.add_argument("--json", action="store_true")
  args = parser.parse_args(argv)
  if args.data_dir:
    os.environ["TWHIN_DATA_DIR"] = os.path.abspath(args.data_dir)
  data_dir = os.environ.get("TWHIN_DATA_DIR", "")
  if args.config:
    if not (args.follow_relation and args.relation and args.item_type):
      parser.error("--config needs --follow-relation, --relation and --item-type")
    datasets = [low_coverage.Dataset(
        args.name or os.path.splitext(os.path.basename(args.config))[0],
        os.path.abspath(args.config), args.follow_relation, args.relation, args.user_type,
        args.item_type)]
  else:
    names = [d.strip() for d in args.datasets.split(",") if d.strip()]
    unknown = [n for n in names if n not in low_coverage.DATASETS]
    if unknown:
      parser.error(f"unknown dataset(s) {unknown}; choose from {sorted(low_coverage.DATASETS)}")
    datasets = [low_coverage.DATASETS[n] for n in names]
  settings = low_coverage.Settings(coverage=args.coverage, dim=args.dim,
                                   max_epochs=args.max_epochs, eval_every=args.eval_every)
  seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
  log = lambda message: print(message, file=sys.stderr, flush=True)
  rows = []
  with tempfile.TemporaryDirectory(prefix="low_coverage_") as scratch:
    for dataset in datasets:
      if dataset.folder and not os.path.isdir(os.path.join(data_dir, dataset.folder)):
        log(f"skipping {dataset.name}: {os.path.join(data_dir, dataset.folder)} not found "
            "(set TWHIN_DATA_DIR or --data-dir)")
        continue
      result = low_coverage.run(dataset, seeds=seeds, settings=settings,
                                workdir=os.path.join(args.workdir or scratch, dataset.name),
                                log=log)
      rows += result["rows"]
      if args.json:
        for row in result["rows"]:
          print(json.dumps(row), flush=True)
        print(json.dumps({"dataset": dataset.name, "setup": "tuning",
                          "chosen": result["chosen"]}), flush=True)
  if not args.json:
    print("| dataset | embeddings | link MRR | link Hits@10 | downstream ROC-AUC | RCE |")
    print("|---|---|---:|---:|---:|---:|")
    for row in low_coverage.table_rows(rows):
      print("| " + " | ".join("–" if c is None else str(c) for c in row) + " |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
