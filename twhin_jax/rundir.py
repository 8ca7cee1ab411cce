"""The run directory: the one place that names its files, and reading a run.

A run directory (``--workdir``) holds::

  config.json           the run's config; written by training only
  graph/                the imported graph (graph.py): manifest, vocabularies, edges
  generated/            edge files of a generated graph (the demo)
  tables/               TensorStore entity tables, two slots each (storage.py)
  anchors/              L2-to-previous anchors of a warm-started run (versions.py)
  checkpoints/<step>/   Orbax checkpoints: ``state`` (relation parameters and
                        their Adagrad state) and ``meta`` (JSON: format version,
                        cursor, slot map, config, lineage, history)
  metrics.jsonl         one JSON record per epoch (and event) of training
  plots/                training curves, drift plots
  eval_<split>.json     the metrics of ``twhin eval`` (and of a sweep run)
  export/               ``twhin export``: Parquet / .npy tables, relation parameters
  index/                retrieval: run.json, relations.npz, one folder per type
  mixture/<type>/       ``twhin cluster``: k-means and per-entity mixtures
  compressed/           ``twhin compress``: PQ codes per factor

This module does not import jax (a test checks it): opening a run, listing its
checkpoints and reading its config, graph and committed tables needs only
json, numpy and TensorStore, so ``twhin inspect`` and the tools start fast and
never build a model. Only :meth:`Run.relation_state` reads the Orbax ``state``
item, importing orbax (and so jax) when called.

Nothing here writes into a run: eval, export, retrieval, inspection and warm
starts read runs through :func:`open_run`, and ``config.json`` is written by
training alone.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import numpy as np

from twhin_jax import config as config_lib
from twhin_jax import networks
from twhin_jax import storage
from twhin_jax.graph import Graph

CONFIG_FILE = "config.json"
GRAPH_DIR = "graph"
GENERATED_DIR = "generated"
TABLES_DIR = "tables"
ANCHORS_DIR = "anchors"
CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"  # event files (training_log.py)
PLOTS_DIR = "plots"
EXPORT_DIR = "export"
INDEX_DIR = "index"
MIXTURE_DIR = "mixture"
COMPRESSED_DIR = "compressed"
BEST_DIR = "best"  # early stopping's best-so-far copy (best_checkpoint.py)

#: Version of the checkpoint ``meta`` JSON this code writes and reads.
CHECKPOINT_FORMAT_VERSION = 1
#: Rows read per TensorStore request while streaming a table.
STREAM_BLOCK_ROWS = 1 << 16


def eval_file(workdir: str, split: str) -> str:
  """Where ``twhin eval`` (and a sweep) leaves the metrics of one split."""
  return os.path.join(workdir, f"eval_{split}.json")


def checkpoint_root(workdir: str) -> str:
  return os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))


def checkpoint_steps(workdir: str) -> list[int]:
  """Steps of the complete checkpoints, oldest first.

  Orbax writes a checkpoint under a temporary name and renames it when done,
  so a numbered directory with its ``meta`` item is complete.
  """
  root = checkpoint_root(workdir)
  if not os.path.isdir(root):
    return []
  return sorted(int(name) for name in os.listdir(root)
                if name.isdigit() and os.path.exists(os.path.join(root, name, "meta", "metadata")))


def checkpoint_dir(workdir: str, step: int | None = None) -> str:
  """The directory of one checkpoint (the latest when ``step`` is None)."""
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"{workdir}: no such run directory")
  steps = checkpoint_steps(workdir)
  if not steps:
    raise FileNotFoundError(f"{checkpoint_root(workdir)}: no complete checkpoint "
                            "(is this a trained run directory?)")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise FileNotFoundError(f"{workdir}: no checkpoint at step {step} (have {steps})")
  return os.path.join(checkpoint_root(workdir), str(step))


def read_versioned_json(path: str, version: int, what: str, missing: str) -> dict:
  """A JSON document with a "format_version" this code reads; errors name the path.

  ``what`` names the format in the version error ("checkpoint", "export");
  ``missing`` is the message when the file is absent.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(missing)
  with open(path) as f:
    document = json.load(f)
  if document.get("format_version") != version:
    raise ValueError(f"{path}: {what} format {document.get('format_version')}, "
                     f"this code reads {version}")
  return document


def write_json_atomically(path: str, document, **dump_options) -> None:
  """Writes ``document`` as JSON to ``path`` through a temporary file and a
  rename, so a crash leaves the old file or the new one, never half of one."""
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(document, f, indent=1, **dump_options)
  os.replace(tmp, path)


def read_meta(ckpt_dir: str) -> dict:
  """The meta JSON of one checkpoint directory, without building any model."""
  return read_versioned_json(os.path.join(ckpt_dir, "meta", "metadata"),
                             CHECKPOINT_FORMAT_VERSION, "checkpoint",
                             f"{ckpt_dir}: not a complete twhin checkpoint (no meta)")


def load_config(workdir: str):
  """The config of a run: ``config.json``, else the latest checkpoint's copy."""
  path = os.path.join(workdir, CONFIG_FILE)
  if os.path.exists(path):
    with open(path) as f:
      try:
        return config_lib.from_json_dict(json.load(f))
      except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"{workdir}: no such run directory")
  if not checkpoint_steps(workdir):
    raise FileNotFoundError(f"{workdir}: no run here (expected {CONFIG_FILE})")
  return config_lib.from_json_dict(read_meta(checkpoint_dir(workdir))["config"])


def open_graph(workdir: str) -> Graph:
  """The run's graph: its own import, or a network's view of a shared one."""
  return networks.open_graph(os.path.join(workdir, GRAPH_DIR))


def _quiet_absl():
  # Orbax logs a warning for every read of a checkpoint written by a manager
  # (the manager keeps _CHECKPOINT_METADATA one level up); it is harmless.
  logging.getLogger("absl").setLevel(logging.ERROR)


def state_metadata(ckpt_dir: str):
  """(state directory, metadata tree) of a checkpoint's Orbax "state" item."""
  import orbax.checkpoint as ocp  # imports jax: only readers of the state need it
  _quiet_absl()
  state_dir = os.path.join(ckpt_dir, "state")
  if not os.path.isdir(state_dir):
    raise FileNotFoundError(f"{ckpt_dir}: no Orbax 'state' item")
  metadata = ocp.StandardCheckpointer().metadata(state_dir)
  tree = getattr(metadata, "item_metadata", metadata)
  return state_dir, getattr(tree, "tree", tree)


def restore_state(ckpt_dir: str) -> dict:
  """The Orbax ``state`` item as a nested dict of host numpy arrays.

  No mesh and no abstract tree: the leaves come back as they were saved
  ({"params": {group: [R, ...]}, "opt": ...}).
  """
  # orbax imports jax; only reading relation state needs it (see module doc).
  import jax
  import orbax.checkpoint as ocp  # lazy, as jax above
  state_dir, tree = state_metadata(ckpt_dir)
  restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  restored = ocp.PyTreeCheckpointer().restore(state_dir, restore_args=restore_args)
  return jax.tree_util.tree_map(np.asarray, restored)


@dataclasses.dataclass
class Run:
  """A trained run opened read-only on one checkpoint's committed slots."""
  workdir: str
  graph: Graph
  config: Any  # ml_collections.ConfigDict
  checkpoint_dir: str
  meta: dict
  tables: storage.EntityStorage
  slots: storage.SlotMap

  @property
  def entity_types(self) -> list[str]:
    return list(self.graph.entities)

  @property
  def step(self) -> int:
    return int(os.path.basename(self.checkpoint_dir))

  @property
  def version_id(self) -> str:
    return self.meta["lineage"]["version_id"]

  def dim(self, entity_type: str) -> int:
    return config_lib.entity_dim(self.config, entity_type)

  def check_type(self, entity_type: str) -> None:
    if entity_type not in self.graph.entities:
      raise KeyError(f"{self.workdir}: unknown entity type {entity_type!r} "
                     f"(types: {sorted(self.graph.entities)})")

  def blocks(self, entity_type: str) -> list[tuple[int, int]]:
    """(partition, rows) of a type, in local-id order."""
    info = self.graph.entities[entity_type]
    return [(p, info.partition_rows(p)) for p in range(info.num_partitions)]

  def stream(self, entity_type: str, block_rows: int = STREAM_BLOCK_ROWS, adagrad: bool = False):
    """Yields (first local id, rows [n, d] (, accumulators [n])) over the committed table."""
    self.check_type(entity_type)
    first = 0
    for partition, rows in self.blocks(entity_type):
      block = (entity_type, partition)
      slot = self.slots.committed[block]
      for lo in range(0, rows, block_rows):
        table, acc = self.tables.read_rows(block, slot, lo, min(lo + block_rows, rows))
        yield (first + lo, table, acc) if adagrad else (first + lo, table)
      first += rows

  def embeddings(self, entity_type: str) -> np.ndarray:
    """The committed table of one type, float32 [count, d]."""
    self.check_type(entity_type)
    return self.tables.read_type(entity_type, self.slots, use_committed=True)

  def read_type(self, entity_type: str) -> tuple[np.ndarray, np.ndarray]:
    """The committed table [count, d] and its Adagrad accumulators [count]."""
    self.check_type(entity_type)
    parts = [self.tables.read((entity_type, p), self.slots.committed[(entity_type, p)])
             for p, _ in self.blocks(entity_type)]
    return np.concatenate([t for t, _ in parts]), np.concatenate([a for _, a in parts])

  def all_embeddings(self) -> dict[str, np.ndarray]:
    return {t: self.embeddings(t) for t in self.graph.entities}

  def relation_state(self) -> dict:
    """{"params": {group: [R, ...]}, "opt": ...} of the checkpoint, as numpy."""
    return restore_state(self.checkpoint_dir)

  def relation_params(self) -> dict[str, np.ndarray]:
    """{group name: stacked parameters}, as ``model.RelationLayout`` indexes them."""
    return dict(self.relation_state()["params"])


def open_run(workdir: str, step: int | None = None) -> Run:
  """Opens a run directory read-only (see the module doc); errors name the path."""
  ckpt = checkpoint_dir(workdir, step)
  meta = read_meta(ckpt)
  graph = open_graph(workdir)
  config = load_config(workdir)
  dims = {t: config_lib.entity_dim(config, t) for t in graph.entities}
  # Runs saved before storage.driver existed used the one driver there was.
  driver = config.storage.get("driver", storage.DEFAULT_DRIVER)
  tables = storage.open_storage(driver, os.path.join(workdir, TABLES_DIR),
                                entities=graph.entities, dims=dims,
                                zarr_format=int(config.storage.zarr_format))
  slots = storage.SlotMap.from_json(meta["slots"])
  missing = [f"{t}/{p}" for t, p in tables.blocks() if (t, p) not in slots.committed]
  if missing:
    raise ValueError(f"{ckpt}: slot map lacks partitions {missing[:5]}")
  return Run(workdir, graph, config, ckpt, meta, tables, slots)
