"""The negative sampler (negatives.py): chunk classes, log q, uniform draws, masks."""

from __future__ import annotations

import collections
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from twhin_jax import negatives


def test_chunk_classes_mix_only_relations_of_one_group_and_type_pair():
  rels = [SimpleNamespace(source="u", target="t"), SimpleNamespace(source="u", target="t"),
          SimpleNamespace(source="u", target="u"), SimpleNamespace(source="u", target="t")]
  groups = ("translation:8", "translation:8", "translation:8", "diagonal:8")
  np.testing.assert_array_equal(negatives.chunk_classes(rels, groups, False), [0, 1, 2, 3])
  mixed = negatives.chunk_classes(rels, groups, True)
  assert mixed[0] == mixed[1]  # same group, same types: one class
  assert len({mixed[0], mixed[2], mixed[3]}) == 3  # other types / other group: own classes
  assert sorted(set(mixed.tolist())) == list(range(3))  # classes are 0..K-1


@pytest.mark.parametrize("chunk,num_uniform", [(50, 50), (10, 0), (2, 7)])
def test_batch_share_of_log_q_sums_to_c_minus_1_per_class(chunk, num_uniform):
  """q(v) - U/N summed over the distinct entities v of one class is C - 1:
  each edge sees the other C - 1 edges of its chunk."""
  rng = np.random.default_rng(0)
  num = 2_000
  rel = rng.integers(0, 3, num)
  src = rng.zipf(1.5, num) % 300
  dst = rng.integers(0, 40, num)
  src_sizes = rng.integers(100, 400, num)  # N of each edge's range (any positive values)
  dst_sizes = rng.integers(100, 400, num)
  src_logq, dst_logq = negatives.sampling_log_counts(
      rel, src, dst, np.bincount(rel, minlength=3), src_sizes, dst_sizes, chunk, num_uniform)
  for entity, logq, sizes in ((src, src_logq, src_sizes), (dst, dst_logq, dst_sizes)):
    for r in range(3):
      seen = {}
      for i in np.flatnonzero(rel == r):
        seen[int(entity[i])] = np.exp(logq[i]) - num_uniform / sizes[i]
      assert sum(seen.values()) == pytest.approx(chunk - 1, rel=1e-9)
    # The same entity of the same class has the same batch share everywhere.
    shares = collections.defaultdict(set)
    for i in range(num):
      shares[(int(rel[i]), int(entity[i]))].add(round(float(np.exp(logq[i])
                                                             - num_uniform / sizes[i]), 9))
    assert all(len(s) == 1 for s in shares.values())


def test_uniform_log_count():
  sizes = np.array([1, 10, 1000, 0])
  got = np.exp(negatives.uniform_log_count(sizes, 50, 20).astype(np.float64))
  np.testing.assert_allclose(got * np.maximum(sizes, 1), 20 + 49, rtol=1e-6)
  # No uniform draws: still the batch term of an average entity (U counts as 1).
  np.testing.assert_allclose(np.exp(negatives.uniform_log_count(np.array([7]), 5, 0)) * 7, 5,
                             rtol=1e-6)


def test_draw_uniform_stays_in_range_and_is_seeded():
  lo = jnp.array([0, 100, 7, 50], jnp.int32)
  n = jnp.array([5, 1, 0, 1000], jnp.int32)
  key = jax.random.key(3)
  rows = np.asarray(negatives.draw_uniform(key, lo, n, 400))
  assert rows.shape == (4, 400)
  for i in range(4):
    assert rows[i].min() >= int(lo[i])
    assert rows[i].max() < int(lo[i]) + max(int(n[i]), 1)
  assert len(set(rows[0].tolist())) == 5  # a range of 5 is covered by 400 draws
  np.testing.assert_array_equal(rows, np.asarray(negatives.draw_uniform(key, lo, n, 400)))
  other = np.asarray(negatives.draw_uniform(jax.random.key(4), lo, n, 400))
  assert (other != rows).any()


def test_negative_mask_against_a_loop():
  ids = jnp.array([3, 5, 3, 9, 5, 1, 3, 8], jnp.int32)  # C=5 chunk ids, then U=3 uniform
  weight = jnp.array([1.0, 0.5, 1.0, 0.0, 2.0])  # edge 3 is padding
  mask = np.asarray(negatives.negative_mask(ids, weight, 3))
  assert mask.shape == (5, 8)
  ids_np, w = np.asarray(ids), np.asarray(weight)
  for i in range(5):
    for j in range(8):
      real = j >= 5 or w[j] > 0
      assert mask[i, j] == float(real and ids_np[j] != ids_np[i]), (i, j)
  assert not np.diagonal(mask[:, :5]).any()  # never the edge's own positive
  assert not mask[:, 3].any()  # never a padded edge's entity


def test_log_q_defaults_to_zero():
  batch = SimpleNamespace(src=jnp.zeros((4, 6), jnp.int32), src_logq=None)
  terms = negatives.log_q(batch)
  assert [t.shape for t in terms] == [(4, 6), (4, 6), (4,), (4,)]
  assert all(not np.asarray(t).any() for t in terms)
