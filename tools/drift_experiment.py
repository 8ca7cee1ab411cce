#!/usr/bin/env python
"""Drift of a retrained version: cold retrain vs warm start vs L2-to-previous
(paper Sec. 7.2, Table 5 and Figure 4c), on HetRec Last.fm.

  version 1   configs/lastfm.py on 95% of its training lines (5% of every
              input file dropped, seeded), with the friendships that the
              downstream friend-prediction task holds out removed;
  version 2   the same graph with the 5% back (the "5% new edges"), trained
              three ways:
                cold            from scratch, another seed
                warm_start      from version 1 (twhin train --warm-start)
                l2_to_previous  warm start plus alpha |theta - theta_prev|^2

For each strategy: the per-entity relative L2 change against version 1
(mean, p99, by degree bucket; twhin_jax.drift), neighbour overlap@10, the
version's test MRR (sampled ranking), and the downstream metric: ROC-AUC of
Last.fm friend prediction with the version's user embeddings as features
(twhin_jax.downstream.lastfm_friends). Writes results.json, results.md and
drift_by_degree.png into --out; with --json prints one JSON object per strategy:

  python tools/drift_experiment.py --json                  # ~5 min on 2 cores
  python tools/drift_experiment.py --alpha 1 --epochs 10 --dim 64
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
STRATEGIES = ("cold", "warm_start", "l2_to_previous")


def drop_lines(path: str, out_path: str, fraction: float, seed: int, header: bool) -> int:
  """Copies a (gzipped) text file without a seeded ``fraction`` of its data lines."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt", encoding="utf-8") as f:
    lines = f.readlines()
  head, body = (lines[:1], lines[1:]) if header else ([], lines)
  keep = np.random.default_rng([seed, len(body)]).random(len(body)) >= fraction
  with opener(out_path, "wt", encoding="utf-8") as f:
    f.writelines(head + [line for line, k in zip(body, keep) if k])
  return int((~keep).sum())


def old_graph_config(config, out_dir: str, fraction: float, seed: int):
  """The config on copies of its train files with ``fraction`` of lines dropped."""
  config = config.copy_and_resolve_references()
  os.makedirs(out_dir, exist_ok=True)
  copies: dict[str, str] = {}
  files = []
  for spec in config.data.files:
    spec = dict(spec)
    path = os.path.expandvars(os.path.expanduser(spec["path"]))
    if spec.get("split", "train") == "train":
      if path not in copies:
        copies[path] = os.path.join(out_dir, os.path.basename(path))
        drop_lines(path, copies[path], fraction, seed, bool(spec.get("header")))
      spec["path"] = copies[path]
    files.append(spec)
  config.data.files = files
  return config


def plot(results: dict, out_path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, result in results.items():
    buckets = result["drift"]["per_degree_bucket"]
    if buckets:
      ax.plot([b["degree_lo"] for b in buckets], [b["mean_rel_l2"] for b in buckets],
              marker="o", label=name)
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel("entity degree (bucket lower bound)")
  ax.set_ylabel("mean relative L2 change")
  ax.set_title("Drift from version 1 by degree (cf. paper Fig. 4c)")
  ax.legend()
  fig.tight_layout()
  fig.savefig(out_path, dpi=120)
  plt.close(fig)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="runs/drift_experiment")
  parser.add_argument("--dim", type=int, default=64)
  parser.add_argument("--epochs", type=int, default=10)
  parser.add_argument("--alpha", type=float, default=1.0, help="L2-to-previous strength")
  parser.add_argument("--new-fraction", type=float, default=0.05)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--json", action="store_true")
  args = parser.parse_args(argv)
  os.environ.setdefault("TWHIN_DATA_DIR", os.path.join(os.path.dirname(REPO), "shared", "data"))
  if not os.path.isdir(os.path.join(os.environ["TWHIN_DATA_DIR"], "social",
                                    "hetrec2011-lastfm-2k")):
    sys.exit(f"{os.environ['TWHIN_DATA_DIR']}/social/hetrec2011-lastfm-2k: not found "
             "(set TWHIN_DATA_DIR to the shared data directory)")

  from twhin_jax import downstream
  from twhin_jax import drift
  from twhin_jax import train as train_lib

  log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else print
  os.makedirs(args.out, exist_ok=True)
  overrides = [f"--config.model.dim={args.dim}", f"--config.train.epochs={args.epochs}",
               "--config.train.eval_every_epochs=0", "--config.train.checkpoint_every_buckets=0",
               "--config.eval.num_sampled_negatives=500"]
  friends = downstream.write_lastfm_train_friends(
      os.path.join(args.out, "friends_train.dat"), seed=args.seed)
  new_config = downstream.lastfm_config_with_held_out_friends(
      friends, os.path.join(REPO, "configs", "lastfm.py"), overrides)
  old_config = old_graph_config(new_config, os.path.join(args.out, "old_files"),
                                args.new_fraction, args.seed)

  def train(name, config):
    workdir = os.path.join(args.out, name)
    started = time.perf_counter()
    trainer = train_lib.train(config, workdir, progress=not args.json)
    metrics = trainer.evaluate("test", progress=False)
    trainer.close()
    log(f"[drift] {name}: {time.perf_counter() - started:.0f} s, test MRR {metrics['mrr']:.4f}")
    return workdir, metrics

  old_dir, _ = train("v1", old_config)
  results = {}
  for name in STRATEGIES:
    config = new_config.copy_and_resolve_references()
    if name == "cold":
      config.train.seed = args.seed + 1
    else:
      config.warm_start.parent = os.path.abspath(old_dir)
      config.warm_start.l2_to_previous = args.alpha if name == "l2_to_previous" else 0.0
    workdir, metrics = train(f"v2_{name}", config)
    moved = drift.drift(old_dir, workdir, k=10, out_dir=os.path.join(workdir, "plots"))
    friends_metrics = downstream.lastfm_friends(workdir, feature_set="U", seed=args.seed)
    result = {"strategy": name, "mean_rel_l2": moved["mean_rel_l2"],
              "p99_rel_l2": moved["p99_rel_l2"], "overlap_at_10": moved["overlap_at_k"],
              "test_mrr": metrics["mrr"], "friend_roc_auc": friends_metrics["roc_auc"],
              "friend_rce": friends_metrics["rce"],
              "alpha": args.alpha if name == "l2_to_previous" else 0.0,
              "budget": {"dim": args.dim, "epochs": args.epochs,
                         "new_fraction": args.new_fraction}}
    results[name] = dict(result, drift=moved)
    if args.json:
      print(json.dumps(result), flush=True)
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(results, f, indent=1, default=str)
  plot(results, os.path.join(args.out, "drift_by_degree.png"))
  lines = ["| strategy | mean rel. L2 | p99 rel. L2 | overlap@10 | test MRR | friend ROC-AUC |",
           "|---|---:|---:|---:|---:|---:|"]
  for name, r in results.items():
    lines.append(f"| {name} | {r['mean_rel_l2']:.3f} | {r['p99_rel_l2']:.3f} | "
                 f"{r['overlap_at_10']:.3f} | {r['test_mrr']:.4f} | {r['friend_roc_auc']:.4f} |")
  with open(os.path.join(args.out, "results.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  log("\n".join(lines))
  return 0


if __name__ == "__main__":
  sys.exit(main())
