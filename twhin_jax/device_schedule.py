"""An exact device schedule for a bucket: a round-robin tournament of 2G slots.

Today's ring (sharding.py) splits every partition of a bucket into G
sub-partitions and in round k lets device g train sub-bucket (g, (g+k) mod G)
with its sources at home and its targets in a travelling copy. For a block
(entity type, partition) that is both a source and a target of the bucket
(users follow users, every knowledge graph) two devices then update the same
rows in one round, and the merge adds both updates: G devices do not train
the model one device trains (Kinship test MRR 0.671 on 1 device, 0.540 on 4).

PyTorch-BigGraph never lets two trainers hold one partition at once. This
module does the same inside a bucket:

* every block splits into 2G *sub-partitions* x = 0 .. 2G-1 (rows
  [x * h, (x + 1) * h) of the partition, h = ceil(S / 2G)); sub-partition x
  of *all* blocks travels together, as one *slot*;
* each device holds two slots at a time, so in every round the G devices hold
  the 2G slots once each: their rows are disjoint;
* the rounds pair the slots by the circle method (a round-robin tournament of
  2G players has 2G - 1 rounds of G disjoint pairs, and every pair of
  players meets exactly once);
* the device holding the pair {a, b} trains the sub-buckets (a, b) and (b, a)
  (sources in one slot, targets in the other), and in round 0 also (a, a)
  and (b, b). Every sub-bucket (x, y), x, y in 0 .. 2G-1, is trained exactly
  once per bucket, by exactly one device, on rows no other device holds.

So each device's step is the plain single-device step on its two slots, the
relation gradients are summed over the devices (psum), and G devices train
the model one device trains, up to the order of floating-point sums and of
the edges. Round 0 is the home placement (device g holds slots 2g and 2g+1,
its contiguous half-and-half of the sub-partition g of the G-way split);
between rounds the slots move between devices (``moves``), and after the last
round they go home.

A bucket does not train its rounds once each, one after the other: that
order gives every step edges of one round's cells only, for as long as the
round lasts. It cycles through the rounds ``round_passes`` times, each pass
training a near-equal share of every cell's chunks (batching.py), so that
consecutive steps cover all the cells, as one device's shuffled order does;
and each device takes ``chunks_per_device_step`` chunks a step, so that a
step of all G devices trains about one device's batch.

Everything here is pure Python on small integers; tests/test_device_schedule.py
checks the properties above for G = 1 .. 16, tests/test_round_order.py the
passes and the step size.
"""

from __future__ import annotations

import dataclasses
import functools
import math

Slot = int  # 0 .. 2G-1: sub-partition index of every block
Place = tuple[int, int]  # (device, position 0 or 1)


def circle_rounds(num_players: int) -> list[list[tuple[int, int]]]:
  """The circle method: ``num_players`` (even) players, num_players - 1 rounds
  of num_players / 2 disjoint pairs; every pair of players meets exactly once.

  Player n - 1 stays fixed; the others sit on a circle of n - 1 seats and
  turn one seat per round: round r pairs (n-1, r) and (r + i, r - i) mod (n-1)
  for i = 1 .. n/2 - 1.
  """
  if num_players < 2 or num_players % 2:
    raise ValueError(f"the circle method needs an even number >= 2 of players, got {num_players}")
  seats = num_players - 1
  rounds = []
  for r in range(seats):
    pairs = [(num_players - 1, r)]
    pairs += [((r + i) % seats, (r - i) % seats) for i in range(1, num_players // 2)]
    rounds.append(pairs)
  return rounds


@dataclasses.dataclass(frozen=True)
class TournamentSchedule:
  """Where every slot sits in every round, and what each device trains.

  holds[r][g]   (slot at position 0, slot at position 1) on device g in round r
  cells[r][g]   the sub-buckets (source slot, target slot) device g trains in round r
  """
  num_devices: int
  holds: tuple[tuple[tuple[Slot, Slot], ...], ...]
  cells: tuple[tuple[tuple[tuple[Slot, Slot], ...], ...], ...]

  @property
  def num_rounds(self) -> int:
    return len(self.holds)

  @property
  def num_slots(self) -> int:
    return 2 * self.num_devices

  def place(self, round_index: int) -> dict[Slot, Place]:
    """slot -> (device, position) in one round."""
    out = {}
    for g, pair in enumerate(self.holds[round_index]):
      for position, slot in enumerate(pair):
        out[slot] = (g, position)
    return out

  def owner(self) -> dict[tuple[Slot, Slot], tuple[int, int]]:
    """Sub-bucket (source slot, target slot) -> (round, device) that trains it."""
    out = {}
    for r, per_device in enumerate(self.cells):
      for g, cells in enumerate(per_device):
        for cell in cells:
          out[cell] = (r, g)
    return out

  def moves(self, round_index: int) -> list[tuple[Place, Place]]:
    """The slot transfers from round ``round_index`` to the next one (from
    the last round: back home, to round 0's places), as (from, to) places;
    a slot that stays where it is does not appear."""
    here = self.place(round_index)
    there = self.place((round_index + 1) % self.num_rounds)
    return sorted((here[s], there[s]) for s in here if here[s] != there[s])


@functools.lru_cache(maxsize=None)
def tournament(num_devices: int) -> TournamentSchedule:
  """The exact schedule for ``num_devices`` devices (see the module docstring).

  The circle method's players are relabelled so that round 0 pairs slots
  (2g, 2g + 1) on device g: the home placement, where loading puts them.
  Within later rounds, each device keeps at its position the slot of the pair
  that was already there when there is one, so fewer slots move.
  """
  if num_devices < 1:
    raise ValueError(f"num_devices must be >= 1, got {num_devices}")
  rounds = circle_rounds(2 * num_devices)
  # Relabel: round 0's g-th pair becomes slots (2g, 2g + 1).
  label = {}
  for g, (a, b) in enumerate(rounds[0]):
    label[a], label[b] = 2 * g, 2 * g + 1
  rounds = [[(label[a], label[b]) for a, b in pairs] for pairs in rounds]
  holds = [tuple((2 * g, 2 * g + 1) for g in range(num_devices))]
  for pairs in rounds[1:]:
    # Give each pair to a device that already holds one of its slots, when
    # one is free (a greedy matching: fewer transfers, same exactness).
    previous = {slot: g for g, pair in enumerate(holds[-1]) for slot in pair}
    assignment: dict[int, tuple[int, int]] = {}
    unplaced = []
    for a, b in pairs:
      for slot, other in ((a, b), (b, a)):
        g = previous[slot]
        if g not in assignment:
          position = holds[-1][g].index(slot)
          assignment[g] = (slot, other) if position == 0 else (other, slot)
          break
      else:
        unplaced.append((a, b))
    free = [g for g in range(num_devices) if g not in assignment]
    for g, pair in zip(free, unplaced):
      assignment[g] = pair
    holds.append(tuple(assignment[g] for g in range(num_devices)))
  cells = []
  for r, per_device in enumerate(holds):
    round_cells = []
    for a, b in per_device:
      mine = [(a, b), (b, a)]
      if r == 0:  # every slot is present in round 0: the diagonal sub-buckets
        mine = [(a, a), (b, b)] + mine
      round_cells.append(tuple(mine))
    cells.append(tuple(round_cells))
  return TournamentSchedule(num_devices, tuple(holds), tuple(cells))


def permutation_pairs(schedule: TournamentSchedule, round_index: int
                      ) -> dict[tuple[int, int], list[tuple[int, int]]]:
  """The transfers after ``round_index`` as ``jax.lax.ppermute`` pair lists:
  (source position, target position) -> [(source device, target device)].

  A device's slot at position p goes to position q of another device; one
  ppermute per (p, q) moves all of them at once (a position that receives
  nothing keeps its slot)."""
  out: dict[tuple[int, int], list[tuple[int, int]]] = {}
  for (g, p), (h, q) in schedule.moves(round_index):
    out.setdefault((p, q), []).append((g, h))
  return out


def chunks_per_device_step(batch_size: int, chunk_size: int, num_devices: int,
                           edges_per_chunk: float) -> int:
  """S_G: chunks per step on each of G devices, so that a step of all G
  devices trains about ``batch_size`` edges, as one device's step does.

  One device takes S = batch_size / C chunks a step. G devices each taking
  S chunks would train G times the edges per update and make G times fewer
  updates an epoch: not the model one device trains. A bucket's chunks under
  the tournament also hold fewer edges than C (each (round, device) cell
  pads its own last chunk of every chunk class; Kinship on 4 devices: 13.8
  edges a chunk of 50), so S_G = batch_size / (G * edges_per_chunk), taken
  to the nearest half power of two (few shapes to compile) and kept in
  [1, S] (S itself when it asks for S or more).
  """
  most = batch_size // chunk_size
  wanted = batch_size / (num_devices * max(edges_per_chunk, 1.0))
  if wanted >= most:
    return most
  # The nearest of 1, 2, 3, 4, 6, 8, 11, 16, 23, 32, ... (2^(k/2)): within
  # about 19% of the wanted size, and few distinct shapes across buckets.
  return max(1, min(most, round(2 ** (round(2 * math.log2(max(wanted, 1.0))) / 2))))


#: The most passes the automatic choice makes through a bucket's rounds: each
#: pass costs 2G - 1 slot moves and as many calls of fewer steps (4 fake CPU
#: devices, 400k edges: 71 one-step passes ran 22k-27k edges/s against main's
#: 57k-66k; 8 passes 51k-72k against 49k-53k; docs/architecture.md).
MAX_AUTO_PASSES = 8
#: The fewest automatic passes (where a bucket has any edges).
MIN_AUTO_PASSES = 2


def round_passes(requested: int, round_steps: list[int]) -> int:
  """K: how many times a bucket cycles through the tournament's rounds.

  The tournament trains a bucket round by round, and a round holds only the
  edges between the slots paired in it: with one pass, every step of a round
  draws its edges from 1/(2G - 1) of the (slot, slot) cells, for as many
  steps as the round lasts, an order one device's shuffled epoch never
  takes (Kinship on 4 fake devices, 10 epochs, chunks of 20: test MRR 0.618
  with one pass against 0.664 on one device, 0.663 with two passes). With K
  passes each pass trains a near-equal 1/K of every cell's chunks, so
  consecutive steps cycle through all the cells.

  ``requested``: config.mesh.round_passes; > 0 is taken as is. 0 chooses
  K = min(max over rounds of ``round_steps``, MAX_AUTO_PASSES), at least
  MIN_AUTO_PASSES, where ``round_steps`` are the steps of each round's busiest device: visits of
  at most one step where the rounds are short, at most MAX_AUTO_PASSES
  cycles where they are long, since every visit costs a call and a slot
  move. The longest round, not a typical one: round 0 also holds the
  diagonal cells, 2 to 3 times the edges of another round, and with K from
  the median its visits stay several steps long (Kinship on 2 fake devices,
  chunks of 20: K = 2 from the median, test MRR 0.629; K = 4, 0.677; one
  device 0.664). At least two passes even where every round fits in one
  step, at the price of part-full steps: Kinship on 8 fake devices, chunks
  of 20, one pass scored 0.612, two 0.694 (one device 0.664).
  """
  if requested > 0:
    return int(requested)
  if not round_steps or max(round_steps) == 0:
    return 1
  return max(MIN_AUTO_PASSES, min(max(round_steps), MAX_AUTO_PASSES))
