"""Partition residency: which partitions are in device memory, and where.

A bucket (i, j) needs, for every relation, the source type's partition i and
the target type's partition j (partition 0 of a type that is not
partitioned). Only those are resident: per embedding dimension they form one
row-sharded *working table* (sharding.WorkingLayout: sub-partition g of every
resident partition on device g, at a fixed offset). ``Residency.load`` swaps
the set for the next bucket:

  evicted    its rows are copied to the host and written back to TensorStore
             (into the uncommitted slot, storage.SlotMap) in the background
  kept       moved inside device memory to its new offset (or left in place);
             never copied through the host
  new        read and put on the devices by ``prefetch`` in a thread while
             the previous bucket trains (after the evicted partitions' writes
             finished, so one partition is in transit at a time)

Memory: the two resident partitions per type (working tables and Adagrad
state), one partition in transit, and the fixed budget of the runtime and
the batches in flight.

With several processes each process reads and writes only its own devices'
sub-partitions (``local_shards``).
"""

from __future__ import annotations

import concurrent.futures
import functools

import jax
import numpy as np

from twhin_jax import distributed
from twhin_jax import sharding as sharding_lib
from twhin_jax import state as state_lib
from twhin_jax import storage
from twhin_jax.graph import Graph

Block = storage.Block
#: shard -> (rows [n, d], accumulators [n]) of one partition's sub-partitions.
Pieces = dict[int, tuple[np.ndarray, np.ndarray]]


@functools.partial(jax.jit, static_argnums=(2,))
def _rows_at(x: jax.Array, start, count: int) -> jax.Array:
  """Rows [start, start + count) of one device's array, as a new array."""
  return jax.lax.dynamic_slice_in_dim(x, start, count)


def partition_of(graph: Graph, entity_type: str, bucket_side: int) -> int:
  """The partition of ``entity_type`` that a bucket side selects (0 when unpartitioned)."""
  return bucket_side if graph.entities[entity_type].num_partitions > 1 else 0


def relation_blocks(graph: Graph, bucket: tuple[int, int], relation: int) -> tuple[Block, Block]:
  """(source block, target block) of one relation's edges in a bucket."""
  info = graph.relations[relation]
  return ((info.source, partition_of(graph, info.source, bucket[0])),
          (info.target, partition_of(graph, info.target, bucket[1])))


def bucket_blocks(graph: Graph, bucket: tuple[int, int]) -> list[Block]:
  """The partitions a bucket needs, in a deterministic order."""
  return sorted({block for r in range(len(graph.relations))
                 for block in relation_blocks(graph, bucket, r)})


def shard_capacity(graph: Graph, dims: dict[str, int], sub_rows: dict[str, int]) -> dict[int, int]:
  """Fixed rows of one shard per dim: a sub-partition of every source-side and
  target-side type (``sub_rows[type]`` rows each).

  Fixed so the jitted step compiles once; diagonal buckets (one partition on
  both sides) leave the tail unused.
  """
  capacity: dict[int, int] = {}
  sides = {(rel.source, "src") for rel in graph.relations} | {
      (rel.target, "dst") for rel in graph.relations}
  for entity_type, _ in sides:
    dim = dims[entity_type]
    capacity[dim] = capacity.get(dim, 0) + sub_rows[entity_type]
  return capacity


def layout_for(graph: Graph, dims: dict[str, int], blocks: list[Block], num_shards: int,
               sub_rows: dict[str, int], capacity: dict[int, int],
               schedule: str = "ring") -> sharding_lib.WorkingLayout:
  """Where ``blocks`` sit in the working tables: in order, packed per dim.
  ``schedule``: config.mesh.schedule (the ring whenever there is one shard)."""
  by_dim: dict[int, list[Block]] = {}
  offsets, block_sub, block_rows = {}, {}, {}
  for block in blocks:
    dim = dims[block[0]]
    members = by_dim.setdefault(dim, [])
    offsets[block] = sum(sub_rows[t] for t, _ in members)
    block_sub[block] = sub_rows[block[0]]
    block_rows[block] = graph.entities[block[0]].partition_rows(block[1])
    members.append(block)
  return sharding_lib.WorkingLayout(num_shards, by_dim, offsets, block_sub, block_rows, capacity,
                                    schedule if num_shards > 1 else "ring")


class Residency:
  """The resident partitions of one run and their device rows.

  ``home``: dim -> state.Rows, the sharded working table, its accumulators
  and (L2-to-previous) the anchor rows of the resident partitions; the
  trainer's step updates them in place of the old ones.
  """

  def __init__(self, graph: Graph, dims: dict[str, int], tables: storage.TableStore,
               slots: storage.SlotMap, mesh, sub_rows: dict[str, int],
               anchors: storage.TableStore | None = None, schedule: str = "ring"):
    self.graph, self.dims, self.tables, self.slots = graph, dims, tables, slots
    self.mesh = mesh
    self.num_shards = mesh.size
    self.local_shards = [g for g, device in enumerate(mesh.devices.flat)
                         if device.process_index == jax.process_index()]
    self.sub_rows = sub_rows
    self.schedule = schedule  # config.mesh.schedule (WorkingLayout.schedule)
    self.capacity = shard_capacity(graph, dims, sub_rows)
    self.anchors = anchors
    self.layout: sharding_lib.WorkingLayout | None = None
    self.home: dict[int, state_lib.Rows] = {}
    self.pending_writes: dict[Block, list] = {}
    self.io_pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)
    self._prefetched: dict[Block, concurrent.futures.Future] = {}

  def layout_of(self, bucket: tuple[int, int]) -> sharding_lib.WorkingLayout:
    return layout_for(self.graph, self.dims, bucket_blocks(self.graph, bucket), self.num_shards,
                      self.sub_rows, self.capacity, self.schedule)

  # -- host copies of partitions -----------------------------------------------

  def _local_span(self, entity_type: str, partition: int) -> tuple[int, int]:
    """Rows [lo, hi) of a partition that this process's devices hold."""
    sub = self.sub_rows[entity_type]
    rows = self.graph.entities[entity_type].partition_rows(partition)
    lo = min(self.local_shards) * sub
    return min(lo, rows), min((max(self.local_shards) + 1) * sub, rows)

  def read_block(self, block: Block, store: storage.TableStore | None = None) -> Pieces:
    """This process's sub-partitions of one partition: shard -> (rows, acc);
    from the anchor store (slot 0: rows, weights) when ``store`` is given."""
    lo, hi = self._local_span(*block)
    if store is None:
      for future in self.pending_writes.pop(block, []):
        future.result()
      table, acc = self.tables.read_rows(block, self.slots.current[block], lo, hi)
    else:
      table, acc = store.read_rows(block, 0, lo, hi)
    sub = self.sub_rows[block[0]]
    pieces = {}
    for g in self.local_shards:
      a, b = max(g * sub - lo, 0), max(min((g + 1) * sub, hi) - lo, 0)
      pieces[g] = (table[a:b], acc[a:b])
    return pieces

  def _extract(self, block: Block) -> Pieces:
    """Host copies of one resident partition's rows (this process's shards).

    Slices first (on the device), then copies: the working table itself is
    never viewed from the host, so it stays free to be donated."""
    rows = self.home[self.dims[block[0]]]
    start = self.layout.offsets[block]
    accs = {s.index[0].start or 0: s.data for s in rows.acc.addressable_shards}
    pieces = {}
    for shard in rows.table.addressable_shards:
      begin = shard.index[0].start or 0
      g = begin // self.capacity[self.dims[block[0]]]
      count = self.layout.rows_in_shard(block, g)
      sub = self.sub_rows[block[0]]  # one program per type, whatever the shard holds
      pieces[g] = (np.array(_rows_at(shard.data, start, sub))[:count],
                   np.array(_rows_at(accs[begin], start, sub))[:count])
    return pieces

  def _write_back(self, block: Block, pieces: Pieces) -> None:
    slot = self.slots.write_target(block)
    self.slots.current[block] = slot
    sub = self.sub_rows[block[0]]
    futures = []
    for g, (table, acc) in pieces.items():
      if len(table):
        futures.extend(self.tables.write_rows(block, slot, g * sub, table, acc))
    self.pending_writes[block] = futures

  def _upload(self, block: Block, pieces: Pieces) -> tuple[jax.Array, jax.Array]:
    """One partition as row-sharded device arrays [G * sub, d] and [G * sub]:
    sub-partition g on device g (zero rows past the partition's end)."""
    sub, dim = self.sub_rows[block[0]], self.dims[block[0]]

    def column(index):
      def shard(where):
        part = pieces[(where[0].start or 0) // sub][index]
        if len(part) == sub:
          return part
        out = np.zeros((sub, dim) if index == 0 else (sub,), np.float32)
        out[:len(part)] = part
        return out
      shape = (self.num_shards * sub, dim) if index == 0 else (self.num_shards * sub,)
      return jax.make_array_from_callback(shape, sharding_lib.row_sharding(self.mesh), shard)

    return column(0), column(1)

  def _fetch(self, block: Block, writes=()) -> tuple[jax.Array, jax.Array]:
    """Reads one partition and puts it on the devices. ``writes``: futures to
    wait for first, so an evicted partition's host copy is gone before the
    next one is read (one partition in transit, not two)."""
    for future in writes:
      future.result()
    return self._upload(block, self.read_block(block))

  # -- swapping -----------------------------------------------------------------

  def prefetch(self, bucket: tuple[int, int]) -> None:
    """Starts reading the partitions of ``bucket`` that are not resident, in
    the background, onto the devices."""
    resident = set(self.layout.offsets) if self.layout else set()
    writes = [f for futures in self.pending_writes.values() for f in futures]
    # Partitions that the switch will evict are written back first; reading
    # them here would race with that write, so leave them to load().
    self._prefetched = {block: self.io_pool.submit(self._fetch, block, writes)
                        for block in bucket_blocks(self.graph, bucket)
                        if block not in resident and block not in self.pending_writes}

  def load(self, bucket: tuple[int, int]) -> None:
    """Makes the bucket's partitions resident: evicted ones are written back
    (in the background), kept ones move inside device memory, new ones come
    from the prefetch (or are read now)."""
    needed = bucket_blocks(self.graph, bucket)
    prefetched, self._prefetched = self._prefetched, {}
    if self.layout is not None and sorted(self.layout.offsets) == needed:
      return
    old_layout = self.layout
    kept = [b for b in needed if old_layout is not None and b in old_layout.offsets]
    for block in (old_layout.offsets if old_layout is not None else ()):
      if block not in needed:
        self._write_back(block, self._extract(block))
    loaded = {}
    for block in needed:
      if block not in kept:
        loaded[block] = (prefetched.pop(block).result() if block in prefetched
                         else self._fetch(block))
    anchors = {}
    if self.anchors is not None:
      # The previous version's rows (static: never written back).
      anchors = {block: self._upload(block, self.read_block(block, self.anchors))
                 for block in needed if block not in kept}
    layout = layout_for(self.graph, self.dims, needed, self.num_shards, self.sub_rows,
                        self.capacity, self.schedule)
    home = {}
    for dim in layout.blocks:
      old = self.home.get(dim)
      rows = self._relayout(dim, old and (old.table, old.acc), old_layout, layout, kept, loaded)
      anchor = (None, None)
      if self.anchors is not None:
        anchor = self._relayout(dim, old and (old.anchor, old.anchor_weight), old_layout,
                                layout, kept, anchors)
      home[dim] = state_lib.Rows(*rows, *anchor)
    self.home, self.layout = home, layout

  def _relayout(self, dim: int, old, old_layout, layout, kept, loaded):
    """(table, acc) of one dim in ``layout``: kept blocks moved from ``old``
    (donated), loaded blocks written from their device copies."""
    rows = self.num_shards * self.capacity[dim]
    if old is None:
      old = (sharding_lib.zeros(self.mesh, (rows, dim))(), sharding_lib.zeros(self.mesh, (rows,))())
    moves = [(old_layout.offsets[b], layout.offsets[b], self.sub_rows[b[0]])
             for b in kept if self.dims[b[0]] == dim
             and old_layout.offsets[b] != layout.offsets[b]]
    loads = [(layout.offsets[b], loaded[b]) for b in layout.blocks[dim] if b in loaded]
    if not moves and not loads:
      return old
    fn = sharding_lib.relayout(self.mesh, tuple(m[2] for m in moves), len(loads))

    def offsets(values):
      return sharding_lib.global_array(np.asarray(values, np.int32).reshape(-1), self.mesh)

    return fn(*old, offsets([m[0] for m in moves]), offsets([m[1] for m in moves]),
              offsets([at for at, _ in loads]), *[p[0] for _, p in loads],
              *[p[1] for _, p in loads])

  def flush(self) -> None:
    """Writes every resident partition back (one at a time, so at most one
    partition's host copy exists) and waits for all writes (of all hosts)."""
    for block in list(self.layout.offsets) if self.layout is not None else ():
      self._write_back(block, self._extract(block))
      for future in self.pending_writes.pop(block):
        future.result()
    for block in list(self.pending_writes):
      for future in self.pending_writes.pop(block):
        future.result()
    distributed.sync("tables flushed")

  def drop(self) -> None:
    """Forgets the resident rows (after flush()), so the next load() reads
    every partition from storage again (early stopping's restore writes the
    best copy there)."""
    self.layout, self.home, self._prefetched = None, {}, {}

  def close(self) -> None:
    self.io_pool.shutdown(wait=True)
