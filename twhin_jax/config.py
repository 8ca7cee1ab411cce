"""Graph schema and run configuration.

A run is described by one ``ml_collections.ConfigDict`` built by a Python file
in ``configs/`` (``get_config(variant)``), overridable from the command line
(``--config.train.lr=0.05``); :func:`load_config` does both. :func:`validate`
is the single place that checks it; every error is a ``ValueError`` that names
the offending field, including a field the schema does not have (a misspelt
``c.train.learning_rate`` is an error, not a silent no-op).

The names a field may take live beside what they name: losses in
``losses.LOSSES``, operators and comparators in ``model.OPERATORS`` /
``model.COMPARATORS``, storage drivers in ``storage``'s registry. They import
jax, so :func:`validate` reads the first two when it runs; this module (and
``rundir``, which reads a run's config) stays importable without jax.

Layout of a config (every field is read somewhere; see the field comments)::

  entities:   {name: {num_partitions, dim}}           entity types
  relations:  [{name, source, target, operator, weight}]
  data:       where the edges come from (see :data:`FILE_SPEC_FIELDS`)
  model:      dim, comparator, init_scale, reciprocal, regularization, regularizer
  train:      epochs, batch_size, lr, relation_lr, loss, margin, seed,
              bucket_order, checkpoint_every_buckets, checkpoint_every_seconds,
              eval_every_epochs,
              early_stop_{metric,patience,min_delta,min_epochs},
              lr_plateau_{patience,factor}, batch_preparation,
              background_checkpoints
  negatives:  chunk_size (C: batch negatives), num_uniform (U)
  eval:       splits, batch_size, filtered, num_sampled_negatives, max_triples
  warm_start: parent, new_entities, l2_to_previous
  mesh:       num_devices, schedule, round_passes
  storage:    driver, zarr_format, prefetch, sync
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import os
import re
from typing import Any

import ml_collections

from twhin_jax import networks
from twhin_jax import storage

BUCKET_ORDERS = ("random", "inside_out", "outside_in", "affinity", "sequential")
FILE_FORMATS = ("tsv", "csv", "parquet", "adjacency")
IMPORT_ENGINES = ("duckdb", "spark")
SPLITS = ("train", "valid", "test")
MESH_SCHEDULES = ("ring", "tournament")
#: storage.sync: when table writes are made durable (see base_config).
STORAGE_SYNCS = ("checkpoint", "write", "none")
ON_ERROR = ("raise", "skip")
EARLY_STOP_METRICS = ("mrr", "hits@1", "hits@10", "auc", "mr")  # early_stopping.METRICS
#: train.batch_preparation (device_batching.PATHS; config.py does not import jax).
BATCH_PREPARATIONS = ("auto", "host", "device")
#: train.background_checkpoints (train.background_checkpoints resolves "auto").
BACKGROUND_CHECKPOINTS = ("auto", "on", "off")
#: train.checkpoint_every_seconds = None ("auto") on a GPU or TPU: an epoch
#: there can take under a second (P=1), and writing its whole table each
#: epoch held the H200 trainer to 36% of its step; at most one checkpoint a
#: minute let it run at 105-110% (docs/results.md, the second H200 lease).
AUTO_CHECKPOINT_SECONDS = 60.0
REGULARIZERS = ("l2", "n3")  # regularizers.REGULARIZERS

#: Keys of one entry of ``config.data.files``. An entry reads one file (plain,
#: ``.gz`` or Parquet) and maps its columns to edges:
#:   path            file path; ``$TWHIN_DATA_DIR`` and ``~`` are expanded.
#:   format          "tsv" | "csv" | "parquet" (default: from the suffix), or
#:                   "adjacency": lines "source target target ..." of one
#:                   relation (relation=None, relation_name set).
#:   header          the first line is a header to skip (text formats).
#:   split           "train" | "valid" | "test": which edge set it feeds.
#:   source, target  column index (int) or name (Parquet) of the endpoints.
#:   relation        column index/name holding the relation name, or None when
#:                   the file holds one relation named by ``relation_name``.
#:   relation_name   fixed relation for every row; with ``relation`` set it is
#:                   a format string applied to the column value ("rated_{}").
#:   weight          column index/name of an edge weight, or None.
FILE_SPEC_FIELDS = ("path", "format", "header", "split", "source", "target",
                    "relation", "relation_name", "weight")


def file_spec(path: str, *, split: str = "train", source: int | str = 0,
              target: int | str = 2, relation: int | str | None = 1,
              relation_name: str | None = None, weight: int | str | None = None,
              header: bool = False, format: str | None = None) -> dict:
  """One entry of ``config.data.files`` (see :data:`FILE_SPEC_FIELDS`)."""
  return dict(path=path, format=format, header=header, split=split,
              source=source, target=target, relation=relation,
              relation_name=relation_name, weight=weight)


def base_config() -> ml_collections.ConfigDict:
  """Defaults shared by every experiment config."""
  c = ml_collections.ConfigDict()
  c.name = "run"
  # Entity types: name -> {num_partitions, dim}. dim=0 means model.dim.
  c.entities = ml_collections.ConfigDict()
  # Relations: list of dicts {name, source, target, operator, weight}.
  c.relations = []
  # Networks over one import (networks.py, paper Sec. 4.3): a list of
  # {"name", "relations"}; each trains its own tables in <run>/networks/<name>.
  # Empty: one model of every relation in <run> itself.
  c.networks = []

  c.data = ml_collections.ConfigDict()
  c.data.files = []  # list of file_spec(...) dicts
  # Generated graphs (the demo) instead of files: name of a generator in
  # twhin_jax.generate and its keyword arguments.
  c.data.generator = ""
  c.data.generator_args = ml_collections.ConfigDict()
  c.data.delimiter = ""  # "" -> by format: tab for tsv, comma for csv
  # Entity names shared by all types (knowledge graphs): a name seen under two
  # types is an error. False for datasets whose ids are per type (users and
  # artists both numbered from 1).
  c.data.names_global = True
  c.data.on_error = "raise"  # "skip" drops and counts bad lines instead
  # Edges drawn from the train files into valid/test when the dataset has no
  # split of its own (fractions, seeded by train.seed).
  c.data.valid_fraction = 0.0
  c.data.test_fraction = 0.0
  # The import (docs/import.md): "duckdb" (one machine, out of core) or
  # "spark" (pyspark; a cluster, or local[*]).
  c.data.import_engine = "duckdb"
  # DuckDB's memory limit; it spills to disk under the graph's work dir.
  c.data.import_memory_limit = "1GB"
  c.data.import_threads = 0  # DuckDB threads; 0: every core
  # Spark master for import_engine "spark" ("" -> local[*]).
  c.data.spark_master = ""
  # Drop valid/test edges whose entity has no train edge (such entities get
  # no id); they are counted in the manifest either way.
  c.data.drop_unseen_eval_entities = False

  c.model = ml_collections.ConfigDict()
  c.model.dim = 100
  c.model.comparator = "dot"
  c.model.init_scale = 1e-3  # entity rows ~ N(0, init_scale^2)
  # Reverse-direction relation parameters for source corruption (see model.py).
  c.model.reciprocal = False
  # lambda of a penalty on the entity rows of each step's positive edges
  # (regularizers.py): "l2" squared norms, "n3" cubed (complex) moduli
  # (Lacroix et al. 2018).
  c.model.regularization = 0.0
  c.model.regularizer = "l2"
  # Also penalise the relation parameters each positive edge uses, with the
  # same lambda and norm (Lacroix et al. penalise all three factors of a
  # score): without it a trilinear score (diagonal, complex_diagonal) can move
  # its scale from the entity rows into the free relation parameters, and the
  # penalty on the rows stops constraining the model. Needs relation_init
  # "random": parameters that start at the identity (modulus 1) are pulled to
  # the zero map first (regularizers.py).
  c.model.regularize_relations = False
  # How relation parameters start: "identity" (every operator a no-op,
  # PyTorch-BigGraph's choice) or "random" (N(0, init_scale^2), as the rows).
  c.model.relation_init = "identity"
  # Probability that a relation parameter is zeroed for a chunk in training
  # (inverted dropout; LibKGE's best ComplEx on FB15k-237 drops 0.44).
  c.model.relation_dropout = 0.0
  # Chunk score matmuls (model.compare_all's precision): "float32", "tf32" (NVIDIA GPU),
  # "bfloat16" (bf16 operands, fp32 sums), or "auto" (tf32 on GPU, float32
  # elsewhere). Tables and Adagrad state are float32 in every case.
  c.model.matmul_precision = "auto"

  c.train = ml_collections.ConfigDict()
  # The most epochs; training stops earlier when the validation metric has not
  # improved for early_stop_patience evaluations (early_stopping.py), and the
  # run ends on its best epoch's values.
  c.train.epochs = 10
  c.train.batch_size = 1000  # edges per jitted step (a whole number of chunks)
  c.train.lr = 0.1  # sparse Adagrad for entity rows
  # Adagrad accumulators of the entity rows: "row" (one float a row,
  # PyTorch-BigGraph's row-wise Adagrad: the tables' memory grows by 1/d) or
  # "coordinate" (one per coordinate, torch.optim's Adagrad, which the
  # published ComplEx / DistMult recipes use: the memory doubles).
  c.train.entity_accumulators = "row"
  c.train.relation_lr = 0.1  # Adagrad for relation parameters
  c.train.loss = "logistic"
  c.train.margin = 0.1  # ranking loss only
  c.train.seed = 0
  # inside_out: PyTorch-BigGraph's default. affinity: the fewest partition
  # swaps out of core (with one entity type about P^2/2 loads an epoch, not P^2).
  c.train.bucket_order = "inside_out"
  c.train.checkpoint_every_buckets = 1  # 0: only at the end of each epoch
  # A checkpoint that is due (above, or an epoch's end) is skipped while less
  # than this many seconds have passed since the run's last one; the run's
  # last bucket always saves. 0: every due checkpoint. For epochs of seconds
  # (a GPU, P=1), where writing the whole table each epoch costs more than
  # training it; a resumed run replays, bit for bit, what was not saved.
  # None ("auto"): AUTO_CHECKPOINT_SECONDS on a GPU or TPU, 0 on CPU
  # (train.checkpoint_interval).
  c.train.checkpoint_every_seconds = None
  c.train.eval_every_epochs = 1  # validation MRR per epoch; 0 disables
  c.train.early_stop_metric = "mrr"  # a key of the validation record (early_stopping.METRICS)
  # Evaluations without improvement before stopping; 0: never stop early. 10,
  # not 3: small graphs have noisy validation (Nations, 199 valid triples,
  # stopped at epoch 14 with patience 3, test MRR 0.449; patience 10 trained
  # on to the 50-epoch cap, 0.604). LibKGE and PyKEEN default to 20-25 epochs.
  c.train.early_stop_patience = 10
  c.train.early_stop_min_delta = 0.0  # smallest change that counts as an improvement
  c.train.early_stop_min_epochs = 5  # never stop before this many epochs
  # Learning rates fall on a plateau (early_stopping.py; PyTorch's
  # ReduceLROnPlateau): every lr_plateau_patience evaluations without
  # improvement multiply both rates by lr_plateau_factor. 0: constant rates.
  c.train.lr_plateau_patience = 0
  c.train.lr_plateau_factor = 0.5
  # Where each call's batches are formed: "host" (numpy, batching.py),
  # "device" (inside jit from raw edge slices, device_batching.py; one device
  # in one process, else the host path runs) or "auto" (device on GPU/TPU,
  # host on CPU).
  c.train.batch_preparation = "auto"
  # Checkpoints that write the tables while the next steps run: "on", "off"
  # or "auto" (on a GPU or TPU with one process; train.background_checkpoints).
  # The device holds a snapshot of the resident rows until they are written;
  # the checkpoint is final only after them, so a kill leaves the one before.
  c.train.background_checkpoints = "auto"

  c.negatives = ml_collections.ConfigDict()
  c.negatives.chunk_size = 50  # C: edges sharing negatives (batch negatives)
  c.negatives.num_uniform = 50  # U: uniform negatives per chunk and side
  # Sampled-softmax correction: subtract log(expected count) from negative
  # logits so degree-proportional batch negatives do not cancel popularity
  # (softmax loss only; see step.StepBatch).
  c.negatives.logq_correction = False
  # Chunks mix the relations of one parameter group between the same two
  # entity types (PyTorch-BigGraph's dynamic relations), so batch negatives
  # follow the types' overall degrees instead of one relation's answers.
  # Needs model.reciprocal (each edge's operator acts on its own query side).
  c.negatives.mix_relations = False
  # Score every edge against *every* row of the corrupted type's loaded
  # (sub-)partition instead of C batch + U uniform negatives: the exact
  # softmax of 1-vs-all training (Lacroix et al. 2018; LibKGE's 1vsAll), for
  # graphs whose types fit a [batch, rows] score matrix (knowledge graphs).
  # num_uniform and logq_correction are then unused, and batch negatives are
  # dropped (every chunk entity is among the rows already); a large
  # chunk_size (= batch_size) shares one pass over the rows by the batch.
  c.negatives.all_candidates = False
  # With several devices, score every edge against the uniform candidates
  # (or, with all_candidates, the rows) of *all* devices, not only its own
  # device's 1/G of the type: a distributed softmax, so G devices see the
  # candidates one device sees (step.global_uniform_lse). "auto": on with
  # mesh.schedule "tournament" (exact there) for the softmax loss when every
  # parameter group joins one (source, target) type pair
  # (global_candidates_obstacle below; the default); "on" demands it (the
  # ring too); "off": each device's softmax sees its own rows. FB15k-237 on 4
  # fake devices with the tournament: test MRR 0.278 off, 0.301 auto, 0.309 on
  # one device (docs/architecture.md, "FB15k-237 on 1, 2, 4 and 8
  # devices"). Runs saved before the default changed keep "off"
  # (global_candidates reads a missing field as "off").
  c.negatives.global_candidates = "auto"

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 256  # queries ranked per device call
  c.eval.filtered = True
  # 0: rank against every entity of the type; N > 0: sampled ranking against
  # N uniform + N degree-proportional negatives (graphs too large to rank).
  c.eval.num_sampled_negatives = 0
  # Per-epoch validation ranks a seeded subsample of this many triples (0: all);
  # `twhin eval` always ranks the whole split.
  c.eval.max_triples = 0

  # A new version of an earlier run (paper Sec. 7.2; see versions.py).
  c.warm_start = ml_collections.ConfigDict()
  c.warm_start.parent = ""  # the earlier run's workdir; "" trains from scratch
  c.warm_start.new_entities = "random"  # or "neighbors" (paper Eq. 5)
  # alpha of alpha * |theta_v - theta_v^prev|^2 on the rows each step touches.
  c.warm_start.l2_to_previous = 0.0

  c.mesh = ml_collections.ConfigDict()
  # Devices the working tables are sharded over (0: every visible device, on
  # every host). See sharding.py for the ring schedule.
  c.mesh.num_devices = 0
  # How a bucket's rounds share rows among the devices: "ring" (G rounds; a
  # type that is source and target of the bucket gets two devices' updates
  # summed) or "tournament" (2G - 1 rounds, no row on two devices at once:
  # G devices train what one device trains; twhin_jax/device_schedule.py).
  c.mesh.schedule = "ring"
  # Tournament only: how many times a bucket cycles through its 2G - 1
  # rounds, each pass training a near-equal 1/K slice of every (slot, slot)
  # cell, so that consecutive steps cover all cells as one device's shuffled
  # order does instead of one round's cells for many steps
  # (device_schedule.round_passes). 0: automatic.
  c.mesh.round_passes = 0

  c.storage = ml_collections.ConfigDict()
  c.storage.driver = storage.DEFAULT_DRIVER  # a name registered with storage.register_storage
  c.storage.zarr_format = 3
  c.storage.prefetch = True  # load the next bucket's partitions in background
  # When table writes reach the disk (not only the operating system's cache):
  # "checkpoint": once per checkpoint, before it is saved, for every write
  # since the last (one syncfs); "write": each write (TensorStore's fsync per
  # chunk file, the slowest); "none": left to the operating system, so a
  # checkpoint survives a killed process but not a crashed machine.
  c.storage.sync = "checkpoint"
  return c


def coordinate_accumulators(config) -> bool:
  """Whether entity rows keep one Adagrad accumulator per coordinate
  (``train.entity_accumulators``; configs saved before it existed: per row)."""
  return config.train.get("entity_accumulators", "row") == "coordinate"


def storage_sync(config) -> str:
  """When table writes reach the disk (``storage.sync``, STORAGE_SYNCS;
  configs saved before it existed: "checkpoint", what such runs resume with)."""
  return config.storage.get("sync", "checkpoint")


def entity_dim(config, entity_type: str) -> int:
  dim = int(config.entities[entity_type].get("dim", 0) or 0)
  return dim if dim > 0 else int(config.model.dim)


def num_partitions(config) -> int:
  """The partition count P shared by all partitioned types (others have 1)."""
  counts = {int(e.num_partitions) for e in config.entities.values()}
  return max(counts) if counts else 1


def resolve_path(path: str) -> str:
  """Expands ``$TWHIN_DATA_DIR`` (and other variables) and ``~`` in a path."""
  expanded = os.path.expanduser(os.path.expandvars(path))
  if "$TWHIN_DATA_DIR" in path and "TWHIN_DATA_DIR" not in os.environ:
    raise FileNotFoundError(
        f"{path}: TWHIN_DATA_DIR is not set; point it at the datasets folder "
        "(for example ../shared/data)")
  return expanded


def data_dir() -> str | None:
  return os.environ.get("TWHIN_DATA_DIR")


def _fail(field: str, message: str):
  raise ValueError(f"config.{field}: {message}")


#: Keys of one entry of ``config.entities`` and of ``config.relations``.
ENTITY_FIELDS = ("num_partitions", "dim")
RELATION_FIELDS = ("name", "source", "target", "operator", "weight")
#: Sub-trees whose keys are the user's (names of types, generator arguments).
_FREE_FORM = ("entities", "data.generator_args")


def _unknown_fields(config, schema, prefix: str = "") -> list[str]:
  """Dotted names of the fields of ``config`` that ``schema`` lacks."""
  unknown = []
  for key in config.keys():
    field = f"{prefix}{key}"
    if key not in schema:
      unknown.append(field)
    elif field not in _FREE_FORM and isinstance(schema[key], ml_collections.ConfigDict):
      if isinstance(config[key], ml_collections.ConfigDict):
        unknown.extend(_unknown_fields(config[key], schema[key], f"{field}."))
  return unknown


def _check_schema(config) -> None:
  """Every field is one :func:`base_config` defines (a typo is not ignored)."""
  schema = base_config()
  unknown = _unknown_fields(config, schema)
  if unknown:
    known = sorted(schema[unknown[0].rsplit(".", 1)[0]].keys()) if "." in unknown[0] \
        else sorted(schema.keys())
    _fail(unknown[0], f"unknown field (misspelt? the fields here are {known})")
  for name, entity in config.entities.items():
    if not isinstance(entity, (dict, ml_collections.ConfigDict)):
      _fail(f"entities.{name}", f"must be a dict of {ENTITY_FIELDS}, got {entity!r}")
    extra = sorted(set(entity.keys()) - set(ENTITY_FIELDS))
    if extra:
      _fail(f"entities.{name}.{extra[0]}", f"unknown field (fields: {ENTITY_FIELDS})")
  for i, rel in enumerate(config.relations):
    if not isinstance(rel, (dict, ml_collections.ConfigDict)):
      _fail(f"relations[{i}]", f"must be a dict of {RELATION_FIELDS}, got {rel!r}")
    extra = sorted(set(rel.keys()) - set(RELATION_FIELDS))
    if extra:
      _fail(f"relations[{i}].{extra[0]}", f"unknown field (fields: {RELATION_FIELDS})")


#: negatives.global_candidates: "auto" (the default: on where it applies),
#: "on" (the config must allow it) or "off" (each device's softmax sees its
#: own rows).
GLOBAL_CANDIDATE_SETTINGS = ("auto", "on", "off")


def global_candidates_obstacle(config) -> str | None:
  """Why the sharded step cannot score every query against all devices'
  candidates under ``config``, or None when it can.

  The softmax decomposes over devices (a distributed logsumexp); the other
  losses are not written for it. The devices' chunks at one position of a
  call belong to one parameter group but may be of different relations, so
  the candidates a device drew for its chunk serve every device's chunk
  only when the group's relations join a single (source type, target type)
  pair (knowledge graphs, one-type graphs)."""
  if config.train.loss != "softmax":
    return f"it needs train.loss 'softmax', got {config.train.loss!r}"
  pairs: dict[tuple[str, int], set[tuple[str, str]]] = {}
  for rel in config.relations:
    dim = int(config.entities[rel["source"]].get("dim", 0) or 0) or int(config.model.dim)
    pairs.setdefault((rel["operator"], dim), set()).add((rel["source"], rel["target"]))
  mixed = [f"{op}:{dim}" for (op, dim), types in sorted(pairs.items()) if len(types) > 1]
  if mixed:
    return (f"the relations of parameter group(s) {', '.join(mixed)} join several "
            f"(source, target) type pairs")
  return None


def global_candidates(config) -> bool:
  """Whether sharded steps use global candidates (config.negatives.global_candidates).

  "auto": with mesh.schedule "tournament", wherever global_candidates_obstacle
  finds nothing against it: rows are disjoint across devices there, so a
  step equals the one-device step over the same edges and candidates. The
  ring updates a same-type block's home rows and its visiting copy at once
  (sharding.py), and candidates from every device would add to those
  summed updates, so it takes them only with "on". Only a mesh of more than
  one device uses them (step.make_train_steps)."""
  setting = config.negatives.get("global_candidates", "off")
  if setting == "off" or global_candidates_obstacle(config) is not None:
    return False
  return setting == "on" or config.mesh.get("schedule", "ring") == "tournament"


def validate(config) -> None:
  """Checks a config once, at start-up; raises ValueError naming the field."""
  # losses and model import jax: read here, not at module level (see the module doc).
  from twhin_jax import losses
  from twhin_jax import model  # lazy, as losses above
  _check_schema(config)
  if not config.entities:
    _fail("entities", "no entity types declared")
  partition_counts = set()
  for name, entity in config.entities.items():
    parts = entity.get("num_partitions", None)
    if not isinstance(parts, int) or parts < 1:
      _fail(f"entities.{name}.num_partitions", f"must be an int >= 1, got {parts!r}")
    if parts > 1:
      partition_counts.add(parts)
    dim = entity.get("dim", 0)
    if not isinstance(dim, int) or dim < 0:
      _fail(f"entities.{name}.dim", f"must be an int >= 0, got {dim!r}")
  if len(partition_counts) > 1:
    _fail("entities", "all partitioned types must share one partition count, "
          f"got {sorted(partition_counts)}")
  if not config.relations:
    _fail("relations", "no relations declared")
  seen = set()
  for i, rel in enumerate(config.relations):
    field = f"relations[{i}]"
    for key in ("name", "source", "target", "operator"):
      if key not in rel:
        _fail(field, f"missing key {key!r}")
    if rel["name"] in seen:
      _fail(f"{field}.name", f"duplicate relation name {rel['name']!r}")
    seen.add(rel["name"])
    for side in ("source", "target"):
      if rel[side] not in config.entities:
        _fail(f"{field}.{side}", f"unknown entity type {rel[side]!r} "
              f"(declared: {sorted(config.entities.keys())})")
    if rel["operator"] not in model.OPERATORS:
      _fail(f"{field}.operator", f"{rel['operator']!r} not in {tuple(model.OPERATORS)}")
    weight = rel.get("weight", 1.0)
    if not isinstance(weight, (int, float)) or not weight > 0:
      _fail(f"{field}.weight", f"must be a positive number, got {weight!r}")
    src_dim = entity_dim(config, rel["source"])
    dst_dim = entity_dim(config, rel["target"])
    if src_dim != dst_dim:
      _fail(f"{field}", f"source and target dims differ ({src_dim} vs {dst_dim})")
    if rel["operator"] in model.COMPLEX_OPERATORS and src_dim % 2:
      _fail(f"{field}.operator", f"{rel['operator']} needs an even dim, got {src_dim}")

  networks.validate_networks(config, _fail)

  if bool(config.data.files) == bool(config.data.generator):
    _fail("data", "set exactly one of data.files and data.generator")
  for i, spec in enumerate(config.data.files):
    field = f"data.files[{i}]"
    unknown = set(spec) - set(FILE_SPEC_FIELDS)
    if unknown:
      _fail(field, f"unknown keys {sorted(unknown)}")
    if not spec.get("path"):
      _fail(f"{field}.path", "missing")
    if spec.get("format") not in (None,) + FILE_FORMATS:
      _fail(f"{field}.format", f"{spec.get('format')!r} not in {FILE_FORMATS}")
    if spec.get("split", "train") not in SPLITS:
      _fail(f"{field}.split", f"{spec.get('split')!r} not in {SPLITS}")
    if spec.get("relation") is None and not spec.get("relation_name"):
      _fail(field, "needs a relation column or a relation_name")
    fixed = spec.get("relation_name")
    if spec.get("relation") is None and fixed not in seen:
      _fail(f"{field}.relation_name", f"unknown relation {fixed!r}")
  if config.data.on_error not in ON_ERROR:
    _fail("data.on_error", f"{config.data.on_error!r} not in {ON_ERROR}")
  for key in ("valid_fraction", "test_fraction"):
    value = config.data[key]
    if not 0.0 <= value < 0.5:
      _fail(f"data.{key}", f"must be in [0, 0.5), got {value}")
  if config.data.import_engine not in IMPORT_ENGINES:
    _fail("data.import_engine", f"{config.data.import_engine!r} not in {IMPORT_ENGINES}")
  if not re.fullmatch(r"\d+(\.\d+)?\s*[KMGT]i?B", str(config.data.import_memory_limit)):
    _fail("data.import_memory_limit", "must be a size such as '1GB' or '512MiB', got "
          f"{config.data.import_memory_limit!r}")
  if not isinstance(config.data.import_threads, int) or config.data.import_threads < 0:
    _fail("data.import_threads", f"must be an int >= 0, got {config.data.import_threads!r}")
  if not isinstance(config.data.drop_unseen_eval_entities, bool):
    _fail("data.drop_unseen_eval_entities", "must be True or False")

  if config.model.dim < 1:
    _fail("model.dim", f"must be >= 1, got {config.model.dim}")
  if config.model.comparator not in model.COMPARATORS:
    _fail("model.comparator",
          f"{config.model.comparator!r} not in {tuple(model.COMPARATORS)}")
  if config.model.regularizer not in REGULARIZERS:
    _fail("model.regularizer", f"{config.model.regularizer!r} not in {REGULARIZERS}")
  if config.model.regularization < 0:
    _fail("model.regularization", f"must be >= 0, got {config.model.regularization}")
  if config.model.get("relation_init", "identity") not in model.RELATION_INITS:
    _fail("model.relation_init",
          f"{config.model.relation_init!r} not in {model.RELATION_INITS}")
  if not isinstance(config.model.get("regularize_relations", False), bool):
    _fail("model.regularize_relations", "must be True or False")
  if config.model.get("regularize_relations", False) and config.model.relation_init != "random":
    _fail("model.regularize_relations",
          "needs model.relation_init = 'random': a penalty on relations that start at the "
          "identity pulls every relation to the zero map (regularizers.py)")
  if not 0.0 <= config.model.get("relation_dropout", 0.0) < 1.0:
    _fail("model.relation_dropout", f"must be in [0, 1), got {config.model.relation_dropout}")
  if config.train.get("entity_accumulators", "row") not in storage.ACCUMULATORS:
    _fail("train.entity_accumulators",
          f"{config.train.entity_accumulators!r} not in {storage.ACCUMULATORS}")
  if config.model.get("matmul_precision", "auto") not in model.MATMUL_PRECISIONS:
    _fail("model.matmul_precision",
          f"{config.model.matmul_precision!r} not in {model.MATMUL_PRECISIONS}")
  if not config.model.init_scale > 0:
    _fail("model.init_scale", "must be > 0")

  t = config.train
  if t.epochs < 1:
    _fail("train.epochs", f"must be >= 1, got {t.epochs}")
  if t.loss not in losses.LOSSES:
    _fail("train.loss", f"{t.loss!r} not in {tuple(losses.LOSSES)}")
  if isinstance(t.margin, bool) or not isinstance(t.margin, (int, float)) or not t.margin >= 0:
    _fail("train.margin", f"must be a number >= 0, got {t.margin!r}")
  if t.bucket_order not in BUCKET_ORDERS:
    _fail("train.bucket_order", f"{t.bucket_order!r} not in {BUCKET_ORDERS}")
  for key in ("lr", "relation_lr"):
    if not t[key] > 0:
      _fail(f"train.{key}", f"must be > 0, got {t[key]}")
  if t.checkpoint_every_buckets < 0:
    _fail("train.checkpoint_every_buckets", "must be >= 0")
  interval = t.get("checkpoint_every_seconds", None)
  if interval is not None and (isinstance(interval, bool) or not isinstance(interval, (int, float))
                               or not interval >= 0):
    _fail("train.checkpoint_every_seconds", f"must be a number >= 0 or None (auto), "
          f"got {interval!r}")
  if t.eval_every_epochs < 0:
    _fail("train.eval_every_epochs", "must be >= 0")
  if t.early_stop_metric not in EARLY_STOP_METRICS:
    _fail("train.early_stop_metric", f"{t.early_stop_metric!r} not in {EARLY_STOP_METRICS}")
  if not isinstance(t.early_stop_patience, int) or t.early_stop_patience < 0:
    _fail("train.early_stop_patience", f"must be an int >= 0, got {t.early_stop_patience!r}")
  if not isinstance(t.early_stop_min_epochs, int) or t.early_stop_min_epochs < 0:
    _fail("train.early_stop_min_epochs", f"must be an int >= 0, got {t.early_stop_min_epochs!r}")
  if t.early_stop_min_delta < 0:
    _fail("train.early_stop_min_delta", f"must be >= 0, got {t.early_stop_min_delta}")
  if not isinstance(t.lr_plateau_patience, int) or t.lr_plateau_patience < 0:
    _fail("train.lr_plateau_patience", f"must be an int >= 0, got {t.lr_plateau_patience!r}")
  if not 0 < t.lr_plateau_factor <= 1:
    _fail("train.lr_plateau_factor", f"must be in (0, 1], got {t.lr_plateau_factor}")
  if t.batch_preparation not in BATCH_PREPARATIONS:
    _fail("train.batch_preparation", f"{t.batch_preparation!r} not in {BATCH_PREPARATIONS}")
  if t.get("background_checkpoints", "auto") not in BACKGROUND_CHECKPOINTS:
    _fail("train.background_checkpoints",
          f"{t.background_checkpoints!r} not in {BACKGROUND_CHECKPOINTS}")
  n = config.negatives
  if n.chunk_size < 1:
    _fail("negatives.chunk_size", f"must be >= 1, got {n.chunk_size}")
  if n.num_uniform < 0:
    _fail("negatives.num_uniform", f"must be >= 0, got {n.num_uniform}")
  if n.chunk_size == 1 and n.num_uniform == 0 and not n.get("all_candidates", False):
    _fail("negatives", "chunk_size 1 with num_uniform 0 leaves no negatives")
  if not isinstance(n.get("all_candidates", False), bool):
    _fail("negatives.all_candidates", f"must be true or false, got {n.all_candidates!r}")
  global_setting = n.get("global_candidates", "off")
  if global_setting not in GLOBAL_CANDIDATE_SETTINGS:
    _fail("negatives.global_candidates",
          f"must be one of {GLOBAL_CANDIDATE_SETTINGS}, got {global_setting!r}")
  if global_setting == "on" and global_candidates_obstacle(config):
    _fail("negatives.global_candidates",
          f"cannot be 'on': {global_candidates_obstacle(config)}")
  if t.batch_size < n.chunk_size or t.batch_size % n.chunk_size:
    _fail("train.batch_size", f"must be a positive multiple of negatives.chunk_size "
          f"({n.chunk_size}), got {t.batch_size}")
  if n.mix_relations and not config.model.reciprocal:
    _fail("negatives.mix_relations", "needs model.reciprocal = True (source corruption "
          "applies each edge's own reverse operator)")
  if n.logq_correction and t.loss != "softmax":
    _fail("negatives.logq_correction", f"needs train.loss 'softmax', got {t.loss!r}")
  if config.eval.batch_size < 1:
    _fail("eval.batch_size", "must be >= 1")
  if config.eval.num_sampled_negatives < 0:
    _fail("eval.num_sampled_negatives", "must be >= 0")
  if config.eval.max_triples < 0:
    _fail("eval.max_triples", "must be >= 0")
  w = config.warm_start
  if w.new_entities not in ("random", "neighbors"):
    _fail("warm_start.new_entities", f"{w.new_entities!r} not in ('random', 'neighbors')")
  if w.l2_to_previous < 0:
    _fail("warm_start.l2_to_previous", f"must be >= 0, got {w.l2_to_previous}")
  if w.l2_to_previous > 0 and not w.parent:
    _fail("warm_start.l2_to_previous", "needs warm_start.parent (the previous version)")
  if not isinstance(config.mesh.num_devices, int) or config.mesh.num_devices < 0:
    _fail("mesh.num_devices", f"must be an int >= 0, got {config.mesh.num_devices!r}")
  passes = config.mesh.get("round_passes", 0)
  if not isinstance(passes, int) or isinstance(passes, bool) or passes < 0:
    _fail("mesh.round_passes", f"must be an int >= 0 (0: automatic), got {passes!r}")
  if config.mesh.get("schedule", "ring") not in MESH_SCHEDULES:
    _fail("mesh.schedule", f"must be one of {MESH_SCHEDULES}, got {config.mesh.schedule!r}")
  if config.storage.driver not in storage.storage_drivers():
    _fail("storage.driver", f"{config.storage.driver!r} not in {storage.storage_drivers()}")
  if config.storage.zarr_format not in (2, 3):
    _fail("storage.zarr_format", f"must be 2 or 3, got {config.storage.zarr_format}")
  if storage_sync(config) not in STORAGE_SYNCS:
    _fail("storage.sync", f"must be one of {STORAGE_SYNCS}, got {storage_sync(config)!r}")


def relation_names(config) -> list[str]:
  return [rel["name"] for rel in config.relations]


def to_json_dict(config) -> dict[str, Any]:
  return json.loads(config.to_json_best_effort())


def config_hash(config) -> str:
  text = json.dumps(to_json_dict(config), sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def for_external_evaluation(config, *, dim: int, epochs: int, seed: int,
                            eval_every: int = 0) -> ml_collections.ConfigDict:
  """A config whose run is scored outside it (the who-to-follow and
  low-coverage experiments): no valid/test split of its own, only the entity
  types its relations use, checkpoints at epoch ends only, and the given
  dimension, epochs, seed and validation period. In place; returned."""
  config.model.dim = int(dim)
  config.train.epochs = int(epochs)
  config.train.seed = int(seed)
  config.train.eval_every_epochs = int(eval_every)
  used = {t for r in config.relations for t in (r["source"], r["target"])}
  for name in list(config.entities.keys()):
    if name not in used:
      del config.entities[name]
  config.data.valid_fraction = 0.0
  config.data.test_fraction = 0.0
  config.train.checkpoint_every_buckets = 0
  return config


def from_json_dict(data: dict) -> ml_collections.ConfigDict:
  """A stored config, with fields added since it was written at their
  base_config() defaults (a run saved before train.early_stop_* existed
  still opens, and resumes with the same meaning where the default keeps it:
  model.regularizer "l2" is what model.regularization always meant)."""
  def merged(defaults, stored):
    out = dict(defaults)
    for key, value in stored.items():
      out[key] = (merged(defaults[key], value)
                  if isinstance(value, dict) and isinstance(defaults.get(key), dict) else value)
    return out
  return ml_collections.ConfigDict(merged(base_config().to_dict(), data))


# --------------------------------------------------------------------------
# Config files and command-line overrides.


def load_module(path: str, prefix: str = "twhin_config"):
  """Executes a config file (``configs/NAME.py``) as a module; errors name the path."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such config file")
  module_spec = importlib.util.spec_from_file_location(
      f"{prefix}_{abs(hash(os.path.abspath(path)))}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def parse_override(item: str) -> tuple[str, Any]:
  """``--config.train.lr=0.05`` -> ("train.lr", 0.05); a value is a Python
  literal when it parses as one, else a string."""
  if not item.startswith("--config."):
    raise ValueError(f"unrecognised argument {item!r} (overrides look like --config.train.lr=0.05)")
  dotted, sep, raw = item[len("--config."):].partition("=")
  if not sep or not dotted:
    raise ValueError(f"{item!r}: expected --config.FIELD=VALUE")
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    value = raw
  return dotted, value


def apply_override(config, dotted: str, value) -> None:
  """Sets one dotted field; unknown fields and ill-typed values are ValueErrors."""
  node = config
  *parents, leaf = dotted.split(".")
  for name in parents:
    if not isinstance(node, ml_collections.ConfigDict) or name not in node:
      raise ValueError(f"--config.{dotted}: unknown field {name!r}")
    node = node[name]
  if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
    raise ValueError(f"--config.{dotted}: unknown field {leaf!r}")
  current = node[leaf]
  if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  try:
    node[leaf] = value
  except TypeError:
    # ml_collections locks a field's type at its first assignment.
    raise ValueError(f"--config.{dotted}: expected {type(current).__name__}, "
                     f"got {value!r}") from None


def load_config(spec: str, overrides: list[str] = ()):
  """Builds a config from ``path/to/config.py[:variant]`` plus overrides.

  Overrides look like ``--config.train.lr=0.05`` (see :func:`parse_override`).
  The result is not validated; call :func:`validate`.
  """
  path, _, variant = spec.partition(":")
  module = load_module(path)
  if not hasattr(module, "get_config"):
    raise ValueError(f"{path} defines no get_config()")
  config = module.get_config(variant) if variant else module.get_config()
  for item in overrides:
    apply_override(config, *parse_override(item))
  return config
