"""Recall@K / NDCG@K against a brute-force numpy reference."""

from __future__ import annotations

import numpy as np
import pytest

from twhin_jax import recommendation_eval as rec
from twhin_jax import train as train_lib


def _brute_force(queries, candidates, excluded_sets, positive_sets, k):
  """Rank every candidate of every query with numpy; the textbook formulas."""
  recalls, ndcgs = [], []
  scores = queries.astype(np.float64) @ candidates.astype(np.float64).T  # [Q, N]
  for q in range(len(queries)):
    row = scores[q].copy()
    row[list(excluded_sets[q])] = -np.inf
    order = np.lexsort((np.arange(len(row)), -row))[:k]  # best first, ties by lower id
    gains = np.array([1.0 if c in positive_sets[q] else 0.0 for c in order])
    dcg = np.sum(gains / np.log2(np.arange(2, k + 2)))
    idcg = np.sum(1.0 / np.log2(np.arange(2, min(k, len(positive_sets[q])) + 2)))
    recalls.append(gains.sum() / len(positive_sets[q]))
    ndcgs.append(dcg / idcg)
  return np.array(recalls), np.array(ndcgs)


@pytest.mark.parametrize("chunk", [7, 64, 1000])
def test_top_k_and_metrics_match_brute_force(chunk):
  rng = np.random.default_rng(0)
  q, n, d, k = 37, 150, 8, 10
  queries = rng.normal(size=(q, d)).astype(np.float32)
  candidates = rng.normal(size=(n, d)).astype(np.float32)
  excluded_sets = [set(rng.choice(n, rng.integers(0, 30), replace=False).tolist())
                   for _ in range(q)]
  positive_sets = [set(rng.choice(n, rng.integers(1, 15), replace=False).tolist()) - e or {0}
                   for e in excluded_sets]
  positive_sets = [p - excluded_sets[i] or {next(iter(set(range(n)) - excluded_sets[i]))}
                   for i, p in enumerate(positive_sets)]

  def csr(sets):
    return (np.concatenate([[0], np.cumsum([len(s) for s in sets])]).astype(np.int64),
            np.concatenate([sorted(s) for s in sets]).astype(np.int64))

  top = rec.top_k_excluding(queries, candidates, csr(excluded_sets), k, batch_size=16,
                            chunk=chunk)
  want_scores = queries @ candidates.T
  for i in range(q):
    assert not set(top[i].tolist()) & excluded_sets[i]
    got = want_scores[i, top[i]]
    assert np.all(np.diff(got) <= 1e-6)  # best first
  recall, ndcg = rec.recall_ndcg(top, csr(positive_sets))
  want_recall, want_ndcg = _brute_force(queries, candidates, excluded_sets, positive_sets, k)
  np.testing.assert_allclose(recall, want_recall, atol=1e-6)
  np.testing.assert_allclose(ndcg, want_ndcg, atol=1e-6)
  assert 0 < recall.mean() < 1


def test_evaluate_retrieval_on_a_trained_run(demo_run_d16):
  """The whole protocol on a trained graph: queries, exclusions of train
  (and valid) edges, every candidate of the target type; equals the numpy
  reference, and beats random ranking."""
  trainer = train_lib.Trainer(train_lib.load_run_config(demo_run_d16), demo_run_d16,
                              progress=False)
  try:
    graph, layout = trainer.graph, trainer.layout
    embeddings, params = trainer.embeddings(), trainer.rel_state["params"]
    relation, k = "favorites", 20
    got = rec.evaluate_retrieval(graph, embeddings, params, layout, trainer.config, relation,
                                 split="test", k=k, batch_size=32)
  finally:
    trainer.close()
  r = [x.name for x in graph.relations].index(relation)
  info = graph.relations[r]
  test = graph.split_edges("test")
  known = [graph.split_edges(s) for s in ("train", "valid")]
  positives, excluded = {}, {}
  for s, t, rr in zip(test["src"], test["dst"], test["rel"]):
    if rr == r:
      positives.setdefault(int(s), set()).add(int(t))
  for e in known:
    for s, t, rr in zip(e["src"], e["dst"], e["rel"]):
      if rr == r and int(s) in positives and int(t) not in positives[int(s)]:
        excluded.setdefault(int(s), set()).add(int(t))
  sources = sorted(positives)
  param = np.asarray(layout.param(params, r))
  assert info.operator == "translation" and trainer.config.model.comparator == "dot"
  queries = embeddings[info.source][sources] + param  # translation operator, by hand
  want_recall, want_ndcg = _brute_force(queries, embeddings[info.target],
                                        [excluded.get(s, set()) for s in sources],
                                        [positives[s] for s in sources], k)
  assert got["queries"] == len(sources) and got["candidates"] == graph.entities[info.target].count
  np.testing.assert_allclose(got[f"recall@{k}"], want_recall.mean(), rtol=1e-4)
  np.testing.assert_allclose(got[f"ndcg@{k}"], want_ndcg.mean(), rtol=1e-4)
  # Random ranking recalls about K / (candidates) of the positives.
  assert got[f"recall@{k}"] > 2 * k / got["candidates"], got


def test_unknown_relation_is_rejected(demo_run_d16):
  trainer = train_lib.Trainer(train_lib.load_run_config(demo_run_d16), demo_run_d16,
                              progress=False)
  try:
    with pytest.raises(ValueError, match="unknown relation"):
      rec.evaluate_retrieval(trainer.graph, {}, {}, trainer.layout, trainer.config, "nope")
  finally:
    trainer.close()
