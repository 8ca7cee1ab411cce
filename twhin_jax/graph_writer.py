"""Writes the files of a graph directory (format of ``twhin_jax/graph.py``)
from sorted streams of Arrow record batches.

Both import engines (``import_duckdb``, ``import_spark``) end here: they
compute ids, buckets and degrees at scale and hand over sorted streams; this
module only appends them to their files, so its memory is one batch
whatever the graph's size, and both engines give byte-identical files for
the same streams.
"""

from __future__ import annotations

import io
import os
from typing import Iterable

import numpy as np
import pyarrow as pa

from twhin_jax import graph as graph_lib
from twhin_jax import vocabulary as vocabulary_lib


def _as_batches(stream) -> Iterable[pa.RecordBatch]:
  for item in stream:
    if isinstance(item, pa.Table):
      yield from item.to_batches()
    else:
      yield item


class NpyAppender:
  """A 1-D ``.npy`` file written in pieces.

  The header is reserved first and rewritten with the final length on
  :meth:`close`; numpy pads 1-D headers to a fixed size (room for 21 digits),
  so the rewrite never moves the data. This lets edges stream straight into
  their final files without knowing bucket sizes in advance.
  """

  def __init__(self, path: str, dtype):
    self.path = path
    self.dtype = np.dtype(dtype)
    self.count = 0
    os.makedirs(os.path.dirname(path), exist_ok=True)
    header = self._header(0)
    self._header_size = len(header)
    self._file = open(path, "wb")
    self._file.write(header)

  def _header(self, length: int) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {
        "descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
        "shape": (length,)})
    return buffer.getvalue()

  def append(self, values: np.ndarray) -> None:
    np.ascontiguousarray(values, self.dtype).tofile(self._file)
    self.count += len(values)

  def close(self) -> None:
    header = self._header(self.count)
    if len(header) != self._header_size:
      raise RuntimeError(f"{self.path}: npy header size changed")  # > 10**21 rows
    self._file.seek(0)
    self._file.write(header)
    self._file.close()


def _column(batch: pa.RecordBatch, name: str, dtype) -> np.ndarray:
  return batch.column(name).to_numpy(zero_copy_only=False).astype(dtype, copy=False)


def write_buckets(graph_dir: str, batches, grid: tuple[int, int], weighted: bool
                  ) -> dict[str, int]:
  """Bucket files from batches with columns lhs, rhs, src, dst, rel (and
  weight), sorted by (lhs, rhs) and, inside a bucket, in the order the edges
  should keep. Returns the manifest's bucket_sizes (every cell of the grid)."""
  lhs_count, rhs_count = grid
  sizes = np.zeros(lhs_count * rhs_count, np.int64)
  files: dict[tuple[int, str], NpyAppender] = {}
  last_bucket = -1
  keys = (("src", np.int32), ("dst", np.int32), ("rel", np.int32)) + (
      (("weight", np.float32),) if weighted else ())
  try:
    for batch in _as_batches(batches):
      if not batch.num_rows:
        continue
      bucket = (_column(batch, "lhs", np.int64) * rhs_count + _column(batch, "rhs", np.int64))
      if bucket[0] < last_bucket or (len(bucket) > 1 and (np.diff(bucket) < 0).any()):
        raise RuntimeError("bucket stream is not sorted by bucket")
      last_bucket = int(bucket[-1])
      columns = {key: _column(batch, key, dtype) for key, dtype in keys}
      starts = np.concatenate([[0], np.flatnonzero(np.diff(bucket)) + 1, [len(bucket)]])
      for a, b in zip(starts[:-1], starts[1:]):
        key = int(bucket[a])
        i, j = divmod(key, rhs_count)
        sizes[key] += b - a
        for name, dtype in keys:
          if (key, name) not in files:
            files[key, name] = NpyAppender(
                os.path.join(graph_lib.bucket_dir(graph_dir, i, j), f"{name}.npy"), dtype)
          files[key, name].append(columns[name][a:b])
  finally:
    for appender in files.values():
      appender.close()
  return {f"{i}_{j}": int(sizes[i * rhs_count + j])
          for i in range(lhs_count) for j in range(rhs_count)}


def write_split(graph_dir: str, split: str, batches) -> int:
  """splits/<split>/{src,dst,rel}.npy (int64 local ids) from batches in the
  order to keep; nothing is written for an empty split."""
  files = {}
  count = 0
  try:
    for batch in _as_batches(batches):
      if not batch.num_rows:
        continue
      for key in ("src", "dst", "rel"):
        if key not in files:
          files[key] = NpyAppender(os.path.join(graph_dir, "splits", split, f"{key}.npy"),
                                   np.int64)
        files[key].append(_column(batch, key, np.int64))
      count += batch.num_rows
  finally:
    for appender in files.values():
      appender.close()
  return count


def write_degrees(graph_dir: str, entity_type: str, count: int, batches) -> int:
  """degrees/<type>.npy (int64 [count]) from batches of (id, degree) sorted
  by id, ids with no train edge absent (they get 0). Returns how many
  entities have degree 0."""
  appender = NpyAppender(os.path.join(graph_dir, "degrees", f"{entity_type}.npy"), np.int64)
  written = 0
  nonzero = 0
  try:
    for batch in _as_batches(batches):
      if not batch.num_rows:
        continue
      ids = _column(batch, "id", np.int64)
      degrees = _column(batch, "degree", np.int64)
      if ids[0] < written or (np.diff(ids) <= 0).any() or ids[-1] >= count:
        raise RuntimeError(f"degrees of {entity_type!r}: ids not sorted, repeated or out of range")
      dense = np.zeros(ids[-1] + 1 - written, np.int64)
      dense[ids - written] = degrees
      appender.append(dense)
      written = int(ids[-1]) + 1
      nonzero += len(ids)
    if written < count:
      appender.append(np.zeros(count - written, np.int64))
  finally:
    appender.close()
  return count - nonzero


def write_vocabulary(graph_dir: str, entity_type: str, names_by_id, pairs_by_name) -> int:
  """vocab/<type>.parquet and .by_name.parquet (see vocabulary.py)."""
  return vocabulary_lib.write_vocabulary_streams(
      graph_dir, entity_type, _as_batches(names_by_id), _as_batches(pairs_by_name))
