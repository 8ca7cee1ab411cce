"""The on-disk format of an imported graph, and its reader.

An import (``twhin_jax.importer``) writes a directory::

  manifest.json                 schema, counts, source hashes, format version
  vocab/<type>.txt              entity names, one per line, in local-id order
  degrees/<type>.npy            int64 [count]: train degree of every entity
  buckets/<i>_<j>/src.npy       int32 [E_ij]: source offsets inside partition i
  buckets/<i>_<j>/dst.npy       int32 [E_ij]: target offsets inside partition j
  buckets/<i>_<j>/rel.npy       int32 [E_ij]: relation index (config order)
  buckets/<i>_<j>/weight.npy    float32 [E_ij]: edge weight (only if weighted)
  splits/<valid|test>/{src,rel,dst}.npy   int64 local ids (not bucketed)

Local ids of a type are 0..count-1; partition p of a type with P partitions
holds the contiguous ids [p * S, min((p + 1) * S, count)) with S = ceil(count /
P), so ``local_id = partition * S + offset``. Unpartitioned types (P = 1) put
every edge of theirs into bucket row or column 0.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from functools import cached_property

import numpy as np

FORMAT_VERSION = 1
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
      raise ValueError(f"{manifest_path}: graph format {version}, this code reads {FORMAT_VERSION}")
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
                   mmap: bool = True) -> dict[str, np.ndarray]:
    """Edges of one bucket: src/dst are offsets inside their partitions."""
    directory = bucket_dir(self.path, lhs_partition, rhs_partition)
    mode = "r" if mmap else None
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
    return edges

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

  def names(self, entity_type: str) -> list[str]:
    with open(os.path.join(self.path, "vocab", f"{entity_type}.txt"), encoding="utf-8") as f:
      return [line.rstrip("\n") for line in f]

  @cached_property
  def _name_index(self) -> dict[str, dict[str, int]]:
    return {t: {name: i for i, name in enumerate(self.names(t))} for t in self.entities}

  def lookup(self, entity_type: str, name: str) -> int:
    """Local id of a named entity; KeyError naming the type if unknown."""
    try:
      return self._name_index[entity_type][name]
    except KeyError:
      raise KeyError(f"unknown {entity_type} {name!r}") from None

  def degrees(self, entity_type: str) -> np.ndarray:
    return np.load(os.path.join(self.path, "degrees", f"{entity_type}.npy"))
