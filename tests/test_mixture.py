"""Mixtures (paper Eq. 3) and diverse retrieval on a tiny trained demo run."""

from __future__ import annotations

import numpy as np
import pytest

from twhin_jax import cli
from twhin_jax import demo_config
from twhin_jax import mixture
from twhin_jax import retrieval
from twhin_jax import train as train_lib
from twhin_jax.graph import Graph


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("mixture_demo"))
  train_lib.train(demo_config.get_config("test"), workdir, progress=False).close()
  retriever = retrieval.Retriever.open(workdir, types=(), progress=False)
  model = mixture.build_mixture(workdir, "tweet", k=12, top_m=3, retriever=retriever,
                                iters=100, progress=False)
  return workdir, retriever, model


def test_weights_follow_eq3(run):
  """p(c | u) = n(u, c) / sum over u's top-m clusters, recounted from the edges."""
  workdir, _, model = run
  assert model.source_type == "user"
  assert set(model.relations) == {"authors", "favorites", "retweets", "replies"}
  graph = Graph(f"{workdir}/graph")
  edges = graph.split_edges("train")
  wanted = np.isin(edges["rel"], [graph.relation_index[r] for r in model.relations])
  src, dst = edges["src"][wanted], edges["dst"][wanted]
  checked = 0
  for user in range(0, graph.entities["user"].count, 7):
    counts = np.bincount(model.clustering.assignments[dst[src == user]], minlength=12)
    mix = model.mixture(user)
    if counts.sum() == 0:
      assert len(mix) == 0
      continue
    top = np.lexsort((np.arange(12), -counts))[:3]
    top = top[counts[top] > 0]
    np.testing.assert_array_equal(mix.clusters, top)
    np.testing.assert_allclose(mix.weights, counts[top] / counts[top].sum(), rtol=1e-6)
    np.testing.assert_array_equal(mix.vectors, model.clustering.centroids[top])
    checked += 1
  assert checked > 50
  # Saved and reloaded as is.
  loaded = mixture.load_mixture(workdir, "tweet")
  np.testing.assert_array_equal(loaded.user_weights, model.user_weights)
  np.testing.assert_array_equal(loaded.clustering.assignments, model.clustering.assignments)


def test_unseen_user_mixture_from_engagements(run):
  _, retriever, model = run
  names = retriever.names("tweet")
  a = np.flatnonzero(model.clustering.assignments == 0)[:3]
  b = np.flatnonzero(model.clustering.assignments == 1)[:1]
  engagements = [("favorites", names[i]) for i in a] + [("retweets", names[b[0]])]
  mix = model.mixture_from_engagements(engagements, retriever)
  np.testing.assert_array_equal(mix.clusters, [0, 1])
  np.testing.assert_allclose(mix.weights, [0.75, 0.25])
  with pytest.raises(ValueError, match="'clicks'"):
    model.mixture_from_engagements([("clicks", "ad1")], retriever)
  with pytest.raises(KeyError, match="'t-missing'"):
    model.mixture_from_engagements([("favorites", "t-missing")], retriever)


def test_medoids_are_members_nearest_their_centroid(run):
  _, retriever, model = run
  table = np.asarray(retriever.table("tweet"))
  clustering = mixture.cluster_table(table, 12, representative="medoid", iters=100)
  for c in range(12):
    members = np.flatnonzero(clustering.assignments == c)
    distance = np.sum((table[members] - clustering.centroids[c]) ** 2, axis=1)
    assert clustering.medoid_ids[c] == members[np.argmin(distance)]
    np.testing.assert_array_equal(clustering.representatives[c],
                                  table[clustering.medoid_ids[c]])


def test_largest_remainder():
  np.testing.assert_array_equal(mixture.largest_remainder([0.5, 0.3, 0.2], 10), [5, 3, 2])
  np.testing.assert_array_equal(mixture.largest_remainder([0.45, 0.35, 0.2], 4), [2, 1, 1])
  np.testing.assert_array_equal(mixture.largest_remainder([1 / 3] * 3, 2), [1, 1, 0])
  assert mixture.largest_remainder([0.7, 0.2, 0.1], 7).sum() == 7


def test_diverse_retrieval_covers_more_clusters(run):
  """Over users with >= 2 components: diverse top-10 spans more clusters than
  plain relation-aware top-10, honours quotas, and never repeats an item."""
  _, retriever, model = run
  plain_clusters, diverse_clusters = [], []
  users = [u for u in range(600) if (model.user_clusters[u] >= 0).sum() >= 2][:60]
  assert len(users) >= 30
  for user in users:
    mix = model.mixture(user)
    ids, _, components = mixture.diverse_search(retriever, "tweet", mix, 10,
                                                clustering=model.clustering, exclude=[0, 1])
    assert len(ids) == 10 and len(set(ids.tolist())) == 10 and not {0, 1} & set(ids.tolist())
    quotas = mixture.largest_remainder(mix.weights[np.argsort(-mix.weights, kind="stable")], 10)
    assert sorted(np.bincount(components, minlength=len(mix)).tolist()) == sorted(quotas.tolist())
    np.testing.assert_array_equal(model.clustering.assignments[ids], mix.clusters[components])
    diverse_clusters.append(mixture.diversity(ids, model.clustering.assignments,
                                              retriever.table("tweet"))["distinct_clusters"])
    batch = retriever.query_vectors("favorites", [user])
    plain, _ = retriever.search("tweet", batch, 10, exact=True)
    plain_clusters.append(mixture.diversity(plain[0], model.clustering.assignments,
                                            retriever.table("tweet"))["distinct_clusters"])
  assert np.mean(diverse_clusters) > np.mean(plain_clusters) + 0.3, (
      np.mean(diverse_clusters), np.mean(plain_clusters))


def test_personal_diverse_retrieval_ranks_members_by_the_user_query(run):
  """With the user's query, each cluster gives its quota of members, and they
  are that cluster's best members by the user's own score."""
  _, retriever, model = run
  user = next(u for u in range(600) if (model.user_clusters[u] >= 0).sum() >= 2)
  mix = model.mixture(user)
  batch = retriever.query_vectors("favorites", [user])
  ids, scores, components = mixture.diverse_search(
      retriever, "tweet", mix, 10, clustering=model.clustering, query=batch.vectors[0])
  table = np.asarray(retriever.table("tweet"), np.float32)
  user_scores = table @ batch.vectors[0]  # dot comparator
  np.testing.assert_allclose(scores, user_scores[ids], rtol=1e-5, atol=1e-6)
  for component in np.unique(components):
    members = np.flatnonzero(model.clustering.assignments == mix.clusters[component])
    taken = ids[components == component]
    best = members[np.argsort(-user_scores[members], kind="stable")][:len(taken)]
    assert set(taken.tolist()) == set(best.tolist())
  with pytest.raises(ValueError, match="clustering"):
    mixture.diverse_search(retriever, "tweet", mix, 10, query=batch.vectors[0])


def test_cluster_cli(run, capsys):
  workdir, _, _ = run
  assert cli.main(["cluster", "--workdir", workdir, "--type", "ad", "--k", "4", "--top-m", "2",
                   "--quiet"]) == 0
  assert mixture.load_mixture(workdir, "ad").clustering.num_clusters == 4
  assert cli.main(["cluster", "--workdir", workdir, "--type", "robot"]) == 2
