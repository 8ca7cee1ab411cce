"""Bucket orders: pure, seeded permutations with per-order properties."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
import pytest

from twhin_jax import schedule

grids = st.tuples(st.integers(1, 6), st.integers(1, 6))
seeds = st.integers(0, 2**31 - 1)
epochs = st.integers(0, 1000)
names = st.sampled_from(sorted(schedule.ORDERS))

FAST = settings(max_examples=60, deadline=None)


def _all_buckets(grid):
  return {(i, j) for i in range(grid[0]) for j in range(grid[1])}


@FAST
@given(name=names, grid=grids, seed=seeds, epoch=epochs)
def test_every_order_is_a_permutation_of_all_buckets(name, grid, seed, epoch):
  order = schedule.bucket_order(name, grid, seed, epoch)
  assert len(order) == grid[0] * grid[1]
  assert set(order) == _all_buckets(grid)
  for bucket in order:
    assert isinstance(bucket, tuple) and len(bucket) == 2
    assert all(isinstance(k, int) for k in bucket)


@FAST
@given(name=names, grid=grids, seed=seeds, epoch=epochs)
def test_orders_are_deterministic(name, grid, seed, epoch):
  assert (schedule.bucket_order(name, grid, seed, epoch)
          == schedule.bucket_order(name, grid, seed, epoch))
  assert schedule.bucket_order(name, grid, seed, epoch) == schedule.ORDERS[name](grid, seed, epoch)


def test_sequential_is_row_major():
  assert schedule.bucket_order("sequential", (2, 3), 5, 7) == [
      (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]


@pytest.mark.parametrize("grid", [(3, 3), (4, 5), (6, 6)])
def test_random_order_changes_across_epochs_and_seeds(grid):
  differ_epoch = sum(schedule.bucket_order("random", grid, seed, 0)
                     != schedule.bucket_order("random", grid, seed, 1) for seed in range(10))
  differ_seed = sum(schedule.bucket_order("random", grid, seed, 0)
                    != schedule.bucket_order("random", grid, seed + 1, 0) for seed in range(10))
  # 9! = 362880 orders on the smallest grid: a repeat is vanishingly rare.
  assert differ_epoch >= 9
  assert differ_seed >= 9
  # Not simply the row-major order either.
  assert sum(schedule.bucket_order("random", grid, seed, 0) != schedule.sequential(grid)
             for seed in range(10)) >= 9


def test_shuffled_orders_change_across_epochs():
  grid = (4, 4)
  for name in ("inside_out", "affinity"):
    differ = sum(schedule.bucket_order(name, grid, seed, 0) != schedule.bucket_order(name, grid, seed, 1)
                 for seed in range(10))
    assert differ >= 8, name


@FAST
@given(grid=grids, seed=seeds, epoch=epochs)
def test_inside_out_shells_grow(grid, seed, epoch):
  order = schedule.bucket_order("inside_out", grid, seed, epoch)
  shells = [max(b) for b in order]
  assert shells == sorted(shells)
  # A shell starts only after every bucket inside it was visited.
  for k, bucket in enumerate(order):
    inner = {b for b in _all_buckets(grid) if max(b) < max(bucket)}
    assert inner <= set(order[:k])


@FAST
@given(grid=grids, seed=seeds, epoch=epochs)
def test_outside_in_shells_shrink(grid, seed, epoch):
  order = schedule.bucket_order("outside_in", grid, seed, epoch)
  shells = [max(b) for b in order]
  assert shells == sorted(shells, reverse=True)
  assert order[0] != (0, 0) or grid == (1, 1)
  assert order[-1] == (0, 0)


def _shares(a, b):
  """Consecutive buckets share a partition: the same source or target one."""
  return a[0] == b[0] or a[1] == b[1]


@FAST
@given(grid=grids, seed=seeds, epoch=epochs)
def test_affinity_keeps_a_partition_whenever_possible(grid, seed, epoch):
  order = schedule.bucket_order("affinity", grid, seed, epoch)
  for k in range(1, len(order)):
    previous, current = order[k - 1], order[k]
    unvisited = _all_buckets(grid) - set(order[:k])
    assert current in unvisited
    if any(_shares(previous, b) for b in unvisited):
      assert _shares(previous, current), (k, order)


def test_affinity_swaps_fewer_partitions_than_random():
  grid = (5, 5)
  def swaps(order):
    return sum((a[0] != b[0]) + (a[1] != b[1]) for a, b in zip(order, order[1:]))
  affinity = sum(swaps(schedule.bucket_order("affinity", grid, s, 0)) for s in range(10))
  random = sum(swaps(schedule.bucket_order("random", grid, s, 0)) for s in range(10))
  assert affinity < random


def _one_type(bucket):
  """The partitions of a bucket whose source and target are one entity type."""
  return {bucket[0], bucket[1]}


def _loads(order, blocks_of):
  """Partitions read in over an epoch, two-partition residency."""
  return sum(len(set(blocks_of(b)) - set(blocks_of(a))) for a, b in zip(order, order[1:]))


@FAST
@given(grid=grids, seed=seeds, epoch=epochs)
def test_affinity_takes_the_cheapest_next_bucket_by_the_partitions_it_needs(grid, seed, epoch):
  order = schedule.bucket_order("affinity", grid, seed, epoch, blocks_of=_one_type)
  assert sorted(order) == sorted(_all_buckets(grid))
  for k in range(1, len(order)):
    held = _one_type(order[k - 1])
    unvisited = _all_buckets(grid) - set(order[:k])
    cheapest = min(len(_one_type(b) - held) for b in unvisited)
    assert len(_one_type(order[k]) - held) == cheapest, (k, order)


def test_affinity_visits_both_directions_of_a_pair_together_with_one_type():
  """(i, j) then (j, i), (i, i) or (j, j) costs no swap with one entity type:
  an epoch on 16 x 16 loads about P^2 / 2 partitions, not P^2."""
  grid = (16, 16)
  for seed in range(3):
    aware = schedule.bucket_order("affinity", grid, seed, 0, blocks_of=_one_type)
    plain = schedule.bucket_order("affinity", grid, seed, 0)
    assert _loads(aware, _one_type) < 0.62 * _loads(plain, _one_type)
    assert _loads(aware, _one_type) <= 16 * 15 // 2 + 16


def _affinity_before_blocks_of(grid, seed, epoch):
  """affinity as it was before it counted partitions (commit bde702d)."""
  rng = schedule._rng(seed, epoch)
  remaining = set(schedule.sequential(grid))
  current = sorted(remaining)[rng.integers(len(remaining))]
  order = [current]
  remaining.remove(current)
  while remaining:
    near = sorted(b for b in remaining if b[0] == current[0] or b[1] == current[1])
    pool = near if near else sorted(remaining)
    current = pool[rng.integers(len(pool))]
    order.append(current)
    remaining.remove(current)
  return order


def test_affinity_by_sides_is_the_order_runs_were_planned_with_before():
  """The default (source and target sides) reproduces the old order draw
  for draw: a run planned before blocks_of existed resumes the same way."""
  for grid in ((1, 1), (3, 4), (6, 6), (9, 2)):
    for seed in range(4):
      assert schedule.affinity(grid, seed, 2) == _affinity_before_blocks_of(grid, seed, 2)


@pytest.mark.parametrize("name", ["", "Random", "inside-out", "bogus"])
def test_unknown_name_raises_value_error(name):
  with pytest.raises(ValueError, match="unknown bucket order"):
    schedule.bucket_order(name, (2, 2), 0, 0)


def test_training_plan_runs_from_the_cursor_in_each_epochs_order():
  grid, seed = (3, 3), 4
  full = schedule.training_plan("random", grid, seed, epochs=3)
  assert len(full) == 3 * 9
  for epoch in range(3):
    assert [b for e, _, b in full if e == epoch] == schedule.bucket_order("random", grid, seed, epoch)
  assert [(e, i) for e, i, _ in full] == [(e, i) for e in range(3) for i in range(9)]
  # Resuming at (epoch 1, bucket 4) plans exactly the rest of the same run.
  assert schedule.training_plan("random", grid, seed, 3, epoch=1, bucket=4) == full[9 + 4:]
  assert schedule.training_plan("random", grid, seed, 3, epoch=3) == []
