"""The on-disk vocabulary of an imported graph: names <-> local ids, never
held in memory whole.

Each entity type has two Parquet files under ``vocab/``::

  <type>.parquet          column name: the names in local-id order (row r is id r)
  <type>.by_name.parquet  columns name, id: the same pairs sorted by name
                          (UTF-8 byte order); its key-value metadata holds the
                          first name of every row group ("row_group_first_names")

Both are written in row groups of :data:`ROW_GROUP_ROWS` rows. A lookup reads
only the row groups its keys fall in:

* id -> name: row group ``g`` holds ids ``[starts[g], starts[g + 1])``
  (cumulative row counts from the footer);
* name -> id: row group = the last one whose first name is <= the name
  (binary search over the first names), then a hashed match inside it
  (``pyarrow.compute.index_in``).

Memory per lookup is O(keys + groups touched x ROW_GROUP_ROWS); what a
:class:`Vocabulary` keeps between calls is O(count / ROW_GROUP_ROWS) (row
group starts and first names), independent of how many names there are in
practice (1B names: about 15k row groups).
"""

from __future__ import annotations

import functools
import json
import os
from typing import Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

#: Rows per Parquet row group: the unit a lookup reads.
ROW_GROUP_ROWS = 1 << 16
#: Row groups kept decoded per file between lookups (a few MB), so that
#: one-name lookups in a loop do not re-read the same group.
CACHED_ROW_GROUPS = 8
FIRST_NAMES_KEY = b"row_group_first_names"

BY_ID_SCHEMA = pa.schema([("name", pa.string())])
BY_NAME_SCHEMA = pa.schema([("name", pa.string()), ("id", pa.int64())])


def by_id_path(graph_dir: str, entity_type: str) -> str:
  return os.path.join(graph_dir, "vocab", f"{entity_type}.parquet")


def by_name_path(graph_dir: str, entity_type: str) -> str:
  return os.path.join(graph_dir, "vocab", f"{entity_type}.by_name.parquet")


class _RowGroupWriter:
  """Streams record batches into a Parquet file in row groups of exactly
  ``ROW_GROUP_ROWS`` rows (the last may be short)."""

  def __init__(self, path: str, schema: pa.Schema, record_first_names: bool = False):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    self.path = path
    self.schema = schema
    self.first_names: list[str] | None = [] if record_first_names else None
    self._pending: list[pa.Table] = []
    self._pending_rows = 0
    self.rows = 0
    self._temp = path + ".partial"
    self._writer = pq.ParquetWriter(self._temp, schema, compression="zstd")

  def write(self, batch) -> None:
    table = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
    table = table.select(self.schema.names).cast(self.schema)
    self._pending.append(table)
    self._pending_rows += table.num_rows
    while self._pending_rows >= ROW_GROUP_ROWS:
      self._flush(ROW_GROUP_ROWS)

  def _flush(self, rows: int) -> None:
    table = pa.concat_tables(self._pending)
    group, rest = table.slice(0, rows), table.slice(rows)
    if self.first_names is not None:
      self.first_names.append(group.column("name")[0].as_py())
    self._writer.write_table(group, row_group_size=rows)
    self.rows += rows
    self._pending = [rest] if rest.num_rows else []
    self._pending_rows = rest.num_rows

  def close(self) -> int:
    if self._pending_rows:
      self._flush(self._pending_rows)
    if self.first_names is not None:
      self._writer.add_key_value_metadata({FIRST_NAMES_KEY: json.dumps(self.first_names)})
    self._writer.close()
    os.replace(self._temp, self.path)
    return self.rows


def write_vocabulary_streams(graph_dir: str, entity_type: str,
                             names_by_id: Iterable, pairs_by_name: Iterable) -> int:
  """Writes both files of a type from two streams of Arrow batches: names in
  id order (column ``name``) and (name, id) pairs in name order. Returns the
  number of names."""
  writer = _RowGroupWriter(by_id_path(graph_dir, entity_type), BY_ID_SCHEMA)
  for batch in names_by_id:
    writer.write(batch)
  count = writer.close()
  writer = _RowGroupWriter(by_name_path(graph_dir, entity_type), BY_NAME_SCHEMA,
                           record_first_names=True)
  for batch in pairs_by_name:
    writer.write(batch)
  if writer.close() != count:
    raise RuntimeError(f"{entity_type}: the two vocabulary streams differ in length")
  return count


def write_vocabulary(graph_dir: str, entity_type: str, names: Sequence[str]) -> None:
  """Writes a small vocabulary held in memory (names in id order); for tests
  and tools that build a graph directory by hand."""
  names = pa.array(list(names), pa.string())
  order = pc.sort_indices(names)  # byte order == code point order for UTF-8
  pairs = pa.table({"name": names.take(order), "id": pa.array(order, pa.int64())})
  write_vocabulary_streams(graph_dir, entity_type, [pa.table({"name": names})], [pairs])


class Vocabulary:
  """Lookups in one type's on-disk vocabulary (see the module docstring)."""

  def __init__(self, graph_dir: str, entity_type: str):
    self.entity_type = entity_type
    self._by_id_path = by_id_path(graph_dir, entity_type)
    self._by_name_path = by_name_path(graph_dir, entity_type)
    for path in (self._by_id_path, self._by_name_path):
      if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: vocabulary file missing")
    self._by_id = pq.ParquetFile(self._by_id_path)
    self._by_name = pq.ParquetFile(self._by_name_path)
    meta = self._by_id.metadata
    sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
    self._id_starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
    first = (self._by_name.metadata.metadata or {}).get(FIRST_NAMES_KEY)
    if first is None:
      raise ValueError(f"{self._by_name_path}: no row group index in its metadata")
    self._first_names = np.array(json.loads(first), dtype=object)
    self._read_by_id = functools.lru_cache(CACHED_ROW_GROUPS)(
        lambda g: self._by_id.read_row_group(g, columns=["name"]).column("name"))
    self._read_by_name = functools.lru_cache(CACHED_ROW_GROUPS)(
        lambda g: self._by_name.read_row_group(g, columns=["name", "id"]))

  def __len__(self) -> int:
    return int(self._id_starts[-1])

  def iter_names(self) -> Iterator[pa.Array]:
    """The names in id order, one row group (ROW_GROUP_ROWS names) at a time."""
    for g in range(self._by_id.metadata.num_row_groups):
      yield self._by_id.read_row_group(g, columns=["name"]).column("name").combine_chunks()

  def names(self, ids) -> list[str]:
    """Names of local ids (any order, repeats allowed); IndexError if out of range."""
    ids = np.asarray(ids, np.int64).reshape(-1)
    if len(ids) and (ids.min() < 0 or ids.max() >= len(self)):
      bad = ids[(ids < 0) | (ids >= len(self))][0]
      raise IndexError(f"{self.entity_type} id {int(bad)} out of range [0, {len(self)})")
    out = np.empty(len(ids), dtype=object)
    groups = np.searchsorted(self._id_starts, ids, side="right") - 1
    for g in np.unique(groups):
      mask = groups == g
      column = self._read_by_id(int(g))
      out[mask] = column.take(pa.array(ids[mask] - self._id_starts[g])).to_numpy(
          zero_copy_only=False)
    return out.tolist()

  def ids(self, names, missing: int | None = None) -> np.ndarray:
    """Local ids of names (int64). Unknown names raise KeyError naming the
    first, or get ``missing`` if it is given (e.g. -1)."""
    names = pa.array(list(names) if not isinstance(names, (pa.Array, pa.ChunkedArray))
                     else names, pa.string())
    if isinstance(names, pa.ChunkedArray):
      names = names.combine_chunks()
    out = np.full(len(names), -1, np.int64)
    if len(names) and len(self._first_names):
      keys = names.to_numpy(zero_copy_only=False)
      groups = np.searchsorted(self._first_names, keys, side="right") - 1
      for g in np.unique(groups):
        if g < 0:
          continue  # before the first name: unknown
        rows = np.flatnonzero(groups == g)
        table = self._read_by_name(int(g))
        position = pc.fill_null(
            pc.index_in(names.take(pa.array(rows)), value_set=table.column("name")), -1)
        position = position.to_numpy().astype(np.int64)
        found = position >= 0
        ids = table.column("id").to_numpy()
        out[rows[found]] = ids[position[found].astype(np.int64)]
    if missing is None and (out < 0).any():
      first = names[int(np.flatnonzero(out < 0)[0])].as_py()
      raise KeyError(f"unknown {self.entity_type} {first!r}")
    if missing is not None:
      out[out < 0] = missing
    return out
