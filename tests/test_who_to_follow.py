"""Who-to-follow (twhin_jax/who_to_follow.py): the holdout leaks nothing and
keeps valid and test apart, metrics and the cosine baseline on hand-checked
toy graphs, the SkipGram baseline learns co-follows, the TwHIN-Follow config
keeps only the follow and low-coverage relations, and the seed spread."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os

import numpy as np
import pytest

from twhin_jax import shipped_configs
from twhin_jax import who_to_follow as wtf


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


def test_valid_and_test_shares_are_disjoint_and_leak_nothing():
  pairs = random_graph(n=80, symmetric=True, seed=1)
  train, valid, test = wtf.split_follows(pairs, 0.1, 0.1, seed=5)
  unique = {p for p in pairs if p[0] != p[1]}
  train_set, valid_set, test_set = set(train), set(valid), set(test)
  assert train_set | valid_set | test_set == unique
  assert not train_set & valid_set and not train_set & test_set and not valid_set & test_set
  for held in (valid_set, test_set):
    assert all((v, u) not in train_set for u, v in held)  # no reverse leak
    assert 0.04 * len(unique) < len(held) < 0.25 * len(unique)
  assert all((v, u) not in valid_set for u, v in test_set)  # a pair stays in one share
  assert wtf.split_follows(pairs, 0.1, 0.1, seed=5) == (train, valid, test)
  with pytest.raises(ValueError, match="sum below 1"):
    wtf.split_follows(pairs, 0.6, 0.5)
  split = wtf.Split(pairs, 0.1, 0.1, 5)
  fit, held = split.stage("test")
  assert set(fit) == train_set | valid_set  # the reported models see train + valid
  assert sum(len(v) for v in held.values()) == len(test)


def test_skipgram_ranks_co_followed_accounts_first():
  # Two communities: users 0-9 follow within 0-9, users 10-19 within 10-19.
  rng = np.random.default_rng(0)
  follows = {}
  for u in range(20):
    base = 0 if u < 10 else 10
    others = [v for v in range(base, base + 10) if v != u]
    follows[u] = set(rng.choice(others, size=6, replace=False).tolist())
  settings = wtf.SkipGramSettings(dim=16, window=10, epochs=50)
  inputs, outputs, present = wtf.train_skipgram(follows, 20, settings, seed=0)
  assert present.all() and inputs.shape == outputs.shape == (20, 16)
  queries = wtf.skipgram_queries(inputs, follows, range(20))
  for exact in (True, False):
    rankings = wtf.vector_rankings(outputs, present, queries, list(range(20)), follows,
                                   depth=3, exact=exact)
    same = sum((v < 10) == (u < 10) for u, top in rankings.items() for v in top)
    assert same / sum(len(t) for t in rankings.values()) > 0.9
    for u, top in rankings.items():
      assert u not in top and not set(top) & follows[u]  # exclusions hold
  again, _, _ = wtf.train_skipgram(follows, 20, settings, seed=0)
  np.testing.assert_array_equal(again, inputs)  # one worker: a seed gives one result
  sequences = wtf.follow_sequences(follows, seed=3)
  assert [sorted(map(int, s)) for s in sequences] == [sorted(follows[u]) for u in range(20)]


def test_spread_and_margin_over_seeds():
  stats = wtf.spread([0.2, 0.22, 0.24])
  assert stats["mean"] == pytest.approx(0.22) and stats["std"] == pytest.approx(0.02)
  assert wtf.spread([0.3])["std"] == 0.0
  rows = [{"method": "twhin_follow", "mrr": 0.10, "mrr_std": 0.01},
          {"method": "cosine", "mrr": 0.085, "mrr_std": 0.002},
          {"method": "skipgram", "mrr": 0.095, "mrr_std": 0.003}]
  result = wtf.beats(rows, "mrr")
  assert result["cosine"]["above_spread"] and not result["skipgram"]["above_spread"]


def test_network_config_keeps_follow_and_low_coverage_relations(monkeypatch, tmp_path):
  monkeypatch.setenv("TWHIN_DATA_DIR", str(tmp_path))
  from twhin_jax import config as config_lib
  config = shipped_configs.load("lastfm")
  train_path = str(tmp_path / "friend.train.tsv")
  follow = wtf.network_config(config, "friend", train_path, epochs=3, dim=8, lr=None, seed=2)
  with_tags = wtf.network_config(config, "friend", train_path, keep=("uses_tag",), epochs=3,
                                 dim=8, lr=0.2)
  for c in (follow, with_tags):
    config_lib.validate(c)
    friend = [s for s in c.data.files if s["relation_name"] == "friend"]
    assert len(friend) == 1 and friend[0]["path"] == train_path and not friend[0]["header"]
    assert c.data.valid_fraction == 0 and c.data.test_fraction == 0
  assert [r["name"] for r in follow.relations] == ["friend"]
  assert list(follow.entities.keys()) == ["user"] and len(follow.data.files) == 1
  assert follow.train.lr == config.train.lr and follow.train.seed == 2
  assert [r["name"] for r in with_tags.relations] == ["friend", "uses_tag"]
  assert sorted(with_tags.entities.keys()) == ["tag", "user"] and with_tags.train.lr == 0.2
  assert config.data.files[0]["path"] != train_path  # the original is untouched
  with pytest.raises(ValueError, match="unknown relation"):
    wtf.network_config(config, "friend", train_path, keep=("ads",), epochs=1, dim=8, lr=None)


def test_read_pairs_names_the_bad_line(tmp_path):
  path = tmp_path / "follows.tsv"
  path.write_text("a\tb\nc\n")
  with pytest.raises(ValueError, match=r"follows.tsv:2"):
    wtf.read_pairs(str(path), header=False)


LASTFM = os.path.join(os.environ.get("TWHIN_DATA_DIR", ""), "social", "hetrec2011-lastfm-2k")


@pytest.mark.skipif(not os.path.isdir(LASTFM),
                    reason=f"TWHIN_DATA_DIR holds no Last.fm ({LASTFM} not found)")
def test_tuning_scores_one_run_per_lr_and_stops_on_validation(tmp_path):
  """TwHIN's epochs are evaluation points of one resumed run per lr: the score
  at epoch 2 equals a fresh 2-epoch run's, and with patience the trials stop
  at the first point that does not improve validation R@10."""
  dataset = wtf.DATASETS["lastfm"]
  config, pairs = wtf.load_follow_pairs(dataset)
  split = wtf.Split(pairs, 0.1, 0.1, seed=0)
  every_point = wtf.Grid(twhin_lr=(0.05,), twhin_epochs=(3, 1, 2), twhin_patience=0,
                         twhin_dim=8, skipgram_window=(5,), skipgram_epochs=(1,), skipgram_dim=8)
  tuned = wtf.tune(dataset, config, split, every_point, str(tmp_path / "all"), lambda m: None)
  twhin = [t for t in tuned["trials"] if t["method"] == "twhin_follow"]
  assert [t["epochs"] for t in twhin] == [1, 2, 3]  # ascending, one run
  fresh = wtf.evaluate_twhin(split, "valid", dataset, config, str(tmp_path / "fresh"),
                             epochs=2, dim=8, lr=0.05, seed=0, paths=("exact",))["exact"]
  assert fresh["recall_at_10"] == twhin[1]["recall_at_10"] and fresh["mrr"] == twhin[1]["mrr"]
  assert tuned["twhin_follow"] == max(twhin, key=lambda t: (round(t["recall_at_10"], 6),
                                                            round(t["mrr"], 6), -t["epochs"]))
  # Where patience 1 must stop: the first point not above the best before it.
  best, stop = twhin[0], len(twhin)
  for index, trial in enumerate(twhin[1:], 1):
    if (round(trial["recall_at_10"], 6), round(trial["mrr"], 6)) > \
        (round(best["recall_at_10"], 6), round(best["mrr"], 6)):
      best = trial
    else:
      stop = index + 1
      break
  patient = wtf.tune(dataset, config, split, dataclasses.replace(every_point, twhin_patience=1),
                     str(tmp_path / "patient"), lambda m: None)
  stopped = [t for t in patient["trials"] if t["method"] == "twhin_follow"]
  assert [(t["epochs"], t["recall_at_10"]) for t in stopped] == \
      [(t["epochs"], t["recall_at_10"]) for t in twhin[:stop]]
  # A rerun in the same workdir reads the scored points (no training past them).
  again = wtf.tune(dataset, config, split, every_point, str(tmp_path / "all"), lambda m: None)
  assert [(t["epochs"], t["recall_at_10"], t["mrr"]) for t in again["trials"]
          if t["method"] == "twhin_follow"] == [(t["epochs"], t["recall_at_10"], t["mrr"])
                                                for t in twhin]
  # Other settings, or a point the run has trained past, are errors, not reuse.
  with pytest.raises(ValueError, match="tuned with"):
    wtf.tune(dataset, config, split, dataclasses.replace(every_point, twhin_dim=16),
             str(tmp_path / "all"), lambda m: None)
  points = tmp_path / "all" / "tune_lr0.05" / wtf.POINTS_FILE
  stored = json.loads(points.read_text())
  del stored["points"]["2"]
  points.write_text(json.dumps(stored))
  with pytest.raises(ValueError, match="trained to epoch 3, past the unscored point 2"):
    wtf.tune(dataset, config, split, every_point, str(tmp_path / "all"), lambda m: None)
  points.unlink()
  with pytest.raises(ValueError, match=f"holds a trained run but no {wtf.POINTS_FILE}"):
    wtf.tune(dataset, config, split, every_point, str(tmp_path / "all"), lambda m: None)
