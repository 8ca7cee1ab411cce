"""Recommendation metrics: Recall@K and NDCG@K over every candidate.

The protocol of recommender papers (NGCF, LightGCN, ...), for one relation r
(source type S -> target type T) and an evaluation split (valid or test):

  * the queries are the sources s with at least one edge of r in the split;
    G_s is the set of their targets there (duplicates counted once);
  * every entity of T is a candidate, scored by the model,
    f(s, r, c) = compare(op_r(theta_s), theta_c) (model.py, eq. 1);
  * the known positives of s that are not being evaluated are removed from
    its candidates: targets of (s, r, .) edges in train (and, when the split
    is test, in valid), so a model is not credited for recalling its
    training data; a G_s target that is also a train edge stays a candidate;
  * L_s = the K best remaining candidates (ties by lower id);

      Recall@K(s) = |L_s n G_s| / |G_s|
      DCG@K(s)    = sum_{i=1..K} [L_s[i] in G_s] / log2(i + 1)
      IDCG@K(s)   = sum_{i=1..min(K, |G_s|)} 1 / log2(i + 1)
      NDCG@K(s)   = DCG@K(s) / IDCG@K(s)

    averaged over the queries (every query weighs the same).

Device work: the queries op_r(theta_s) are formed once; for each batch of B
queries the candidate table is scanned in chunks of M rows, each chunk is
scored with one matmul ([B, M]), excluded candidates are set to -inf, and a
running top-K is merged with the chunk's top-K (``lax.top_k``), so memory is
[B, M + K] whatever |T| is. Only the [B, K] ids come back to the host.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from twhin_jax import model


def _csr(keys: np.ndarray, values: np.ndarray, num_keys: int) -> tuple[np.ndarray, np.ndarray]:
  """(indptr [num_keys + 1], sorted distinct values per key) of pairs (key, value)."""
  pairs = np.unique(np.stack([keys.astype(np.int64), values.astype(np.int64)], 1), axis=0)
  indptr = np.concatenate([[0], np.cumsum(np.bincount(pairs[:, 0], minlength=num_keys))])
  return indptr.astype(np.int64), pairs[:, 1]


@functools.partial(jax.jit, static_argnames=("comparator", "k", "chunk"))
def _top_k(queries: jax.Array, candidates: jax.Array, excluded: jax.Array, *, comparator: str,
           k: int, chunk: int) -> jax.Array:
  """Ids [B, k] of the k best candidates of each query, excluded ones removed.

  queries [B, d]; candidates [N_pad, d] (N_pad a multiple of ``chunk``; rows
  past the real count are excluded by the caller via ``excluded``); excluded
  [B, E] candidate ids to drop per query, padded with -1.
  """
  b = queries.shape[0]
  num_chunks = candidates.shape[0] // chunk
  rows = jnp.arange(b)[:, None]  # [B, 1]

  def body(carry, start):
    best_scores, best_ids = carry  # [B, k] each
    block = jax.lax.dynamic_slice_in_dim(candidates, start, chunk)  # [M, d]
    scores = model.compare_all(comparator, queries, block)  # [B, M]
    local = excluded - start  # [B, E]
    inside = (excluded >= 0) & (local >= 0) & (local < chunk)
    scores = scores.at[rows, jnp.where(inside, local, chunk)].set(-jnp.inf, mode="drop")
    chunk_scores, chunk_ids = jax.lax.top_k(scores, min(k, chunk))  # [B, k']
    merged_scores = jnp.concatenate([best_scores, chunk_scores], axis=1)  # [B, k + k']
    merged_ids = jnp.concatenate([best_ids, chunk_ids + start], axis=1)  # [B, k + k']
    # Earlier chunks come first, so equal scores keep the lower id.
    top_scores, where = jax.lax.top_k(merged_scores, k)  # [B, k]
    return (top_scores, jnp.take_along_axis(merged_ids, where, axis=1)), None

  init = (jnp.full((b, k), -jnp.inf, queries.dtype), jnp.full((b, k), -1, jnp.int32))
  starts = jnp.arange(num_chunks, dtype=jnp.int32) * chunk
  (_, ids), _ = jax.lax.scan(body, init, starts)
  return ids


def top_k_excluding(queries: np.ndarray, candidates: np.ndarray,
                    excluded: tuple[np.ndarray, np.ndarray], k: int, *,
                    comparator: str = "dot", batch_size: int = 256, chunk: int = 8192,
                    progress: bool = False) -> np.ndarray:
  """Ids [Q, k] of the k best candidates of every query (best first).

  Args:
    queries: [Q, d] transformed query vectors (op_r(theta_s)).
    candidates: [N, d] candidate vectors.
    excluded: CSR (indptr [Q + 1], ids) of candidates to drop per query.
    k: list length (k <= N minus the most exclusions of any query, else the
      tail of a list is -1).
    comparator: model.COMPARATORS.
  """
  n, d = candidates.shape
  chunk = int(min(chunk, max(n, 1)))
  padded_n = -(-n // chunk) * chunk
  table = np.zeros((padded_n, d), np.float32)
  table[:n] = candidates
  table = jnp.asarray(table)
  indptr, ids = excluded
  counts = np.diff(indptr)
  width = int(counts.max()) if len(counts) else 0
  # Padding rows of the candidate table are excluded for every query.
  width = -(-(width + padded_n - n + 1) // 64) * 64  # few distinct shapes
  pad_ids = np.arange(n, padded_n, dtype=np.int64)
  out = np.zeros((len(queries), k), np.int64)
  for lo in tqdm(range(0, len(queries), batch_size), desc="retrieval", unit="batch",
                 disable=not progress):
    hi = min(lo + batch_size, len(queries))
    block = np.full((batch_size, width), -1, np.int32)
    for row, q in enumerate(range(lo, hi)):
      own = ids[indptr[q]:indptr[q + 1]]
      block[row, :len(own)] = own
      block[row, len(own):len(own) + len(pad_ids)] = pad_ids
    batch = np.zeros((batch_size, d), np.float32)
    batch[:hi - lo] = queries[lo:hi]
    result = _top_k(jnp.asarray(batch), table, jnp.asarray(block), comparator=comparator,
                    k=k, chunk=chunk)
    out[lo:hi] = np.asarray(result)[:hi - lo]
  return out


def recall_ndcg(top_ids: np.ndarray, positives: tuple[np.ndarray, np.ndarray]
                ) -> tuple[np.ndarray, np.ndarray]:
  """Per-query Recall@K and NDCG@K (K = top_ids.shape[1]); definitions in
  the module docstring. positives: CSR (indptr, sorted ids) of G_s."""
  indptr, ids = positives
  q, k = top_ids.shape
  counts = np.diff(indptr)  # |G_s|
  query_of = np.repeat(np.arange(q), counts)
  # Membership by sorted (query, id) keys: key = query * (max id + 2) + id.
  base = int(max(ids.max(initial=0), top_ids.max(initial=0))) + 2
  positive_keys = query_of * base + ids  # sorted: queries ascending, ids sorted within
  list_keys = np.arange(q)[:, None] * base + np.where(top_ids >= 0, top_ids, base - 1)
  hits = np.isin(list_keys, positive_keys)  # [Q, K]
  discounts = 1.0 / np.log2(np.arange(2, k + 2))  # [K]
  dcg = hits @ discounts
  ideal = np.cumsum(discounts)[np.minimum(counts, k) - 1]
  recall = hits.sum(1) / counts
  return recall, dcg / ideal


def evaluate_retrieval(graph, embeddings: dict[str, np.ndarray], relation_params: dict,
                       layout: model.RelationLayout, config, relation: str, *,
                       split: str = "test", k: int = 20, batch_size: int = 256,
                       progress: bool = False) -> dict:
  """Recall@K and NDCG@K of one relation on a split (module docstring).

  Returns {"relation", "split", "k", "recall@K", "ndcg@K", "queries",
  "candidates", "positives", "excluded"}.
  """
  names = [r.name for r in graph.relations]
  if relation not in names:
    raise ValueError(f"unknown relation {relation!r}; the graph has {names}")
  if split not in ("valid", "test"):
    raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
  r = names.index(relation)
  info = graph.relations[r]
  evaluated = graph.split_edges(split)
  mine = evaluated["rel"] == r
  sources, targets = evaluated["src"][mine], evaluated["dst"][mine]
  if not len(sources):
    raise ValueError(f"relation {relation!r} has no {split} edges")
  query_sources, query_index = np.unique(sources, return_inverse=True)
  positives = _csr(query_index, targets, len(query_sources))
  # Known positives of other splits, restricted to the query sources.
  known = [graph.split_edges(s) for s in (("train", "valid") if split == "test" else ("train",))]
  known_src = np.concatenate([e["src"][e["rel"] == r] for e in known])
  known_dst = np.concatenate([e["dst"][e["rel"] == r] for e in known])
  position = np.searchsorted(query_sources, known_src)
  position = np.minimum(position, len(query_sources) - 1)
  keep = query_sources[position] == known_src
  exclude_q, exclude_t = position[keep], known_dst[keep]
  # A target of the evaluated split stays a candidate even if also known.
  base = int(graph.entities[info.target].count) + 1
  evaluated_keys = query_index.astype(np.int64) * base + targets
  drop = np.isin(exclude_q.astype(np.int64) * base + exclude_t, evaluated_keys)
  exclude_q, exclude_t = exclude_q[~drop], exclude_t[~drop]
  excluded = _csr(exclude_q, exclude_t, len(query_sources))

  source_rows = jnp.asarray(embeddings[info.source][query_sources])
  operator = layout.operators[r]
  queries = np.asarray(model.apply_operator(operator, layout.param(relation_params, r),
                                            source_rows))  # [Q, d]
  candidates = np.asarray(embeddings[info.target], np.float32)
  top = top_k_excluding(queries, candidates, excluded, k, comparator=config.model.comparator,
                        batch_size=batch_size, progress=progress)
  recall, ndcg = recall_ndcg(top, positives)
  return {"relation": relation, "split": split, "k": k,
          f"recall@{k}": float(np.mean(recall)), f"ndcg@{k}": float(np.mean(ndcg)),
          "queries": int(len(query_sources)), "candidates": int(len(candidates)),
          "positives": int(len(positives[1])), "excluded": int(len(excluded[1]))}
