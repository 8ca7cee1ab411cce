"""Sharding of the working tables over a device mesh, and the ring schedule.

Every device g of the G devices in the mesh holds a *home shard*: sub-
partition g of every partition the current bucket needs. A partition of S
rows splits into G contiguous sub-partitions of ``sub_rows`` rows (the last
ones may hold fewer); row x of the partition lives on device x // sub_rows at
shard row ``offset[block] + x % sub_rows``. The global working table of one
embedding dimension is [G * R, d], sharded by rows (``ROWS``), where R (the
shard's capacity) is fixed so the step compiles once.

The edges of a bucket split into G x G sub-buckets (g, j) by the
sub-partitions of their source and target. Training runs G rounds:

  round 0      device g trains sub-bucket (g, g) on its home shard alone;
  round k > 0  device g trains sub-bucket (g, (g + k) mod G): its sources are
               home rows, its targets come from the *visiting* copy of device
               (g + k) mod G's home shard, which moves one step around the
               ring (``ppermute``, device j -> j - 1) between rounds.

After round G - 1 the visiting copies take one more step and are back on
their home device, which merges them:

  home <- home + (visiting - snapshot)          (snapshot: home after round 0)

For a partition that only appears as a target this is exact (home did not
change after round 0, so it becomes the visiting copy, which every device
updated in turn, never two at once). For an entity type that is source and
target of the same bucket (users following users), device j updates its
home rows as sources while another device updates the visiting copy of the
same rows as targets; the merge sums both updates, like two data-parallel
workers that exchange deltas (local SGD). With G = 1 there is only round 0,
and the code path is the single-device one.

``config.mesh.schedule = "tournament"`` replaces the ring with the exact
schedule of device_schedule.py: every sub-partition halves into two *slots*
(2G in all), each device holds two slots a round, 2G - 1 rounds pair every
two slots once, and between rounds the slots move (``Tournament``,
``slot_moves``); no row is ever on two devices at once, so there is no
visiting copy and no merge.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from twhin_jax import device_schedule

AXIS = "devices"
#: jax platform names of GPUs and TPUs: where the "auto" settings that assume a
#: device beside an idle host (batch preparation, background checkpoints, the
#: checkpoint interval) turn on.
ACCELERATOR_PLATFORMS = ("gpu", "cuda", "rocm", "tpu")
#: Row sharding of the working tables and accumulators.
ROWS = PartitionSpec(AXIS)
REPLICATED = PartitionSpec()

Block = tuple[str, int]  # (entity type, partition)


def make_mesh(num_devices: int = 0) -> Mesh:
  """A 1-D mesh over the first ``num_devices`` devices (0: all of them, on all hosts)."""
  devices = jax.devices()
  if num_devices < 0 or num_devices > len(devices):
    raise ValueError(f"mesh.num_devices={num_devices}, but {len(devices)} devices are visible "
                     f"({devices[0].platform})")
  if num_devices:
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), (AXIS,))


def row_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, ROWS)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, REPLICATED)


def global_array(x: np.ndarray, mesh: Mesh, sharding: NamedSharding | None = None) -> jax.Array:
  """A global array from a host value every process holds in full (each
  process hands over only its own devices' slices); replicated by default."""
  x = np.asarray(x)
  sharding = replicated(mesh) if sharding is None else sharding
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def host_copy(x) -> np.ndarray:
  """A numpy copy of a replicated (or single-device) array, on any process."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(x.addressable_data(0))
  return np.asarray(x)


def sub_partition_rows(partition_size: int, num_shards: int, align: int = 1) -> int:
  """Rows per sub-partition: ceil(S / G), rounded up to a multiple of ``align``
  (the storage chunk, so that hosts writing their own sub-partitions never
  write into the same chunk)."""
  rows = math.ceil(partition_size / num_shards)
  return max(math.ceil(rows / align) * align, 1)


@dataclasses.dataclass
class WorkingLayout:
  """Where the resident partitions' rows are inside each dim's sharded table."""
  num_shards: int  # G
  blocks: dict[int, list[Block]]  # dim -> resident blocks in shard-row order
  offsets: dict[Block, int]  # block -> first row of its sub-partition in every shard
  sub_rows: dict[Block, int]  # block -> rows per sub-partition
  block_rows: dict[Block, int]  # block -> rows of the whole partition
  shard_rows: dict[int, int]  # dim -> rows of one shard (fixed capacity)
  schedule: str = "ring"  # config.mesh.schedule ("ring" whenever G = 1)

  def rows_in_shard(self, block: Block, shard: int) -> int:
    """Rows of sub-partition ``shard`` of ``block`` (0 past the partition's end)."""
    sub = self.sub_rows[block]
    return int(np.clip(self.block_rows[block] - shard * sub, 0, sub))

  # The tournament schedule (device_schedule.py) halves every sub-partition
  # (sub_rows is even): slot x is half x % 2 of sub-partition x // 2, and a
  # shard's two halves of a block are its *positions* 0 and 1, rows
  # [offset, offset + h) and [offset + h, offset + 2h), h = sub_rows / 2.

  def rows_in_slot(self, block: Block, slot: int) -> int:
    """Rows of slot ``slot`` (0 .. 2G-1) of ``block`` (0 past the partition's end)."""
    half = self.sub_rows[block] // 2
    return int(np.clip(self.block_rows[block] - slot * half, 0, half))

  def position_spans(self, dim: int) -> tuple[tuple[int, int], ...]:
    """(first shard row of position 0, rows per position) of every block of a dim."""
    return tuple((self.offsets[block], self.sub_rows[block] // 2) for block in self.blocks[dim])


# --------------------------------------------------------------------------
# Ring operations on the sharded tables (all under shard_map, jitted).


@functools.lru_cache(maxsize=None)
def ring_ops(mesh: Mesh):
  """(start, rotate, finish) for the visiting copies of one dim's table.

  start(table, acc)       -> (visiting, visiting_acc, snapshot, snapshot_acc):
                             the visiting copy after its first ring step and
                             a snapshot of home
  rotate(visiting, acc)   -> the copies one more step around the ring
  finish(table, acc, visiting, visiting_acc, snapshot, snapshot_acc)
                          -> (table, acc) with the returning copies merged
  """
  num = mesh.size
  # Device j sends to j - 1, so device g receives the copy of device g + 1.
  perm = [(j, (j - 1) % num) for j in range(num)]

  def step(x):
    return jax.lax.ppermute(x, AXIS, perm)

  def start(table, acc):
    # `+ 0` makes a new buffer: the home table is donated to the next step.
    return step(table), step(acc), table + 0.0, acc + 0.0

  def rotate(table, acc):
    return step(table), step(acc)

  def merge(home, returned, snapshot):
    # Where home did not change since the snapshot, take the returned copy
    # as is (exact); elsewhere add both sides' updates.
    return jnp.where(home == snapshot, returned, home + (returned - snapshot))

  def finish(table, acc, visiting, visiting_acc, snapshot, snapshot_acc):
    return (merge(table, step(visiting), snapshot), merge(acc, step(visiting_acc), snapshot_acc))

  def mapped(fn, num_in, num_out, donate):
    sharded = jax.shard_map(fn, mesh=mesh, in_specs=(ROWS,) * num_in,
                            out_specs=(ROWS,) * num_out, check_vma=False)
    return jax.jit(sharded, donate_argnums=donate)

  return (mapped(start, 2, 4, ()), mapped(rotate, 2, 2, (0, 1)),
          mapped(finish, 6, 2, (0, 1, 2, 3, 4, 5)))


@functools.lru_cache(maxsize=None)
def ring_shift(mesh: Mesh):
  """(x [G*R, ...], y [G*R]) -> both one step around the ring, inputs kept
  (for read-only rows that travel with the visiting copy: L2 anchors)."""
  num = mesh.size
  perm = [(j, (j - 1) % num) for j in range(num)]

  def shift(x, y):
    return jax.lax.ppermute(x, AXIS, perm), jax.lax.ppermute(y, AXIS, perm)

  return jax.jit(jax.shard_map(shift, mesh=mesh, in_specs=(ROWS, ROWS), out_specs=(ROWS, ROWS),
                               check_vma=False))


class Ring:
  """The visiting copies of one bucket's G rounds, over ``home``: dim -> rows
  (state.Rows: table, acc and optional read-only anchors)."""

  def __init__(self, mesh: Mesh):
    self._start, self._rotate, self._finish = ring_ops(mesh)
    self._shift = ring_shift(mesh)
    self.round = 0  # the round whose target rows the visiting copies hold
    self._snapshots: dict[int, tuple] = {}  # dim -> (home table, acc) after round 0

  def advance(self, home: dict, visiting: dict, to_round: int) -> dict:
    """The visiting rows of every dim for round ``to_round`` (>= the current one)."""
    visiting = dict(visiting)
    while self.round < to_round:
      for dim, rows in home.items():
        if self.round == 0:
          source = rows
          table, acc, *self._snapshots[dim] = self._start(rows.table, rows.acc)
        else:
          source = visiting[dim]
          table, acc = self._rotate(source.table, source.acc)
        anchors = (None, None)
        if rows.anchor is not None:  # anchors travel with the rows they anchor
          anchors = self._shift(source.anchor, source.anchor_weight)
        visiting[dim] = rows._replace(table=table, acc=acc, anchor=anchors[0],
                                      anchor_weight=anchors[1])
      self.round += 1
    return visiting

  def finish(self, home: dict, visiting: dict) -> dict:
    """Home rows with the returning visiting copies merged (after the last round)."""
    home = dict(home)
    for dim, rows in visiting.items():
      table, acc = self._finish(home[dim].table, home[dim].acc, rows.table, rows.acc,
                                *self._snapshots[dim])
      home[dim] = home[dim]._replace(table=table, acc=acc)
    return home


# --------------------------------------------------------------------------
# Slot moves of the tournament schedule.


@functools.lru_cache(maxsize=None)
def slot_moves(mesh: Mesh, pairs: tuple, spans: tuple):
  """The slot transfers between two rounds of the tournament schedule:
  (x [G*R, ...], ...) -> the same arrays with the moved positions replaced
  (inputs donated).

  ``pairs``: ((source position, target position, ((device, device), ...)), ...)
  from device_schedule.permutation_pairs; ``spans``: WorkingLayout.position_spans.
  Every transfer reads the arrays as they were before the move (all moves
  happen at once); a position that receives nothing keeps its rows."""
  receivers = [np.asarray([any(b == g for _, b in perm) for g in range(mesh.size)])
               for _, _, perm in pairs]

  def move(arrays):
    me = jax.lax.axis_index(AXIS)
    out = []
    for x in arrays:
      new = x
      for (source, target, perm), receives in zip(pairs, receivers):
        receives = jnp.asarray(receives)[me]
        for start, half in spans:
          moved = jax.lax.ppermute(x[start + source * half:start + (source + 1) * half],
                                   AXIS, list(perm))
          at = slice(start + target * half, start + (target + 1) * half)
          new = new.at[at].set(jnp.where(receives, moved, new[at]))
      out.append(new)
    return tuple(out)

  def run(arrays):
    fn = jax.shard_map(move, mesh=mesh, in_specs=(ROWS,), out_specs=ROWS, check_vma=False)
    return fn(arrays)

  return jax.jit(run, donate_argnums=0)


class Tournament:
  """The slot placement of one bucket's visits of the 2G - 1 tournament
  rounds over ``home``: dim -> rows (state.Rows: table, acc and optional
  read-only anchors, which travel with the rows they anchor). Round 0 is the
  home placement; ``finish`` brings the slots back to it."""

  def __init__(self, mesh: Mesh, layout: WorkingLayout):
    self.mesh, self.layout = mesh, layout
    self.plan = device_schedule.tournament(mesh.size)
    # Visits of the bucket so far: the rows are in the placement of round
    # visit % num_rounds (a bucket may cycle through its rounds several
    # times, batching.py, device_schedule.round_passes).
    self.visit = 0

  @property
  def round(self) -> int:
    return self.visit % self.plan.num_rounds

  def _move(self, home: dict) -> dict:
    pairs = tuple(sorted((p, q, tuple(sorted(perm))) for (p, q), perm in
                         device_schedule.permutation_pairs(self.plan, self.round).items()))
    self.visit += 1
    if not pairs:
      return home
    moved = {}
    for dim, rows in home.items():
      move = slot_moves(self.mesh, pairs, self.layout.position_spans(dim))
      leaves = tuple(x for x in rows if x is not None)
      new = iter(move(leaves))
      moved[dim] = type(rows)(*(None if x is None else next(new) for x in rows))
    return moved

  def advance(self, home: dict, to_visit: int) -> dict:
    """``home`` placed for visit ``to_visit`` (>= the current one), that is
    for round ``to_visit % num_rounds``."""
    while self.visit < to_visit:
      home = self._move(home)
    return home

  def finish(self, home: dict) -> dict:
    """``home`` back in the home placement (after the last round)."""
    while self.round != 0:
      home = self._move(home)
    return home
@functools.lru_cache(maxsize=None)
def relayout(mesh: Mesh, move_rows: tuple[int, ...], num_loads: int):
  """jitted (table, acc, move_from [k], move_to [k], load_at [m], *load_tables,
  *load_accs) -> (table, acc), on every shard at once:

    rows [from_i, from_i + n_i) move to [to_i, to_i + n_i)   (n_i = move_rows[i];
                                                             all read before any write)
    load piece j [n_j, ...] is written at rows [at_j, at_j + n_j)

  ``table`` and ``acc`` are donated: a partition that stays resident is
  moved inside device memory, never copied through the host. Offsets are
  traced (one program per shape of the move, not per bucket).
  """
  def local(table, acc, move_from, move_to, load_at, *pieces):
    moved = [(jax.lax.dynamic_slice_in_dim(table, move_from[i], rows),
              jax.lax.dynamic_slice_in_dim(acc, move_from[i], rows))
             for i, rows in enumerate(move_rows)]
    for i, (rows_i, acc_i) in enumerate(moved):
      table = jax.lax.dynamic_update_slice_in_dim(table, rows_i, move_to[i], 0)
      acc = jax.lax.dynamic_update_slice_in_dim(acc, acc_i, move_to[i], 0)
    for j in range(num_loads):
      table = jax.lax.dynamic_update_slice_in_dim(table, pieces[j], load_at[j], 0)
      acc = jax.lax.dynamic_update_slice_in_dim(acc, pieces[num_loads + j], load_at[j], 0)
    return table, acc

  in_specs = (ROWS, ROWS, REPLICATED, REPLICATED, REPLICATED) + (ROWS,) * (2 * num_loads)
  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=(ROWS, ROWS),
                               check_vma=False), donate_argnums=(0, 1))


@functools.lru_cache(maxsize=None)
def zeros(mesh: Mesh, shape: tuple[int, ...]):
  """A row-sharded float32 array of zeros, made on the devices."""
  return jax.jit(lambda: jnp.zeros(shape, jnp.float32), out_shardings=row_sharding(mesh))


def describe(tree) -> dict[str, str]:
  """Path -> 'shape dtype spec' of every array in a pytree (for golden files)."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    name = jax.tree_util.keystr(path)
    spec = getattr(getattr(leaf, "sharding", None), "spec", None)
    out[name] = f"{tuple(leaf.shape)} {leaf.dtype} {spec}"
  return out


def on_accelerator(mesh: Mesh) -> bool:
  """Whether the mesh's devices are GPUs or TPUs (ACCELERATOR_PLATFORMS)."""
  return mesh.devices.flat[0].platform in ACCELERATOR_PLATFORMS
