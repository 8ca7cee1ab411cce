"""Multi-modal (mixture) embeddings and diverse retrieval (paper section 4.4).

Clustering. The embeddings of a target type T (say tweets) are clustered with
mini-batch k-means (``twhin_jax.kmeans``) into K clusters; cluster c is
represented by its centroid mu_c or by its medoid (here the member nearest
the centroid, the usual O(n) proxy for the exact medoid).

A user's mixture. With n(u, c) the number of training edges from u (of the
relations from the user type S to T, all of them by default) whose target
falls in cluster c, the user keeps the top m clusters M_u and

    p(c | u) = n(u, c) / sum_{c' in M_u} n(u, c')     for c in M_u      (paper Eq. 3)

and 0 elsewhere; the user is the mixture {(p(c | u), mu_c)}. Edge weights are
ignored (an engagement counts once per edge); ties in n(u, c) go to the
lower cluster id. Only the engagements are needed, so a user unseen at
training time gets a mixture from a list of (relation, target) pairs.

Diverse retrieval. Each component c of a mixture is a query vector (mu_c)
against T's index; component c gets q_c of the k slots by the largest-
remainder method (q_c = floor(k p_c), the leftover slots to the largest
fractional parts k p_c - floor(k p_c)), takes its best q_c candidates not
already taken, and slots left empty (duplicates, exhausted lists) are topped
up from the components in order of weight.

Files: ``<workdir>/mixture/<T>/mixture.npz`` (centroids, assignments,
representatives, medoid ids, per-user clusters and weights) and
``mixture.json`` (settings and the checkpoint the clustering came from).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Iterable, Sequence

import jax.numpy as jnp
import numpy as np

from twhin_jax import kmeans as kmeans_lib
from twhin_jax import retrieval
from twhin_jax import rundir
from twhin_jax.model import compare_all

MIXTURE_DIR = rundir.MIXTURE_DIR
REPRESENTATIVES = ("centroid", "medoid")
FORMAT_VERSION = 1


@dataclasses.dataclass
class Clustering:
  """k-means of one table: centroids [K, d], assignments [N], and the vector
  standing for each cluster (centroid or medoid) [K, d]."""
  centroids: np.ndarray
  assignments: np.ndarray
  representatives: np.ndarray
  medoid_ids: np.ndarray  # [K] int64, -1 for an empty cluster
  representative: str

  @property
  def num_clusters(self) -> int:
    return len(self.centroids)


def cluster_table(table, k: int, *, representative: str = "centroid", iters: int = 300,
                  batch_size: int = 1024, seed: int = 0, progress: bool = False) -> Clustering:
  """k-means of ``table`` [N, d] plus each cluster's representative."""
  if representative not in REPRESENTATIVES:
    raise ValueError(f"unknown representative {representative!r}; choose from {REPRESENTATIVES}")
  table = np.asarray(table, np.float32)
  centroids, assignments = kmeans_lib.kmeans(table, k, iters=iters, batch_size=batch_size,
                                             seed=seed, progress=progress)
  distance = np.sum(np.square(table - centroids[assignments]), axis=1)  # [N]
  # Medoid proxy: per cluster, the member with the smallest distance to the centroid.
  order = np.lexsort((distance, assignments))
  first = np.ones(len(order), bool)
  first[1:] = assignments[order][1:] != assignments[order][:-1]
  medoid_ids = np.full(k, -1, np.int64)
  medoid_ids[assignments[order][first]] = order[first]
  if representative == "centroid":
    representatives = centroids
  else:
    representatives = np.where(medoid_ids[:, None] >= 0, table[np.maximum(medoid_ids, 0)],
                               centroids)
  return Clustering(centroids, assignments.astype(np.int32), representatives.astype(np.float32),
                    medoid_ids, representative)


def top_m_mixture(cluster_counts: dict[int, float] | np.ndarray, top_m: int):
  """Eq. 3 for one user: (clusters [<=m] int, weights [<=m] float summing to 1)."""
  if isinstance(cluster_counts, dict):
    clusters = np.array(sorted(cluster_counts), np.int64)
    counts = np.array([cluster_counts[c] for c in clusters], np.float64)
  else:
    counts = np.asarray(cluster_counts, np.float64)
    clusters = np.flatnonzero(counts > 0)
    counts = counts[clusters]
  if len(clusters) == 0:
    return np.zeros(0, np.int64), np.zeros(0, np.float64)
  keep = np.lexsort((clusters, -counts))[:top_m]  # most engaged first, ties: lower id
  return clusters[keep], counts[keep] / counts[keep].sum()


def user_mixtures(sources: np.ndarray, clusters: np.ndarray, num_sources: int, top_m: int):
  """Eq. 3 for every source at once.

  Args:
    sources, clusters: int [E]: each engagement's source row and the cluster of its target.
    num_sources: rows of the source type.
    top_m: components kept per source.

  Returns:
    (user_clusters int32 [U, m], -1 padded; user_weights float32 [U, m], 0 padded).
  """
  num_clusters = int(clusters.max(initial=-1)) + 1
  user_clusters = np.full((num_sources, top_m), -1, np.int32)
  user_weights = np.zeros((num_sources, top_m), np.float32)
  if len(sources) == 0:
    return user_clusters, user_weights
  key = sources.astype(np.int64) * num_clusters + clusters
  unique, counts = np.unique(key, return_counts=True)
  src, cluster = unique // num_clusters, unique % num_clusters
  order = np.lexsort((cluster, -counts, src))  # per source: most engaged first
  src, cluster, counts = src[order], cluster[order], counts[order].astype(np.float64)
  starts = np.searchsorted(src, src, side="left")
  position = np.arange(len(src)) - starts  # rank of the cluster inside its source
  kept = position < top_m
  src, cluster, counts, position = src[kept], cluster[kept], counts[kept], position[kept]
  totals = np.zeros(num_sources)
  np.add.at(totals, src, counts)  # at most U * m entries
  user_clusters[src, position] = cluster
  user_weights[src, position] = counts / totals[src]
  return user_clusters, user_weights


@dataclasses.dataclass
class Mixture:
  """One user's mixture: clusters [m], weights [m] (sum 1), vectors [m, d]."""
  clusters: np.ndarray
  weights: np.ndarray
  vectors: np.ndarray

  def __len__(self) -> int:
    return len(self.clusters)


@dataclasses.dataclass
class MixtureModel:
  """Clusters of a target type and the mixtures of every source entity."""
  target_type: str
  source_type: str
  relations: tuple[str, ...]
  top_m: int
  clustering: Clustering
  user_clusters: np.ndarray  # [U, m] int32, -1 padded
  user_weights: np.ndarray  # [U, m] float32
  info: dict

  def mixture(self, source_row: int) -> Mixture:
    """The stored mixture of a training-time source entity (by row)."""
    if not 0 <= source_row < len(self.user_clusters):
      raise KeyError(f"{self.source_type} row {source_row} out of range "
                     f"[0, {len(self.user_clusters)})")
    used = self.user_clusters[source_row] >= 0
    clusters = self.user_clusters[source_row][used].astype(np.int64)
    return Mixture(clusters, self.user_weights[source_row][used].astype(np.float64),
                   self.clustering.representatives[clusters])

  def mixture_from_targets(self, target_rows: Sequence[int]) -> Mixture:
    """Eq. 3 from engaged target rows alone (works for unseen users)."""
    clusters = self.clustering.assignments[np.asarray(target_rows, np.int64)]
    counts = np.bincount(clusters, minlength=self.clustering.num_clusters)
    chosen, weights = top_m_mixture(counts, self.top_m)
    return Mixture(chosen, weights, self.clustering.representatives[chosen])

  def mixture_from_engagements(self, engagements: Iterable[tuple[str, str | int]],
                               retriever) -> Mixture:
    """Eq. 3 from (relation, target name or id) pairs, e.g. of a new user.

    Relations must be among the model's (from the source type to the target
    type); unknown relations or targets raise, naming them.
    """
    targets = []
    for relation, target in engagements:
      if relation not in self.relations:
        raise ValueError(f"relation {relation!r} is not one of this mixture's "
                         f"{self.source_type} -> {self.target_type} relations {self.relations}")
      targets.append(target)
    # One lookup in the on-disk vocabulary for all the names.
    return self.mixture_from_targets(retriever.lookup_many(self.target_type, targets))

  def save(self, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    c = self.clustering
    tmp = os.path.join(directory, "mixture.tmp.npz")
    np.savez(tmp, centroids=c.centroids, assignments=c.assignments,
             representatives=c.representatives, medoid_ids=c.medoid_ids,
             user_clusters=self.user_clusters, user_weights=self.user_weights)
    os.replace(tmp, os.path.join(directory, "mixture.npz"))
    document = dict(self.info, format_version=FORMAT_VERSION, target_type=self.target_type,
                    source_type=self.source_type, relations=list(self.relations),
                    top_m=self.top_m, k=c.num_clusters, representative=c.representative)
    with open(os.path.join(directory, "mixture.json.tmp"), "w") as f:
      json.dump(document, f, indent=1)
    os.replace(os.path.join(directory, "mixture.json.tmp"),
               os.path.join(directory, "mixture.json"))

  @classmethod
  def load(cls, directory: str) -> "MixtureModel":
    path = os.path.join(directory, "mixture.json")
    if not os.path.exists(path):
      raise FileNotFoundError(f"{directory}: no mixture here (run `twhin cluster`)")
    with open(path) as f:
      info = json.load(f)
    with np.load(os.path.join(directory, "mixture.npz")) as arrays:
      clustering = Clustering(arrays["centroids"], arrays["assignments"],
                              arrays["representatives"], arrays["medoid_ids"],
                              info["representative"])
      user_clusters, user_weights = arrays["user_clusters"], arrays["user_weights"]
    return cls(info["target_type"], info["source_type"], tuple(info["relations"]),
               int(info["top_m"]), clustering, user_clusters, user_weights, info)


def default_num_clusters(num_rows: int) -> int:
  """K ~ sqrt(N / 2) (a common rule of thumb), at least 2 and at most 4096."""
  return int(min(4096, max(2, round(math.sqrt(num_rows / 2)))))


def build_mixture(workdir: str, target_type: str, *, k: int | None = None, top_m: int = 5,
                  source_type: str | None = None, relations: Sequence[str] | None = None,
                  representative: str = "centroid", iters: int = 300, batch_size: int = 1024,
                  seed: int = 0, retriever=None, progress: bool = True) -> MixtureModel:
  """Clusters ``target_type`` of a trained run, builds every source entity's
  mixture from the training edges and saves it to ``<workdir>/mixture/<T>/``.

  source_type defaults to the type with the most training edges into T;
  relations default to every relation from source_type to T.
  """
  retriever = retriever or retrieval.Retriever.open(workdir, types=(), progress=progress)
  retriever._check_type(target_type)
  graph = rundir.open_graph(workdir)
  into = [r for r in graph.relations if r.target == target_type]
  if not into:
    raise ValueError(f"no relation has target type {target_type!r}")
  edges = graph.split_edges("train")
  per_relation = np.bincount(edges["rel"], minlength=len(graph.relations))
  if source_type is None:
    by_source: dict[str, int] = {}
    for r in into:
      by_source[r.source] = by_source.get(r.source, 0) + int(
          per_relation[graph.relation_index[r.name]])
    source_type = max(sorted(by_source), key=by_source.get)
  if relations is None:
    relations = [r.name for r in into if r.source == source_type]
  for name in relations:
    rel = retriever.relation(name)
    if (rel.source, rel.target) != (source_type, target_type):
      raise ValueError(f"relation {name!r} joins {rel.source} -> {rel.target}, "
                       f"not {source_type} -> {target_type}")
  table = retriever.table(target_type)
  k = default_num_clusters(len(table)) if k is None else int(k)
  clustering = cluster_table(table, k, representative=representative, iters=iters,
                             batch_size=batch_size, seed=seed, progress=progress)
  wanted = np.isin(edges["rel"], [graph.relation_index[n] for n in relations])
  user_clusters, user_weights = user_mixtures(
      edges["src"][wanted], clustering.assignments[edges["dst"][wanted]].astype(np.int64),
      graph.entities[source_type].count, top_m)
  info = {"checkpoint": retriever.run["checkpoint"], "iters": iters, "batch_size": batch_size,
          "seed": seed, "engagements": int(wanted.sum()),
          "inertia": kmeans_lib.inertia(table, clustering.centroids),
          "cluster_sizes": np.bincount(clustering.assignments, minlength=k).tolist()}
  model = MixtureModel(target_type, source_type, tuple(relations), top_m, clustering,
                       user_clusters, user_weights, info)
  model.save(mixture_dir(workdir, target_type))
  return model


def mixture_dir(workdir: str, target_type: str) -> str:
  return os.path.join(workdir, MIXTURE_DIR, target_type)


def load_mixture(workdir: str, target_type: str) -> MixtureModel:
  return MixtureModel.load(mixture_dir(workdir, target_type))


# ---------------------------------------------------------------------------
# Diverse retrieval.


def largest_remainder(weights: Sequence[float], k: int) -> np.ndarray:
  """Integer quotas summing to k, proportional to ``weights`` (Hamilton's method)."""
  weights = np.asarray(weights, np.float64)
  if len(weights) == 0:
    return np.zeros(0, np.int64)
  if np.any(weights < 0) or weights.sum() <= 0:
    raise ValueError(f"weights must be non-negative with a positive sum, got {weights}")
  exact = k * weights / weights.sum()
  quotas = np.floor(exact).astype(np.int64)
  leftover = k - int(quotas.sum())
  # Largest fractional parts first; ties to the heavier (earlier) component.
  order = np.lexsort((np.arange(len(exact)), -(exact - quotas)))
  quotas[order[:leftover]] += 1
  return quotas


def _component_candidates(retriever, target_type: str, mixture: Mixture, order: np.ndarray,
                          depth: int, clustering: Clustering | None, exact: bool,
                          comparator: str | None, query: np.ndarray | None = None
                          ) -> list[tuple[np.ndarray, np.ndarray]]:
  """Per component (heaviest first): (ids, scores) of its best ``depth`` targets,
  ranked by the component's vector, or by ``query`` (the user's own
  relation-aware query vector [d]) when given."""
  if clustering is None:  # nearest neighbours of the component vector in the whole index
    ids, scores = retriever.search(target_type, mixture.vectors[order], depth, exact=exact,
                                   comparator=comparator)  # [m, depth]
    return list(zip(ids, scores))
  comparator = comparator or retriever.comparator
  table = retriever.table(target_type)
  out = []
  for component in order:
    members = np.flatnonzero(clustering.assignments == mixture.clusters[component])  # [n_c]
    vector = mixture.vectors[component] if query is None else query
    scores = np.asarray(compare_all(comparator, jnp.asarray(np.asarray(vector, np.float32)[None]),
                                    jnp.asarray(np.asarray(table[members], np.float32))))[0]
    best = np.argsort(-scores, kind="stable")[:depth]
    out.append((members[best], scores[best]))
  return out


def diverse_search(retriever, target_type: str, mixture: Mixture, k: int = 10, *,
                   clustering: Clustering | None = None, exclude: Iterable[int] = (),
                   exact: bool = False, comparator: str | None = None,
                   query: np.ndarray | None = None):
  """k targets drawn from a mixture's components (see the module doc).

  ``query`` (with ``clustering``): the user's own relation-aware query vector
  [d]. The mixture then only sets how many targets each cluster gives (its
  weight's share of k) and the query ranks the cluster's members: diversity
  from the clusters, relevance from the user's vector, instead of the
  cluster centre's most central members.

  Each component's candidates are the best targets for its vector by the
  comparator (default the run's): among its own cluster's members when
  ``clustering`` is given (exact, and diverse by construction: with a dot
  comparator a centroid's nearest neighbours in the whole table are the
  high-norm rows of any cluster), else from the type's whole index.

  Returns (ids int64 [<=k], scores [<=k], component index of each). Rows in
  ``exclude`` (e.g. already engaged) are never returned.
  """
  excluded = set(int(i) for i in exclude)
  if len(mixture) == 0:
    return np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int64)
  order = np.argsort(-mixture.weights, kind="stable")  # components, heaviest first
  quotas = largest_remainder(mixture.weights[order], k)
  # Enough candidates per component to fill its quota (or everything) after
  # dropping excluded rows and other components' picks.
  if query is not None and clustering is None:
    raise ValueError("a personal query ranks within clusters: pass clustering too")
  candidates = _component_candidates(retriever, target_type, mixture, order,
                                     k + len(excluded), clustering, exact, comparator, query)
  cursor = np.zeros(len(order), np.int64)
  picked, picked_scores, picked_from = [], [], []
  seen = set(excluded)

  def take(component: int) -> bool:
    ids, scores = candidates[component]
    while cursor[component] < len(ids):
      row, score = int(ids[cursor[component]]), float(scores[cursor[component]])
      cursor[component] += 1
      if row not in seen:
        seen.add(row)
        picked.append(row)
        picked_scores.append(score)
        picked_from.append(int(order[component]))
        return True
    return False

  for component, quota in enumerate(quotas):
    for _ in range(quota):
      if not take(component):
        break
  for component in range(len(order)):  # top up from the heaviest components
    while len(picked) < k and take(component):
      pass
  return (np.asarray(picked, np.int64), np.asarray(picked_scores, np.float32),
          np.asarray(picked_from, np.int64))


def diversity(ids: Sequence[int], assignments: np.ndarray, table) -> dict:
  """distinct_clusters among the ids, and their mean pairwise cosine similarity."""
  ids = np.asarray(ids, np.int64)
  if len(ids) == 0:
    return {"distinct_clusters": 0, "mean_pairwise_cos": math.nan}
  vectors = np.asarray(table[np.sort(ids)], np.float32)
  vectors = vectors / (np.linalg.norm(vectors, axis=1, keepdims=True) + 1e-9)
  cosines = vectors @ vectors.T  # [k, k]
  n = len(ids)
  pairwise = (cosines.sum() - np.trace(cosines)) / max(n * (n - 1), 1)
  return {"distinct_clusters": int(len(np.unique(assignments[ids]))),
          "mean_pairwise_cos": float(pairwise)}
