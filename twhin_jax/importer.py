"""Importer: edge files -> the graph directory that ``twhin_jax.graph`` reads.

The input is the list of file specs of ``config.data.files`` (TSV/CSV, plain
or gzipped, or Parquet; see ``config.FILE_SPEC_FIELDS``); the output is the
directory format documented in ``twhin_jax/graph.py``. The import runs in two
streaming passes so that memory grows with the number of *entities* (the
vocabularies), never with the number of edges:

Pass 1 (read): every file is read in blocks (pyarrow's streaming CSV reader,
  or Parquet record batches). Each block is validated with vectorised checks,
  and its entity names are mapped to *arrival ids*: per-type dicts that hand
  out 0, 1, 2, ... in order of first appearance. Only the distinct names of a
  block go through Python (the block is dictionary-encoded first). The edges,
  as (src, dst, rel, split, weight) arrival ids, are appended to flat binary
  spool files.

Between the passes every type's arrival ids are shuffled with a seeded random
  permutation (``config.train.seed``). Arrival order is strongly correlated
  with degree and with file order (a user file sorted by id, a KG whose first
  lines are its hubs); shuffling makes the contiguous partitions of
  ``graph.py`` hold a balanced share of entities and edges.

Pass 2 (bucket): the spool is read back in chunks; ids are remapped through
  the permutation, split into (partition, offset), and each chunk's edges are
  appended to their bucket's ``.npy`` files (see :class:`_NpyAppender`), while
  train degrees accumulate with ``np.bincount``.

Bad input is reported as :class:`GraphImportError` with a ``path:line:``
prefix (1-based physical lines of the source file, header included; for
Parquet the 1-based row number). pyarrow does not report line numbers, so on
an error the file is re-scanned in Python up to the offending row (see
:meth:`_TextReader.locate`); the fast path never pays for this. With
``config.data.on_error == "skip"`` bad lines are dropped and counted per
reason in the manifest instead.

The import is atomic: everything is built in ``<graph_dir>.tmp-<pid>`` and
renamed into place only once complete; a failure removes the temporary
directory and leaves any existing ``graph_dir`` alone.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import datetime
import gzip
import hashlib
import io
import itertools
import json
import math
import os
import shutil
import warnings
import zlib
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from tqdm import tqdm

from twhin_jax import config as config_lib
from twhin_jax import graph as graph_lib

#: Bytes of text parsed per block in pass 1: large enough that per-block
#: Python overhead vanishes, small enough to keep memory flat.
TEXT_BLOCK_BYTES = 32 << 20
#: Rows per record batch for Parquet inputs.
PARQUET_BATCH_ROWS = 1 << 20
#: Edges per chunk in pass 2 (about 25 bytes each in the spool).
BUCKET_CHUNK_EDGES = 1 << 21
#: Lines sampled at the start of a text file to learn its column count.
COLUMN_COUNT_SAMPLE_LINES = 1000

SPLIT_CODES = {"train": 0, "valid": 1, "test": 2}

# Independent random streams derived from config.train.seed.
_HOLDOUT_STREAM = 1
_PERMUTATION_STREAM = 2

# Reasons a line is rejected: the keys of manifest["skipped"]. A row's reason
# code is its index here plus one (0 means the row is fine).
COLUMN_COUNT = "column_count"
EMPTY_FIELD = "empty_field"
UNKNOWN_RELATION = "unknown_relation"
WEIGHT_NOT_A_NUMBER = "weight_not_a_number"
WEIGHT_NOT_FINITE = "weight_not_finite"
WEIGHT_NEGATIVE = "weight_negative"
NEWLINE_IN_NAME = "newline_in_name"
ENTITY_TYPE_CONFLICT = "entity_type_conflict"
REASONS = (COLUMN_COUNT, EMPTY_FIELD, UNKNOWN_RELATION, WEIGHT_NOT_A_NUMBER,
           WEIGHT_NOT_FINITE, WEIGHT_NEGATIVE, NEWLINE_IN_NAME, ENTITY_TYPE_CONFLICT)
_CODE = {reason: i + 1 for i, reason in enumerate(REASONS)}

# What Arrow's string -> float64 cast accepts, as an RE2 pattern. Used only on
# blocks where the cast failed, to find the offending values without Python.
_NUMBER_PATTERN = (r"^[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
                   r"|(?i:inf|infinity|nan))$")

_SUFFIX_FORMATS = {".tsv": "tsv", ".txt": "tsv", ".dat": "tsv", ".csv": "csv",
                   ".parquet": "parquet"}
_NAME_ROLES = ("source", "target")
# Not a key of manifest["skipped"]: undecodable text always fails the import.
INVALID_UTF8 = "invalid_utf8"


class GraphImportError(ValueError):
  """Unusable input. The message starts with ``path:line:`` (or ``path:``
  when no single line is at fault, e.g. a missing file)."""

  def __init__(self, path: str, line: int | None, message: str,
               reason: str | None = None):
    self.path = path
    self.line = line
    self.reason = reason
    where = path if line is None else f"{path}:{line}"
    super().__init__(f"{where}: {message}")


class SkippedLinesWarning(UserWarning):
  """Emitted once per import when ``on_error="skip"`` dropped lines."""


# ----------------------------------------------------------------------------
# Schema and sources


class _Schema:
  """The parts of the config the importer needs, as arrays indexed by relation."""

  def __init__(self, config):
    self.types = list(config.entities.keys())
    self.type_index = {name: i for i, name in enumerate(self.types)}
    self.num_partitions = [int(config.entities[t].num_partitions) for t in self.types]
    self.relations = [dict(rel) for rel in config.relations]
    if not self.relations:
      raise ValueError("config.relations: no relations declared")
    self.relation_index = {rel["name"]: i for i, rel in enumerate(self.relations)}
    for rel in self.relations:
      for side in ("source", "target"):
        if rel[side] not in self.type_index:
          raise ValueError(f"config.relations: {rel['name']!r} has unknown {side} "
                           f"type {rel[side]!r}")
    self.source_type = np.array([self.type_index[r["source"]] for r in self.relations], np.int64)
    self.target_type = np.array([self.type_index[r["target"]] for r in self.relations], np.int64)
    # Same semantics as graph.Graph.bucket_grid.
    self.grid = (max(self.num_partitions[t] for t in self.source_type),
                 max(self.num_partitions[t] for t in self.target_type))


@dataclasses.dataclass(frozen=True)
class _Source:
  """One entry of ``data.files``, checked, with its path resolved."""
  spec: dict          # as written in the config (kept in the manifest)
  path: str           # resolved: $TWHIN_DATA_DIR and ~ expanded
  format: str
  header: bool
  split: str
  columns: dict       # role -> column ref (int index or str name), roles:
                      # source, target, and optionally relation, weight
  relation_name: str | None

  @property
  def compressed(self) -> bool:
    return self.path.lower().endswith(".gz")


def _format_from_suffix(path: str) -> str | None:
  name = path.lower()
  if name.endswith(".gz"):
    name = name[:-3]
  return _SUFFIX_FORMATS.get(os.path.splitext(name)[1])


def _resolve_source(spec, schema: _Schema) -> _Source:
  """Checks one file spec against the schema; missing files are errors here,
  before any work starts."""
  spec = dict(spec)
  unknown = set(spec) - set(config_lib.FILE_SPEC_FIELDS)
  raw_path = spec.get("path")
  if not raw_path:
    raise ValueError(f"data.files entry {spec}: missing path")
  if unknown:
    raise ValueError(f"{raw_path}: unknown file spec keys {sorted(unknown)}")
  try:
    path = config_lib.resolve_path(raw_path)
  except FileNotFoundError as error:  # $TWHIN_DATA_DIR is not set
    message = str(error).removeprefix(f"{raw_path}: ")
    raise GraphImportError(raw_path, None, message) from None
  if not os.path.isfile(path):
    raise GraphImportError(path, None, "no such file")
  fmt = spec.get("format") or _format_from_suffix(path)
  if fmt is None:
    raise GraphImportError(path, None, "cannot tell the format from the file name; "
                           f"set format to one of {config_lib.FILE_FORMATS}")
  if fmt not in config_lib.FILE_FORMATS:
    raise GraphImportError(path, None, f"format {fmt!r} not in {config_lib.FILE_FORMATS}")
  if fmt == "parquet" and path.endswith(".gz"):
    raise GraphImportError(path, None, "Parquet files are compressed internally; "
                           "a gzipped Parquet file is not supported")
  split = spec.get("split") or "train"
  if split not in SPLIT_CODES:
    raise GraphImportError(path, None, f"split {split!r} not in {config_lib.SPLITS}")
  columns = {"source": spec.get("source", 0), "target": spec.get("target", 2)}
  for role in ("relation", "weight"):
    if spec.get(role) is not None:
      columns[role] = spec[role]
  for role, ref in columns.items():
    if not isinstance(ref, (int, str)) or isinstance(ref, bool):
      raise GraphImportError(path, None, f"{role} column must be an index or a name, got {ref!r}")
  relation_name = spec.get("relation_name")
  if "relation" not in columns:
    if not relation_name:
      raise GraphImportError(path, None, "needs a relation column or a relation_name")
    if relation_name not in schema.relation_index:
      raise GraphImportError(path, None, f"relation_name {relation_name!r} is not a "
                             f"declared relation ({sorted(schema.relation_index)})")
  elif relation_name and "{}" not in relation_name:
    raise GraphImportError(path, None, "with a relation column, relation_name must be a "
                           f"format string such as 'rated_{{}}', got {relation_name!r}")
  return _Source(spec=spec, path=path, format=fmt, header=bool(spec.get("header")),
                 split=split, columns=columns, relation_name=relation_name)


# ----------------------------------------------------------------------------
# Readers: files -> blocks of string columns


@dataclasses.dataclass
class _Block:
  """Rows ``first_row .. first_row + num_rows`` of a file (counting only the
  rows the reader emitted: no header, blank or malformed lines), with the
  columns of each role. Name and relation columns are Arrow strings (nulls
  possible for Parquet); the weight column is strings or numbers."""
  first_row: int
  num_rows: int
  columns: dict


class _ByteTap(io.RawIOBase):
  """A file wrapper that hashes and counts the bytes pyarrow pulls through it,
  so the sha256 in the manifest and the progress bar cost no extra read."""

  def __init__(self, raw, on_bytes: Callable[[int], None]):
    super().__init__()
    self._raw = raw
    self._on_bytes = on_bytes
    self.sha256 = hashlib.sha256()

  def readable(self) -> bool:
    return True

  def readinto(self, buffer) -> int:
    n = self._raw.readinto(buffer)
    if n:
      self.sha256.update(memoryview(buffer)[:n])
      self._on_bytes(n)
    return n

  def drain(self) -> None:
    """Reads (and hashes) whatever the parser left unread, e.g. a gzip trailer."""
    while self.read(1 << 20):
      pass


def _physical_lines(binary_file, chunk_bytes: int = 1 << 20) -> Iterator[bytes]:
  """Lines without terminators, split where pyarrow splits them: at \\n,
  \\r\\n and a lone \\r (so CRLF files count like LF files)."""
  pending = b""
  while True:
    data = binary_file.read(chunk_bytes)
    if not data:
      break
    lines = (pending + data).splitlines(keepends=True)
    # The last piece may be incomplete, or a \r whose \n is in the next chunk.
    pending = b"" if lines[-1].endswith(b"\n") else lines.pop()
    for line in lines:
      yield line.rstrip(b"\r\n")
  if pending:
    yield pending.rstrip(b"\r\n")


class _TextReader:
  """Delimited text (TSV/CSV, optionally gzipped) read with pyarrow's
  streaming CSV reader.

  Every line must have the file's column count, learnt as the most common
  count among the first lines; other lines are "malformed" and reach
  :meth:`_on_invalid_row`. Blank lines are ignored.
  """

  def __init__(self, source: _Source, delimiter: str, skip_errors: bool):
    self.source = source
    self.skip_errors = skip_errors
    self.path = source.path
    self.delimiter = delimiter or ("," if source.format == "csv" else "\t")
    if len(self.delimiter) != 1:
      raise GraphImportError(self.path, None, f"delimiter must be one character, "
                             f"got {self.delimiter!r}")
    self.invalid_rows = 0  # malformed lines seen by pyarrow so far
    self.num_columns, first_line, header_names = self._inspect()
    self.column_index = {role: self._column_index(role, ref, first_line, header_names)
                         for role, ref in source.columns.items()}

  def _open_binary(self):
    return gzip.open(self.path, "rb") if self.source.compressed else open(self.path, "rb")

  def _split(self, line: bytes) -> list[str]:
    text = line.decode("utf-8", "surrogateescape")
    if self.source.format == "csv":
      return next(csv.reader([text], delimiter=self.delimiter, quotechar='"'))
    return text.split(self.delimiter)

  def _inspect(self) -> tuple[int | None, int | None, list[str] | None]:
    """(column count, line number of the first data line, header names)."""
    counts = collections.Counter()
    first_line = None
    header_names = None
    with self._open_binary() as f:
      for line_no, line in enumerate(_physical_lines(f), start=1):
        if line_no == 1 and self.source.header:
          header_names = self._split(line.removeprefix(b"\xef\xbb\xbf"))  # a UTF-8 BOM
          continue
        if not line:
          continue
        first_line = first_line or line_no
        counts[len(self._split(line))] += 1
        if sum(counts.values()) >= COLUMN_COUNT_SAMPLE_LINES:
          break
    if not counts:
      return None, None, header_names
    return counts.most_common(1)[0][0], first_line, header_names

  def _column_index(self, role, ref, first_line, header_names) -> int:
    if isinstance(ref, str):
      if not header_names or ref not in header_names:
        raise GraphImportError(self.path, 1, f"{role} column {ref!r} is not in the "
                               f"header {header_names}")
      return header_names.index(ref)
    if self.num_columns is not None and not 0 <= ref < self.num_columns:
      raise GraphImportError(self.path, first_line, f"{role} is column {ref}, but "
                             f"lines have {self.num_columns} columns")
    return ref

  def _on_invalid_row(self, row) -> str:
    self.invalid_rows += 1
    return "skip"

  def blocks(self, tap: _ByteTap) -> Iterator[_Block]:
    if self.num_columns is None:  # no data lines at all
      return
    names = [f"c{i}" for i in range(self.num_columns)]
    included = sorted({f"c{i}" for i in self.column_index.values()})
    stream = pa.PythonFile(tap, mode="r")
    if self.source.compressed:
      stream = pa.CompressedInputStream(stream, "gzip")
    csv_quoting = self.source.format == "csv"
    options = dict(
        read_options=pacsv.ReadOptions(column_names=names, block_size=TEXT_BLOCK_BYTES,
                                       skip_rows=1 if self.source.header else 0),
        parse_options=pacsv.ParseOptions(delimiter=self.delimiter,
                                         quote_char='"' if csv_quoting else False,
                                         double_quote=csv_quoting, escape_char=False,
                                         newlines_in_values=False, ignore_empty_lines=True,
                                         invalid_row_handler=self._on_invalid_row),
        convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in included},
                                             include_columns=included,
                                             strings_can_be_null=False,
                                             quoted_strings_can_be_null=False))
    try:
      reader = pacsv.open_csv(stream, **options)
      first_row = 0
      for batch in reader:
        columns = {role: batch.column(f"c{i}") for role, i in self.column_index.items()}
        yield _Block(first_row, batch.num_rows, columns)
        first_row += batch.num_rows
    except pa.ArrowInvalid as error:
      raise self._parse_failure(error) from None

  def _parse_failure(self, error: Exception) -> GraphImportError:
    """pyarrow gave up on a block (invalid UTF-8, an over-long line): find the
    line in Python. Malformed lines are not the cause here (pyarrow skips
    them), so only undecodable fields are looked for, unless malformed
    lines are errors themselves."""
    found = self.locate(None, column_count_is_error=not self.skip_errors)
    if found is not None:
      return GraphImportError(self.path, found[0], found[2], found[1])
    return GraphImportError(self.path, None, f"cannot parse: {error}")

  def locate(self, row: int | None, column_count_is_error: bool = True
             ) -> tuple[int, str | None, str | None] | None:
    """Re-scans the file for the first bad line, stopping at emitted row
    ``row`` (a 0-based row index as in :class:`_Block`) if it comes first.

    Returns (line, reason, message) for a line pyarrow never emitted (wrong
    column count, undecodable text), (line, None, None) when the scan reached
    ``row``, or None. Slow (Python per line), only runs when reporting errors.
    Undecodable text is not a skippable reason: pyarrow fails the whole
    block, so it is an error even with on_error="skip".
    """
    needed = sorted(set(self.column_index.values()))
    emitted = 0
    with self._open_binary() as f:
      for line_no, line in enumerate(_physical_lines(f), start=1):
        if (line_no == 1 and self.source.header) or not line:
          continue
        fields = self._split(line)
        if len(fields) != self.num_columns:
          if column_count_is_error:
            return (line_no, COLUMN_COUNT,
                    f"expected {self.num_columns} columns, found {len(fields)}")
          continue
        for i in needed:
          try:
            fields[i].encode("utf-8")
          except UnicodeEncodeError:
            return line_no, INVALID_UTF8, f"column {i} is not valid UTF-8 text"
        if emitted == row:
          return line_no, None, None
        emitted += 1
    return None


class _ParquetReader:
  """Parquet read in record batches; a row's "line" is its 1-based row number."""

  def __init__(self, source: _Source):
    self.source = source
    self.path = source.path
    self.invalid_rows = 0  # Parquet rows always have every column
    try:
      self._file = pq.ParquetFile(self.path)
    except (pa.ArrowInvalid, OSError) as error:
      raise GraphImportError(self.path, None, f"not a readable Parquet file: {error}") from None
    names = self._file.schema_arrow.names
    self.column_name = {}
    for role, ref in source.columns.items():
      if isinstance(ref, int):
        if not 0 <= ref < len(names):
          raise GraphImportError(self.path, None, f"{role} is column {ref}, but the file "
                                 f"has {len(names)} columns {names}")
        ref = names[ref]
      elif ref not in names:
        raise GraphImportError(self.path, None, f"{role} column {ref!r} not in {names}")
      self.column_name[role] = ref

  def blocks(self, on_bytes: Callable[[int], None]) -> Iterator[_Block]:
    total_rows = max(1, self._file.metadata.num_rows)
    size = os.path.getsize(self.path)
    reported = 0
    first_row = 0
    wanted = sorted(set(self.column_name.values()))
    for batch in self._file.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=wanted):
      columns = {}
      for role, name in self.column_name.items():
        column = batch.column(name)
        if role != "weight" and not pa.types.is_string(column.type):
          column = pc.cast(column, pa.string())
        columns[role] = column
      yield _Block(first_row, batch.num_rows, columns)
      first_row += batch.num_rows
      done = size * first_row // total_rows
      on_bytes(done - reported)
      reported = done

  def locate(self, row: int | None, column_count_is_error: bool = True):
    return None if row is None else (row + 1, None, None)


def _hash_file(path: str) -> str:
  sha = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      sha.update(chunk)
  return sha.hexdigest()


# ----------------------------------------------------------------------------
# Pass 1: blocks -> validated arrival-id edges


def _numpy(array: pa.Array) -> np.ndarray:
  return array.to_numpy(zero_copy_only=False)


def _is_empty(column: pa.Array) -> np.ndarray:
  if pa.types.is_string(column.type):
    empty = pc.equal(pc.binary_length(column), 0)
  else:
    empty = pc.is_null(column)
  return _numpy(pc.fill_null(empty, True))


def _parse_weights(column: pa.Array) -> tuple[np.ndarray, np.ndarray]:
  """(weights as float64, reason codes): 0, or why the value is unusable."""
  if pa.types.is_string(column.type):
    try:
      values = _numpy(pc.fill_null(pc.cast(column, pa.float64()), math.nan))
      numeric = np.ones(len(column), bool)
    except pa.ArrowInvalid:
      # Slow path, only for blocks holding a bad value: find the numbers first.
      numeric = _numpy(pc.fill_null(pc.match_substring_regex(column, _NUMBER_PATTERN), False))
      values = np.full(len(column), math.nan)
      values[numeric] = _numpy(pc.cast(column.filter(pa.array(numeric)), pa.float64()))
  else:
    values = _numpy(pc.fill_null(pc.cast(column, pa.float64()), math.nan))
    numeric = ~_numpy(pc.is_null(column))
  reasons = np.zeros(len(column), np.int8)
  with np.errstate(invalid="ignore"):
    reasons[values < 0] = _CODE[WEIGHT_NEGATIVE]
  reasons[numeric & ~np.isfinite(values)] = _CODE[WEIGHT_NOT_FINITE]
  reasons[~numeric] = _CODE[WEIGHT_NOT_A_NUMBER]
  return values, reasons


def _flag(reasons: np.ndarray, bad: np.ndarray, reason: str) -> None:
  """Records ``reason`` for bad rows that have no reason yet (first one wins)."""
  reasons[bad & (reasons == 0)] = _CODE[reason]


class _Vocabulary:
  """The names of one entity type, numbered by first appearance (arrival ids).

  A dict does the lookups (only a block's distinct names reach it); the
  names are also kept as Arrow arrays in arrival order, so pass 2 can write
  the vocabulary file without going through Python strings again.
  """

  def __init__(self):
    self._ids: dict[str, int] = {}
    self._chunks: list[pa.Array] = []

  def __len__(self) -> int:
    return len(self._ids)

  def lookup(self, names: list[str]) -> np.ndarray:
    """Arrival ids of ``names``; -1 for names not seen yet."""
    return np.fromiter(map(self._ids.get, names, itertools.repeat(-1)), np.int64, len(names))

  def add(self, names: pa.Array, names_list: list[str], ids: np.ndarray) -> np.ndarray:
    """Numbers the names whose ``ids`` (from :meth:`lookup`) are -1, in
    place, and returns ``ids``. ``names`` must be distinct."""
    new = np.flatnonzero(ids < 0)
    if len(new):
      start = len(self._ids)
      ids[new] = np.arange(start, start + len(new))
      self._ids.update(zip([names_list[i] for i in new.tolist()], range(start, start + len(new))))
      self._chunks.append(names.take(pa.array(new)))
    return ids

  def names_by_arrival(self) -> pa.Array:
    if not self._chunks:
      return pa.array([], pa.large_string())
    return pa.concat_arrays([chunk.cast(pa.large_string()) for chunk in self._chunks])


@dataclasses.dataclass
class _TypeGroup:
  """The names of one entity type in a block, both sides pooled (a KG's
  heads and tails share one dictionary lookup).

  ``sides`` lists (role, block rows) in pooled order; rows is None when the
  side covers every row of the block (the common case, no indexing needed).
  """
  sides: list
  names: pa.Array          # distinct names
  names_list: list         # the same, as Python strings
  codes: np.ndarray        # per pooled occurrence: index into names
  ids: np.ndarray          # per distinct name: arrival id, -1 if new

  def occurrence_rows(self, num_rows: int) -> np.ndarray:
    return np.concatenate([np.arange(num_rows) if rows is None else rows
                           for _, rows in self.sides])


class _EdgeSpool:
  """Pass-1 output: edges as arrival ids in flat binary files, one per column,
  appended block by block and read back in chunks by pass 2."""

  COLUMNS = (("src", np.int64), ("dst", np.int64), ("rel", np.int32),
             ("split", np.int8), ("weight", np.float32))

  def __init__(self, directory: str, weighted: bool):
    os.makedirs(directory, exist_ok=True)
    self.columns = [(n, d) for n, d in self.COLUMNS if weighted or n != "weight"]
    self.paths = {name: os.path.join(directory, f"{name}.bin") for name, _ in self.columns}
    self._files = {name: open(path, "wb") for name, path in self.paths.items()}
    self.num_edges = 0

  def append(self, **arrays: np.ndarray) -> None:
    for name, dtype in self.columns:
      np.ascontiguousarray(arrays[name], dtype).tofile(self._files[name])
    self.num_edges += len(arrays["src"])

  def close(self) -> None:
    for f in self._files.values():
      f.close()

  def chunks(self, chunk_edges: int) -> Iterator[dict[str, np.ndarray]]:
    files = {name: open(self.paths[name], "rb") for name, _ in self.columns}
    try:
      for _ in range(0, self.num_edges, chunk_edges):
        yield {name: np.fromfile(files[name], dtype, count=chunk_edges)
               for name, dtype in self.columns}
    finally:
      for f in files.values():
        f.close()


class _Reader:
  """Pass 1: validates blocks, assigns arrival ids, spools edges."""

  def __init__(self, schema: _Schema, spool: _EdgeSpool, *, names_global: bool,
               skip_errors: bool, weighted: bool, holdout: tuple[float, float], seed: int):
    self.schema = schema
    self.spool = spool
    self.skip_errors = skip_errors
    self.weighted = weighted
    self.vocab = [_Vocabulary() for _ in schema.types]
    self.check_type_conflicts = names_global and len(schema.types) > 1
    self.skipped = collections.Counter()
    self.valid_fraction, self.test_fraction = holdout
    self._holdout_rng = np.random.default_rng([seed, _HOLDOUT_STREAM])

  def read_file(self, source: _Source, reader, blocks: Iterator[_Block]) -> None:
    fixed_relation = (None if "relation" in source.columns
                      else self.schema.relation_index[source.relation_name])
    for block in blocks:
      self._read_block(source, reader, block, fixed_relation)
    if reader.invalid_rows:
      if not self.skip_errors:  # no bad row before it, or we would have raised
        found = reader.locate(None)
        raise GraphImportError(source.path, found[0] if found else None,
                               found[2] if found else "malformed line", COLUMN_COUNT)
      self.skipped[COLUMN_COUNT] += reader.invalid_rows

  def _read_block(self, source: _Source, reader, block: _Block, fixed_relation) -> None:
    columns = block.columns
    reasons = self._check_fields(source, columns, block.num_rows)
    rel, relation_names = self._relation_indices(source, columns, fixed_relation, reasons)
    weight = None
    if "weight" in columns:
      weight, weight_reasons = _parse_weights(columns["weight"])
      unflagged = reasons == 0
      reasons[unflagged] = weight_reasons[unflagged]
    groups, conflict_note = self._resolve_names(columns, reasons, rel)

    # Malformed lines (reader.invalid_rows) are not raised here: pyarrow
    # parses ahead, so the one it just reported may lie after a bad row of
    # the next block. read_file raises for them at the end of the file.
    bad = np.flatnonzero(reasons)
    if len(bad):
      if not self.skip_errors:
        raise self._error(source, reader, block, bad, reasons, relation_names, conflict_note)
      self.skipped.update({REASONS[code - 1]: int(count)
                           for code, count in enumerate(np.bincount(reasons[bad])) if count})

    ids = self._assign_ids(groups, block.num_rows)
    keep = None if not len(bad) else reasons == 0
    def kept(values: np.ndarray) -> np.ndarray:
      return values if keep is None else values[keep]
    num_kept = block.num_rows - len(bad)
    edges = dict(src=kept(ids["source"]), dst=kept(ids["target"]), rel=kept(rel),
                 split=self._split_codes(source, num_kept))
    if self.weighted:
      edges["weight"] = kept(weight) if weight is not None else np.ones(num_kept, np.float32)
    self.spool.append(**edges)

  def _check_fields(self, source: _Source, columns: dict, num_rows: int) -> np.ndarray:
    """Reason codes per row (0: fine) for problems visible in one field."""
    reasons = np.zeros(num_rows, np.int8)
    for column in columns.values():
      _flag(reasons, _is_empty(column), EMPTY_FIELD)
    if source.format == "parquet":  # text lines cannot hold a line break
      for role in _NAME_ROLES:
        newline = pc.match_substring_regex(columns[role], r"[\r\n]")
        _flag(reasons, _numpy(pc.fill_null(newline, False)), NEWLINE_IN_NAME)
    return reasons

  def _relation_indices(self, source: _Source, columns: dict, fixed_relation: int | None,
                        reasons: np.ndarray) -> tuple[np.ndarray, tuple | None]:
    """Relation index per row (config order), flagging unknown names.
    Also returns (names, codes) of the relation column, for error messages."""
    if fixed_relation is not None:
      return np.full(len(reasons), fixed_relation, np.int32), None
    encoded = pc.dictionary_encode(pc.fill_null(columns["relation"], ""))
    names = [source.relation_name.format(v) if source.relation_name else v
             for v in encoded.dictionary.to_pylist()]
    index = np.array([self.schema.relation_index.get(name, -1) for name in names], np.int32)
    codes = _numpy(encoded.indices)
    rel = index[codes]
    _flag(reasons, rel < 0, UNKNOWN_RELATION)
    rel[rel < 0] = 0  # keeps type lookups in range; these rows are dropped
    return rel, (names, codes)

  def _resolve_names(self, columns: dict, reasons: np.ndarray, rel: np.ndarray
                     ) -> tuple[dict[int, "_TypeGroup"], tuple[int, str] | None]:
    """Groups the names of the valid rows by entity type, and with
    names_global flags rows whose names clash with another type."""
    source_type = self.schema.source_type[rel]
    target_type = self.schema.target_type[rel]
    conflict_note = None
    while True:
      groups = self._group_names(columns, reasons, source_type, target_type)
      if not self.check_type_conflicts:
        return groups, None
      conflicts, note = self._find_type_conflicts(groups, len(reasons))
      if not conflicts.any():
        return groups, conflict_note
      conflict_note = note
      _flag(reasons, conflicts, ENTITY_TYPE_CONFLICT)
      if not self.skip_errors:
        return groups, conflict_note
      # Group again without the dropped rows, so that their names stay out
      # of the vocabularies.

  def _assign_ids(self, groups: dict[int, "_TypeGroup"], num_rows: int) -> dict[str, np.ndarray]:
    """Arrival ids per row for both roles (rows dropped as bad: undefined)."""
    ids = {role: np.empty(num_rows, np.int64) for role in _NAME_ROLES}
    for type_index, group in groups.items():
      arrival = self.vocab[type_index].add(group.names, group.names_list, group.ids)[group.codes]
      start = 0
      for role, rows in group.sides:
        count = num_rows if rows is None else len(rows)
        if rows is None:
          ids[role] = arrival[start:start + count]
        else:
          ids[role][rows] = arrival[start:start + count]
        start += count
    return ids

  def _split_codes(self, source: _Source, num_edges: int) -> np.ndarray:
    """The split of each edge: the file's, or for train files with holdout
    fractions a seeded draw (a Bernoulli draw per edge: streaming, so the
    shares are exact only in expectation)."""
    split = np.full(num_edges, SPLIT_CODES[source.split], np.int8)
    if source.split == "train" and (self.valid_fraction or self.test_fraction):
      draw = self._holdout_rng.random(num_edges)
      split[draw < self.valid_fraction + self.test_fraction] = SPLIT_CODES["test"]
      split[draw < self.valid_fraction] = SPLIT_CODES["valid"]
    return split

  def _group_names(self, columns, reasons, source_type, target_type) -> dict[int, _TypeGroup]:
    """Pools the names of every type over the rows still valid and
    dictionary-encodes them, so each distinct name is looked up once."""
    ok = reasons == 0
    every_row = len(self.schema.types) == 1 and bool(ok.all())
    groups = {}
    for type_index, vocab in enumerate(self.vocab):
      sides, pieces = [], []
      for role, side_type in (("source", source_type), ("target", target_type)):
        if every_row:
          rows, piece = None, columns[role]
        else:
          rows = np.flatnonzero(ok & (side_type == type_index))
          if not len(rows):
            continue
          piece = columns[role].take(pa.array(rows))
        sides.append((role, rows))
        pieces.append(piece)
      if not sides:
        continue
      encoded = pc.dictionary_encode(pa.concat_arrays(pieces) if len(pieces) > 1 else pieces[0])
      names_list = encoded.dictionary.to_pylist()
      groups[type_index] = _TypeGroup(sides=sides, names=encoded.dictionary,
                                      names_list=names_list,
                                      codes=_numpy(encoded.indices),
                                      ids=vocab.lookup(names_list))
    return groups

  def _find_type_conflicts(self, groups: dict[int, _TypeGroup], num_rows: int
                           ) -> tuple[np.ndarray, tuple[int, str] | None]:
    """Rows where a name shows up under a second entity type (names_global).

    A name already in another type's vocabulary conflicts wherever it shows
    up under a new type; a name new to several types in this block belongs
    to the type of its earliest row. Returns the conflicting rows, and
    (row, message) for the earliest one. Only names new to a type are
    examined, with C-speed dict and set operations: free when clean.

    With on_error="skip", every conflicting row is dropped at once, judged
    against the rows that had no other problem: a row that claimed a name
    first still wins that name even if it is dropped for a conflict over
    another of its names (resolving that exactly would take one pass per
    conflict).
    """
    new = {}  # type -> (codes of the names new to it, those names)
    for type_index, group in groups.items():
      codes = np.flatnonzero(group.ids < 0)
      if len(codes):
        new[type_index] = (codes, [group.names_list[c] for c in codes.tolist()])
    losers = {type_index: {} for type_index in new}  # type -> {code: owner type}
    # Names that another type already has.
    for type_index, (codes, names) in new.items():
      for owner, vocab in enumerate(self.vocab):
        if owner != type_index and len(vocab):
          for i in np.flatnonzero(vocab.lookup(names) >= 0).tolist():
            losers[type_index].setdefault(int(codes[i]), owner)
    # Names new to several types at once: the type of the earliest row wins.
    first_rows = {}
    def first_row(type_index: int) -> np.ndarray:
      if type_index not in first_rows:
        group = groups[type_index]
        first = np.full(len(group.names_list), num_rows, np.int64)
        np.minimum.at(first, group.codes, group.occurrence_rows(num_rows))
        first_rows[type_index] = first
      return first_rows[type_index]
    new_sets = {t: set(names) for t, (_, names) in new.items()}
    shared = set()
    for a, b in itertools.combinations(new_sets.values(), 2):
      shared |= a & b
    shared -= {groups[t].names_list[c] for t, lost in losers.items() for c in lost}
    if shared:
      code_of = {t: {n: int(c) for c, n in zip(*new[t]) if n in shared} for t in new}
      for name in shared:
        claims = sorted((int(first_row(t)[code_of[t][name]]), t)
                        for t in new if name in code_of[t])
        for _, type_index in claims[1:]:
          losers[type_index][code_of[type_index][name]] = claims[0][1]

    conflicts = np.zeros(num_rows, bool)
    earliest = None
    types = self.schema.types
    for type_index, lost in losers.items():
      if not lost:
        continue
      group = groups[type_index]
      lost_codes = np.zeros(len(group.names_list), bool)
      lost_codes[list(lost)] = True
      conflicts[group.occurrence_rows(num_rows)[lost_codes[group.codes]]] = True
      for code, owner in lost.items():
        row = int(first_row(type_index)[code])
        if earliest is None or row < earliest[0]:
          earliest = (row, f"{group.names_list[code]!r} is used as entity type "
                      f"{types[type_index]!r} here but is already of type {types[owner]!r} "
                      "(data.names_global: a name has one entity type)")
    return conflicts, earliest

  def _error(self, source, reader, block, bad, reasons, relation_names,
             conflict_note) -> GraphImportError:
    """The error for the first bad line of the file, with its line number."""
    row = int(bad[0])
    found = reader.locate(block.first_row + row)
    if found is not None and found[2] is not None:  # an earlier malformed line
      return GraphImportError(source.path, found[0], found[2], found[1])
    line = found[0] if found is not None else None  # None: the scan disagreed
    reason = REASONS[reasons[row] - 1]
    columns = block.columns
    if reason == EMPTY_FIELD:
      role = next(r for r in columns if _is_empty(columns[r].slice(row, 1))[0])
      message = f"empty {role} field"
    elif reason == NEWLINE_IN_NAME:
      message = "entity name contains a line break"
    elif reason == UNKNOWN_RELATION:
      names, codes = relation_names
      message = (f"unknown relation {names[codes[row]]!r} (declared: "
                 f"{_preview(list(self.schema.relation_index))})")
    elif reason in (WEIGHT_NOT_A_NUMBER, WEIGHT_NOT_FINITE, WEIGHT_NEGATIVE):
      value = columns["weight"][row].as_py()
      problem = {WEIGHT_NOT_A_NUMBER: "is not a number", WEIGHT_NOT_FINITE: "is not finite",
                 WEIGHT_NEGATIVE: "is negative"}[reason]
      message = f"weight {value!r} {problem}"
    else:
      message = conflict_note[1]
    return GraphImportError(source.path, line, message, reason)


def _preview(names: list[str], limit: int = 8) -> str:
  shown = ", ".join(repr(n) for n in names[:limit])
  return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


# ----------------------------------------------------------------------------
# Pass 2: arrival ids -> shuffled local ids -> bucket files


class _NpyAppender:
  """A 1-D ``.npy`` file written in pieces.

  The header is reserved first and rewritten with the final length on
  :meth:`close`; numpy pads 1-D headers to a fixed size (room for 21 digits),
  so the rewrite never moves the data. This lets pass 2 stream edges straight
  into their final files without knowing bucket sizes in advance.
  """

  def __init__(self, path: str, dtype):
    self.path = path
    self.dtype = np.dtype(dtype)
    self.count = 0
    os.makedirs(os.path.dirname(path), exist_ok=True)
    header = self._header(0)
    self._header_size = len(header)
    with open(path, "wb") as f:
      f.write(header)

  def _header(self, length: int) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {
        "descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
        "shape": (length,)})
    return buffer.getvalue()

  def append(self, values: np.ndarray) -> None:
    with open(self.path, "ab") as f:
      np.ascontiguousarray(values, self.dtype).tofile(f)
    self.count += len(values)

  def close(self) -> None:
    header = self._header(self.count)
    if len(header) != self._header_size:
      raise RuntimeError(f"{self.path}: npy header size changed")  # > 10**21 rows
    with open(self.path, "r+b") as f:
      f.write(header)


class _Bucketer:
  """Pass 2: remaps spooled edges to shuffled local ids and writes buckets,
  eval splits and train degrees."""

  def __init__(self, schema: _Schema, counts: list[int], seed: int, graph_dir: str,
               weighted: bool):
    self.schema = schema
    self.graph_dir = graph_dir
    self.weighted = weighted
    self.counts = counts
    # perm[type][arrival id] = local id.
    self.permutations = [
        np.random.default_rng([seed, _PERMUTATION_STREAM, zlib.crc32(t.encode())]).permutation(n)
        for t, n in zip(schema.types, counts)]
    sizes = [graph_lib.EntityInfo(t, n, p).partition_size
             for t, n, p in zip(schema.types, counts, schema.num_partitions)]
    # Per relation: partition size of its source / target type.
    self.source_size = np.array(sizes, np.int64)[schema.source_type]
    self.target_size = np.array(sizes, np.int64)[schema.target_type]
    self.degrees = [np.zeros(n, np.int64) for n in counts]
    num_relations = len(schema.relations)
    self.relation_counts = {split: np.zeros(num_relations, np.int64) for split in SPLIT_CODES}
    lhs, rhs = schema.grid
    self.bucket_sizes = np.zeros(lhs * rhs, np.int64)
    self._files: dict[str, _NpyAppender] = {}

  def _append(self, relpath: str, dtype, values: np.ndarray) -> None:
    if relpath not in self._files:
      self._files[relpath] = _NpyAppender(os.path.join(self.graph_dir, relpath), dtype)
    self._files[relpath].append(values)

  def _to_local(self, arrival: np.ndarray, edge_types: np.ndarray) -> np.ndarray:
    if len(self.permutations) == 1:
      return self.permutations[0][arrival]
    local = np.empty_like(arrival)
    for type_index, perm in enumerate(self.permutations):
      mask = edge_types == type_index
      if mask.any():
        local[mask] = perm[arrival[mask]]
    return local

  def add(self, chunk: dict[str, np.ndarray]) -> None:
    rel = chunk["rel"]
    src = self._to_local(chunk["src"], self.schema.source_type[rel])
    dst = self._to_local(chunk["dst"], self.schema.target_type[rel])
    split = chunk["split"]
    for name, code in SPLIT_CODES.items():
      in_split = split == code
      if name != "train" and in_split.any():
        for key, values in (("src", src), ("dst", dst), ("rel", rel)):
          self._append(f"splits/{name}/{key}.npy", np.int64, values[in_split])
      self.relation_counts[name] += np.bincount(rel[in_split],
                                                minlength=len(self.schema.relations))
    train = split == SPLIT_CODES["train"]
    if not train.all():
      src, dst, rel = src[train], dst[train], rel[train]
    weight = chunk["weight"][train] if self.weighted else None
    if not len(src):
      return
    self._count_degrees(src, dst, rel)
    self._write_buckets(src, dst, rel, weight)

  def _count_degrees(self, src, dst, rel) -> None:
    for type_index, count in enumerate(self.counts):
      for ids, types in ((src, self.schema.source_type), (dst, self.schema.target_type)):
        if len(self.counts) > 1:
          ids = ids[types[rel] == type_index]
        self.degrees[type_index] += np.bincount(ids, minlength=count)

  def _write_buckets(self, src, dst, rel, weight) -> None:
    lhs, rhs = self.schema.grid
    src_size, dst_size = self.source_size[rel], self.target_size[rel]
    src_part, dst_part = src // src_size, dst // dst_size
    src_offset, dst_offset = src - src_part * src_size, dst - dst_part * dst_size
    bucket = src_part * rhs + dst_part
    sizes = np.bincount(bucket, minlength=lhs * rhs)
    self.bucket_sizes += sizes
    if lhs * rhs > 1:
      # 16-bit keys let numpy use a radix sort; stable keeps the file order.
      key = bucket.astype(np.int16) if lhs * rhs < 2 ** 15 else bucket
      order = np.argsort(key, kind="stable")
      src_offset, dst_offset, rel = src_offset[order], dst_offset[order], rel[order]
      weight = weight[order] if weight is not None else None
    starts = np.concatenate([[0], np.cumsum(sizes)])
    for b in np.flatnonzero(sizes):
      i, j = divmod(int(b), rhs)
      piece = slice(starts[b], starts[b + 1])
      prefix = f"buckets/{i}_{j}"
      self._append(f"{prefix}/src.npy", np.int32, src_offset[piece])
      self._append(f"{prefix}/dst.npy", np.int32, dst_offset[piece])
      self._append(f"{prefix}/rel.npy", np.int32, rel[piece])
      if weight is not None:
        self._append(f"{prefix}/weight.npy", np.float32, weight[piece])

  def finish(self, vocab: list[_Vocabulary]) -> None:
    """Closes the bucket files; writes vocabularies (names in local-id
    order) and degrees."""
    for appender in self._files.values():
      appender.close()
    for directory in ("vocab", "degrees"):
      os.makedirs(os.path.join(self.graph_dir, directory), exist_ok=True)
    for type_name, names, perm, degrees in zip(self.schema.types, vocab, self.permutations,
                                               self.degrees):
      arrival_of_local = np.empty_like(perm)
      arrival_of_local[perm] = np.arange(len(perm))
      _write_lines(os.path.join(self.graph_dir, "vocab", f"{type_name}.txt"),
                   names.names_by_arrival(), arrival_of_local)
      np.save(os.path.join(self.graph_dir, "degrees", f"{type_name}.npy"), degrees)


def _write_lines(path: str, names: pa.Array, order: np.ndarray, piece: int = 1 << 20) -> None:
  """Writes ``names[order]`` one per line, straight from Arrow buffers."""
  with open(path, "wb") as f:
    for start in range(0, len(order), piece):
      lines = pc.binary_join_element_wise(  # name + "\n" + ""
          names.take(pa.array(order[start:start + piece])),
          pa.scalar("", pa.large_string()), pa.scalar("\n", pa.large_string()))
      offsets = np.frombuffer(lines.buffers()[1], np.int64, count=len(lines) + 1,
                              offset=lines.offset * 8)
      f.write(memoryview(lines.buffers()[2])[offsets[0]:offsets[-1]])


# ----------------------------------------------------------------------------
# Entry points


def _manifest_hash(manifest: dict) -> str:
  content = {k: v for k, v in manifest.items() if k not in ("hash", "created")}
  text = json.dumps(content, sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def import_graph(config, graph_dir: str, *, files: list[dict] | None = None,
                 progress: bool = True) -> graph_lib.Graph:
  """Imports edge files into a new graph directory and returns its reader.

  Args:
    config: a run config (see ``twhin_jax.config``): its entities, relations,
      ``data`` section and ``train.seed`` (entity shuffle and holdout draws).
    graph_dir: the directory to create; it must not exist yet.
    files: file specs to read instead of ``config.data.files`` (generators).
    progress: show tqdm progress bars on stderr.

  Raises:
    FileExistsError: ``graph_dir`` already exists (it is left untouched).
    GraphImportError: a missing file or, unless ``data.on_error == "skip"``,
      a bad line; the message starts with ``path:line:``.
  """
  graph_dir = os.path.normpath(graph_dir)
  if os.path.exists(graph_dir):
    raise FileExistsError(f"{graph_dir}: already exists; remove it or import elsewhere")
  schema = _Schema(config)
  specs = list(config.data.files if files is None else files)
  if not specs:
    raise ValueError("no input files: config.data.files is empty")
  sources = [_resolve_source(spec, schema) for spec in specs]
  data = config.data
  if data.on_error not in config_lib.ON_ERROR:
    raise ValueError(f"config.data.on_error: {data.on_error!r} not in {config_lib.ON_ERROR}")

  parent = os.path.dirname(os.path.abspath(graph_dir))
  os.makedirs(parent, exist_ok=True)
  work_dir = f"{graph_dir}.tmp-{os.getpid()}"
  shutil.rmtree(work_dir, ignore_errors=True)  # a crashed run with our pid
  try:
    os.makedirs(work_dir)
    manifest = _build(config, schema, sources, work_dir, progress)
    with open(os.path.join(work_dir, graph_lib.MANIFEST), "w") as f:
      json.dump(manifest, f, indent=1)
    if os.path.exists(graph_dir):
      raise FileExistsError(f"{graph_dir}: appeared while importing; not replacing it")
    os.rename(work_dir, graph_dir)
  except BaseException:
    shutil.rmtree(work_dir, ignore_errors=True)
    raise
  return graph_lib.Graph(graph_dir)


def _build(config, schema: _Schema, sources: list[_Source], work_dir: str,
           progress: bool) -> dict:
  """Both passes, into ``work_dir``; returns the manifest."""
  data = config.data
  seed = int(config.train.seed)
  weighted = any("weight" in s.columns for s in sources)
  spool = _EdgeSpool(os.path.join(work_dir, "spool"), weighted)
  reader_pass = _Reader(schema, spool, names_global=bool(data.names_global),
                        skip_errors=data.on_error == "skip", weighted=weighted,
                        holdout=(float(data.valid_fraction), float(data.test_fraction)),
                        seed=seed)
  source_records = []
  total_bytes = sum(os.path.getsize(s.path) for s in sources)
  with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="import: read",
            disable=not progress) as bar:
    for source in sources:
      if source.format == "parquet":
        reader = _ParquetReader(source)
        reader_pass.read_file(source, reader, reader.blocks(bar.update))
        digest = _hash_file(source.path)
      else:
        reader = _TextReader(source, data.delimiter, data.on_error == "skip")
        with open(source.path, "rb") as raw:
          tap = _ByteTap(raw, bar.update)
          reader_pass.read_file(source, reader, reader.blocks(tap))
          tap.drain()
        digest = tap.sha256.hexdigest()
      source_records.append(dict(path=source.spec["path"], sha256=digest,
                                 bytes=os.path.getsize(source.path), split=source.split,
                                 spec={k: source.spec.get(k) for k in config_lib.FILE_SPEC_FIELDS}))
  spool.close()

  counts = [len(v) for v in reader_pass.vocab]
  bucketer = _Bucketer(schema, counts, seed, work_dir, weighted)
  with tqdm(total=spool.num_edges, unit="edge", unit_scale=True, desc="import: bucket",
            disable=not progress) as bar:
    for chunk in spool.chunks(BUCKET_CHUNK_EDGES):
      bucketer.add(chunk)
      bar.update(len(chunk["src"]))
  bucketer.finish(reader_pass.vocab)
  shutil.rmtree(os.path.join(work_dir, "spool"))

  skipped = dict(sorted(reader_pass.skipped.items()))
  if skipped:
    warnings.warn(f"import skipped {sum(skipped.values())} bad lines: "
                  + ", ".join(f"{k} {v}" for k, v in skipped.items()),
                  SkippedLinesWarning, stacklevel=3)
  lhs, rhs = schema.grid
  names = [r["name"] for r in schema.relations]
  manifest = dict(
      format_version=graph_lib.FORMAT_VERSION,
      schema=dict(
          entities={t: dict(count=n, num_partitions=p)
                    for t, n, p in zip(schema.types, counts, schema.num_partitions)},
          relations=[dict(name=r["name"], source=r["source"], target=r["target"],
                          operator=r["operator"], weight=float(r.get("weight", 1.0)))
                     for r in schema.relations]),
      counts={split: int(c.sum()) for split, c in bucketer.relation_counts.items()},
      relation_counts={name: {split: int(c[i]) for split, c in bucketer.relation_counts.items()}
                       for i, name in enumerate(names)},
      skipped=skipped,
      sources=source_records,
      # Everything besides the sources that shapes the result, so that the
      # hash changes whenever the graph would.
      options=dict(seed=seed, valid_fraction=float(data.valid_fraction),
                   test_fraction=float(data.test_fraction),
                   names_global=bool(data.names_global), on_error=data.on_error,
                   delimiter=data.delimiter),
      bucket_sizes={f"{i}_{j}": int(bucketer.bucket_sizes[i * rhs + j])
                    for i in range(lhs) for j in range(rhs)},
      weighted=weighted,
      created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
  manifest["hash"] = _manifest_hash(manifest)
  return manifest


def summarize(graph: graph_lib.Graph) -> str:
  """A human-readable overview of an imported graph (for ``twhin import``)."""
  m = graph.manifest
  counts = m["counts"]
  lines = [f"graph {graph.path}  hash {m['hash']}  created {m.get('created', '?')}",
           f"edges: train {counts['train']:,}  valid {counts['valid']:,}  "
           f"test {counts['test']:,}" + ("  (weighted)" if graph.weighted else ""),
           "entity types:"]
  for name, info in graph.entities.items():
    unseen = int((graph.degrees(name) == 0).sum())
    lines.append(f"  {name:<16} {info.count:>12,} entities  {info.num_partitions} partition(s)"
                 f" of {info.partition_size:,}  ({unseen:,} without train edges)")
  lines.append("relations:")
  per_relation = m.get("relation_counts", {})
  for rel in graph.relations:
    c = per_relation.get(rel.name, {})
    lines.append(f"  {rel.name:<24} {rel.source} -> {rel.target}  {rel.operator}  "
                 f"train {c.get('train', 0):,}  valid {c.get('valid', 0):,}  "
                 f"test {c.get('test', 0):,}")
  sizes = graph.bucket_sizes()
  if len(sizes) > 1:
    values = np.array(list(sizes.values()))
    lines.append(f"buckets: {len(sizes)}  edges per bucket min {values.min():,} "
                 f"max {values.max():,}")
  if m.get("skipped"):
    lines.append("skipped lines: " + ", ".join(f"{k} {v:,}" for k, v in m["skipped"].items()))
  return "\n".join(lines)
