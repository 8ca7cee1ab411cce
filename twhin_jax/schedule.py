"""Bucket schedules: the order in which one epoch visits the P_lhs x P_rhs buckets.

Each function is pure: ``(grid, seed, epoch) -> list of (lhs_partition,
rhs_partition)`` holding every bucket exactly once. The order matters for
I/O (how many partitions are swapped between consecutive buckets) and for
quality (PyTorch-BigGraph's "inside-out" order first trains buckets among the
already-initialised partitions).
"""

from __future__ import annotations

import numpy as np

Bucket = tuple[int, int]


def _rng(seed: int, epoch: int) -> np.random.Generator:
  return np.random.default_rng([seed, epoch, 0x5EED])


def sequential(grid: tuple[int, int], seed: int = 0, epoch: int = 0) -> list[Bucket]:
  """Row-major: (0,0), (0,1), ... (deterministic; for tests and debugging)."""
  del seed, epoch
  return [(i, j) for i in range(grid[0]) for j in range(grid[1])]


def random_order(grid: tuple[int, int], seed: int = 0, epoch: int = 0) -> list[Bucket]:
  """A uniformly random permutation of all buckets."""
  buckets = sequential(grid)
  order = _rng(seed, epoch).permutation(len(buckets))
  return [buckets[k] for k in order]


def inside_out(grid: tuple[int, int], seed: int = 0, epoch: int = 0) -> list[Bucket]:
  """Shells of growing max(i, j): all buckets inside partitions {0..k} come
  before any bucket touching partition k+1; random order within a shell."""
  rng = _rng(seed, epoch)
  shells: dict[int, list[Bucket]] = {}
  for bucket in sequential(grid):
    shells.setdefault(max(bucket), []).append(bucket)
  order = []
  for shell in sorted(shells):
    members = shells[shell]
    order.extend(members[k] for k in rng.permutation(len(members)))
  return order


def outside_in(grid: tuple[int, int], seed: int = 0, epoch: int = 0) -> list[Bucket]:
  """inside_out reversed: the outermost shell first."""
  return inside_out(grid, seed, epoch)[::-1]


def affinity(grid: tuple[int, int], seed: int = 0, epoch: int = 0) -> list[Bucket]:
  """Greedy order that keeps one partition loaded between consecutive buckets.

  Starting from a random bucket, the next bucket is a random unvisited one
  sharing its source or its target partition with the current one (so only
  one partition is swapped); only when none is left does it jump anywhere.
  """
  rng = _rng(seed, epoch)
  remaining = set(sequential(grid))
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


ORDERS = {
    "sequential": sequential,
    "random": random_order,
    "inside_out": inside_out,
    "outside_in": outside_in,
    "affinity": affinity,
}


def bucket_order(name: str, grid: tuple[int, int], seed: int, epoch: int) -> list[Bucket]:
  """The buckets of one epoch in the named order (see ORDERS)."""
  try:
    return ORDERS[name](grid, seed, epoch)
  except KeyError:
    raise ValueError(f"unknown bucket order {name!r}; choose from {sorted(ORDERS)}") from None


def training_plan(name: str, grid: tuple[int, int], seed: int, epochs: int, epoch: int = 0,
                  bucket: int = 0) -> list[tuple[int, int, Bucket]]:
  """[(epoch, bucket index, bucket)] from the cursor (epoch, bucket) to the end
  of training: every epoch's order computed once, for the loop and the batch
  preparation alike."""
  plan = []
  for e in range(epoch, epochs):
    order = bucket_order(name, grid, seed, e)
    plan.extend((e, i, order[i]) for i in range(bucket if e == epoch else 0, len(order)))
  return plan
