"""Retrieval: exact search, relation-aware queries, ScaNN recall, index reuse."""

from __future__ import annotations

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from twhin_jax import cli
from twhin_jax import demo_config
from twhin_jax import export as export_lib
from twhin_jax import graph as graph_lib
from twhin_jax import model
from twhin_jax import retrieval
from twhin_jax import rundir
from twhin_jax import train as train_lib
from twhin_jax import vocabulary

OPERATORS = ("none", "translation", "diagonal", "complex_diagonal", "rotation", "linear")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("retrieval_demo"))
  trainer = train_lib.train(demo_config.get_config("test"), workdir, progress=False)
  trainer.close()
  return workdir


@pytest.fixture(scope="module")
def demo_retriever(demo_run):
  # exact_below=500: the tiny demo types (600 users, 2000 tweets) get ScaNN indexes.
  return retrieval.Retriever.open(demo_run, types=("user", "tweet"), exact_below=500,
                                  progress=False)


def clustered(n, d, seed, clusters=50):
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(clusters, d))
  return (centers[rng.integers(clusters, size=n)] + 0.5 * rng.normal(size=(n, d))).astype(
      np.float32)


@pytest.mark.parametrize("comparator", retrieval.COMPARATORS)
def test_exact_search_matches_numpy(comparator):
  table = clustered(3000, 16, 0)
  queries = clustered(37, 16, 1)  # not a power of two: padded batch
  ids, scores = retrieval.exact_search(table, queries, 7, comparator)
  reference = np.asarray(model.compare_all(comparator, jnp.asarray(queries), jnp.asarray(table)))
  expected = np.argsort(-reference, axis=1)[:, :7]
  np.testing.assert_array_equal(ids, expected)
  np.testing.assert_allclose(scores, np.take_along_axis(reference, expected, 1), rtol=1e-4,
                             atol=1e-3)


def test_scann_recall_on_a_small_table():
  table = clustered(30_000, 32, 2)
  queries = clustered(200, 32, 3)
  settings = retrieval.choose_settings(len(table), 32, "dot")
  assert settings.num_leaves == 173 and settings.dims_per_block == 2
  searcher = retrieval.build_scann(table, settings)
  found, scores = retrieval.scann_search(searcher, queries, 10, settings)
  truth, true_scores = retrieval.exact_search(table, queries, 10, "dot")
  recall = np.mean([len(np.intersect1d(a, b)) / 10 for a, b in zip(found, truth)])
  assert recall >= 0.9, recall
  # Reordered candidates carry exact float32 inner products.
  np.testing.assert_allclose(scores[:, 0], np.sum(queries * table[found[:, 0]], 1), rtol=1e-4)
  # l2 through ScaNN is reported as the model's -squared distance.
  l2 = retrieval.choose_settings(len(table), 32, "l2")
  assert l2.anisotropic_quantization_threshold is None
  ids, neg_sq = retrieval.scann_search(retrieval.build_scann(table, l2), queries[:5], 3, l2)
  np.testing.assert_allclose(neg_sq, -np.sum((queries[:5, None] - table[ids]) ** 2, -1),
                             rtol=1e-3, atol=1e-3)


def test_forward_query_ranks_like_the_model(demo_run, demo_retriever):
  """Targets of (user, favorites, ?) equal a brute-force argsort of the
  model's own scoring function over every tweet; ScaNN agrees closely."""
  trainer = train_lib.Trainer(train_lib.load_run_config(demo_run), demo_run, progress=False)
  tables = trainer.embeddings()
  params, layout, config = trainer.rel_state["params"], trainer.layout, trainer.config
  trainer.close()
  relation = trainer.graph.relation_index["favorites"]
  users = np.arange(0, 600, 15)
  scores = np.asarray(layout.score_targets(params, config.model.comparator, relation,
                                           jnp.asarray(tables["user"][users]),
                                           jnp.asarray(tables["tweet"])))  # [Q, N]
  batch = demo_retriever.query_vectors("favorites", [int(u) for u in users])
  ids, got = demo_retriever.search("tweet", batch, 10, exact=True)
  np.testing.assert_array_equal(ids, np.argsort(-scores, axis=1)[:, :10])
  np.testing.assert_allclose(got, np.sort(scores, axis=1)[:, ::-1][:, :10], rtol=1e-4, atol=1e-4)
  approx, _ = demo_retriever.search("tweet", batch, 10)
  recall = np.mean([len(np.intersect1d(a, b)) / 10 for a, b in zip(approx, ids)])
  assert recall >= 0.9, recall
  # Reverse: users who would favorite a tweet, by the same f(s, r, t).
  tweets = np.arange(0, 2000, 50)
  by_model = np.asarray(layout.score_sources(params, config.model.comparator, relation,
                                             jnp.asarray(tables["user"]),
                                             jnp.asarray(tables["tweet"][tweets])))  # [Q, U]
  batch = demo_retriever.query_vectors("favorites", [int(t) for t in tweets],
                                       direction="reverse")
  ids, got = demo_retriever.search("user", batch, 5, exact=True)
  np.testing.assert_array_equal(ids, np.argsort(-by_model, axis=1)[:, :5])
  np.testing.assert_allclose(got, np.sort(by_model, axis=1)[:, ::-1][:, :5], rtol=1e-4,
                             atol=1e-4)


def write_synthetic_run(workdir, comparator, reciprocal, seed=0, n=(300, 400), d=8):
  """A run directory with random tables and one relation per operator (a -> b),
  in the layout ``prepare_run`` writes, to reach every operator/comparator."""
  rng = np.random.default_rng(seed)
  index_dir = os.path.join(workdir, retrieval.INDEX_DIR)
  export_dir = os.path.join(workdir, retrieval.EXPORT_DIR)
  os.makedirs(index_dir)
  os.makedirs(export_dir)
  for entity_type, count in zip(("a", "b"), n):
    np.save(os.path.join(export_dir, f"{entity_type}.npy"),
            rng.normal(size=(count, d)).astype(np.float32))
    names = [f"{entity_type}{i}" for i in range(count)]
    with open(os.path.join(export_dir, f"{entity_type}.names.txt"), "w") as f:
      f.writelines(name + "\n" for name in names)
    vocabulary.write_vocabulary(export_dir, entity_type, names)  # as export.py copies it
  arrays = {}
  for operator in OPERATORS:
    for direction in ("forward", "reverse"):
      param = model.init_operator_params(operator, 1, d)[0]
      arrays[f"{direction}/{operator}"] = (param + 0.5 * rng.normal(size=param.shape)).astype(
          np.float32)
  export_lib._write_npz(os.path.join(index_dir, retrieval.RELATIONS_FILE), arrays)
  return {"checkpoint": {"hash": "synthetic"}, "graph_manifest_hash": "synthetic",
          "comparator": comparator, "reciprocal": reciprocal,
          "entities": {"a": {"count": n[0], "dim": d}, "b": {"count": n[1], "dim": d}},
          "relations": [{"name": o, "source": "a", "target": "b", "operator": o}
                        for o in OPERATORS]}


@pytest.mark.parametrize("reciprocal", [False, True])
@pytest.mark.parametrize("comparator", retrieval.COMPARATORS)
def test_every_operator_and_direction_ranks_by_the_scoring_function(tmp_path, comparator,
                                                                    reciprocal):
  run = write_synthetic_run(str(tmp_path), comparator, reciprocal)
  retriever = retrieval.Retriever(str(tmp_path), run, progress=False)
  a = np.load(tmp_path / "export" / "a.npy")
  b = np.load(tmp_path / "export" / "b.npy")
  for operator in OPERATORS:
    rel = retriever.relation(operator)
    forward = np.asarray(model.compare_all(
        comparator, model.apply_operator(operator, jnp.asarray(rel.forward), jnp.asarray(a[:4])),
        jnp.asarray(b)))  # [4, Nb]: f(a_i, r, b_j)
    if reciprocal:  # eq. (1'): compare(op_r'(theta_t), theta_s)
      reverse = np.asarray(model.compare_all(
          comparator, model.apply_operator(operator, jnp.asarray(rel.reverse),
                                           jnp.asarray(b[:4])), jnp.asarray(a)))
    else:
      reverse = np.asarray(model.compare_all(
          comparator, model.apply_operator(operator, jnp.asarray(rel.forward), jnp.asarray(a)),
          jnp.asarray(b[:4]))).T  # [4, Na]: f(a_j, r, b_i)
    for direction, known, expected in (("forward", "a", forward), ("reverse", "b", reverse)):
      got = retriever.neighbors(known, 2, operator, k=5, direction=direction, exact=True)
      np.testing.assert_array_equal([g.id for g in got], np.argsort(-expected[2])[:5],
                                    err_msg=f"{operator} {direction}")
      np.testing.assert_allclose([g.score for g in got], np.sort(expected[2])[::-1][:5],
                                 rtol=1e-4, atol=1e-4, err_msg=f"{operator} {direction}")


def test_index_is_saved_and_reloaded_without_rebuilding(demo_run, demo_retriever, tmp_path):
  manifest_path = os.path.join(demo_run, "index", "tweet", "manifest.json")
  with open(manifest_path) as f:
    manifest = json.load(f)
  assert manifest["backend"] == "scann" and manifest["count"] == 2000 and manifest["dim"] == 64
  assert manifest["settings"]["num_leaves"] == 45
  assert manifest["checkpoint"]["hash"] == retrieval.checkpoint_identity(demo_run)["hash"]
  stamp = os.path.getmtime(manifest_path)
  before = demo_retriever.neighbors("user", "u3", "favorites", k=10)
  # A moved copy of the run reloads the same index (relative asset paths).
  moved = str(tmp_path / "moved")
  shutil.copytree(demo_run, moved)
  again = retrieval.Retriever.open(moved, types=("tweet",), exact_below=500, progress=False)
  assert again.manifests["tweet"]["build_seconds"] == manifest["build_seconds"]
  assert again.neighbors("user", "u3", "favorites", k=10) == before
  reopened = retrieval.Retriever.open(demo_run, types=("tweet",), exact_below=500,
                                      progress=False)
  assert os.path.getmtime(manifest_path) == stamp  # not rebuilt
  assert reopened.neighbors("user", "u3", "favorites", k=10) == before
  # A manifest from another checkpoint is stale: rebuilt.
  manifest["checkpoint"]["hash"] = "older"
  with open(os.path.join(moved, "index", "tweet", "manifest.json"), "w") as f:
    json.dump(manifest, f)
  rebuilt = retrieval.Retriever.open(moved, types=("tweet",), exact_below=500, progress=False)
  assert rebuilt.manifests["tweet"]["checkpoint"]["hash"] != "older"
  # Small tables default to exact search, recorded as such.
  small = retrieval.Retriever.open(moved, types=("ad",), progress=False)
  assert small.manifests["ad"]["backend"] == "exact"
  assert "exact_below" in small.manifests["ad"]["reason"]


def test_same_type_neighbors_exclude_the_entity(demo_retriever):
  got = demo_retriever.neighbors("tweet", "t5", k=8, exact=True)
  assert len(got) == 8 and "t5" not in [g.name for g in got]
  scores = [g.score for g in got]
  assert scores == sorted(scores, reverse=True)


def test_names_are_looked_up_in_the_exported_vocabulary(demo_run, demo_retriever, tmp_path,
                                                       monkeypatch):
  """No name list or dict: the retriever reads export/vocab/ per request. An
  export without it (older code) is written again."""
  before = demo_retriever.neighbors("user", "u3", "favorites", k=10)
  moved = str(tmp_path / "moved")
  shutil.copytree(demo_run, moved)
  for entity_type in ("user", "tweet", "ad"):
    os.remove(os.path.join(moved, "export", f"{entity_type}.names.txt"))  # never read
  again = retrieval.Retriever.open(moved, types=("tweet",), exact_below=500, progress=False)
  assert again.neighbors("user", "u3", "favorites", k=10) == before
  graph = rundir.open_run(moved).graph
  rows = [5, 0, 599, 5]
  assert again.names_of("user", rows) == graph.names_of("user", rows)
  names = again.names("user")
  assert not isinstance(names, list) and len(names) == graph.entities["user"].count
  assert names[599] == graph.names_of("user", [599])[0]
  np.testing.assert_array_equal(again.lookup_many("user", [names[7], 3, names[2]]), [7, 3, 2])
  with pytest.raises(KeyError, match="unknown user 'nobody'"):
    again.lookup_many("user", ["u1", "nobody"])
  with pytest.raises(KeyError, match="out of range"):
    again.lookup("user", 600)
  with pytest.raises(KeyError, match="unknown user 1.5"):
    again.lookup("user", 1.5)
  # An export from before export/vocab/ existed: the run is exported again.
  shutil.rmtree(os.path.join(moved, "export", "vocab"))
  def refuse(*args, **kwargs):
    raise AssertionError("a whole vocabulary was loaded into memory")
  monkeypatch.setattr(graph_lib.Graph, "names", refuse)
  monkeypatch.setattr(graph_lib.Graph, "_name_index", property(refuse))
  reopened = retrieval.Retriever.open(moved, types=("tweet",), exact_below=500, progress=False)
  assert reopened.neighbors("user", "u3", "favorites", k=10) == before
  assert os.path.exists(os.path.join(moved, "export", "vocab", "user.by_name.parquet"))


def test_errors_name_the_bad_thing(demo_retriever):
  with pytest.raises(ValueError, match="'robot'"):
    demo_retriever.neighbors("robot", "u1")
  with pytest.raises(KeyError, match="'likes'"):
    demo_retriever.neighbors("user", "u1", "likes")
  with pytest.raises(KeyError, match="'nobody'"):
    demo_retriever.neighbors("user", "nobody", "favorites")
  with pytest.raises(ValueError, match="not its"):
    demo_retriever.neighbors("ad", 0, "favorites")
  with pytest.raises(ValueError, match="comparator"):
    demo_retriever.search("tweet", np.zeros((1, 64)), comparator="hamming")


def test_index_cli(demo_run, capsys):
  assert cli.main(["index", "--workdir", demo_run, "--types", "user", "ad", "--quiet"]) == 0
  out = json.loads(capsys.readouterr().out)
  assert set(out) == {"user", "ad"} and out["ad"]["backend"] == "exact"
  assert cli.main(["index", "--workdir", demo_run, "--types", "robot"]) == 2


def test_scann_build_leaves_stderr_quiet():
  """The C++ core's absl log lines (one per build) do not reach stderr, and
  stderr works again afterwards."""
  script = (
      "import sys, numpy as np\n"
      "from twhin_jax import retrieval\n"
      "x = np.random.default_rng(0).normal(size=(5000, 16)).astype(np.float32)\n"
      "s = retrieval.build_scann(x, retrieval.choose_settings(len(x), 16, 'dot'))\n"
      "print('after build', file=sys.stderr)\n")
  import subprocess
  import sys
  done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, done.stderr
  assert "partitioner" not in done.stderr and "I0000" not in done.stderr, done.stderr
  assert "after build" in done.stderr
