"""Reading a trained run without building the model: versions, arrays, stats, diffs.

(Named ``inspection`` rather than ``inspect``, which would shadow the standard
library module of that name.)

Everything here opens a run directory read-only, from what it describes about
itself (STYLE habit 9): ``config.json``, the imported graph (manifest,
vocabularies, degrees), the Orbax checkpoints under ``checkpoints/<step>/``
(``meta``: cursor, slot map, config, lineage, history; ``state``: relation
parameters and their Adagrad state) and the TensorStore tables the slot map
points at. No ``Trainer`` is built, no table is created, nothing is written.

What it offers (a run is opened by ``rundir.open_run``; vectors come from
``embedding_set.load_embeddings``):

  versions(workdir)            every checkpoint with its cursor and lineage, and the chain
                                  of parents that can be found on disk
  checkpoint_arrays(dir)       shape, dtype, sharding, bytes of every Orbax leaf (metadata only)
  table_specs(run)             shape, chunking, driver, bytes of every TensorStore array
  table_stats(run)             per type: row norms (mean, min, p50, p99, max), NaN / inf
                               counts, zero rows, Adagrad accumulator range; streamed
                               partition by partition in blocks of rows
  neighbors(source, TYPE, NAME) exact nearest neighbours of one named entity
  diff_runs(dir_a, dir_b)      leaf by leaf: max |a - b|, ||a - b|| / ||a||, shape changes

Relative difference of a leaf (and drift, see drift.py): ||b - a||_F / ||a||_F,
0 when both are zero, inf when only a is.
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np

from twhin_jax import config as config_lib
from twhin_jax import networks
from twhin_jax import rundir
from twhin_jax import storage
from twhin_jax import vocabulary as vocabulary_lib
from twhin_jax.embedding_set import load_embeddings
from twhin_jax.rundir import Run, open_run

#: Row norms kept for percentiles; beyond this a uniform subsample (seeded).
MAX_NORMS_FOR_PERCENTILES = 2_000_000


# --------------------------------------------------------------------------
# Versions and arrays.


def versions(workdir: str) -> dict:
  """Every checkpoint of a run with its cursor and lineage, plus the parent chain.

  Only the latest checkpoint is kept by training (checkpoint.py), so the list
  is usually one entry. The chain follows ``lineage`` entries that name
  another run directory (any string value that is a directory with
  checkpoints), as far as those directories exist.
  """
  steps = rundir.checkpoint_steps(workdir)
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"{workdir}: no such run directory")
  entries = []
  for step in steps:
    meta = rundir.read_meta(rundir.checkpoint_dir(workdir, step))
    history = meta.get("history", [])
    entries.append({"step": step, "cursor": meta.get("cursor"),
                    "total_steps": meta.get("total_steps"), "lineage": meta.get("lineage", {}),
                    "epochs_done": len(history),
                    "last_epoch": history[-1] if history else None})
  chain, seen, current = [], set(), workdir
  while current and os.path.abspath(current) not in seen:
    seen.add(os.path.abspath(current))
    if not rundir.checkpoint_steps(current):
      break
    lineage = rundir.read_meta(rundir.checkpoint_dir(current)).get("lineage", {})
    chain.append({"workdir": current, **lineage})
    parents = [v for v in lineage.values() if isinstance(v, str) and v != current
               and os.path.isdir(rundir.checkpoint_root(v))]
    current = parents[0] if parents else None
  return {"workdir": workdir, "checkpoints": entries, "chain": chain}


def checkpoint_arrays(ckpt_dir: str) -> list[dict]:
  """Leaves of the Orbax ``state`` item: name, shape, dtype, sharding, bytes.

  Read from Orbax metadata only; no array is restored.
  """
  # orbax imports jax: only this listing and diffs need it.
  import jax
  _, tree = rundir.state_metadata(ckpt_dir)
  out = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    shape = tuple(int(s) for s in leaf.shape)
    dtype = np.dtype(leaf.dtype)
    sharding = getattr(leaf, "sharding", None)
    spec = getattr(sharding, "partition_spec", None)
    out.append({"name": jax.tree_util.keystr(path, simple=True, separator="/"),
                "shape": list(shape), "dtype": str(dtype),
                "sharding": (f"{type(sharding).__name__.replace('Metadata', '')}"
                             f"(spec={tuple(spec) if spec is not None else None}, "
                             f"mesh={[int(s) for s in getattr(sharding, 'shape', []) or []]})"
                             if sharding is not None else None),
                "bytes": int(math.prod(shape) * dtype.itemsize)})
  return out


def _flat_state(ckpt_dir: str) -> dict[str, np.ndarray]:
  """The Orbax ``state`` item as {"params/<group>": array, ...}."""
  flat = {}

  def walk(node, prefix):
    if isinstance(node, dict):
      for key, value in node.items():
        walk(value, f"{prefix}{key}/")
    elif isinstance(node, (list, tuple)):
      for index, value in enumerate(node):
        walk(value, f"{prefix}{index}/")
    elif node is not None:  # optax's empty states restore as None: no leaf
      flat[prefix[:-1]] = np.asarray(node)

  walk(rundir.restore_state(ckpt_dir), "")
  return flat


def _directory_bytes(path: str) -> int:
  total = 0
  for root, _, files in os.walk(path):
    total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
  return total


def table_specs(run: Run) -> list[dict]:
  """Every TensorStore array of the run: type, slot, name, shape, chunk, driver, bytes."""
  out = []
  for (entity_type, slot, name), array in sorted(run.tables._arrays.items()):
    path = os.path.join(run.tables.root, entity_type, f"slot{slot}", name)
    committed = sorted(p for (t, p), s in run.slots.committed.items()
                       if t == entity_type and s == slot)
    out.append({"type": entity_type, "slot": slot, "array": name,
                "shape": list(array.shape), "dtype": str(array.dtype.numpy_dtype),
                "chunk": list(array.chunk_layout.read_chunk.shape),
                "driver": array.spec().to_json()["driver"],
                "logical_bytes": int(math.prod(array.shape) * array.dtype.numpy_dtype.itemsize),
                "disk_bytes": _directory_bytes(path),
                "committed_partitions": committed})
  return out


# --------------------------------------------------------------------------
# Statistics.


def table_stats(run: Run, types=None, seed: int = 0) -> dict[str, dict]:
  """Per type, streamed over the committed partitions in blocks of rows.

  For rows x_i of a type: norms ||x_i||_2 (mean, std, min, p50, p99, max over
  rows with finite norms), ``nan_values`` / ``inf_values`` (elements),
  ``nan_rows`` (rows with any NaN), ``zero_rows``, and the row-wise Adagrad
  accumulators (min, mean, max, NaN count). Percentiles come from every norm
  up to 2M rows, else a seeded uniform subsample.
  """
  types = run.entity_types if types is None else list(types)
  rng = np.random.default_rng(seed)
  stats = {}
  for entity_type in types:
    run.check_type(entity_type)
    count = run.graph.entities[entity_type].count
    keep = min(1.0, MAX_NORMS_FOR_PERCENTILES / max(count, 1))
    kept, total, total_sq, finite_rows = [], 0.0, 0.0, 0
    lo, hi = math.inf, -math.inf
    nan_values = inf_values = nan_rows = zero_rows = 0
    acc_min, acc_max, acc_sum, acc_nan, acc_values = math.inf, -math.inf, 0.0, 0, 0
    for _, rows, acc in run.stream(entity_type, adagrad=True):
      nan_mask = np.isnan(rows)
      nan_values += int(nan_mask.sum())
      inf_values += int(np.isinf(rows).sum())
      nan_rows += int(nan_mask.any(axis=1).sum())
      norms = np.linalg.norm(rows.astype(np.float64), axis=1)  # [n]
      zero_rows += int(np.sum(norms == 0))
      finite = norms[np.isfinite(norms)]
      finite_rows += len(finite)
      total += float(finite.sum())
      total_sq += float(np.square(finite).sum())
      if len(finite):
        lo, hi = min(lo, float(finite.min())), max(hi, float(finite.max()))
      kept.append(finite if keep >= 1.0 else finite[rng.random(len(finite)) < keep])
      acc_nan += int(np.isnan(acc).sum())
      good = acc[np.isfinite(acc)]
      if len(good):
        acc_min, acc_max = min(acc_min, float(good.min())), max(acc_max, float(good.max()))
        acc_sum += float(good.sum())
        acc_values += len(good)  # one per row, or d with per-coordinate accumulators
    norms = np.concatenate(kept) if kept else np.zeros(0)
    mean = total / finite_rows if finite_rows else math.nan
    stats[entity_type] = {
        "count": count, "dim": run.dim(entity_type),
        "norm_mean": mean,
        "norm_std": math.sqrt(max(total_sq / finite_rows - mean * mean, 0.0))
                    if finite_rows else math.nan,
        "norm_min": lo if finite_rows else math.nan,
        "norm_p50": float(np.percentile(norms, 50)) if len(norms) else math.nan,
        "norm_p99": float(np.percentile(norms, 99)) if len(norms) else math.nan,
        "norm_max": hi if finite_rows else math.nan,
        "nan_values": nan_values, "nan_rows": nan_rows, "inf_values": inf_values,
        "zero_rows": zero_rows,
        "adagrad_min": acc_min if acc_min < math.inf else math.nan,
        "adagrad_mean": acc_sum / acc_values if acc_values else math.nan,
        "adagrad_max": acc_max if acc_max > -math.inf else math.nan,
        "adagrad_nan": acc_nan,
    }
  return stats


def summary(workdir: str, with_stats: bool = True) -> dict:
  """Everything `twhin inspect --workdir` prints: versions, config, cursor,
  checkpoint arrays, table arrays and (optionally) per-type statistics."""
  run = open_run(workdir)
  meta = run.meta
  return {
      "workdir": workdir,
      "checkpoint": run.checkpoint_dir,
      "format_version": meta.get("format_version"),
      "cursor": meta.get("cursor"),
      "total_steps": meta.get("total_steps"),
      "seed": meta.get("seed"),
      "mesh": meta.get("mesh"),
      "versions": versions(workdir),
      "history": meta.get("history", []),
      "graph": {"path": run.graph.path, "hash": run.graph.manifest_hash,
                "entities": {t: {"count": e.count, "partitions": e.num_partitions}
                             for t, e in run.graph.entities.items()},
                "relations": [dataclasses.asdict(r) for r in run.graph.relations],
                "edges": run.graph.manifest.get("counts", {}),
                "network": run.graph.manifest.get("network"),
                "coverage": networks.coverage_table(run.graph.manifest)},
      "config": config_lib.to_json_dict(run.config),
      "slots": meta.get("slots"),
      "checkpoint_arrays": checkpoint_arrays(run.checkpoint_dir),
      "tables": table_specs(run),
      "stats": table_stats(run) if with_stats else None,
  }


def _human_bytes(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if abs(n) < 1024 or unit == "TiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return str(n)


def format_summary(info: dict) -> str:
  """A human-readable rendering of :func:`summary`."""
  lines = [f"run {info['workdir']}", f"  checkpoint   {info['checkpoint']} "
           f"(format {info['format_version']})",
           f"  cursor       epoch {info['cursor']['epoch']}, bucket {info['cursor']['bucket']}; "
           f"{info['total_steps']} steps; seed {info['seed']}; mesh {info['mesh']}"]
  lines.append("\nversions (newest first along the lineage)")
  for link in info["versions"]["chain"]:
    lines.append(f"  {link.get('version_id')}  parent {link.get('parent_id')}  "
                 f"created {link.get('created')}  graph {link.get('graph_manifest_hash')}  "
                 f"config {link.get('config_hash')}  ({link['workdir']})")
  for entry in info["versions"]["checkpoints"]:
    last = entry["last_epoch"] or {}
    valid = last.get("valid", {})
    lines.append(f"  checkpoint step {entry['step']}: {entry['epochs_done']} epochs, "
                 f"last loss {last.get('loss', float('nan')):.4f}"
                 + (f", valid MRR {valid['mrr']:.4f}" if "mrr" in valid else ""))
  graph = info["graph"]
  lines.append(f"\ngraph {graph['path']} (hash {graph['hash']}); edges {graph['edges']}")
  if graph.get("network"):
    lines.append(f"  network {graph['network']!r}: a view of a shared import")
  for t, e in graph["entities"].items():
    lines.append(f"  {t:<14} {e['count']:>10} entities, {e['partitions']} partitions")
  if graph.get("coverage"):
    lines.append("\ncoverage (share of each type's entities in a relation; "
                 f">= {networks.HIGH_COVERAGE:.0%} at the source: high coverage)")
    for row in graph["coverage"]:
      lines.append(f"  {row['relation']:<16} {row['source']:>10} {row['source_share']:>7.1%}"
                   f"  -> {row['target']:>10} {row['target_share']:>7.1%}")
  cfg = info["config"]
  lines.append(f"\nconfig {cfg.get('name')}: dim {cfg['model']['dim']}, "
               f"comparator {cfg['model']['comparator']}, loss {cfg['train']['loss']}, "
               f"epochs {cfg['train']['epochs']}, lr {cfg['train']['lr']}, "
               f"batch {cfg['train']['batch_size']}, "
               f"negatives {cfg['negatives']['chunk_size']}+{cfg['negatives']['num_uniform']}")
  lines.append("\ncheckpoint arrays (Orbax)")
  for a in info["checkpoint_arrays"]:
    lines.append(f"  {a['name']:<40} {str(a['shape']):<14} {a['dtype']:<8} "
                 f"{_human_bytes(a['bytes']):>10}  {a['sharding']}")
  lines.append("\ntables (TensorStore; * = slot holding committed partitions)")
  for a in info["tables"]:
    mark = "*" if a["committed_partitions"] else " "
    lines.append(f" {mark}{a['type']}/slot{a['slot']}/{a['array']:<11} {str(a['shape']):<14} "
                 f"chunk {str(a['chunk']):<12} {a['driver']:<6} "
                 f"{_human_bytes(a['logical_bytes']):>10} logical, "
                 f"{_human_bytes(a['disk_bytes']):>10} on disk")
  if info.get("stats"):
    lines.append("\nper type (committed values)")
    lines.append(f"  {'type':<14} {'count':>8} {'dim':>4} {'norm mean':>10} {'p50':>8} "
                 f"{'p99':>8} {'max':>8} {'NaN':>6} {'inf':>5} {'zero':>6} {'adagrad mean':>12}")
    for t, s in info["stats"].items():
      lines.append(f"  {t:<14} {s['count']:>8} {s['dim']:>4} {s['norm_mean']:>10.4f} "
                   f"{s['norm_p50']:>8.4f} {s['norm_p99']:>8.4f} {s['norm_max']:>8.4f} "
                   f"{s['nan_values']:>6} {s['inf_values']:>5} {s['zero_rows']:>6} "
                   f"{s['adagrad_mean']:>12.4g}")
  return "\n".join(lines)


# --------------------------------------------------------------------------
# Neighbours and diffs.


def parse_entity(spec: str) -> tuple[str, str]:
  """"TYPE:NAME" -> (type, name); the name may itself contain colons."""
  entity_type, sep, name = spec.partition(":")
  if not sep or not entity_type or not name:
    raise ValueError(f"{spec!r}: expected TYPE:NAME (for example user:42)")
  return entity_type, name


def neighbors(source, entity_type: str, name: str, *, k: int = 10,
              target_type: str | None = None, metric: str = "cos") -> list[dict]:
  """The k nearest entities of ``target_type`` (default: the same type) to one
  named entity, by exact search (drift.exact_knn); the entity itself is left out.

  Returns [{"name", "score", "row"}], best first.
  """
  from twhin_jax import drift  # imports jax: `twhin inspect` without --neighbors stays light
  target_type = target_type or entity_type
  embeddings = load_embeddings(source, sorted({entity_type, target_type}))
  row = embeddings.lookup(entity_type, name)
  query = embeddings.tables[entity_type][row:row + 1]
  database = embeddings.tables[target_type]
  if query.shape[1] != database.shape[1]:
    raise ValueError(f"{entity_type} vectors have dim {query.shape[1]}, "
                     f"{target_type} vectors {database.shape[1]}: not comparable")
  exclude = np.array([row if target_type == entity_type else -1])
  k = min(k, len(database) - (1 if target_type == entity_type else 0))
  ids, scores = drift.exact_knn(query, database, k, metric=metric, exclude=exclude)
  names = embeddings.names[target_type]
  return [{"name": names[i], "score": float(s), "row": int(i)}
          for i, s in zip(ids[0], scores[0]) if i >= 0]


def _leaf_diff(a: np.ndarray | None, b: np.ndarray | None) -> dict:
  out = {"shape_a": None if a is None else list(a.shape),
         "shape_b": None if b is None else list(b.shape)}
  if a is None or b is None or a.shape != b.shape:
    out["status"] = "added" if a is None else "removed" if b is None else "shape changed"
    return out
  a64, b64 = a.astype(np.float64), b.astype(np.float64)
  delta = b64 - a64
  norm_a = float(np.linalg.norm(a64))
  norm_delta = float(np.linalg.norm(delta))
  out.update(status="same" if norm_delta == 0 else "changed",
             max_abs_diff=float(np.max(np.abs(delta))) if delta.size else 0.0,
             rel_diff=(0.0 if norm_delta == 0 else math.inf if norm_a == 0
                       else norm_delta / norm_a),
             nan_a=int(np.isnan(a64).sum()), nan_b=int(np.isnan(b64).sum()))
  return out


def diff_runs(dir_a: str, dir_b: str) -> dict:
  """Leaf-by-leaf differences between the latest checkpoints of two runs.

  Leaves: every array of the Orbax state (relation parameters, their Adagrad
  sums) and, per entity type, the embeddings and row-wise Adagrad
  accumulators of the committed slots. Entity rows are aligned by name; rows
  only one run has are counted (``only_a`` / ``only_b``) and left out of the
  numbers. For each leaf: shapes, max |b - a|, ||b - a|| / ||a||, NaN counts.
  """
  run_a, run_b = open_run(dir_a), open_run(dir_b)
  state_a, state_b = _flat_state(run_a.checkpoint_dir), _flat_state(run_b.checkpoint_dir)
  leaves = {}
  for name in sorted(set(state_a) | set(state_b)):
    leaves[f"state/{name}"] = _leaf_diff(state_a.get(name), state_b.get(name))
  entities = {}
  for entity_type in sorted(set(run_a.graph.entities) | set(run_b.graph.entities)):
    in_a, in_b = entity_type in run_a.graph.entities, entity_type in run_b.graph.entities
    if not (in_a and in_b):
      entities[entity_type] = {"status": "only in " + ("a" if in_a else "b")}
      continue
    vocab_a, vocab_b = run_a.graph.vocabulary(entity_type), run_b.graph.vocabulary(entity_type)
    table_a, acc_a = _full_type(run_a, entity_type)
    table_b, acc_b = _full_type(run_b, entity_type)
    if _same_names(vocab_a, vocab_b):
      rows_a = rows_b = slice(None)
      shared, only_a, only_b = len(vocab_a), 0, 0
    else:
      rows_a, rows_b = _shared_rows(vocab_a, vocab_b)
      shared = len(rows_a)
      only_a, only_b = len(vocab_a) - shared, len(vocab_b) - shared
    entities[entity_type] = {"shared": shared, "only_a": only_a, "only_b": only_b}
    if acc_a.ndim != acc_b.ndim:  # one run keeps an accumulator per coordinate: compare per row
      acc_a, acc_b = (storage.convert_accumulators(acc, table_a.shape[1], per_coordinate=False)
                      for acc in (acc_a, acc_b))
    for leaf, a, b in (("embeddings", table_a, table_b), ("adagrad", acc_a, acc_b)):
      leaves[f"tables/{entity_type}/{leaf}"] = _leaf_diff(a[rows_a], b[rows_b])
  return {"a": dir_a, "b": dir_b,
          "version_a": run_a.meta.get("lineage", {}).get("version_id"),
          "version_b": run_b.meta.get("lineage", {}).get("version_id"),
          "entities": entities, "leaves": leaves}


def _same_names(vocab_a, vocab_b) -> bool:
  """Whether two on-disk vocabularies hold the same names in the same id
  order, compared a chunk at a time."""
  if len(vocab_a) != len(vocab_b):
    return False
  return all(a.equals(b) for a, b in zip(vocab_a.iter_name_chunks(1 << 16),
                                         vocab_b.iter_name_chunks(1 << 16)))


def _shared_rows(vocab_a, vocab_b) -> tuple[np.ndarray, np.ndarray]:
  """(rows in a, rows in b) of the names both hold, in a's id order: a merge
  join of the two vocabularies (vocabulary.iter_shared_ids), no dict of names."""
  pairs = list(vocabulary_lib.iter_shared_ids(vocab_a, vocab_b))
  rows_a = np.concatenate([p[0] for p in pairs] or [np.zeros(0, np.int64)])
  rows_b = np.concatenate([p[1] for p in pairs] or [np.zeros(0, np.int64)])
  order = np.argsort(rows_a, kind="stable")
  return rows_a[order], rows_b[order]


def _full_type(run: Run, entity_type: str) -> tuple[np.ndarray, np.ndarray]:
  tables, accs = [], []
  for _, rows, acc in run.stream(entity_type, adagrad=True):
    tables.append(rows)
    accs.append(acc)
  if not tables:
    return np.zeros((0, run.dim(entity_type)), np.float32), np.zeros(0, np.float32)
  return np.concatenate(tables), np.concatenate(accs)


def format_diff(diff: dict) -> str:
  lines = [f"diff a={diff['a']} ({diff['version_a']})  b={diff['b']} ({diff['version_b']})"]
  for entity_type, info in diff["entities"].items():
    if "shared" in info:
      lines.append(f"  {entity_type}: {info['shared']} shared rows, {info['only_a']} only in a, "
                   f"{info['only_b']} only in b")
    else:
      lines.append(f"  {entity_type}: {info['status']}")
  lines.append(f"\n  {'leaf':<44} {'status':<14} {'shape a':<12} {'shape b':<12} "
               f"{'max |b-a|':>11} {'rel':>10}")
  for name, leaf in diff["leaves"].items():
    numbers = (f"{leaf['max_abs_diff']:>11.4g} {leaf['rel_diff']:>10.4g}"
               if "max_abs_diff" in leaf else "")
    lines.append(f"  {name:<44} {leaf['status']:<14} {str(leaf['shape_a']):<12} "
                 f"{str(leaf['shape_b']):<12} {numbers}")
  return "\n".join(lines)
