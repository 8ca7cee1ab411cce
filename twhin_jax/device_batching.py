"""Device-side batch preparation: raw bucket edges -> the jitted calls' arrays.

The host path (batching.py) shuffles, places and packs every call's arrays
with numpy; on a GPU that host work, not the step, bounds the trainer. Here
the host only reads: it ships a *slice* of a bucket's raw edges (src, dst,
rel, weight; the bucket whole, or a random set of READ_BLOCK_EDGES-edge runs
of a large one) padded to a power-of-two capacity, and one jitted function
(``prepare_slice``) does the rest on the device:

  1-2. shuffles the edges and groups them by chunk class (keyed by seed,
     epoch, bucket, slice; negatives.chunk_classes, classes numbered so that
     each parameter group's classes are contiguous), by counting (a hash
     permutation and a prefix sum per class) or, with many classes, one
     sort, and pads each class to a whole number of chunks of C;
  3. shuffles the chunks inside each parameter group;
  4. turns every slot into working-table rows, weights and, with
     negatives.logq_correction, log q (negatives.sampling_log_counts's
     equation, counted with a sort and segment sums instead of np.unique).

``call_batch`` (jitted too) then cuts one call's T x S chunks of one group out
of the prepared slice: the host only knows how many chunks each group has
(a bincount of the slice's relations) and which call comes next. Uniform
negatives are drawn inside the step, as on the host path (step.one_step).

Scope: one device (working.num_shards == 1, one process): the ring has one
round and every row of a partition is home. With several devices the trainer
uses the host path (train.Trainer._batch_stream).

Shapes stay static: a slice's capacity is a power of two (at most
``slice_capacity``), so a run compiles ``prepare_slice`` once per capacity it
meets and ``call_batch`` likewise; chunks past a group's end, and the padding
edges of a class's last chunk, carry weight 0 (step.py masks them).

Every random choice derives from (train.seed, epoch, bucket index, slice), so
the same seed gives the same tables and a run resumed at a bucket boundary
continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import collections
import logging
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from twhin_jax import batching
from twhin_jax import bucket_index
from twhin_jax import config as config_lib
from twhin_jax import model
from twhin_jax import negatives
from twhin_jax import sharding as sharding_lib
from twhin_jax import step as step_lib
from twhin_jax.graph import Graph

log = logging.getLogger(__name__)

#: A slice holds at least this many edges' capacity (when the bucket has that
#: many), and at least SLICE_CALLS calls' worth: each slice ends every group
#: with a partly filled call, under 1 / SLICE_CALLS of the slice's steps
#: (at batch 40,000, 32 calls are 20M edges: 16 bytes an edge on the host,
#: about 60 while the device prepares it).
MIN_SLICE_EDGES = 1 << 21
SLICE_CALLS = 32
#: The smallest capacity (tiny buckets share one compiled program).
MIN_CAPACITY = 1 << 10
#: Salt of the preparation keys, so they never coincide with the step's
#: negative-sampling keys (train.Trainer.train_bucket folds seed, epoch, bucket).
_KEY_SALT = 0x5EED_BA7C
#: Up to this many chunk classes a slice's edges are ordered by counting
#: (K prefix sums over the slice), past it by one sort.
COUNT_RANK_CLASSES = 16
#: Slices read ahead of the device by the background thread.
SLICES_AHEAD = 2
#: Prepared slices alive on the device at most: before preparing another, the
#: stream waits for the preparation of the one before the last (the device
#: runs in order, so every call of the slices before that has run too).
#: Dispatch stays a slice ahead; device memory stays bounded whatever the
#: number of slices in a bucket.
PREPARED_IN_FLIGHT = 2

PATHS = config_lib.BATCH_PREPARATIONS


def resolve_path(setting: str, num_shards: int, process_count: int, platform: str) -> str:
  """The batch preparation that runs: "host" or "device".

  "auto" prepares on the device on a GPU or TPU and on the host on CPU
  (where the device is the host's own cores, and the host path is the
  measured default); "device" asks for the device. Either way the device
  path covers one device in one process; otherwise the host path runs.
  """
  if setting not in PATHS:
    raise ValueError(f"train.batch_preparation: {setting!r} not in {PATHS}")
  wanted = setting == "device" or (setting == "auto" and platform in sharding_lib.ACCELERATOR_PLATFORMS)
  if wanted and num_shards == 1 and process_count == 1:
    return "device"
  return "host"


def slice_capacity(config) -> int:
  """Most edges in one slice: a power of two >= max(MIN_SLICE_EDGES,
  SLICE_CALLS calls)."""
  per_call = config.train.batch_size * batching.STEPS_PER_CALL
  return 1 << math.ceil(math.log2(max(MIN_SLICE_EDGES, SLICE_CALLS * per_call)))


def capacity_for(num_edges: int) -> int:
  """The padded length of a slice of ``num_edges`` edges (a power of two)."""
  return max(MIN_CAPACITY, 1 << math.ceil(math.log2(max(num_edges, 1))))


# --------------------------------------------------------------------------
# The graph's relations, as small tables the device indexes.


class Classes(NamedTuple):
  """Chunk classes, numbered so that each parameter group's are contiguous.

  class_of_rel [R]: class of every relation; class_group [K]: the group of
  every class (index into ``groups``); groups: group names, sorted.
  """
  class_of_rel: np.ndarray
  class_group: np.ndarray
  groups: tuple[str, ...]

  @classmethod
  def of(cls, graph: Graph, layout: model.RelationLayout, mixed: bool) -> "Classes":
    raw = negatives.chunk_classes(graph.relations, layout.group, mixed)  # [R]
    groups = tuple(sorted(set(layout.group)))
    group_of_raw = {int(c): groups.index(layout.group[r]) for r, c in enumerate(raw)}
    # Renumber: by (group, raw class), so a group's classes are one run.
    order = sorted(group_of_raw, key=lambda c: (group_of_raw[c], c))
    renumber = {c: i for i, c in enumerate(order)}
    class_of_rel = np.asarray([renumber[int(c)] for c in raw], np.int32)
    class_group = np.asarray([group_of_raw[c] for c in order], np.int32)
    return cls(class_of_rel, class_group, groups)

  @property
  def num_classes(self) -> int:
    return len(self.class_group)


class RelationTables(NamedTuple):
  """Per relation r [R], for one bucket on one device (numpy or device arrays).

  src_lo, src_n: first working-table row and rows of the source partition
  (the range uniform source negatives come from; edge rows are src_lo + src);
  dst_lo, dst_n the same for targets; weight: relation weight; row,
  reverse_row: the relation's rows inside its parameter group;
  uniform_src_logq, uniform_dst_logq: negatives.uniform_log_count of the
  ranges; class_of_rel: chunk class (Classes).
  """
  src_lo: np.ndarray
  src_n: np.ndarray
  dst_lo: np.ndarray
  dst_n: np.ndarray
  weight: np.ndarray
  row: np.ndarray
  reverse_row: np.ndarray
  uniform_src_logq: np.ndarray
  uniform_dst_logq: np.ndarray
  class_of_rel: np.ndarray

  @classmethod
  def of(cls, graph: Graph, layout: model.RelationLayout, working, bucket, classes: Classes,
         config) -> "RelationTables":
    if working.num_shards != 1:
      raise ValueError(f"device batch preparation covers one device, got {working.num_shards}")
    ranges = batching._RelationRanges.of(graph, working, bucket)  # pylint: disable=protected-access
    chunk, uniform = config.negatives.chunk_size, config.negatives.num_uniform
    src_n, dst_n = ranges.src_rows_in[:, 0], ranges.dst_rows_in[:, 0]
    return cls(
        src_lo=ranges.src_off.astype(np.int32), src_n=src_n.astype(np.int32),
        dst_lo=ranges.dst_off.astype(np.int32), dst_n=dst_n.astype(np.int32),
        weight=ranges.weight.astype(np.float32),
        row=np.asarray(layout.row, np.int32), reverse_row=np.asarray(layout.reverse_row, np.int32),
        uniform_src_logq=negatives.uniform_log_count(src_n, chunk, uniform),
        uniform_dst_logq=negatives.uniform_log_count(dst_n, chunk, uniform),
        class_of_rel=classes.class_of_rel)


# --------------------------------------------------------------------------
# Inside jit.


class PreparedSlice(NamedTuple):
  """A slice's chunks on the device, in training order: each group's chunks
  form one run (groups in Classes order), shuffled within it.

  edge [B, C]: index of the slice edge in each slot (-1: padding);
  src, dst [B, C] working-table rows; weight [B, C] (0: padding);
  rel [B, C]: relation of each slot (a padding slot: its chunk's);
  chunk_rel [B]: relation of each chunk's first edge;
  src_logq, dst_logq [B, C] or None (no correction).
  B = chunks the capacity can need plus one call of padding chunks.
  """
  edge: jax.Array
  src: jax.Array
  dst: jax.Array
  weight: jax.Array
  rel: jax.Array
  chunk_rel: jax.Array
  src_logq: jax.Array | None
  dst_logq: jax.Array | None


def buffer_chunks(capacity: int, chunk: int, num_classes: int, per_call: int) -> int:
  """B: every class padded to whole chunks needs at most
  ceil((E + K (C - 1)) / C) chunks; one call more lets every call's chunks be
  a plain slice."""
  return -(-(capacity + num_classes * (chunk - 1)) // chunk) + per_call


def _exclusive_cumsum(x: jax.Array) -> jax.Array:
  return jnp.cumsum(x) - x


def _pair_counts(first: jax.Array, second: jax.Array, real: jax.Array) -> jax.Array:
  """Per edge [E]: how many real edges share its (first, second) pair.

  Sorted by the pair, equal pairs are runs; a run's count is a segment sum
  (a sort and a scatter-add: O(E log E), no E x V table)."""
  size = first.shape[0]
  order = jnp.lexsort((second, first))  # [E] first is the primary key
  a, b = first[order], second[order]
  starts = jnp.concatenate([jnp.ones((1,), bool), (a[1:] != a[:-1]) | (b[1:] != b[:-1])])
  run = jnp.cumsum(starts) - 1  # [E] run id of each sorted edge
  run_count = jax.ops.segment_sum(real[order].astype(jnp.int32), run, num_segments=size)
  return jnp.zeros(size, jnp.int32).at[order].set(run_count[run], unique_indices=True)


def _hash_permutation(key: jax.Array, size: int, rounds: int = 4) -> jax.Array:
  """A random bijection of [0, size), size a power of two, elementwise (no
  sort): ``rounds`` of x -> (a x + b) mod size (a odd: a bijection) then
  x -> x xor (x >> ceil(bits / 2)) (a bijection too, mixing high bits into
  the low ones the multiply leaves linear), with random a, b. Four rounds
  match a uniform permutation on the statistics that matter here (nearby
  edges of the file landing in one chunk: measured on 2^20 edges, 0.19% of
  neighbouring positions come from edges under 1,000 apart, as for
  numpy's permutation; 62.1 distinct 1,024-edge file blocks per 64
  consecutive positions, 62.06 for numpy's)."""
  bits = size.bit_length() - 1
  if size != 1 << bits:
    raise ValueError(f"size {size} is not a power of two")
  params = jax.random.bits(key, (rounds, 2), jnp.uint32)  # [rounds, (a, b)]
  mask, shift = jnp.uint32(size - 1), jnp.uint32((bits + 1) // 2)
  x = jnp.arange(size, dtype=jnp.uint32)
  for r in range(rounds):
    x = (x * (params[r, 0] | jnp.uint32(1)) + params[r, 1]) & mask
    x = x ^ (x >> shift)
  return x.astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("chunk", "num_uniform", "num_classes",
                                             "per_call", "correct", "rank_by"))
def prepare_slice(key: jax.Array, src: jax.Array, dst: jax.Array, rel: jax.Array,
                  weight: jax.Array, num_real: jax.Array, tables: RelationTables,
                  class_group: jax.Array, *, chunk: int, num_uniform: int, num_classes: int,
                  per_call: int, correct: bool, rank_by: str = "auto") -> PreparedSlice:
  """One slice of raw edges [E] (the first ``num_real`` real, the rest
  padding) -> its chunks in training order (PreparedSlice).

  ``src``, ``dst``: offsets inside their partitions; ``rel``: relation
  index; ``class_group`` [K]: group of every chunk class. ``rank_by``: how
  each class's edges get their random order, "count" (a hash permutation and
  K prefix sums), "sort" (one sort), or "auto" (count up to
  COUNT_RANK_CLASSES classes).
  """
  capacity = src.shape[0]
  num_chunks = buffer_chunks(capacity, chunk, num_classes, per_call)
  edge_key, chunk_key = jax.random.split(key)
  index = jnp.arange(capacity, dtype=jnp.int32)
  real = index < num_real  # [E]
  rel = jnp.where(real, rel, 0)
  edge_class = jnp.where(real, tables.class_of_rel[rel], num_classes)  # [E] padding: last

  # 1-2. Each class's edges in a random order, padded to whole chunks: the
  # edge of rank j in class k goes to slot slot_start[k] + j.
  class_count = jax.ops.segment_sum(real.astype(jnp.int32), edge_class,
                                    num_segments=num_classes + 1)[:num_classes]  # [K]
  class_chunks = -(-class_count // chunk)  # [K] ceil(n_k / C)
  slot_start = _exclusive_cumsum(class_chunks) * chunk  # [K] first slot of class k
  if rank_by == "auto":
    rank_by = "count" if num_classes <= COUNT_RANK_CLASSES else "sort"
  if rank_by == "count":
    # Counting: edge i sits at position f(i) of a random order (a keyed
    # bijection, _hash_permutation); its rank in its class is the number of
    # the class's edges at earlier positions (K prefix sums, no sort).
    position = _hash_permutation(edge_key, capacity)  # [E]
    class_at = jnp.full((capacity,), num_classes, jnp.int32).at[position].set(
        edge_class, unique_indices=True)  # [E] class of the edge at each position
    rank_at = jnp.zeros((capacity,), jnp.int32)
    for k in range(num_classes):
      member = class_at == k
      rank_at = jnp.where(member, jnp.cumsum(member, dtype=jnp.int32) - 1, rank_at)
    edge_rank, edge_id = rank_at[position], index  # [E] per edge
  elif rank_by == "sort":
    # Sorting by (class, random 32-bit key): each class's edges are one run
    # in random order (ties, rare, keep file order). On XLA:CPU a 1M-edge
    # jax.random.permutation (three sorts) plus a stable argsort took 1.3 s,
    # this one sort 0.6 s, counting (K = 5) 0.1 s.
    edge_bits = jax.random.bits(edge_key, (capacity,), jnp.uint32)  # [E]
    sorted_class, _, edge_id = jax.lax.sort((edge_class, edge_bits, index), num_keys=2,
                                            is_stable=True)  # [E] edges, class by class
    sorted_start = _exclusive_cumsum(class_count)  # [K] first sorted position of class k
    edge_rank = index - sorted_start[jnp.minimum(sorted_class, num_classes - 1)]  # [E]
  else:
    raise ValueError(f"rank_by={rank_by!r}, not 'auto', 'count' or 'sort'")
  id_class = edge_class[edge_id]  # [E]
  slot = slot_start[jnp.minimum(id_class, num_classes - 1)] + edge_rank  # [E]
  # Padding edges get distinct slots past the end (dropped): every index
  # unique, which XLA's scatter runs fastest (docs/architecture.md, "The step").
  slot = jnp.where(id_class < num_classes, slot, num_chunks * chunk + index)
  edge = jnp.full((num_chunks * chunk,), -1, jnp.int32).at[slot].set(
      edge_id, mode="drop", unique_indices=True)
  edge = edge.reshape(num_chunks, chunk)  # [B, C] class by class, last chunk of each padded

  # 3. Chunks shuffled within their group: a random order, then stably by
  # group. Groups' classes are contiguous, so each group stays one run, at
  # the same place.
  class_end_chunk = jnp.cumsum(class_chunks)  # [K]
  chunk_class = jnp.searchsorted(class_end_chunk, jnp.arange(num_chunks), side="right")  # [B]
  chunk_group = jnp.where(chunk_class < num_classes,
                          class_group[jnp.minimum(chunk_class, num_classes - 1)],
                          jnp.iinfo(jnp.int32).max)  # [B] chunks past the classes: last
  chunk_bits = jax.random.bits(chunk_key, (num_chunks,), jnp.uint32)  # [B]
  _, _, chunk_order = jax.lax.sort(
      (chunk_group.astype(jnp.int32), chunk_bits, jnp.arange(num_chunks, dtype=jnp.int32)),
      num_keys=2, is_stable=True)  # [B] chunks, group by group, shuffled within
  edge = edge[chunk_order]  # [B, C]

  # 4. Rows, weights and relations of every slot.
  is_real = edge >= 0  # [B, C]
  at = jnp.maximum(edge, 0)
  slot_rel = rel[at]  # [B, C]
  chunk_rel = slot_rel[:, 0]  # [B] a class's chunk starts with a real edge
  slot_rel = jnp.where(is_real, slot_rel, chunk_rel[:, None])
  prepared = PreparedSlice(
      edge=edge,
      src=jnp.where(is_real, tables.src_lo[slot_rel] + src[at], 0),
      dst=jnp.where(is_real, tables.dst_lo[slot_rel] + dst[at], 0),
      weight=jnp.where(is_real, weight[at] * tables.weight[slot_rel], 0.0).astype(jnp.float32),
      rel=slot_rel, chunk_rel=chunk_rel, src_logq=None, dst_logq=None)
  if not correct:
    return prepared
  # Log q of each edge's source and target (negatives.sampling_log_counts):
  # among the chunk's C - 1 other edges an entity v appears about
  # (C - 1) c_k(v) / n_k times (c_k(v): v's edges of class k in this slice,
  # n_k: all of them), among U uniform draws from N rows U / N times:
  #     q(v) = (C - 1) c_k(v) / n_k + U / N
  share_of = lambda counts: counts.astype(jnp.float32) / jnp.maximum(
      class_count[jnp.minimum(edge_class, num_classes - 1)], 1).astype(jnp.float32)
  src_share = share_of(_pair_counts(edge_class, src, real))  # [E]
  dst_share = share_of(_pair_counts(edge_class, dst, real))  # [E]
  src_logq = jnp.log((chunk - 1) * src_share + num_uniform / jnp.maximum(
      tables.src_n[rel], 1).astype(jnp.float32))  # [E]
  dst_logq = jnp.log((chunk - 1) * dst_share + num_uniform / jnp.maximum(
      tables.dst_n[rel], 1).astype(jnp.float32))  # [E]
  return prepared._replace(src_logq=jnp.where(is_real, src_logq[at], 0.0),
                           dst_logq=jnp.where(is_real, dst_logq[at], 0.0))


@functools.partial(jax.jit, static_argnames=("steps", "per_step", "mixed"))
def call_batch(prepared: PreparedSlice, tables: RelationTables, start: jax.Array,
               end: jax.Array, pad_rel: jax.Array, step_base: jax.Array, *, steps: int,
               per_step: int, mixed: bool) -> step_lib.StepBatch:
  """One call: chunks [start, start + T S) of the prepared slice, those at or
  past ``end`` (the group's end) all padding with relation ``pad_rel`` (the
  group's first, as on the host path) -> StepBatch [1, T, S, C] (one device),
  step_index = step_base + [0, T)."""
  chunk = prepared.edge.shape[1]
  count = steps * per_step
  take = lambda x: jax.lax.dynamic_slice_in_dim(x, start, count, axis=0)
  live = (start + jnp.arange(count)) < end  # [T*S]
  live_slot = live[:, None] & (take(prepared.edge) >= 0)  # [T*S, C]
  chunk_rel = jnp.where(live, take(prepared.chunk_rel), pad_rel)  # [T*S]
  slot_rel = jnp.where(live[:, None], take(prepared.rel), pad_rel)  # [T*S, C]
  shape3, shape2 = (1, steps, per_step, chunk), (1, steps, per_step)
  rel_rows = slot_rel.reshape(shape3) if mixed else chunk_rel.reshape(shape2)
  per_slot = lambda x, fill: jnp.where(live_slot, take(x), fill).reshape(shape3)
  extra = {}
  if prepared.src_logq is not None:
    extra = dict(src_logq=per_slot(prepared.src_logq, 0.0),
                 dst_logq=per_slot(prepared.dst_logq, 0.0),
                 uniform_src_logq=tables.uniform_src_logq[chunk_rel].reshape(shape2),
                 uniform_dst_logq=tables.uniform_dst_logq[chunk_rel].reshape(shape2))
  return step_lib.StepBatch(
      src=per_slot(prepared.src, 0), dst=per_slot(prepared.dst, 0),
      rel=tables.row[rel_rows], rel_reverse=tables.reverse_row[rel_rows],
      weight=per_slot(prepared.weight, 0.0),
      src_lo=tables.src_lo[chunk_rel].reshape(shape2), src_n=tables.src_n[chunk_rel].reshape(shape2),
      dst_lo=tables.dst_lo[chunk_rel].reshape(shape2), dst_n=tables.dst_n[chunk_rel].reshape(shape2),
      step_index=(step_base + jnp.arange(steps, dtype=jnp.int32))[None, :],
      **extra)


# --------------------------------------------------------------------------
# On the host: reading slices, planning calls.


class HostSlice(NamedTuple):
  """One slice as read from the bucket files, padded to its capacity."""
  number: int  # slice number within the bucket
  src: np.ndarray  # [E] int32
  dst: np.ndarray
  rel: np.ndarray
  weight: np.ndarray  # [E] float32
  num_real: int


def read_slices(edges: dict, seed_path: tuple[int, ...], max_edges: int,
                cell_starts: np.ndarray | None = None):
  """Yields a bucket's HostSlices: the whole bucket when it fits in
  ``max_edges``, else ceil(E / max_edges) slices of nearly equal size, each
  read in file order (the device shuffles). A bucket grouped by cell
  (``cell_starts``, bucket_index.py) splits into slices that take a share of
  every cell (bucket_index.stratified_slices: each a uniform sample, as on
  the host path); an ungrouped one into a seeded split of its
  READ_BLOCK_EDGES-edge runs. Only the slices being read are in memory."""
  num_edges = len(edges["src"])
  if num_edges == 0:
    return
  block = batching.READ_BLOCK_EDGES
  num_runs = -(-num_edges // block)
  num_slices = -(-num_edges // max_edges)
  if num_slices > 1 and cell_starts is not None:
    rng = np.random.default_rng(list(seed_path))
    for number, rows in enumerate(bucket_index.stratified_slices(cell_starts, num_slices, rng)):
      capacity = capacity_for(len(rows))
      out = {}
      for name, dtype in (("src", np.int32), ("dst", np.int32), ("rel", np.int32),
                          ("weight", np.float32)):
        column = np.zeros(capacity, dtype)
        column[:len(rows)] = edges[name][rows]
        out[name] = column
      yield HostSlice(number, out["src"], out["dst"], out["rel"], out["weight"], len(rows))
    return
  if num_slices == 1:
    pieces = [np.arange(num_runs)]
  else:
    runs = np.random.default_rng(list(seed_path)).permutation(num_runs)
    pieces = [np.sort(piece) for piece in np.array_split(runs, num_slices)]
  for number, piece in enumerate(pieces):
    spans = [(run * block, min((run + 1) * block, num_edges)) for run in piece]
    length = sum(b - a for a, b in spans)
    capacity = capacity_for(length)
    out = {}
    for name, dtype in (("src", np.int32), ("dst", np.int32), ("rel", np.int32),
                        ("weight", np.float32)):
      column = np.zeros(capacity, dtype)
      at = 0
      for a, b in _merged(spans):
        column[at:at + b - a] = edges[name][a:b]
        at += b - a
      out[name] = column
    yield HostSlice(number, out["src"], out["dst"], out["rel"], out["weight"], length)


def _merged(spans):
  """Adjacent runs read as one span (a whole bucket is one read)."""
  merged = []
  for a, b in spans:
    if merged and merged[-1][1] == a:
      merged[-1] = (merged[-1][0], b)
    else:
      merged.append((a, b))
  return merged


def plan_calls(rel_count: np.ndarray, classes: Classes, chunk: int, per_call: int,
               rng: np.random.Generator) -> list[tuple[int, int, int]]:
  """The calls of a slice as (group index, first chunk, group end chunk), in
  a seeded random order, from its edges per relation ``rel_count`` [R] (the
  device forms the chunks, the host only needs their number)."""
  class_count = np.bincount(classes.class_of_rel, weights=rel_count,
                            minlength=classes.num_classes).astype(np.int64)  # [K]
  class_chunks = -(-class_count // chunk)  # [K]
  class_start = np.cumsum(class_chunks) - class_chunks
  calls = []
  for group in range(len(classes.groups)):
    members = np.flatnonzero(classes.class_group == group)
    first, count = int(class_start[members[0]]), int(class_chunks[members].sum())
    calls.extend((group, start, first + count) for start in range(first, first + count, per_call))
  return [calls[i] for i in rng.permutation(len(calls))]


class DeviceCall(NamedTuple):
  """A call whose arrays the device cuts from a prepared slice."""
  group: str
  prepared: PreparedSlice
  tables: RelationTables
  start: int
  end: int
  pad_rel: int
  steps: int
  per_step: int
  mixed: bool

  def batch_at(self, step_base: int) -> step_lib.StepBatch:
    """The call's StepBatch [1, T, S, C] on the device, steps numbered from
    ``step_base`` (the bucket's step counter)."""
    return call_batch(self.prepared, self.tables, np.int32(self.start), np.int32(self.end),
                      np.int32(self.pad_rel), np.int32(step_base), steps=self.steps,
                      per_step=self.per_step, mixed=self.mixed)


def slice_key(seed: int, epoch: int, index: int, number: int) -> jax.Array:
  """The key of slice ``number`` of bucket ``index`` of ``epoch``."""
  key = jax.random.fold_in(jax.random.key(seed), _KEY_SALT)
  for value in (epoch, index, number):
    key = jax.random.fold_in(key, value)
  return key


class DeviceBatchStream:
  """batching.BatchStream's interface for the device path: a thread reads
  (and transfers) slices ahead; ``bucket_calls`` prepares each on the device
  (asynchronously dispatched) and yields its (round 0, DeviceCall)s."""

  def __init__(self, plan, graph: Graph, layout: model.RelationLayout, config, layout_of,
               device: jax.Device | None = None):
    self._graph, self._layout, self._config, self._layout_of = graph, layout, config, layout_of
    self._device = device or jax.devices()[0]
    self._classes = Classes.of(graph, layout, bool(config.negatives.mix_relations))
    self._per_step = config.train.batch_size // config.negatives.chunk_size
    self._per_call = self._per_step * batching.STEPS_PER_CALL
    self._max_edges = slice_capacity(config)
    self._class_group = jax.device_put(self._classes.class_group, self._device)
    self._in_flight: collections.deque = collections.deque()  # recent PreparedSlices
    plan = list(plan)
    self._buckets = {(epoch, index): bucket for epoch, index, bucket in plan}
    seed = config.train.seed

    def produce():
      for epoch, index, bucket in plan:
        edges = graph.bucket_edges(*bucket)
        starts = graph.bucket_cells(*bucket) if batching.USE_BUCKET_INDEX else None
        if starts is not None and len(starts) - 1 != graph.cell_grid.num_cells:
          starts = None
        for host in read_slices(edges, (seed, epoch, index), self._max_edges, starts):
          # The host keeps only the counts (its arrays go as soon as they
          # are on the device).
          rel_count = np.bincount(host.rel[:host.num_real], minlength=len(graph.relations))
          arrays = jax.device_put((host.src, host.dst, host.rel, host.weight), self._device)
          yield epoch, index, (host.number, host.num_real, rel_count, arrays)
          del host, arrays
        yield epoch, index, None  # end of this bucket

    self._items = batching.Background(produce(), depth=SLICES_AHEAD)

  def bucket_calls(self, epoch: int, index: int):
    config, classes = self._config, self._classes
    tables = None
    for item_epoch, item_index, item in self._items:
      if (item_epoch, item_index) != (epoch, index):
        raise RuntimeError(f"batch stream at epoch {item_epoch} bucket {item_index}, "
                           f"trainer at epoch {epoch} bucket {index}")
      if item is None:
        return
      number, num_real, rel_count, (src, dst, rel, weight) = item
      if tables is None:
        bucket = self._bucket_of(epoch, index)
        tables = jax.device_put(RelationTables.of(
            self._graph, self._layout, self._layout_of(bucket), bucket, classes, config),
            self._device)
      while len(self._in_flight) >= PREPARED_IN_FLIGHT:
        self._in_flight.popleft().edge.block_until_ready()
      prepared = prepare_slice(
          slice_key(config.train.seed, epoch, index, number), src, dst, rel, weight,
          np.int32(num_real), tables, self._class_group,
          chunk=config.negatives.chunk_size, num_uniform=config.negatives.num_uniform,
          num_classes=classes.num_classes, per_call=self._per_call,
          correct=bool(config.negatives.logq_correction))
      self._in_flight.append(prepared)
      del src, dst, rel, weight, item  # the prepared slice holds what the calls need
      rng = np.random.default_rng([config.train.seed, epoch, index, number])
      for group, start, end in plan_calls(rel_count, classes, config.negatives.chunk_size,
                                          self._per_call, rng):
        name = classes.groups[group]
        yield 0, DeviceCall(name, prepared, tables, start, end, self._layout.groups[name][0],
                            batching.STEPS_PER_CALL, self._per_step,
                            bool(config.negatives.mix_relations))

  def _bucket_of(self, epoch: int, index: int):
    return self._buckets[(epoch, index)]

  def close(self) -> None:
    self._items.close()


def open_stream(plan, graph: Graph, layout: model.RelationLayout, config, layout_of,
                mesh: jax.sharding.Mesh):
  """The prepared calls of ``plan``: formed on the host (batching.BatchStream)
  or on the device (DeviceBatchStream), as train.batch_preparation resolves
  for this mesh (resolve_path). With several processes the host path packs
  only this process's devices' sub-buckets."""
  first = mesh.devices.flat[0]
  setting = config.train.batch_preparation
  path = resolve_path(setting, mesh.devices.size, jax.process_count(), first.platform)
  log.info("batch preparation: %s (train.batch_preparation=%s, %d device(s), %s)", path,
           setting, mesh.devices.size, first.platform)
  if path == "device":
    return DeviceBatchStream(plan, graph, layout, config, layout_of, first)
  local = None
  if jax.process_count() > 1:
    local = frozenset(g for g, device in enumerate(mesh.devices.flat)
                      if device.process_index == jax.process_index())
  return batching.BatchStream(plan, graph, layout, config, layout_of, local_devices=local)
