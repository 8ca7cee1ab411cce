"""Who-to-follow helpers: the holdout leaks nothing, metrics and the cosine
baseline on hand-checked toy graphs, and configs built for the holdout."""

from __future__ import annotations

import importlib.util
import itertools
import os

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("who_to_follow",
                                               os.path.join(REPO, "tools", "who_to_follow.py"))
wtf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(wtf)


def random_graph(n=60, p=0.15, symmetric=True, seed=0):
  rng = np.random.default_rng(seed)
  pairs = []
  for u, v in itertools.combinations(range(n), 2):
    if rng.random() < p:
      pairs.append((str(u), str(v)))
      if symmetric or rng.random() < 0.3:
        pairs.append((str(v), str(u)))
    elif not symmetric and rng.random() < p:
      pairs.append((str(v), str(u)))
  return pairs


@pytest.mark.parametrize("symmetric", [True, False])
def test_holdout_leaks_no_edge_or_reverse(symmetric):
  pairs = random_graph(symmetric=symmetric) + [("0", "0")]  # a self-loop is dropped
  pairs += pairs[:5]  # duplicates are one edge
  train, held = wtf.holdout_follows(pairs, fraction=0.1, seed=3)
  train_set, held_set, unique = set(train), set(held), {p for p in pairs if p[0] != p[1]}
  assert train_set | held_set == unique and not train_set & held_set
  for u, v in held:
    assert (v, u) not in train_set  # the reverse never leaks into train
  degree = {}
  for u, _ in unique:
    degree[u] = degree.get(u, 0) + 1
  remaining = {}
  for u, _ in train:
    remaining[u] = remaining.get(u, 0) + 1
  for u, d in degree.items():
    assert remaining.get(u, 0) >= 1  # nobody loses every follow
    lost = d - remaining.get(u, 0)
    if d < 2:
      assert lost == 0 or any(v == u for _, v in held)  # only as someone's reverse
  # About 10% per user (at least one): far from all, more than none.
  assert 0.05 * len(unique) < len(held) < 0.35 * len(unique)
  assert wtf.holdout_follows(pairs, fraction=0.1, seed=3) == (train, held)  # seeded


def test_rank_metrics_by_hand():
  rankings = {0: [5, 6, 7, 8], 1: [9, 2]}
  held = {0: {7, 4}, 1: {9}, 2: {1}}  # user 2 has no ranking: a miss
  metrics = wtf.rank_metrics(rankings, held, k=3)
  assert metrics["heldout_edges"] == 4 and metrics["users"] == 3
  assert metrics["recall_at_3"] == pytest.approx(2 / 4)  # 7 at rank 3, 9 at rank 1
  assert metrics["mrr"] == pytest.approx((1 / 3 + 1) / 4)
  assert wtf.filtered_top(np.array([3, 1, 4, 1, 5, 9, 2]), {1, 4}, 3) == [3, 5, 9]


def test_cosine_baseline_equals_a_hand_ranking():
  # 0 follows 1, 2; 1 follows 2, 3; 2 follows 1; 3 follows 1, 2, 4; 4 follows 5.
  pairs = [("0", "1"), ("0", "2"), ("1", "2"), ("1", "3"), ("2", "1"),
           ("3", "1"), ("3", "2"), ("3", "4"), ("4", "5")]
  index = {str(i): i for i in range(6)}
  adjacency = wtf.follow_matrix(pairs, index)
  rankings = wtf.cosine_rankings(adjacency, [0, 2, 5], depth=10, block=2)
  # User 0 = {1, 2}: cos with 3 = {1, 2, 4} is 2/sqrt(6) = 0.816; with 1 = {2, 3}
  # 1/2; with 2 = {1} 1/sqrt(2) (but 1, 2 are known follows); 4, 5 score 0
  # (ties by index).
  assert rankings[0] == [3, 4, 5]
  # User 2 = {1}: 0 (1/sqrt 2) and 3 (1/sqrt 3) share 1; then 4, 5 at 0 (1 is known).
  assert rankings[2] == [0, 3, 4, 5]
  # User 5 follows nobody: every score is 0, ranked by index, itself excluded.
  assert rankings[5] == [0, 1, 2, 3, 4]
  dense = np.asarray(adjacency.todense())
  norms = np.linalg.norm(dense, axis=1)
  cos = dense @ dense.T / np.maximum(np.outer(norms, norms), 1e-12)
  assert cos[0, 3] == pytest.approx(2 / np.sqrt(6)) and cos[0, 1] == pytest.approx(0.5)


def test_holdout_configs_point_at_the_training_copy(monkeypatch, tmp_path):
  monkeypatch.setenv("TWHIN_DATA_DIR", str(tmp_path))
  from twhin_jax import config as config_lib
  config = config_lib.load_config(os.path.join(REPO, "configs", "lastfm.py"))
  train_path = str(tmp_path / "friend.train.tsv")
  hetero = wtf.holdout_config(config, "friend", train_path, follow_only=False, epochs=3,
                              dim=8, lr=0.2, mix_relations=True)
  follow = wtf.holdout_config(config, "friend", train_path, follow_only=True, epochs=3, dim=8,
                              lr=None, mix_relations=False)
  for c in (hetero, follow):
    config_lib.validate(c)
    friend = [s for s in c.data.files if s["relation_name"] == "friend"]
    assert len(friend) == 1 and friend[0]["path"] == train_path and not friend[0]["header"]
    assert c.data.valid_fraction == 0 and c.data.test_fraction == 0
  assert len(hetero.relations) == 5 and hetero.negatives.mix_relations and hetero.train.lr == 0.2
  assert [r["name"] for r in follow.relations] == ["friend"]
  assert list(follow.entities.keys()) == ["user"] and len(follow.data.files) == 1
  assert follow.train.lr == config.train.lr and config.data.files[0]["path"] != train_path
