"""`twhin demo`: generate a Twitter-like graph, import, train, evaluate, report.

Besides link-prediction metrics, the demo judges the embeddings against the
generator's planted communities: the share of a user's 10 nearest users (by
cosine) that share its community, against the chance level sum_c p_c^2.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

from twhin_jax import generate
from twhin_jax import run_report as reporting  # per-run plots and Markdown
from twhin_jax import rundir
from twhin_jax import train as train_lib


def community_agreement(embeddings: np.ndarray, communities: np.ndarray, *, k: int = 10,
                        num_queries: int = 1000, seed: int = 0) -> tuple[float, float]:
  """(share of the k nearest neighbours in the query's community, chance level)."""
  rng = np.random.default_rng(seed)
  queries = rng.choice(len(embeddings), size=min(num_queries, len(embeddings)), replace=False)
  unit = embeddings / (np.linalg.norm(embeddings, axis=1, keepdims=True) + 1e-9)
  sims = unit[queries] @ unit.T  # [Q, N]
  sims[np.arange(len(queries)), queries] = -np.inf  # not its own neighbour
  neighbours = np.argpartition(-sims, k, axis=1)[:, :k]  # [Q, k]
  same = communities[neighbours] == communities[queries][:, None]
  shares = np.bincount(communities) / len(communities)
  return float(same.mean()), float(np.sum(shares ** 2))


def run_demo(config, workdir: str, progress: bool = True) -> dict:
  started = time.perf_counter()
  trainer = train_lib.train(config, workdir, progress=progress)
  train_seconds = time.perf_counter() - started
  test = trainer.evaluate("test", progress=progress)

  communities = generate.read_communities(
      os.path.join(workdir, rundir.GENERATED_DIR, "communities.tsv"))
  users = trainer.graph.vocabulary("user")  # names streamed in id order, never held
  user_community = np.fromiter(
      (communities["user"][name] for chunk in users.iter_name_chunks(1 << 16)
       for name in chunk.to_pylist()), np.int64, count=len(users))
  user_table = trainer.embeddings()["user"]
  agreement, chance = community_agreement(user_table, user_community)
  trainer.close()

  print(f"\nTwitter-like demo: {trainer.graph.num_edges('train'):,} train edges, "
        f"{sum(e.count for e in trainer.graph.entities.values()):,} entities, "
        f"trained in {train_seconds:.1f} s")
  print("\nFiltered ranking on the test split (head and tail, ties averaged)\n")
  table = reporting.metrics_table(test)
  print(table)
  print(f"\nNearest users sharing the planted community: {agreement:.3f} "
        f"(chance {chance:.3f})")

  history = trainer.history
  lines = ["| epoch | loss | edges/s | valid MRR | valid Hits@10 |", "|---:|---:|---:|---:|---:|"]
  for h in history:
    valid = h.get("valid", {})
    lines.append(f"| {h['epoch'] + 1} | {h['loss']:.4f} | {h['edges_per_s']:,.0f} | "
                 f"{valid.get('mrr', float('nan')):.4f} | {valid.get('hits@10', float('nan')):.4f} |")
  plot = reporting.plot_training(history, workdir)
  report = reporting.write_report(workdir, "twhin-jax demo: Twitter-like graph", [
      ("Graph", f"{trainer.graph.num_edges('train'):,} train / "
                f"{trainer.graph.num_edges('valid'):,} valid / "
                f"{trainer.graph.num_edges('test'):,} test edges; entities: " +
                ", ".join(f"{t} {e.count:,}" for t, e in trainer.graph.entities.items())),
      ("Training", f"{len(history)} epochs in {train_seconds:.1f} s\n\n" + "\n".join(lines) +
                   (f"\n\n![training]({os.path.relpath(plot, workdir)})" if plot else "")),
      ("Test metrics (filtered)", table),
      ("Planted communities", f"Share of each user's 10 nearest users (cosine) in its own "
                              f"community: **{agreement:.3f}** (chance {chance:.3f})."),
  ])
  summary = {"train_seconds": train_seconds, "test": {k: test[k] for k in (
      "mrr", "mr", "hits@1", "hits@3", "hits@10", "auc")},
             "community_agreement": agreement, "community_chance": chance, "report": report}
  with open(os.path.join(workdir, "demo_summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  print(f"\nreport: {report}")
  return summary
