"""Drift between versions: zero against itself, exact under a known perturbation."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from twhin_jax import cli
from twhin_jax import drift
from twhin_jax import embedding_set
from twhin_jax import vocabulary


@pytest.fixture(scope="module")
def run_dir(demo_run_d16):
  return demo_run_d16


def test_run_against_itself_has_no_drift(run_dir, capsys, tmp_path):
  out = str(tmp_path / "plots")
  assert cli.main(["drift", "--old", run_dir, "--new", run_dir, "--k", "5", "--json",
                   "--out", out]) == 0
  report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert report["k"] == 5
  assert report["mean_rel_l2"] == 0.0 and report["p99_rel_l2"] == 0.0
  assert report["overlap_at_k"] == 1.0
  assert set(report["per_type"]) == {"user", "tweet", "advertiser", "ad"}
  assert report["shared"] == 600 + 2000 + 20 + 100
  buckets = report["per_degree_bucket"]
  assert buckets and sum(b["count"] for b in buckets) == report["shared"]
  assert os.path.exists(os.path.join(out, "drift.png"))


def test_scaled_copy_drifts_by_the_scale_and_keeps_cosine_neighbours(run_dir):
  old = embedding_set.load_embeddings(run_dir)
  new = embedding_set.EmbeddingSet({t: 1.25 * x for t, x in old.tables.items()}, old.names,
                                old.degrees, origin="scaled")
  report = drift.drift(old, new, k=10)
  assert report["mean_rel_l2"] == pytest.approx(0.25, rel=1e-5)
  assert report["p99_rel_l2"] == pytest.approx(0.25, rel=1e-5)
  for bucket in report["per_degree_bucket"]:
    assert bucket["mean_rel_l2"] == pytest.approx(0.25, rel=1e-5)
  assert report["overlap_at_k"] == 1.0  # cosine neighbours ignore a global scale


def test_noise_of_known_size_is_measured_and_lowers_overlap(run_dir):
  old = embedding_set.load_embeddings(run_dir, ["user", "tweet"])
  rng = np.random.default_rng(0)
  overlaps = []
  for sigma in (0.05, 0.5):
    # Noise along random directions with norm exactly sigma * ||x||.
    tables = {}
    for t, x in old.tables.items():
      direction = rng.standard_normal(x.shape)
      direction /= np.linalg.norm(direction, axis=1, keepdims=True)
      tables[t] = x + sigma * np.linalg.norm(x, axis=1, keepdims=True) * direction
    report = drift.drift(old, embedding_set.EmbeddingSet(tables, old.names, old.degrees), k=10)
    assert report["mean_rel_l2"] == pytest.approx(sigma, rel=1e-4)
    overlaps.append(report["overlap_at_k"])
  assert 1.0 > overlaps[0] > overlaps[1]


def test_entities_are_aligned_by_name():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((50, 8)).astype(np.float32)
  names = [f"e{i}" for i in range(50)]
  old = embedding_set.EmbeddingSet({"item": x}, {"item": names}, {"item": np.arange(50)})
  keep = rng.permutation(40)  # shuffled, 10 removed, 3 added
  new_x = np.concatenate([x[keep], rng.standard_normal((3, 8)).astype(np.float32)])
  new_names = [names[i] for i in keep] + ["n0", "n1", "n2"]
  report = drift.drift(old, embedding_set.EmbeddingSet({"item": new_x}, {"item": new_names}), k=5)
  info = report["per_type"]["item"]
  assert (info["count"], info["only_old"], info["only_new"]) == (40, 10, 3)
  assert report["mean_rel_l2"] == 0.0 and report["overlap_at_k"] == 1.0


def test_on_disk_vocabularies_are_aligned_without_holding_names(tmp_path, monkeypatch):
  """Two export-style folders (<type>.npy + vocab/): names stay on disk
  (NameSequence views; iterating one whole would raise here), rows are
  aligned by a merge join of the name-sorted files across many row groups."""
  monkeypatch.setattr(vocabulary, "ROW_GROUP_ROWS", 4)
  rng = np.random.default_rng(3)
  x = rng.standard_normal((50, 8)).astype(np.float32)
  names = [f"e{i:02d}" + ("\u00e9" if i % 5 == 0 else "") for i in range(50)]
  keep = rng.permutation(40)
  new_x = np.concatenate([x[keep], rng.standard_normal((3, 8)).astype(np.float32)])
  new_x[0] *= 2.0  # one shared entity moves by exactly its own norm
  new_names = [names[i] for i in keep] + ["n0", "n1", "n2"]
  for folder, table, type_names in (("old", x, names), ("new", new_x, new_names)):
    os.makedirs(tmp_path / folder)
    np.save(tmp_path / folder / "item.npy", table)
    vocabulary.write_vocabulary(str(tmp_path / folder), "item", type_names)

  def refuse(self):
    raise AssertionError("a whole vocabulary was iterated")
  monkeypatch.setattr(vocabulary.NameSequence, "__iter__", refuse)
  old = embedding_set.load_embeddings(str(tmp_path / "old"))
  assert isinstance(old.names["item"], vocabulary.NameSequence)
  report = drift.drift(str(tmp_path / "old"), str(tmp_path / "new"), k=5,
                       out_dir=str(tmp_path / "plots"))
  info = report["per_type"]["item"]
  assert (info["count"], info["only_old"], info["only_new"]) == (40, 10, 3)
  assert report["mean_rel_l2"] == pytest.approx(1.0 / 40, rel=1e-5)  # one of 40 moved by 1.0
  assert old.lookup("item", names[7]) == 7 and old.rows("item", ["zz", names[3]]).tolist() == [-1, 3]


def test_mismatched_dims_name_the_type():
  a = embedding_set.EmbeddingSet({"item": np.ones((20, 4))}, {"item": [str(i) for i in range(20)]})
  b = embedding_set.EmbeddingSet({"item": np.ones((20, 6))}, {"item": [str(i) for i in range(20)]})
  with pytest.raises(ValueError, match="item: dim 4"):
    drift.drift(a, b)


@pytest.mark.parametrize("metric", ["cos", "dot", "l2"])
def test_exact_knn_matches_numpy(metric):
  rng = np.random.default_rng(2)
  table = rng.standard_normal((300, 12)).astype(np.float32)
  queries = np.arange(0, 300, 7)
  # Small blocks force padded query and table blocks and the running top-k merge.
  ids, scores = drift.exact_knn(table[queries], table, 6, metric=metric, exclude=queries,
                                query_block=16, table_block=64)
  if metric == "cos":
    unit = table / np.linalg.norm(table, axis=1, keepdims=True)
    full = unit[queries] @ unit.T
  elif metric == "dot":
    full = table[queries] @ table.T
  else:
    full = -np.square(table[queries][:, None, :] - table[None]).sum(-1)
  full[np.arange(len(queries)), queries] = -np.inf
  expected = np.argsort(-full, axis=1)[:, :6]
  np.testing.assert_array_equal(ids, expected)
  assert not np.any(ids == queries[:, None])


def test_degree_buckets_are_log_spaced():
  degrees = np.array([0, 1, 2, 3, 4, 7, 8, 1000])
  np.testing.assert_array_equal(drift.degree_bucket(degrees), [0, 1, 2, 2, 3, 3, 4, 10])
  assert drift.bucket_range(3) == (4, 8)
  assert drift.bucket_range(0) == (0, 1)
