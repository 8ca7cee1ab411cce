"""Inductive (paper Eq. 5) vs transductive embeddings of held-out users.

    .venv/bin/python tools/inductive_eval.py [--json] [--dataset demo|lastfm | --config FILE[:variant] [--user-type T]] [--workdir DIR]
                                             [--fold-in-steps 50]

Holds out 10% of the users (with >= 10 outgoing edges), trains once with half
of their edges ("transductive") and once without any ("inductive": the users
are absent, then embedded from that half by Eq. 5, and by fold-in: Eq. 5 then
a few steps of the training loss on their rows only, all else frozen), and
ranks the other half exactly (recall@10, filtered MRR; see
``inductive.evaluate_inductive``). A --workdir that already holds both
trained runs is reused (only the embedding and ranking are redone).

Sizes (about 2-3 minutes each on 2 CPU cores): "demo" is the generated
Twitter-like graph with 2,000 users, 6,000 tweets, 50 advertisers, 300 ads,
10 communities (about 170k edges), 6 epochs; "lastfm" is HetRec Last.fm
($TWHIN_DATA_DIR), 5 epochs. The dimension is the dataset config's own
(the demo's 64; Last.fm's social recipe, recipes.DIM = 200) unless --dim
sets another: the tool does not choose a dimension of its own.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile

from twhin_jax import config as config_lib
from twhin_jax import demo_config
from twhin_jax import inductive
from twhin_jax import shipped_configs


def demo(epochs: int, dim: int | None):
  config = demo_config.get_config("test")
  config.data.generator_args = dict(num_users=2000, num_tweets=6000, num_advertisers=50,
                                    num_ads=300, num_communities=10, seed=0)
  if dim:
    config.model.dim = dim
  config.train.epochs = epochs
  return config


def lastfm(epochs: int, dim: int | None):
  config = shipped_configs.load("lastfm")
  if dim:
    config.model.dim = dim
  config.train.epochs = epochs
  return config


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--dataset", default="demo", choices=("demo", "lastfm"))
  parser.add_argument("--config", help="any config file (path[:variant]) instead of --dataset; "
                      "its own dimension, and --epochs (default 5)")
  parser.add_argument("--user-type", default="user",
                      help="with --config: the entity type whose members are held out")
  parser.add_argument("--workdir", default=None, help="default: a temporary directory")
  parser.add_argument("--epochs", type=int, default=None)
  parser.add_argument("--dim", type=int, default=None,
                      help="default: the dataset config's (demo 64, lastfm recipes.DIM)")
  parser.add_argument("--holdout-fraction", type=float, default=0.1)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--fold-in-steps", type=int, default=50,
                      help="Adagrad steps of the fold-in (fold_in.py)")
  parser.add_argument("--json", action="store_true", help="print one JSON object")
  args = parser.parse_args(argv)
  if args.config:
    config = config_lib.load_config(args.config)
    if args.dim:
      config.model.dim = args.dim
    config.train.epochs = args.epochs or 5
    args.dataset = config.name
  elif args.dataset == "demo":
    config = demo(args.epochs or 6, args.dim)
  else:
    config = lastfm(args.epochs or 5, args.dim)
  with tempfile.TemporaryDirectory() as scratch:
    workdir = args.workdir or scratch
    result = inductive.evaluate_inductive(config, workdir, user_type=args.user_type,
                                          holdout_fraction=args.holdout_fraction,
                                          seed=args.seed, fold_in_steps=args.fold_in_steps,
                                          progress=False)
  result["dataset"] = args.dataset
  if args.json:
    print(json.dumps(result))
    return 0
  print(f"{args.dataset}: {result['embedded_users']} held-out users embedded, "
        f"{result['transductive']['edges']} held-out edges ranked (exact, filtered)\n")
  print("| model | recall@10 | MRR | gap closed (recall@10 / MRR) |")
  print("|---|---|---|---|")
  for name in ("transductive", "fold_in", "inductive", "relation_only"):
    m = result[name]
    gap = result["gap_closed"].get(name)
    closed = f"{gap['recall@10']:.0%} / {gap['mrr']:.0%}" if gap else ""
    print(f"| {name} | {m['recall@10']:.3f} | {m['mrr']:.3f} | {closed} |")
  print(f"\ntrain seconds: {result['train_seconds']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
