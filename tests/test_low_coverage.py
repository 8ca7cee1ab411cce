"""The low-coverage experiment (twhin_jax/low_coverage.py): covered users, the
split, the downstream examples, the two setups' configs and the epoch
choice. The experiment itself (minutes of training) runs in
tools/low_coverage.py; see docs/low_coverage.md."""

from __future__ import annotations

import numpy as np
import pytest

from twhin_jax import config as config_lib
from twhin_jax import low_coverage
from twhin_jax import shipped_configs


def test_covered_users_are_a_seeded_share():
  users = [str(i) for i in range(200)] * 2  # duplicates count once
  covered = low_coverage.covered_users(users, 0.1, seed=4)
  assert len(covered) == 20 and covered <= set(users)
  assert low_coverage.covered_users(users, 0.1, seed=4) == covered
  assert low_coverage.covered_users(users, 0.1, seed=5) != covered
  assert len(low_coverage.covered_users(["a"], 0.1, seed=0)) == 1  # at least one
  with pytest.raises(ValueError, match="coverage"):
    low_coverage.covered_users(users, 0.0, seed=0)


def test_split_is_disjoint_complete_and_seeded():
  edges = [(str(u), str(i)) for u in range(30) for i in range(u % 7 + 1)]
  train, valid, test = low_coverage.split_edges(edges + edges[:5], seed=1)
  assert sorted(train + valid + test) == sorted(set(edges))
  assert not set(train) & set(valid) and not set(valid) & set(test)
  n = len(set(edges))
  assert len(valid) == round(0.1 * n) and abs(len(test) - 0.1 * n) <= 1  # test: the rest
  assert low_coverage.split_edges(edges, seed=1) == (train, valid, test)


def test_engagement_examples_draw_unseen_negatives_and_train_degrees():
  train = [("u1", "a"), ("u1", "b"), ("u2", "a")]
  held = [("u1", "c"), ("u2", "b")]
  items = ["a", "b", "c", "d", "e"]
  users, targets, labels, dense = low_coverage.engagement_examples(train, held, items, 3, seed=0)
  assert len(labels) == 2 * 4 and labels.sum() == 2
  known = set(train) | set(held)
  for user, item, label in zip(users, targets, labels):
    if label == 0:
      assert (user, item) not in known and item in items
  first = users.index("u1")
  assert (users[first], targets[first], labels[first]) == ("u1", "c", 1)
  # log1p(train degree): u1 has 2 train edges, c none; u2 one, b one.
  np.testing.assert_allclose(dense[first], np.log1p([2, 0]), rtol=1e-6)
  second = users.index("u2")
  np.testing.assert_allclose(dense[second], np.log1p([1, 1]), rtol=1e-6)


def test_setup_configs_hold_the_right_relations_and_files(monkeypatch, tmp_path):
  monkeypatch.setenv("TWHIN_DATA_DIR", str(tmp_path))
  config = shipped_configs.load("lastfm")
  dataset = low_coverage.DATASETS["lastfm"]
  files = {s: str(tmp_path / f"listened.{s}.tsv") for s in ("train", "valid", "test")}
  alone = low_coverage.setup_config(config, dataset, "alone", files, dim=8, epochs=3, seed=1)
  co = low_coverage.setup_config(config, dataset, "co_embedded", files, dim=8, epochs=4, seed=1,
                                 eval_every=2)
  for c in (alone, co):
    config_lib.validate(c)
    listened = [f for f in c.data.files if f["relation_name"] == "listened"]
    assert {f["split"]: f["path"] for f in listened} == files
    assert c.data.valid_fraction == 0 and c.data.test_fraction == 0
  assert [r["name"] for r in alone.relations] == ["listened"]
  assert sorted(alone.entities.keys()) == ["artist", "user"]
  assert sorted(r["name"] for r in co.relations) == ["friend", "listened"]
  friend = [f for f in co.data.files if f["relation_name"] == "friend"]
  assert len(friend) == 1 and friend[0]["path"].endswith("user_friends.dat")
  assert co.train.eval_every_epochs == 2 and alone.train.eval_every_epochs == 0
  with pytest.raises(ValueError, match="setup"):
    low_coverage.setup_config(config, dataset, "both", files, dim=8, epochs=1, seed=0)


def test_best_epochs_reads_validation_only():
  history = [{"epoch": 0, "loss": 1.0}, {"epoch": 4, "valid": {"mrr": 0.10}},
             {"epoch": 9, "valid": {"mrr": 0.12}}, {"epoch": 14, "valid": {"mrr": 0.12}},
             {"epoch": 19, "valid": {"mrr": 0.11}, "test": {"mrr": 0.9}}]
  assert low_coverage.best_epochs(history) == (10, 0.12)  # a tie goes to fewer epochs
  with pytest.raises(ValueError, match="validation"):
    low_coverage.best_epochs([{"epoch": 0, "loss": 1.0}])


def test_table_rows_show_mean_and_spread():
  rows = [{"dataset": "d", "setup": "none", "measure": "downstream", "roc_auc": 0.8,
           "roc_auc_std": 0.01, "rce": 20.0, "rce_std": 1.0},
          {"dataset": "d", "setup": "alone", "measure": "link", "mrr": 0.1, "mrr_std": 0.002,
           "hits_at_10": 0.2, "hits_at_10_std": 0.01},
          {"dataset": "d", "setup": "alone", "measure": "downstream", "roc_auc": 0.85,
           "roc_auc_std": 0.02, "rce": 30.0, "rce_std": 2.0}]
  table = low_coverage.table_rows(rows)
  assert table[0] == ["d", "no embeddings", None, None, "0.8000 ± 0.0100", "20.00 ± 1.00"]
  assert table[1] == ["d", "relation alone", "0.1000 ± 0.0020", "0.2000 ± 0.0100",
                      "0.8500 ± 0.0200", "30.00 ± 2.00"]
