"""Drift between two trained versions: per-entity change, by degree, and neighbour overlap.

TwHIN retrains its embeddings regularly; downstream models that froze the old
vectors only keep working if the new ones stay close (paper section 5.3,
Figure 4c: relative change against degree). For an entity v present in both
versions (aligned by name),

    rel_l2(v) = ||theta_new(v) - theta_old(v)||_2 / ||theta_old(v)||_2        (1)

(a zero old vector gives inf unless the new one is zero too). Reported over
all shared entities (mean, median, p99), per entity type and per degree
bucket: log-spaced bins of the train degree in the new version's graph,

    bucket 0 = {deg = 0},  bucket b >= 1 = {2^(b-1) <= deg < 2^b}             (2)

(base 2 by default) because drift falls with degree (high-degree entities get
many updates that agree; rare ones are pushed around by their few edges).

Neighbour overlap@k measures what retrieval sees: for a seeded sample S of
shared entities of a type,

    overlap@k = 1/|S| sum_{v in S} |N_k^old(v) ∩ N_k^new(v)| / k              (3)

where N_k(v) are the k nearest shared entities of the same type (v itself
excluded), by cosine similarity unless ``metric`` says otherwise, found by
exact search (:func:`exact_knn`: a jitted, batched brute force: one matmul
per block of queries against a block of the table, with a running top-k).
"""

from __future__ import annotations

import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from twhin_jax import rundir
from twhin_jax.embedding_set import load_embeddings

METRICS = ("cos", "dot", "l2")
#: Queries per jitted call and table rows per jitted call of exact_knn.
QUERY_BLOCK = 256
TABLE_BLOCK = 1 << 15


# --------------------------------------------------------------------------
# Exact k nearest neighbours.


@functools.partial(jax.jit, static_argnames=("k", "metric"))
def _block_top_k(queries, table, table_offset, table_valid, exclude, best_scores, best_ids, *,
                 k: int, metric: str):
  """Merges one table block into the running top-k of a query block.

  queries [Q, d], table [T, d] (rows >= table_valid are padding), exclude [Q]
  (a global row id to skip per query, -1 for none), best_* [Q, k].
  """
  if metric == "l2":  # -|q - x|^2 = 2 q.x - |x|^2 - |q|^2; the last term ranks nothing
    scores = 2.0 * queries @ table.T - jnp.sum(jnp.square(table), axis=-1)[None, :]  # [Q, T]
  else:  # cos: rows were normalised by the caller
    scores = queries @ table.T  # [Q, T]
  ids = table_offset + jnp.arange(table.shape[0], dtype=jnp.int32)  # [T]
  invalid = (jnp.arange(table.shape[0]) >= table_valid)[None, :] | (ids[None, :] == exclude[:, None])
  scores = jnp.where(invalid, -jnp.inf, scores)
  merged_scores = jnp.concatenate([best_scores, scores], axis=1)  # [Q, k + T]
  merged_ids = jnp.concatenate([best_ids, jnp.broadcast_to(ids, scores.shape)], axis=1)
  top_scores, position = jax.lax.top_k(merged_scores, k)  # [Q, k]
  return top_scores, jnp.take_along_axis(merged_ids, position, axis=1)


def _normalise(x: np.ndarray) -> np.ndarray:
  norms = np.linalg.norm(x, axis=1, keepdims=True)
  return x / np.maximum(norms, 1e-12)


def exact_knn(queries, table, k: int, *, metric: str = "cos", exclude=None,
              query_block: int = QUERY_BLOCK, table_block: int = TABLE_BLOCK,
              progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """Exact top-k rows of ``table`` for every query, by brute force on the device.

  Args:
    queries: [Q, d] float.
    table: [N, d] float (numpy or memmap; moved to the device a block at a time).
    k: neighbours per query (k <= N).
    metric: "cos" (cosine similarity), "dot" or "l2" (nearest in Euclidean distance).
    exclude: optional int [Q]: a row of ``table`` to leave out for each query
      (the query itself when it comes from the table), -1 for none.

  Returns:
    (ids int32 [Q, k], scores float32 [Q, k]), best first; ids are -1 where
    fewer than k rows were eligible. Scores are the similarity (cos, dot) or
    the negative squared distance minus |q|^2 (l2; ranks like -|q - x|^2).
  """
  if metric not in METRICS:
    raise ValueError(f"unknown metric {metric!r}; choose from {METRICS}")
  queries = np.asarray(queries, np.float32)
  num_rows, dim = table.shape
  if queries.ndim != 2 or queries.shape[1] != dim:
    raise ValueError(f"queries of shape {queries.shape} do not match table dim {dim}")
  if not 1 <= k <= num_rows:
    raise ValueError(f"k must be in [1, {num_rows}] (table rows), got {k}")
  exclude = (np.full(len(queries), -1, np.int32) if exclude is None
             else np.asarray(exclude, np.int32))
  if metric == "cos":
    queries = _normalise(queries)
  # Static shapes: pad the last query block and the last table block (masked).
  query_block = min(query_block, max(len(queries), 1))
  table_block = min(table_block, num_rows)
  table_blocks = []
  for start in range(0, num_rows, table_block):
    rows = np.asarray(table[start:start + table_block], np.float32)
    if metric == "cos":
      rows = _normalise(rows)
    valid = len(rows)
    if valid < table_block:
      rows = np.concatenate([rows, np.zeros((table_block - valid, dim), np.float32)])
    table_blocks.append((jnp.asarray(rows), start, valid))
  all_ids, all_scores = [], []
  starts = range(0, len(queries), query_block)
  for start in tqdm(starts, desc="exact kNN", unit="block", disable=not progress):
    block = queries[start:start + query_block]
    skip = exclude[start:start + query_block]
    n = len(block)
    if n < query_block:
      block = np.concatenate([block, np.zeros((query_block - n, dim), np.float32)])
      skip = np.concatenate([skip, np.full(query_block - n, -1, np.int32)])
    best_scores = jnp.full((query_block, k), -jnp.inf, jnp.float32)
    best_ids = jnp.full((query_block, k), -1, jnp.int32)
    q, skip = jnp.asarray(block), jnp.asarray(skip)
    for rows, offset, valid in table_blocks:
      best_scores, best_ids = _block_top_k(q, rows, jnp.int32(offset), jnp.int32(valid), skip,
                                           best_scores, best_ids, k=k, metric=metric)
    all_ids.append(np.asarray(best_ids)[:n])
    all_scores.append(np.asarray(best_scores)[:n])
  ids = np.concatenate(all_ids) if all_ids else np.zeros((0, k), np.int32)
  scores = np.concatenate(all_scores) if all_scores else np.zeros((0, k), np.float32)
  ids = np.where(np.isfinite(scores), ids, -1)
  return ids, scores


def neighbour_overlap(ids_a: np.ndarray, ids_b: np.ndarray) -> np.ndarray:
  """|A_i ∩ B_i| / k per row of two [Q, k] neighbour lists (-1 entries never match)."""
  k = ids_a.shape[1]
  match = (ids_a[:, :, None] == ids_b[:, None, :]) & (ids_a[:, :, None] >= 0)  # [Q, k, k]
  return match.any(axis=2).sum(axis=1) / k


# --------------------------------------------------------------------------
# Drift.


def degree_bucket(degrees: np.ndarray, base: float = 2.0) -> np.ndarray:
  """Eq. (2): 0 for degree 0, else 1 + floor(log_base(degree))."""
  degrees = np.asarray(degrees, np.float64)
  out = np.zeros(len(degrees), np.int64)
  positive = degrees > 0
  out[positive] = 1 + np.floor(np.log(degrees[positive]) / math.log(base) + 1e-9).astype(np.int64)
  return out


def bucket_range(bucket: int, base: float = 2.0) -> tuple[int, int]:
  """[lo, hi) degrees of a bucket of eq. (2)."""
  if bucket == 0:
    return 0, 1
  return int(math.ceil(base ** (bucket - 1))), int(math.ceil(base ** bucket))


def _summary(values: np.ndarray) -> dict:
  finite = values[np.isfinite(values)]
  if len(finite) == 0:
    return {"count": int(len(values)), "mean_rel_l2": math.nan, "median_rel_l2": math.nan,
            "p99_rel_l2": math.nan, "non_finite": int(len(values))}
  return {"count": int(len(values)), "mean_rel_l2": float(finite.mean()),
          "median_rel_l2": float(np.median(finite)),
          "p99_rel_l2": float(np.percentile(finite, 99)),
          "non_finite": int(len(values) - len(finite))}


def _buckets(rel: np.ndarray, degrees: np.ndarray, base: float) -> list[dict]:
  index = degree_bucket(degrees, base)
  out = []
  for bucket in np.unique(index):
    lo, hi = bucket_range(int(bucket), base)
    out.append({"bucket": int(bucket), "degree_lo": lo, "degree_hi": hi,
                **_summary(rel[index == bucket])})
  return out


def drift(old, new, *, k: int = 10, sample: int = 2000, seed: int = 0, metric: str = "cos",
          types=None, degree_base: float = 2.0, out_dir: str | None = None,
          progress: bool = False) -> dict:
  """Drift of every shared entity between two versions (see the module doc).

  Args:
    old, new: anything ``embedding_set.load_embeddings`` reads (run dirs, export
      dirs, ``EmbeddingSet``s).
    k: neighbours for overlap@k.
    sample: entities per type whose neighbour lists are compared (all if fewer).
    seed: seeds the sample.
    metric: neighbour similarity, "cos", "dot" or "l2".
    types: entity types (default: those both versions have).
    degree_base: base of the log-spaced degree buckets, eq. (2).
    out_dir: where to write ``drift.png`` and ``drift.json``; default: the new
      run's ``plots/`` when ``new`` is a path, else nothing is written.

  Returns:
    {"mean_rel_l2", "median_rel_l2", "p99_rel_l2", "overlap_at_k", "k", "metric",
     "shared", "per_type": {type: {count, only_old, only_new, mean/median/p99_rel_l2,
     overlap_at_k, overlap_sample, degree_buckets: [...]}},
     "per_degree_bucket": [{bucket, degree_lo, degree_hi, count, mean/median/p99_rel_l2}],
     "plot": path or None}. Degree buckets use the new version's degrees
     (the old one's if the new has none; empty without degrees).
  """
  old_set = load_embeddings(old)
  new_set = load_embeddings(new)
  shared_types = [t for t in old_set.entity_types if t in new_set.tables]
  if types is None:
    types = shared_types
  for entity_type in types:
    old_set.check_type(entity_type)
    new_set.check_type(entity_type)
  if not types:
    raise ValueError(f"{old_set.origin} and {new_set.origin} share no entity type")
  rng = np.random.default_rng(seed)
  per_type, all_rel, all_deg, all_overlap = {}, [], [], []
  for entity_type in types:
    old_table, new_table = old_set.tables[entity_type], new_set.tables[entity_type]
    if old_table.shape[1] != new_table.shape[1]:
      raise ValueError(f"{entity_type}: dim {old_table.shape[1]} in {old_set.origin} but "
                       f"{new_table.shape[1]} in {new_set.origin}")
    new_rows_of_old = new_set.rows_of(old_set, entity_type)  # [N_old]
    old_rows = np.flatnonzero(new_rows_of_old >= 0)
    new_rows = new_rows_of_old[old_rows]
    a = np.asarray(old_table[old_rows], np.float64)  # [S, d] aligned by name
    b = np.asarray(new_table[new_rows], np.float64)
    delta = np.linalg.norm(b - a, axis=1)
    norm_old = np.linalg.norm(a, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
      rel = np.where(delta == 0, 0.0, delta / norm_old)  # eq. (1)
    degrees = (new_set.degrees[entity_type][new_rows] if entity_type in new_set.degrees
               else old_set.degrees[entity_type][old_rows] if entity_type in old_set.degrees
               else None)
    info = {"only_old": int(len(old_table) - len(old_rows)),
            "only_new": int(len(new_table) - len(old_rows)), **_summary(rel)}
    if len(old_rows) > k:
      chosen = (np.arange(len(old_rows)) if len(old_rows) <= sample
                else np.sort(rng.choice(len(old_rows), sample, replace=False)))
      ids_old, _ = exact_knn(a[chosen], a, k, metric=metric, exclude=chosen, progress=progress)
      ids_new, _ = exact_knn(b[chosen], b, k, metric=metric, exclude=chosen, progress=progress)
      overlap = neighbour_overlap(ids_old, ids_new)  # eq. (3), [|S|]
      info.update(overlap_at_k=float(overlap.mean()), overlap_sample=int(len(chosen)))
      all_overlap.append(overlap)
    else:  # too few entities for k neighbours
      info.update(overlap_at_k=math.nan, overlap_sample=0)
    if degrees is not None:
      info["degree_buckets"] = _buckets(rel, degrees, degree_base)
      all_deg.append(degrees)
    per_type[entity_type] = info
    all_rel.append(rel)
  rel = np.concatenate(all_rel)
  overlaps = np.concatenate(all_overlap) if all_overlap else np.zeros(0)
  report = {"old": str(old_set.origin), "new": str(new_set.origin), "k": k, "metric": metric,
            "shared": int(len(rel)), **{key: v for key, v in _summary(rel).items()
                                         if key != "count"},
            "overlap_at_k": float(overlaps.mean()) if len(overlaps) else math.nan,
            "per_type": per_type,
            "per_degree_bucket": (_buckets(rel, np.concatenate(all_deg), degree_base)
                                  if len(all_deg) == len(all_rel) else []),
            "plot": None}
  if out_dir is None and isinstance(new, (str, os.PathLike)):
    out_dir = os.path.join(os.fspath(new), rundir.PLOTS_DIR)
  if out_dir is not None:
    os.makedirs(out_dir, exist_ok=True)
    report["plot"] = plot_drift(report, os.path.join(out_dir, "drift.png"))
    with open(os.path.join(out_dir, "drift.json"), "w") as f:
      json.dump(report, f, indent=1)
  return report


def plot_drift(report: dict, path: str) -> str:
  """Relative L2 change against degree bucket (paper Figure 4c), one line per
  type plus all types (mean, with the median dashed and p99 dotted)."""
  import matplotlib  # heavy; only plotting needs it
  matplotlib.use("Agg")  # files only; no display on servers
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.2))
  series = [("all", report["per_degree_bucket"])] + [
      (t, info.get("degree_buckets", [])) for t, info in report["per_type"].items()]
  labels = {}
  for name, buckets in series:
    if not buckets:
      continue
    x = [b["bucket"] for b in buckets]
    for b in buckets:
      labels[b["bucket"]] = (f"{b['degree_lo']}" if b["degree_hi"] - b["degree_lo"] <= 1
                             else f"{b['degree_lo']}-{b['degree_hi'] - 1}")
    style = dict(lw=2.5, color="black") if name == "all" else dict(lw=1.2)
    line, = ax.plot(x, [b["mean_rel_l2"] for b in buckets], marker="o", label=f"{name} (mean)",
                    **style)
    if name == "all":
      ax.plot(x, [b["median_rel_l2"] for b in buckets], ls="--", color=line.get_color(),
              label="all (median)")
      ax.plot(x, [b["p99_rel_l2"] for b in buckets], ls=":", color=line.get_color(),
              label="all (p99)")
  ticks = sorted(labels)
  ax.set_xticks(ticks)
  ax.set_xticklabels([labels[t] for t in ticks], rotation=45, ha="right")
  ax.set_xlabel("train degree (log-spaced buckets)")
  ax.set_ylabel(r"$\|\theta_{new} - \theta_{old}\| \,/\, \|\theta_{old}\|$")
  ax.set_title(f"Embedding drift by degree; overlap@{report['k']} = "
               f"{report['overlap_at_k']:.3f}, mean change {report['mean_rel_l2']:.3f}")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def format_report(report: dict) -> str:
  lines = [f"drift {report['old']} -> {report['new']}: {report['shared']} shared entities",
           f"  relative L2 change: mean {report['mean_rel_l2']:.4f}, median "
           f"{report['median_rel_l2']:.4f}, p99 {report['p99_rel_l2']:.4f}",
           f"  neighbour overlap@{report['k']} ({report['metric']}): {report['overlap_at_k']:.4f}",
           "", f"  {'type':<14} {'shared':>8} {'only old':>9} {'only new':>9} {'mean':>8} "
           f"{'p99':>8} {'overlap':>8}"]
  for t, info in report["per_type"].items():
    lines.append(f"  {t:<14} {info['count']:>8} {info['only_old']:>9} {info['only_new']:>9} "
                 f"{info['mean_rel_l2']:>8.4f} {info['p99_rel_l2']:>8.4f} "
                 f"{info['overlap_at_k']:>8.4f}")
  if report["per_degree_bucket"]:
    lines += ["", f"  {'degree':<14} {'count':>8} {'mean':>8} {'median':>8} {'p99':>8}"]
    for b in report["per_degree_bucket"]:
      label = f"[{b['degree_lo']}, {b['degree_hi']})"
      lines.append(f"  {label:<14} {b['count']:>8} {b['mean_rel_l2']:>8.4f} "
                   f"{b['median_rel_l2']:>8.4f} {b['p99_rel_l2']:>8.4f}")
  if report["plot"]:
    lines.append(f"\n  plot: {report['plot']}")
  return "\n".join(lines)
