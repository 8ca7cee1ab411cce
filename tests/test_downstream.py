"""Downstream metrics, the frozen-embedding MLP, and the task plumbing."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from twhin_jax import compress
from twhin_jax import downstream
from twhin_jax import embedding_set
from twhin_jax.downstream import metrics

DATA = os.environ.get("TWHIN_DATA_DIR", "")
needs_data = pytest.mark.skipif(
    not os.path.exists(os.path.join(DATA, "social", "hetrec2011-lastfm-2k")),
    reason="TWHIN_DATA_DIR holds no datasets")


def test_auc_of_a_perfect_scorer_is_one_and_a_hand_case_matches():
  labels = np.array([0, 1, 0, 1, 1, 0])
  assert metrics.roc_auc(labels, labels * 2.0 + 0.1) == 1.0
  assert metrics.roc_auc(labels, -labels) == 0.0
  # Positives {0.9, 0.4}, negatives {0.8, 0.1}: 3 of 4 pairs ordered -> 0.75.
  assert metrics.roc_auc([1, 0, 1, 0], [0.9, 0.8, 0.4, 0.1]) == 0.75
  assert metrics.roc_auc([1, 0], [0.5, 0.5]) == 0.5  # a tie counts 1/2
  assert math.isnan(metrics.roc_auc([1, 1], [0.2, 0.3]))


def test_average_precision_hand_case_and_ties():
  # Ranked 1, 0, 1, 0: precision 1 at recall 1/2, 2/3 at recall 1.
  assert metrics.average_precision([1, 0, 1, 0], [0.9, 0.8, 0.4, 0.1]) == pytest.approx(5 / 6)
  assert metrics.average_precision([1, 0, 1, 0], [4, 3, 2, 1]) == pytest.approx(5 / 6)
  # All tied: one threshold, precision = positive rate.
  assert metrics.average_precision([1, 0, 0, 0], [1, 1, 1, 1]) == pytest.approx(0.25)


def test_rce_of_the_base_rate_predictor_is_zero():
  rng = np.random.default_rng(0)
  labels = (rng.random(1000) < 0.3).astype(int)
  rate = labels.mean()
  assert metrics.relative_cross_entropy(labels, np.full(1000, rate), rate) == pytest.approx(
      0.0, abs=1e-9)
  assert metrics.relative_cross_entropy(labels, labels * 0.98 + 0.01, rate) > 90
  assert metrics.relative_cross_entropy(labels, 1 - labels * 0.98 - 0.01, rate) < 0
  # Hand-computed: y = [1, 0], p = [0.8, 0.4], base rate 0.5:
  # CE_model = -(ln 0.8 + ln 0.6) / 2, CE_base = ln 2.
  expected = 100 * (math.log(2) + (math.log(0.8) + math.log(0.6)) / 2) / math.log(2)
  assert metrics.relative_cross_entropy([1, 0], [0.8, 0.4], 0.5) == pytest.approx(expected)


def test_map_and_multiclass():
  # Query a: AP 1; query b: positive ranked second -> AP 1/2; query c has no positive.
  value = metrics.mean_average_precision(["a", "a", "b", "b", "c"], [1, 0, 1, 0, 0],
                                         [0.9, 0.1, 0.2, 0.7, 0.5])
  assert value == pytest.approx(0.75)
  probabilities = np.eye(3)[[0, 1, 2, 1]] * 0.9 + 0.05
  result = metrics.multiclass_metrics([0, 1, 2, 1], probabilities)
  assert result["accuracy"] == 1.0 and result["macro_roc_auc"] == 1.0


def _toy(n=3000, dim=8, seed=0):
  """Labels separable from the looked-up vectors plus a noisy dense feature."""
  rng = np.random.default_rng(seed)
  table = rng.standard_normal((n, dim)).astype(np.float32)
  labels = (table[:, 0] - table[:, 1] > 0).astype(np.int32)
  dense = (labels + rng.standard_normal(n) * 2.0)[:, None].astype(np.float32)
  embeddings = embedding_set.EmbeddingSet({"item": table}, {"item": [str(i) for i in range(n)]})
  examples = downstream.Examples(dense, {"item": np.arange(n, dtype=np.int32)}, labels)
  return embeddings, examples, labels


def test_mlp_learns_a_separable_task_from_frozen_embeddings():
  embeddings, examples, labels = _toy()
  train, valid, test = np.arange(2000), np.arange(2000, 2500), np.arange(2500, 3000)
  scores = {}
  for name, features in (("dense only", []), ("with embedding",
                                              [downstream.IdFeature("item", "item")])):
    model = downstream.build_model(embeddings, 1, features)
    table_before = (np.asarray(model.lookups["item"].table[...]) if features else None)
    info = downstream.train_model(model, examples.take(train), examples.take(valid),
                                  downstream.TrainConfig(max_epochs=30, patience=3))
    probabilities = downstream.predict(model, examples.take(test))
    scores[name] = metrics.roc_auc(labels[test], probabilities)
    assert info["history"][info["best_epoch"]]["valid_loss"] == info["best_valid_loss"]
    if features:  # the lookup table is frozen: the optimizer never touches it
      np.testing.assert_array_equal(np.asarray(model.lookups["item"].table[...]), table_before)
  assert scores["with embedding"] > 0.97, scores
  assert scores["dense only"] < 0.8, scores


def test_pq_codes_are_decoded_inside_the_model():
  embeddings, examples, labels = _toy(n=1200)
  codebook, codes = compress.train_pq(embeddings.tables["item"], num_subspaces=8)
  quantized = embedding_set.EmbeddingSet({"item": compress.decode(codes, codebook)},
                                      embeddings.names, pq={"item": (codes, codebook)})
  model = downstream.build_model(quantized, 1, [downstream.IdFeature("item", "item")])
  assert isinstance(model.lookups["item"], compress.PQEmbed)
  downstream.train_model(model, examples.take(np.arange(800)),
                         examples.take(np.arange(800, 1000)),
                         downstream.TrainConfig(max_epochs=30, patience=3))
  probabilities = downstream.predict(model, examples.take(np.arange(1000, 1200)))
  assert metrics.roc_auc(labels[1000:], probabilities) > 0.9


def test_unknown_feature_set_and_missing_run_are_named():
  with pytest.raises(ValueError, match="unknown feature set 'X'"):
    downstream.ciao_rating("nowhere", feature_set="X")
  with pytest.raises(FileNotFoundError, match="nowhere: ciao_rating needs"):
    downstream.ciao_rating("nowhere", feature_set="U")


@needs_data
def test_lastfm_split_file_and_baseline_task(tmp_path):
  kept, held = downstream.lastfm_friend_split(DATA)
  kept_set = {tuple(p) for p in kept}
  assert not any(tuple(p) in kept_set for p in held)
  assert len(held) == round(0.2 * (len(kept) + len(held)))
  path = downstream.write_lastfm_train_friends(str(tmp_path / "friends.dat"), DATA)
  written = np.loadtxt(path, dtype=np.int64, skiprows=1)
  assert len(written) == 2 * len(kept)
  assert not {tuple(sorted(p)) for p in written} & {tuple(p) for p in held}
  users = np.unique(np.concatenate([kept.ravel(), held.ravel()]))
  rng = np.random.default_rng(0)
  random_vectors = {"user": ([str(u) for u in users],
                             rng.standard_normal((len(users), 8)).astype(np.float32))}
  result = downstream.lastfm_friends(random_vectors, feature_set="none", data_dir=DATA,
                                     train_config=downstream.TrainConfig(max_epochs=8))
  # Common friends in the kept graph predict held-out friendships well above chance.
  assert result["roc_auc"] > 0.7 and result["positive_rate"] == pytest.approx(0.2, abs=0.02)
  assert {"pr_auc", "rce", "map"} <= set(result)


def test_leak_check_reads_friend_names_from_the_vocabulary(tmp_path, monkeypatch):
  """_check_no_leak maps the run's friendship ids to user names through the
  on-disk vocabulary (ids shuffled against the names) and counts held-out
  pairs the run saw, in either direction."""
  import json

  from twhin_jax import config as config_lib
  from twhin_jax import vocabulary
  from twhin_jax.downstream import tasks
  from twhin_jax.graph import FORMAT_VERSION, Graph

  graph_dir = tmp_path / "run" / "graph"
  names = ["30", "10", "50", "20", "40"]  # local id i is user names[i]
  manifest = {
      "format_version": FORMAT_VERSION, "hash": "test",
      "schema": {"entities": {"user": {"count": len(names), "num_partitions": 1}},
                 "relations": [dict(name=n, source="user", target="user", operator="none",
                                    weight=1.0) for n in ("listens", "friend")]},
      "counts": {s: 0 for s in config_lib.SPLITS}, "bucket_sizes": {},
  }
  os.makedirs(graph_dir / "splits" / "valid")
  with open(graph_dir / "manifest.json", "w") as f:
    json.dump(manifest, f)
  vocabulary.write_vocabulary(str(graph_dir), "user", names)
  # valid edges: friend 30-10, friend 50-40, and a non-friend edge 20-10.
  for key, values in (("src", [0, 2, 3]), ("rel", [1, 1, 0]), ("dst", [1, 4, 1])):
    np.save(graph_dir / "splits" / "valid" / f"{key}.npy", np.array(values, np.int64))

  def refuse(*args, **kwargs):
    raise AssertionError("the leak check loaded a whole vocabulary")
  monkeypatch.setattr(Graph, "names", refuse)
  tasks._check_no_leak(str(tmp_path / "run"), np.array([[10, 20], [20, 50]]))  # unseen
  with pytest.raises(ValueError, match="saw 2 of the 3 held-out"):
    tasks._check_no_leak(str(tmp_path / "run"), np.array([[10, 30], [40, 50], [10, 20]]))


def test_entity_labels_majority_means_and_bad_lines(tmp_path):
  path = tmp_path / "labels.tsv"
  # b appears three times (label y twice, x once), a once; columns: name, label, score
  path.write_text("b\ty\t1\na\tx\t4\nb\tx\t2\nb\ty\t6\n")
  names, label, classes, dense = downstream.read_entity_labels(
      str(path), name_column=0, label_column=1, feature_columns=(2,))
  assert names == ["a", "b"] and classes == ["x", "y"]
  assert label.tolist() == [0, 1]  # a: x; b: y (2 of 3 rows)
  np.testing.assert_allclose(dense, [[math.log(2), 4.0], [math.log(4), 3.0]])
  path.write_text("b\ty\t1\na\tx\n")
  with pytest.raises(ValueError, match=r"labels.tsv:2: 2 field\(s\)"):
    downstream.read_entity_labels(str(path), name_column=0, label_column=1, feature_columns=(2,))
  path.write_text("b\ty\t1\na\tx\tmany\n")
  with pytest.raises(ValueError, match=r"labels.tsv:2: a feature column is not a number"):
    downstream.read_entity_labels(str(path), name_column=0, label_column=1, feature_columns=(2,))
  with pytest.raises(FileNotFoundError, match="missing.tsv"):
    downstream.read_entity_labels(str(tmp_path / "missing.tsv"), name_column=0, label_column=1)


def test_entity_category_learns_labels_its_embeddings_encode(tmp_path):
  # 300 entities in 3 classes; the embedding holds the class, the dense row
  # count does not (every entity has one row).
  rng = np.random.default_rng(0)
  classes = rng.integers(0, 3, size=300)
  names = [f"e{i}" for i in range(300)]
  (tmp_path / "labels.tsv").write_text("".join(f"{n}\tc{c}\n" for n, c in zip(names, classes)))
  vectors = np.eye(3, dtype=np.float32)[classes] + 0.1 * rng.normal(size=(300, 3)).astype(
      np.float32)
  source = {"item": (names, vectors)}
  quick = downstream.TrainConfig(max_epochs=40, patience=5)
  with_vectors, without = (downstream.entity_category(
      source, entity_type="item", labels_path=str(tmp_path / "labels.tsv"), feature_set=fs,
      train_config=quick, use_pq=False) for fs in ("E", "none"))
  assert with_vectors["accuracy"] > 0.9 and without["accuracy"] < 0.6
  assert with_vectors["classes"] == 3 and with_vectors["feature_set"] == "E"
  with pytest.raises(ValueError, match="unknown feature set"):
    downstream.entity_category(source, entity_type="item",
                               labels_path=str(tmp_path / "labels.tsv"), feature_set="P")


@needs_data
def test_ciao_category_is_entity_category_over_the_ratings():
  """The generic reader over rating.tsv.gz (product, category, stars,
  helpfulness) gives every product a majority category and Ciao's dense
  features."""
  ratings = downstream.tasks.ciao_ratings(DATA)
  names, label, classes, dense = downstream.read_entity_labels(
      os.path.join(DATA, downstream.tasks.CIAO, "rating.tsv.gz"), name_column=1,
      label_column=2, feature_columns=(3, 4))
  products, inverse = np.unique(ratings[:, 1], return_inverse=True)
  counts = np.bincount(inverse)
  by_name = {n: i for i, n in enumerate(names)}
  order = np.array([by_name[str(p)] for p in products])
  np.testing.assert_allclose(dense[order, 0], np.log1p(counts))
  np.testing.assert_allclose(dense[order, 1], np.bincount(inverse, weights=ratings[:, 3]) / counts)
  # Each product's label is a most frequent category among its ratings (as
  # ciao_category's; a tie may break the other way: "10" sorts before "2").
  cats, cat_of_rating = np.unique(ratings[:, 2], return_inverse=True)
  votes = np.bincount(inverse * len(cats) + cat_of_rating,
                      minlength=len(products) * len(cats)).reshape(len(products), len(cats))
  chosen = np.searchsorted(cats, np.array([int(classes[c]) for c in label[order]]))
  assert (votes[np.arange(len(products)), chosen] == votes.max(axis=1)).all()
  assert (votes.argmax(axis=1) == chosen).mean() > 0.99  # ties are rare


def test_config_without_relations_drops_their_files_and_unused_types(monkeypatch, tmp_path):
  monkeypatch.setenv("TWHIN_DATA_DIR", str(tmp_path))
  ciao = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "ciao.py")
  config = downstream.config_without_relations(ciao, ["in_category"])
  assert "in_category" not in [r["name"] for r in config.relations]
  assert "category" not in config.entities and "product" in config.entities
  assert all(f["relation_name"] != "in_category" for f in config.data.files)
  legacy = downstream.ciao_config_without_category(ciao)
  assert legacy.relations == config.relations and legacy.name == "ciao-nocat"
  with pytest.raises(ValueError, match=r"no relation\(s\) \['follows'\]"):
    downstream.config_without_relations(ciao, ["follows"])
