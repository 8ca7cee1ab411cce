#!/usr/bin/env python
"""Who-to-follow, the paper's Table 1: TwHIN-Follow vs sparse follow cosine vs
follow-sequence SkipGram (twhin_jax/who_to_follow.py has the method).

  python tools/who_to_follow.py [--datasets lastfm,flickr] [--seeds 0,1,2] [--json]
  python tools/who_to_follow.py --config configs/ciao.py --follow-relation trust --name ciao

Learning rate and epochs (TwHIN) and window and epochs (SkipGram) are chosen
on a validation share of the first seed's follows (TwHIN's epochs by early
stopping: one run per learning rate, scored at 10, 20, 40, 80 and 160 epochs
until validation R@10 stops improving); every seed then trains on
train + validation and is scored on its test share. ``--json`` prints one
object per (dataset, method) with ``recall_at_10``, ``mrr`` (exact search,
mean over seeds), ``*_std`` (sample standard deviation over seeds),
``scann_recall_at_10`` / ``scann_mrr`` (through a ScaNN index; not for
cosine, whose vectors are sparse) and ``seeds``; then one object per
dataset with the validation trials (``"method": "tuning"``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twhin_jax import who_to_follow as wtf  # noqa: E402


def floats(text: str) -> tuple[float, ...]:
  return tuple(float(x) for x in text.split(",") if x.strip())


def ints(text: str) -> tuple[int, ...]:
  return tuple(int(x) for x in text.split(",") if x.strip())


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--datasets", default="lastfm,flickr",
                      help=f"built-in datasets, comma-separated ({', '.join(wtf.DATASETS)})")
  parser.add_argument("--config", help="a config file instead of --datasets")
  parser.add_argument("--follow-relation", help="with --config: the user -> user relation")
  parser.add_argument("--user-type", default="user", help="with --config")
  parser.add_argument("--low-coverage", default="",
                      help="with --config: relations co-embedded with the follows")
  parser.add_argument("--name", help="with --config: the dataset name printed")
  parser.add_argument("--data-dir", help="datasets folder (default: $TWHIN_DATA_DIR)")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--valid-fraction", type=float, default=0.1)
  parser.add_argument("--test-fraction", type=float, default=0.1)
  parser.add_argument("--depth", type=int, default=100, help="ranks counted by MRR")
  parser.add_argument("--lr", default="0.01,0.025,0.05", help="TwHIN lrs tried on validation")
  parser.add_argument("--epochs", default=",".join(map(str, wtf.Grid.twhin_epochs)),
                      help="TwHIN's validation points: one run per lr, scored at each of "
                      "these epochs until --patience points in a row do not improve R@10")
  parser.add_argument("--patience", type=int, default=wtf.Grid.twhin_patience,
                      help="TwHIN validation points without improvement before a run stops "
                      "(0: score every point)")
  parser.add_argument("--dim", type=int, default=wtf.Grid.twhin_dim,
                      help="TwHIN's and SkipGram's dimension (default: the recipes' one "
                           "dimension, recipes.DIM)")
  parser.add_argument("--skipgram-window", default="5,20")
  parser.add_argument("--skipgram-epochs", default="10,30")
  parser.add_argument("--methods", default=",".join(wtf.METHODS),
                      help="comma-separated; also follow_engagement (the follows co-embedded "
                           "with the config's other relations, which Section 4.3 avoids)")
  parser.add_argument("--chosen", help="skip tuning: a file holding the tuning line that "
                      "--json printed for the dataset (\"method\": \"tuning\")")
  parser.add_argument("--workdir", help="keep runs here (default: a temp dir)")
  parser.add_argument("--json", action="store_true")
  args = parser.parse_args(argv)
  if args.data_dir:
    os.environ["TWHIN_DATA_DIR"] = os.path.abspath(args.data_dir)
  data_dir = os.environ.get("TWHIN_DATA_DIR", "")
  if args.config:
    if not args.follow_relation:
      parser.error("--config needs --follow-relation")
    datasets = [wtf.Dataset(args.name or os.path.splitext(os.path.basename(args.config))[0],
                            os.path.abspath(args.config), args.follow_relation, args.user_type,
                            tuple(r for r in args.low_coverage.split(",") if r))]
  else:
    names = [d.strip() for d in args.datasets.split(",") if d.strip()]
    unknown = [n for n in names if n not in wtf.DATASETS]
    if unknown:
      parser.error(f"unknown dataset(s) {unknown}; choose from {sorted(wtf.DATASETS)}")
    datasets = [wtf.DATASETS[n] for n in names]
  grid = wtf.Grid(twhin_lr=floats(args.lr), twhin_epochs=ints(args.epochs),
                  twhin_patience=args.patience, twhin_dim=args.dim,
                  skipgram_window=ints(args.skipgram_window),
                  skipgram_epochs=ints(args.skipgram_epochs), skipgram_dim=args.dim)
  log = lambda message: print(message, file=sys.stderr, flush=True)
  chosen = {}
  if args.chosen:
    with open(args.chosen, encoding="utf-8") as f:
      for number, line in enumerate(f, 1):
        try:
          row = json.loads(line)
        except json.JSONDecodeError as err:
          parser.error(f"{args.chosen}:{number}: not JSON ({err})")
        if row.get("method") == "tuning":
          chosen[row["dataset"]] = row["chosen"]
  for dataset in datasets:
    if args.chosen and dataset.name not in chosen:
      parser.error(f"{args.chosen}: no tuning line for {dataset.name}")
    if dataset.folder and not os.path.isdir(os.path.join(data_dir, dataset.folder)):
      log(f"skipping {dataset.name}: {os.path.join(data_dir, dataset.folder)} not found "
          "(set TWHIN_DATA_DIR or --data-dir)")
      continue
    workdir = os.path.join(args.workdir, dataset.name) if args.workdir else None
    result = wtf.run_table1(dataset, seeds=ints(args.seeds), grid=grid,
                            valid_fraction=args.valid_fraction, test_fraction=args.test_fraction,
                            depth=args.depth, workdir=workdir,
                            chosen=chosen.get(dataset.name) if args.chosen else None,
                            methods=[m for m in args.methods.split(",") if m], log=log)
    for row in result["rows"]:
      if args.json:
        print(json.dumps(row), flush=True)
      else:
        scann = (f"  ScaNN R@10 {row['scann_recall_at_10']:.4f} MRR {row['scann_mrr']:.4f}"
                 if "scann_mrr" in row else "")
        print(f"{row['dataset']:<8} {row['method']:<13} R@10 {row['recall_at_10']:.4f} "
              f"± {row['recall_at_10_std']:.4f}  MRR {row['mrr']:.4f} ± {row['mrr_std']:.4f}"
              f"{scann}  (seeds {row['seeds']}; {row['settings']})", flush=True)
    if args.json:
      print(json.dumps({"dataset": dataset.name, "method": "tuning", "chosen": result["chosen"],
                        "trials": result["trials"]}), flush=True)
    for metric in ("recall_at_10", "mrr"):
      log(f"{dataset.name}: twhin_follow vs baselines ({metric}): "
          f"{wtf.beats(result['rows'], metric)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
