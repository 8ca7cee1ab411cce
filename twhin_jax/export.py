"""Export of trained embeddings and relation parameters to plain files.

``export_embeddings`` writes, into one directory::

  <type>.parquet     columns id (string: the entity name) and vector
                     (fixed_size_list<float32>[d]), one row per entity in
                     local-id order; schema metadata twhin.entity_type/dim
  <type>.npy         float32 [count, d], row i = local id i
  <type>.names.txt   the entity names, one per line, row order of the .npy
  relations.json     {"format_version", "comparator", "entities": {type:
                     {count, dim}}, "relations": [{name, source, target,
                     operator, dim, shape, parameters (nested lists)}]}
  relations.npz      relation name -> parameter array (float32)

A relation's parameters are what ``twhin_jax.model.apply_operator`` takes:
shape [0] (none), [d] (translation, diagonal, complex_diagonal: real half
then imaginary half) or [d, d] (linear). Large tables are written in chunks of
``chunk_rows`` rows, so memory stays bounded for memory-mapped inputs; each
file is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import os
import zipfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from twhin_jax.model import RelationLayout

FORMATS = ("parquet", "npy")
FORMAT_VERSION = 1


def _replace_when_done(path: str):
  """(temporary path, commit function) for writing a file atomically."""
  tmp = path + ".tmp"
  return tmp, lambda: os.replace(tmp, path)


def _write_parquet(path: str, entity_type: str, names: list[str], table, chunk_rows: int):
  dim = table.shape[1]
  schema = pa.schema([("id", pa.string()), ("vector", pa.list_(pa.float32(), dim))],
                     metadata={"twhin.entity_type": entity_type, "twhin.dim": str(dim)})
  tmp, commit = _replace_when_done(path)
  with pq.ParquetWriter(tmp, schema) as writer:
    for start in range(0, max(len(names), 1), chunk_rows):
      rows = np.ascontiguousarray(table[start:start + chunk_rows], np.float32)  # [n, d]
      vectors = pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), dim)
      ids = pa.array(names[start:start + chunk_rows], pa.string())
      writer.write_table(pa.Table.from_arrays([ids, vectors], schema=schema))
  commit()


def _write_npy(path: str, table, chunk_rows: int):
  tmp, commit = _replace_when_done(path)
  out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=table.shape)
  for start in range(0, len(table), chunk_rows):
    out[start:start + chunk_rows] = table[start:start + chunk_rows]
  out.flush()
  del out
  commit()


def _write_names(path: str, names: list[str]):
  tmp, commit = _replace_when_done(path)
  with open(tmp, "w", encoding="utf-8") as f:
    f.writelines(name + "\n" for name in names)
  commit()


def _write_npz(path: str, arrays: dict[str, np.ndarray]):
  """np.savez without its keyword clash (a relation may be named "file")."""
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
    for key, array in arrays.items():
      with archive.open(key + ".npy", "w", force_zip64=True) as f:
        np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)


def export_embeddings(graph, embeddings: dict, relation_params: dict, layout: RelationLayout,
                      out_dir: str, formats=FORMATS, *, comparator: str | None = None,
                      chunk_rows: int = 1 << 20) -> dict:
  """Writes every entity table and the relation parameters (see module doc).

  Args:
    graph: the ``twhin_jax.graph.Graph`` the embeddings belong to (names).
    embeddings: entity type -> [count, d] table (numpy, memmap or jax array).
    relation_params: {group name: stacked parameters} as in ``RelationLayout``.
    layout: the relations' parameter layout (config order = graph order).
    out_dir: created if missing; existing files of the same names are replaced.
    formats: any of "parquet", "npy" (tables; relations are always written).
    comparator: recorded in relations.json when given (config.model.comparator).
    chunk_rows: rows per Parquet row group and per copy chunk.

  Returns:
    {"entities": {type: {"parquet": path, "npy": path, "names": path}},
     "relations_json": path, "relations_npz": path} (only formats written).
  """
  formats = tuple(formats)
  unknown = set(formats) - set(FORMATS)
  if unknown:
    raise ValueError(f"unknown export formats {sorted(unknown)}; choose from {FORMATS}")
  if tuple(r.name for r in graph.relations) != tuple(layout.names):
    raise ValueError("relation layout does not match the graph's relations")
  tables = {}
  for entity_type, info in graph.entities.items():
    if entity_type not in embeddings:
      raise ValueError(f"no embeddings for entity type {entity_type!r}")
    table = embeddings[entity_type]
    if not isinstance(table, np.ndarray):
      table = np.asarray(table)
    if table.ndim != 2 or table.shape[0] != info.count:
      raise ValueError(f"embeddings[{entity_type!r}] has shape {table.shape}, "
                       f"expected [{info.count}, d]")
    tables[entity_type] = table

  os.makedirs(out_dir, exist_ok=True)
  written = {"entities": {}}
  for entity_type, table in tables.items():
    names = graph.names(entity_type)
    if len(names) != len(table):
      raise ValueError(f"vocab of {entity_type!r} has {len(names)} names, table {len(table)} rows")
    paths = written["entities"][entity_type] = {}
    base = os.path.join(out_dir, entity_type)
    if "parquet" in formats:
      paths["parquet"] = base + ".parquet"
      _write_parquet(paths["parquet"], entity_type, names, table, chunk_rows)
    if "npy" in formats:
      paths["npy"], paths["names"] = base + ".npy", base + ".names.txt"
      _write_npy(paths["npy"], table, chunk_rows)
      _write_names(paths["names"], names)

  arrays, described = {}, []
  for index, rel in enumerate(graph.relations):
    param = np.asarray(layout.param(relation_params, index), np.float32)
    arrays[rel.name] = param
    described.append(dict(name=rel.name, source=rel.source, target=rel.target,
                          operator=layout.operators[index], dim=int(layout.dims[index]),
                          shape=list(param.shape), parameters=param.tolist()))
  document = {"format_version": FORMAT_VERSION, "comparator": comparator,
              "entities": {t: {"count": int(tables[t].shape[0]), "dim": int(tables[t].shape[1])}
                           for t in tables},
              "relations": described}
  written["relations_json"] = os.path.join(out_dir, "relations.json")
  tmp, commit = _replace_when_done(written["relations_json"])
  with open(tmp, "w") as f:
    json.dump(document, f, indent=1)
  commit()
  written["relations_npz"] = os.path.join(out_dir, "relations.npz")
  tmp, commit = _replace_when_done(written["relations_npz"])
  _write_npz(tmp, arrays)
  commit()
  return written


def read_parquet(path: str) -> tuple[list[str], np.ndarray]:
  """(names, float32 [count, d] table) of an exported ``<type>.parquet``."""
  table = pq.read_table(path)
  names = table.column("id").to_pylist()
  vectors = table.column("vector").combine_chunks()
  dim = vectors.type.list_size
  flat = vectors.flatten().to_numpy(zero_copy_only=False)
  return names, np.asarray(flat, np.float32).reshape(len(names), dim)
