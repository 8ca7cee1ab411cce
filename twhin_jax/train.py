"""The training loop: bucket schedule, jitted steps, checkpoints, evaluation.

``train(config, workdir)`` imports the graph when needed, then visits the
P x P buckets of every epoch in the configured order (schedule.py, computed
once per run as a plan). For each bucket:

  residency.py   makes the bucket's partitions resident (one row-sharded
                 working table per dim), writing evicted ones back to
                 TensorStore and reading the next bucket's ahead in a thread
  batching.py    prepares the bucket's calls ahead, in a background thread,
                 across bucket and epoch boundaries; or, with one device,
  device_batching.py  forms them inside jit from raw edge slices the host
                 reads ahead (train.batch_preparation)
  step.py        T steps per jitted call on one state.StepState, round by
                 round of the device ring (sharding.py)

Resume order (it matters): read the latest checkpoint's meta, open the tables
on its committed slots, restore relation state, then continue at the bucket
cursor. Every random choice derives from (seed, epoch, bucket index, step), so
a resumed run produces the same numbers as an uninterrupted one.
"""

from __future__ import annotations

import functools
import json
import math
import os
import threading
import time
import typing
import uuid

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from twhin_jax import batching
from twhin_jax import best_checkpoint
from twhin_jax import checkpoint as checkpoint_lib
from twhin_jax import config as config_lib
from twhin_jax import device_batching
from twhin_jax import distributed
from twhin_jax import early_stopping
from twhin_jax import model
from twhin_jax import negatives
from twhin_jax import networks
from twhin_jax import run_report as reporting  # per-run plots and Markdown
from twhin_jax import residency as residency_lib
from twhin_jax import schedule
from twhin_jax import sharding as sharding_lib
from twhin_jax import state as state_lib
from twhin_jax import step as step_lib
from twhin_jax import storage
from twhin_jax import training_log
from twhin_jax import versions
from twhin_jax.graph import Graph
from twhin_jax import rundir
from twhin_jax.rundir import CONFIG_FILE, GRAPH_DIR, METRICS_FILE, TABLES_DIR  # noqa: F401 (re-exported)

#: Sharded calls dispatched ahead of the device on CPU (see Trainer._bound_inflight;
#: XLA:CPU deadlocks past 32 in-flight multi-device calls with 2 cores).
MAX_INFLIGHT_CALLS = 8
#: Config fields that may change when an existing run is resumed (the device
#: schedule too: between buckets every row is home under either schedule, and
#: runs made before mesh.schedule existed resume with the default; and where
#: batches are prepared, which "auto" resolves per backend anyway: the
#: buckets after the resume point then draw the other path's batches).
RESUMABLE_CHANGES = ("train.epochs", "train.eval_every_epochs", "train.early_stop", "eval.",
                     "mesh.schedule", "train.batch_preparation", "negatives.global_candidates",
                     "train.background_checkpoints", "train.checkpoint_every_seconds",
                     "storage.sync")
#: The persistent compilation cache's directory ("off" turns it off). Default:
#: $XDG_CACHE_HOME/twhin_jax/jax_cache (~/.cache/twhin_jax/jax_cache).
COMPILATION_CACHE_ENV = "TWHIN_JAX_CACHE_DIR"


def enable_compilation_cache() -> str | None:
  """Turns on JAX's persistent compilation cache (unless the environment
  turns it off or JAX already has a cache directory); returns its directory.

  A second run of the same shapes then loads its programs instead of
  compiling them. Every program is kept, however fast it compiled: on CPU
  most take well under JAX's default threshold of 1 s, and together they
  are most of the time to the first trained bucket.
  """
  path = os.environ.get(COMPILATION_CACHE_ENV)
  if path is None:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = os.path.join(root, "twhin_jax", "jax_cache")
  if path.strip().lower() in ("", "off", "0", "none", "false"):
    return None
  if jax.config.jax_compilation_cache_dir:
    return jax.config.jax_compilation_cache_dir
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  return path


load_run_config = rundir.load_config


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
      from twhin_jax import generate  # only for generated graphs
      generator = getattr(generate, config.data.generator)
      files = generator(os.path.join(workdir, rundir.GENERATED_DIR),
                        **dict(config.data.generator_args))
    importer.import_graph(config, graph_dir, files=files, progress=progress)
  graph = networks.open_graph(graph_dir)
  declared = {r["name"]: (r["source"], r["target"]) for r in config.relations}
  imported = {r.name: (r.source, r.target) for r in graph.relations}
  if declared != imported:
    raise ValueError(f"{graph_dir}: imported relations {imported} differ from the config's "
                     f"{declared}; use a fresh workdir")
  return graph


@jax.jit
def _bucket_key_data(seed, epoch, index) -> jax.Array:
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), epoch), index)
  return jax.random.key_data(key)


def bucket_key(seed: int, epoch: int, index: int) -> np.ndarray:
  """The raw key data [2] uint32 of a bucket's negative draws:
  fold_in(fold_in(key(seed), epoch), index), as one compiled program (three
  when run op by op)."""
  if not -2 ** 31 <= seed < 2 ** 31:  # past int32: jax.random.key's own conversion, op by op
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), epoch), index)
    return np.asarray(jax.random.key_data(key))
  return np.asarray(_bucket_key_data(np.int32(seed), np.int32(epoch), np.int32(index)))


def bucket_key_on_mesh(seed: int, epoch: int, index: int, mesh) -> jax.Array:
  """bucket_key replicated over the mesh. In one process it never leaves
  the device, so taking it does not wait for the steps already queued (the
  next bucket's steps are dispatched while the last one still runs)."""
  if jax.process_count() == 1 and -2 ** 31 <= seed < 2 ** 31:
    return jax.device_put(_bucket_key_data(np.int32(seed), np.int32(epoch), np.int32(index)),
                          sharding_lib.replicated(mesh))
  return sharding_lib.global_array(bucket_key(seed, epoch, index), mesh)


def bucket_totals(losses: list, edges: list) -> tuple[float, int]:
  """(summed loss, edges) of a bucket from train_bucket's per-call results;
  waits for its steps."""
  return (sum(float(sharding_lib.host_copy(x)) for x in losses),
          sum(int(sharding_lib.host_copy(x)) for x in edges))


def _dispatch_bounded(mesh) -> bool:
  """Whether calls may only run a few ahead of the device (several CPU
  devices in one process: Trainer._bound_inflight)."""
  return mesh.size > 1 and mesh.devices.flat[0].platform == "cpu"


def _checkpoint_due(config, position: int, end_of_epoch: bool) -> bool:
  """Whether a checkpoint follows bucket ``position`` of the run's plan: at
  an epoch's end and every train.checkpoint_every_buckets."""
  every = config.train.checkpoint_every_buckets
  return end_of_epoch or bool(every and (position + 1) % every == 0)


def checkpoint_now(trainer: Trainer, position: int, end_of_epoch: bool) -> bool:
  """Whether a checkpoint is saved after bucket ``position``: one is due
  (_checkpoint_due) and checkpoint_interval seconds have passed since the
  run's last (or its start), or the run ends here (its last epoch is done,
  or early stopping ended it). Skipping only drops saves, so the buckets
  finished early for a due checkpoint (_state_used_after) stay correct.
  With several processes the primary's clock decides for all: a checkpoint
  is collective, and one process skipping it would leave the others waiting."""
  if not _checkpoint_due(trainer.config, position, end_of_epoch):
    return False
  now, every = time.perf_counter(), checkpoint_interval(trainer.config, trainer.mesh)
  ends = trainer.cursor["epoch"] >= trainer.config.train.epochs or trainer.early_stop.stopped
  if every and not ends and distributed.broadcast_json(
      now - trainer.last_checkpoint_time < every):
    return False
  trainer.last_checkpoint_time = now
  return True


def checkpoint_interval(config, mesh) -> float:
  """train.checkpoint_every_seconds, with None ("auto") resolved: at most one
  checkpoint a minute (config.AUTO_CHECKPOINT_SECONDS) on a GPU or TPU,
  every due one on CPU, where epochs take long enough that saving each costs
  little (FB15k-237, P=1: 34.3 s with every epoch's, 33.9 s with one)."""
  every = config.train.get("checkpoint_every_seconds", None)
  if every is not None:
    return float(every)
  return config_lib.AUTO_CHECKPOINT_SECONDS if sharding_lib.on_accelerator(mesh) else 0.0


def _state_used_after(config, plan: list, position: int) -> bool:
  """Whether the run's state is saved or read right after bucket
  ``position`` of the plan: its last bucket, or a checkpoint."""
  return position + 1 == len(plan) or _checkpoint_due(
      config, position, plan[position + 1][0] != plan[position][0])


class _PendingBucket(typing.NamedTuple):
  """A bucket whose steps are dispatched (Trainer.run)."""
  position: int
  epoch: int
  index: int
  bucket: tuple[int, int]
  losses: list
  edges: list
  total_steps: int  # Trainer.total_steps once its steps are counted


def abstract_call_batch(config, mesh: jax.sharding.Mesh) -> step_lib.StepBatch:
  """Shapes, dtypes and shardings of one host-prepared call's StepBatch
  (batching._BucketPacker._device_call, as train_bucket hands it to the
  mesh): [G, T, S, C] per edge, [G, T, S] per chunk, relation rows per edge
  in mixed chunks, the log-q fields with the correction."""
  chunk = config.negatives.chunk_size
  per_step = config.train.batch_size // chunk
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(sharding_lib.AXIS))
  lead = (mesh.size, batching.STEPS_PER_CALL)

  def spec(shape, dtype=np.int32):
    return jax.ShapeDtypeStruct(lead + shape, np.dtype(dtype), sharding=sharding)

  per_edge, per_chunk = (per_step, chunk), (per_step,)
  rel = per_edge if config.negatives.mix_relations else per_chunk
  extra = {}
  if config.negatives.logq_correction:
    extra = dict(src_logq=spec(per_edge, np.float32), dst_logq=spec(per_edge, np.float32),
                 uniform_src_logq=spec(per_chunk, np.float32),
                 uniform_dst_logq=spec(per_chunk, np.float32))
  return step_lib.StepBatch(
      src=spec(per_edge), dst=spec(per_edge), rel=spec(rel), rel_reverse=spec(rel),
      weight=spec(per_edge, np.float32), src_lo=spec(per_chunk), src_n=spec(per_chunk),
      dst_lo=spec(per_chunk), dst_n=spec(per_chunk), step_index=spec(()), **extra)


def precompile_steps(trainer: "Trainer") -> threading.Thread | None:
  """Compiles the one-device step of every parameter group in a thread, from
  shapes alone, while the first bucket's partitions load and its batches are
  prepared; the step's first call then finds the program compiled (about 3
  CPU-seconds on 2 cores, most of the time to the first trained bucket).

  The host path on one device without anchors only (the ring's visiting
  variants and the device path's batches keep compiling on first use). A
  failure here costs nothing but the overlap: the call compiles as before."""
  config, mesh = trainer.config, trainer.mesh
  path = device_batching.resolve_path(config.train.batch_preparation, mesh.size,
                                      jax.process_count(), mesh.devices.flat[0].platform)
  if mesh.size != 1 or path != "host" or trainer.anchor_strength:
    return None
  capacity = trainer.residency.capacity
  rows = jax.sharding.NamedSharding(mesh, sharding_lib.ROWS)
  key = jax.ShapeDtypeStruct((2,), np.dtype(np.uint32), sharding=sharding_lib.replicated(mesh))
  abstract = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)

  def compile_all():
    bucket_key(config.train.seed, 0, 0)  # compiled here too
    for group in sorted(trainer.layout.groups):
      dim = model.group_dim(group)
      home = state_lib.Rows(jax.ShapeDtypeStruct((capacity[dim], dim), np.dtype(np.float32),
                                                 sharding=rows),
                            jax.ShapeDtypeStruct(storage.accumulator_shape(
                                capacity[dim], dim, trainer.tables.coordinate_accumulators),
                                np.dtype(np.float32), sharding=rows))
      state = state_lib.StepState(home, None, *jax.tree_util.tree_map(abstract, (
          trainer._rel_state["params"][group], trainer._rel_state["opt"][group])))
      try:
        trainer._step_fn(group, False).lower(state, abstract_call_batch(config, mesh),
                                             key).compile()
      except Exception as e:  # pylint: disable=broad-except
        print(f"[twhin] warning: compiling the step ahead failed ({e}); it compiles on first use",
              flush=True)

  thread = threading.Thread(target=compile_all, name="precompile-steps", daemon=True)
  thread.start()
  return thread


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
    enable_compilation_cache()
    os.makedirs(workdir, exist_ok=True)
    self.workdir, self.config = workdir, config
    self.primary = jax.process_index() == 0
    self.progress = progress and self.primary
    self.mesh = sharding_lib.make_mesh(config.mesh.num_devices)
    self.num_shards = self.mesh.size
    # config.mesh.schedule: the ring, or the tournament (sharding.Tournament);
    # one device has one round either way.
    self.schedule = config.mesh.schedule if self.num_shards > 1 else "ring"
    self.checkpointer = checkpoint_lib.Checkpointer(workdir)
    resuming = self.checkpointer.latest_step() is not None
    self._check_resumable(resuming)
    if self.primary:
      # Written aside and renamed: the other processes may be reading the
      # old one (_check_resumable) at this moment.
      partial = os.path.join(workdir, f".{CONFIG_FILE}.{os.getpid()}")
      with open(partial, "w") as f:
        json.dump(config_lib.to_json_dict(config), f, indent=1, sort_keys=True)
      os.replace(partial, os.path.join(workdir, CONFIG_FILE))
      self.graph = prepare_graph(config, workdir, self.progress)
    distributed.sync("graph imported")
    if not self.primary:
      self.graph = prepare_graph(config, workdir, progress=False)
    self.layout = model.RelationLayout.from_config(config)
    self.dims = {t: config_lib.entity_dim(config, t) for t in self.graph.entities}
    if resuming:
      self._resume()
    else:
      self._start_fresh()
    # Hosts must agree on the version id (the primary's uuid wins).
    self.lineage = distributed.broadcast_json(self.lineage)
    self.residency = self._residency()
    self.metrics_path = os.path.join(workdir, METRICS_FILE)
    self.log = training_log.TrainingLog(workdir, self.primary)
    if jax.process_count() > 1:
      print(f"[twhin] process {jax.process_index()}/{jax.process_count()}: "
            f"devices {[d.id for d in jax.local_devices()]} of a {self.num_shards}-device mesh",
            flush=True)

  def _check_resumable(self, resuming: bool) -> None:
    config_path = os.path.join(self.workdir, CONFIG_FILE)
    if resuming and os.path.exists(config_path):
      stored = config_lib.to_json_dict(load_run_config(self.workdir))
      diffs = [d for d in _config_differences(stored, config_lib.to_json_dict(self.config))
               if not d.startswith(RESUMABLE_CHANGES)]
      if diffs:
        raise ValueError(f"{self.workdir} holds a run with a different config "
                         f"({', '.join(diffs)}); use a fresh --workdir or the same config")

  def _open_tables(self, create: bool) -> storage.TableStore:
    return storage.open_storage(
        self.config.storage.driver, os.path.join(self.workdir, TABLES_DIR),
        entities=self.graph.entities, dims=self.dims, create=create, sub_partitions=self.num_shards,
        **table_options(self.config))

  def _resume(self) -> None:
    meta = self.checkpointer.restore_meta()
    self.tables = self._open_tables(create=False)
    self.slots = storage.SlotMap.from_json(meta["slots"])
    self.cursor = dict(meta["cursor"])
    self.total_steps = int(meta["total_steps"])
    self.lineage = meta["lineage"]
    self.history = meta.get("history", [])
    self.early_stop = early_stopping.EarlyStopping.from_json(meta.get("early_stopping"))
    self._rel_state = self.checkpointer.restore_state(state_lib.abstract_relation_state(
        self.layout, self.config.train.relation_lr, sharding_lib.replicated(self.mesh)))

  def _start_fresh(self) -> None:
    config = self.config
    warm_summary = None
    if self.primary:
      self.tables = self._open_tables(create=True)
      bar = tqdm(total=len(self.tables.blocks()), desc="init tables", disable=not self.progress)
      self.tables.initialize(config.train.seed, config.model.init_scale, bar)
      bar.close()
      if config.warm_start.parent:
        warm_summary = versions.warm_start(self, config.warm_start.parent)
    distributed.sync("tables created")
    if not self.primary:
      self.tables = self._open_tables(create=False)
    self.slots = storage.SlotMap.fresh(self.tables.blocks())
    self.cursor = {"epoch": 0, "bucket": 0}
    self.total_steps = 0
    self.history = []
    self.early_stop = early_stopping.EarlyStopping()
    parent = config.warm_start.parent
    self.lineage = {
        "version_id": uuid.uuid4().hex[:12],
        "parent_id": warm_summary["parent_version"] if warm_summary else None,
        "parent_dir": os.path.abspath(parent) if parent else None,
        "graph_manifest_hash": self.graph.manifest_hash,
        "config_hash": config_lib.config_hash(config),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    # Relations aligned by name from the parent (versions.py), else initial.
    params = versions.warm_relation_params(self.workdir) if parent else None
    self._rel_state = jax.tree_util.tree_map(
        lambda x: sharding_lib.global_array(np.asarray(x), self.mesh),
        state_lib.relation_state(self.layout, config.train.relation_lr, params))

  def _residency(self) -> residency_lib.Residency:
    # Rows per sub-partition: aligned to the storage chunks when several hosts
    # write the same partition (never two hosts in one chunk).
    # The tournament halves every sub-partition into two slots: an even size.
    align = jax.process_count() > 1
    even = 2 if self.schedule == "tournament" else 1
    sub_rows = {t: sharding_lib.sub_partition_rows(
        info.partition_size, self.num_shards,
        math.lcm(self.tables.chunk[t] if align else 1, even))
        for t, info in self.graph.entities.items()}
    # L2-to-previous anchors (versions.py), loaded beside the working tables.
    self.anchor_strength = float(self.config.warm_start.l2_to_previous)
    anchors = None
    if self.anchor_strength > 0:
      anchors = storage.open_storage(
          self.config.storage.driver, os.path.join(self.workdir, versions.ANCHORS_DIR),
          entities=self.graph.entities, dims=self.dims,
          zarr_format=self.config.storage.zarr_format, create=False,
          sub_partitions=self.num_shards, num_slots=1)
    return residency_lib.Residency(self.graph, self.dims, self.tables, self.slots, self.mesh,
                                   sub_rows, anchors, self.schedule,
                                   keep_all_bytes=residency_lib.KEEP_ALL_BYTES,
                                   write_barrier=self.checkpointer.wait)

  @property
  def rel_state(self) -> dict:
    """Relation parameters and optimizer state as host numpy arrays."""
    return jax.tree_util.tree_map(sharding_lib.host_copy, self._rel_state)

  def flush(self) -> None:
    self.residency.flush()

  def embeddings(self) -> dict[str, np.ndarray]:
    """Full tables of every type (current values), for evaluation and export."""
    self.flush()
    return {t: self.tables.read_type(t, self.slots) for t in self.graph.entities}

  def save_checkpoint(self) -> None:
    """Writes the tables' changed rows and the relation state as one
    checkpoint; in the background (background_checkpoints) the steps go on
    while the rows are written, and the checkpoint is final only after them."""
    step = self.cursor["epoch"] * 1_000_000 + self.cursor["bucket"]
    if not background_checkpoints(self.config, self.mesh):
      self.flush()
      make_writes_durable(self)
      self.checkpointer.save(step, self._rel_state, checkpoint_meta(self))
      self.slots.commit()
      return
    writes = self.residency.flush_in_background()
    # A copy on the device: the next steps donate the state's buffers.
    state = jax.tree_util.tree_map(jnp.copy, self._rel_state)
    self.checkpointer.save_after(writes, step, state, checkpoint_meta(self), self.slots.commit,
                                 before_save=functools.partial(make_writes_durable, self))

  # -- the loop ---------------------------------------------------------------

  def _step_fn(self, group: str, visiting: bool):
    config = self.config
    all_candidates = bool(config.negatives.get("all_candidates", False))
    rates = early_stopping.learning_rates(config, self.early_stop)  # new rates: a new program
    return step_lib.make_train_steps(
        model.group_operator(group), config.model.comparator, config.train.loss,
        float(config.train.margin), rates["entities"], rates["relations"],
        negatives.uniform_candidates(config, self.graph), bool(config.model.reciprocal),
        float(config.model.regularization), mesh=self.mesh, visiting=visiting,
        l2_to_previous=self.anchor_strength, regularizer=config.model.regularizer,
        matmul_precision=config.model.get("matmul_precision", "auto"),
        all_candidates=all_candidates, global_candidates=negatives.global_candidates(config),
        regularize_relations=bool(config.model.get("regularize_relations", False)),
        relation_dropout=float(config.model.get("relation_dropout", 0.0)))

  def train_bucket(self, epoch: int, index: int, calls) -> tuple[list, list]:
    """Trains the resident bucket from its prepared ``calls`` [(visit, call)]:
    G rounds of the ring (one round with one device; a visit is a round), or
    the 2G - 1 rounds of the tournament visited round_passes times in turn,
    where every visit is the plain one-table step on the slots each device
    holds and the slots move between visits (sharding.Tournament). Returns
    every call's (loss, edges) as device values, without waiting for the
    steps (bucket_totals waits and sums them)."""
    key = bucket_key_on_mesh(self.config.train.seed, epoch, index, self.mesh)
    batch_sharding = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(
        sharding_lib.AXIS))
    state = state_lib.TrainState(self.residency.home, {}, self._rel_state["params"],
                                 self._rel_state["opt"])
    tournament = self.schedule == "tournament"
    ring = sharding_lib.Ring(self.mesh)
    slots = sharding_lib.Tournament(self.mesh, self.residency.layout) if tournament else None
    total_loss, total_edges, step_in_bucket = [], [], 0
    for k, call in calls:
      if isinstance(call, device_batching.DeviceCall):
        # Formed on the device (device_batching.py): one device, one round.
        batch, visiting = call.batch_at(step_in_bucket), False
      else:
        if tournament:
          state = state._replace(home=slots.advance(state.home, k))
          visiting = False
        else:
          state = state._replace(visiting=ring.advance(state.home, state.visiting, k))
          visiting = k > 0
        steps = call.batch.weight.shape[1]  # [G, T, S, C]: the tournament's T varies
        batch = call.batch._replace(step_index=np.broadcast_to(np.arange(
            step_in_bucket, step_in_bucket + steps, dtype=np.int32), (self.num_shards, steps)))
        batch = jax.tree_util.tree_map(
            lambda x: sharding_lib.global_array(x, self.mesh, batch_sharding), batch)
      step_in_bucket += (batching.STEPS_PER_CALL if isinstance(call, device_batching.DeviceCall)
                         else call.batch.weight.shape[1])
      new, loss, edges = self._step_fn(call.group, visiting)(
          state.for_group(call.group, visiting), batch, key)
      state = state.with_group(call.group, new)
      total_loss.append(loss)
      total_edges.append(edges)
      self._bound_inflight(total_loss)
    home = state.home
    if tournament:  # home, where the next bucket or a checkpoint expects the rows
      home = slots.finish(home)
    elif self.num_shards > 1:
      home = ring.finish(home, ring.advance(home, state.visiting, self.num_shards - 1))
    self.residency.home = home
    self._rel_state = {"params": state.rel_params, "opt": state.rel_opt}
    self.total_steps += step_in_bucket
    return total_loss, total_edges

  def _bound_inflight(self, results: list) -> None:
    """Waits for the call MAX_INFLIGHT_CALLS back when several CPU devices share
    this process (docs/architecture.md, "Fixed: several fake CPU devices"):
    XLA:CPU launches each device's part of a multi-device program on a pool of
    max(cores, devices) threads, and a launch that finds its device's 32
    in-flight computations taken blocks its thread; with every other thread
    inside an all-reduce waiting for that device, nothing moves again.
    Dispatching at most a few calls ahead keeps the launches from ever
    blocking."""
    if _dispatch_bounded(self.mesh) and len(results) > MAX_INFLIGHT_CALLS:
      results[-MAX_INFLIGHT_CALLS - 1].block_until_ready()

  def run(self, stop_after_buckets: int | None = None) -> list[dict]:
    """Trains the remaining epochs; returns the per-epoch history."""
    config = self.config
    plan = schedule.training_plan(
        config.train.bucket_order, self.graph.bucket_grid, config.train.seed,
        config.train.epochs, **self.cursor,
        blocks_of=lambda bucket: residency_lib.bucket_blocks(self.graph, bucket))
    total = self.graph.num_edges("train")
    bar = tqdm(total=total * config.train.epochs, initial=total * self.cursor["epoch"],
               unit="edge", unit_scale=True, desc=f"train {config.name}",
               disable=not self.progress)
    stream = device_batching.open_stream(plan, self.graph, self.layout, config,
                                         self.residency.layout_of, self.mesh)
    compiling = precompile_steps(self) if plan else None
    self._epoch_totals, self._last_finish = (0.0, 0, 0.0), time.perf_counter()
    self.last_checkpoint_time = self._last_finish  # checkpoint_now's interval starts here
    pending = None
    try:
      for position, (epoch, index, bucket) in enumerate(plan):
        if self.early_stop.stopped:  # validation stopped improving (early_stopping.py)
          break
        self.residency.load(bucket)
        if position + 1 < len(plan) and config.storage.prefetch:
          self.residency.prefetch(plan[position + 1][2])
        if compiling is not None:  # the step's first call must find its program compiled
          compiling, _ = None, compiling.join()
        losses, edges = self.train_bucket(epoch, index, stream.bucket_calls(epoch, index))
        dispatched = _PendingBucket(position, epoch, index, bucket, losses, edges,
                                    self.total_steps)
        # The previous bucket is finished (waited for, logged) only now, with
        # this one's swap and steps queued behind it: the host's swap work
        # overlaps its steps. A bucket after which state is saved or read
        # (epoch end, checkpoint, stop) is finished before anything follows,
        # and so is every bucket on several CPU devices (_bound_inflight).
        if pending is not None:
          self._finish_bucket(pending, bar)
        pending = dispatched
        stop = stop_after_buckets is not None and position + 1 >= stop_after_buckets
        if stop or _dispatch_bounded(self.mesh) or _state_used_after(config, plan, position):
          self._finish_bucket(pending, bar)
          pending = None
          if stop:
            return self.history
    finally:
      stream.close()
      bar.close()
      self.checkpointer.wait()  # the last checkpoint final when training returns
    self.flush()
    if self.primary:
      reporting.plot_training(self.history, self.workdir)
    return self.history

  def _finish_bucket(self, done: _PendingBucket, bar) -> None:
    """Waits for a dispatched bucket's steps, logs it, moves the cursor past
    it, and ends the epoch / saves a checkpoint where one is due. The
    bucket's seconds run from the previous bucket's finish."""
    loss, edges = bucket_totals(done.losses, done.edges)
    now = time.perf_counter()
    elapsed, self._last_finish = now - self._last_finish, now
    epoch_loss, epoch_edges, epoch_s = (0.0, 0, 0.0) if done.index == 0 else self._epoch_totals
    self._epoch_totals = (epoch_loss + loss, epoch_edges + edges, epoch_s + elapsed)
    bar.update(edges)
    bar.set_postfix(epoch=done.epoch, loss=f"{loss / max(edges, 1):.4f}")
    self.log.bucket({"epoch": done.epoch, "bucket": list(done.bucket),
                     "bucket_index": done.index, "loss": loss / max(edges, 1), "edges": edges,
                     "seconds": elapsed, "edges_per_s": edges / max(elapsed, 1e-9)},
                    done.total_steps)
    end_of_epoch = done.index + 1 == self.graph.bucket_grid[0] * self.graph.bucket_grid[1]
    self.cursor = {"epoch": done.epoch + 1, "bucket": 0} if end_of_epoch else {
        "epoch": done.epoch, "bucket": done.index + 1}
    if end_of_epoch:
      self._end_epoch(done.epoch, *self._epoch_totals)
    if checkpoint_now(self, done.position, end_of_epoch):
      self.save_checkpoint()

  def _end_epoch(self, epoch, loss, edges, seconds) -> None:
    rates = early_stopping.learning_rates(self.config, self.early_stop)  # this epoch's rates
    record = {"epoch": epoch, "loss": loss / max(edges, 1), "edges": edges, "seconds": seconds,
              "edges_per_s": edges / max(seconds, 1e-9), "lr": rates}
    every = self.config.train.eval_every_epochs
    if every and ((epoch + 1) % every == 0 or epoch + 1 == self.config.train.epochs) \
        and self.graph.num_edges("valid") > 0:
      metrics = self.evaluate("valid", max_triples=self.config.eval.max_triples)
      record["valid"] = {k: metrics[k] for k in ("mrr", "mr", "hits@1", "hits@10", "auc")}
      # Early stopping: sets early_stop.stopped; on the last epoch restores the best one.
      best_checkpoint.after_validation(self, epoch, record["valid"])
      record["best_epoch"] = self.early_stop.best_epoch
    self.history.append(record)
    self.log.epoch(record, self.total_steps, rates,
                   training_log.resident_row_norms(self.residency.home, self.residency.layout))

  def evaluate(self, split: str, max_triples: int = 0, progress: bool | None = None):
    """Ranking metrics of a split; max_triples=0 ranks every triple."""
    from twhin_jax import evaluation  # evaluation imports the trainer's callers' modules
    return evaluation.evaluate(
        self.graph, self.embeddings(), self.rel_state["params"], self.layout, self.config,
        split, progress=self.progress if progress is None else progress, max_triples=max_triples)

  def close(self) -> None:
    self.residency.close()
    self.checkpointer.close()
    self.log.close()


def checkpoint_meta(trainer: Trainer) -> dict:
  """A checkpoint's meta (checkpoint.py) at the trainer's cursor; the slot map
  names the slots the latest writes went to."""
  return {
      "cursor": trainer.cursor,
      "total_steps": trainer.total_steps,
      "seed": trainer.config.train.seed,
      "slots": {f"{t}/{p}": s for (t, p), s in trainer.slots.current.items()},
      "config": config_lib.to_json_dict(trainer.config),
      "lineage": trainer.lineage,
      "history": trainer.history,
      "early_stopping": trainer.early_stop.to_json(),
      "mesh": {"devices": trainer.num_shards, "processes": jax.process_count()},
  }


def background_checkpoints(config, mesh) -> bool:
  """Whether checkpoints write the tables while the next steps run
  (``train.background_checkpoints``). "auto": on a GPU or TPU, where the
  snapshot of the resident rows sits in device memory and the host is
  otherwise idle; on CPU the snapshot would double the resident rows in host
  memory and its writes take the cores the steps use. One process only
  (several processes agree on every write with a barrier)."""
  setting = config.train.get("background_checkpoints", "auto")
  if jax.process_count() > 1 or setting == "off":
    return False
  return setting == "on" or sharding_lib.on_accelerator(mesh)


def table_options(config) -> dict:
  """The working tables' backend options (TensorStore's) from the config."""
  return dict(zarr_format=config.storage.zarr_format,
              coordinate_accumulators=config_lib.coordinate_accumulators(config),
              sync_each_write=config_lib.storage_sync(config) == "write")


def make_writes_durable(trainer: Trainer) -> None:
  """Before a checkpoint names the tables' latest writes: puts them on disk
  with one sync of the tables (``storage.sync = "checkpoint"``); with "write"
  each write already was, with "none" the operating system decides when."""
  if config_lib.storage_sync(trainer.config) == "checkpoint":
    trainer.tables.sync()


def sharding_report(trainer: Trainer) -> dict[str, str]:
  """'shape dtype PartitionSpec' of every array the training step touches:
  working tables and accumulators per dim, the ring's visiting copies and
  snapshots, relation parameters and optimizer state (pinned by a golden
  file in tests/test_sharded.py)."""
  start = sharding_lib.ring_ops(trainer.mesh)[0]
  home = trainer.residency.home
  ring = {dim: dict(zip(("visiting", "visiting_acc", "snapshot", "snapshot_acc"),
                        start(rows.table, rows.acc))) for dim, rows in home.items()}
  return sharding_lib.describe({
      "tables": {dim: rows.table for dim, rows in home.items()},
      "adagrad": {dim: rows.acc for dim, rows in home.items()},
      "ring": ring, "relations": trainer._rel_state})


def train(config, workdir: str, *, progress: bool = True,
          stop_after_buckets: int | None = None) -> Trainer:
  """Trains (or resumes) the run in ``workdir``; returns the trainer."""
  trainer = Trainer(config, workdir, progress=progress)
  trainer.run(stop_after_buckets=stop_after_buckets)
  return trainer


def train_networks(config, workdir: str, *, progress: bool = True) -> dict[str, str]:
  """Imports once into ``workdir`` and trains every network of
  ``config.networks`` as its own run (networks.py); returns name -> run dir."""
  graph = prepare_graph(config, workdir, progress)
  declared = networks.declared(config)
  for message in networks.coverage_warnings(graph.manifest, declared):
    print(f"[twhin] warning: {message}", flush=True)
  runs = {}
  for network in declared:
    run_dir = networks.network_dir(workdir, network["name"])
    view = os.path.join(run_dir, GRAPH_DIR)
    if not os.path.exists(os.path.join(view, networks.NETWORK_FILE)):
      os.makedirs(run_dir, exist_ok=True)
      networks.create_view(graph, view, network["name"], network["relations"])
    train(networks.network_config(config, network), run_dir, progress=progress).close()
    runs[network["name"]] = run_dir
  return runs
