"""Mini-batch k-means: planted clusters, the update rule, subspaces, seeding."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from twhin_jax import kmeans


def planted(num_clusters=8, n=6000, d=16, spread=6.0, seed=0):
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(num_clusters, d)) * spread
  labels = rng.integers(num_clusters, size=n)
  return (centers[labels] + rng.normal(size=(n, d))).astype(np.float32), labels, centers


def purity(labels, assignments, k):
  """Share of points whose cluster's majority label is their own label."""
  agree = 0
  for j in range(k):
    members = labels[assignments == j]
    if len(members):
      agree += np.bincount(members).max()
  return agree / len(labels)


@pytest.mark.parametrize("init", kmeans.INITS)
def test_recovers_planted_clusters(init):
  x, labels, centers = planted()
  centroids, assignments = kmeans.kmeans(x, 8, iters=150, batch_size=512, seed=3, init=init)
  assert centroids.shape == (8, 16) and assignments.shape == (6000,)
  assert assignments.dtype == np.int32
  if init == "k-means++":
    assert purity(labels, assignments, 8) == 1.0
    # Every planted center has a learned centroid within noise distance.
    gaps = np.linalg.norm(centers[:, None] - centroids[None], axis=-1).min(axis=1)
    assert gaps.max() < 0.5, gaps
  else:  # random init may merge two clusters; it must still beat chance widely
    assert purity(labels, assignments, 8) > 0.7
  # Assignments are the nearest centroids.
  distances = np.linalg.norm(x[:, None] - centroids[None], axis=-1)
  np.testing.assert_array_equal(assignments, distances.argmin(axis=1))


def test_minibatch_step_is_the_running_mean():
  """Eq. (2): one batch update equals Sculley's point-by-point 1/v_c rule."""
  rng = np.random.default_rng(1)
  x = rng.normal(size=(40, 3)).astype(np.float32)
  centroids = rng.normal(size=(4, 3)).astype(np.float32)
  counts = np.array([0.0, 3.0, 1.0, 7.0], np.float32)
  state = kmeans.KMeansState(jnp.asarray(centroids), jnp.asarray(counts))
  key = kmeans.jax.random.key(0)
  new = kmeans._minibatch_step(state, jnp.asarray(x), key, 16)
  batch = x[np.asarray(kmeans.jax.random.randint(key, (16,), 0, 40))]
  expected, v = centroids.copy(), counts.copy()
  nearest = ((batch[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)  # before updates
  for point, c in zip(batch, nearest):
    v[c] += 1
    expected[c] = (1 - 1 / v[c]) * expected[c] + point / v[c]
  np.testing.assert_allclose(np.asarray(new.centroids), expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(new.counts), v)


def test_seeded_and_deterministic():
  x, _, _ = planted(n=2000)
  a = kmeans.kmeans(x, 5, iters=20, seed=7)
  b = kmeans.kmeans(x, 5, iters=20, seed=7)
  c = kmeans.kmeans(x, 5, iters=20, seed=8)
  np.testing.assert_array_equal(a[0], b[0])
  assert not np.array_equal(a[0], c[0])


def test_subspaces_match_independent_runs_in_quality():
  """M subspaces at once: each subspace's clusters are recovered, codes index them."""
  rng = np.random.default_rng(2)
  n, m, ds, k = 4000, 3, 4, 6
  parts, labels, best = [], [], []
  for _ in range(m):
    x, lab, centers = planted(num_clusters=k, n=n, d=ds, seed=int(rng.integers(1 << 30)))
    parts.append(x)
    labels.append(lab)
    # In 4 dimensions planted clusters overlap a little: the bar is the purity
    # of assigning every point to its nearest *true* center.
    oracle = ((x[:, None] - centers[None]) ** 2).sum(-1).argmin(1)
    best.append(purity(lab, oracle, k))
  x_msd = np.stack(parts)  # [M, N, ds]
  centroids, codes = kmeans.kmeans_subspaces(x_msd, k, iters=150, batch_size=256, seed=0)
  assert centroids.shape == (m, k, ds) and codes.shape == (n, m) and codes.dtype == np.uint8
  for j in range(m):
    assert purity(labels[j], codes[:, j].astype(np.int64), k) > best[j] - 0.01, best[j]
    distances = ((x_msd[j][:, None] - centroids[j][None]) ** 2).sum(-1)
    np.testing.assert_array_equal(codes[:, j], distances.argmin(1))
  _, wide = kmeans.kmeans_subspaces(x_msd[:, :600], 300, iters=2, seed=0, init="random")
  assert wide.dtype == np.int32


def test_bad_arguments_are_named():
  x = np.zeros((10, 2), np.float32)
  with pytest.raises(ValueError, match="k must be"):
    kmeans.kmeans(x, 11)
  with pytest.raises(ValueError, match="init"):
    kmeans.kmeans(x, 2, init="forgy")
  with pytest.raises(ValueError, match=r"\[M, N, d_sub\]"):
    kmeans.kmeans_subspaces(x, 2)
