"""Diverse (mixture) retrieval vs plain relation-aware retrieval: diversity and recall.

    .venv/bin/python tools/diverse_eval.py [--json] [--workdir DIR]

Trains the generated Twitter-like graph (2,000 users, 6,000 tweets, 10
communities; d = 64, 6 epochs, 10% of edges held out as test), clusters the
tweets (k = 20), builds every user's top-3 mixture from training edges, and
for each user with test favorites compares the top-10 tweets of

  plain    the favorites query op(theta_u) (exact search), and
  diverse  the user's mixture, quotas by largest remainder, each component
           searched within its cluster (``mixture.diverse_search``),

both excluding the user's training tweets. Reports recall@10 of the test
favorites, distinct clusters in the top 10 and their mean pairwise cosine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

from twhin_jax import demo_config
from twhin_jax import mixture
from twhin_jax import retrieval
from twhin_jax import train as train_lib
from twhin_jax.graph import Graph


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", default=None)
  parser.add_argument("--k", type=int, default=10)
  parser.add_argument("--clusters", type=int, default=20)
  parser.add_argument("--top-m", type=int, default=3)
  parser.add_argument("--json", action="store_true")
  args = parser.parse_args(argv)
  config = demo_config.get_config("test")
  config.data.generator_args = dict(num_users=2000, num_tweets=6000, num_advertisers=50,
                                    num_ads=300, num_communities=10, seed=0)
  config.data.valid_fraction, config.data.test_fraction = 0.0, 0.1
  config.train.epochs = 6
  config.train.eval_every_epochs = 0
  with tempfile.TemporaryDirectory() as scratch:
    workdir = args.workdir or scratch
    train_lib.train(config, workdir, progress=False).close()
    retriever = retrieval.Retriever.open(workdir, types=(), progress=False)
    model = mixture.build_mixture(workdir, "tweet", k=args.clusters, top_m=args.top_m,
                                  relations=("favorites",), retriever=retriever, progress=False)
    graph = Graph(os.path.join(workdir, "graph"))
    fav = graph.relation_index["favorites"]
    train_edges, test_edges = graph.split_edges("train"), graph.split_edges("test")
    seen: dict[int, set] = {}
    for s, t in zip(train_edges["src"][train_edges["rel"] == fav],
                    train_edges["dst"][train_edges["rel"] == fav]):
      seen.setdefault(int(s), set()).add(int(t))
    truth: dict[int, set] = {}
    for s, t in zip(test_edges["src"][test_edges["rel"] == fav],
                    test_edges["dst"][test_edges["rel"] == fav]):
      truth.setdefault(int(s), set()).add(int(t))
    table = retriever.table("tweet")
    rows = {"plain": [], "diverse": [], "diverse_personal": []}
    for user, answers in sorted(truth.items()):
      mix = model.mixture(user)
      if len(mix) == 0:
        continue
      exclude = seen.get(user, set())
      batch = retriever.query_vectors("favorites", [user])
      ids, _ = retriever.search("tweet", batch, args.k + len(exclude), exact=True)
      plain = [i for i in ids[0] if i not in exclude][:args.k]
      diverse, _, _ = mixture.diverse_search(retriever, "tweet", mix, args.k,
                                             clustering=model.clustering, exclude=exclude)
      # The same quotas per cluster, members ranked by the user's own query.
      personal, _, _ = mixture.diverse_search(retriever, "tweet", mix, args.k,
                                              clustering=model.clustering, exclude=exclude,
                                              query=batch.vectors[0])
      for name, found in (("plain", plain), ("diverse", diverse),
                          ("diverse_personal", personal)):
        stats = mixture.diversity(found, model.clustering.assignments, table)
        stats["recall"] = len(set(int(i) for i in found) & answers) / len(answers)
        rows[name].append(stats)
  result = {name: {f"recall@{args.k}": float(np.mean([r["recall"] for r in v])),
                   "distinct_clusters": float(np.mean([r["distinct_clusters"] for r in v])),
                   "mean_pairwise_cos": float(np.mean([r["mean_pairwise_cos"] for r in v]))}
            for name, v in rows.items()}
  result.update(users=len(rows["plain"]), clusters=args.clusters, top_m=args.top_m, k=args.k)
  if args.json:
    print(json.dumps(result))
    return 0
  print(f"{result['users']} users, k={args.k}, {args.clusters} tweet clusters, top-{args.top_m}\n")
  print(f"| retrieval | recall@{args.k} | distinct clusters | mean pairwise cos |")
  print("|---|---|---|---|")
  for name in ("plain", "diverse", "diverse_personal"):
    r = result[name]
    print(f"| {name} | {r[f'recall@{args.k}']:.3f} | {r['distinct_clusters']:.2f} | "
          f"{r['mean_pairwise_cos']:.3f} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
