"""Partition residency: which partitions are in device memory, and where.

A bucket (i, j) needs, for every relation, the source type's partition i and
the target type's partition j (partition 0 of a type that is not
partitioned). Only those are resident: per embedding dimension they form one
row-sharded *working table* (sharding.WorkingLayout: sub-partition g of every
resident partition on device g, at a fixed offset). ``Residency.load`` swaps
the set for the next bucket:

  evicted    its rows are sliced on the device behind the steps still
             queued, then copied to the host and written back to
             TensorStore (into the uncommitted slot, storage.SlotMap),
             chunk by chunk, by a write-back thread
  kept       moved inside device memory to its new offset (or left in place);
             never copied through the host
  new        read chunk by chunk straight into its place in the working
             table; ``prefetch`` reads the first chunks in a thread while
             the previous bucket trains

Memory: the two resident partitions per type (working tables and Adagrad
state) plus fixed amounts, whatever the partition size: TRANSFER_BYTES per
chunk copy, READ_AHEAD_BYTES of read-ahead, WRITE_BEHIND_BYTES of writes in
flight and LOAD_WINDOW chunk reads while a partition is read in; no whole
partition is ever staged on the host; a kept partition that changes offset
moves a chunk at a time (when its type's blocks are all the same size).
Freed host buffers must not pile up in glibc's heaps: importing this module
caps the malloc arenas (limit_heap_fragmentation), free heap past
KEPT_FREE_HEAP_BYTES is returned after a swap and all of it after a flush
(release_free_host_memory).

With several processes each process reads and writes only its own devices'
sub-partitions (``local_shards``).

Small tables stay whole (``keep_all_bytes``, the trainer passes
KEEP_ALL_BYTES): on one device, when every partition of every type the
relations use fits in that many bytes (rows and accumulators), the working
tables hold all of them, read once at the first bucket; a bucket swap is
then no swap at all, and rows are written to storage only by ``flush``
(checkpoints). Each partition keeps the relative place it would have in a
two-partition working table, so training is the same, bit for bit.
"""

from __future__ import annotations

import collections
import concurrent.futures
import ctypes
import functools
import math
import os
import platform

import jax
import numpy as np

from twhin_jax import distributed
from twhin_jax import sharding as sharding_lib
from twhin_jax import state as state_lib
from twhin_jax import storage
from twhin_jax.graph import Graph

Block = storage.Block
#: shard -> (rows [n, d], accumulators [n] or [n, d]) of one partition's sub-partitions.
Pieces = dict[int, tuple[np.ndarray, np.ndarray]]


#: Rows moved between storage and a working table at a time (over this
#: process's shards): bounds every host copy of a partition in transit.
TRANSFER_BYTES = 32 << 20
#: The next bucket's new partitions read ahead (host copies, in chunks) while
#: this bucket trains; the rest is read when the bucket starts.
READ_AHEAD_BYTES = 256 << 20
#: Host copies of evicted rows whose writes may still be in flight.
WRITE_BEHIND_BYTES = 128 << 20
#: Threads that copy written-back chunks to the host and write them. Several,
#: since each chunk waits in turn for its device-to-host copy, the NaN check
#: and its file writes: 1.5 GiB in 32 MB chunks took 2.6 s on one thread and
#: 0.7 s on four (2 cores, no fsync), where a GPU's 20M-edge epoch is 0.8 s.
WRITE_THREADS = min(4, os.cpu_count() or 1)
#: Chunk reads in flight while a partition is read into the working table.
LOAD_WINDOW = 4
#: Tables up to this size (every partition's rows and accumulators) stay
#: whole in device memory on one device (Residency's keep_all_bytes, as the
#: trainer sets it): FB15k-237 at d=200 is 12 MB, and swapping its 4
#: partitions at every one of 16 buckets an epoch cost more than training
#: them; a 1M x 128 table (516 MB) still swaps.
KEEP_ALL_BYTES = 256 << 20


def _glibc():
  """The C library when it is glibc (None elsewhere)."""
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return None
  try:
    return ctypes.CDLL("libc.so.6")
  except OSError:
    return None


_LIBC = _glibc()


#: glibc malloc arenas (heaps) the process may have: the main one and one
#: that every other thread shares (see limit_heap_fragmentation).
MALLOC_ARENAS = 2
#: mallopt's parameter number for the arena limit (malloc.h M_ARENA_MAX).
_M_ARENA_MAX = -8
_heap_limited = False


def limit_heap_fragmentation() -> bool:
  """Caps glibc's malloc arenas at MALLOC_ARENAS (mallopt M_ARENA_MAX; once
  per process, before training allocates), unless the environment sets
  MALLOC_ARENA_MAX. Returns whether the cap was set here.

  glibc gives every thread an arena of its own at its first allocation (up
  to 8 per core) and serves blocks up to its mmap threshold from it; the
  threshold rises to 32 MiB once the first mmapped block is freed, so from
  the first swap on the row chunks, TensorStore's buffers and the batch
  arrays (8 bytes an edge each, megabytes a bucket) all come from the
  heaps of the io pool, TensorStore's threads and the batch preparation
  thread. A block freed in one arena is reused only there, so each arena
  keeps its own fragmented free memory until the next malloc_trim. Measured
  on a 1M-entity, 20M-edge graph (P=16, d=32, 128 buckets,
  tools/rss_timeline.py): free heap kept 80-110 MiB, 31-37 MiB with two
  arenas; peak RSS 535-540 -> 495 MiB at the same speed.
  Fixing the mmap threshold low instead (every large block mmapped, given
  back on free) kept 20-50 MiB but trained 15-30% slower: XLA's per-call
  buffers were then mapped and zero-filled afresh at every call."""
  global _heap_limited
  if _heap_limited or _LIBC is None or "MALLOC_ARENA_MAX" in os.environ:
    return False
  _heap_limited = bool(_LIBC.mallopt(_M_ARENA_MAX, MALLOC_ARENAS))
  return _heap_limited


# Here, when the training core is imported: a thread's arena is made at its
# first allocation and the cap only stops new ones, so it must come before
# jax's runtime, TensorStore and the io pool start their threads (set in
# Residency.__init__ it changed nothing: free heap kept 81-89 MiB).
limit_heap_fragmentation()


class MallInfo2(ctypes.Structure):
  """glibc's struct mallinfo2 (malloc.h, glibc 2.33 and later)."""
  _fields_ = [(name, ctypes.c_size_t) for name in (
      "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
      "fordblks", "keepcost")]


if _LIBC is not None and hasattr(_LIBC, "mallinfo2"):
  _LIBC.mallinfo2.restype = MallInfo2


def heap_info() -> MallInfo2 | None:
  """glibc's heap statistics over every arena (mallinfo2): ``fordblks`` is
  free memory glibc keeps, ``uordblks + hblkhd`` memory in use. None when
  the C library is not glibc or too old."""
  if _LIBC is None or not hasattr(_LIBC, "mallinfo2"):
    return None
  return _LIBC.mallinfo2()


#: Free heap that glibc may keep between swaps before it is handed back.
#: Trimming after every swap kept RSS lowest but cost a kernel-side page
#: fault for every page of every freed chunk reused in the next bucket: on
#: 1M entities x d=128 at P=16 (256 swaps an epoch), 12 of the epoch's 50 s
#: were system time spent so. Reused memory is what a bucket needs anyway;
#: only memory that piles up past this is returned.
KEPT_FREE_HEAP_BYTES = 256 << 20


def _release_after(writes: list) -> None:
  """Waits for ``writes``, then hands their host copies' pages back."""
  for write in writes:
    write.result()
  release_free_host_memory()


def release_free_host_memory(keep_bytes: int = 0) -> bool:
  """Hands the heap's free pages back to the system (glibc malloc_trim)
  when more than ``keep_bytes`` are free (always with 0, or when glibc
  cannot say how much is free).

  Chunk copies, batch arrays and TensorStore buffers are freed every bucket,
  but glibc keeps freed heap memory in its arenas, fragmented, and rarely
  returns it: on a 4M-entity P=16 run RSS crept from 0.9 to 1.4-1.6 GiB over
  40 buckets with nothing live growing (docs/scale.md). Returns whether
  memory was released."""
  if _LIBC is None:
    return False
  if keep_bytes:
    info = heap_info()
    if info is not None and info.fordblks <= keep_bytes:
      return False
  return bool(_LIBC.malloc_trim(0))


@functools.lru_cache(maxsize=None)
def _write_rows(mesh):
  """jitted (table, acc, at [1], rows [G * n, d], accs [G * n]) -> (table, acc):
  every shard's n rows written at its row ``at``; table and acc donated."""
  def local(table, acc, at, rows, accs):
    return (jax.lax.dynamic_update_slice_in_dim(table, rows, at[0], 0),
            jax.lax.dynamic_update_slice_in_dim(acc, accs, at[0], 0))

  specs = sharding_lib.ROWS, sharding_lib.ROWS, sharding_lib.REPLICATED
  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=specs + specs[:2],
                               out_specs=specs[:2], check_vma=False), donate_argnums=(0, 1))


@functools.lru_cache(maxsize=None)
def _move_rows(mesh, num_moves: int, count: int):
  """jitted (table, acc, move_from [k], move_to [k]) -> (table, acc): on every
  shard, rows [from_i, from_i + count) go to [to_i, to_i + count), all read
  before any write; table and acc donated. Holds k x count rows extra."""
  def local(table, acc, move_from, move_to):
    moved = [(jax.lax.dynamic_slice_in_dim(table, move_from[i], count),
              jax.lax.dynamic_slice_in_dim(acc, move_from[i], count)) for i in range(num_moves)]
    for i, (rows, accs) in enumerate(moved):
      table = jax.lax.dynamic_update_slice_in_dim(table, rows, move_to[i], 0)
      acc = jax.lax.dynamic_update_slice_in_dim(acc, accs, move_to[i], 0)
    return table, acc

  rows, replicated = sharding_lib.ROWS, sharding_lib.REPLICATED
  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(rows, rows, replicated, replicated),
                               out_specs=(rows, rows), check_vma=False), donate_argnums=(0, 1))


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


def shard_capacity(graph: Graph, dims: dict[str, int], sub_rows: dict[str, int],
                   keep_all: bool = False) -> dict[int, int]:
  """Fixed rows of one shard per dim: a sub-partition of every source-side and
  target-side type (``sub_rows[type]`` rows each); with ``keep_all``, every
  partition of every type the relations use.

  Fixed so the jitted step compiles once; diagonal buckets (one partition on
  both sides) leave the tail unused.
  """
  capacity: dict[int, int] = {}
  if keep_all:
    for block in all_blocks(graph):
      capacity[dims[block[0]]] = capacity.get(dims[block[0]], 0) + sub_rows[block[0]]
    return capacity
  sides = {(rel.source, "src") for rel in graph.relations} | {
      (rel.target, "dst") for rel in graph.relations}
  for entity_type, _ in sides:
    dim = dims[entity_type]
    capacity[dim] = capacity.get(dim, 0) + sub_rows[entity_type]
  return capacity


def all_blocks(graph: Graph) -> list[Block]:
  """Every partition of every type some relation uses, in order."""
  types = {rel.source for rel in graph.relations} | {rel.target for rel in graph.relations}
  return sorted((t, p) for t in types for p in range(graph.entities[t].num_partitions))


def row_floats(dim: int, coordinate_accumulators: bool) -> int:
  """float32 values of one table row: d embedding floats and its Adagrad
  accumulators (storage.accumulator_shape of one row)."""
  return dim + math.prod(storage.accumulator_shape(1, dim, coordinate_accumulators))


def table_bytes(graph: Graph, dims: dict[str, int], sub_rows: dict[str, int],
                coordinate_accumulators: bool = False) -> int:
  """Bytes of every partition all_blocks names (float32 rows and accumulators)."""
  return sum(sub_rows[t] * row_floats(dims[t], coordinate_accumulators) * 4
             for t, _ in all_blocks(graph))


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
               anchors: storage.TableStore | None = None, schedule: str = "ring",
               keep_all_bytes: int = 0, write_barrier=None):
    self.graph, self.dims, self.tables, self.slots = graph, dims, tables, slots
    self.mesh = mesh
    self.num_shards = mesh.size
    self.local_shards = [g for g, device in enumerate(mesh.devices.flat)
                         if device.process_index == jax.process_index()]
    self.sub_rows = sub_rows
    self.schedule = schedule  # config.mesh.schedule (WorkingLayout.schedule)
    #: Every partition resident at once (see the module docstring).
    self.keep_all = self.num_shards == 1 and table_bytes(
        graph, dims, sub_rows, tables.coordinate_accumulators) <= keep_all_bytes
    self.capacity = shard_capacity(graph, dims, sub_rows, self.keep_all)
    self.anchors = anchors
    #: Called before anything is written to storage (the trainer: wait until
    #: the last checkpoint is final; the slots written next are the ones
    #: the checkpoint before it names).
    self.write_barrier = write_barrier
    self.layout: sharding_lib.WorkingLayout | None = None
    self._home: dict[int, state_lib.Rows] = {}
    #: Whether the resident rows may differ from storage (home set since the last flush).
    self._dirty = False
    self.pending_writes: dict[Block, list] = {}
    self.io_pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)
    #: Write-backs: copies evicted rows to the host once the steps before
    #: them have run, then writes them. Its own threads: a read in io_pool may
    #: wait for a write-back, never the other way round. Chunks are written in
    #: any order; two write-backs of one partition never overlap (a partition
    #: is read back only after its writes, and flushes pass the write barrier).
    self.write_pool = concurrent.futures.ThreadPoolExecutor(max_workers=WRITE_THREADS)
    #: block -> futures of its first chunks' reads (prefetch), for load().
    self._ahead: dict[Block, list[concurrent.futures.Future]] = {}
    #: (host bytes, futures) of the write-backs not yet waited for, oldest first.
    self._writes_in_flight: collections.deque = collections.deque()

  def blocks_of(self, bucket: tuple[int, int]) -> list[Block]:
    """The partitions resident while ``bucket`` trains (all, with keep_all)."""
    return all_blocks(self.graph) if self.keep_all else bucket_blocks(self.graph, bucket)

  @property
  def home(self) -> dict[int, state_lib.Rows]:
    return self._home

  @home.setter
  def home(self, value: dict[int, state_lib.Rows]) -> None:
    self._home, self._dirty = value, True

  def layout_of(self, bucket: tuple[int, int]) -> sharding_lib.WorkingLayout:
    return layout_for(self.graph, self.dims, self.blocks_of(bucket), self.num_shards,
                      self.sub_rows, self.capacity, self.schedule)

  # -- transfers between storage and the working tables, in row chunks --------

  def _row_bytes(self, dim: int) -> int:
    """Host bytes of one sub-partition row over this process's shards."""
    return row_floats(dim, self.tables.coordinate_accumulators) * 4 * len(self.local_shards)

  def _chunks(self, entity_type: str) -> list[tuple[int, int]]:
    """Row ranges [r0, r1) of a sub-partition moved at a time: about
    TRANSFER_BYTES over this process's shards, whole storage chunks when
    that many fit (so reads and writes touch whole zarr chunks)."""
    sub, dim = self.sub_rows[entity_type], self.dims[entity_type]
    step = max(1, TRANSFER_BYTES // self._row_bytes(dim))
    stored_chunk = self.tables.chunk.get(entity_type, 1)
    if step >= stored_chunk:
      step -= step % stored_chunk
    return [(r0, min(r0 + step, sub)) for r0 in range(0, sub, step)]

  def _shard_rows(self, block: Block, g: int, r0: int, r1: int) -> tuple[int, int]:
    """Partition rows [lo, hi) of sub-partition g's rows [r0, r1) (empty past the end)."""
    sub, rows = self.sub_rows[block[0]], self.graph.entities[block[0]].partition_rows(block[1])
    return min(g * sub + r0, rows), min(g * sub + r1, rows)

  def _wait_writes(self, block: Block) -> None:
    """Waits for the write-back of ``block`` (a read must see its latest rows;
    several chunk reads may wait at once, so the futures stay listed)."""
    for future in self.pending_writes.get(block, ()):
      future.result()

  def _read_chunk(self, block: Block, r0: int, r1: int,
                  store: storage.TableStore | None = None) -> Pieces:
    """Rows [r0, r1) of this process's sub-partitions of one partition:
    shard -> (rows, acc); from the anchor store (slot 0) when ``store`` is given."""
    if store is None:
      self._wait_writes(block)
      store, slot = self.tables, self.slots.current[block]
    else:
      slot = 0
    return {g: store.read_rows(block, slot, *self._shard_rows(block, g, r0, r1))
            for g in self.local_shards}

  def _put_chunk(self, rows: tuple[jax.Array, jax.Array], at: int, pieces: Pieces,
                 count: int) -> tuple[jax.Array, jax.Array]:
    """Writes ``pieces`` (``count`` rows per shard, zero past a partition's
    end) at row ``at`` of every shard of (table, acc); donates both."""
    def column(index):
      tail = rows[index].shape[1:]  # (d,) for rows; () or (d,) for accumulators and weights
      def shard(where):
        part = pieces[(where[0].start or 0) // count][index]
        if len(part) == count:
          return part
        out = np.zeros((count, *tail), np.float32)
        out[:len(part)] = part
        return out
      return jax.make_array_from_callback((self.num_shards * count, *tail),
                                          sharding_lib.row_sharding(self.mesh), shard)

    at = sharding_lib.global_array(np.asarray([at], np.int32), self.mesh)
    return _write_rows(self.mesh)(*rows, at, column(0), column(1))

  def _load_block(self, block: Block, ahead: list) -> None:
    """Reads one partition into its place in the working table, chunk by
    chunk: the read-ahead first, then at most LOAD_WINDOW chunk reads in
    flight. (Anchors, with L2-to-previous, likewise from their store.)"""
    dim, start = self.dims[block[0]], self.layout.offsets[block]
    chunks = self._chunks(block[0])
    sources = [(None, ahead, "table", "acc")]
    if self.anchors is not None:
      sources.append((self.anchors, [], "anchor", "anchor_weight"))
    for store, ready, table_field, acc_field in sources:
      window = collections.deque(ready)
      submitted = len(window)
      for number, (r0, r1) in enumerate(chunks):
        while submitted < len(chunks) and len(window) < LOAD_WINDOW:
          window.append(self.io_pool.submit(self._read_chunk, block, *chunks[submitted], store))
          submitted += 1
        pieces = window.popleft().result()
        rows = self.home[dim]
        table, acc = self._put_chunk((getattr(rows, table_field), getattr(rows, acc_field)),
                                     start + r0, pieces, r1 - r0)
        self.home[dim] = rows._replace(**{table_field: table, acc_field: acc})
        if number + 1 >= LOAD_WINDOW:
          # A chunk's copy waits in the device queue until the steps queued
          # before it (the previous bucket's, dispatched ahead) have run: at
          # most LOAD_WINDOW chunks wait so, not a whole partition.
          table.block_until_ready()

  def _slice_chunk(self, block: Block, r0: int, r1: int) -> dict:
    """Rows [r0, r1) of one resident partition's sub-partitions (this
    process's shards), sliced on the device: shard -> (rows, acc, first
    partition row, valid rows). Only dispatched, so the slices are taken after every step queued
    before them and the caller does not wait for those steps; the working
    table itself is never viewed from the host, so it stays free to be
    donated."""
    rows = self.home[self.dims[block[0]]]
    start = self.layout.offsets[block]
    accs = {s.index[0].start or 0: s.data for s in rows.acc.addressable_shards}
    slices = {}
    for shard in rows.table.addressable_shards:
      begin = shard.index[0].start or 0
      g = begin // self.capacity[self.dims[block[0]]]
      lo, hi = self._shard_rows(block, g, r0, r1)
      slices[g] = (_rows_at(shard.data, start + r0, r1 - r0),
                   _rows_at(accs[begin], start + r0, r1 - r0), lo, hi - lo)
    return slices

  def _write_slices(self, block: Block, slot: int, slices: dict) -> None:
    """Copies a chunk's device slices to the host (waiting, in this
    write-back thread, for the steps before them) and writes them to
    ``slot``; returns when TensorStore has written them."""
    written = []
    for table, acc, _, valid in slices.values():
      if valid:  # every shard's copies start together
        table.copy_to_host_async()
        acc.copy_to_host_async()
    for table, acc, lo, valid in slices.values():
      if valid:
        # The slices are fresh device arrays nothing changes: written from as they are.
        written.extend(self.tables.write_rows(block, slot, lo, np.asarray(table)[:valid],
                                              np.asarray(acc)[:valid], frozen=True))
    for future in written:
      future.result()

  def _write_back(self, block: Block, bound_copies: bool = True) -> None:
    """Starts writing one resident partition back to the uncommitted slot,
    chunk by chunk, without waiting for the bucket that is still training:
    each chunk is sliced on the device (queued behind that bucket's steps)
    and copied and written by the write-back thread. At most
    WRITE_BEHIND_BYTES of such copies exist at a time (older ones are
    waited for first), so a partition larger than that waits for the
    bucket's steps like any host copy would. Without ``bound_copies`` every
    chunk is sliced at once (flush_in_background)."""
    if self.write_barrier is not None:
      self.write_barrier()
    slot = self.slots.write_target(block)
    self.slots.current[block] = slot
    futures = []
    row_bytes = self._row_bytes(self.dims[block[0]])
    for r0, r1 in self._chunks(block[0]):
      if bound_copies:
        self._bound_writes(WRITE_BEHIND_BYTES - (r1 - r0) * row_bytes)
      future = self.write_pool.submit(self._write_slices, block, slot,
                                      self._slice_chunk(block, r0, r1))
      futures.append(future)
      self._writes_in_flight.append(((r1 - r0) * row_bytes, [future]))
    self.pending_writes[block] = futures

  def _bound_writes(self, limit: int) -> None:
    """Waits for the oldest writes until at most ``limit`` bytes are in flight."""
    in_flight = self._writes_in_flight
    while in_flight and (sum(n for n, _ in in_flight) > max(limit, 0)
                         or all(f.done() for f in in_flight[0][1])):
      for future in in_flight.popleft()[1]:
        future.result()

  # -- swapping -----------------------------------------------------------------

  def prefetch(self, bucket: tuple[int, int]) -> None:
    """Starts reading the first chunks of the partitions of ``bucket`` that
    are not resident, in the background: at most READ_AHEAD_BYTES (a
    partition being written back is read after its write)."""
    resident = set(self.layout.offsets) if self.layout else set()
    budget, ahead = READ_AHEAD_BYTES, {}
    for block in self.blocks_of(bucket):
      if block in resident:
        continue
      ahead[block] = []
      row_bytes = self._row_bytes(self.dims[block[0]])
      for r0, r1 in self._chunks(block[0]):
        budget -= (r1 - r0) * row_bytes
        if budget < 0:
          break
        ahead[block].append(self.io_pool.submit(self._read_chunk, block, r0, r1))
    self._ahead = ahead

  def load(self, bucket: tuple[int, int]) -> None:
    """Makes the bucket's partitions resident: evicted ones are written back
    (the writes finish in the background), kept ones move inside device
    memory, new ones are read chunk by chunk into their place (starting
    from the read-ahead of ``prefetch``)."""
    needed = self.blocks_of(bucket)
    ahead, self._ahead = self._ahead, {}
    if self.layout is not None and sorted(self.layout.offsets) == needed:
      return
    old_layout = self.layout
    kept = [b for b in needed if old_layout is not None and b in old_layout.offsets]
    for block in (old_layout.offsets if old_layout is not None else ()):
      if block not in needed:
        # A read-ahead of it could not have been made (it was resident).
        self._write_back(block)
    layout = layout_for(self.graph, self.dims, needed, self.num_shards, self.sub_rows,
                        self.capacity, self.schedule)
    home = {}
    for dim in layout.blocks:
      old = self.home.get(dim)
      rows = self._relayout(dim, old and (old.table, old.acc), old_layout, layout, kept,
                            self.tables.coordinate_accumulators)
      anchor = (None, None)
      if self.anchors is not None:
        anchor = self._relayout(dim, old and (old.anchor, old.anchor_weight), old_layout,
                                layout, kept, per_coordinate=False)  # one weight a row
      home[dim] = state_lib.Rows(*rows, *anchor)
    self.home, self.layout = home, layout
    for block in needed:
      if block not in kept:
        self._load_block(block, ahead.get(block, []))
    # Off the critical path, after this swap's write-backs (which free most
    # of what it may return), in the write-back thread.
    self.write_pool.submit(release_free_host_memory, KEPT_FREE_HEAP_BYTES)

  def _relayout(self, dim: int, old, old_layout, layout, kept, per_coordinate: bool):
    """(table, acc) of one dim in ``layout`` with the kept blocks moved from
    ``old`` (donated); new blocks are read in afterwards (_load_block).
    ``per_coordinate``: acc is [rows, d], else [rows]."""
    rows = self.num_shards * self.capacity[dim]
    if old is None:
      old = (sharding_lib.zeros(self.mesh, (rows, dim))(), sharding_lib.zeros(
          self.mesh, storage.accumulator_shape(rows, dim, per_coordinate))())
    moves = [(old_layout.offsets[b], layout.offsets[b], self.sub_rows[b[0]])
             for b in kept if self.dims[b[0]] == dim
             and old_layout.offsets[b] != layout.offsets[b]]
    if not moves:
      return old

    def offsets(values):
      return sharding_lib.global_array(np.asarray(values, np.int32).reshape(-1), self.mesh)

    size = moves[0][2]
    if any(n != size or a % size or b % size for a, b, n in moves):
      fn = sharding_lib.relayout(self.mesh, tuple(m[2] for m in moves), 0)
      return fn(*old, offsets([m[0] for m in moves]), offsets([m[1] for m in moves]),
                offsets([]))
    # Equal blocks at multiples of their size: a source range and a
    # destination range are the same or disjoint, so moving chunk k of every
    # block before chunk k + 1 never overwrites rows still to be read, and
    # only one chunk per block is held extra (not a whole partition).
    step = max(1, TRANSFER_BYTES // (self._row_bytes(dim) * len(moves)))
    for r0 in range(0, size, step):
      count = min(step, size - r0)
      old = _move_rows(self.mesh, len(moves), count)(
          *old, offsets([a + r0 for a, _, _ in moves]), offsets([b + r0 for _, b, _ in moves]))
    return old

  def flush(self) -> None:
    """Writes every resident partition back and waits for all writes (of all
    hosts); at most WRITE_BEHIND_BYTES of host copies exist at a time.
    Nothing is written when the rows have not changed since the last flush
    (the run's end, right after its last checkpoint: a 1M x 128 table is
    512 MB). Passes the write barrier either way: callers write the
    uncommitted slots after a flush (best_checkpoint.py)."""
    if self.write_barrier is not None:
      self.write_barrier()
    for block in list(self.layout.offsets) if self.layout is not None and self._dirty else ():
      self._write_back(block)
    self._dirty = False
    self._bound_writes(0)
    for block in list(self.pending_writes):
      self._wait_writes(block)
    self.pending_writes.clear()
    release_free_host_memory()  # the host copies just written (a checkpoint follows)
    distributed.sync("tables flushed")

  def flush_in_background(self) -> list[concurrent.futures.Future]:
    """Starts writing every resident partition back, as flush() does, and
    returns the writes' futures without waiting for them (one process).

    Every chunk is sliced on the device at once, behind the steps already
    queued: a snapshot of the resident rows, which the device holds beside
    the working tables until the write-back thread has copied each chunk to
    the host and written it (one chunk's host copy at a time). Steps queued
    after this call change the working tables, not the snapshot."""
    if self.write_barrier is not None:
      self.write_barrier()
    futures = []
    for block in list(self.layout.offsets) if self.layout is not None and self._dirty else ():
      self._write_back(block, bound_copies=False)
      futures.extend(self.pending_writes[block])
    self._dirty = False
    # After the writes (flush does it inline); the pool starts it after them.
    self.write_pool.submit(_release_after, list(futures))
    return futures

  def drop(self) -> None:
    """Forgets the resident rows (after flush()), so the next load() reads
    every partition from storage again (early stopping's restore writes the
    best copy there)."""
    self.layout, self.home, self._ahead = None, {}, {}

  def close(self) -> None:
    self.io_pool.shutdown(wait=True)
    self.write_pool.shutdown(wait=True)
