"""New versions that stay close to the last (paper Sec. 7.2): warm start and
L2-to-previous anchors.

``warm_start(trainer, parent_dir)`` runs once, when a run with
``warm_start.parent`` set starts fresh. It aligns the parent version's
entities with the new graph's by name, per type (a merge join of the two
on-disk vocabularies, a row group at a time: no dict of names):

  shared entities   start from the parent's row (and its Adagrad accumulator,
                    so the step sizes continue where the parent stopped);
  new entities      keep their random initialisation, or with
                    ``warm_start.new_entities = "neighbors"`` start at the mean
                    over their training edges to shared entities of the vector
                    that scores that edge best (paper Eq. 5; the per-operator
                    formulas are in inductive.py);
  removed entities  are dropped (the new vocabulary does not hold them).

Relations are aligned by name (new ones keep their initial parameters). With
``warm_start.l2_to_previous = alpha > 0`` it also writes the *anchor* tables
(``<workdir>/anchors``: the parent's rows in the new id order, and a weight 1
for shared entities, 0 for new ones); the trainer loads them partition by
partition beside the working tables, and every step adds
alpha * |theta_v - theta_v^prev|^2 on the rows it touches (optim.py).

The new version's lineage records the parent's version id.
"""

from __future__ import annotations

import json
import os

import numpy as np

from twhin_jax import config as config_lib
from twhin_jax import model
from twhin_jax import rundir
from twhin_jax import storage
from twhin_jax import vocabulary as vocabulary_lib
from twhin_jax.graph import Graph

ANCHORS_DIR = rundir.ANCHORS_DIR
RELATIONS_FILE = "warm_start_relations.npz"
NEW_ENTITY_INIT = ("random", "neighbors")


class ParentVersion:
  """A finished run read without a trainer: graph, config, committed tables, relations."""

  def __init__(self, workdir: str):
    if not os.path.isdir(workdir):
      raise FileNotFoundError(f"{workdir}: no such run directory (warm_start.parent)")
    if not rundir.checkpoint_steps(workdir):
      raise FileNotFoundError(f"{workdir}: no checkpoint to warm-start from")
    self.run = rundir.open_run(workdir)
    self.meta, self.config, self.graph = self.run.meta, self.run.config, self.run.graph
    self.layout = model.RelationLayout.from_config(self.config)
    self.relation_params = self.run.relation_params()
    self.dims = {t: config_lib.entity_dim(self.config, t) for t in self.graph.entities}
    self.version_id = self.run.version_id

  def read_type(self, entity_type: str) -> tuple[np.ndarray, np.ndarray]:
    """The committed table [V, d] and accumulators [V] of one type."""
    return self.run.read_type(entity_type)

  def relation(self, name: str) -> tuple[str, np.ndarray, np.ndarray] | None:
    """(group, forward params, reverse params) of a relation, or None if absent."""
    names = [r["name"] for r in self.config.relations]
    if name not in names:
      return None
    r = names.index(name)
    group = self.layout.group[r]
    params = self.relation_params[group]
    return group, params[self.layout.row[r]], params[self.layout.reverse_row[r]]


def id_map(graph: Graph, parent_graph: Graph, entity_type: str) -> np.ndarray:
  """Parent id of each new local id (-1: new entity), int64 [count]: a merge
  join of the two on-disk vocabularies in name order, a row group at a time
  (vocabulary.id_map); no name is held beyond the group being joined."""
  return vocabulary_lib.id_map(graph.vocabulary(entity_type),
                               parent_graph.vocabulary(entity_type))


def neighbor_init(graph: Graph, parent: ParentVersion, config, mapping: dict[str, np.ndarray],
                  old_tables: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Eq. 5 vectors of new entities: type -> (sum of g_e [V, d], edge count [V]).

  Over every training edge between a new entity and a shared one, of a
  relation the parent knew: g_e = op_r(theta_s) when the new entity is the
  target, the operator's adjoint (dot) or inverse (l2, cos) applied to
  theta_t when it is the source (model.source_vectors / target_vectors).
  """
  comparator = config.model.comparator
  sums = {t: np.zeros((graph.entities[t].count, old_tables[t].shape[1]), np.float64)
          for t in mapping if t in old_tables}
  counts = {t: np.zeros(graph.entities[t].count, np.int64) for t in sums}
  sizes = {t: graph.entities[t].partition_size for t in graph.entities}
  parts = {t: graph.entities[t].num_partitions for t in graph.entities}
  for (i, j) in graph.bucket_sizes():
    edges = graph.bucket_edges(i, j)
    for r, info in enumerate(graph.relations):
      known = parent.relation(info.name)
      if known is None or info.source not in sums or info.target not in sums:
        continue
      _, params, _ = known
      mask = np.asarray(edges["rel"]) == r
      src = np.asarray(edges["src"])[mask] + (i if parts[info.source] > 1 else 0) * sizes[info.source]
      dst = np.asarray(edges["dst"])[mask] + (j if parts[info.target] > 1 else 0) * sizes[info.target]
      old_src, old_dst = mapping[info.source][src], mapping[info.target][dst]
      new_src = (old_src < 0) & (old_dst >= 0)  # new source, shared target
      if new_src.any():
        g = model.source_vectors(info_operator(config, r), params,
                                     old_tables[info.target][old_dst[new_src]], comparator)
        _scatter_add(sums[info.source], src[new_src], g)
        counts[info.source] += np.bincount(src[new_src], minlength=len(counts[info.source]))
      new_dst = (old_dst < 0) & (old_src >= 0)  # shared source, new target
      if new_dst.any():
        g = model.target_vectors(info_operator(config, r), params,
                                     old_tables[info.source][old_src[new_dst]])
        _scatter_add(sums[info.target], dst[new_dst], g)
        counts[info.target] += np.bincount(dst[new_dst], minlength=len(counts[info.target]))
  return {t: (sums[t], counts[t]) for t in sums}


def _scatter_add(target: np.ndarray, rows: np.ndarray, values: np.ndarray) -> None:
  """target[rows] += values with repeated rows summed (np.add.at is ~10x slower:
  sort the rows, sum each run with reduceat, add once per distinct row)."""
  order = np.argsort(rows, kind="stable")
  rows, values = rows[order], values[order]
  starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
  target[rows[starts]] += np.add.reduceat(values, starts, axis=0)


def info_operator(config, r: int) -> str:
  return config.relations[r]["operator"]


def warm_start(trainer, parent_dir: str) -> dict:
  """Initialises a fresh trainer's slot-0 tables (and anchors, relation
  parameters) from ``parent_dir``; returns counts per type for the log."""
  config = trainer.config
  parent = ParentVersion(parent_dir)
  graph = trainer.graph
  alpha = float(config.warm_start.l2_to_previous)
  summary = {"parent_version": parent.version_id, "types": {}}
  mapping, old_tables, old_accs = {}, {}, {}
  for t in graph.entities:
    if t not in parent.graph.entities:
      continue
    if parent.dims[t] != trainer.dims[t]:
      raise ValueError(f"warm start from {parent_dir}: type {t!r} has dim {parent.dims[t]} "
                       f"there and {trainer.dims[t]} here")
    mapping[t] = id_map(graph, parent.graph, t)
    old_tables[t], old_accs[t] = parent.read_type(t)
    # The parent may keep the other kind of Adagrad accumulators.
    old_accs[t] = storage.convert_accumulators(old_accs[t], trainer.dims[t],
                                               trainer.tables.coordinate_accumulators)
  inits = {}
  if config.warm_start.new_entities == "neighbors":
    inits = neighbor_init(graph, parent, config, mapping, old_tables)
  anchors = None
  if alpha > 0:
    anchors = storage.open_storage(
        config.storage.driver, os.path.join(trainer.workdir, ANCHORS_DIR),
        entities=graph.entities, dims=trainer.dims, zarr_format=config.storage.zarr_format,
        create=True, sub_partitions=trainer.num_shards, num_slots=1)
  for t, info in graph.entities.items():
    shared_total, neighbor_total = 0, 0
    for p in range(info.num_partitions):
      block = (t, p)
      table, acc = trainer.tables.read(block, 0)  # the random initialisation
      lo = p * info.partition_size
      weight = np.zeros(len(table), np.float32)
      if t in mapping:
        old = mapping[t][lo:lo + len(table)]
        shared = old >= 0
        table[shared] = old_tables[t][old[shared]]
        acc[shared] = old_accs[t][old[shared]]
        weight[shared] = 1.0
        shared_total += int(shared.sum())
        if t in inits:
          sums, counts = inits[t]
          fill = (~shared) & (counts[lo:lo + len(table)] > 0)
          table[fill] = (sums[lo:lo + len(table)][fill]
                         / counts[lo:lo + len(table)][fill][:, None]).astype(np.float32)
          neighbor_total += int(fill.sum())
      for future in trainer.tables.write(block, 0, table, acc):
        future.result()
      if anchors is not None:
        for future in anchors.write(block, 0, table, weight):
          future.result()
    summary["types"][t] = {"entities": info.count, "shared": shared_total,
                           "new_from_neighbors": neighbor_total,
                           "new_random": info.count - shared_total - neighbor_total}

  # Relation parameters by name; the optimizer state starts afresh.
  params = {g: np.array(p) for g, p in trainer.layout.init_params().items()}
  aligned = []
  for r, rel in enumerate(config.relations):
    known = parent.relation(rel["name"])
    group = trainer.layout.group[r]
    if known is None or known[0] != group:
      continue
    params[group][trainer.layout.row[r]] = known[1]
    params[group][trainer.layout.reverse_row[r]] = known[2]
    aligned.append(rel["name"])
  np.savez(os.path.join(trainer.workdir, RELATIONS_FILE), **params)
  summary["relations_aligned"] = aligned
  with open(os.path.join(trainer.workdir, "warm_start.json"), "w") as f:
    json.dump(summary, f, indent=1)
  return summary


def warm_relation_params(workdir: str) -> dict[str, np.ndarray]:
  with np.load(os.path.join(workdir, RELATIONS_FILE)) as data:
    return {k: data[k] for k in data.files}
