"""Partition residency: which partitions are in device memory, and where.

A bucket (i, j) needs, for every relation, the source type's partition i and
the target type's partition j (partition 0 of a type that is not
partitioned). Only those are resident: per embedding dimension they form one
row-sharded *working table* (sharding.WorkingLayout: sub-partition g of every
resident partition on device g, at a fixed offset). ``Residency.load`` swaps
the set for the next bucket, writing evicted partitions back to TensorStore
(into the uncommitted slot, storage.SlotMap) while the next bucket's
partitions are read ahead by ``prefetch`` in a thread pool.

With several processes each process reads and writes only its own devices'
sub-partitions (``local_shards``).
"""

from __future__ import annotations

import concurrent.futures

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

  def _host_shards(self) -> dict[int, Pieces]:
    """dim -> shard -> (table, acc) numpy views of this process's shards."""
    out = {}
    for dim, rows in self.home.items():
      accs = {s.index[0].start or 0: s.data for s in rows.acc.addressable_shards}
      out[dim] = {}
      for shard in rows.table.addressable_shards:
        start = shard.index[0].start or 0
        out[dim][start // self.capacity[dim]] = (np.asarray(shard.data), np.asarray(accs[start]))
    return out

  def _extract(self, block: Block, host_shards) -> Pieces:
    dim = self.dims[block[0]]
    start = self.layout.offsets[block]
    pieces = {}
    for g, (table, acc) in host_shards[dim].items():
      rows = self.layout.rows_in_shard(block, g)
      pieces[g] = (table[start:start + rows].copy(), acc[start:start + rows].copy())
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

  # -- swapping -----------------------------------------------------------------

  def prefetch(self, bucket: tuple[int, int]) -> None:
    """Starts reading the partitions of ``bucket`` that are not resident."""
    resident = set(self.layout.offsets) if self.layout else set()
    # Partitions that the switch will evict are written back first; reading
    # them here would race with that write, so leave them to load().
    self._prefetched = {block: self.io_pool.submit(self.read_block, block)
                        for block in bucket_blocks(self.graph, bucket)
                        if block not in resident and block not in self.pending_writes}

  def load(self, bucket: tuple[int, int]) -> None:
    """Makes the bucket's partitions resident, writing back the others."""
    needed = bucket_blocks(self.graph, bucket)
    prefetched, self._prefetched = self._prefetched, {}
    if self.layout is not None and sorted(self.layout.offsets) == needed:
      return
    kept = {}
    if self.layout is not None:
      host_shards = self._host_shards()
      for block in list(self.layout.offsets):
        pieces = self._extract(block, host_shards)
        if block in needed:
          kept[block] = pieces
        else:
          self._write_back(block, pieces)
      # Every row now lives in a host copy: drop the old working tables before
      # the new ones are built (peak memory is counted in partitions).
      del host_shards
      self.home = {}
    pieces = {}
    for block in needed:
      if block in kept:
        pieces[block] = kept[block]
      elif block in prefetched:
        pieces[block] = prefetched.pop(block).result()
      else:
        pieces[block] = self.read_block(block)
    layout = layout_for(self.graph, self.dims, needed, self.num_shards, self.sub_rows,
                        self.capacity, self.schedule)
    tables = {dim: self._upload(layout, pieces, dim, 0) for dim in layout.blocks}
    accs = {dim: self._upload(layout, pieces, dim, 1) for dim in layout.blocks}
    anchor_rows = anchor_weights = {}
    if self.anchors is not None:
      # The previous version's rows in the same layout (static: never written).
      anchor_pieces = {block: self.read_block(block, self.anchors) for block in needed}
      anchor_rows = {dim: self._upload(layout, anchor_pieces, dim, 0) for dim in layout.blocks}
      anchor_weights = {dim: self._upload(layout, anchor_pieces, dim, 1) for dim in layout.blocks}
    self.home = {dim: state_lib.Rows(tables[dim], accs[dim], anchor_rows.get(dim),
                                     anchor_weights.get(dim)) for dim in layout.blocks}
    self.layout = layout

  def _upload(self, layout: sharding_lib.WorkingLayout, pieces: dict[Block, Pieces], dim: int,
              column: int) -> jax.Array:
    """One dim's sharded working table (column 0) or accumulators (1) from host pieces."""
    capacity = self.capacity[dim]

    def shard_of(g):
      out = np.zeros((capacity, dim) if column == 0 else (capacity,), np.float32)
      for block in layout.blocks[dim]:
        part = pieces[block][g][column]
        start = layout.offsets[block]
        out[start:start + len(part)] = part
      return out

    size = self.num_shards * capacity
    return jax.make_array_from_callback(
        (size, dim) if column == 0 else (size,), sharding_lib.row_sharding(self.mesh),
        lambda index: shard_of((index[0].start or 0) // capacity))

  def flush(self) -> None:
    """Writes every resident partition back and waits for all writes (of all hosts)."""
    if self.layout is not None:
      host_shards = self._host_shards()
      for block in list(self.layout.offsets):
        self._write_back(block, self._extract(block, host_shards))
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
