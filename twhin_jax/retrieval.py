"""Nearest-neighbour retrieval over a trained run: ScaNN indexes and exact search.

A run's embeddings are exported once (``<workdir>/export/<type>.npy``, see
``twhin_jax.export``) and memory-mapped; names are looked up in the export's
copy of the on-disk vocabulary (``export/vocab/``), never loaded whole;
relation parameters (forward and, for reciprocal models, reverse) are copied
next to the indexes. One index per
entity type lives in ``<workdir>/index/<type>/`` with a ``manifest.json``
(backend, settings, N, d, comparator and the checkpoint it was built from);
``Retriever.open`` reloads it and rebuilds only when the checkpoint changed.

Relation-aware queries. The model scores an edge as

    f(s, r, t) = compare(op_r(theta_s), theta_t)                            (1)

so the targets of relation r for a source s are the nearest neighbours of the
query q = op_r(theta_s) (translation: theta_s + theta_r) in the target table
under the comparator's metric:

    dot  ->  maximum inner product:  q . theta_t           (ScaNN "dot_product")
    cos  ->  q / |q| against the row-normalised table, inner product
    l2   ->  minimum squared distance |q - theta_t|^2      (ScaNN "squared_l2"),
             reported as the model's score -|q - theta_t|^2

Reverse direction (sources s of relation r for a target t), ranked by the
same f(s, r, t):

    reciprocal models   q = op_r'(theta_t) with the reverse parameters r',
                        exactly how the model scores source corruption
                        (model.py eq. 1'): any operator, any comparator.
    operator none       q = theta_t, any comparator.
    dot comparator      op_r is affine, op_r(x) = A_r x + b_r, so
                        op_r(x) . theta_t = x . (A_r^T theta_t) + b_r . theta_t:
                        q = A_r^T theta_t (the adjoint: translation theta_t,
                        diagonal p * theta_t, complex_diagonal conj(p) * theta_t,
                        rotation e^{-i phi} theta_t, linear P^T theta_t); the
                        constant is added back.
    l2 + translation    -|x + p - theta_t|^2 = -|x - (theta_t - p)|^2:
                        q = theta_t - p.
    l2 / cos + rotation a rotation keeps norms: compare(R_phi x, theta_t) =
                        compare(x, R_{-phi} theta_t), q = e^{-i phi} theta_t.
    otherwise           (cos or l2 with diagonal/complex/linear) no single
                        query vector exists: the exact path transforms the
                        whole candidate table, op_r(theta_x) for every x, and
                        scores it by brute force (an index request falls back
                        to exact with a warning).

Exact search (ground truth, and the backend of tables under ``EXACT_BELOW``
rows or when ScaNN is not importable) is a jitted scan over blocks of the
device-resident table: a [Q, B] score matmul and a running top-k merge.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import threading
import time
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from twhin_jax import config as config_lib
from twhin_jax import export as export_lib
from twhin_jax import model
from twhin_jax import rundir
from twhin_jax import vocabulary as vocabulary_lib
from twhin_jax.model import RelationLayout, apply_operator

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
INDEX_DIR = rundir.INDEX_DIR
EXPORT_DIR = rundir.EXPORT_DIR
RUN_FILE = "run.json"
RELATIONS_FILE = "relations.npz"
MANIFEST = "manifest.json"
SCANN_DIR = "scann"
#: Tables with fewer rows are searched exactly: brute force over 20k rows is a
#: few milliseconds per query batch, and ScaNN's partitioning buys nothing.
EXACT_BELOW = 20_000
COMPARATORS = ("dot", "cos", "l2")
_SCANN_METRIC = {"dot": "dot_product", "cos": "dot_product", "l2": "squared_l2"}
_EXACT_BLOCK_ROWS = 1 << 14
_MAX_QUERY_BATCH = 1024
_COS_EPS = 1e-9


# ---------------------------------------------------------------------------
# Exact search.


def _normalize_rows(x: np.ndarray) -> np.ndarray:
  return x / (np.linalg.norm(x, axis=-1, keepdims=True) + _COS_EPS)


@functools.partial(jax.jit, static_argnames=("k", "metric"))
def _exact_topk(blocks: jax.Array, row_bias: jax.Array, queries: jax.Array, *, k: int,
                metric: str) -> tuple[jax.Array, jax.Array]:
  """Top-k rows of a blocked table for a batch of queries.

  blocks [NB, B, d]: the table, padded to NB * B rows; row_bias [NB, B]: a
  per-row additive term (-|v|^2 for l2, 0 for dot; -inf on padding rows).
  Scores are q . v + bias (dot) or 2 q . v + bias (l2: the model's -|q - v|^2
  up to the per-query constant -|q|^2, added back by the caller).
  Returns (ids [Q, k] int32, scores [Q, k]).
  """
  num_queries = queries.shape[0]
  block_rows = blocks.shape[1]
  scale = 2.0 if metric == "squared_l2" else 1.0

  def merge(carry, inputs):
    best_scores, best_ids = carry  # [Q, k]
    block, bias, first_row = inputs
    scores = scale * (queries @ block.T) + bias[None, :]  # [Q, B]
    block_scores, block_ids = jax.lax.top_k(scores, k)  # [Q, k]
    scores = jnp.concatenate([best_scores, block_scores], axis=1)  # [Q, 2k]
    ids = jnp.concatenate([best_ids, block_ids + first_row], axis=1)  # [Q, 2k]
    top_scores, where = jax.lax.top_k(scores, k)
    return (top_scores, jnp.take_along_axis(ids, where, axis=1)), None

  init = (jnp.full((num_queries, k), -jnp.inf, queries.dtype),
          jnp.zeros((num_queries, k), jnp.int32))
  first_rows = jnp.arange(blocks.shape[0], dtype=jnp.int32) * block_rows
  (scores, ids), _ = jax.lax.scan(merge, init, (blocks, row_bias, first_rows))
  return ids, scores


class ExactSearcher:
  """Brute-force top-k over one table, on the device, in query batches.

  ``metric`` is "dot_product" or "squared_l2" (cosine: give a normalised
  table and normalised queries with "dot_product"). Scores are larger-is-
  better: the inner product, or -|q - v|^2.
  """

  def __init__(self, table, metric: str, block_rows: int = _EXACT_BLOCK_ROWS):
    if metric not in ("dot_product", "squared_l2"):
      raise ValueError(f"unknown metric {metric!r}")
    table = np.asarray(table, np.float32)
    self.metric = metric
    self.num_rows, self.dim = table.shape
    block_rows = min(block_rows, max(1, 1 << math.ceil(math.log2(max(self.num_rows, 1)))))
    num_blocks = max(1, -(-self.num_rows // block_rows))
    padded = np.zeros((num_blocks * block_rows, self.dim), np.float32)
    padded[:self.num_rows] = table
    bias = np.full(num_blocks * block_rows, -np.inf, np.float32)
    bias[:self.num_rows] = (-np.sum(np.square(table), axis=1) if metric == "squared_l2" else 0.0)
    self.blocks = jnp.asarray(padded.reshape(num_blocks, block_rows, self.dim))  # [NB, B, d]
    self.row_bias = jnp.asarray(bias.reshape(num_blocks, block_rows))  # [NB, B]

  def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64 [Q, k'], scores float32 [Q, k']) with k' = min(k, N)."""
    queries = np.asarray(queries, np.float32).reshape(-1, self.dim)
    k = min(int(k), self.num_rows)
    batch = min(_MAX_QUERY_BATCH, 1 << math.ceil(math.log2(max(len(queries), 1))))
    ids_out, scores_out = [], []
    for start in range(0, len(queries), batch):
      part = queries[start:start + batch]
      padded = np.zeros((batch, self.dim), np.float32)  # fixed shapes: compile once
      padded[:len(part)] = part
      ids, scores = _exact_topk(self.blocks, self.row_bias, jnp.asarray(padded), k=k,
                                metric=self.metric)
      ids, scores = np.asarray(ids)[:len(part)], np.asarray(scores)[:len(part)]
      if self.metric == "squared_l2":
        scores = scores - np.sum(np.square(part), axis=1, keepdims=True)
      ids_out.append(ids.astype(np.int64))
      scores_out.append(scores.astype(np.float32))
    if not ids_out:
      return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
    return np.concatenate(ids_out), np.concatenate(scores_out)


def exact_search(table, queries, k: int, comparator: str) -> tuple[np.ndarray, np.ndarray]:
  """Ground truth: top-k rows of ``table`` [N, d] for ``queries`` [Q, d] by a
  model comparator ("dot", "cos" or "l2"); scores as ``model.compare_all``."""
  if comparator not in COMPARATORS:
    raise ValueError(f"unknown comparator {comparator!r}; choose from {COMPARATORS}")
  table = np.asarray(table, np.float32)
  queries = np.asarray(queries, np.float32)
  if comparator == "cos":
    table, queries = _normalize_rows(table), _normalize_rows(queries)
  return ExactSearcher(table, _SCANN_METRIC[comparator]).search(queries, k)


# ---------------------------------------------------------------------------
# ScaNN.


def import_scann():
  """ScaNN's pybind module, or None (with a warning) when it is not installed."""
  try:
    from scann.scann_ops.py import scann_ops_pybind  # optional: not on every platform
  except ImportError as err:  # pragma: no cover - depends on the platform
    log.warning("scann is not importable (%s): retrieval falls back to exact search", err)
    return None
  return scann_ops_pybind


@dataclasses.dataclass(frozen=True)
class ScannSettings:
  """ScaNN parameters (see ``choose_settings`` for how they follow N)."""
  num_leaves: int
  num_leaves_to_search: int
  training_sample_size: int
  dims_per_block: int
  anisotropic_quantization_threshold: float | None
  reorder: int
  metric: str

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def choose_settings(num_rows: int, dim: int, comparator: str) -> ScannSettings:
  """ScaNN settings from the table size.

  * num_leaves ~ sqrt(N) partitions (k-means tree), trained on at most 250k rows;
  * leaves_to_search ~ 3% of the leaves (at least 30): on 1M x 128
    Gaussian-mixture rows that gave recall@10 0.986 at 67x exact QPS
    (tools/bench_retrieval.py, docs/retrieval.md);
  * asymmetric hashing, 2 dimensions per 16-center codebook (4 bits/dim/2);
  * anisotropic quantization (threshold 0.2, Guo et al. 2020) for inner
    products only, where it is what makes AH scores rank like true MIPS;
  * 200 candidates re-scored exactly in float32 (reorder).
  """
  if comparator not in COMPARATORS:
    raise ValueError(f"unknown comparator {comparator!r}; choose from {COMPARATORS}")
  num_leaves = max(1, int(round(math.sqrt(num_rows))))
  metric = _SCANN_METRIC[comparator]
  return ScannSettings(
      num_leaves=num_leaves,
      num_leaves_to_search=min(num_leaves, max(30, int(round(0.03 * num_leaves)))),
      training_sample_size=min(num_rows, 250_000),
      dims_per_block=2,
      anisotropic_quantization_threshold=0.2 if metric == "dot_product" else None,
      reorder=200,
      metric=metric)


_NATIVE_STDERR_LOCK = threading.Lock()


@contextlib.contextmanager
def quiet_native_stderr():
  """Sends file descriptor 2 to /dev/null for the duration.

  ScaNN's C++ core logs every index build through absl (``I0000 ...
  partitioner_factory_base.cc ...``) straight to fd 2; neither
  TF_CPP_MIN_LOG_LEVEL nor GLOG_minloglevel reaches it (tried), so the build
  runs with fd 2 pointed elsewhere. Python's own stderr is flushed first;
  anything other threads write to stderr meanwhile is lost, which is why only
  the build (about a second per million rows) runs under it.
  """
  with _NATIVE_STDERR_LOCK:
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
      os.dup2(devnull, 2)
      yield
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      os.close(devnull)


def build_scann(table, settings: ScannSettings, k: int = 10):
  """Builds a ScaNN searcher over ``table`` [N, d] (float32)."""
  scann_ops = import_scann()
  if scann_ops is None:
    raise RuntimeError("scann is not installed")
  builder = scann_ops.builder(np.ascontiguousarray(table, np.float32), k, settings.metric)
  builder = builder.tree(num_leaves=settings.num_leaves,
                         num_leaves_to_search=settings.num_leaves_to_search,
                         training_sample_size=settings.training_sample_size)
  if settings.anisotropic_quantization_threshold is not None:
    builder = builder.score_ah(settings.dims_per_block, anisotropic_quantization_threshold=
                               settings.anisotropic_quantization_threshold)
  else:
    builder = builder.score_ah(settings.dims_per_block)
  with quiet_native_stderr():
    return builder.reorder(settings.reorder).build()


def scann_search(searcher, queries, k: int, settings: ScannSettings,
                 leaves_to_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(ids int64 [Q, k], scores [Q, k]) in the model's convention (l2 negated)."""
  queries = np.ascontiguousarray(queries, np.float32)
  ids, distances = searcher.search_batched(
      queries, final_num_neighbors=k,
      leaves_to_search=leaves_to_search or settings.num_leaves_to_search,
      pre_reorder_num_neighbors=max(settings.reorder, k))
  scores = -distances if settings.metric == "squared_l2" else distances
  return np.asarray(ids, np.int64), np.asarray(scores, np.float32)


# ---------------------------------------------------------------------------
# The run: checkpoint identity, export, relation parameters.


def checkpoint_identity(workdir: str) -> dict:
  """{step, version_id, total_steps, hash} of the run's latest checkpoint,
  read from its meta JSON without building the model."""
  if not rundir.checkpoint_steps(workdir):
    raise FileNotFoundError(f"{workdir}: no checkpoint (train the run first)")
  ckpt = rundir.checkpoint_dir(workdir)
  step = int(os.path.basename(ckpt))
  meta = rundir.read_meta(ckpt)
  core = {"step": step, "version_id": meta["lineage"]["version_id"],
          "total_steps": int(meta["total_steps"]), "slots": meta["slots"]}
  digest = hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()[:16]
  return {"step": step, "version_id": core["version_id"],
          "total_steps": core["total_steps"], "hash": digest,
          "meta_path": os.path.join(ckpt, "meta", "metadata")}


def _has_vocabularies(export_dir: str, entity_types) -> bool:
  """Whether the export holds every type's on-disk vocabulary (one written by
  older code has only names.txt)."""
  return all(os.path.exists(path(export_dir, t)) for t in entity_types
             for path in (vocabulary_lib.by_id_path, vocabulary_lib.by_name_path))


def _export_is_fresh(export_dir: str, entity_types, checkpoint: dict) -> bool:
  """An export written after the latest checkpoint with every type's .npy
  and on-disk vocabulary (an export by older code has none: written again)."""
  marker = os.path.join(export_dir, "relations.json")
  if not os.path.exists(marker):
    return False
  if any(not os.path.exists(os.path.join(export_dir, f"{t}.npy")) for t in entity_types):
    return False
  if not _has_vocabularies(export_dir, entity_types):
    return False
  return os.path.getmtime(marker) >= os.path.getmtime(checkpoint["meta_path"])


def prepare_run(workdir: str, *, progress: bool = True) -> dict:
  """Makes ``<workdir>/index/run.json`` and ``relations.npz`` current.

  Opens the run (read-only, ``rundir.open_run``) only when they are missing or
  older than the latest checkpoint: then exports the tables (.npy) to
  ``<workdir>/export`` unless an export newer than the checkpoint is there,
  and copies the forward and reverse relation parameters. Returns the run
  description.
  """
  index_dir = os.path.join(workdir, INDEX_DIR)
  run_path = os.path.join(index_dir, RUN_FILE)
  checkpoint = checkpoint_identity(workdir)
  if os.path.exists(run_path):
    with open(run_path) as f:
      run = json.load(f)
    if (run.get("checkpoint", {}).get("hash") == checkpoint["hash"]
        and os.path.exists(os.path.join(index_dir, RELATIONS_FILE))
        and _has_vocabularies(os.path.join(workdir, run.get("export_dir", EXPORT_DIR)),
                              run.get("entities", ()))):
      return run

  opened = rundir.open_run(workdir)
  config, graph = opened.config, opened.graph
  layout = RelationLayout.from_config(config)
  export_dir = os.path.join(workdir, EXPORT_DIR)
  if not _export_is_fresh(export_dir, graph.entities, checkpoint):
    log.info("exporting %s to %s", workdir, export_dir)
    export_lib.export_run(opened, export_dir, formats=("npy",))
  params = opened.relation_params()
  arrays = {}
  for index, rel in enumerate(graph.relations):
    arrays[f"forward/{rel.name}"] = np.asarray(layout.param(params, index), np.float32)
    arrays[f"reverse/{rel.name}"] = np.asarray(layout.reverse_param(params, index), np.float32)
  os.makedirs(index_dir, exist_ok=True)
  export_lib._write_npz(os.path.join(index_dir, RELATIONS_FILE), arrays)
  run = {
      "format_version": FORMAT_VERSION,
      "checkpoint": {k: v for k, v in checkpoint.items() if k != "meta_path"},
      "graph_manifest_hash": graph.manifest_hash,
      "comparator": config.model.comparator,
      "reciprocal": bool(config.model.reciprocal),
      "export_dir": EXPORT_DIR,
      "entities": {t: {"count": e.count, "dim": int(config_dim(config, t))}
                   for t, e in graph.entities.items()},
      "relations": [{"name": r.name, "source": r.source, "target": r.target,
                     "operator": layout.operators[i]} for i, r in enumerate(graph.relations)],
  }
  rundir.write_json_atomically(run_path, run)
  return run


def config_dim(config, entity_type: str) -> int:
  return config_lib.entity_dim(config, entity_type)


# ---------------------------------------------------------------------------
# The retriever.


class Neighbor(NamedTuple):
  id: int
  name: str
  score: float


@dataclasses.dataclass(frozen=True)
class Relation:
  """A relation of the run with its parameters (as ``apply_operator`` takes them)."""
  name: str
  source: str
  target: str
  operator: str
  forward: np.ndarray
  reverse: np.ndarray  # == forward unless the model is reciprocal


@dataclasses.dataclass
class QueryBatch:
  """Query vectors for ``Retriever.search`` plus what ranking them needs.

  vectors [Q, d] are in the candidate table's space; ``offset`` [Q] is a
  per-query constant added to the scores (the dropped b_r . theta_t of an
  adjoint query) so they equal f(s, r, t). When no query vector exists
  (``candidate_operator`` set), the candidates must be transformed:
  scores are compare(vectors, op(theta_x)) and only the exact path serves it.
  """
  target_type: str
  vectors: np.ndarray
  comparator: str
  offset: np.ndarray | None = None
  candidate_operator: tuple[str, np.ndarray] | None = None


class Retriever:
  """Relation-aware nearest-neighbour search over one trained run.

  Use ``Retriever.open(workdir)``; then ``neighbors`` for one entity,
  ``query_vectors`` + ``search`` for batches.
  """

  def __init__(self, workdir: str, run: dict, *, types: Sequence[str] | None = None,
               exact_below: int = EXACT_BELOW, build: bool = True, rebuild: bool = False,
               progress: bool = True):
    self.workdir = workdir
    self.run = run
    self.comparator = run["comparator"]
    self.reciprocal = bool(run["reciprocal"])
    self.exact_below = int(exact_below)
    self.progress = progress
    self.index_dir = os.path.join(workdir, INDEX_DIR)
    self.export_dir = os.path.join(workdir, run.get("export_dir", EXPORT_DIR))
    with np.load(os.path.join(self.index_dir, RELATIONS_FILE)) as params:
      self.relations = {
          r["name"]: Relation(r["name"], r["source"], r["target"], r["operator"],
                              params[f"forward/{r['name']}"], params[f"reverse/{r['name']}"])
          for r in run["relations"]}
    self.entity_types = tuple(run["entities"])
    self._tables: dict[str, np.ndarray] = {}
    # The export's on-disk vocabularies (export/vocab/): names are looked up
    # per request, never loaded whole. One lock: the server calls from several
    # threads and a Parquet reader is not meant to be shared unguarded.
    self._vocabularies: dict[str, vocabulary_lib.Vocabulary] = {}
    self._vocabulary_lock = threading.Lock()
    self._exact: dict[tuple[str, str], ExactSearcher] = {}
    self._scann: dict[str, tuple[object, ScannSettings]] = {}
    self.manifests: dict[str, dict] = {}
    for entity_type in (types if types is not None else self.entity_types):
      self._check_type(entity_type)
      manifest = self._load_or_build(entity_type, build, rebuild)
      if manifest is not None:
        self.manifests[entity_type] = manifest

  @classmethod
  def open(cls, workdir: str, *, types: Sequence[str] | None = None,
           exact_below: int = EXACT_BELOW, build: bool = True, rebuild: bool = False,
           progress: bool = True) -> "Retriever":
    """Opens a trained run's indexes, exporting and building what is missing
    or stale (``build=False``: never build; stale or missing types are
    searched exactly). ``types``: entity types to index (default all)."""
    run = prepare_run(workdir, progress=progress)
    return cls(workdir, run, types=types, exact_below=exact_below, build=build,
               rebuild=rebuild, progress=progress)

  # -- entities ---------------------------------------------------------------

  def _check_type(self, entity_type: str) -> None:
    if entity_type not in self.run["entities"]:
      raise ValueError(f"unknown entity type {entity_type!r}; "
                       f"this run has {sorted(self.run['entities'])}")

  def table(self, entity_type: str) -> np.ndarray:
    """The exported [N, d] float32 table (memory-mapped)."""
    self._check_type(entity_type)
    if entity_type not in self._tables:
      self._tables[entity_type] = np.load(
          os.path.join(self.export_dir, f"{entity_type}.npy"), mmap_mode="r")
    return self._tables[entity_type]

  def vocabulary(self, entity_type: str) -> vocabulary_lib.Vocabulary:
    """The exported vocabulary of a type (export/vocab/<type>.*.parquet)."""
    self._check_type(entity_type)
    with self._vocabulary_lock:
      if entity_type not in self._vocabularies:
        self._vocabularies[entity_type] = vocabulary_lib.Vocabulary(self.export_dir, entity_type)
      return self._vocabularies[entity_type]

  def names(self, entity_type: str) -> vocabulary_lib.NameSequence:
    """Every name of a type in row order, as a lazy read-only sequence
    (``names[i]`` reads one row group); prefer :meth:`names_of` for batches."""
    return vocabulary_lib.NameSequence(self.vocabulary(entity_type), self._vocabulary_lock)

  def names_of(self, entity_type: str, rows) -> list[str]:
    """Names of rows (any order, repeats allowed), read from the vocabulary."""
    vocabulary = self.vocabulary(entity_type)
    with self._vocabulary_lock:
      return vocabulary.names(np.asarray(rows, np.int64))

  def lookup(self, entity_type: str, name_or_id) -> int:
    """Row of an entity given its name (str) or local id (int)."""
    return int(self.lookup_many(entity_type, [name_or_id])[0])

  def lookup_many(self, entity_type: str, names_or_ids) -> np.ndarray:
    """Rows (int64) of entities given by name (str) or local id (int); one
    vocabulary lookup for all the names. KeyError names the first unknown."""
    self._check_type(entity_type)
    items = list(names_or_ids)
    rows = np.empty(len(items), np.int64)
    count = self.run["entities"][entity_type]["count"]
    named = []
    for i, item in enumerate(items):
      if isinstance(item, (int, np.integer)):
        if not 0 <= int(item) < count:
          raise KeyError(f"{entity_type} id {int(item)} out of range [0, {count})")
        rows[i] = int(item)
      elif isinstance(item, str):
        named.append(i)
      else:
        raise KeyError(f"unknown {entity_type} {item!r}")
    if named:
      vocabulary = self.vocabulary(entity_type)
      with self._vocabulary_lock:
        rows[named] = vocabulary.ids([items[i] for i in named])
    return rows

  def relation(self, name: str) -> Relation:
    try:
      return self.relations[name]
    except KeyError:
      raise KeyError(f"unknown relation {name!r}; this run has {sorted(self.relations)}") from None

  # -- indexes ----------------------------------------------------------------

  def _type_dir(self, entity_type: str) -> str:
    return os.path.join(self.index_dir, entity_type)

  def _wanted_backend(self, count: int) -> tuple[str, str]:
    if count < self.exact_below:
      return "exact", f"N={count} < exact_below={self.exact_below}"
    if import_scann() is None:
      return "exact", "scann not importable"
    return "scann", ""

  def _load_or_build(self, entity_type: str, build: bool, rebuild: bool) -> dict | None:
    directory = self._type_dir(entity_type)
    manifest_path = os.path.join(directory, MANIFEST)
    count = int(self.run["entities"][entity_type]["count"])
    dim = int(self.run["entities"][entity_type]["dim"])
    backend, reason = self._wanted_backend(count)
    settings = choose_settings(count, dim, self.comparator)
    manifest = None
    if os.path.exists(manifest_path):
      with open(manifest_path) as f:
        manifest = json.load(f)
    fresh = (manifest is not None and not rebuild
             and manifest["checkpoint"]["hash"] == self.run["checkpoint"]["hash"]
             and manifest["backend"] == backend
             and (backend == "exact" or manifest["settings"] == settings.to_json()))
    if fresh:
      if backend == "scann":
        searcher = import_scann().load_searcher(os.path.join(directory, SCANN_DIR))
        self._scann[entity_type] = (searcher, settings)
      return manifest
    if not build:
      log.warning("index of %s is missing or stale; searching it exactly", entity_type)
      return None
    started = time.perf_counter()
    if os.path.exists(directory):
      shutil.rmtree(directory)
    os.makedirs(directory)
    if backend == "scann":
      table = np.asarray(self.table(entity_type), np.float32)
      if self.comparator == "cos":
        table = _normalize_rows(table)
      log.info("building ScaNN index of %s (%d x %d)", entity_type, count, dim)
      searcher = build_scann(table, settings)
      # relative_path: asset paths relative to the directory, so a run can move.
      os.makedirs(os.path.join(directory, SCANN_DIR))
      searcher.serialize(os.path.join(directory, SCANN_DIR), relative_path=True)
      self._scann[entity_type] = (searcher, settings)
    manifest = {
        "format_version": FORMAT_VERSION,
        "entity_type": entity_type,
        "backend": backend,
        "reason": reason,
        "count": count,
        "dim": dim,
        "comparator": self.comparator,
        "normalized": self.comparator == "cos",
        "settings": settings.to_json() if backend == "scann" else None,
        "checkpoint": self.run["checkpoint"],
        "graph_manifest_hash": self.run["graph_manifest_hash"],
        "build_seconds": time.perf_counter() - started,
    }
    rundir.write_json_atomically(manifest_path, manifest)
    return manifest

  def _exact_searcher(self, entity_type: str, comparator: str) -> ExactSearcher:
    key = (entity_type, comparator)
    if key not in self._exact:
      table = np.asarray(self.table(entity_type), np.float32)
      if comparator == "cos":
        table = _normalize_rows(table)
      self._exact[key] = ExactSearcher(table, _SCANN_METRIC[comparator])
    return self._exact[key]

  # -- queries ----------------------------------------------------------------

  def query_vectors(self, relation: str, entities, *, direction: str = "forward",
                    vectors=None) -> QueryBatch:
    """Queries that retrieve the other end of ``relation`` (see the module doc).

    Args:
      relation: relation name.
      entities: names or ids of the known ends (sources for "forward",
        targets for "reverse"); ignored when ``vectors`` is given.
      direction: "forward" (find targets of sources) or "reverse" (find
        sources of targets).
      vectors: [Q, d] embeddings of the known ends instead of ids (e.g. an
        inductive vector of a new entity).
    """
    rel = self.relation(relation)
    if direction not in ("forward", "reverse"):
      raise ValueError(f"direction must be 'forward' or 'reverse', got {direction!r}")
    known_type = rel.source if direction == "forward" else rel.target
    if vectors is None:
      if isinstance(entities, (str, int, np.integer)):
        entities = [entities]
      rows = self.lookup_many(known_type, entities)
      vectors = np.asarray(self.table(known_type)[rows], np.float32)  # [Q, d]
    vectors = np.atleast_2d(np.asarray(vectors, np.float32))  # [Q, d]
    if direction == "forward":
      query = model.target_query(rel.operator, self.comparator, jnp.asarray(rel.forward),
                                 jnp.asarray(vectors))
      return QueryBatch(rel.target, np.asarray(query.vectors), query.comparator)
    # A corrupted source: model.py's rule (reverse parameters, the adjoint,
    # l2's shifted target, or the candidates transformed).
    query = model.source_query(rel.operator, self.comparator, self.reciprocal,
                               jnp.asarray(rel.forward), jnp.asarray(rel.reverse),
                               jnp.asarray(vectors), per_row=False)
    return QueryBatch(rel.source, np.asarray(query.vectors), query.comparator,
                      offset=None if query.offset is None else np.asarray(query.offset),
                      candidate_operator=None if query.candidate_params is None
                      else (rel.operator, rel.forward))

  def search(self, target_type: str, queries, k: int = 10, comparator: str | None = None,
             exact: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Top-k rows of ``target_type`` for query vectors [Q, d] (or a QueryBatch).

    Returns (ids int64 [Q, k], scores float32 [Q, k]); scores are the model's
    (dot: inner product, cos: cosine, l2: -squared distance, plus a
    QueryBatch's offset). Uses the type's ScaNN index unless ``exact``, the
    type has none, or the comparator differs from the one it was built for.
    """
    self._check_type(target_type)
    offset = None
    candidate_operator = None
    if isinstance(queries, QueryBatch):
      if queries.target_type != target_type:
        raise ValueError(f"queries retrieve {queries.target_type!r}, not {target_type!r}")
      comparator = comparator or queries.comparator
      offset, candidate_operator = queries.offset, queries.candidate_operator
      queries = queries.vectors
    comparator = comparator or self.comparator
    if comparator not in COMPARATORS:
      raise ValueError(f"unknown comparator {comparator!r}; choose from {COMPARATORS}")
    queries = np.atleast_2d(np.asarray(queries, np.float32))
    dim = int(self.run["entities"][target_type]["dim"])
    if queries.shape[1] != dim:
      raise ValueError(f"queries have dim {queries.shape[1]}, {target_type} has {dim}")
    k = min(int(k), int(self.run["entities"][target_type]["count"]))
    if candidate_operator is not None:
      if not exact:
        log.warning("%s with %s has no single query vector in reverse; searching exactly",
                    candidate_operator[0], comparator)
      operator, param = candidate_operator
      candidates = np.asarray(apply_operator(operator, jnp.asarray(param),
                                             jnp.asarray(np.asarray(self.table(target_type)))))
      return exact_search(candidates, queries, k, comparator)
    if comparator == "cos":
      queries = _normalize_rows(queries)
    use_index = (not exact and target_type in self._scann and comparator == self.comparator)
    if use_index:
      searcher, settings = self._scann[target_type]
      ids, scores = scann_search(searcher, queries, k, settings)
    else:
      ids, scores = self._exact_searcher(target_type, comparator).search(queries, k)
    if offset is not None:
      scores = scores + np.asarray(offset, np.float32)[:, None]
    return ids, scores

  def neighbors(self, entity_type: str, name_or_id, relation: str | None = None, k: int = 10,
                exact: bool = False, direction: str | None = None) -> list[Neighbor]:
    """Nearest entities to one entity.

    relation None: entities of the same type by the run's comparator (the
    entity itself excluded). With a relation: its targets when
    ``entity_type`` is the relation's source (direction "forward"), its
    sources when it is the target ("reverse"); pass ``direction`` when the
    relation joins a type to itself (default "forward").
    """
    row = self.lookup(entity_type, name_or_id)
    if relation is None:
      vector = np.asarray(self.table(entity_type)[row], np.float32)[None]
      ids, scores = self.search(entity_type, vector, k + 1, exact=exact)
      pairs = [(i, s) for i, s in zip(ids[0], scores[0]) if i != row][:k]
      names = self.names_of(entity_type, [i for i, _ in pairs])
      return [Neighbor(int(i), name, float(s)) for (i, s), name in zip(pairs, names)]
    rel = self.relation(relation)
    if direction is None:
      if entity_type == rel.source:
        direction = "forward"
      elif entity_type == rel.target:
        direction = "reverse"
    if direction is None or entity_type != (rel.source if direction == "forward"
                                            else rel.target):
      raise ValueError(f"relation {relation!r} joins {rel.source} -> {rel.target}; "
                       f"{entity_type!r} is not its {'source' if direction != 'reverse' else 'target'}")
    batch = self.query_vectors(relation, [row], direction=direction)
    ids, scores = self.search(batch.target_type, batch, k, exact=exact)
    names = self.names_of(batch.target_type, ids[0])
    return [Neighbor(int(i), name, float(s)) for i, s, name in zip(ids[0], scores[0], names)]


def build_indexes(workdir: str, types: Sequence[str] | None = None, *,
                  exact_below: int = EXACT_BELOW, rebuild: bool = False,
                  progress: bool = True) -> dict[str, dict]:
  """Builds (or confirms fresh) the index of every requested type; returns the
  manifests. The library function behind ``twhin index``."""
  retriever = Retriever.open(workdir, types=types, exact_below=exact_below, rebuild=rebuild,
                             progress=progress)
  return retriever.manifests
