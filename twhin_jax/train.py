"""The training loop: bucket schedule over TensorStore tables, jitted steps.

``train(config, workdir)`` imports the graph when needed, then for every epoch
visits the P x P buckets in the configured order. For a bucket only the
partitions it touches are in memory, concatenated into one *working table* per
embedding dimension; the jitted step (step.py) trains on it, and partitions no
longer needed are written back to TensorStore while the next ones load in a
background thread. Host-side batch preparation also runs in a thread, so the
device is never waiting on numpy.

Resume order (it matters): read the latest checkpoint's meta, open the tables
on its committed slots, restore relation state, then continue at the bucket
cursor. Every random choice derives from (seed, epoch, bucket index, step), so
a resumed run produces the same numbers as an uninterrupted one.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import os
import queue
import threading
import time
import uuid

import jax
import numpy as np
from tqdm.auto import tqdm

from twhin_jax import checkpoint as checkpoint_lib
from twhin_jax import config as config_lib
from twhin_jax import model
from twhin_jax import optim
from twhin_jax import reporting
from twhin_jax import schedule
from twhin_jax import sharding as sharding_lib
from twhin_jax import step as step_lib
from twhin_jax import storage
from twhin_jax.graph import Graph

GRAPH_DIR = "graph"
TABLES_DIR = "tables"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
#: Steps per jitted call (lax.scan length): amortises dispatch (measured ~2x
#: faster than one step per call on 2 CPU cores).
STEPS_PER_CALL = 16
#: Buckets larger than this many edges are prepared in slices, in parallel
#: threads (one device; see prepare_bucket).
SLICE_EDGES = 2_000_000
PREP_THREADS = min(8, os.cpu_count() or 1)
#: Config fields that may change when an existing run is resumed.
RESUMABLE_CHANGES = ("train.epochs", "train.eval_every_epochs", "eval.")


# --------------------------------------------------------------------------
# Working tables: which partitions are resident and where their rows are.


def bucket_blocks(graph: Graph, bucket: tuple[int, int]) -> list[storage.Block]:
  """The partitions a bucket needs, in a deterministic order."""
  needed = set()
  for rel in graph.relations:
    src = graph.entities[rel.source]
    dst = graph.entities[rel.target]
    needed.add((rel.source, bucket[0] if src.num_partitions > 1 else 0))
    needed.add((rel.target, bucket[1] if dst.num_partitions > 1 else 0))
  return sorted(needed)


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


def layout_for(graph: Graph, dims: dict[str, int], blocks: list[storage.Block],
               num_shards: int, sub_rows: dict[str, int],
               capacity: dict[int, int]) -> sharding_lib.WorkingLayout:
  by_dim: dict[int, list[storage.Block]] = {}
  offsets, block_sub, block_rows = {}, {}, {}
  for block in blocks:
    dim = dims[block[0]]
    members = by_dim.setdefault(dim, [])
    offsets[block] = sum(sub_rows[t] for t, _ in members)
    block_sub[block] = sub_rows[block[0]]
    block_rows[block] = graph.entities[block[0]].partition_rows(block[1])
    members.append(block)
  return sharding_lib.WorkingLayout(num_shards, by_dim, offsets, block_sub, block_rows, capacity)


# --------------------------------------------------------------------------
# Host-side batch preparation.


@dataclasses.dataclass
class PreparedCall:
  group: str
  batch: step_lib.StepBatch  # numpy arrays [G, T, S, C] etc.


def prepare_bucket(graph: Graph, layout: model.RelationLayout,
                   working: sharding_lib.WorkingLayout, bucket: tuple[int, int], config,
                   seed_path: tuple[int, ...], dims: dict[str, int]):
  """Yields (round, call) for the jitted calls of one bucket, round by round.

  Edges are shuffled (seeded by ``seed_path``) and split into G x G
  sub-buckets by the sub-partitions of their endpoints (sharding.py); round k
  gives device g the sub-bucket (g, (g + k) mod G). Within a device's
  sub-bucket the edges are grouped by relation (or by chunk class, with
  negatives.mix_relations) into chunks of C (the last chunk of each padded
  with weight-0 edges), chunks of one relation
  group (operator, dim) are shuffled and packed S to a step and T steps to a
  call. All devices run the same sequence of calls (one SPMD program), so a
  device with fewer chunks of a group than another gets all-padding calls.
  Every call's arrays carry a leading device axis: [G, T, S, C].
  """
  rng = np.random.default_rng(list(seed_path))
  edges = graph.bucket_edges(*bucket)
  num_edges = len(edges["src"])
  if num_edges == 0:
    return
  order = rng.permutation(num_edges)
  if working.num_shards > 1 or num_edges <= SLICE_EDGES:
    yield from _bucket_calls(graph, layout, working, bucket, config, edges, order, rng)
    return
  # A large bucket on one device: its shuffled order splits into slices
  # (each a uniform random subset of the edges, like a smaller bucket),
  # prepared in parallel threads (numpy releases the GIL) and trained one
  # after another. With several devices the rounds must stay in order, and
  # the G x G sub-buckets already keep the pieces small.
  slices = np.array_split(order, -(-num_edges // SLICE_EDGES))
  seeds = rng.integers(2 ** 63, size=len(slices))
  workers = max(1, min(PREP_THREADS, len(slices)))
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    pending = collections.deque()
    for piece, seed in zip(slices, seeds):
      pending.append(pool.submit(lambda piece=piece, seed=seed: list(_bucket_calls(
          graph, layout, working, bucket, config, edges, piece, np.random.default_rng(seed)))))
      if len(pending) >= workers:
        yield from pending.popleft().result()
    while pending:
      yield from pending.popleft().result()


def _bucket_calls(graph: Graph, layout: model.RelationLayout,
                  working: sharding_lib.WorkingLayout, bucket: tuple[int, int], config, edges,
                  order: np.ndarray, rng: np.random.Generator):
  """prepare_bucket's work on the edges ``order`` selects, in that order."""
  chunk = config.negatives.chunk_size
  num_uniform = config.negatives.num_uniform
  per_step = config.train.batch_size // chunk
  per_call = per_step * STEPS_PER_CALL
  shards = working.num_shards
  rel = np.asarray(edges["rel"])[order].astype(np.int64)
  src = np.asarray(edges["src"])[order].astype(np.int64)
  dst = np.asarray(edges["dst"])[order].astype(np.int64)
  weight = np.asarray(edges["weight"], np.float32)[order]

  # Per relation: shard-row offset and sub-partition size of its source and
  # target partitions, rows of every sub-partition (uniform negative ranges).
  num_rel = len(graph.relations)
  src_off, dst_off = np.zeros(num_rel, np.int64), np.zeros(num_rel, np.int64)
  src_sub, dst_sub = np.ones(num_rel, np.int64), np.ones(num_rel, np.int64)
  src_rows_in = np.zeros((num_rel, shards), np.int64)  # [R, G]
  dst_rows_in = np.zeros((num_rel, shards), np.int64)  # [R, G]
  rel_weight = np.zeros(num_rel, np.float32)
  for r, info in enumerate(graph.relations):
    src_block = (info.source, bucket[0] if graph.entities[info.source].num_partitions > 1 else 0)
    dst_block = (info.target, bucket[1] if graph.entities[info.target].num_partitions > 1 else 0)
    src_off[r], dst_off[r] = working.offsets[src_block], working.offsets[dst_block]
    src_sub[r], dst_sub[r] = working.sub_rows[src_block], working.sub_rows[dst_block]
    src_rows_in[r] = [working.rows_in_shard(src_block, g) for g in range(shards)]
    dst_rows_in[r] = [working.rows_in_shard(dst_block, g) for g in range(shards)]
    rel_weight[r] = info.weight

  src_shard = src // src_sub[rel]  # [E] device that owns the source row
  dst_shard = dst // dst_sub[rel]  # [E] device that owns the target row
  src_row = src_off[rel] + src - src_shard * src_sub[rel]  # [E] row inside that shard
  dst_row = dst_off[rel] + dst - dst_shard * dst_sub[rel]  # [E]
  # Chunk classes: edges of one class share chunks (and so batch negatives).
  # One relation per class, or, with negatives.mix_relations, every relation
  # of one parameter group between the same two entity types (PBG's dynamic
  # relations): a chunk then mixes relations and its batch negatives follow
  # the types' overall degrees, not one relation's few popular answers.
  if config.negatives.mix_relations:
    keys = [(layout.group[r], info.source, info.target) for r, info in enumerate(graph.relations)]
    class_of = np.asarray([sorted(set(keys)).index(k) for k in keys], np.int64)
  else:
    class_of = np.arange(num_rel, dtype=np.int64)
  num_classes = int(class_of.max()) + 1
  class_group = {int(c): layout.group[r] for r, c in enumerate(class_of)}  # one group per class
  edge_class = class_of[rel]  # [E]
  correct = bool(config.negatives.logq_correction)
  if correct:
    src_logq, dst_logq = sampling_log_counts(
        edge_class, src, dst, np.bincount(edge_class, minlength=num_classes),
        src_rows_in[rel, src_shard], dst_rows_in[rel, dst_shard], chunk, num_uniform)

  # One stable sort groups the shuffled edges by (round, device, chunk class).
  round_of = (dst_shard - src_shard) % shards
  cell = (round_of * shards + src_shard) * num_classes + edge_class
  if shards * shards * num_classes < 2 ** 15:
    cell = cell.astype(np.int16)  # numpy's stable sort of 16-bit keys is a radix sort: O(E)
  by_cell = np.argsort(cell, kind="stable")
  starts = np.concatenate([[0], np.cumsum(np.bincount(cell, minlength=shards * shards * num_classes))])
  mixed = bool(config.negatives.mix_relations)
  row_in_group = np.asarray(layout.row, np.int32)
  reverse_row_in_group = np.asarray(layout.reverse_row, np.int32)
  full = STEPS_PER_CALL * per_step
  shape3 = (STEPS_PER_CALL, per_step, chunk)
  shape2 = (STEPS_PER_CALL, per_step)

  def device_call(call_chunks: np.ndarray, group: str, g: int, j: int) -> step_lib.StepBatch:
    """One device's T steps from chunks of edge indices (-1 = padding)."""
    if len(call_chunks) < full:
      call_chunks = np.concatenate(
          [call_chunks, np.full((full - len(call_chunks), chunk), -1, np.int64)])
    is_real = call_chunks >= 0  # [T*S, C]
    safe = np.where(is_real, call_chunks, 0)
    # A chunk that is all padding takes the group's first relation.
    chunk_rel = np.where(is_real.any(axis=1), rel[safe[:, 0]],
                         layout.groups[group][0]).astype(np.int64)  # [T*S]
    src_n, dst_n = src_rows_in[chunk_rel, g], dst_rows_in[chunk_rel, j]  # [T*S]
    edge_rel = np.where(is_real, rel[safe], chunk_rel[:, None])  # [T*S, C]
    edge_weight = np.where(is_real, weight[safe] * rel_weight[edge_rel], 0.0)
    # Relation rows per chunk [T, S], or per edge [T, S, C] in mixed chunks.
    rel_rows = edge_rel.reshape(shape3) if mixed else chunk_rel.reshape(shape2)
    extra = {}
    if correct:
      extra = dict(
          src_logq=np.where(is_real, src_logq[safe], 0.0).reshape(shape3).astype(np.float32),
          dst_logq=np.where(is_real, dst_logq[safe], 0.0).reshape(shape3).astype(np.float32),
          uniform_src_logq=uniform_log_count(src_n, chunk, num_uniform).reshape(shape2),
          uniform_dst_logq=uniform_log_count(dst_n, chunk, num_uniform).reshape(shape2))
    return step_lib.StepBatch(
        src=np.where(is_real, src_row[safe], 0).reshape(shape3).astype(np.int32),
        dst=np.where(is_real, dst_row[safe], 0).reshape(shape3).astype(np.int32),
        rel=row_in_group[rel_rows],
        rel_reverse=reverse_row_in_group[rel_rows],
        weight=edge_weight.reshape(shape3).astype(np.float32),
        src_lo=src_off[chunk_rel].reshape(shape2).astype(np.int32),
        src_n=src_n.reshape(shape2).astype(np.int32),
        dst_lo=dst_off[chunk_rel].reshape(shape2).astype(np.int32),
        dst_n=dst_n.reshape(shape2).astype(np.int32),
        step_index=np.zeros(STEPS_PER_CALL, np.int32),  # set by the consumer
        **extra)

  for k in range(shards):
    device_chunks: list[dict[str, np.ndarray]] = []
    for g in range(shards):
      lists: dict[str, list[np.ndarray]] = {}
      for c in range(num_classes):
        at = (k * shards + g) * num_classes + c
        idx = by_cell[starts[at]:starts[at + 1]]
        if len(idx) == 0:
          continue
        padded = -(-len(idx) // chunk) * chunk
        idx = np.concatenate([idx, np.full(padded - len(idx), -1, np.int64)]).reshape(-1, chunk)
        lists.setdefault(class_group[c], []).append(idx)
      groups = {}
      for group in sorted(lists):
        chunks = np.concatenate(lists[group])  # [num_chunks, C] edge indices, -1 = pad
        groups[group] = chunks[rng.permutation(len(chunks))]
      device_chunks.append(groups)
    calls = []
    for group in sorted(set().union(*device_chunks)):
      most = max(len(groups.get(group, ())) for groups in device_chunks)
      calls.extend((group, start) for start in range(0, most, per_call))
    empty = np.zeros((0, chunk), np.int64)
    for position in rng.permutation(len(calls)):
      group, start = calls[position]
      per_device = [device_call(device_chunks[g].get(group, empty)[start:start + per_call],
                                group, g, (g + k) % shards) for g in range(shards)]
      yield k, PreparedCall(group, jax.tree_util.tree_map(lambda *xs: np.stack(xs), *per_device))


def sampling_log_counts(rel, src, dst, rel_counts, src_sizes, dst_sizes, chunk: int,
                        num_uniform: int):
  """Per-edge log q of its source and of its target (see step.StepBatch).

  A chunk of C edges of relation r (or chunk class r, in mixed chunks) offers
  each edge the other C - 1 edges' entities as negatives, so entity v appears
  there about (C - 1) c_r(v) / n_r times (c_r(v): v's edges of r in this
  bucket, n_r: all of them),
  and among U uniform draws from a (sub-)partition of N rows U / N times:

      q(v) = (C - 1) c_r(v) / n_r + U / N

  ``src_sizes``, ``dst_sizes``: N of each edge's source / target range [E].
  """
  def per_edge(entity, sizes):
    key = rel.astype(np.int64) * (int(entity.max(initial=0)) + 1) + entity
    _, inverse, key_counts = np.unique(key, return_inverse=True, return_counts=True)
    count = key_counts[inverse].astype(np.float64)
    share = count / np.maximum(rel_counts[rel], 1)
    return np.log((chunk - 1) * share + num_uniform / np.maximum(sizes, 1))

  return per_edge(src, src_sizes), per_edge(dst, dst_sizes)


def uniform_log_count(sizes: np.ndarray, chunk: int, num_uniform: int) -> np.ndarray:
  """log q of a uniform draw from N = ``sizes`` rows: U / N plus the batch
  term of an average entity, (C - 1) / N."""
  return np.log((max(num_uniform, 1) + chunk - 1) / np.maximum(sizes, 1)).astype(np.float32)


class _Background:
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


# --------------------------------------------------------------------------
# The trainer.


def relation_state(layout: model.RelationLayout, relation_lr: float, params=None) -> dict:
  """{"params", "opt"} of every relation group: ``params`` (default the
  layout's initial values) and a fresh Adagrad state, as numpy arrays."""
  if params is None:
    params = layout.init_params()
  params = {g: np.asarray(p) for g, p in params.items()}
  tx = optim.relation_adagrad(relation_lr)
  return {"params": params, "opt": {g: tx.init(p) for g, p in params.items()}}


def abstract_relation_state(layout: model.RelationLayout, relation_lr: float, sharding=None):
  """Shapes and dtypes of relation_state (what an Orbax restore fills in)."""
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=sharding),
      relation_state(layout, relation_lr))


def _sync(name: str) -> None:
  """A barrier across processes (a no-op in a single process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def _broadcast_json(value):
  """The primary process's value of a JSON-able object, on every process."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils
  data = np.frombuffer(json.dumps(value).encode(), np.uint8)
  size = int(multihost_utils.broadcast_one_to_all(np.int32(len(data))))
  padded = np.zeros(size, np.uint8)
  padded[:min(size, len(data))] = data[:size]
  return json.loads(bytes(multihost_utils.broadcast_one_to_all(padded)).decode())


def load_run_config(workdir: str):
  with open(os.path.join(workdir, CONFIG_FILE)) as f:
    return config_lib.from_json_dict(json.load(f))


def _config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
  diffs = []
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key), new.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      diffs.extend(_config_differences(a, b, f"{prefix}{key}."))
    elif a != b:
      diffs.append(f"{prefix}{key}")
  return diffs


def prepare_graph(config, workdir: str, progress: bool = True) -> Graph:
  """The run's imported graph, importing (or generating) it on first use."""
  graph_dir = os.path.join(workdir, GRAPH_DIR)
  if not os.path.exists(os.path.join(graph_dir, "manifest.json")):
    from twhin_jax import importer  # heavy (pyarrow); only when importing
    files = None
    if config.data.generator:
      from twhin_jax import generate
      generator = getattr(generate, config.data.generator)
      files = generator(os.path.join(workdir, "generated"), **dict(config.data.generator_args))
    importer.import_graph(config, graph_dir, files=files, progress=progress)
  graph = Graph(graph_dir)
  declared = {r["name"]: (r["source"], r["target"]) for r in config.relations}
  imported = {r.name: (r.source, r.target) for r in graph.relations}
  if declared != imported:
    raise ValueError(f"{graph_dir}: imported relations {imported} differ from the config's "
                     f"{declared}; use a fresh workdir")
  return graph


class Trainer:
  """Holds the state of one run: graph, tables, relation state, cursor.

  With several processes (``jax.distributed``; see distributed.py) every
  process runs this same loop in lockstep: process 0 imports the graph and
  creates the tables, all read and write the same TensorStore, each process
  only the rows of its own devices' sub-partitions, and Orbax writes the
  checkpoint once for all.
  """

  def __init__(self, config, workdir: str, progress: bool = True):
    config_lib.validate(config)
    os.makedirs(workdir, exist_ok=True)
    self.workdir = workdir
    self.primary = jax.process_index() == 0
    self.progress = progress and self.primary
    self.mesh = sharding_lib.make_mesh(config.mesh.num_devices)
    self.num_shards = self.mesh.size
    self.local_shards = [g for g, device in enumerate(self.mesh.devices.flat)
                         if device.process_index == jax.process_index()]
    self.checkpointer = checkpoint_lib.Checkpointer(workdir)
    resuming = self.checkpointer.latest_step() is not None
    config_path = os.path.join(workdir, CONFIG_FILE)
    if resuming and os.path.exists(config_path):
      stored = config_lib.to_json_dict(load_run_config(workdir))
      diffs = [d for d in _config_differences(stored, config_lib.to_json_dict(config))
               if not d.startswith(RESUMABLE_CHANGES)]
      if diffs:
        raise ValueError(f"{workdir} holds a run with a different config ({', '.join(diffs)}); "
                         "use a fresh --workdir or the same config")
    self.config = config
    if self.primary:
      with open(config_path, "w") as f:
        json.dump(config_lib.to_json_dict(config), f, indent=1, sort_keys=True)
      self.graph = prepare_graph(config, workdir, self.progress)
    _sync("graph imported")
    if not self.primary:
      self.graph = prepare_graph(config, workdir, progress=False)
    self.layout = model.RelationLayout.from_config(config)
    self.dims = {t: config_lib.entity_dim(config, t) for t in self.graph.entities}
    tables_root = os.path.join(workdir, TABLES_DIR)

    if resuming:
      meta = self.checkpointer.restore_meta()
      self.tables = self._open_tables(tables_root, create=False)
      self.slots = storage.SlotMap.from_json(meta["slots"])
      self.cursor = dict(meta["cursor"])
      self.total_steps = int(meta["total_steps"])
      self.lineage = meta["lineage"]
      self.history = meta.get("history", [])
      self._rel_state = self.checkpointer.restore_state(self._abstract_rel_state())
    else:
      warm_summary = None
      if self.primary:
        self.tables = self._open_tables(tables_root, create=True)
        bar = tqdm(total=len(self.tables.blocks()), desc="init tables", disable=not self.progress)
        self.tables.initialize(config.train.seed, config.model.init_scale, bar)
        bar.close()
        if config.warm_start.parent:
          from twhin_jax import versions
          warm_summary = versions.warm_start(self, config.warm_start.parent)
      _sync("tables created")
      if not self.primary:
        self.tables = self._open_tables(tables_root, create=False)
      self.slots = storage.SlotMap.fresh(self.tables.blocks())
      self.cursor = {"epoch": 0, "bucket": 0}
      self.total_steps = 0
      self.history = []
      self.lineage = {
          "version_id": uuid.uuid4().hex[:12],
          "parent_id": warm_summary["parent_version"] if warm_summary else None,
          "parent_dir": os.path.abspath(config.warm_start.parent) if config.warm_start.parent
                        else None,
          "graph_manifest_hash": self.graph.manifest_hash,
          "config_hash": config_lib.config_hash(config),
          "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
      }
      self._rel_state = self._initial_rel_state()
    # Hosts must agree on the version id (the primary's uuid wins).
    self.lineage = _broadcast_json(self.lineage)

    # Rows per sub-partition: aligned to the storage chunks when several hosts
    # write the same partition (never two hosts in one chunk).
    align = jax.process_count() > 1
    self.sub_rows = {t: sharding_lib.sub_partition_rows(
        info.partition_size, self.num_shards, self.tables.chunk[t] if align else 1)
        for t, info in self.graph.entities.items()}
    self.capacity = shard_capacity(self.graph, self.dims, self.sub_rows)
    # L2-to-previous anchors (versions.py), loaded beside the working tables.
    self.anchor_strength = float(config.warm_start.l2_to_previous)
    self.anchors = None
    if self.anchor_strength > 0:
      from twhin_jax import versions
      self.anchors = storage.TableStore(os.path.join(workdir, versions.ANCHORS_DIR),
                                        self.graph.entities, self.dims,
                                        config.storage.zarr_format, create=False,
                                        sub_partitions=self.num_shards, num_slots=1)
    self.anchor_dev: dict[int, jax.Array] = {}
    self.anchor_w_dev: dict[int, jax.Array] = {}
    # Resident partitions: sharded working tables per dim and their layout.
    self.resident: sharding_lib.WorkingLayout | None = None
    self.tables_dev: dict[int, jax.Array] = {}
    self.acc_dev: dict[int, jax.Array] = {}
    self.pending_writes: dict[storage.Block, list] = {}
    self.io_pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)
    self.metrics_path = os.path.join(workdir, METRICS_FILE)
    if jax.process_count() > 1:
      print(f"[twhin] process {jax.process_index()}/{jax.process_count()}: "
            f"devices {[d.id for d in jax.local_devices()]} of a {self.num_shards}-device mesh",
            flush=True)

  def _open_tables(self, root: str, create: bool) -> storage.TableStore:
    return storage.TableStore(root, self.graph.entities, self.dims,
                              self.config.storage.zarr_format, create=create,
                              sub_partitions=self.num_shards)

  # -- relation state -------------------------------------------------------
  # Replicated over the mesh while training; `rel_state` gives host copies.

  def _initial_rel_state(self):
    params = None
    if self.config.warm_start.parent:  # aligned by name from the parent (versions.py)
      from twhin_jax import versions
      params = versions.warm_relation_params(self.workdir)
    state = relation_state(self.layout, self.config.train.relation_lr, params)
    return jax.tree_util.tree_map(
        lambda x: sharding_lib.global_array(np.asarray(x), self.mesh), state)

  def _abstract_rel_state(self):
    return abstract_relation_state(self.layout, self.config.train.relation_lr,
                                   sharding_lib.replicated(self.mesh))

  @property
  def rel_state(self) -> dict:
    """Relation parameters and optimizer state as host numpy arrays."""
    return jax.tree_util.tree_map(sharding_lib.host_copy, self._rel_state)

  # -- partitions -------------------------------------------------------------

  def _local_span(self, entity_type: str, partition: int) -> tuple[int, int]:
    """Rows [lo, hi) of a partition that this process's devices hold."""
    sub = self.sub_rows[entity_type]
    rows = self.graph.entities[entity_type].partition_rows(partition)
    lo = min(self.local_shards) * sub
    return min(lo, rows), min((max(self.local_shards) + 1) * sub, rows)

  def _read_block(self, block, store: storage.TableStore | None = None
                  ) -> dict[int, tuple[np.ndarray, np.ndarray]]:
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

  def _host_shards(self) -> dict[int, dict[int, tuple[np.ndarray, np.ndarray]]]:
    """dim -> shard -> (table, acc) numpy views of this process's shards."""
    out = {}
    for dim, table in self.tables_dev.items():
      accs = {s.index[0].start or 0: s.data for s in self.acc_dev[dim].addressable_shards}
      out[dim] = {}
      for shard in table.addressable_shards:
        start = shard.index[0].start or 0
        out[dim][start // self.capacity[dim]] = (np.asarray(shard.data), np.asarray(accs[start]))
    return out

  def _extract(self, block, host_shards) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    dim = self.dims[block[0]]
    start = self.resident.offsets[block]
    pieces = {}
    for g, (table, acc) in host_shards[dim].items():
      rows = self.resident.rows_in_shard(block, g)
      pieces[g] = (table[start:start + rows].copy(), acc[start:start + rows].copy())
    return pieces

  def _write_back(self, block, pieces) -> None:
    slot = self.slots.write_target(block)
    self.slots.current[block] = slot
    sub = self.sub_rows[block[0]]
    futures = []
    for g, (table, acc) in pieces.items():
      if len(table):
        futures.extend(self.tables.write_rows(block, slot, g * sub, table, acc))
    self.pending_writes[block] = futures

  def _load_bucket(self, bucket, prefetched: dict) -> None:
    """Makes the bucket's partitions resident, writing back the others."""
    needed = bucket_blocks(self.graph, bucket)
    if self.resident is not None and sorted(self.resident.offsets) == needed:
      return
    kept = {}
    if self.resident is not None:
      host_shards = self._host_shards()
      for block in list(self.resident.offsets):
        pieces = self._extract(block, host_shards)
        if block in needed:
          kept[block] = pieces
        else:
          self._write_back(block, pieces)
      # Every row now lives in a host copy: drop the old working tables before
      # the new ones are built (peak memory is counted in partitions).
      del host_shards
      self.tables_dev, self.acc_dev, self.anchor_dev, self.anchor_w_dev = {}, {}, {}, {}
    new_layout = layout_for(self.graph, self.dims, needed, self.num_shards, self.sub_rows,
                            self.capacity)
    pieces = {}
    for block in needed:
      if block in kept:
        pieces[block] = kept[block]
      elif block in prefetched:
        pieces[block] = prefetched.pop(block).result()
      else:
        pieces[block] = self._read_block(block)

    def shard_of(dim, g, column):
      """Shard g of a dim's working table (column 0) or accumulators (1)."""
      rows = self.capacity[dim]
      out = np.zeros((rows, dim) if column == 0 else (rows,), np.float32)
      for block in new_layout.blocks[dim]:
        part = pieces[block][g][column]
        start = new_layout.offsets[block]
        out[start:start + len(part)] = part
      return out

    rows_sharding = sharding_lib.row_sharding(self.mesh)

    def upload(dim, column):
      size = self.num_shards * self.capacity[dim]
      return jax.make_array_from_callback(
          (size, dim) if column == 0 else (size,), rows_sharding,
          lambda index: shard_of(dim, (index[0].start or 0) // self.capacity[dim], column))

    self.tables_dev = {dim: upload(dim, 0) for dim in new_layout.blocks}
    self.acc_dev = {dim: upload(dim, 1) for dim in new_layout.blocks}
    if self.anchors is not None:
      # The previous version's rows in the same layout (static: never written).
      pieces = {block: self._read_block(block, self.anchors) for block in needed}
      self.anchor_dev = {dim: upload(dim, 0) for dim in new_layout.blocks}
      self.anchor_w_dev = {dim: upload(dim, 1) for dim in new_layout.blocks}
    self.resident = new_layout

  def sharding_report(self) -> dict[str, str]:
    """'shape dtype PartitionSpec' of every array the training step touches:
    working tables and accumulators per dim, the ring's visiting copies and
    snapshots, relation parameters and optimizer state (pinned by a golden
    file in tests/test_sharded.py)."""
    start = sharding_lib.ring_ops(self.mesh)[0]
    ring = {dim: dict(zip(("visiting", "visiting_acc", "snapshot", "snapshot_acc"),
                          start(self.tables_dev[dim], self.acc_dev[dim])))
            for dim in self.tables_dev}
    return sharding_lib.describe({"tables": self.tables_dev, "adagrad": self.acc_dev,
                                  "ring": ring, "relations": self._rel_state})

  def _prefetch(self, bucket) -> dict:
    """Starts loading the partitions of ``bucket`` that are not resident."""
    resident = set(self.resident.offsets) if self.resident else set()
    # Partitions that the switch will evict are written back first; reading
    # them here would race with that write, so leave them to _load_bucket.
    return {block: self.io_pool.submit(self._read_block, block)
            for block in bucket_blocks(self.graph, bucket)
            if block not in resident and block not in self.pending_writes}

  def flush(self) -> None:
    """Writes every resident partition back and waits for all writes (of all hosts)."""
    if self.resident is not None:
      host_shards = self._host_shards()
      for block in list(self.resident.offsets):
        self._write_back(block, self._extract(block, host_shards))
    for block in list(self.pending_writes):
      for future in self.pending_writes.pop(block):
        future.result()
    _sync("tables flushed")

  def embeddings(self) -> dict[str, np.ndarray]:
    """Full tables of every type (current values), for evaluation and export."""
    self.flush()
    return {t: self.tables.read_type(t, self.slots) for t in self.graph.entities}

  def save_checkpoint(self) -> None:
    self.flush()
    meta = {
        "cursor": self.cursor,
        "total_steps": self.total_steps,
        "seed": self.config.train.seed,
        "slots": {f"{t}/{p}": s for (t, p), s in self.slots.current.items()},
        "config": config_lib.to_json_dict(self.config),
        "lineage": self.lineage,
        "history": self.history,
        "mesh": {"devices": self.num_shards, "processes": jax.process_count()},
    }
    step = self.cursor["epoch"] * 1_000_000 + self.cursor["bucket"]
    self.checkpointer.save(step, self._rel_state, meta)
    self.slots.commit()

  # -- the loop ---------------------------------------------------------------

  def _log(self, record: dict) -> None:
    if self.primary:
      with open(self.metrics_path, "a") as f:
        f.write(json.dumps(record) + "\n")

  def _step_fn(self, group: str, visiting: bool):
    config = self.config
    operator = group.split(":")[0]
    return step_lib.make_train_steps(
        operator, config.model.comparator, config.train.loss, float(config.train.margin),
        float(config.train.lr), float(config.train.relation_lr), config.negatives.num_uniform,
        bool(config.model.reciprocal), float(config.model.regularization),
        mesh=self.mesh, visiting=visiting, l2_to_previous=self.anchor_strength,
        matmul_precision=config.model.get("matmul_precision", "auto"))

  def _prepared_calls(self, epoch: int, index: int):
    """(epoch, bucket index, round, call) from this bucket to the end of
    training, then a (epoch, index, None, None) marker after each bucket.

    Runs ahead in a background thread, across bucket and epoch boundaries,
    so the next bucket's shuffle and packing overlap this bucket's training.
    """
    config = self.config
    grid = self.graph.bucket_grid
    while epoch < config.train.epochs:
      order = schedule.bucket_order(config.train.bucket_order, grid, config.train.seed, epoch)
      for i in range(index, len(order)):
        working = layout_for(self.graph, self.dims, bucket_blocks(self.graph, order[i]),
                             self.num_shards, self.sub_rows, self.capacity)
        for k, call in prepare_bucket(self.graph, self.layout, working, order[i], config,
                                      (config.train.seed, epoch, i), self.dims):
          yield epoch, i, k, call
        yield epoch, i, None, None
      epoch, index = epoch + 1, 0

  def train_bucket(self, epoch: int, index: int, bucket, prefetch_next=None,
                   stream=None) -> tuple[float, int]:
    """Trains one bucket: G rounds of the ring (one round with one device).

    ``stream``: the iterator of :meth:`_prepared_calls` positioned at this
    bucket (run() shares one across buckets); None prepares just this bucket.
    """
    config = self.config
    seed = config.train.seed
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), epoch), index)
    key = sharding_lib.global_array(np.asarray(jax.random.key_data(key)), self.mesh)
    total_loss, total_edges = [], []
    own_stream = stream is None
    if own_stream:
      stream = _Background(self._prepared_calls(epoch, index))

    def calls():
      for item_epoch, item_index, k, call in stream:
        if (item_epoch, item_index) != (epoch, index):
          raise RuntimeError(f"batch stream at epoch {item_epoch} bucket {item_index}, "
                             f"trainer at epoch {epoch} bucket {index}")
        if call is None:
          return
        yield k, call

    if prefetch_next is not None:
      prefetch_next()
    start, rotate, finish = sharding_lib.ring_ops(self.mesh)
    shift = sharding_lib.ring_shift(self.mesh)
    visiting: dict[int, tuple] = {}  # dim -> (table, acc, snapshot, snapshot acc)
    visiting_anchor: dict[int, tuple] = {}  # dim -> (anchor rows, anchor weights)
    ring_round = 0  # the round whose target rows the visiting copies hold

    def advance(to_round: int) -> None:
      nonlocal ring_round
      while ring_round < to_round:
        for dim in self.tables_dev:
          if ring_round == 0:
            visiting[dim] = start(self.tables_dev[dim], self.acc_dev[dim])
          else:
            table, acc, snap, snap_acc = visiting[dim]
            visiting[dim] = (*rotate(table, acc), snap, snap_acc)
          if self.anchors is not None:  # anchors travel with the rows they anchor
            visiting_anchor[dim] = shift(*(visiting_anchor[dim] if ring_round else
                                           (self.anchor_dev[dim], self.anchor_w_dev[dim])))
        ring_round += 1

    step_in_bucket = 0
    batch_sharding = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(
        sharding_lib.AXIS))
    for k, call in calls():
      advance(k)
      group = call.group
      dim = int(group.split(":")[1])
      batch = call.batch._replace(step_index=np.broadcast_to(np.arange(
          step_in_bucket, step_in_bucket + STEPS_PER_CALL, dtype=np.int32),
          (self.num_shards, STEPS_PER_CALL)))
      batch = jax.tree_util.tree_map(
          lambda x: sharding_lib.global_array(x, self.mesh, batch_sharding), batch)
      step_in_bucket += STEPS_PER_CALL
      state = step_lib.GroupState(
          self.tables_dev[dim], optim.RowAdagradState(self.acc_dev[dim]),
          self._rel_state["params"][group], self._rel_state["opt"][group])
      if self.anchors is not None:
        state = state._replace(anchor=self.anchor_dev[dim], anchor_weight=self.anchor_w_dev[dim])
      if k > 0:
        table, acc, snap, snap_acc = visiting[dim]
        state = state._replace(visiting=table, visiting_state=optim.RowAdagradState(acc))
        if self.anchors is not None:
          state = state._replace(visiting_anchor=visiting_anchor[dim][0],
                                 visiting_anchor_weight=visiting_anchor[dim][1])
      state, loss, edges = self._step_fn(group, k > 0)(state, batch, key)
      self.tables_dev[dim] = state.table
      self.acc_dev[dim] = state.row_state.acc
      if k > 0:
        visiting[dim] = (state.visiting, state.visiting_state.acc, snap, snap_acc)
      if self.anchors is not None:
        # The state is donated to the step: take the (unchanged) anchors back.
        self.anchor_dev[dim], self.anchor_w_dev[dim] = state.anchor, state.anchor_weight
        if k > 0:
          visiting_anchor[dim] = (state.visiting_anchor, state.visiting_anchor_weight)
      self._rel_state["params"][group] = state.rel_params
      self._rel_state["opt"][group] = state.rel_opt
      total_loss.append(loss)
      total_edges.append(edges)
    if self.num_shards > 1:
      advance(self.num_shards - 1)
      for dim, (table, acc, snap, snap_acc) in visiting.items():
        self.tables_dev[dim], self.acc_dev[dim] = finish(
            self.tables_dev[dim], self.acc_dev[dim], table, acc, snap, snap_acc)
    if own_stream:
      stream.close()
    self.total_steps += step_in_bucket
    loss = sum(float(sharding_lib.host_copy(x)) for x in total_loss)
    edges = sum(int(sharding_lib.host_copy(x)) for x in total_edges)
    return loss, edges

  def run(self, stop_after_buckets: int | None = None) -> list[dict]:
    """Trains the remaining epochs; returns the per-epoch history."""
    config = self.config
    grid = self.graph.bucket_grid
    epochs = config.train.epochs
    buckets_done = 0
    num_buckets = grid[0] * grid[1]
    bar = tqdm(total=self.graph.num_edges("train") * epochs, unit="edge", unit_scale=True,
               desc=f"train {config.name}", disable=not self.progress)
    bar.update(self.graph.num_edges("train") * self.cursor["epoch"])
    # Batches are prepared ahead, across buckets and epochs (see _prepared_calls).
    stream = _Background(self._prepared_calls(self.cursor["epoch"], self.cursor["bucket"]),
                         depth=8)
    try:
      while self.cursor["epoch"] < epochs:
        epoch = self.cursor["epoch"]
        order = schedule.bucket_order(config.train.bucket_order, grid, config.train.seed, epoch)
        epoch_loss, epoch_edges, epoch_time = 0.0, 0, 0.0
        while self.cursor["bucket"] < num_buckets:
          index = self.cursor["bucket"]
          bucket = order[index]
          started = time.perf_counter()
          self._load_bucket(bucket, getattr(self, "_prefetched", {}))
          if index + 1 < num_buckets:
            next_bucket = order[index + 1]
          elif epoch + 1 < epochs:  # the next epoch's first bucket
            next_bucket = schedule.bucket_order(config.train.bucket_order, grid,
                                                config.train.seed, epoch + 1)[0]
          else:
            next_bucket = None
          self._prefetched = {}

          def prefetch_next(next_bucket=next_bucket):
            if next_bucket is not None and config.storage.prefetch:
              self._prefetched = self._prefetch(next_bucket)

          loss, edges = self.train_bucket(epoch, index, bucket, prefetch_next, stream)
          elapsed = time.perf_counter() - started
          epoch_loss += loss
          epoch_edges += edges
          epoch_time += elapsed
          bar.update(edges)
          bar.set_postfix(epoch=epoch, loss=f"{loss / max(edges, 1):.4f}")
          self._log({"epoch": epoch, "bucket": list(bucket), "bucket_index": index,
                     "loss": loss / max(edges, 1), "edges": edges, "seconds": elapsed,
                     "edges_per_s": edges / max(elapsed, 1e-9)})
          self.cursor["bucket"] = index + 1
          buckets_done += 1
          end_of_epoch = self.cursor["bucket"] == num_buckets
          if end_of_epoch:
            self.cursor = {"epoch": epoch + 1, "bucket": 0}
          every = config.train.checkpoint_every_buckets
          if end_of_epoch or (every and buckets_done % every == 0):
            if end_of_epoch:
              self._end_epoch(epoch, epoch_loss, epoch_edges, epoch_time)
            self.save_checkpoint()
          if stop_after_buckets is not None and buckets_done >= stop_after_buckets:
            return self.history
          if end_of_epoch:
            break
    finally:
      stream.close()
      bar.close()
    self.flush()
    if self.primary:
      reporting.plot_training(self.history, self.workdir)
    return self.history

  def _end_epoch(self, epoch, loss, edges, seconds) -> None:
    record = {"epoch": epoch, "loss": loss / max(edges, 1), "edges": edges,
              "seconds": seconds, "edges_per_s": edges / max(seconds, 1e-9)}
    every = self.config.train.eval_every_epochs
    if every and ((epoch + 1) % every == 0 or epoch + 1 == self.config.train.epochs) \
        and self.graph.num_edges("valid") > 0:
      metrics = self.evaluate("valid", max_triples=self.config.eval.max_triples)
      record["valid"] = {k: metrics[k] for k in ("mrr", "mr", "hits@1", "hits@10", "auc")}
    self.history.append(record)
    self._log({"event": "epoch", **record})

  def evaluate(self, split: str, max_triples: int = 0, progress: bool | None = None):
    """Ranking metrics of a split; max_triples=0 ranks every triple."""
    from twhin_jax import evaluation
    return evaluation.evaluate(
        self.graph, self.embeddings(), self.rel_state["params"], self.layout, self.config,
        split, progress=self.progress if progress is None else progress, max_triples=max_triples)

  def close(self) -> None:
    self.io_pool.shutdown(wait=True)
    self.checkpointer.close()


def train(config, workdir: str, *, progress: bool = True,
          stop_after_buckets: int | None = None) -> Trainer:
  """Trains (or resumes) the run in ``workdir``; returns the trainer."""
  trainer = Trainer(config, workdir, progress=progress)
  trainer.run(stop_after_buckets=stop_after_buckets)
  return trainer
