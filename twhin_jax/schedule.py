"""Bucket schedules: the order in which one epoch visits the P_lhs x P_rhs buckets.

Each function is pure: ``(grid, seed, epoch) -> list of (lhs_partition,
rhs_partition)`` holding every bucket exactly once. The order matters for
I/O (how many partitions are swapped between consecutive buckets) and for
quality (PyTorch-BigGraph's "inside-out" order first trains buckets among the
already-initialised partitions).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

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


def _sides(bucket: Bucket) -> tuple:
  """The partitions a bucket needs when its two sides are different entity
  types: its source partition and its target partition."""
  return (("source", bucket[0]), ("target", bucket[1]))


def affinity(grid: tuple[int, int], seed: int = 0, epoch: int = 0,
             blocks_of: Callable[[Bucket], Iterable] = _sides) -> list[Bucket]:
  """Greedy order that swaps as few partitions as it can between buckets.

  ``blocks_of(bucket)``: the partitions the bucket needs resident
  (residency.bucket_blocks; by default its source and its target side, as
  if they were different types). Starting from a random bucket, the next
  is a random unvisited one among those needing the fewest partitions the
  current one does not hold. With both sides of one type, (i, j) is
  followed by (j, i), (i, i) or (j, j) for free, which nearly halves the
  swaps of an epoch; by default it is one sharing the source or the target
  partition (one swap), and only when none is left does it jump anywhere.
  """
  rng = _rng(seed, epoch)
  buckets = sequential(grid)
  needs = {b: frozenset(blocks_of(b)) for b in buckets}
  # block -> the buckets needing it: only those can cost less than a jump.
  users: dict = {}
  for b in buckets:
    for block in needs[b]:
      users.setdefault(block, set()).add(b)
  remaining = set(buckets)
  current = buckets[rng.integers(len(buckets))]
  order = [current]
  remaining.remove(current)
  while remaining:
    near = {b for block in needs[current] for b in users[block]} & remaining
    cost = {b: len(needs[b] - needs[current]) for b in near}
    fewest = min(cost.values(), default=None)
    pool = sorted(b for b, c in cost.items() if c == fewest) if near else sorted(remaining)
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


def bucket_order(name: str, grid: tuple[int, int], seed: int, epoch: int,
                 blocks_of: Callable[[Bucket], Iterable] | None = None) -> list[Bucket]:
  """The buckets of one epoch in the named order (see ORDERS); ``blocks_of``
  (the partitions a bucket needs) informs the orders that count swaps."""
  if name not in ORDERS:
    raise ValueError(f"unknown bucket order {name!r}; choose from {sorted(ORDERS)}")
  if name == "affinity" and blocks_of is not None:
    return affinity(grid, seed, epoch, blocks_of)
  return ORDERS[name](grid, seed, epoch)


def training_plan(name: str, grid: tuple[int, int], seed: int, epochs: int, epoch: int = 0,
                  bucket: int = 0, blocks_of: Callable[[Bucket], Iterable] | None = None
                  ) -> list[tuple[int, int, Bucket]]:
  """[(epoch, bucket index, bucket)] from the cursor (epoch, bucket) to the end
  of training: every epoch's order computed once, for the loop and the batch
  preparation alike."""
  plan = []
  for e in range(epoch, epochs):
    order = bucket_order(name, grid, seed, e, blocks_of)
    plan.extend((e, i, order[i]) for i in range(bucket if e == epoch else 0, len(order)))
  return plan
