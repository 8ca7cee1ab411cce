"""Entity vectors with their names, from wherever they were written.

An :class:`EmbeddingSet` is what drift, compression, nearest neighbours and
the downstream tasks read. :func:`load_embeddings` builds one from

  a run directory       the latest checkpoint's committed tables (rundir.open_run),
                        with the graph's train degrees
  an export directory   ``twhin export``: ``<type>.npy`` + ``vocab/`` (or, for
                        older exports, ``<type>.names.txt``)
  a compressed folder   ``twhin compress``: ``<type>.npz`` PQ codes + codebook,
                        decoded here (the codes kept in ``.pq``)
  arrays                ``{type: (names, array)}``

The product-quantization file format lives here too (a codebook, the eq. (2)
table-lookup decode, save and load) because reading codes needs only numpy;
training a codebook and encoding (jax) stay in compress.py.

Names are never held whole when they come from disk: a run's, an export's
and a compressed folder's names are ``vocabulary.NameSequence`` views of the
on-disk vocabulary (names read per row group on demand), and
:meth:`EmbeddingSet.rows` looks names up in its name-sorted file. Only the
``{type: (names, array)}`` source, whose names the caller already holds,
keeps a list (and a dict index).

This module does not import jax.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Sequence

import numpy as np

from twhin_jax import rundir
from twhin_jax import vocabulary as vocabulary_lib


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


def save_compressed(path: str, entity_type: str, names: Sequence[str], codes: np.ndarray,
                    codebook: PQCodebook) -> str:
  """Writes ``<path>/<type>.npz`` (codes, codebook) and the type's names as
  an on-disk vocabulary in ``<path>/vocab/`` (copied file by file when
  ``names`` is a vocabulary view, so no name passes through memory)."""
  os.makedirs(path, exist_ok=True)
  _save_vocabulary(path, entity_type, names)
  target = os.path.join(path, f"{entity_type}.npz")
  tmp = target + ".tmp.npz"
  np.savez(tmp, codes=codes, centroids=codebook.centroids, dim=np.int64(codebook.dim))
  os.replace(tmp, target)
  return target


def _save_vocabulary(directory: str, entity_type: str, names: Sequence[str]) -> None:
  if isinstance(names, vocabulary_lib.NameSequence):
    for key, path_of in (("by_id", vocabulary_lib.by_id_path),
                         ("by_name", vocabulary_lib.by_name_path)):
      target = path_of(directory, entity_type)
      os.makedirs(os.path.dirname(target), exist_ok=True)
      shutil.copyfile(names.vocabulary.files[key], target + ".tmp")
      os.replace(target + ".tmp", target)
  else:
    vocabulary_lib.write_vocabulary(directory, entity_type, [str(n) for n in names])


def _names_on_disk(directory: str, entity_type: str) -> "vocabulary_lib.NameSequence | None":
  """The names of a type as a view of ``<directory>/vocab/``, or None when
  the directory has no vocabulary for it (an older export)."""
  if not os.path.exists(vocabulary_lib.by_id_path(directory, entity_type)):
    return None
  return vocabulary_lib.NameSequence(vocabulary_lib.Vocabulary(directory, entity_type))


def load_pq(path: str) -> tuple[Sequence[str], np.ndarray, PQCodebook]:
  """(names, codes [N, M], codebook) of one ``<type>.npz``: names from the
  folder's ``vocab/`` (older files carry them inside the npz)."""
  directory = os.path.dirname(path) or "."
  entity_type = os.path.basename(path)[:-len(".npz")]
  with np.load(path) as data:
    names = _names_on_disk(directory, entity_type)
    if names is None:
      names = [str(n) for n in data["names"]]
    return (names, data["codes"],
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
    names: entity type -> N_t names: a ``vocabulary.NameSequence`` (read on
      demand from an on-disk vocabulary) or a list.
    degrees: entity type -> int [N_t] train degrees (empty when unknown).
    pq: entity type -> (codes uint8 [N_t, M], PQCodebook) when the
      vectors are product-quantized (``tables`` then holds the decoded rows).
    origin: where they came from (a path or a label), for reports.
  """
  tables: dict[str, np.ndarray]
  names: dict[str, Sequence[str]]
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

  def _row_index(self, entity_type: str) -> dict[str, int]:
    """Name -> row for names held in a list (built once)."""
    cache = self.__dict__.setdefault("_row_index_cache", {})
    if entity_type not in cache:
      cache[entity_type] = {name: i for i, name in enumerate(self.names[entity_type])}
    return cache[entity_type]

  def rows(self, entity_type: str, names) -> np.ndarray:
    """Row of each name (int64 [n]); -1 for names without a vector."""
    self.check_type(entity_type)
    own = self.names[entity_type]
    if isinstance(own, vocabulary_lib.NameSequence):
      return own.ids([str(n) for n in names], missing=-1)
    index = self._row_index(entity_type)
    return np.fromiter((index.get(str(n), -1) for n in names), np.int64, count=len(names))

  def rows_of(self, other: "EmbeddingSet", entity_type: str) -> np.ndarray:
    """``out[i]`` = this set's row of ``other``'s entity ``i`` (int64
    [N_other]), -1 where this set lacks it: the alignment of two versions.
    Two on-disk vocabularies are merge-joined (memory: the output); otherwise
    ``other``'s names are looked up a row group at a time."""
    self.check_type(entity_type)
    other.check_type(entity_type)
    mine, theirs = self.names[entity_type], other.names[entity_type]
    if (isinstance(mine, vocabulary_lib.NameSequence)
        and isinstance(theirs, vocabulary_lib.NameSequence)):
      return vocabulary_lib.id_map(theirs.vocabulary, mine.vocabulary)
    out = np.empty(len(theirs), np.int64)
    step = vocabulary_lib.ROW_GROUP_ROWS
    for start in range(0, len(theirs), step):
      out[start:start + step] = self.rows(entity_type, theirs[start:start + step])
    return out

  def lookup(self, entity_type: str, name: str) -> int:
    row = int(self.rows(entity_type, [name])[0])
    if row < 0:
      raise KeyError(f"{self.origin or 'embeddings'}: unknown {entity_type} {name!r}")
    return row


def _from_run(run: rundir.Run, types=None) -> EmbeddingSet:
  types = list(run.graph.entities) if types is None else list(types)
  for entity_type in types:
    run.check_type(entity_type)
  return EmbeddingSet(
      tables={t: run.embeddings(t) for t in types},
      names={t: vocabulary_lib.NameSequence(run.graph.vocabulary(t)) for t in types},
      degrees={t: run.graph.degrees(t) for t in types},
      origin=run.workdir)


def _from_export(path: str, types=None) -> EmbeddingSet:
  found = sorted(f[:-len(".npy")] for f in os.listdir(path)
                 if f.endswith(".npy")
                 and (os.path.exists(vocabulary_lib.by_id_path(path, f[:-4]))
                      or os.path.exists(os.path.join(path, f[:-4] + ".names.txt"))))
  types = found if types is None else list(types)
  tables, names = {}, {}
  for entity_type in types:
    if entity_type not in found:
      raise KeyError(f"{path}: no exported table for type {entity_type!r} (have {found})")
    tables[entity_type] = np.load(os.path.join(path, f"{entity_type}.npy"))
    names[entity_type] = _names_on_disk(path, entity_type)
    if names[entity_type] is None:  # an export written before vocab/ existed
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
