"""Product quantization of entity embeddings (Jegou et al., PAMI 2011; paper section 5.2).

A d-dimensional row x (zero-padded to d' = M * d_s when M does not divide d)
is cut into M sub-vectors x = [x_1, ..., x_M], x_m in R^{d_s}. Each subspace
m has a codebook C_m of K = 256 centroids (k-means over the rows' x_m,
``twhin_jax.kmeans.kmeans_subspaces``), and x is stored as one byte per
subspace:

    code_m(x) = argmin_c ||x_m - C_m[c]||^2                               (1)
    x_hat     = [C_1[code_1], ..., C_M[code_M]]  (first d entries)        (2)

A float32 row costs 4 d bytes, a code M bytes, so

    compression factor = 4 d / M                                           (3)

(d = 128: M = 128 -> 4x, 64 -> 8x, 32 -> 16x, 16 -> 32x, 8 -> 64x; the
codebook, M * K * d_s floats per type, is shared by all rows and not counted).
After the mini-batch k-means, one exact Lloyd pass moves each centroid to the
mean of the rows assigned to it and re-assigns the codes, so a subspace with
at most K distinct values is reproduced exactly.

Quality is measured as in the paper's Figure 4a: for a seeded sample of
queries, the k nearest neighbours among the decoded vectors (decoded query
against decoded table) against the k nearest among the originals,

    recall@k = 1/|Q| sum_q |N_k(x_hat_q; X_hat) ∩ N_k(x_q; X)| / k           (4)

by exact search (``drift.exact_knn``; cosine unless told otherwise; the query
itself excluded).

On disk (``<workdir>/compressed/factor_<f>/``): one ``<type>.npz`` per type
with ``codes`` uint8 [N, M], ``centroids`` float32 [M, K, d_s], ``dim`` and
``names``; plus ``summary.json``. :class:`PQEmbed` is a Flax (nnx) module that
holds codes and codebook as frozen variables and decodes looked-up ids inside
a downstream model.
"""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from twhin_jax import drift
from twhin_jax import kmeans as kmeans_lib
from twhin_jax import rundir
from twhin_jax.embedding_set import (EmbeddingSet, PQCodebook, compression_factor, decode,
                                     load_embeddings, save_compressed)
from twhin_jax.embedding_set import load_compressed  # noqa: F401  (report.py reads it here)

COMPRESSED_DIR = rundir.COMPRESSED_DIR
DEFAULT_FACTORS = (4, 8, 16, 32, 64)
NUM_CENTROIDS = 256  # one byte per code
#: Rows k-means trains on per type (a seeded sample beyond this); every row is encoded.
MAX_TRAIN_ROWS = 200_000
#: Rows per jitted encode call.
ENCODE_BLOCK = 1 << 14


def subspaces_for_factor(dim: int, factor: float) -> int:
  """M giving the factor of eq. (3) as closely as possible (at least 1, at most 4 d)."""
  if factor <= 0:
    raise ValueError(f"compression factor must be > 0, got {factor}")
  return int(min(max(round(4.0 * dim / factor), 1), 4 * dim))


def split_subspaces(x: np.ndarray, num_subspaces: int) -> np.ndarray:
  """[N, d] -> [M, N, d_s], zero-padding d up to M * d_s."""
  n, dim = x.shape
  sub_dim = math.ceil(dim / num_subspaces)
  padded = np.zeros((n, num_subspaces * sub_dim), np.float32)
  padded[:, :dim] = x
  return padded.reshape(n, num_subspaces, sub_dim).transpose(1, 0, 2)  # [M, N, d_s]


@jax.jit
def _encode_block(x_msd, centroids):
  """Eq. (1) for a block: x [M, B, d_s], centroids [M, K, d_s] -> codes [M, B]."""
  x_sq = jnp.sum(jnp.square(x_msd), axis=-1)[:, :, None]  # [M, B, 1]
  c_sq = jnp.sum(jnp.square(centroids), axis=-1)[:, None, :]  # [M, 1, K]
  dots = jnp.einsum("mbs,mks->mbk", x_msd, centroids)  # [M, B, K]
  return jnp.argmin(x_sq - 2.0 * dots + c_sq, axis=-1)  # [M, B]


def encode(x, codebook: PQCodebook, progress: bool = False) -> np.ndarray:
  """Codes of every row of ``x`` [N, d]: uint8 [N, M] (int32 if K > 256)."""
  x = np.asarray(x, np.float32)
  if x.ndim != 2 or x.shape[1] != codebook.dim:
    raise ValueError(f"rows of shape {x.shape} do not match the codebook's dim {codebook.dim}")
  dtype = np.uint8 if codebook.num_centroids <= 256 else np.int32
  codes = np.empty((len(x), codebook.num_subspaces), dtype)
  centroids = jnp.asarray(codebook.centroids)
  for start in tqdm(range(0, len(x), ENCODE_BLOCK), desc="PQ encode", unit="block",
                    disable=not progress):
    block = split_subspaces(x[start:start + ENCODE_BLOCK], codebook.num_subspaces)
    codes[start:start + ENCODE_BLOCK] = np.asarray(_encode_block(jnp.asarray(block), centroids)).T
  return codes


@jax.jit
def _recentre(x_msd, codes_mn, centroids):
  """One exact Lloyd step: each centroid becomes the mean of its rows (kept if empty)."""
  num_centroids = centroids.shape[1]

  def one(x, code, c):  # x [N, d_s], code [N], c [K, d_s]
    sums = jax.ops.segment_sum(x, code, num_segments=num_centroids)  # [K, d_s]
    counts = jax.ops.segment_sum(jnp.ones(x.shape[0]), code, num_segments=num_centroids)  # [K]
    return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None], c)

  return jax.vmap(one)(x_msd, codes_mn, centroids)


def train_pq(x, num_subspaces: int, *, num_centroids: int = NUM_CENTROIDS, iters: int = 100,
             batch_size: int = 1024, seed: int = 0, max_train_rows: int = MAX_TRAIN_ROWS,
             init: str = "random", progress: bool = False) -> tuple[PQCodebook, np.ndarray]:
  """Trains a codebook on the rows of ``x`` [N, d] and encodes every row.

  K = min(num_centroids, rows trained on). Centres start at K distinct random
  rows by default: with 256 centres in a low-dimensional subspace that is
  about as good as k-means++, whose K sequential seeding passes cost more
  than the whole mini-batch run here. Returns (codebook, codes [N, M]).
  """
  x = np.asarray(x, np.float32)
  if x.ndim != 2 or len(x) == 0:
    raise ValueError(f"product quantization needs rows [N, d] with N >= 1, got {x.shape}")
  dim = x.shape[1]
  if not 1 <= num_subspaces <= 4 * dim:
    raise ValueError(f"num_subspaces must be in [1, {4 * dim}] for dim {dim}, got {num_subspaces}")
  rng = np.random.default_rng(seed)
  train_rows = x if len(x) <= max_train_rows else x[np.sort(
      rng.choice(len(x), max_train_rows, replace=False))]
  k = min(num_centroids, len(train_rows))
  batch_size = min(batch_size, len(train_rows))  # a step costs batch x K per subspace
  x_msd = jnp.asarray(split_subspaces(train_rows, num_subspaces))  # [M, N_train, d_s]
  centroids, codes = kmeans_lib.kmeans_subspaces(x_msd, k, iters=iters, batch_size=batch_size,
                                                 seed=seed, init=init, progress=progress)
  centroids = _recentre(x_msd, jnp.asarray(codes.T.astype(np.int32)), jnp.asarray(centroids))
  codebook = PQCodebook(np.asarray(centroids, np.float32), dim)
  return codebook, encode(x, codebook, progress=progress)


# --------------------------------------------------------------------------
# A Flax module for downstream models.


class FrozenTable(nnx.Variable):
  """A non-trainable array inside a module (optimisers built with wrt=nnx.Param skip it)."""


class PQEmbed(nnx.Module):
  """Looks up entity ids and decodes their PQ codes: ids [...] -> vectors [..., d].

  Codes and codebook are frozen (``FrozenTable``), so a downstream model
  trains around them; memory on the device is M bytes per entity plus the
  codebook instead of 4 d bytes.
  """

  def __init__(self, codes: np.ndarray, codebook: PQCodebook):
    self.codes = FrozenTable(jnp.asarray(codes.astype(np.int32)))  # [N, M]
    self.centroids = FrozenTable(jnp.asarray(codebook.centroids))  # [M, K, d_s]
    self.dim = codebook.dim

  def __call__(self, ids: jax.Array) -> jax.Array:
    codes = self.codes[...][ids]  # [..., M]
    centroids = self.centroids[...]
    subspace = jnp.arange(centroids.shape[0])  # [M]
    parts = centroids[subspace, codes]  # [..., M, d_s]
    return parts.reshape(*ids.shape, -1)[..., :self.dim]  # [..., d]


# --------------------------------------------------------------------------
# Files and whole runs.


def quantize(source, factor: float, *, types=None, seed: int = 0, iters: int = 100,
             progress: bool = False) -> EmbeddingSet:
  """PQ at one compression factor of every type of ``source`` (any
  ``load_embeddings`` source); decoded tables, codes in ``.pq``."""
  embeddings = load_embeddings(source, types)
  tables, pq = {}, {}
  for entity_type in embeddings.entity_types:
    table = embeddings.tables[entity_type]
    num_subspaces = subspaces_for_factor(table.shape[1], factor)
    codebook, codes = train_pq(table, num_subspaces, seed=seed, iters=iters, progress=progress)
    tables[entity_type] = decode(codes, codebook)
    pq[entity_type] = (codes, codebook)
  return EmbeddingSet(tables, dict(embeddings.names), dict(embeddings.degrees), pq,
                                 origin=f"{embeddings.origin} (PQ {factor}x)")


def recall_at_k(original: np.ndarray, decoded: np.ndarray, *, k: int = 10,
                num_queries: int = 1000, seed: int = 0, metric: str = "cos") -> float:
  """Eq. (4) over a seeded sample of at most ``num_queries`` rows."""
  if original.shape != decoded.shape:
    raise ValueError(f"original {original.shape} and decoded {decoded.shape} differ in shape")
  n = len(original)
  if n <= k:
    raise ValueError(f"recall@{k} needs more than {k} rows, got {n}")
  rng = np.random.default_rng(seed)
  queries = np.arange(n) if n <= num_queries else np.sort(rng.choice(n, num_queries, replace=False))
  truth, _ = drift.exact_knn(original[queries], original, k, metric=metric, exclude=queries)
  found, _ = drift.exact_knn(decoded[queries], decoded, k, metric=metric, exclude=queries)
  return float(drift.neighbour_overlap(truth, found).mean())


def compress_run(workdir: str, factors=DEFAULT_FACTORS, *, types=None, k: int = 10,
                 num_queries: int = 1000, seed: int = 0, iters: int = 100, metric: str = "cos",
                 out_root: str | None = None, progress: bool = False) -> list[dict]:
  """PQ of every type of a run at each factor: writes codes and codebooks,
  measures recall@k, plots recall against factor.

  Returns one dict per factor: {"factor", "recall_at_10" (recall@k; the key
  keeps the paper's name when k = 10), "k", "per_type": {type: {"num_subspaces",
  "actual_factor", "recall_at_k", "count", "dim", "path"}}, "path"}. The
  overall recall is the mean over types weighted by their query counts.
  """
  embeddings = load_embeddings(workdir, types)
  out_root = out_root or os.path.join(workdir, COMPRESSED_DIR)
  results = []
  for factor in factors:
    out_dir = os.path.join(out_root, f"factor_{_factor_name(factor)}")
    per_type, weighted, weights = {}, 0.0, 0
    for entity_type in embeddings.entity_types:
      table = np.asarray(embeddings.tables[entity_type], np.float32)
      num_subspaces = subspaces_for_factor(table.shape[1], factor)
      codebook, codes = train_pq(table, num_subspaces, seed=seed, iters=iters, progress=progress)
      path = save_compressed(out_dir, entity_type, embeddings.names[entity_type], codes, codebook)
      info = {"count": int(len(table)), "dim": int(table.shape[1]),
              "num_subspaces": num_subspaces, "sub_dim": codebook.sub_dim,
              "num_centroids": codebook.num_centroids,
              "actual_factor": compression_factor(table.shape[1], num_subspaces), "path": path}
      if len(table) > k:
        recall = recall_at_k(table, decode(codes, codebook), k=k, num_queries=num_queries,
                             seed=seed, metric=metric)
        queries = min(len(table), num_queries)
        info.update(recall_at_k=recall, queries=queries)
        weighted += recall * queries
        weights += queries
      per_type[entity_type] = info
    result = {"factor": factor, f"recall_at_{k}": weighted / weights if weights else math.nan,
              "k": k, "metric": metric, "per_type": per_type, "path": out_dir}
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
      json.dump(result, f, indent=1)
    results.append(result)
  plot_recall(results, os.path.join(out_root, "recall.png"), k)
  return results


def _factor_name(factor: float) -> str:
  return str(int(factor)) if float(factor).is_integer() else str(factor)


def plot_recall(results: list[dict], path: str, k: int = 10) -> str:
  """recall@k against compression factor (paper Figure 4a), per type and overall."""
  import matplotlib  # heavy; only plotting needs it
  matplotlib.use("Agg")  # files only; no display on servers
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4))
  factors = [r["factor"] for r in results]
  ax.plot(factors, [r[f"recall_at_{k}"] for r in results], marker="o", lw=2.5, color="black",
          label="all types")
  for entity_type in results[0]["per_type"] if results else ():
    values = [r["per_type"][entity_type].get("recall_at_k", math.nan) for r in results]
    if not all(math.isnan(v) for v in values):
      ax.plot(factors, values, marker=".", lw=1, label=entity_type)
  ax.set_xscale("log", base=2)
  ax.set_xticks(factors)
  ax.set_xticklabels([f"{_factor_name(f)}x" for f in factors])
  ax.set_ylim(0, 1.02)
  ax.set_xlabel("compression factor (float32 bytes / code bytes)")
  ax.set_ylabel(f"recall@{k} of exact kNN")
  ax.set_title("Product quantization: neighbours kept")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
