"""Link-prediction evaluation: filtered ranking and sampled ranking.

Every triple (s, r, t) of a split gives two queries, scored with the model's
f(s, r, t) = compare(op_r(theta_s), theta_t) (``twhin_jax.model``, Eq. 1):

  tail query (s, r, ?): rank the true target t among candidate targets c,
                        scores f(s, r, c), c of r's target type;
  head query (?, r, t): rank the true source s among candidate sources c,
                        scores f(c, r, t), c of r's source type.

Metrics. For one query with true answer a, score f_a, and negative set C
(the candidates other than a that remain after filtering, see below)::

  greater = |{c in C : f_c > f_a}|       (a NaN f_c counts here; a NaN f_a
                                          makes greater = |C|: divergence
                                          never looks good)
  equal   = |{c in C : f_c = f_a}|
  rank    = 1 + greater + equal / 2                        (ties averaged)
  auc_q   = (|C| - greater - equal / 2) / |C|
          = P_{c ~ U(C)}[f_c < f_a] + 1/2 P_{c ~ U(C)}[f_c = f_a]
            (1/2 when C is empty: every candidate was filtered)

Over the Q ranks of a split (two per triple: head and tail; ``count`` = Q)::

  mrr     = 1/Q sum_q 1 / rank_q
  mr      = 1/Q sum_q rank_q
  hits@k  = 1/Q sum_q [rank_q <= k]          (k = 1, 3, 10; a tie-averaged
                                              rank of 1.5 is not a hit@1)
  auc     = 1/Q sum_q auc_q

and the same over the head queries (``"head"``), the tail queries
(``"tail"``) and each relation's 2 T_r queries (``"per_relation"``).

Full ranking (``config.eval.num_sampled_negatives == 0``): C is every entity
of the candidate type except a. Filtered (``config.eval.filtered``): minus
every c such that (s, r, c) (tail) or (c, r, t) (head) is an edge of train,
valid or test. auc_q is then exact: the probability over a uniform draw from
C (no sampling noise).

Sampled ranking (N = ``num_sampled_negatives`` > 0, for types too large to
rank in full): each device batch of B queries (all of one relation group and
one pair of entity types) shares 2N candidates of the candidate type: N drawn
uniformly and N drawn in proportion to train degree (``graph.degrees``), with
replacement, seeded by ``config.train.seed``, the side and the batch index.
C is those 2N draws (with multiplicity) minus draws equal to a, minus
(filtered) draws c that form a known true edge with the query. rank as above
over C; auc_q over the uniform half of C only, so it estimates the
full-ranking AUC from N uniform negatives. Sampled ranks are not comparable to
full ranks (rank <= 2N + 1).

Device work. Queries are grouped by (side, relation group, query type,
candidate type), sorted by relation and cut into batches of B =
``config.eval.batch_size``; the last batch of a group is padded to the next
power of two (masked). One jitted call per batch scores [B, N] (a matmul),
gathers the true scores, masks the true answer and the filtered candidates,
and reduces to three int32 counts per query; only those come back to the
host, while the next batch is prepared. Relations of one operator group share
a batch: on the tail side the operator acts on the queries; on the head side
it is moved onto the query as well when that is exact (operator "none"; the
dot comparator, where op(c) . t = c . op^T(t) + const for every operator,
since all are affine in c; l2 with translation, where |c + p - t| =
|c - (t - p)|), and otherwise (cos, or l2 with a non-translation operator) a
head batch holds one relation and transforms the candidate table. A jitted
function compiles once per (mode, operator, comparator, shapes); batch
lengths are powers of two and filter lengths powers of four, so they add only
a few shapes (FB15k-237 test: 11 compilations for translation + dot).

Memory: a full-ranking batch holds a [B, N] float32 score matrix and a [B, N]
bool mask; lower ``eval.batch_size`` for very large types, or use sampled
ranking. The filter index holds every train/valid/test edge in host memory
(two sorted int64 copies); set ``eval.filtered = False`` where that does not
fit.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import weakref

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from twhin_jax import config as config_lib
from twhin_jax import model
from twhin_jax.model import RelationLayout

SIDES = ("head", "tail")
METRIC_KEYS = ("mrr", "mr", "hits@1", "hits@3", "hits@10", "auc", "count")
HITS_AT = (1, 3, 10)

_MIN_FILTER_LENGTH = 4 ** 5  # smallest padded flat filter (lengths are powers of 4)
_MIN_BATCH = 32  # smallest padded last batch of a group
_SUBSAMPLE_STREAM = 0x5EED  # seed stream of the max_triples subsample


# ---------------------------------------------------------------------------
# Known edges: the filter index.


class _SideIndex:
  """Known (relation, key) -> sorted values, for one side.

  For the tail side key = source and value = target; for the head side key =
  target and value = source. Entries of relation r live in
  ``comp[start[r]:start[r + 1]]`` as the sorted unique int64 composite
  ``key * n_r + value`` (n_r = number of entities of r's value type), so the
  values of one key are a contiguous range and membership is a searchsorted.
  """

  def __init__(self, rel: np.ndarray, key: np.ndarray, value: np.ndarray,
               value_counts: np.ndarray, key_counts: np.ndarray):
    num_relations = len(value_counts)
    limit = key_counts.astype(np.float64) * value_counts.astype(np.float64)
    if np.any(limit >= 2.0 ** 62):
      raise ValueError("entity counts too large for the int64 filter index; "
                       "set config.eval.filtered = False")
    self.n = value_counts.astype(np.int64)
    comp = key * self.n[rel] + value
    order = np.lexsort((comp, rel))
    rel, comp = rel[order], comp[order]
    keep = np.ones(len(comp), bool)
    keep[1:] = (rel[1:] != rel[:-1]) | (comp[1:] != comp[:-1])
    self.rel, self.comp = rel[keep], comp[keep]
    self.start = np.searchsorted(self.rel, np.arange(num_relations + 1))
    self.values = self.comp - (self.comp // self.n[self.rel]) * self.n[self.rel]

  def segment(self, r: int) -> tuple[int, np.ndarray]:
    lo, hi = self.start[r], self.start[r + 1]
    return lo, self.comp[lo:hi]

  def ranges(self, rel: np.ndarray, key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[lo, hi) positions into ``values`` of the known values of each query."""
    lo = np.zeros(len(rel), np.int64)
    hi = np.zeros(len(rel), np.int64)
    for r in np.unique(rel):
      idx = np.flatnonzero(rel == r)
      base, seg = self.segment(int(r))
      first = key[idx] * self.n[r]
      lo[idx] = base + np.searchsorted(seg, first)
      hi[idx] = base + np.searchsorted(seg, first + self.n[r])
    return lo, hi

  def contains(self, r: int, keys: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """[len(keys), len(candidates)] bool: (key, r, candidate) is known."""
    _, seg = self.segment(r)
    if len(seg) == 0:
      return np.zeros((len(keys), len(candidates)), bool)
    wanted = keys[:, None] * self.n[r] + candidates[None, :]  # [b, K]
    pos = np.minimum(np.searchsorted(seg, wanted), len(seg) - 1)
    return seg[pos] == wanted


class _KnownEdges:
  """Every edge of train, valid and test, indexed for both sides."""

  def __init__(self, graph):
    parts = [graph.split_edges(split) for split in config_lib.SPLITS]
    src = np.concatenate([p["src"] for p in parts]).astype(np.int64)
    rel = np.concatenate([p["rel"] for p in parts]).astype(np.int64)
    dst = np.concatenate([p["dst"] for p in parts]).astype(np.int64)
    n_src = np.array([graph.entities[r.source].count for r in graph.relations], np.int64)
    n_dst = np.array([graph.entities[r.target].count for r in graph.relations], np.int64)
    self.tail = _SideIndex(rel, key=src, value=dst, value_counts=n_dst, key_counts=n_src)
    self.head = _SideIndex(rel, key=dst, value=src, value_counts=n_src, key_counts=n_dst)


_KNOWN_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _known_edges(graph) -> _KnownEdges:
  """The filter index of a graph, built once per Graph object."""
  known = _KNOWN_CACHE.get(graph)
  if known is None:
    known = _KNOWN_CACHE[graph] = _KnownEdges(graph)
  return known


# ---------------------------------------------------------------------------
# Device kernels.


def _head_mode(operator: str, comparator: str) -> str:
  """How head queries are scored (see the module docstring)."""
  if model.folds_into_query(operator, comparator):
    return "head"  # the operator moves onto the query; relations may mix
  return "head_per_relation"  # one relation per batch; transform candidates


def _score_matrix(mode: str, operator: str, comparator: str, group_params: jax.Array,
                  param_rows: jax.Array, queries: jax.Array, candidates: jax.Array) -> jax.Array:
  """Scores of B queries against N candidate rows -> [B, N] (model.py's rule).

  queries [B, d] are source rows (mode "tail") or target rows (head modes);
  param_rows [B] are the rows of each query's relation in group_params.
  Row-constant terms are dropped where they cannot change a rank.
  """
  if mode == "tail":
    query = model.target_query(operator, comparator, group_params[param_rows], queries)
  elif mode == "head":
    query = model.source_query(operator, comparator, False, group_params[param_rows], None,
                               queries, with_offset=False)
  elif mode == "head_per_relation":
    param = group_params[param_rows[0]]  # one relation per batch
    query = model.source_query(operator, comparator, False, param, None, queries,
                               per_row=False)
  else:
    raise ValueError(f"unknown mode {mode!r}")
  return model.score(operator, query, candidates)


def _counts(scores: jax.Array, true: jax.Array, *negatives: jax.Array) -> tuple:
  """(greater, equal, |C|) per row, int32 [B], for each negative mask [B, K].

  All counts come out of one variadic reduction: XLA:CPU fuses it with the
  comparisons into a single pass over the scores, where separate sums would
  each read the [B, K] matrix again (about 2.5x slower at FB15k-237 size).
  """
  beats = (scores > true[:, None]) | jnp.isnan(scores)  # [B, K]
  ties = scores == true[:, None]  # [B, K]
  operands = []
  for negative in negatives:
    operands += [beats & negative, ties & negative, negative]
  operands = tuple(x.astype(jnp.int32) for x in operands)
  sums = jax.lax.reduce(operands, (0,) * len(operands),
                        lambda xs, ys: tuple(x + y for x, y in zip(xs, ys)), (1,))
  nan_true = jnp.isnan(true)
  out = []
  for greater, equal, total in zip(sums[0::3], sums[1::3], sums[2::3]):
    out += [jnp.where(nan_true, total, greater), jnp.where(nan_true, 0, equal), total]
  return tuple(out)


@functools.partial(jax.jit, static_argnames=("mode", "operator", "comparator"))
def _full_rank_counts(query_table, candidate_table, group_params, query_ids, param_rows,
                      answers, filter_rows, filter_cols, dense_filter, *,
                      mode: str, operator: str, comparator: str):
  """Full ranking of one batch: (greater, equal, |C|), each int32 [B].

  filter_rows/filter_cols [L] are flat (query, candidate) pairs to drop
  (padding points out of range and is dropped); or dense_filter [B, N] bool.
  """
  queries = query_table[query_ids]  # [B, d]
  scores = _score_matrix(mode, operator, comparator, group_params, param_rows,
                         queries, candidate_table)  # [B, N]
  batch = scores.shape[0]
  true = jnp.take_along_axis(scores, answers[:, None], axis=1)[:, 0]  # [B]
  if dense_filter is not None:
    excluded = dense_filter
  else:
    excluded = jnp.zeros(scores.shape, bool)
    if filter_rows is not None:
      excluded = excluded.at[filter_rows, filter_cols].set(True, mode="drop")
  excluded = excluded.at[jnp.arange(batch), answers].set(True)  # a is not in C
  return _counts(scores, true, ~excluded)


@functools.partial(jax.jit, static_argnames=("mode", "operator", "comparator", "num_uniform"))
def _sampled_rank_counts(query_table, candidate_table, group_params, query_ids, param_rows,
                         answers, candidate_ids, negative, *,
                         mode: str, operator: str, comparator: str, num_uniform: int):
  """Sampled ranking of one batch against K shared candidates.

  Returns (greater, equal, |C|) over all K and over the first num_uniform
  (uniform) candidates, each int32 [B]. negative [B, K] marks the draws in C.
  """
  queries = query_table[query_ids]  # [B, d]
  num_candidates = candidate_ids.shape[0]
  # The answers ride along as extra columns so that true scores come out of
  # the same matmul as the negatives' (consistent rounding, exact ties).
  rows = candidate_table[jnp.concatenate([candidate_ids, answers])]  # [K + B, d]
  scores = _score_matrix(mode, operator, comparator, group_params, param_rows,
                         queries, rows)  # [B, K + B]
  true = jnp.diagonal(scores[:, num_candidates:])  # [B]
  scores = scores[:, :num_candidates]  # [B, K]
  uniform = negative & (jnp.arange(num_candidates) < num_uniform)[None, :]
  return _counts(scores, true, negative, uniform)


# ---------------------------------------------------------------------------
# Host side: planning batches.


@dataclasses.dataclass
class Ranks:
  """Per-triple ranks of one evaluation (see the module docstring).

  src, rel, dst: int64 [T], the evaluated triples (after subsampling);
  head_rank, tail_rank: float64 [T]; head_auc, tail_auc: float64 [T];
  head_negatives, tail_negatives: int64 [T], |C| of each query.
  """
  src: np.ndarray
  rel: np.ndarray
  dst: np.ndarray
  head_rank: np.ndarray
  tail_rank: np.ndarray
  head_auc: np.ndarray
  tail_auc: np.ndarray
  head_negatives: np.ndarray
  tail_negatives: np.ndarray


@dataclasses.dataclass(frozen=True)
class _Group:
  """Queries that share one jitted function and its inputs."""
  side: str
  mode: str
  group: str  # relation parameter group ("operator:dim")
  query_type: str
  candidate_type: str
  relation: int  # -1 when relations mix


def _plan(graph, layout: RelationLayout, comparator: str, rel: np.ndarray,
          batch_size: int) -> list[tuple[_Group, np.ndarray, int]]:
  """Batches of triple indices per side: [(group, indices, padded size)].

  Full batches have B queries; the last batch of a group is padded only to
  the next power of two (at least _MIN_BATCH), so that small groups (a
  relation with 3 triples in a per-relation group, a subsampled split) do
  not pay for B queries, at the cost of a few more compiled shapes.
  """
  batches = []
  for side in SIDES:
    keys = {}
    for r in np.unique(rel):
      info = graph.relations[int(r)]
      operator = layout.operators[int(r)]
      if side == "tail":
        mode, query_type, candidate_type = "tail", info.source, info.target
      else:
        # Reciprocal relations score sources exactly like targets, with the
        # reverse parameters applied to the target (model.py eq. 1').
        head_mode = "tail" if layout.reciprocal else _head_mode(operator, comparator)
        mode, query_type, candidate_type = head_mode, info.target, info.source
      group = _Group(side, mode, layout.group[int(r)], query_type, candidate_type,
                     int(r) if mode == "head_per_relation" else -1)
      keys.setdefault(group, []).append(int(r))
    for group, members in keys.items():
      idx = np.flatnonzero(np.isin(rel, members))
      idx = idx[np.argsort(rel[idx], kind="stable")]
      for i in range(0, len(idx), batch_size):
        chunk = idx[i:i + batch_size]
        padded = min(batch_size, max(_MIN_BATCH, _next_power_of_two(len(chunk))))
        batches.append((group, chunk, padded))
  return batches


def _pad(x: np.ndarray, size: int) -> np.ndarray:
  """Pads a 1-D array to size by repeating its first element."""
  if len(x) == size:
    return x
  return np.concatenate([x, np.full(size - len(x), x[0], x.dtype)])


def _flat_filter(index: _SideIndex, lo: np.ndarray, hi: np.ndarray):
  """Flat (row, candidate) pairs of the known values of each query."""
  lengths = hi - lo
  total = int(lengths.sum())
  rows = np.repeat(np.arange(len(lo)), lengths)
  offsets = np.repeat(lo - (np.cumsum(lengths) - lengths), lengths)
  return rows, index.values[np.arange(total) + offsets]


def _next_power_of_two(n: int) -> int:
  return 1 << max(0, n - 1).bit_length()


def _next_power_of_four(n: int) -> int:
  return 1 << (2 * ((max(0, n - 1).bit_length() + 1) // 2))


def _degree_cdf(graph, entity_type: str) -> np.ndarray | None:
  degrees = np.asarray(graph.degrees(entity_type), np.float64)
  total = degrees.sum()
  return np.cumsum(degrees) / total if total > 0 else None


def _subsample(num_triples: int, limit: int, seed: int) -> np.ndarray:
  if limit <= 0 or limit >= num_triples:
    return np.arange(num_triples)
  rng = np.random.default_rng([seed, _SUBSAMPLE_STREAM])
  return np.sort(rng.choice(num_triples, size=limit, replace=False))


def rank_triples(graph, embeddings: dict, relation_params: dict, layout: RelationLayout,
                 config, split: str, *, progress: bool = True,
                 max_triples: int | None = None) -> Ranks:
  """Ranks of every head and tail query of a split (see the module docstring).

  Args:
    graph: a ``twhin_jax.graph.Graph``.
    embeddings: entity type -> float32 [count, d] table (local ids index rows).
    relation_params: {group name: stacked parameters} (``RelationLayout``).
    layout: the relations' parameter layout (config order = graph order).
    config: the run config; reads model.comparator, train.seed and eval.*.
    split: "train", "valid" or "test".
    progress: show a tqdm bar over device batches.
    max_triples: evaluate a seeded subsample of this many triples; None reads
      config.eval.max_triples (0: all).
  """
  if split not in config_lib.SPLITS:
    raise ValueError(f"split must be one of {config_lib.SPLITS}, got {split!r}")
  if tuple(r.name for r in graph.relations) != tuple(layout.names):
    raise ValueError("relation layout does not match the graph's relations "
                     f"({layout.names} vs {[r.name for r in graph.relations]})")
  for name, info in graph.entities.items():
    if name in embeddings and len(embeddings[name]) != info.count:
      raise ValueError(f"embeddings[{name!r}] has {len(embeddings[name])} rows, "
                       f"the graph has {info.count} {name} entities")
  comparator = str(config.model.comparator)
  batch_size = int(config.eval.batch_size)
  num_sampled = int(config.eval.num_sampled_negatives)
  filtered = bool(config.eval.filtered)
  seed = int(config.train.seed)
  if max_triples is None:
    max_triples = int(config.eval.max_triples)

  edges = graph.split_edges(split)
  keep = _subsample(len(edges["src"]), int(max_triples or 0), seed)
  src, rel, dst = (np.asarray(edges[k], np.int64)[keep] for k in ("src", "rel", "dst"))
  num_triples = len(src)
  result = {f"{side}_{what}": np.zeros(num_triples, dtype)
            for side in SIDES
            for what, dtype in (("rank", np.float64), ("auc", np.float64),
                                ("negatives", np.int64))}
  if num_triples == 0:
    return Ranks(src=src, rel=rel, dst=dst, **result)

  known = _known_edges(graph) if filtered else None
  batches = _plan(graph, layout, comparator, rel, batch_size)
  needed_types = {t for group, _, _ in batches for t in (group.query_type, group.candidate_type)}
  for t in needed_types:
    if t not in embeddings:
      raise ValueError(f"no embeddings for entity type {t!r}")
  tables = {t: jnp.asarray(embeddings[t], jnp.float32) for t in needed_types}
  params = {name: jnp.asarray(p, jnp.float32) for name, p in relation_params.items()}
  row_of = np.asarray(layout.row, np.int32)
  reverse_row_of = np.asarray(layout.reverse_row, np.int32)
  cdfs = {}

  ranges = {}
  if filtered and not num_sampled:
    ranges["tail"] = known.tail.ranges(rel, src)
    ranges["head"] = known.head.ranges(rel, dst)

  def submit(batch_index: int, group: _Group, idx: np.ndarray, size: int):
    """Dispatches one batch (asynchronously); returns its device outputs."""
    n = len(idx)
    query, answer = (src, dst) if group.side == "tail" else (dst, src)
    query_ids = _pad(query[idx], size).astype(np.int32)
    answers = _pad(answer[idx], size).astype(np.int32)
    rows_of_side = row_of if group.side == "tail" else reverse_row_of
    param_rows = _pad(rows_of_side[rel[idx]], size)
    num_entities = graph.entities[group.candidate_type].count
    common = dict(query_table=tables[group.query_type],
                  candidate_table=tables[group.candidate_type],
                  group_params=params[group.group], query_ids=query_ids,
                  param_rows=param_rows, answers=answers)
    static = dict(mode=group.mode, operator=group.group.split(":")[0], comparator=comparator)
    if num_sampled:
      rng = np.random.default_rng([seed, SIDES.index(group.side), batch_index])
      uniform = rng.integers(0, num_entities, size=num_sampled)
      if group.candidate_type not in cdfs:
        cdfs[group.candidate_type] = _degree_cdf(graph, group.candidate_type)
      cdf = cdfs[group.candidate_type]
      draws = rng.random(num_sampled)
      by_degree = (np.minimum(np.searchsorted(cdf, draws, side="right"), num_entities - 1)
                   if cdf is not None else rng.integers(0, num_entities, size=num_sampled))
      candidates = np.concatenate([uniform, by_degree]).astype(np.int64)  # [K]
      negative = candidates[None, :] != answer[idx][:, None]  # [n, K]
      if filtered:
        index = known.tail if group.side == "tail" else known.head
        for r in np.unique(rel[idx]):
          rows = np.flatnonzero(rel[idx] == r)
          negative[rows] &= ~index.contains(int(r), query[idx][rows], candidates)
      negative = np.concatenate([negative, np.zeros((size - n, len(candidates)), bool)])
      return _sampled_rank_counts(**common, candidate_ids=candidates.astype(np.int32),
                                  negative=negative, num_uniform=num_sampled, **static)
    filter_rows = filter_cols = dense = None
    if filtered:
      lo, hi = (r[idx] for r in ranges[group.side])
      rows, cols = _flat_filter(known.tail if group.side == "tail" else known.head, lo, hi)
      if 8 * len(rows) > size * num_entities:  # a dense mask is smaller
        dense = np.zeros((size, num_entities), bool)
        dense[rows, cols] = True
      else:
        length = max(_MIN_FILTER_LENGTH, _next_power_of_four(len(rows)))
        filter_rows = np.full(length, size, np.int32)  # out of range: dropped
        filter_cols = np.full(length, num_entities, np.int32)
        filter_rows[:len(rows)] = rows
        filter_cols[:len(cols)] = cols
    return _full_rank_counts(**common, filter_rows=filter_rows, filter_cols=filter_cols,
                             dense_filter=dense, **static)

  def collect(group: _Group, idx: np.ndarray, outputs):
    counts = [np.asarray(x)[:len(idx)].astype(np.float64) for x in outputs]
    greater, equal, total = counts[:3]
    if num_sampled:
      u_greater, u_equal, u_total = counts[3:]
    else:
      u_greater, u_equal, u_total = greater, equal, total
    result[f"{group.side}_rank"][idx] = 1.0 + greater + 0.5 * equal
    with np.errstate(invalid="ignore", divide="ignore"):
      auc = (u_total - u_greater - 0.5 * u_equal) / u_total
    result[f"{group.side}_auc"][idx] = np.where(u_total > 0, auc, 0.5)
    result[f"{group.side}_negatives"][idx] = total.astype(np.int64)

  pending = None
  with tqdm(total=len(batches), desc=f"eval {split}", unit="batch",
            disable=not progress, leave=False) as bar:
    for batch_index, (group, idx, padded) in enumerate(batches):
      outputs = submit(batch_index, group, idx, padded)  # runs while the last one is read
      if pending is not None:
        collect(*pending)
        bar.update(1)
      pending = (group, idx, outputs)
    collect(*pending)
    bar.update(1)
  return Ranks(src=src, rel=rel, dst=dst, **result)


# ---------------------------------------------------------------------------
# Metrics.


def metrics(rank: np.ndarray, auc: np.ndarray) -> dict:
  """mrr, mr, hits@k, auc and count of a set of ranks, as plain Python numbers."""
  rank = np.asarray(rank, np.float64)
  count = int(len(rank))
  if count == 0:
    return {key: (0 if key == "count" else math.nan) for key in METRIC_KEYS}
  out = {"mrr": float(np.mean(1.0 / rank)), "mr": float(np.mean(rank))}
  for k in HITS_AT:
    out[f"hits@{k}"] = float(np.mean(rank <= k))
  out["auc"] = float(np.mean(auc))
  out["count"] = count
  return out


def summarize(ranks: Ranks, relation_names) -> dict:
  """The metrics dict of :func:`evaluate` from per-triple ranks."""
  rank = np.concatenate([ranks.head_rank, ranks.tail_rank])
  auc = np.concatenate([ranks.head_auc, ranks.tail_auc])
  rel = np.concatenate([ranks.rel, ranks.rel])
  out = metrics(rank, auc)
  out["head"] = metrics(ranks.head_rank, ranks.head_auc)
  out["tail"] = metrics(ranks.tail_rank, ranks.tail_auc)
  out["per_relation"] = {}
  order = np.argsort(rel, kind="stable")
  bounds = np.searchsorted(rel[order], np.arange(len(relation_names) + 1))
  for r, name in enumerate(relation_names):
    members = order[bounds[r]:bounds[r + 1]]
    if len(members):
      out["per_relation"][name] = metrics(rank[members], auc[members])
  return out


def evaluate(graph, embeddings: dict[str, np.ndarray], relation_params: dict,
             layout: RelationLayout, config, split: str, *, progress: bool = True,
             max_triples: int | None = None) -> dict:
  """Link-prediction metrics of a split (definitions in the module docstring).

  Returns a JSON-serialisable dict::

    {"mrr", "mr", "hits@1", "hits@3", "hits@10", "auc", "count",   # all ranks
     "head": {same keys}, "tail": {same keys},
     "per_relation": {relation name: {same keys}}}   # relations in the split

  ``count`` is the number of ranks (2 per triple). An empty split gives count
  0 and NaN metrics. Arguments as in :func:`rank_triples`.
  """
  ranks = rank_triples(graph, embeddings, relation_params, layout, config, split,
                       progress=progress, max_triples=max_triples)
  return summarize(ranks, [r.name for r in graph.relations])


def ranking_kind(config) -> dict:
  """How :func:`evaluate` ranks under ``config`` (recorded beside its metrics):
  {"ranking": "full" | "sampled", "filtered": bool, "num_sampled_negatives": N}."""
  sampled = int(config.eval.num_sampled_negatives)
  return {"ranking": "sampled" if sampled > 0 else "full",
          "filtered": bool(config.eval.filtered), "num_sampled_negatives": sampled}


def describe_ranking(kind: dict) -> str:
  """A heading for :func:`ranking_kind`, e.g. "Filtered sampled ranking (2 x 100 negatives)"."""
  words = "Filtered" if kind["filtered"] else "Unfiltered"
  if kind["ranking"] == "sampled":
    n = kind["num_sampled_negatives"]
    return f"{words} sampled ranking ({n} uniform + {n} degree-proportional negatives)"
  return f"{words} full ranking"


def evaluate_run(run, split: str, *, progress: bool = True, max_triples: int = 0) -> dict:
  """:func:`evaluate` of a run opened by ``rundir.open_run`` (its latest
  checkpoint's committed tables and relation parameters; no trainer is built
  and nothing is written), plus ``"split"`` and ``"ranking"``
  (:func:`ranking_kind`). A split without edges is a ValueError.

  Every triple of the split is ranked unless ``max_triples`` > 0: the run's
  ``eval.max_triples`` sizes only its per-epoch validation subsample (a
  figure reported from it would be a different, noisier quantity)."""
  if run.graph.num_edges(split) == 0:
    raise ValueError(f"{run.workdir}: the {split} split has no edges "
                     f"(graph counts {run.graph.manifest.get('counts', {})}); "
                     "choose another --split")
  layout = RelationLayout.from_config(run.config)
  metrics = evaluate(run.graph, run.all_embeddings(), run.relation_params(), layout, run.config,
                     split, progress=progress, max_triples=max_triples)
  metrics["split"] = split
  metrics["ranking"] = ranking_kind(run.config)
  # Edges whose entity never occurs in train rank with an untrained vector;
  # the import counts them (data.drop_unseen_eval_entities drops them).
  quality = run.graph.manifest.get("quality", {})
  metrics["edges_with_unseen_entities"] = int(
      quality.get("eval_edges_with_unseen_entities", {}).get(split, 0))
  return metrics
