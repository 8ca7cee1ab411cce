"""Networks over one import: TwHIN-Follow and TwHIN-Engagement (paper Sec. 4.3).

The paper co-embeds each high-coverage relation (follows; user-tweet
engagement) with the low-coverage relations it carries (ads, advertisers,
apps), and never two high-coverage relations with each other: they interfere.
A config declares those networks::

  config.networks = [
      {"name": "follow", "relations": ["follows", "clicks", "promotes"]},
      {"name": "engagement", "relations": ["favorites", "retweets", "clicks", "promotes"]},
  ]

`twhin train` imports the whole graph once (``<run>/graph``) and trains each
network as its own run in ``<run>/networks/<name>/`` with its own tables,
checkpoints and metrics. That run's ``graph/`` is a *view* of the shared
import, not a copy::

  networks/<name>/graph/manifest.json   the parent manifest restricted to the
                                        network: its relations (renumbered in
                                        config order), their entity types,
                                        per-bucket and per-split edge counts
  networks/<name>/graph/network.json    {"name", "parent", "relations"}
  networks/<name>/graph/degrees/*.npy   train degrees over the network's relations

:class:`NetworkGraph` reads it with ``Graph``'s interface: bucket and split
edges come from the parent's files, filtered to the network's relations and
renumbered; names and ids are the parent's (one vocabulary for all networks).
Every tool that opens a run through ``rundir`` therefore takes a network's
run directory as it is (``twhin export --workdir RUN --network follow``).

Coverage (the share of a type's entities that take part in a relation) comes
from the import manifest; a relation whose source side covers at least
:data:`HIGH_COVERAGE` of its type is high-coverage, and a network with two of
them gets a warning.

This module does not import jax.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil

import numpy as np

from twhin_jax.graph import MANIFEST, Graph

log = logging.getLogger(__name__)

NETWORKS_DIR = "networks"
NETWORK_FILE = "network.json"
#: Share of the source type's entities above which a relation is "high coverage".
HIGH_COVERAGE = 0.5


def network_dir(workdir: str, name: str) -> str:
  """The run directory of one network of the run in ``workdir``."""
  return os.path.join(workdir, NETWORKS_DIR, name)


def declared(config) -> list[dict]:
  """The config's networks as plain dicts {"name", "relations"}."""
  return [{"name": str(n["name"]), "relations": [str(r) for r in n["relations"]]}
          for n in config.get("networks", [])]


def validate_networks(config, fail) -> None:
  """Checks ``config.networks``; ``fail(field, message)`` raises."""
  relation_names = [r["name"] for r in config.relations]
  names = set()
  for i, network in enumerate(config.get("networks", [])):
    field = f"networks[{i}]"
    if not isinstance(network, dict) and not hasattr(network, "keys"):
      fail(field, f"must be a dict with 'name' and 'relations', got {network!r}")
    extra = sorted(set(network.keys()) - {"name", "relations"})
    if extra:
      fail(f"{field}.{extra[0]}", "unknown field (fields: name, relations)")
    name = network.get("name", "")
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
      fail(f"{field}.name", f"must be a plain directory name, got {name!r}")
    if name in names:
      fail(f"{field}.name", f"duplicate network name {name!r}")
    names.add(name)
    relations = list(network.get("relations", []))
    if not relations:
      fail(f"{field}.relations", "no relations")
    for relation in relations:
      if relation not in relation_names:
        fail(f"{field}.relations", f"unknown relation {relation!r} (declared: {relation_names})")
    if len(set(relations)) != len(relations):
      fail(f"{field}.relations", f"a relation is listed twice: {relations}")


def network_config(config, network: dict):
  """The config of one network's run: its relations (in the config's order),
  the entity types they touch, and no networks of its own."""
  keep = set(network["relations"])
  sub = copy.deepcopy(config)
  sub.relations = [dict(r) for r in config.relations if r["name"] in keep]
  used = {r["source"] for r in sub.relations} | {r["target"] for r in sub.relations}
  for entity_type in list(sub.entities.keys()):
    if entity_type not in used:
      del sub.entities[entity_type]
  sub.networks = []
  sub.name = f"{config.name}-{network['name']}"
  return sub


def high_coverage(manifest: dict, relation: str, threshold: float = HIGH_COVERAGE) -> bool:
  share = manifest.get("coverage", {}).get(relation, {}).get("source", {}).get("share", 0.0)
  return float(share) >= threshold


def coverage_warnings(manifest: dict, networks: list[dict],
                      threshold: float = HIGH_COVERAGE) -> list[str]:
  """One message per network that holds two or more high-coverage relations."""
  messages = []
  for network in networks:
    dense = [r for r in network["relations"] if high_coverage(manifest, r, threshold)]
    if len(dense) > 1:
      messages.append(
          f"network {network['name']!r} holds {len(dense)} high-coverage relations {dense} "
          f"(source coverage >= {threshold:.0%}); the paper (Sec. 4.3) trains each in its own "
          "network to avoid interference between them")
  return messages


def coverage_table(manifest: dict) -> list[dict]:
  """Rows {relation, source, source_share, target, target_share} of the manifest's coverage."""
  rows = []
  for relation, sides in manifest.get("coverage", {}).items():
    rows.append({"relation": relation,
                 "source": sides["source"]["type"], "source_share": sides["source"]["share"],
                 "target": sides["target"]["type"], "target_share": sides["target"]["share"]})
  return rows


# --------------------------------------------------------------------------
# The view of a shared import.


def create_view(parent: Graph, view_dir: str, name: str, relations: list[str]) -> None:
  """Writes ``view_dir`` (see the module doc) for the network ``name``.

  Reads every bucket's relation column once to count the network's edges per
  bucket and its train degrees. Atomic: written to a temporary directory and
  renamed, so a crash leaves either no view or a whole one.
  """
  keep = [parent.relation_index[r] for r in relations]
  keep_ids = np.asarray(sorted(keep), np.int64)
  relations_in_order = [r for r in parent.relations if r.name in set(relations)]
  types = sorted({r.source for r in relations_in_order} | {r.target for r in relations_in_order})
  degrees = {t: np.zeros(parent.entities[t].count, np.int64) for t in types}
  bucket_sizes = {}
  train_edges = 0
  for (i, j), size in sorted(parent.bucket_sizes().items()):
    if not size:
      bucket_sizes[f"{i}_{j}"] = 0
      continue
    edges = parent.bucket_edges(i, j)
    rel = np.asarray(edges["rel"], np.int64)
    mask = np.isin(rel, keep_ids)
    bucket_sizes[f"{i}_{j}"] = int(mask.sum())
    train_edges += int(mask.sum())
    for r in keep:
      info = parent.relations[r]
      chosen = rel == r
      if not chosen.any():
        continue
      src_info, dst_info = parent.entities[info.source], parent.entities[info.target]
      src = np.asarray(edges["src"][chosen], np.int64) + (
          (i if src_info.num_partitions > 1 else 0) * src_info.partition_size)
      dst = np.asarray(edges["dst"][chosen], np.int64) + (
          (j if dst_info.num_partitions > 1 else 0) * dst_info.partition_size)
      degrees[info.source] += np.bincount(src, minlength=src_info.count)
      degrees[info.target] += np.bincount(dst, minlength=dst_info.count)
  counts = {"train": train_edges}
  for split in ("valid", "test"):
    rel = parent.split_edges(split)["rel"]
    counts[split] = int(np.isin(rel, keep_ids).sum())
  manifest = copy.deepcopy(parent.manifest)
  manifest["schema"]["relations"] = [r for r in manifest["schema"]["relations"]
                                     if r["name"] in set(relations)]
  manifest["schema"]["entities"] = {t: e for t, e in manifest["schema"]["entities"].items()
                                    if t in types}
  manifest["counts"] = {**manifest.get("counts", {}), **counts}
  manifest["bucket_sizes"] = bucket_sizes
  manifest["coverage"] = {r: c for r, c in manifest.get("coverage", {}).items() if r in relations}
  manifest["network"] = name
  manifest["hash"] = hashlib.sha256(
      f"{parent.manifest_hash}:{name}:{','.join(relations)}".encode()).hexdigest()[:16]
  tmp = view_dir + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(os.path.join(tmp, "degrees"))
  for t, values in degrees.items():
    np.save(os.path.join(tmp, "degrees", f"{t}.npy"), values)
  with open(os.path.join(tmp, MANIFEST), "w") as f:
    json.dump(manifest, f, indent=1)
  with open(os.path.join(tmp, NETWORK_FILE), "w") as f:
    json.dump({"name": name, "parent": os.path.relpath(parent.path, view_dir),
               "relations": [r.name for r in relations_in_order]}, f, indent=1)
  os.replace(tmp, view_dir)


class NetworkGraph(Graph):
  """One network's view of a shared import (module doc), with Graph's interface."""

  def __init__(self, path: str):
    with open(os.path.join(path, NETWORK_FILE)) as f:
      self.network = json.load(f)
    self.parent = Graph(os.path.normpath(os.path.join(path, self.network["parent"])))
    super().__init__(path)  # the restricted manifest: entities, relations, counts
    # Parent relation index -> this view's index (-1: not in the network).
    self._remap = np.full(len(self.parent.relations), -1, np.int32)
    for index, relation in enumerate(self.relations):
      self._remap[self.parent.relation_index[relation.name]] = index

  def _select(self, edges: dict, rows: slice | None = None) -> dict:
    rel = np.asarray(edges["rel"])
    chosen = np.flatnonzero(self._remap[rel] >= 0)
    if rows is not None:
      chosen = chosen[rows]
    out = {key: np.asarray(values[chosen]) for key, values in edges.items()}
    out["rel"] = self._remap[np.asarray(edges["rel"])[chosen]].astype(edges["rel"].dtype)
    return out

  def bucket_edges(self, lhs_partition: int, rhs_partition: int, mmap: bool = True,
                   rows: slice | None = None) -> dict[str, np.ndarray]:
    """The network's edges of one bucket (``rows``: of those, as in Graph)."""
    return self._select(self.parent.bucket_edges(lhs_partition, rhs_partition), rows)

  def split_edges(self, split: str) -> dict[str, np.ndarray]:
    return self._select(self.parent.split_edges(split))

  def vocabulary(self, entity_type: str):
    if entity_type not in self.entities:
      raise KeyError(f"unknown entity type {entity_type!r} in network "
                     f"{self.network['name']!r} (types: {sorted(self.entities)})")
    return self.parent.vocabulary(entity_type)


def open_graph(path: str) -> Graph:
  """The graph in ``path``: a network's view when it holds network.json."""
  if os.path.exists(os.path.join(path, NETWORK_FILE)):
    return NetworkGraph(path)
  return Graph(path)
