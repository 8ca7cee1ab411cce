"""Entity vectors with their names, from wherever they were written.

An :class:`EmbeddingSet` is what drift, compression, nearest neighbours and
the downstream tasks read. :func:`load_embeddings` builds one from

  a run directory       the latest checkpoint's committed tables (rundir.open_run),
                        with the graph's train degrees
  an export directory   ``twhin export``: ``<type>.npy`` + ``<type>.names.txt``
  a compressed folder   ``twhin compress``: ``<type>.npz`` PQ codes + codebook,
                        decoded here (the codes kept in ``.pq``)
  arrays                ``{type: (names, array)}``

The product-quantization file format lives here too (a codebook, the eq. (2)
table-lookup decode, save and load) because reading codes needs only numpy;
training a codebook and encoding (jax) stay in compress.py.

This module does not import jax.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from twhin_jax import rundir


# --------------------------------------------------------------------------
# Product-quantized tables (written by compress.py).


@dataclasses.dataclass(frozen=True)
class PQCodebook:
  """Centroids of every subspace and the unpadded dimension."""
  centroids: np.ndarray  # float32 [M, K, d_s]
  dim: int  # d (<= M * d_s)

  @property
  def num_subspaces(self) -> int:
    return int(self.centroids.shape[0])

  @property
  def num_centroids(self) -> int:
    return int(self.centroids.shape[1])

  @property
  def sub_dim(self) -> int:
    return int(self.centroids.shape[2])

  @property
  def factor(self) -> float:
    return compression_factor(self.dim, self.num_subspaces)


def compression_factor(dim: int, num_subspaces: int) -> float:
  """Eq. (3): float32 bytes of a row over its code bytes."""
  return 4.0 * dim / num_subspaces


def decode(codes, codebook: PQCodebook) -> np.ndarray:
  """Eq. (2): codes [N, M] -> float32 [N, d] by table lookup."""
  codes = np.asarray(codes)
  if codes.ndim != 2 or codes.shape[1] != codebook.num_subspaces:
    raise ValueError(f"codes of shape {codes.shape} do not match the codebook's "
                     f"{codebook.num_subspaces} subspaces")
  subspace = np.arange(codebook.num_subspaces)[None, :]  # [1, M]
  parts = codebook.centroids[subspace, codes.astype(np.int64)]  # [N, M, d_s]
  return parts.reshape(len(codes), -1)[:, :codebook.dim]


def save_compressed(path: str, entity_type: str, names: list[str], codes: np.ndarray,
                    codebook: PQCodebook) -> str:
  os.makedirs(path, exist_ok=True)
  target = os.path.join(path, f"{entity_type}.npz")
  tmp = target + ".tmp.npz"
  np.savez(tmp, codes=codes, centroids=codebook.centroids, dim=np.int64(codebook.dim),
           names=np.asarray(names, dtype=str))
  os.replace(tmp, target)
  return target


def load_pq(path: str) -> tuple[list[str], np.ndarray, PQCodebook]:
  """(names, codes [N, M], codebook) of one ``<type>.npz``."""
  with np.load(path) as data:
    return ([str(n) for n in data["names"]], data["codes"],
            PQCodebook(data["centroids"].astype(np.float32), int(data["dim"])))


def is_compressed_dir(path: str) -> bool:
  return os.path.exists(os.path.join(path, "summary.json")) and any(
      f.endswith(".npz") for f in os.listdir(path))


def load_compressed(path: str, types=None) -> "EmbeddingSet":
  """An EmbeddingSet of decoded rows, carrying the codes (``.pq``) for PQEmbed."""
  found = sorted(f[:-4] for f in os.listdir(path) if f.endswith(".npz"))
  types = found if types is None else list(types)
  tables, names, pq = {}, {}, {}
  for entity_type in types:
    if entity_type not in found:
      raise KeyError(f"{path}: no compressed table for type {entity_type!r} (have {found})")
    type_names, codes, codebook = load_pq(os.path.join(path, f"{entity_type}.npz"))
    tables[entity_type] = decode(codes, codebook)
    names[entity_type] = type_names
    pq[entity_type] = (codes, codebook)
  return EmbeddingSet(tables, names, pq=pq, origin=path)

# --------------------------------------------------------------------------
# Embedding sets.


@dataclasses.dataclass
class EmbeddingSet:
  """Entity vectors with their names, independent of where they came from.

  Attributes:
    tables: entity type -> float32 [N_t, d_t], row i is entity names[t][i].
    names: entity type -> N_t names.
    degrees: entity type -> int [N_t] train degrees (empty when unknown).
    pq: entity type -> (codes uint8 [N_t, M], PQCodebook) when the
      vectors are product-quantized (``tables`` then holds the decoded rows).
    origin: where they came from (a path or a label), for reports.
  """
  tables: dict[str, np.ndarray]
  names: dict[str, list[str]]
  degrees: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  pq: dict[str, tuple] = dataclasses.field(default_factory=dict)
  origin: str = ""

  def __post_init__(self):
    for entity_type, table in self.tables.items():
      if entity_type not in self.names:
        raise ValueError(f"{self.origin or 'embeddings'}: no names for type {entity_type!r}")
      if table.ndim != 2 or len(table) != len(self.names[entity_type]):
        raise ValueError(f"{self.origin or 'embeddings'}: {entity_type!r} table {table.shape} "
                         f"does not match its {len(self.names[entity_type])} names")

  @property
  def entity_types(self) -> list[str]:
    return list(self.tables)

  def check_type(self, entity_type: str) -> None:
    if entity_type not in self.tables:
      raise KeyError(f"{self.origin or 'embeddings'}: unknown entity type {entity_type!r} "
                     f"(types: {sorted(self.tables)})")

  def row_index(self, entity_type: str) -> dict[str, int]:
    self.check_type(entity_type)
    cache = self.__dict__.setdefault("_row_index", {})
    if entity_type not in cache:
      cache[entity_type] = {name: i for i, name in enumerate(self.names[entity_type])}
    return cache[entity_type]

  def rows(self, entity_type: str, names) -> np.ndarray:
    """Row of each name (int64 [n]); -1 for names without a vector."""
    index = self.row_index(entity_type)
    return np.fromiter((index.get(str(n), -1) for n in names), np.int64, count=len(names))

  def lookup(self, entity_type: str, name: str) -> int:
    row = self.row_index(entity_type).get(name)
    if row is None:
      raise KeyError(f"{self.origin or 'embeddings'}: unknown {entity_type} {name!r}")
    return row


def _from_run(run: rundir.Run, types=None) -> EmbeddingSet:
  types = list(run.graph.entities) if types is None else list(types)
  for entity_type in types:
    run.check_type(entity_type)
  return EmbeddingSet(
      tables={t: run.embeddings(t) for t in types},
      names={t: run.graph.names(t) for t in types},
      degrees={t: run.graph.degrees(t) for t in types},
      origin=run.workdir)


def _from_export(path: str, types=None) -> EmbeddingSet:
  found = sorted(f[:-len(".npy")] for f in os.listdir(path)
                 if f.endswith(".npy")
                 and os.path.exists(os.path.join(path, f[:-4] + ".names.txt")))
  types = found if types is None else list(types)
  tables, names = {}, {}
  for entity_type in types:
    if entity_type not in found:
      raise KeyError(f"{path}: no exported table for type {entity_type!r} (have {found})")
    tables[entity_type] = np.load(os.path.join(path, f"{entity_type}.npy"))
    with open(os.path.join(path, f"{entity_type}.names.txt"), encoding="utf-8") as f:
      names[entity_type] = [line.rstrip("\n") for line in f]
  return EmbeddingSet(tables, names, origin=path)


def load_embeddings(source, types=None) -> EmbeddingSet:
  """An :class:`EmbeddingSet` from any source the tools accept.

  Args:
    source: an ``EmbeddingSet`` (returned as is, restricted to ``types``); a
      run directory (latest checkpoint, committed slots, graph degrees); a
      directory written by ``twhin export`` (``<type>.npy`` + ``.names.txt``);
      a directory written by ``twhin compress`` (``<type>.npz``, decoded); or a
      dict ``{type: (names, array)}``.
    types: entity types to load (default: all).
  """
  if isinstance(source, EmbeddingSet):
    if types is None:
      return source
    for entity_type in types:
      source.check_type(entity_type)
    return EmbeddingSet({t: source.tables[t] for t in types}, {t: source.names[t] for t in types},
                        {t: source.degrees[t] for t in types if t in source.degrees},
                        {t: source.pq[t] for t in types if t in source.pq}, source.origin)
  if isinstance(source, dict):
    tables, names = {}, {}
    for entity_type, (type_names, array) in source.items():
      if types is None or entity_type in types:
        tables[entity_type] = np.asarray(array, np.float32)
        names[entity_type] = [str(n) for n in type_names]
    return EmbeddingSet(tables, names, origin="<arrays>")
  path = os.fspath(source)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: no such run, export or compressed directory")
  if os.path.isdir(rundir.checkpoint_root(path)):
    return _from_run(rundir.open_run(path), types)
  if is_compressed_dir(path):
    return load_compressed(path, types)
  return _from_export(path, types)
