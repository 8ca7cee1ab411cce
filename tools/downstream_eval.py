"""Downstream evaluation of TwHIN embeddings on Ciao and Last.fm (paper Table 2 style).

Trains the two embedding runs it needs at a small budget (resumed, or skipped
when already finished), then prints one JSON object per (task, feature set),
plus the same tasks on product-quantized embeddings (``--pq-factor``):

  runs/downstream/ciao_nocat       configs/ciao.py without in_category (the label)
  runs/downstream/lastfm_heldout   configs/lastfm.py on the friendships that are
                                   not held out for lastfm_friends

  TWHIN_DATA_DIR=../shared/data .venv/bin/python tools/downstream_eval.py --json
  ... --dim 64 --epochs 20 --pq-factor 16 --workdir runs/downstream

Any labelled entity type of any graph (the label file's rows name an entity
and its label; relations that encode the label are left out of training):

  ... --tasks entity_category --config configs/ciao.py --drop-relations in_category \
      --entity-type product --labels $TWHIN_DATA_DIR/social/ciao-tang2012/rating.tsv.gz \
      --name-column 1 --label-column 2 --feature-columns 3,4

Budget by default: the recipes' one dimension (recipes.DIM = 200), 20
epochs each (Ciao ~356k train edges/epoch, Last.fm ~500k); with --dim 64
about 1.5 + 2.5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from twhin_jax import recipes  # noqa: E402 (jax-free: --help stays quick)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", default=os.path.join(REPO, "runs", "downstream"))
  parser.add_argument("--dim", type=int, default=recipes.DIM,
                      help="default: the recipes' one dimension, recipes.DIM")
  parser.add_argument("--epochs", type=int, default=20)
  parser.add_argument("--pq-factor", type=float, default=16.0,
                      help="also evaluate PQ-decoded embeddings at this factor (0: skip)")
  parser.add_argument("--tasks", default="ciao_category,ciao_rating,lastfm_friends")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--json", action="store_true", help="only JSON lines on stdout")
  labelled = parser.add_argument_group(
      "entity_category: any labelled entity type of any config (add it to --tasks)")
  labelled.add_argument("--config", help="the graph's config file")
  labelled.add_argument("--drop-relations", default="",
                        help="relations left out of the embedding run because they encode "
                        "the label (comma-separated)")
  labelled.add_argument("--entity-type", help="the labelled entity type")
  labelled.add_argument("--labels", help="label file: rows naming an entity and its label")
  labelled.add_argument("--name-column", type=int, default=0)
  labelled.add_argument("--label-column", type=int, default=1)
  labelled.add_argument("--feature-columns", default="",
                        help="numeric columns averaged per entity as dense features")
  labelled.add_argument("--header", action="store_true", help="the label file has a header")
  args = parser.parse_args(argv)
  tasks = args.tasks.split(",")
  if "entity_category" in tasks and not (args.config and args.entity_type and args.labels):
    parser.error("the entity_category task needs --config, --entity-type and --labels")
  os.environ.setdefault("TWHIN_DATA_DIR", os.path.join(os.path.dirname(REPO), "shared", "data"))

  from twhin_jax import compress
  from twhin_jax import downstream
  from twhin_jax import train as train_lib

  log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
  overrides = [f"--config.model.dim={args.dim}", f"--config.train.epochs={args.epochs}",
               "--config.train.eval_every_epochs=0", "--config.train.checkpoint_every_buckets=0",
               f"--config.train.seed={args.seed}"]
  runs = {}

  def train(name, config):
    workdir = os.path.join(args.workdir, name)
    started = time.perf_counter()
    train_lib.train(config, workdir, progress=not args.json).close()
    log(f"[downstream] {name}: trained/resumed in {time.perf_counter() - started:.1f} s ({workdir})")
    runs[name] = workdir

  if any(t.startswith("ciao") for t in tasks):
    train("ciao_nocat", downstream.ciao_config_without_category(
        os.path.join(REPO, "configs", "ciao.py"), overrides))
  if "lastfm_friends" in tasks:
    friends = downstream.write_lastfm_train_friends(
        os.path.join(args.workdir, "lastfm_friends_train.dat"), seed=args.seed)
    train("lastfm_heldout", downstream.lastfm_config_with_held_out_friends(
        friends, os.path.join(REPO, "configs", "lastfm.py"), overrides))

  if "entity_category" in tasks:
    drop = [r for r in args.drop_relations.split(",") if r]
    train("entity", downstream.config_without_relations(args.config, drop, overrides))
  quantized_types = {"ciao_nocat": ["user", "product"], "lastfm_heldout": ["user"],
                     "entity": [args.entity_type]}

  sources = {"full": {name: path for name, path in runs.items()}}
  if args.pq_factor:
    sources[f"pq{compress._factor_name(args.pq_factor)}x"] = {
        name: compress.quantize(path, args.pq_factor, seed=args.seed,
                                types=quantized_types[name])
        for name, path in runs.items()}

  budget = {"dim": args.dim, "epochs": args.epochs}
  for embeddings_name, source in sources.items():
    full = embeddings_name == "full"
    plan = []
    if "ciao_category" in tasks:
      plan += [(downstream.ciao_category, "ciao_nocat", fs)
               for fs in (downstream.CATEGORY_FEATURE_SETS if full else ("P",))]
    if "ciao_rating" in tasks:
      plan += [(downstream.ciao_rating, "ciao_nocat", fs)
               for fs in (downstream.RATING_FEATURE_SETS if full else ("U+P",))]
    if "lastfm_friends" in tasks:
      plan += [(downstream.lastfm_friends, "lastfm_heldout", fs)
               for fs in (downstream.FRIEND_FEATURE_SETS if full else ("U",))]
    if "entity_category" in tasks:
      labelled_task = functools.partial(
          downstream.entity_category, entity_type=args.entity_type, labels_path=args.labels,
          name_column=args.name_column, label_column=args.label_column,
          feature_columns=[int(c) for c in args.feature_columns.split(",") if c],
          header=args.header)
      plan += [(labelled_task, "entity", fs)
               for fs in (downstream.ENTITY_FEATURE_SETS if full else ("E",))]
    for task, run, feature_set in plan:
      result = task(source[run], feature_set=feature_set, run_dir=runs[run], seed=args.seed)
      result.update(embeddings=embeddings_name, run=runs[run], budget=budget)
      print(json.dumps(result), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
