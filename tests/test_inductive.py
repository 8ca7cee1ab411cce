"""Inductive embeddings of new entities (paper Eq. 5)."""

from __future__ import annotations

import importlib.util
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from twhin_jax import demo_config
from twhin_jax import inductive
from twhin_jax import mixture
from twhin_jax import model
from twhin_jax import retrieval
from twhin_jax import train as train_lib
from twhin_jax.graph import Graph


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("inductive_demo"))
  train_lib.train(demo_config.get_config("test"), workdir, progress=False).close()
  return workdir, retrieval.Retriever.open(workdir, types=(), progress=False)


def user_edges(workdir, retriever, user):
  graph = Graph(f"{workdir}/graph")
  edges = graph.split_edges("train")
  out = []
  for rel_index, dst in zip(edges["rel"][edges["src"] == user], edges["dst"][edges["src"] == user]):
    rel = graph.relations[rel_index]
    if rel.source == "user":  # ids are per type: skip other types' row `user`
      out.append((rel.name, retriever.names(rel.target)[dst], "out"))
  for rel_index, src in zip(edges["rel"][edges["dst"] == user], edges["src"][edges["dst"] == user]):
    rel = graph.relations[rel_index]
    if rel.target == "user":
      out.append((rel.name, retriever.names(rel.source)[src], "in"))
  return out


def test_vector_is_the_eq5_mean(run):
  """translation + dot: out-edges contribute theta_t, in-edges theta_s + p."""
  workdir, retriever = run
  edges = [("favorites", "t3"), ("retweets", "t10", "out"), ("follows", "u7", "in"),
           ("follows", "u9", "out")]
  got = inductive.embed_new_entity(retriever, "user", edges)
  tweet, user = retriever.table("tweet"), retriever.table("user")
  p = retriever.relation("follows").forward
  expected = np.mean([tweet[retriever.lookup("tweet", "t3")], tweet[retriever.lookup("tweet", "t10")],
                      user[retriever.lookup("user", "u7")] + p,
                      user[retriever.lookup("user", "u9")]], axis=0)
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_new_user_ranks_its_neighbours_well(run):
  """Embedded from its own training edges as if new, a user's engaged tweets
  rank far above random among all 2,000 tweets."""
  workdir, retriever = run
  percentiles = []
  for user in range(0, 600, 40):
    edges = user_edges(workdir, retriever, user)
    favorites = [retriever.lookup("tweet", t) for r, t, side in edges if r == "favorites"]
    if len(edges) < 5 or not favorites:
      continue
    vector = inductive.embed_new_entity(retriever, "user", edges)
    batch = retriever.query_vectors("favorites", None, vectors=vector[None])
    ids, _ = retriever.search("tweet", batch, 2000, exact=True)
    rank = {int(t): i for i, t in enumerate(ids[0])}
    percentiles.append(np.mean([rank[t] / 2000 for t in favorites]))
  assert len(percentiles) >= 8
  assert np.median(percentiles) < 0.2, percentiles  # random: 0.5


@pytest.mark.parametrize("operator", model.SUPPORTED_OPERATORS)
def test_operator_math(operator):
  rng = np.random.default_rng(0)
  d = 8
  param = model.init_operator_params(operator, 1, d)[0]
  param = (param + 0.3 * rng.normal(size=param.shape)).astype(np.float32)
  targets = rng.normal(size=(5, d)).astype(np.float32)
  op = lambda x: np.asarray(model.apply_operator(operator, jnp.asarray(param), jnp.asarray(x)))
  # l2 / cos: the inverse, op(g) = theta_t.
  for comparator in ("l2", "cos"):
    g = model.source_vectors(operator, param, targets, comparator)
    np.testing.assert_allclose(op(g), targets, rtol=1e-4, atol=1e-4)
  # dot: the adjoint, op(x) . t = x . g + op(0) . t for any x.
  g = model.source_vectors(operator, param, targets, "dot")
  x = rng.normal(size=(5, d)).astype(np.float32)
  lhs = np.sum(op(x) * targets, axis=1)
  rhs = np.sum(x * g, axis=1) + np.sum(op(np.zeros_like(x)) * targets, axis=1)
  np.testing.assert_allclose(lhs, rhs, rtol=1e-4, atol=1e-4)
  # New target: op(theta_s).
  np.testing.assert_allclose(model.target_vectors(operator, param, x), op(x), rtol=1e-6)


def test_errors(run):
  _, retriever = run
  with pytest.raises(ValueError, match="'quaternion'"):
    model.source_vectors("quaternion", np.zeros(4), np.zeros((1, 4)), "dot")
  with pytest.raises(ValueError, match="no inverse"):
    model.source_vectors("diagonal", np.array([1.0, 0.0]), np.ones((1, 2)), "l2")
  with pytest.raises(ValueError, match="cannot be its"):
    inductive.embed_new_entity(retriever, "tweet", [("clicks", "ad1")])
  with pytest.raises(KeyError, match="'t-missing'"):
    inductive.embed_new_entity(retriever, "user", [("favorites", "t-missing")])
  with pytest.raises(ValueError, match="at least one edge"):
    inductive.embed_new_entity(retriever, "user", [])


def test_new_user_gets_a_mixture(run):
  workdir, retriever = run
  model_ = mixture.build_mixture(workdir, "tweet", k=8, top_m=2, iters=50, retriever=retriever,
                                 progress=False)
  edges = user_edges(workdir, retriever, 5)
  new = inductive.embed_new_user(retriever, "user", edges, model_)
  assert new.vector.shape == (64,)
  stored = model_.mixture(5)  # the same engagements, counted at build time
  np.testing.assert_array_equal(new.mixture.clusters, stored.clusters)
  np.testing.assert_allclose(new.mixture.weights, stored.weights, rtol=1e-6)


def _favorite_percentiles(retriever, vectors, favorites):
  """Mean rank percentile of each user's favorites among all tweets."""
  out = []
  for vector, rows in zip(vectors, favorites):
    batch = retriever.query_vectors("favorites", None, vectors=np.asarray(vector)[None])
    ids, _ = retriever.search("tweet", batch, 2000, exact=True)
    rank = {int(t): i for i, t in enumerate(ids[0])}
    out.append(np.mean([rank[t] / 2000 for t in rows]))
  return np.array(out)


def test_fold_in_ranks_known_edges_better_than_eq5(run):
  """Fold-in minimises the run's own loss on the new rows: from the Eq. 5
  start, the users' own favorites must rank higher after it, and zero steps
  must return the start unchanged."""
  from twhin_jax import fold_in
  workdir, retriever = run
  users, edges, favorites = [], [], []
  for user in range(0, 600, 30):
    mine = user_edges(workdir, retriever, user)
    rows = [retriever.lookup("tweet", t) for r, t, side in mine if r == "favorites"]
    if len(mine) >= 5 and rows:
      users.append(user)
      edges.append(mine)
      favorites.append(rows)
  assert len(users) >= 8
  start = np.stack([inductive.embed_new_entity(retriever, "user", e) for e in edges])
  config = demo_config.get_config("test")
  settings = fold_in.FoldInSettings.from_config(config, steps=0)
  np.testing.assert_array_equal(fold_in.fold_in(retriever, "user", edges, start, settings), start)
  settings = fold_in.FoldInSettings.from_config(config, steps=50)
  folded = fold_in.fold_in(retriever, "user", edges, start, settings)
  assert folded.shape == start.shape and np.all(np.isfinite(folded))
  before = _favorite_percentiles(retriever, start, favorites)
  after = _favorite_percentiles(retriever, folded, favorites)
  assert np.mean(after) < np.mean(before), (np.mean(after), np.mean(before))
  assert np.median(after) < 0.1, after


def test_inductive_tool_takes_any_config(capsys):
  """tools/inductive_eval.py --config: the held-out users of any config's
  user type (here the demo's test graph), not only its two built-in datasets."""
  tool = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools",
                      "inductive_eval.py")
  spec = importlib.util.spec_from_file_location("inductive_eval_tool", tool)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = os.path.join(os.path.dirname(tool), "..", "configs", "demo.py")
  assert module.main(["--config", f"{config}:test", "--epochs", "1", "--dim", "8",
                      "--json"]) == 0
  result = json.loads(capsys.readouterr().out)
  assert result["dataset"] == demo_config.get_config("test").name
  assert result["embedded_users"] > 0 and result["transductive"]["edges"] > 0
  assert set(result["gap_closed"]) >= {"fold_in", "inductive"}
