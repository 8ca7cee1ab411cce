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

import concurrent.futures
import dataclasses
import json
import os
import queue
import threading
import time
import uuid

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from twhin_jax import checkpoint as checkpoint_lib
from twhin_jax import config as config_lib
from twhin_jax import model
from twhin_jax import optim
from twhin_jax import reporting
from twhin_jax import schedule
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
#: Config fields that may change when an existing run is resumed.
RESUMABLE_CHANGES = ("train.epochs", "train.eval_every_epochs", "eval.")


# --------------------------------------------------------------------------
# Working tables: which partitions are resident and where their rows are.


@dataclasses.dataclass
class WorkingLayout:
  """Row offsets of the resident partitions inside each dim's working table."""
  blocks: dict[int, list[storage.Block]]  # dim -> blocks in row order
  offsets: dict[storage.Block, int]  # block -> first row in its dim's table
  capacity: dict[int, int]  # dim -> rows of the (padded, fixed-size) table


def bucket_blocks(graph: Graph, bucket: tuple[int, int]) -> list[storage.Block]:
  """The partitions a bucket needs, in a deterministic order."""
  needed = set()
  for rel in graph.relations:
    src = graph.entities[rel.source]
    dst = graph.entities[rel.target]
    needed.add((rel.source, bucket[0] if src.num_partitions > 1 else 0))
    needed.add((rel.target, bucket[1] if dst.num_partitions > 1 else 0))
  return sorted(needed)


def working_capacity(graph: Graph, dims: dict[str, int]) -> dict[int, int]:
  """Fixed rows per dim: every source-side and target-side type's partition.

  Fixed so the jitted step compiles once; diagonal buckets (one partition on
  both sides) leave the tail unused.
  """
  capacity: dict[int, int] = {}
  sides = {(rel.source, "src") for rel in graph.relations} | {
      (rel.target, "dst") for rel in graph.relations}
  for entity_type, _ in sides:
    dim = dims[entity_type]
    capacity[dim] = capacity.get(dim, 0) + graph.entities[entity_type].partition_size
  return capacity


def layout_for(graph: Graph, dims: dict[str, int], blocks: list[storage.Block],
               capacity: dict[int, int]) -> WorkingLayout:
  by_dim: dict[int, list[storage.Block]] = {}
  offsets = {}
  for block in blocks:
    dim = dims[block[0]]
    members = by_dim.setdefault(dim, [])
    offsets[block] = sum(graph.entities[t].partition_rows(p) for t, p in members)
    members.append(block)
  return WorkingLayout(by_dim, offsets, capacity)


# --------------------------------------------------------------------------
# Host-side batch preparation.


@dataclasses.dataclass
class PreparedCall:
  group: str
  batch: step_lib.StepBatch  # numpy arrays [T, S, C] etc.


def prepare_bucket(graph: Graph, layout: model.RelationLayout, working: WorkingLayout,
                   bucket: tuple[int, int], config, seed_path: tuple[int, ...],
                   dims: dict[str, int]):
  """Yields the jitted calls of one bucket, each T steps of S chunks of C edges.

  Edges are shuffled (seeded by ``seed_path``), grouped by relation into
  chunks of C (the last chunk of each relation padded with weight-0 edges),
  chunks of one relation group (operator, dim) are shuffled and packed S to a
  step, and the calls of all groups are interleaved in a seeded order.
  """
  chunk = config.negatives.chunk_size
  per_step = config.train.batch_size // chunk
  rng = np.random.default_rng(list(seed_path))
  edges = graph.bucket_edges(*bucket)
  num_edges = len(edges["src"])
  if num_edges == 0:
    return
  order = rng.permutation(num_edges)
  rel = np.asarray(edges["rel"])[order]
  src = np.asarray(edges["src"])[order]
  dst = np.asarray(edges["dst"])[order]
  weight = np.asarray(edges["weight"], np.float32)[order]

  # Per-relation lookup tables: working-table offset of the relation's source
  # and target partitions, their sizes (uniform negative ranges), weights.
  num_rel = len(graph.relations)
  src_lo = np.zeros(num_rel, np.int64)
  src_n = np.zeros(num_rel, np.int64)
  dst_lo = np.zeros(num_rel, np.int64)
  dst_n = np.zeros(num_rel, np.int64)
  rel_weight = np.zeros(num_rel, np.float32)
  for r, info in enumerate(graph.relations):
    src_block = (info.source, bucket[0] if graph.entities[info.source].num_partitions > 1 else 0)
    dst_block = (info.target, bucket[1] if graph.entities[info.target].num_partitions > 1 else 0)
    src_lo[r], dst_lo[r] = working.offsets[src_block], working.offsets[dst_block]
    src_n[r] = graph.entities[info.source].partition_rows(src_block[1])
    dst_n[r] = graph.entities[info.target].partition_rows(dst_block[1])
    rel_weight[r] = info.weight

  by_relation = np.argsort(rel, kind="stable")
  counts = np.bincount(rel, minlength=num_rel)
  correct = bool(config.negatives.logq_correction)
  if correct:
    src_logq, dst_logq, uniform_src_logq, uniform_dst_logq = sampling_log_counts(
        rel, src, dst, counts, src_n, dst_n, chunk, config.negatives.num_uniform)
  starts = np.concatenate([[0], np.cumsum(counts)])
  group_chunks: dict[str, list[np.ndarray]] = {}
  for r in range(num_rel):
    if counts[r] == 0:
      continue
    idx = by_relation[starts[r]:starts[r + 1]]
    padded = -(-len(idx) // chunk) * chunk
    idx = np.concatenate([idx, np.full(padded - len(idx), -1, np.int64)]).reshape(-1, chunk)
    group_chunks.setdefault(layout.group[r], []).append(idx)

  calls = []
  for group, chunk_lists in group_chunks.items():
    chunks = np.concatenate(chunk_lists)  # [num_chunks, C] edge indices, -1 = pad
    chunks = chunks[rng.permutation(len(chunks))]
    per_call = per_step * STEPS_PER_CALL
    for start in range(0, len(chunks), per_call):
      calls.append((group, chunks[start:start + per_call]))
  call_order = rng.permutation(len(calls))
  row_in_group = np.asarray(layout.row, np.int32)
  reverse_row_in_group = np.asarray(layout.reverse_row, np.int32)

  for position in call_order:
    group, call_chunks = calls[position]
    # Pad the call to T steps of S chunks with all-padding chunks.
    full = STEPS_PER_CALL * per_step
    if len(call_chunks) < full:
      call_chunks = np.concatenate(
          [call_chunks, np.full((full - len(call_chunks), chunk), -1, np.int64)])
    is_real = call_chunks >= 0  # [T*S, C]
    safe = np.where(is_real, call_chunks, 0)
    chunk_rel = rel[safe[:, 0]]
    # A chunk that is all padding takes the group's first relation.
    first_real = np.where(is_real.any(axis=1), chunk_rel, layout.groups[group][0])
    chunk_rel = first_real.astype(np.int64)  # [T*S]
    src_rows = src_lo[chunk_rel][:, None] + src[safe]
    dst_rows = dst_lo[chunk_rel][:, None] + dst[safe]
    edge_weight = np.where(is_real, weight[safe] * rel_weight[chunk_rel][:, None], 0.0)
    shape3 = (STEPS_PER_CALL, per_step, chunk)
    shape2 = (STEPS_PER_CALL, per_step)
    yield PreparedCall(group, step_lib.StepBatch(
        src=src_rows.reshape(shape3).astype(np.int32),
        dst=dst_rows.reshape(shape3).astype(np.int32),
        rel=row_in_group[chunk_rel].reshape(shape2),
        rel_reverse=reverse_row_in_group[chunk_rel].reshape(shape2),
        weight=edge_weight.reshape(shape3).astype(np.float32),
        src_lo=src_lo[chunk_rel].reshape(shape2).astype(np.int32),
        src_n=src_n[chunk_rel].reshape(shape2).astype(np.int32),
        dst_lo=dst_lo[chunk_rel].reshape(shape2).astype(np.int32),
        dst_n=dst_n[chunk_rel].reshape(shape2).astype(np.int32),
        step_index=np.zeros(STEPS_PER_CALL, np.int32),  # set by the consumer
        **({} if not correct else dict(
            src_logq=np.where(is_real, src_logq[safe], 0.0).reshape(shape3).astype(np.float32),
            dst_logq=np.where(is_real, dst_logq[safe], 0.0).reshape(shape3).astype(np.float32),
            uniform_src_logq=uniform_src_logq[chunk_rel].reshape(shape2).astype(np.float32),
            uniform_dst_logq=uniform_dst_logq[chunk_rel].reshape(shape2).astype(np.float32))),
    ))


def sampling_log_counts(rel, src, dst, rel_counts, src_n, dst_n, chunk: int, num_uniform: int):
  """log q for the sampled-softmax correction (see step.StepBatch).

  A chunk of C edges of relation r offers each edge the other C - 1 edges'
  entities as negatives, so entity v appears there about (C - 1) c_r(v) / n_r
  times (c_r(v): v's edges of relation r in this bucket, n_r: all of them),
  and among U uniform draws from a partition of N rows U / N times:

      q(v) = (C - 1) c_r(v) / n_r + U / N

  Returns per-edge log q of its source and of its target, and per-relation
  log q of a uniform draw (U / N plus the batch term of an average entity).
  """
  def per_edge(entity, sizes):
    key = rel.astype(np.int64) * (int(entity.max(initial=0)) + 1) + entity
    _, inverse, key_counts = np.unique(key, return_inverse=True, return_counts=True)
    count = key_counts[inverse].astype(np.float64)
    share = count / np.maximum(rel_counts[rel], 1)
    return np.log((chunk - 1) * share + num_uniform / np.maximum(sizes[rel], 1))

  def uniform(sizes):
    return np.log(np.maximum(num_uniform, 1) / np.maximum(sizes, 1)
                  + (chunk - 1) / np.maximum(sizes, 1))

  return per_edge(src, src_n), per_edge(dst, dst_n), uniform(src_n), uniform(dst_n)


def _background(generator, depth: int = 4):
  """Runs a generator in a thread, yielding its items through a bounded queue."""
  items: queue.Queue = queue.Queue(maxsize=depth)
  done = object()

  def produce():
    try:
      for item in generator:
        items.put(item)
      items.put(done)
    except BaseException as err:  # noqa: BLE001 - re-raised in the consumer
      items.put(err)

  thread = threading.Thread(target=produce, daemon=True)
  thread.start()
  while True:
    item = items.get()
    if item is done:
      return
    if isinstance(item, BaseException):
      raise item
    yield item


# --------------------------------------------------------------------------
# The trainer.


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
  """Holds the state of one run: graph, tables, relation state, cursor."""

  def __init__(self, config, workdir: str, progress: bool = True):
    config_lib.validate(config)
    os.makedirs(workdir, exist_ok=True)
    self.workdir = workdir
    self.progress = progress
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
    with open(config_path, "w") as f:
      json.dump(config_lib.to_json_dict(config), f, indent=1, sort_keys=True)
    self.config = config
    self.graph = prepare_graph(config, workdir, progress)
    self.layout = model.RelationLayout.from_config(config)
    self.dims = {t: config_lib.entity_dim(config, t) for t in self.graph.entities}
    self.capacity = working_capacity(self.graph, self.dims)
    tables_root = os.path.join(workdir, TABLES_DIR)

    if resuming:
      meta = self.checkpointer.restore_meta()
      self.tables = storage.TableStore(tables_root, self.graph.entities, self.dims,
                                       config.storage.zarr_format, create=False)
      self.slots = storage.SlotMap.from_json(meta["slots"])
      self.cursor = dict(meta["cursor"])
      self.total_steps = int(meta["total_steps"])
      self.lineage = meta["lineage"]
      self.history = meta.get("history", [])
      self.rel_state = self.checkpointer.restore_state(self._abstract_rel_state())
    else:
      self.tables = storage.TableStore(tables_root, self.graph.entities, self.dims,
                                       config.storage.zarr_format, create=True)
      bar = tqdm(total=len(self.tables.blocks()), desc="init tables", disable=not progress)
      self.tables.initialize(config.train.seed, config.model.init_scale, bar)
      bar.close()
      self.slots = storage.SlotMap.fresh(self.tables.blocks())
      self.cursor = {"epoch": 0, "bucket": 0}
      self.total_steps = 0
      self.history = []
      self.lineage = {
          "version_id": uuid.uuid4().hex[:12],
          "parent_id": None,
          "graph_manifest_hash": self.graph.manifest_hash,
          "config_hash": config_lib.config_hash(config),
          "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
      }
      self.rel_state = self._initial_rel_state()

    # Resident partitions: working tables (jax arrays) per dim and their layout.
    self.resident: WorkingLayout | None = None
    self.tables_dev: dict[int, jax.Array] = {}
    self.acc_dev: dict[int, jax.Array] = {}
    self.pending_writes: dict[storage.Block, list] = {}
    self.io_pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)
    self.metrics_path = os.path.join(workdir, METRICS_FILE)

  # -- relation state -------------------------------------------------------

  def _initial_rel_state(self):
    params = {g: jnp.asarray(p) for g, p in self.layout.init_params().items()}
    tx = optim.relation_adagrad(self.config.train.relation_lr)
    return {"params": params, "opt": {g: tx.init(p) for g, p in params.items()}}

  def _abstract_rel_state(self):
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), self._initial_rel_state())

  # -- partitions -------------------------------------------------------------

  def _read_block(self, block):
    for future in self.pending_writes.pop(block, []):
      future.result()
    return self.tables.read(block, self.slots.current[block])

  def _extract(self, block) -> tuple[np.ndarray, np.ndarray]:
    dim = self.dims[block[0]]
    start = self.resident.offsets[block]
    rows = self.graph.entities[block[0]].partition_rows(block[1])
    table = np.asarray(self.tables_dev[dim][start:start + rows])
    acc = np.asarray(self.acc_dev[dim][start:start + rows])
    return table, acc

  def _write_back(self, block, table, acc) -> None:
    slot = self.slots.write_target(block)
    self.slots.current[block] = slot
    self.pending_writes[block] = self.tables.write(block, slot, table, acc)

  def _load_bucket(self, bucket, prefetched: dict) -> None:
    """Makes the bucket's partitions resident, writing back the others."""
    needed = bucket_blocks(self.graph, bucket)
    if self.resident is not None and sorted(self.resident.offsets) == needed:
      return
    kept = {}
    if self.resident is not None:
      for block in list(self.resident.offsets):
        table, acc = self._extract(block)
        if block in needed:
          kept[block] = (table, acc)
        else:
          self._write_back(block, table, acc)
    new_layout = layout_for(self.graph, self.dims, needed, self.capacity)
    host_tables, host_accs = {}, {}
    for dim, blocks in new_layout.blocks.items():
      parts, accs = [], []
      for block in blocks:
        if block in kept:
          table, acc = kept[block]
        elif block in prefetched:
          table, acc = prefetched.pop(block).result()
        else:
          table, acc = self._read_block(block)
        parts.append(table)
        accs.append(acc)
      used = sum(len(p) for p in parts)
      pad = self.capacity[dim] - used
      parts.append(np.zeros((pad, dim), np.float32))
      accs.append(np.zeros(pad, np.float32))
      host_tables[dim] = np.concatenate(parts)
      host_accs[dim] = np.concatenate(accs)
    self.tables_dev = {d: jnp.asarray(t) for d, t in host_tables.items()}
    self.acc_dev = {d: jnp.asarray(a) for d, a in host_accs.items()}
    self.resident = new_layout

  def _prefetch(self, bucket) -> dict:
    """Starts loading the partitions of ``bucket`` that are not resident."""
    resident = set(self.resident.offsets) if self.resident else set()
    # Partitions that the switch will evict are written back first; reading
    # them here would race with that write, so leave them to _load_bucket.
    return {block: self.io_pool.submit(self._read_block, block)
            for block in bucket_blocks(self.graph, bucket)
            if block not in resident and block not in self.pending_writes}

  def flush(self) -> None:
    """Writes every resident partition back and waits for all writes."""
    if self.resident is not None:
      for block in list(self.resident.offsets):
        table, acc = self._extract(block)
        self._write_back(block, table, acc)
    for block in list(self.pending_writes):
      for future in self.pending_writes.pop(block):
        future.result()

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
    }
    step = self.cursor["epoch"] * 1_000_000 + self.cursor["bucket"]
    self.checkpointer.save(step, checkpoint_lib.to_numpy_tree(self.rel_state), meta)
    self.slots.commit()

  # -- the loop ---------------------------------------------------------------

  def _log(self, record: dict) -> None:
    with open(self.metrics_path, "a") as f:
      f.write(json.dumps(record) + "\n")

  def train_bucket(self, epoch: int, index: int, bucket, prefetch_next=None) -> tuple[float, int]:
    config = self.config
    seed = config.train.seed
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), epoch), index)
    fn_cache = {}
    total_loss = jnp.zeros((), jnp.float32)
    total_edges = jnp.zeros((), jnp.int32)
    calls = prepare_bucket(self.graph, self.layout, self.resident, bucket, config,
                           (seed, epoch, index), self.dims)
    if prefetch_next is not None:
      prefetch_next()
    step_in_bucket = 0
    for call in _background(calls):
      group = call.group
      operator, dim = group.split(":")[0], int(group.split(":")[1])
      if group not in fn_cache:
        fn_cache[group] = step_lib.make_train_steps(
            operator, config.model.comparator, config.train.loss, float(config.train.margin),
            float(config.train.lr), float(config.train.relation_lr), config.negatives.num_uniform,
            bool(config.model.reciprocal), float(config.model.regularization))
      batch = call.batch._replace(step_index=np.arange(
          step_in_bucket, step_in_bucket + STEPS_PER_CALL, dtype=np.int32))
      step_in_bucket += STEPS_PER_CALL
      state = step_lib.GroupState(
          self.tables_dev[dim], optim.RowAdagradState(self.acc_dev[dim]),
          self.rel_state["params"][group], self.rel_state["opt"][group])
      state, loss, edges = fn_cache[group](state, batch, key)
      self.tables_dev[dim] = state.table
      self.acc_dev[dim] = state.row_state.acc
      self.rel_state["params"][group] = state.rel_params
      self.rel_state["opt"][group] = state.rel_opt
      total_loss = total_loss + loss
      total_edges = total_edges + edges
    self.total_steps += step_in_bucket
    return float(total_loss), int(total_edges)

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
    while self.cursor["epoch"] < epochs:
      epoch = self.cursor["epoch"]
      order = schedule.bucket_order(config.train.bucket_order, grid, config.train.seed, epoch)
      epoch_loss, epoch_edges, epoch_time = 0.0, 0, 0.0
      while self.cursor["bucket"] < num_buckets:
        index = self.cursor["bucket"]
        bucket = order[index]
        started = time.perf_counter()
        self._load_bucket(bucket, getattr(self, "_prefetched", {}))
        next_bucket = order[index + 1] if index + 1 < num_buckets else None
        self._prefetched = {}

        def prefetch_next(next_bucket=next_bucket):
          if next_bucket is not None and config.storage.prefetch:
            self._prefetched = self._prefetch(next_bucket)

        loss, edges = self.train_bucket(epoch, index, bucket, prefetch_next)
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
          bar.close()
          return self.history
        if end_of_epoch:
          break
    bar.close()
    self.flush()
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
