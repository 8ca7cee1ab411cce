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

import bisect
import collections.abc
import functools
import json
import os
import threading
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


#: Keys per row group below which a lookup binary-searches the group's sorted
#: names instead of hashing them: pc.index_in builds a hash set of the whole
#: group (65,536 names, about 4 ms) on every call, while a bisect reads about
#: 17 names (tens of microseconds) per key. A server resolves a few names
#: per request.
BISECT_BELOW = 64


def _positions_in_group(keys: pa.Array, group_names) -> np.ndarray:
  """Row of each key in a row group's name column (sorted, distinct), -1 if absent."""
  if isinstance(group_names, pa.ChunkedArray):
    group_names = (group_names.chunk(0) if group_names.num_chunks == 1
                   else group_names.combine_chunks())
  if len(keys) >= BISECT_BELOW:
    return pc.fill_null(pc.index_in(keys, value_set=group_names), -1).to_numpy().astype(np.int64)
  out = np.full(len(keys), -1, np.int64)
  for k, key in enumerate(keys.to_pylist()):
    if key is None:
      continue
    # str order is code point order, which is the files' UTF-8 byte order.
    i = bisect.bisect_left(group_names, key, key=lambda scalar: scalar.as_py())
    if i < len(group_names) and group_names[i].as_py() == key:
      out[k] = i
  return out


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

  @property
  def files(self) -> dict[str, str]:
    """{"by_id": path, "by_name": path}: the type's two files."""
    return {"by_id": self._by_id_path, "by_name": self._by_name_path}

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
        position = _positions_in_group(names.take(pa.array(rows)), table.column("name"))
        found = position >= 0
        ids = table.column("id").to_numpy()
        out[rows[found]] = ids[position[found].astype(np.int64)]
    if missing is None and (out < 0).any():
      first = names[int(np.flatnonzero(out < 0)[0])].as_py()
      raise KeyError(f"unknown {self.entity_type} {first!r}")
    if missing is not None:
      out[out < 0] = missing
    return out

  # -- streaming over the whole vocabulary (memory: one chunk) ----------------

  def names_range(self, start: int, stop: int) -> pa.Array:
    """Names of the ids ``[start, stop)`` (clipped to the vocabulary), read
    from the row groups that hold them."""
    start, stop = max(0, int(start)), min(len(self), int(stop))
    if stop <= start:
      return pa.array([], pa.string())
    first = int(np.searchsorted(self._id_starts, start, side="right")) - 1
    last = int(np.searchsorted(self._id_starts, stop - 1, side="right")) - 1
    column = pa.chunked_array([chunk for g in range(first, last + 1)
                               for chunk in self._read_by_id(g).chunks], pa.string())
    return column.slice(start - int(self._id_starts[first]), stop - start).combine_chunks()

  def iter_name_chunks(self, chunk_rows: int) -> Iterator[pa.Array]:
    """The names in id order, ``chunk_rows`` at a time (the last chunk may be
    short): chunk c holds the names of ids ``[c * chunk_rows, (c + 1) * chunk_rows)``."""
    if chunk_rows < 1:
      raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    for start in range(0, len(self), chunk_rows):
      yield self.names_range(start, start + chunk_rows)

  def iter_by_name(self) -> Iterator[tuple[pa.Array, np.ndarray]]:
    """(names, ids) in name order (UTF-8 byte order), one row group at a time."""
    for g in range(self._by_name.metadata.num_row_groups):
      table = self._by_name.read_row_group(g, columns=["name", "id"])
      yield table.column("name").combine_chunks(), table.column("id").to_numpy()


def iter_shared_ids(left: Vocabulary, right: Vocabulary) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Joins two vocabularies on the name, a chunk at a time: yields (left ids,
  right ids) int64 arrays, pair k naming the same entity; every shared name
  appears exactly once over all chunks.

  Walks ``left``'s name-sorted file one row group at a time and looks each
  group's (sorted) names up in ``right``: a group's names span a contiguous
  range of ``right``'s row groups, so ``right`` is read about once in all
  (a merge join). Memory: a few row groups of either side, whatever the
  number of names.
  """
  for names, left_ids in left.iter_by_name():
    right_ids = right.ids(names, missing=-1)
    shared = right_ids >= 0
    yield left_ids[shared].astype(np.int64), right_ids[shared]


def id_map(new: Vocabulary, old: Vocabulary, out: np.ndarray | None = None) -> np.ndarray:
  """``out[i]`` = the id in ``old`` of the name that has id ``i`` in ``new``,
  -1 where ``old`` lacks it (e.g. a warm start: parent id of every new id).
  ``out`` (int64 [len(new)], e.g. a memory-mapped file) is filled and
  returned; by default a new array. The only memory that grows with the
  entity count is ``out`` itself (8 bytes per name)."""
  if out is None:
    out = np.empty(len(new), np.int64)
  if out.shape != (len(new),):
    raise ValueError(f"out has shape {out.shape}, expected ({len(new)},)")
  out[:] = -1
  for new_ids, old_ids in iter_shared_ids(new, old):
    out[new_ids] = old_ids
  return out


class NameSequence(collections.abc.Sequence):
  """A read-only ``list[str]`` view of a vocabulary in id order that reads
  names on demand (``seq[i]``, ``seq[a:b]``, ``len``, iteration a row group
  at a time) instead of holding them; for callers written against a list of
  names. Thread-safe: one lock serialises its reads of the Parquet files."""

  def __init__(self, vocabulary: Vocabulary, lock: threading.Lock | None = None):
    self.vocabulary = vocabulary
    self._lock = lock or threading.Lock()

  def __len__(self) -> int:
    return len(self.vocabulary)

  def __getitem__(self, index):
    if isinstance(index, slice):
      start, stop, step = index.indices(len(self))
      if step != 1:
        return self.take(range(start, stop, step))
      with self._lock:
        return self.vocabulary.names_range(start, stop).to_pylist()
    index = int(index)
    if index < 0:
      index += len(self)
    if not 0 <= index < len(self):
      raise IndexError(f"{self.vocabulary.entity_type} id {index} out of range [0, {len(self)})")
    return self.take([index])[0]

  def take(self, ids) -> list[str]:
    """Names of many ids at once (one read per row group touched)."""
    with self._lock:
      return self.vocabulary.names(np.asarray(ids, np.int64))

  def ids(self, names, missing: int | None = None) -> np.ndarray:
    """Ids (rows) of names, as :meth:`Vocabulary.ids`."""
    with self._lock:
      return self.vocabulary.ids(names, missing=missing)

  def __iter__(self) -> Iterator[str]:
    for start in range(0, len(self), ROW_GROUP_ROWS):
      yield from self[start:start + ROW_GROUP_ROWS]
