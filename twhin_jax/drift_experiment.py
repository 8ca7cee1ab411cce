"""Drift of a retrained version: cold retrain vs warm start vs L2-to-previous
(paper Sec. 7.2, Table 5 and Figure 4c), on HetRec Last.fm.

  version 1   configs/lastfm.py (shipped with the package) on 95% of its
              training lines (5% of every input file dropped, seeded), with
              the friendships that the downstream friend-prediction task
              holds out removed;
  version 2   the same graph with the 5% back (the "5% new edges"), trained
              three ways:
                cold            from scratch, another seed
                warm_start      from version 1 (twhin train --warm-start)
                l2_to_previous  warm start plus alpha |theta - theta_prev|^2

For each strategy: the per-entity relative L2 change against version 1
(mean, p99, by degree bucket; twhin_jax.drift), neighbour overlap@10, the
version's test MRR (sampled ranking), and the downstream metric: ROC-AUC of
Last.fm friend prediction with the version's user embeddings as features
(twhin_jax.downstream.lastfm_friends). ``run`` writes results.json,
results.md and drift_by_degree.png into its output folder;
tools/drift_experiment.py and ``twhin report`` call it.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import time
from typing import Callable

import numpy as np

from twhin_jax import shipped_configs

LASTFM = "social/hetrec2011-lastfm-2k"
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
  import matplotlib  # lazy: only the plot needs it
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # lazy, as matplotlib above
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



@dataclasses.dataclass(frozen=True)
class Settings:
  dim: int = 64
  epochs: int = 10
  alpha: float = 1.0  # L2-to-previous strength
  new_fraction: float = 0.05
  seed: int = 0


def results_table(results: dict) -> str:
  lines = ["| strategy | mean rel. L2 | p99 rel. L2 | overlap@10 | test MRR | friend ROC-AUC |",
           "|---|---:|---:|---:|---:|---:|"]
  for name, r in results.items():
    lines.append(f"| {name} | {r['mean_rel_l2']:.3f} | {r['p99_rel_l2']:.3f} | "
                 f"{r['overlap_at_10']:.3f} | {r['test_mrr']:.4f} | {r['friend_roc_auc']:.4f} |")
  return "\n".join(lines)


def run(out: str, settings: Settings = Settings(), *, progress: bool = True,
        log: Callable[[str], None] = print,
        emit: Callable[[dict], None] | None = None) -> dict:
  """Trains version 1 and the three version 2s under ``out``; returns
  {strategy: result with its "drift" details}. ``emit`` gets each
  strategy's summary as soon as it is measured."""
  data_dir = os.environ.get("TWHIN_DATA_DIR", "")
  if not os.path.isdir(os.path.join(data_dir, LASTFM)):
    raise FileNotFoundError(f"{os.path.join(data_dir, LASTFM)}: not found "
                            "(set TWHIN_DATA_DIR to the shared data directory)")
  # lazy: these load jax, and the report imports this module into the jax-free cli
  from twhin_jax import downstream
  from twhin_jax import drift  # lazy: jax
  from twhin_jax import train as train_lib  # lazy: jax

  os.makedirs(out, exist_ok=True)
  overrides = [f"--config.model.dim={settings.dim}", f"--config.train.epochs={settings.epochs}",
               "--config.train.eval_every_epochs=0", "--config.train.checkpoint_every_buckets=0",
               "--config.eval.num_sampled_negatives=500"]
  friends = downstream.write_lastfm_train_friends(
      os.path.join(out, "friends_train.dat"), seed=settings.seed)
  new_config = downstream.lastfm_config_with_held_out_friends(
      friends, shipped_configs.config_path("lastfm"), overrides)
  old_config = old_graph_config(new_config, os.path.join(out, "old_files"),
                                settings.new_fraction, settings.seed)

  def train(name, config):
    workdir = os.path.join(out, name)
    started = time.perf_counter()
    trainer = train_lib.train(config, workdir, progress=progress)
    metrics = trainer.evaluate("test", progress=False)
    trainer.close()
    log(f"[drift] {name}: {time.perf_counter() - started:.0f} s, test MRR {metrics['mrr']:.4f}")
    return workdir, metrics

  old_dir, _ = train("v1", old_config)
  results = {}
  for name in STRATEGIES:
    config = new_config.copy_and_resolve_references()
    if name == "cold":
      config.train.seed = settings.seed + 1
    else:
      config.warm_start.parent = os.path.abspath(old_dir)
      config.warm_start.l2_to_previous = settings.alpha if name == "l2_to_previous" else 0.0
    workdir, metrics = train(f"v2_{name}", config)
    moved = drift.drift(old_dir, workdir, k=10, out_dir=os.path.join(workdir, "plots"))
    friends_metrics = downstream.lastfm_friends(workdir, feature_set="U", seed=settings.seed)
    result = {"strategy": name, "mean_rel_l2": moved["mean_rel_l2"],
              "p99_rel_l2": moved["p99_rel_l2"], "overlap_at_10": moved["overlap_at_k"],
              "test_mrr": metrics["mrr"], "friend_roc_auc": friends_metrics["roc_auc"],
              "friend_rce": friends_metrics["rce"],
              "alpha": settings.alpha if name == "l2_to_previous" else 0.0,
              "budget": {"dim": settings.dim, "epochs": settings.epochs,
                         "new_fraction": settings.new_fraction}}
    results[name] = dict(result, drift=moved)
    if emit is not None:
      emit(result)
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(results, f, indent=1, default=str)
  plot(results, os.path.join(out, "drift_by_degree.png"))
  table = results_table(results)
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write(table + "\n")
  log(table)
  return results
