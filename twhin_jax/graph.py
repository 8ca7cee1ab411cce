"""The on-disk format of an imported graph, and its reader.

An import (``twhin_jax.importer``) writes a directory::

  manifest.json                 schema, counts, source hashes, format version
  vocab/<type>.parquet          entity names in local-id order (see vocabulary.py)
  vocab/<type>.by_name.parquet  (name, id) sorted by name, for name -> id lookups
  degrees/<type>.npy            int64 [count]: train degree of every entity
  buckets/<i>_<j>/src.npy       int32 [E_ij]: source offsets inside partition i
  buckets/<i>_<j>/dst.npy       int32 [E_ij]: target offsets inside partition j
  buckets/<i>_<j>/rel.npy       int32 [E_ij]: relation index (config order)
  buckets/<i>_<j>/weight.npy    float32 [E_ij]: edge weight (only if weighted)
  buckets/<i>_<j>/cells.npy     int64 [type pairs, K, K]: edges per cell, the
                                files grouped by cell (bucket_index.py)
  splits/<valid|test>/{src,rel,dst}.npy   int64 local ids (not bucketed)

Local ids of a type are 0..count-1; partition p of a type with P partitions
holds the contiguous ids [p * S, min((p + 1) * S, count)) with S = ceil(count /
P), so ``local_id = partition * S + offset``. Unpartitioned types (P = 1) put
every edge of theirs into bucket row or column 0.

Format history: 1 kept the vocabulary as ``vocab/<type>.txt`` (read whole
into a dict for lookups); 2 (this code) keeps it in Parquet and looks names
up without loading it. A format-1 directory must be imported again.

Bucket index (bucket_index.py): an import groups every bucket's edges by
cell of a fine grid over (source offset, target offset), random order inside
a cell, and writes ``buckets/<i>_<j>/cells.npy`` (int64 [type pairs, K, K]
edge counts) and ``bucket_index`` in the manifest; ``Graph.bucket_cells``
gives the row range of every cell, so that a process reads only the cells
its devices train (batching.py). A directory without them (an older import,
a network view) is read whole.

Several hosts without the device placement: :func:`host_slices` gives each
process an equal, contiguous share of every bucket's edges, and
``Graph.bucket_edges(i, j, rows=...)`` reads only that share (the ``.npy``
files are memory-mapped).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from functools import cached_property

import numpy as np

from twhin_jax import bucket_index as bucket_index_lib
from twhin_jax import vocabulary as vocabulary_lib

FORMAT_VERSION = 2
MANIFEST = "manifest.json"


@dataclasses.dataclass(frozen=True)
class EntityInfo:
  name: str
  count: int
  num_partitions: int

  @property
  def partition_size(self) -> int:
    return max(1, math.ceil(self.count / self.num_partitions))

  def partition_rows(self, partition: int) -> int:
    """Number of real rows in a partition (the last one may be short)."""
    start = partition * self.partition_size
    return max(0, min(self.count, start + self.partition_size) - start)


@dataclasses.dataclass(frozen=True)
class RelationInfo:
  name: str
  source: str
  target: str
  operator: str
  weight: float


def bucket_dir(graph_dir: str, lhs_partition: int, rhs_partition: int) -> str:
  return os.path.join(graph_dir, "buckets", f"{lhs_partition}_{rhs_partition}")


class Graph:
  """Read-only view of an imported graph directory."""

  def __init__(self, path: str):
    self.path = path
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.exists(manifest_path):
      raise FileNotFoundError(f"{manifest_path}: no imported graph here (run `twhin import`)")
    with open(manifest_path) as f:
      self.manifest = json.load(f)
    version = self.manifest.get("format_version")
    if version != FORMAT_VERSION:
      older = isinstance(version, int) and version < FORMAT_VERSION
      raise ValueError(
          f"{manifest_path}: graph format {version}, this code reads {FORMAT_VERSION}"
          + ("; it was written by an older twhin-jax: remove the directory and import "
             "again (`twhin import`, or `twhin train` on a fresh workdir)" if older else ""))
    schema = self.manifest["schema"]
    self.entities = {name: EntityInfo(name=name, count=int(e["count"]),
                                      num_partitions=int(e["num_partitions"]))
                     for name, e in schema["entities"].items()}
    self.relations = [RelationInfo(name=r["name"], source=r["source"], target=r["target"],
                                   operator=r["operator"], weight=float(r["weight"]))
                      for r in schema["relations"]]
    self.relation_index = {r.name: i for i, r in enumerate(self.relations)}

  @property
  def manifest_hash(self) -> str:
    return self.manifest["hash"]

  @property
  def bucket_grid(self) -> tuple[int, int]:
    """(number of source partitions, number of target partitions)."""
    lhs = max(self.entities[r.source].num_partitions for r in self.relations)
    rhs = max(self.entities[r.target].num_partitions for r in self.relations)
    return lhs, rhs

  @property
  def weighted(self) -> bool:
    return bool(self.manifest.get("weighted", False))

  def num_edges(self, split: str = "train") -> int:
    return int(self.manifest["counts"][split])

  def bucket_edges(self, lhs_partition: int, rhs_partition: int,
                   mmap: bool = True, rows: slice | None = None) -> dict[str, np.ndarray]:
    """Edges of one bucket: src/dst are offsets inside their partitions.

    ``rows`` (a slice, e.g. from :func:`host_slices`) reads only those edges:
    the files are memory-mapped, so only their pages are read.
    """
    directory = bucket_dir(self.path, lhs_partition, rhs_partition)
    mode = "r" if mmap or rows is not None else None
    if not os.path.exists(os.path.join(directory, "src.npy")):
      empty = np.zeros(0, np.int32)
      return dict(src=empty, dst=empty, rel=empty, weight=np.zeros(0, np.float32))
    edges = {key: np.load(os.path.join(directory, f"{key}.npy"), mmap_mode=mode)
             for key in ("src", "dst", "rel")}
    weight_path = os.path.join(directory, "weight.npy")
    if os.path.exists(weight_path):
      edges["weight"] = np.load(weight_path, mmap_mode=mode)
    else:
      edges["weight"] = np.ones(len(edges["src"]), np.float32)
    if rows is not None:
      edges = {key: values[rows] for key, values in edges.items()}
      if not mmap:
        edges = {key: np.array(values) for key, values in edges.items()}
    return edges

  @cached_property
  def cell_grid(self) -> bucket_index_lib.CellGrid | None:
    """The grid the buckets are grouped by (None: not grouped)."""
    if "bucket_index" not in self.manifest:
      return None
    return bucket_index_lib.CellGrid.of_manifest(self.manifest)

  def bucket_cells(self, lhs_partition: int, rhs_partition: int) -> np.ndarray | None:
    """[num_cells + 1] first row of every cell of a bucket's files (see
    bucket_index.py), or None when the bucket is not grouped by cell."""
    path = os.path.join(bucket_dir(self.path, lhs_partition, rhs_partition),
                        bucket_index_lib.INDEX_FILE)
    if self.cell_grid is None or not os.path.exists(path):
      return None
    counts = np.load(path)
    if counts.size != self.cell_grid.num_cells:
      raise ValueError(f"{path}: {counts.size} cells, the manifest's grid has "
                       f"{self.cell_grid.num_cells}; import the graph again")
    return bucket_index_lib.cell_starts(counts)

  def host_slices(self, process_index: int, process_count: int) -> list["BucketSlice"]:
    """This process's share of every non-empty bucket (see :func:`host_slices`)."""
    return host_slices(self.bucket_sizes(), process_index, process_count)

  def bucket_sizes(self) -> dict[tuple[int, int], int]:
    return {tuple(int(x) for x in key.split("_")): int(n)
            for key, n in self.manifest["bucket_sizes"].items()}

  def split_edges(self, split: str) -> dict[str, np.ndarray]:
    """All edges of a split as int64 local ids (train is gathered from buckets)."""
    if split == "train":
      parts = {"src": [], "dst": [], "rel": []}
      for (i, j), n in sorted(self.bucket_sizes().items()):
        if n == 0:
          continue
        edges = self.bucket_edges(i, j)
        rel = np.asarray(edges["rel"], np.int64)
        src_size = np.array([self.entities[r.source].partition_size for r in self.relations])
        dst_size = np.array([self.entities[r.target].partition_size for r in self.relations])
        src_part = np.array([0 if self.entities[r.source].num_partitions == 1 else i
                             for r in self.relations])
        dst_part = np.array([0 if self.entities[r.target].num_partitions == 1 else j
                             for r in self.relations])
        parts["src"].append(src_part[rel] * src_size[rel] + np.asarray(edges["src"], np.int64))
        parts["dst"].append(dst_part[rel] * dst_size[rel] + np.asarray(edges["dst"], np.int64))
        parts["rel"].append(rel)
      if not parts["src"]:
        return {k: np.zeros(0, np.int64) for k in parts}
      return {k: np.concatenate(v) for k, v in parts.items()}
    directory = os.path.join(self.path, "splits", split)
    if not os.path.exists(os.path.join(directory, "src.npy")):
      return {k: np.zeros(0, np.int64) for k in ("src", "dst", "rel")}
    return {k: np.load(os.path.join(directory, f"{k}.npy")).astype(np.int64)
            for k in ("src", "dst", "rel")}

  def vocabulary(self, entity_type: str) -> vocabulary_lib.Vocabulary:
    """The on-disk vocabulary of a type: batch lookups without loading it."""
    if entity_type not in self.entities:
      raise KeyError(f"unknown entity type {entity_type!r} (types: {sorted(self.entities)})")
    cache = self.__dict__.setdefault("_vocabularies", {})
    if entity_type not in cache:
      cache[entity_type] = vocabulary_lib.Vocabulary(self.path, entity_type)
    return cache[entity_type]

  def names(self, entity_type: str) -> list[str]:
    """Every name of a type in local-id order. Materialises the whole
    vocabulary: prefer :meth:`names_of` / :meth:`lookup_ids` for large graphs."""
    names = []
    for chunk in self.vocabulary(entity_type).iter_names():
      names.extend(chunk.to_pylist())
    return names

  def names_of(self, entity_type: str, ids) -> list[str]:
    """Names of local ids (vectorised; reads only the row groups needed)."""
    return self.vocabulary(entity_type).names(ids)

  def lookup_ids(self, entity_type: str, names, missing: int | None = None) -> np.ndarray:
    """Local ids of names (vectorised). Unknown names raise KeyError, or get
    ``missing`` (e.g. -1) if given."""
    return self.vocabulary(entity_type).ids(names, missing=missing)

  @cached_property
  def _name_index(self) -> dict[str, dict[str, int]]:
    """Whole vocabularies as dicts. Memory grows with the entity count; kept
    for callers not yet moved to :meth:`lookup_ids`."""
    return {t: {name: i for i, name in enumerate(self.names(t))} for t in self.entities}

  def lookup(self, entity_type: str, name: str) -> int:
    """Local id of a named entity; KeyError naming the type if unknown."""
    return int(self.vocabulary(entity_type).ids([name])[0])

  def degrees(self, entity_type: str) -> np.ndarray:
    return np.load(os.path.join(self.path, "degrees", f"{entity_type}.npy"))


@dataclasses.dataclass(frozen=True)
class BucketSlice:
  """Rows ``[start, stop)`` of bucket (lhs, rhs), the part one host reads."""
  lhs: int
  rhs: int
  start: int
  stop: int

  @property
  def rows(self) -> slice:
    return slice(self.start, self.stop)


def host_slices(bucket_sizes: dict[tuple[int, int], int], process_index: int,
                process_count: int) -> list[BucketSlice]:
  """The share of the bucket files that process ``process_index`` of
  ``process_count`` reads: of every non-empty bucket (in (lhs, rhs) order),
  the contiguous rows ``[n * k // K, n * (k + 1) // K)`` for process k of K.

  The shares of one bucket are disjoint and cover it, and their sizes differ
  by at most one edge, so every host gets the same work per bucket; each
  host reads ``1 / K`` of every file (``Graph.bucket_edges(i, j,
  rows=share.rows)``).
  """
  if not isinstance(process_count, int) or process_count < 1:
    raise ValueError(f"process_count must be an int >= 1, got {process_count!r}")
  if not isinstance(process_index, int) or not 0 <= process_index < process_count:
    raise ValueError(f"process_index must be in [0, {process_count}), got {process_index!r}")
  shares = []
  for (lhs, rhs), size in sorted(bucket_sizes.items()):
    if size:
      shares.append(BucketSlice(lhs, rhs, size * process_index // process_count,
                                size * (process_index + 1) // process_count))
  return shares
