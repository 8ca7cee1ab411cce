"""Export of trained embeddings and relation parameters to plain files.

``export_embeddings`` writes, into one directory::

  <type>.parquet     columns id (string: the entity name) and vector
                     (fixed_size_list<float32>[d]), one row per entity in
                     local-id order; schema metadata twhin.entity_type/dim
  <type>.npy         float32 [count, d], row i = local id i
  <type>.names.txt   the entity names, one per line, row order of the .npy
  vocab/<type>.parquet, vocab/<type>.by_name.parquet
                     the graph's on-disk vocabulary (``twhin_jax.vocabulary``),
                     copied beside the .npy: name <-> row lookups without
                     loading the names (retrieval and the server use it)
  relations.json     {"format_version", "comparator", "reciprocal",
                     "entities": {type: {count, dim}},
                     "relations": [{name, source, target, operator, dim,
                     shape, parameters, reverse_parameters (nested lists)}]}
  relations.npz      relation name -> forward parameter array (float32)
  relations_reverse.npz  relation name -> reverse parameter array (float32)

A relation's parameters are what ``twhin_jax.model.apply_operator`` takes:
shape [0] (none), [d] (translation, diagonal, complex_diagonal: real half
then imaginary half), [d/2] (rotation: one phase per complex coordinate) or
[d, d] (linear). The files alone score any edge:

  tail query (s, r, ?):  compare(op_r(theta_s), theta_c)              (model.py eq. 1)
  head query (?, r, t):  reciprocal: compare(op_r'(theta_t), theta_c)  with r' the
                                     reverse parameters             (model.py eq. 1')
                         otherwise:  compare(op_r(theta_c), theta_t)

with ``comparator`` one of dot, cos, l2. ``reverse_parameters`` equal
``parameters`` when the model is not reciprocal. Large tables are written in
chunks of ``chunk_rows`` rows, so memory stays bounded for memory-mapped
inputs; each file is written under a temporary name and renamed when complete.
Names are streamed from the graph's on-disk vocabulary a chunk at a time: no
file of the export holds all names in memory, whatever the entity count.

``write_projector`` writes the TensorBoard Embedding Projector files of a
sample of each type (``<type>.vectors.tsv``, ``<type>.metadata.tsv``,
``projector_config.pbtxt``): ``tensorboard --logdir DIR`` shows them.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from twhin_jax import rundir
from twhin_jax import vocabulary as vocabulary_lib
from twhin_jax.model import COMPARATORS, RelationLayout

FORMATS = ("parquet", "npy")
#: 2: comparator always set, reverse parameters and "reciprocal" added.
FORMAT_VERSION = 2


def _replace_when_done(path: str):
  """(temporary path, commit function) for writing a file atomically."""
  tmp = path + ".tmp"
  return tmp, lambda: os.replace(tmp, path)


#: Names per chunk when streaming a vocabulary into a text file.
NAME_CHUNK_ROWS = 1 << 16


def _write_parquet(path: str, entity_type: str, vocabulary, table, chunk_rows: int):
  dim = table.shape[1]
  schema = pa.schema([("id", pa.string()), ("vector", pa.list_(pa.float32(), dim))],
                     metadata={"twhin.entity_type": entity_type, "twhin.dim": str(dim)})
  tmp, commit = _replace_when_done(path)
  with pq.ParquetWriter(tmp, schema) as writer:
    for start in range(0, max(len(vocabulary), 1), chunk_rows):
      rows = np.ascontiguousarray(table[start:start + chunk_rows], np.float32)  # [n, d]
      vectors = pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), dim)
      ids = vocabulary.names_range(start, start + chunk_rows)
      writer.write_table(pa.Table.from_arrays([ids, vectors], schema=schema))
  commit()


def _write_npy(path: str, table, chunk_rows: int):
  """A float32 .npy written with plain file writes, a chunk at a time (not
  through a writable memory map, whose dirty pages would count in the
  process's memory for the whole table)."""
  tmp, commit = _replace_when_done(path)
  header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
            "fortran_order": False, "shape": tuple(int(n) for n in table.shape)}
  with open(tmp, "wb") as f:
    np.lib.format.write_array_header_1_0(f, header)
    for start in range(0, len(table), chunk_rows):
      # .data: the chunk's buffer itself (a view of a float32 table: no copy).
      f.write(np.ascontiguousarray(table[start:start + chunk_rows], np.float32).data)
  commit()


def _write_names(path: str, vocabulary):
  """One name per line in id order, streamed a chunk of names at a time."""
  tmp, commit = _replace_when_done(path)
  with open(tmp, "w", encoding="utf-8") as f:
    for chunk in vocabulary.iter_name_chunks(NAME_CHUNK_ROWS):
      f.writelines(name + "\n" for name in chunk.to_pylist())
  commit()


def _copy_vocabulary(vocabulary, out_dir: str, entity_type: str) -> dict[str, str]:
  """Copies a type's vocabulary files into ``out_dir/vocab/`` (file copies:
  constant memory). Returns {"by_id": path, "by_name": path}."""
  copied = {}
  for key, path_of in (("by_id", vocabulary_lib.by_id_path),
                       ("by_name", vocabulary_lib.by_name_path)):
    target = path_of(out_dir, entity_type)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp, commit = _replace_when_done(target)
    shutil.copyfile(vocabulary.files[key], tmp)
    commit()
    copied[key] = target
  return copied


def _write_npz(path: str, arrays: dict[str, np.ndarray]):
  """np.savez without its keyword clash (a relation may be named "file")."""
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
    for key, array in arrays.items():
      with archive.open(key + ".npy", "w", force_zip64=True) as f:
        np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)


def export_embeddings(graph, embeddings: dict, relation_params: dict, layout: RelationLayout,
                      out_dir: str, formats=FORMATS, *, comparator: str,
                      chunk_rows: int = 1 << 20) -> dict:
  """Writes every entity table and the relation parameters (see module doc).

  Args:
    graph: the ``twhin_jax.graph.Graph`` the embeddings belong to (names).
    embeddings: entity type -> [count, d] table (numpy, memmap or jax array).
    relation_params: {group name: stacked parameters} as in ``RelationLayout``.
    layout: the relations' parameter layout (config order = graph order).
    out_dir: created if missing; existing files of the same names are replaced.
    formats: any of "parquet", "npy" (tables; relations are always written).
    comparator: config.model.comparator, recorded in relations.json (scoring
      needs it).
    chunk_rows: rows per Parquet row group and per copy chunk.

  Returns:
    {"entities": {type: {"parquet": path, "npy": path, "names": path,
                         "vocabulary": {"by_id": path, "by_name": path}}},
     "relations_json": path, "relations_npz": path, "relations_reverse_npz": path}
    (only formats written).
  """
  if comparator not in COMPARATORS:
    raise ValueError(f"comparator {comparator!r} not in {COMPARATORS}")
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
    vocabulary = graph.vocabulary(entity_type)
    if len(vocabulary) != len(table):
      raise ValueError(f"vocab of {entity_type!r} has {len(vocabulary)} names, "
                       f"table {len(table)} rows")
    paths = written["entities"][entity_type] = {}
    base = os.path.join(out_dir, entity_type)
    if "parquet" in formats:
      paths["parquet"] = base + ".parquet"
      _write_parquet(paths["parquet"], entity_type, vocabulary, table, chunk_rows)
    if "npy" in formats:
      paths["npy"], paths["names"] = base + ".npy", base + ".names.txt"
      _write_npy(paths["npy"], table, chunk_rows)
      _write_names(paths["names"], vocabulary)
      paths["vocabulary"] = _copy_vocabulary(vocabulary, out_dir, entity_type)

  forward, reverse, described = {}, {}, []
  for index, rel in enumerate(graph.relations):
    param = np.asarray(layout.param(relation_params, index), np.float32)
    reverse_param = np.asarray(layout.reverse_param(relation_params, index), np.float32)
    forward[rel.name], reverse[rel.name] = param, reverse_param
    described.append(dict(name=rel.name, source=rel.source, target=rel.target,
                          operator=layout.operators[index], dim=int(layout.dims[index]),
                          shape=list(param.shape), parameters=param.tolist(),
                          reverse_parameters=reverse_param.tolist()))
  document = {"format_version": FORMAT_VERSION, "comparator": comparator,
              "reciprocal": bool(layout.reciprocal),
              "entities": {t: {"count": int(tables[t].shape[0]), "dim": int(tables[t].shape[1])}
                           for t in tables},
              "relations": described}
  written["relations_json"] = os.path.join(out_dir, "relations.json")
  tmp, commit = _replace_when_done(written["relations_json"])
  with open(tmp, "w") as f:
    json.dump(document, f, indent=1)
  commit()
  for key, filename, arrays in (("relations_npz", "relations.npz", forward),
                                ("relations_reverse_npz", "relations_reverse.npz", reverse)):
    written[key] = os.path.join(out_dir, filename)
    tmp, commit = _replace_when_done(written[key])
    _write_npz(tmp, arrays)
    commit()
  return written


def export_run(run, out_dir: str, formats=FORMATS, *, chunk_rows: int = 1 << 20) -> dict:
  """Exports a run opened by ``rundir.open_run``: its committed tables, forward
  and reverse relation parameters and comparator. Writes nothing into the run
  unless ``out_dir`` is inside it."""
  layout = RelationLayout.from_config(run.config)
  return export_embeddings(run.graph, run.all_embeddings(), run.relation_params(), layout,
                           out_dir, formats, comparator=run.config.model.comparator,
                           chunk_rows=chunk_rows)


def read_relations(export_dir: str) -> dict:
  """relations.json of an export, with "forward" and "reverse" parameter arrays
  per relation read from the .npz files."""
  path = os.path.join(export_dir, "relations.json")
  document = rundir.read_versioned_json(path, FORMAT_VERSION, "export",
                                        f"{path}: not a twhin export (no relations.json)")
  with np.load(os.path.join(export_dir, "relations.npz")) as forward, \
      np.load(os.path.join(export_dir, "relations_reverse.npz")) as reverse:
    for rel in document["relations"]:
      rel["forward"], rel["reverse"] = forward[rel["name"]], reverse[rel["name"]]
  return document


# --------------------------------------------------------------------------
# TensorBoard Embedding Projector.


def _tsv_cell(text: str) -> str:
  """A metadata cell: tabs and newlines would break the TSV row."""
  return text.replace("\t", " ").replace("\n", " ").replace("\r", " ")


def write_projector(graph, embeddings: dict, out_dir: str, *, sample: int = 5000,
                    seed: int = 0, types=None) -> dict:
  """Embedding Projector files for a seeded sample of each entity type.

  Writes, per type, ``<type>.vectors.tsv`` (one row of d tab-separated floats
  per sampled entity) and ``<type>.metadata.tsv`` (a header ``name<TAB>degree``,
  then one row per sampled entity, same order), and one
  ``projector_config.pbtxt`` naming every type's pair (the text format of
  TensorBoard's ProjectorConfig proto). ``sample`` rows per type at most
  (uniform without replacement, sorted by id; 0: every row).

  Returns {"config": path, "types": {type: {"vectors", "metadata", "rows"}}}.
  """
  if sample < 0:
    raise ValueError(f"--sample must be >= 0, got {sample}")
  types = list(graph.entities) if types is None else list(types)
  os.makedirs(out_dir, exist_ok=True)
  rng = np.random.default_rng(seed)
  written, blocks = {"types": {}}, []
  for entity_type in types:
    if entity_type not in graph.entities:
      raise ValueError(f"unknown entity type {entity_type!r} (types: {sorted(graph.entities)})")
    table = embeddings[entity_type]
    count = len(table)
    rows = (np.arange(count) if sample == 0 or count <= sample
            else np.sort(rng.choice(count, sample, replace=False)))
    names = graph.names_of(entity_type, rows)  # the sample's names only
    degrees = graph.degrees(entity_type)
    vectors_path = os.path.join(out_dir, f"{entity_type}.vectors.tsv")
    metadata_path = os.path.join(out_dir, f"{entity_type}.metadata.tsv")
    tmp, commit = _replace_when_done(vectors_path)
    np.savetxt(tmp, np.asarray(table[rows], np.float32), fmt="%.7g", delimiter="\t")
    commit()
    tmp, commit = _replace_when_done(metadata_path)
    with open(tmp, "w", encoding="utf-8") as f:
      f.write("name\tdegree\n")
      f.writelines(f"{_tsv_cell(name)}\t{int(degrees[i]) if len(degrees) else 0}\n"
                   for name, i in zip(names, rows))
    commit()
    written["types"][entity_type] = {"vectors": vectors_path, "metadata": metadata_path,
                                     "rows": int(len(rows))}
    blocks.append("embeddings {\n"
                  f"  tensor_name: {json.dumps(entity_type)}\n"
                  f"  tensor_path: {json.dumps(os.path.basename(vectors_path))}\n"
                  f"  metadata_path: {json.dumps(os.path.basename(metadata_path))}\n"
                  "}\n")
  written["config"] = os.path.join(out_dir, "projector_config.pbtxt")
  tmp, commit = _replace_when_done(written["config"])
  with open(tmp, "w", encoding="utf-8") as f:
    f.write("".join(blocks))
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
