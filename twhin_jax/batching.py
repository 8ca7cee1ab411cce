"""Host-side batch preparation: a bucket's edges -> the jitted calls' arrays.

``prepare_bucket`` turns one bucket into a sequence of ``PreparedCall``s,
round by round of the ring (sharding.py). ``BatchStream`` runs it in a
background thread for every bucket of a training plan, so the next bucket's
shuffle and packing overlap this bucket's training.

Every call's arrays carry a leading device axis, [G, T, S, C] (G devices, T
steps per call, S chunks per step, C edges per chunk); the consumer only
fills in ``step_index`` and hands the arrays over to the mesh.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import os
import queue
import threading

import jax
import numpy as np

from twhin_jax import bucket_index
from twhin_jax import device_schedule
from twhin_jax import model
from twhin_jax import negatives
from twhin_jax import residency
from twhin_jax import sharding as sharding_lib
from twhin_jax import step as step_lib
from twhin_jax.graph import Graph

#: Steps per jitted call (lax.scan length): amortises dispatch (measured ~2x
#: faster than one step per call on 2 CPU cores).
STEPS_PER_CALL = 16
#: Buckets larger than this many edges stream in slices (one device; see
#: prepare_bucket); smaller ones are shuffled and packed whole.
SLICE_EDGES = 2_000_000
#: A streamed bucket's slices: READ_BLOCK_EDGES-edge runs, RUNS_PER_SLICE of
#: them (about 1M edges: a partly filled call per group and slice wastes
#: under 2% of the steps).
READ_BLOCK_EDGES = 65_536
RUNS_PER_SLICE = 16
PREP_THREADS = min(8, os.cpu_count() or 1)
#: Slices being prepared at once (about 120 bytes per edge each, so 2 slices
#: of 1M edges take about 0.25 GB of the fixed memory budget).
SLICES_IN_FLIGHT = 2
#: Seed-path word of a device's own shuffle of its edges (seed path, this, device).
DEVICE_SHUFFLE = 0xD5
#: Read only the cells of grouped buckets that a process's devices train
#: (bucket_index.py); False reads whole buckets (tests compare both).
USE_BUCKET_INDEX = True


@dataclasses.dataclass
class PreparedCall:
  group: str
  batch: step_lib.StepBatch  # numpy arrays [G, T, S, C] etc.


def prepare_bucket(graph: Graph, layout: model.RelationLayout,
                   working: sharding_lib.WorkingLayout, bucket: tuple[int, int], config,
                   seed_path: tuple[int, ...], local_devices: frozenset[int] | None = None,
                   exchange=None):
  """Yields (visit, call) for the jitted calls of one bucket, visit by visit
  (a visit trains round visit % R; only the tournament visits a round more
  than once, _BucketPacker.calls).

  Edges are split into G x G sub-buckets by the sub-partitions of their
  endpoints (sharding.py); round k gives device g the sub-bucket (g, (g + k)
  mod G). Each device's edges are shuffled by their own seed (``seed_path``
  and the device), so that a device's batches depend only on its own edges.
  Within a device's sub-bucket the edges are grouped by chunk class
  (negatives.chunk_classes) into chunks of C (the last chunk of each padded
  with weight-0 edges), chunks of one relation group (operator, dim) are
  shuffled and packed S to a step and T steps to a call. All devices run the
  same sequence of calls (one SPMD program), so a device with fewer chunks of
  a group than another gets all-padding calls.

  With ``working.schedule == "tournament"`` the rounds are the 2G - 1 of
  device_schedule.tournament: the edges split into 2G x 2G sub-buckets by
  the *slots* (half sub-partitions) of their endpoints, and each goes to the
  (round, device) that holds both slots then, its rows at the positions the
  slots take in that round.

  ``local_devices`` (mesh positions; None: all): with several processes each
  reads and packs only its own devices' edges; the other devices' slices of
  the arrays stay zero (sharding.global_array hands over only local slices).
  When the bucket is grouped by cell (bucket_index.py) a process reads only
  the cells that overlap its devices' sub-partitions. The calls depend on
  every device's chunk counts: ``exchange`` (local counts [cells] -> every
  process's counts summed, e.g. ``KeyValueSum``) supplies the other devices'
  counts; without it the whole bucket is read to count them. The calls, and
  the local devices' arrays, are the same whichever devices are local.
  """
  rng = np.random.default_rng(list(seed_path))
  edges = graph.bucket_edges(*bucket)  # memory-mapped: read as the slices need them
  num_edges = len(edges["src"])
  if num_edges == 0:
    return
  if working.num_shards > 1:
    yield from _prepare_sharded(graph, layout, working, bucket, config, seed_path, rng, edges,
                                local_devices, exchange)
    return
  if num_edges <= SLICE_EDGES:
    order = rng.permutation(num_edges)
    bucket_index.READ_STATS.count(edges, num_edges)
    bucket_index.READ_STATS.keep(num_edges)
    yield from _BucketPacker(graph, layout, working, bucket, config, edges, order).calls(rng)
    return
  # A large bucket on one device streams in slices, so that only the slices
  # in flight are in memory, never a shuffled copy of the whole bucket; every
  # slice is shuffled by its own seed, prepared in a thread (numpy releases
  # the GIL) and trained after the one before. A bucket grouped by cell
  # splits into slices that take a share of every cell (its edges in random
  # order: each slice is a uniform sample of the bucket,
  # bucket_index.stratified_slices); an ungrouped one into runs of
  # READ_BLOCK_EDGES consecutive edges, a seeded permutation of the runs cut
  # into slices of RUNS_PER_SLICE runs (each a random set of runs from all
  # over the bucket). With several devices the rounds must stay in order, and
  # the G x G sub-buckets already keep the pieces small.
  starts = graph.bucket_cells(*bucket) if USE_BUCKET_INDEX else None
  if starts is not None and len(starts) - 1 == graph.cell_grid.num_cells:
    num_slices = -(-num_edges // (RUNS_PER_SLICE * READ_BLOCK_EDGES))
    slices = bucket_index.stratified_slices(starts, num_slices, rng)
  else:
    runs = rng.permutation(-(-num_edges // READ_BLOCK_EDGES))
    slices = [np.concatenate([np.arange(run * READ_BLOCK_EDGES,
                                        min((run + 1) * READ_BLOCK_EDGES, num_edges))
                              for run in np.sort(runs[i:i + RUNS_PER_SLICE])])
              for i in range(0, len(runs), RUNS_PER_SLICE)]
  seeds = rng.integers(2 ** 63, size=len(slices))
  workers = max(1, min(PREP_THREADS, SLICES_IN_FLIGHT, len(slices)))

  def prepare_slice(index, seed):
    slice_rng = np.random.default_rng(seed)
    order = index[slice_rng.permutation(len(index))]
    bucket_index.READ_STATS.count(edges, len(index))
    bucket_index.READ_STATS.keep(len(index))
    packer = _BucketPacker(graph, layout, working, bucket, config, edges, order)
    return list(packer.calls(slice_rng))

  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    pending = collections.deque()
    for index, seed in zip(slices, seeds):
      pending.append(pool.submit(prepare_slice, index, seed))
      if len(pending) >= workers:
        yield from pending.popleft().result()
    while pending:
      yield from pending.popleft().result()


def _prepare_sharded(graph: Graph, layout: model.RelationLayout,
                     working: sharding_lib.WorkingLayout, bucket, config, seed_path, rng,
                     edges: dict, local_devices: frozenset[int] | None, exchange):
  """prepare_bucket with G > 1 devices: read the local devices' edges (only
  their cells when the bucket is grouped and an ``exchange`` tells the other
  devices' counts), shuffle each device's edges by its own seed, pack."""
  shards = working.num_shards
  local = frozenset(range(shards)) if local_devices is None else frozenset(local_devices)
  num_edges = len(edges["src"])
  starts = None
  if USE_BUCKET_INDEX and len(local) < shards and exchange is not None:
    starts = graph.bucket_cells(*bucket)
  if starts is not None:
    needed = _needed_cells(graph, working, bucket, local)
    held = bucket_index.read_rows(edges, bucket_index.read_ranges(starts, needed))
  else:
    held = edges
    bucket_index.READ_STATS.count(edges, num_edges)
  ranges = _RelationRanges.of(graph, working, bucket)
  rel = np.asarray(held["rel"]).astype(np.int64)
  device = _device_of(ranges, working, rel, np.asarray(held["src"]).astype(np.int64),
                      np.asarray(held["dst"]).astype(np.int64))  # [E held]
  # Every device's edges, in file order, shuffled by the device's own seed.
  order = []
  for g in sorted(local):
    mine = np.flatnonzero(device == g)
    order.append(mine[np.random.default_rng(list(seed_path) + [DEVICE_SHUFFLE, g])
                      .permutation(len(mine))])
  order = np.concatenate(order) if order else np.zeros(0, np.int64)
  bucket_index.READ_STATS.keep(len(order))
  if exchange is None and len(local) < shards:
    # The other devices' chunk counts from their edges, placed here too.
    everyone = _BucketPacker(graph, layout, working, bucket, config, held,
                             np.flatnonzero(~np.isin(device, sorted(local))),
                             frozenset(range(shards)) - local)
    others = everyone.cell_counts
    exchange = lambda counts: counts + others  # noqa: E731
  packer = _BucketPacker(graph, layout, working, bucket, config, held, order, local, exchange)
  yield from packer.calls(rng)


def _device_of(ranges: "_RelationRanges", working: sharding_lib.WorkingLayout,
               rel: np.ndarray, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
  """[E] the device that trains each edge (as _BucketPacker places it)."""
  if working.schedule == "tournament":
    plan = device_schedule.tournament(working.num_shards)
    owner = np.zeros((plan.num_slots, plan.num_slots), np.int64)  # [source slot, target slot]
    for (x, y), (_, g) in plan.owner().items():
      owner[x, y] = g
    return owner[src // (ranges.src_sub // 2)[rel], dst // (ranges.dst_sub // 2)[rel]]
  return src // ranges.src_sub[rel]


def _needed_cells(graph: Graph, working: sharding_lib.WorkingLayout, bucket,
                  local: frozenset[int]) -> np.ndarray:
  """[num_cells] bool: the cells of a grouped bucket that hold any edge of
  the ``local`` devices (bucket_index.needed_cells, per type pair)."""
  cell_grid, shards = graph.cell_grid, working.num_shards
  grid = cell_grid.grid
  needed = np.zeros((len(cell_grid.type_pairs), grid, grid), bool)
  if working.schedule == "tournament":
    plan = device_schedule.tournament(shards)
    units, divide = plan.num_slots, 2
    owned = np.zeros((units, units), bool)  # [source slot, target slot]
    for (x, y), (_, g) in plan.owner().items():
      owned[x, y] = g in local
  else:
    units, divide = shards, 1
    owned = np.zeros((shards, shards), bool)  # [source sub-partition, target sub-partition]
    owned[sorted(local), :] = True
  done = set()
  for r, info in enumerate(graph.relations):
    pair = int(cell_grid.pair_of[r])
    if pair in done:
      continue
    done.add(pair)
    src_block, dst_block = residency.relation_blocks(graph, bucket, r)
    src_units = bucket_index.unit_blocks(cell_grid, graph.entities[info.source].partition_size,
                                         working.sub_rows[src_block] // divide, units)
    dst_units = bucket_index.unit_blocks(cell_grid, graph.entities[info.target].partition_size,
                                         working.sub_rows[dst_block] // divide, units)
    needed[pair] = bucket_index.needed_cells(src_units, dst_units, owned)
  return needed.ravel()


class KeyValueSum:
  """``exchange`` for prepare_bucket across processes: sums every process's
  int64 array for one key through jax.distributed's key-value store (the
  coordination service; no device collective, so it is safe in the
  preparing thread while the main thread trains).

  Keys are ``twhin/cell_counts/<stream>/<key>/<process>``; a process deletes
  its key of the bucket before once it has read everyone's of this one
  (then every process has read that older key)."""

  _streams = iter(range(1 << 62))  # the same sequence in every process

  def __init__(self, timeout_s: float = 3600.0):
    from jax._src import distributed as jax_distributed  # the job's coordination client
    self._client = jax_distributed.global_state.client
    self._process, self._count = jax.process_index(), jax.process_count()
    self._stream = next(self._streams)
    self._timeout_ms = int(timeout_s * 1000)
    self._previous: str | None = None

  def __call__(self, key: str, counts: np.ndarray) -> np.ndarray:
    prefix = f"twhin/cell_counts/{self._stream}/{key}"
    counts = np.ascontiguousarray(counts, "<i8")
    self._client.key_value_set_bytes(f"{prefix}/{self._process}", counts.tobytes())
    total = counts.copy()
    for process in range(self._count):
      if process != self._process:
        data = self._client.blocking_key_value_get_bytes(f"{prefix}/{process}", self._timeout_ms)
        total += np.frombuffer(data, "<i8")
    if self._previous is not None:
      self._client.key_value_delete(self._previous)
    self._previous = f"{prefix}/{self._process}"
    return total


@dataclasses.dataclass
class _RelationRanges:
  """Per relation r of a bucket: where its source and target rows sit."""
  src_off: np.ndarray  # [R] first shard row of the source sub-partition
  dst_off: np.ndarray  # [R]
  src_sub: np.ndarray  # [R] rows per source sub-partition
  dst_sub: np.ndarray  # [R]
  src_rows_in: np.ndarray  # [R, G] rows of each source sub-partition (uniform ranges)
  dst_rows_in: np.ndarray  # [R, G]
  weight: np.ndarray  # [R] relation weight

  @classmethod
  def of(cls, graph: Graph, working: sharding_lib.WorkingLayout, bucket) -> "_RelationRanges":
    num_rel, shards = len(graph.relations), working.num_shards
    ranges = cls(np.zeros(num_rel, np.int64), np.zeros(num_rel, np.int64),
                 np.ones(num_rel, np.int64), np.ones(num_rel, np.int64),
                 np.zeros((num_rel, shards), np.int64), np.zeros((num_rel, shards), np.int64),
                 np.zeros(num_rel, np.float32))
    for r, info in enumerate(graph.relations):
      src_block, dst_block = residency.relation_blocks(graph, bucket, r)
      ranges.src_off[r], ranges.dst_off[r] = working.offsets[src_block], working.offsets[dst_block]
      ranges.src_sub[r], ranges.dst_sub[r] = working.sub_rows[src_block], working.sub_rows[dst_block]
      ranges.src_rows_in[r] = [working.rows_in_shard(src_block, g) for g in range(shards)]
      ranges.dst_rows_in[r] = [working.rows_in_shard(dst_block, g) for g in range(shards)]
      ranges.weight[r] = info.weight
    return ranges


class _BucketPacker:
  """prepare_bucket's work on the edges ``order`` selects, in that order."""

  def __init__(self, graph: Graph, layout: model.RelationLayout,
               working: sharding_lib.WorkingLayout, bucket, config, edges, order: np.ndarray,
               local_devices: frozenset[int] | None = None, exchange=None):
    self.layout = layout
    self.shards = working.num_shards
    self.local = (frozenset(range(self.shards)) if local_devices is None
                  else frozenset(local_devices))
    self.chunk = config.negatives.chunk_size
    self.num_uniform = config.negatives.num_uniform
    self.batch_size = config.train.batch_size
    self.per_step = config.train.batch_size // self.chunk  # S: chunks per step and device
    self.mixed = bool(config.negatives.mix_relations)
    self.correct = bool(config.negatives.logq_correction)
    self.rel = np.asarray(edges["rel"])[order].astype(np.int64)
    src = np.asarray(edges["src"])[order].astype(np.int64)
    dst = np.asarray(edges["dst"])[order].astype(np.int64)
    self.weight = np.asarray(edges["weight"], np.float32)[order]
    self.ranges = _RelationRanges.of(graph, working, bucket)
    if working.schedule == "tournament":
      self._place_tournament(graph, working, bucket, src, dst)
    else:
      self._place_ring(src, dst)
    class_of = negatives.chunk_classes(graph.relations, layout.group, self.mixed)
    self.num_classes = int(class_of.max()) + 1
    self.class_group = {int(c): layout.group[r] for r, c in enumerate(class_of)}  # one per class
    self.edge_class = class_of[self.rel]  # [E]
    # Cell (round, device, chunk class) of every edge: a device's chunks of a
    # round are drawn from its cell.
    num_cells = self.num_rounds * self.shards * self.num_classes
    self.edge_cell = (self.round_of * self.shards + self.device_of) * self.num_classes \
        + self.edge_class  # [E]
    if num_cells < 2 ** 15:
      self.edge_cell = self.edge_cell.astype(np.int16)  # stable sort of 16-bit keys: a radix sort
    self.cell_counts = np.bincount(self.edge_cell, minlength=num_cells)  # of the edges held
    self.exchange = exchange
    if self.correct:
      # Batch negatives come from the edge's own cell: log q counts there
      # (with one device, a cell is a chunk class of the bucket).
      self.src_logq, self.dst_logq = negatives.sampling_log_counts(
          self.edge_cell, src, dst, self.cell_counts, self.edge_src_n, self.edge_dst_n,
          self.chunk, self.num_uniform)
    self.row_in_group = np.asarray(layout.row, np.int32)
    self.reverse_row_in_group = np.asarray(layout.reverse_row, np.int32)
    self.tournament = working.schedule == "tournament" and self.shards > 1
    self.requested_passes = int(config.mesh.get("round_passes", 0))

  def _place_ring(self, src: np.ndarray, dst: np.ndarray) -> None:
    """The ring: round k gives device g sub-bucket (g, (g + k) mod G)."""
    ranges, rel, shards = self.ranges, self.rel, self.shards
    self.num_rounds = shards
    src_shard = src // ranges.src_sub[rel]  # [E] device that owns the source row
    dst_shard = dst // ranges.dst_sub[rel]  # [E] device that owns the target row
    self.round_of = (dst_shard - src_shard) % shards  # [E]
    self.device_of = src_shard  # [E] the device that trains the edge
    self.src_row = ranges.src_off[rel] + src - src_shard * ranges.src_sub[rel]  # [E] shard row
    self.dst_row = ranges.dst_off[rel] + dst - dst_shard * ranges.dst_sub[rel]  # [E]
    # Uniform negatives of an edge: its sub-partitions' rows.
    self.edge_src_n = ranges.src_rows_in[rel, src_shard]  # [E]
    self.edge_dst_n = ranges.dst_rows_in[rel, dst_shard]  # [E]
    # [R] first row and rows of each relation's uniform ranges on device g in round k.
    self.uniform_ranges = lambda k, g: (ranges.src_off, ranges.src_rows_in[:, g],
                                        ranges.dst_off, ranges.dst_rows_in[:, (g + k) % shards])

  def _place_tournament(self, graph: Graph, working: sharding_lib.WorkingLayout, bucket,
                        src: np.ndarray, dst: np.ndarray) -> None:
    """The tournament (device_schedule.py): slots of h = sub_rows / 2 rows;
    the schedule decides the round and the device of every (source slot,
    target slot) pair and where each slot sits (its position) in that round.
    Uniform negatives come from the two slots of the type that the device
    holds in that round."""
    ranges, rel, shards = self.ranges, self.rel, self.shards
    plan = device_schedule.tournament(shards)
    self.num_rounds = plan.num_rounds
    src_half, dst_half = ranges.src_sub // 2, ranges.dst_sub // 2  # [R]
    src_slot, dst_slot = src // src_half[rel], dst // dst_half[rel]  # [E]
    owner_round = np.zeros((2 * shards, 2 * shards), np.int64)  # [source slot, target slot]
    owner_device = np.zeros((2 * shards, 2 * shards), np.int64)
    for (x, y), (r, g) in plan.owner().items():
      owner_round[x, y], owner_device[x, y] = r, g
    position = np.zeros((plan.num_rounds, 2 * shards), np.int64)  # [round, slot]
    for r in range(plan.num_rounds):
      for slot, (_, p) in plan.place(r).items():
        position[r, slot] = p
    self.round_of = owner_round[src_slot, dst_slot]  # [E]
    self.device_of = owner_device[src_slot, dst_slot]  # [E] the device that trains the edge
    self.src_row = (ranges.src_off[rel] + position[self.round_of, src_slot] * src_half[rel]
                    + src - src_slot * src_half[rel])  # [E] row inside that device's shard
    self.dst_row = (ranges.dst_off[rel] + position[self.round_of, dst_slot] * dst_half[rel]
                    + dst - dst_slot * dst_half[rel])  # [E]
    # The uniform range [lo, lo + n) of a (relation side, round, device): both
    # slots it holds when they are contiguous (the one at position 0 full),
    # else the one with more rows (a partition's last slot may be partial,
    # the slots past its end are empty).
    num_rel = len(graph.relations)
    lo = np.zeros((2, num_rel, plan.num_rounds, shards), np.int64)  # [side, R, round, device]
    n = np.zeros((2, num_rel, plan.num_rounds, shards), np.int64)
    for r in range(num_rel):
      for side, block in enumerate(residency.relation_blocks(graph, bucket, r)):
        half, offset = working.sub_rows[block] // 2, working.offsets[block]
        for k in range(plan.num_rounds):
          for g, (a, b) in enumerate(plan.holds[k]):
            first, second = working.rows_in_slot(block, a), working.rows_in_slot(block, b)
            if first == half:
              lo[side, r, k, g], n[side, r, k, g] = offset, first + second
            elif second > first:
              lo[side, r, k, g], n[side, r, k, g] = offset + half, second
            else:
              lo[side, r, k, g], n[side, r, k, g] = offset, first
    self.edge_src_n = n[0, rel, self.round_of, self.device_of]  # [E]
    self.edge_dst_n = n[1, rel, self.round_of, self.device_of]  # [E]
    self.uniform_ranges = lambda k, g: (lo[0, :, k, g], n[0, :, k, g], lo[1, :, k, g],
                                        n[1, :, k, g])

  def _cells(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(held edges' indices sorted by cell (round, device, chunk class),
    start of each cell among them, every device's edges per cell).

    Stable: a cell's edges keep their order. The held edges are the local
    devices' (all of each); the other devices' counts come from
    ``exchange``."""
    by_cell = np.argsort(self.edge_cell, kind="stable")
    starts = np.concatenate([[0], np.cumsum(self.cell_counts)])
    counts = self.cell_counts if self.exchange is None else self.exchange(self.cell_counts)
    return by_cell, starts, counts

  def calls(self, rng: np.random.Generator):
    """Yields (visit, PreparedCall), visits in order, calls of a visit
    shuffled.

    The ring and one device visit each round once (visit = round). The
    tournament visits its rounds 0, 1, .., R - 1 num_passes times in turn
    (device_schedule.round_passes): a device's shuffled chunks of a round
    and group split into num_passes near-equal runs, pass p trains run p, so
    consecutive steps cover every cell instead of one round's cells for the
    whole round. Whole chunks are dealt out, never split, so the chunks (and
    their batch negatives) are those of a single pass; only their order, and
    the padding of each visit's last step, change."""
    by_cell, starts, counts = self._cells()
    shards = self.shards
    # A device of another process: only its chunk count per group (and the
    # same random draws), as a range standing in for its chunks.
    rounds = [[self._device_chunks(by_cell, starts, k, g, rng) if g in self.local
               else self._skip_chunks(counts, k, g, rng) for g in range(shards)]
              for k in range(self.num_rounds)]
    self.num_passes = 1
    if self.tournament:
      num_chunks = sum(len(chunks) for per_device in rounds for groups in per_device
                       for chunks in groups.values())
      # Every device's edges (counts, not the held ones): the processes must
      # agree on the step size, as they issue the same calls.
      self.per_step = device_schedule.chunks_per_device_step(
          self.batch_size, self.chunk, self.shards, int(counts.sum()) / max(num_chunks, 1))
      round_steps = [max(sum(-(-len(chunks) // self.per_step) for chunks in groups.values())
                         for groups in per_device) for per_device in rounds]
      self.num_passes = device_schedule.round_passes(self.requested_passes, round_steps)
    for v in range(self.num_passes * self.num_rounds):
      p, k = divmod(v, self.num_rounds)
      device_chunks = [{group: chunks[len(chunks) * p // self.num_passes:
                                      len(chunks) * (p + 1) // self.num_passes]
                        for group, chunks in groups.items()} for groups in rounds[k]]
      calls = []
      for group in sorted(set().union(*device_chunks)):
        most = max(len(groups.get(group, ())) for groups in device_chunks)
        steps = self._steps_per_call(-(-most // self.per_step))
        per_call = self.per_step * steps
        calls.extend((group, start, steps) for start in range(0, most, per_call))
      empty = np.zeros((0, self.chunk), np.int64)
      first_local = min(self.local)
      for position in rng.permutation(len(calls)):
        group, start, steps = calls[position]
        per_call = self.per_step * steps
        local = {g: self._device_call(device_chunks[g].get(group, empty)[start:start + per_call],
                                      group, steps, *self.uniform_ranges(k, g))
                 for g in self.local}
        if len(local) < shards:
          other = jax.tree_util.tree_map(np.zeros_like, local[first_local])
          per_device = [local.get(g, other) for g in range(shards)]
        else:
          per_device = [local[g] for g in range(shards)]
        yield v, PreparedCall(group, jax.tree_util.tree_map(lambda *xs: np.stack(xs), *per_device))

  def _steps_per_call(self, steps_needed: int) -> int:
    """T of a visit's calls: STEPS_PER_CALL, or, in the tournament, the
    power of two (at most STEPS_PER_CALL) that holds the busiest device's
    steps of the visit, so that short visits do not pay for all-padding steps
    (at most log2(STEPS_PER_CALL) + 1 shapes to compile)."""
    if not self.tournament:
      return STEPS_PER_CALL
    return min(STEPS_PER_CALL, 1 << max(steps_needed - 1, 0).bit_length())

  def _device_chunks(self, by_cell, starts, k: int, g: int,
                     rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Group -> device g's shuffled chunks [num_chunks, C] of round k (-1 = pad)."""
    chunk = self.chunk
    lists: dict[str, list[np.ndarray]] = {}
    for c in range(self.num_classes):
      at = (k * self.shards + g) * self.num_classes + c
      idx = by_cell[starts[at]:starts[at + 1]]
      if len(idx) == 0:
        continue
      padded = -(-len(idx) // chunk) * chunk
      idx = np.concatenate([idx, np.full(padded - len(idx), -1, np.int64)]).reshape(-1, chunk)
      lists.setdefault(self.class_group[c], []).append(idx)
    groups = {}
    for group in sorted(lists):
      chunks = np.concatenate(lists[group])  # [num_chunks, C] edge indices, -1 = pad
      groups[group] = chunks[rng.permutation(len(chunks))]
    return groups

  def _skip_chunks(self, counts: np.ndarray, k: int, g: int,
                   rng: np.random.Generator) -> dict[str, range]:
    """_device_chunks's group -> chunk count (as a range) for a device this
    process does not pack, drawing the same permutations from ``rng``."""
    chunks: dict[str, int] = {}
    for c in range(self.num_classes):
      n = int(counts[(k * self.shards + g) * self.num_classes + c])
      if n:
        group = self.class_group[c]
        chunks[group] = chunks.get(group, 0) + -(-n // self.chunk)
    for group in sorted(chunks):
      rng.permutation(chunks[group])
    return {group: range(n) for group, n in chunks.items()}

  def _device_call(self, call_chunks: np.ndarray, group: str, steps: int,
                   src_lo_of: np.ndarray, src_n_of: np.ndarray, dst_lo_of: np.ndarray,
                   dst_n_of: np.ndarray) -> step_lib.StepBatch:
    """One device's T = ``steps`` steps from chunks of edge indices (-1 =
    padding); ``*_lo_of`` / ``*_n_of`` [R]: first row and rows of each
    relation's uniform source / target range on that device in that round."""
    chunk, ranges = self.chunk, self.ranges
    full = steps * self.per_step
    shape3 = (steps, self.per_step, chunk)
    shape2 = (steps, self.per_step)
    if len(call_chunks) < full:
      call_chunks = np.concatenate(
          [call_chunks, np.full((full - len(call_chunks), chunk), -1, np.int64)])
    is_real = call_chunks >= 0  # [T*S, C]
    safe = np.where(is_real, call_chunks, 0)

    def at(values: np.ndarray) -> np.ndarray:  # values[safe]; a process may hold no edge
      return values[safe] if len(values) else np.zeros(safe.shape, values.dtype)

    # A chunk that is all padding takes the group's first relation.
    chunk_rel = np.where(is_real.any(axis=1), at(self.rel)[:, 0],
                         self.layout.groups[group][0]).astype(np.int64)  # [T*S]
    src_n, dst_n = src_n_of[chunk_rel], dst_n_of[chunk_rel]  # [T*S]
    edge_rel = np.where(is_real, at(self.rel), chunk_rel[:, None])  # [T*S, C]
    edge_weight = np.where(is_real, at(self.weight) * ranges.weight[edge_rel], 0.0)
    # Relation rows per chunk [T, S], or per edge [T, S, C] in mixed chunks.
    rel_rows = edge_rel.reshape(shape3) if self.mixed else chunk_rel.reshape(shape2)
    extra = {}
    if self.correct:
      extra = dict(
          src_logq=np.where(is_real, at(self.src_logq), 0.0).reshape(shape3).astype(np.float32),
          dst_logq=np.where(is_real, at(self.dst_logq), 0.0).reshape(shape3).astype(np.float32),
          uniform_src_logq=negatives.uniform_log_count(
              src_n, chunk, self.num_uniform).reshape(shape2),
          uniform_dst_logq=negatives.uniform_log_count(
              dst_n, chunk, self.num_uniform).reshape(shape2))
    return step_lib.StepBatch(
        src=np.where(is_real, at(self.src_row), 0).reshape(shape3).astype(np.int32),
        dst=np.where(is_real, at(self.dst_row), 0).reshape(shape3).astype(np.int32),
        rel=self.row_in_group[rel_rows],
        rel_reverse=self.reverse_row_in_group[rel_rows],
        weight=edge_weight.reshape(shape3).astype(np.float32),
        src_lo=src_lo_of[chunk_rel].reshape(shape2).astype(np.int32),
        src_n=src_n.reshape(shape2).astype(np.int32),
        dst_lo=dst_lo_of[chunk_rel].reshape(shape2).astype(np.int32),
        dst_n=dst_n.reshape(shape2).astype(np.int32),
        step_index=np.zeros(steps, np.int32),  # set by the consumer
        **extra)


# --------------------------------------------------------------------------
# Preparing ahead, in a background thread.


class Background:
  """Runs a generator in a thread, handing its items over through a bounded
  queue (``depth`` items ahead). ``close()`` stops the thread early."""

  _DONE = object()

  def __init__(self, generator, depth: int = 4):
    self._items: queue.Queue = queue.Queue(maxsize=depth)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._produce, args=(generator,), daemon=True)
    self._thread.start()

  def _put(self, item) -> bool:
    while not self._stop.is_set():
      try:
        self._items.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _produce(self, generator) -> None:
    try:
      for item in generator:
        if not self._put(item):
          return
      self._put(self._DONE)
    except BaseException as err:  # noqa: BLE001 - re-raised in the consumer
      self._put(err)

  def __iter__(self):
    return self

  def __next__(self):
    item = self._items.get()
    if item is self._DONE:
      raise StopIteration
    if isinstance(item, BaseException):
      raise item
    return item

  def close(self) -> None:
    self._stop.set()
    self._thread.join(timeout=10)


class BatchStream:
  """The prepared calls of every bucket of a plan, made ahead in a thread.

  ``plan``: [(epoch, bucket index, bucket)] in training order (computed once,
  by the trainer); bucket (epoch, i) is shuffled with seed path
  (seed, epoch, i). ``bucket_calls(epoch, i)`` yields that bucket's
  (visit, call)s; buckets must be consumed in plan order.
  """

  def __init__(self, plan, graph: Graph, layout: model.RelationLayout, config,
               layout_of, depth: int = 8, local_devices: frozenset[int] | None = None):
    self._plan = list(plan)
    # With several processes, the other devices' chunk counts come from the
    # other processes (each reads only its own devices' cells).
    counts = KeyValueSum() if local_devices is not None and jax.process_count() > 1 else None

    def produce():
      for epoch, index, bucket in self._plan:
        exchange = None if counts is None else functools.partial(counts, f"{epoch}/{index}")
        yield from ((epoch, index, k, call) for k, call in prepare_bucket(
            graph, layout, layout_of(bucket), bucket, config, (config.train.seed, epoch, index),
            local_devices, exchange))
        yield epoch, index, None, None  # end of this bucket

    self._items = Background(produce(), depth=depth)

  def bucket_calls(self, epoch: int, index: int):
    for item_epoch, item_index, k, call in self._items:
      if (item_epoch, item_index) != (epoch, index):
        raise RuntimeError(f"batch stream at epoch {item_epoch} bucket {item_index}, "
                           f"trainer at epoch {epoch} bucket {index}")
      if call is None:
        return
      yield k, call

  def close(self) -> None:
    self._items.close()
