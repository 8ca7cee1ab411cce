"""The reading stage that both import engines share (``importer.py`` runs
it for DuckDB; ``import_spark.py`` reuses its readers, reason codes, errors
and manifest): file specs checked against the config's schema, readers that
turn TSV/CSV (plain or gzipped), Parquet and adjacency lists into blocks of
string columns, vectorised validation with the reasons of
``manifest["skipped"]``, the pass-1 spool of validated name edges, and the
manifest built from an engine's statistics.

Bad input is reported as :class:`GraphImportError` with a ``path:line:``
prefix (1-based physical lines of the source file, header included; for
Parquet the 1-based row number). pyarrow does not report line numbers, so on
an error the file is re-scanned in Python up to the offending row (see
:meth:`TextReader.locate`); the fast path never pays for this.
"""

from __future__ import annotations

import bisect
import collections
import csv
import dataclasses
import datetime
import gzip
import hashlib
import io
import json
import math
import os
import re
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
#: Python overhead vanishes (~100k edges a block), small enough to keep memory
#: flat: pyarrow's streaming reader holds several blocks in flight, and 32 MiB
#: blocks cost 700 MiB of RSS on a 20M-edge file where 4 MiB cost 250-320.
TEXT_BLOCK_BYTES = 4 << 20
#: Rows per record batch for Parquet inputs.
PARQUET_BATCH_ROWS = 1 << 20
#: Lines sampled at the start of a text file to learn its column count.
COLUMN_COUNT_SAMPLE_LINES = 1000

SPLIT_CODES = {"train": 0, "valid": 1, "test": 2}

# Independent random streams derived from config.train.seed.
_HOLDOUT_STREAM = 1

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
#: Errors of a damaged gzip stream, from the gzip module and from pyarrow.
_GZIP_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile)



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


def _gzip_failure(path: str, error: Exception) -> "GraphImportError":
  return GraphImportError(path, None, f"truncated or corrupt gzip file ({error}); "
                          "the download or copy was probably cut short", reason="bad_gzip")


class SkippedLinesWarning(UserWarning):
  """Emitted once per import when ``on_error="skip"`` dropped lines."""


# ----------------------------------------------------------------------------
# Schema and sources


class Schema:
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
class Source:
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


def resolve_source(spec, schema: Schema) -> Source:
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
  if fmt == "adjacency":
    if spec.get("relation") is not None or spec.get("weight") is not None:
      raise GraphImportError(path, None, "an adjacency list ('source target target ...') "
                             "holds one relation and no weights: set relation=None, "
                             "weight=None and relation_name")
    spec["source"], spec["target"] = 0, 1
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
  return Source(spec=spec, path=path, format=fmt, header=bool(spec.get("header")),
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


class TextReader:
  """Delimited text (TSV/CSV, optionally gzipped) read with pyarrow's
  streaming CSV reader.

  Every line must have the file's column count, learnt as the most common
  count among the first lines; other lines are "malformed" and reach
  :meth:`_on_invalid_row`. Blank lines are ignored.
  """

  def __init__(self, source: Source, delimiter: str, skip_errors: bool):
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
    try:
      return self._sample_lines(counts)
    except _GZIP_ERRORS as error:
      raise _gzip_failure(self.path, error) from None

  def _sample_lines(self, counts) -> tuple[int | None, int | None, list[str] | None]:
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
    except OSError as error:  # pyarrow: "Truncated compressed stream"
      if self.source.compressed:
        raise _gzip_failure(self.path, error) from None
      raise

  def _parse_failure(self, error: Exception) -> GraphImportError:
    """pyarrow gave up on a block (invalid UTF-8, an over-long line): find the
    line in Python. Malformed lines are not the cause here (pyarrow skips
    them), so only undecodable fields are looked for, unless malformed
    lines are errors themselves."""
    try:
      found = self.locate(None, column_count_is_error=not self.skip_errors)
    except _GZIP_ERRORS as gzip_error:
      return _gzip_failure(self.path, gzip_error)
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


class ParquetReader:
  """Parquet read in record batches; a row's "line" is its 1-based row number."""

  def __init__(self, source: Source):
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


def hash_file(path: str) -> str:
  sha = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      sha.update(chunk)
  return sha.hexdigest()


class AdjacencyReader:
  """Adjacency lists (format "adjacency"): one line per source entity,
  ``source target target ...`` (the user-item files of recommender
  benchmarks), all edges of one relation (the spec's relation_name).

  Fields are split at runs of whitespace (``data.delimiter`` "", the
  default; leading and trailing whitespace ignored) or at every occurrence
  of ``data.delimiter``. A line holding only a source has no edges; blank
  lines are ignored. Each emitted row is one (source, target) pair; line
  numbers are kept per block, so errors name the line of the pair.
  """

  def __init__(self, source: Source, delimiter: str, skip_errors: bool):
    self.source = source
    self.path = source.path
    self.delimiter = delimiter
    self.invalid_rows = 0  # every line parses
    self._block_lines = np.zeros(0, np.int64)

  def _open_binary(self):
    return gzip.open(self.path, "rb") if self.source.compressed else open(self.path, "rb")

  def blocks(self, tap) -> Iterator[_Block]:
    stream = gzip.GzipFile(fileobj=tap, mode="rb") if self.source.compressed else tap
    try:
      yield from self._blocks(stream)
    except _GZIP_ERRORS as error:
      raise _gzip_failure(self.path, error) from None

  def _chunks(self, stream) -> Iterator[tuple[int, bytes]]:
    """(number of lines before it, text) pieces ending at a line break."""
    pending = b""
    lines_before = 0
    while True:
      data = stream.read(TEXT_BLOCK_BYTES)
      text = pending + data
      if not data:
        if text:
          yield lines_before, text + b"\n"
        return
      cut = text.rfind(b"\n")
      if cut < 0:
        cut = text.rfind(b"\r")
      if cut < 0:
        pending = text
        continue
      piece, pending = text[:cut + 1], text[cut + 1:]
      yield lines_before, piece
      lines_before += piece.count(b"\n") + len(re.findall(rb"\r(?!\n)", piece))

  def _blocks(self, stream) -> Iterator[_Block]:
    first_row = 0
    for lines_before, piece in self._chunks(stream):
      try:
        text = piece.decode("utf-8")
      except UnicodeDecodeError as error:
        line = lines_before + 1 + len(re.findall(rb"\r\n|\n|\r", piece[:error.start]))
        raise GraphImportError(self.path, line, "not valid UTF-8 text", INVALID_UTF8) from None
      lines = pc.split_pattern_regex(pa.array([text]), r"\r\n|\n|\r").flatten()
      lines = lines.slice(0, len(lines) - 1)  # after the final line break
      line_numbers = lines_before + 1 + np.arange(len(lines))
      if self.source.header and lines_before == 0 and len(lines):
        lines, line_numbers = lines.slice(1), line_numbers[1:]
      if self.delimiter:
        fields = pc.split_pattern(lines, self.delimiter)
      else:
        fields = pc.utf8_split_whitespace(pc.utf8_trim_whitespace(lines))
      has_targets = _numpy(pc.greater(pc.list_value_length(fields), 1))
      rows = np.flatnonzero(has_targets)
      if not len(rows):
        continue
      fields = fields.take(pa.array(rows))
      targets = pc.list_slice(fields, 1)
      parent = _numpy(pc.list_parent_indices(targets))
      columns = {"source": pc.list_element(fields, 0).take(pa.array(parent)),
                 "target": pc.list_flatten(targets)}
      self._block_lines = line_numbers[rows][parent]
      yield _Block(first_row, len(parent), columns)
      first_row += len(parent)

  def line_of(self, block: _Block, row: int) -> int:
    return int(self._block_lines[row - block.first_row])

  def locate(self, row: int | None, column_count_is_error: bool = True):
    """(line, None, None) of emitted row ``row``: re-reads the file."""
    if row is None:
      return None
    with self._open_binary() as f:
      for block in self._blocks(f):
        if row < block.first_row + block.num_rows:
          return self.line_of(block, row), None, None
    return None



# ----------------------------------------------------------------------------
# Pass 1: blocks -> validated rows in the spool



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


class Spool:
  """Pass-1 output: validated edges, still as names, in one Parquet file
  (a row group per block) that stage 2 reads."""

  def __init__(self, path: str, weighted: bool):
    fields = [("src", pa.string()), ("dst", pa.string()), ("stype", pa.int16()),
              ("dtype", pa.int16()), ("rel", pa.int32()), ("split", pa.int8()),
              ("pos", pa.int64())]
    if weighted:
      fields.append(("weight", pa.float32()))
    self.path = path
    self.schema = pa.schema(fields)
    self.num_edges = 0
    self._writer = pq.ParquetWriter(path, self.schema, compression="lz4")

  def append(self, table: pa.Table) -> None:
    if table.num_rows:
      self._writer.write_table(table.cast(self.schema))
      self.num_edges += table.num_rows

  def close(self) -> None:
    self._writer.close()


def _as_names(column) -> pa.Array:
  """A name column as Arrow strings (Parquet ids may be integers)."""
  if isinstance(column, pa.ChunkedArray):
    column = column.combine_chunks()
  if not pa.types.is_string(column.type):
    column = pc.cast(column, pa.string())
  return column


class ReadPass:
  """Pass 1: validates blocks and spools their good rows.

  ``pos`` numbers rows across files: file k's row r (0-based, counting the
  rows its reader emitted) gets ``file_start[k] + r``, so sorting by pos is
  input order, and a pos maps back to (file, row) for error messages.
  """

  def __init__(self, schema: Schema, spool: Spool, *, skip_errors: bool, weighted: bool,
               holdout: tuple[float, float], seed: int):
    self.schema = schema
    self.spool = spool
    self.skip_errors = skip_errors
    self.weighted = weighted
    self.skipped = collections.Counter()
    self.valid_fraction, self.test_fraction = holdout
    self._holdout_rng = np.random.default_rng([seed, _HOLDOUT_STREAM])
    self.file_starts: list[int] = []  # pos of row 0 of each file read, in order
    self._next_pos = 0

  def source_of(self, pos: int) -> tuple[int, int]:
    """(index of the file read, its row) of a pos."""
    index = bisect.bisect_right(self.file_starts, pos) - 1
    return index, pos - self.file_starts[index]

  def read_file(self, source: Source, reader, blocks: Iterator[_Block]) -> None:
    fixed_relation = (None if "relation" in source.columns
                      else self.schema.relation_index[source.relation_name])
    start = self._next_pos
    self.file_starts.append(start)
    rows = 0
    for block in blocks:
      self._read_block(source, reader, block, fixed_relation, start)
      rows = block.first_row + block.num_rows
    self._next_pos = start + rows
    if reader.invalid_rows:
      if not self.skip_errors:  # no bad row before it, or we would have raised
        found = reader.locate(None)
        raise GraphImportError(source.path, found[0] if found else None,
                               found[2] if found else "malformed line", COLUMN_COUNT)
      self.skipped[COLUMN_COUNT] += reader.invalid_rows

  def _read_block(self, source: Source, reader, block: _Block, fixed_relation,
                  start: int) -> None:
    columns = block.columns
    reasons = self._check_fields(source, columns, block.num_rows)
    rel, relation_names = self._relation_indices(source, columns, fixed_relation, reasons)
    weight = None
    if "weight" in columns:
      weight, weight_reasons = _parse_weights(columns["weight"])
      unflagged = reasons == 0
      reasons[unflagged] = weight_reasons[unflagged]

    # Malformed lines (reader.invalid_rows) are not raised here: pyarrow
    # parses ahead, so the one it just reported may lie after a bad row of
    # the next block. read_file raises for them at the end of the file.
    bad = np.flatnonzero(reasons)
    if len(bad):
      if not self.skip_errors:
        raise self._error(source, reader, block, bad, reasons, relation_names)
      self.skipped.update({REASONS[code - 1]: int(count)
                           for code, count in enumerate(np.bincount(reasons[bad])) if count})

    first = start + block.first_row
    table = pa.table({
        "src": _as_names(columns["source"]), "dst": _as_names(columns["target"]),
        "stype": self.schema.source_type[rel].astype(np.int16),
        "dtype": self.schema.target_type[rel].astype(np.int16),
        "rel": rel, "pos": np.arange(first, first + block.num_rows, dtype=np.int64)})
    if self.weighted:
      table = table.append_column("weight", pa.array(
          weight.astype(np.float32) if weight is not None else np.ones(block.num_rows,
                                                                        np.float32)))
    if len(bad):
      table = table.filter(pa.array(reasons == 0))
    split = self._split_codes(source, table.num_rows)
    self.spool.append(table.add_column(5, "split", pa.array(split)))

  def _check_fields(self, source: Source, columns: dict, num_rows: int) -> np.ndarray:
    """Reason codes per row (0: fine) for problems visible in one field."""
    reasons = np.zeros(num_rows, np.int8)
    for column in columns.values():
      _flag(reasons, _is_empty(column), EMPTY_FIELD)
    if source.format == "parquet":  # text lines cannot hold a line break
      for role in _NAME_ROLES:
        newline = pc.match_substring_regex(columns[role], r"[\r\n]")
        _flag(reasons, _numpy(pc.fill_null(newline, False)), NEWLINE_IN_NAME)
    return reasons

  def _relation_indices(self, source: Source, columns: dict, fixed_relation: int | None,
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

  def _split_codes(self, source: Source, num_edges: int) -> np.ndarray:
    """The split of each edge: the file's, or for train files with holdout
    fractions a seeded draw (a Bernoulli draw per edge: streaming, so the
    shares are exact only in expectation)."""
    split = np.full(num_edges, SPLIT_CODES[source.split], np.int8)
    if source.split == "train" and (self.valid_fraction or self.test_fraction):
      draw = self._holdout_rng.random(num_edges)
      split[draw < self.valid_fraction + self.test_fraction] = SPLIT_CODES["test"]
      split[draw < self.valid_fraction] = SPLIT_CODES["valid"]
    return split

  def _error(self, source, reader, block, bad, reasons, relation_names) -> GraphImportError:
    """The error for the first bad line of the file, with its line number."""
    row = int(bad[0])
    if isinstance(reader, AdjacencyReader):  # knows its lines without a re-scan
      found = (reader.line_of(block, block.first_row + row), None, None)
    else:
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
                 f"{preview(list(self.schema.relation_index))})")
    elif reason in (WEIGHT_NOT_A_NUMBER, WEIGHT_NOT_FINITE, WEIGHT_NEGATIVE):
      value = columns["weight"][row].as_py()
      problem = {WEIGHT_NOT_A_NUMBER: "is not a number", WEIGHT_NOT_FINITE: "is not finite",
                 WEIGHT_NEGATIVE: "is negative"}[reason]
      message = f"weight {value!r} {problem}"
    else:
      raise AssertionError(reason)
    return GraphImportError(source.path, line, message, reason)


def preview(names: list[str], limit: int = 8) -> str:
  shown = ", ".join(repr(n) for n in names[:limit])
  return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")




def open_reader(source: Source, data):
  """The reader of one source, by format."""
  if source.format == "parquet":
    return ParquetReader(source)
  if source.format == "adjacency":
    return AdjacencyReader(source, data.delimiter, data.on_error == "skip")
  return TextReader(source, data.delimiter, data.on_error == "skip")


def read_sources(reader_pass: "ReadPass", sources: list[Source], data, progress: bool
                  ) -> list[dict]:
  """Pass 1 over every source; returns the manifest's source records."""
  records = []
  total_bytes = sum(os.path.getsize(s.path) for s in sources)
  with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="import: read",
            disable=not progress) as bar:
    for source in sources:
      reader = open_reader(source, data)
      if source.format == "parquet":
        reader_pass.read_file(source, reader, reader.blocks(bar.update))
        digest = hash_file(source.path)
      else:
        with open(source.path, "rb") as raw:
          tap = _ByteTap(raw, bar.update)
          reader_pass.read_file(source, reader, reader.blocks(tap))
          tap.drain()
        digest = tap.sha256.hexdigest()
      records.append(source_record(source, digest))
  return records


def source_record(source: Source, digest: str) -> dict:
  return dict(path=source.spec["path"], sha256=digest, bytes=os.path.getsize(source.path),
              split=source.split,
              spec={k: source.spec.get(k) for k in config_lib.FILE_SPEC_FIELDS})


# ----------------------------------------------------------------------------
# Entry points


def manifest_hash(manifest: dict) -> str:
  content = {k: v for k, v in manifest.items() if k not in ("hash", "created", "build")}
  text = json.dumps(content, sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def import_options(config) -> dict:
  """The import settings that change the resulting graph (hashed)."""
  data = config.data
  return dict(seed=int(config.train.seed), valid_fraction=float(data.valid_fraction),
              test_fraction=float(data.test_fraction), names_global=bool(data.names_global),
              on_error=data.on_error, delimiter=data.delimiter,
              drop_unseen_eval_entities=bool(data.get("drop_unseen_eval_entities", False)))


def make_manifest(config, schema: Schema, stats: dict, source_records: list[dict],
                  skipped: dict, weighted: bool) -> dict:
  """The manifest from an engine's statistics (the same keys for both)."""
  skipped = dict(sorted((k, int(v)) for k, v in skipped.items() if v))
  relation_counts = stats["relation_counts"]
  counts = {split: int(sum(c)) for split, c in relation_counts.items()}
  if counts["train"] == 0:
    where = ", ".join(r["path"] for r in source_records if r["split"] == "train") or "none"
    raise GraphImportError(where, None, "no train edges: the train split is empty"
                           + (f" (skipped bad lines: {skipped})" if skipped else "")
                           + "; check the file specs' split and the input files")
  if skipped:
    warnings.warn(f"import skipped {sum(skipped.values())} bad lines: "
                  + ", ".join(f"{k} {v}" for k, v in skipped.items()),
                  SkippedLinesWarning, stacklevel=4)
  entity_counts = stats["counts"]
  names = [r["name"] for r in schema.relations]
  coverage = {}
  for i, rel in enumerate(schema.relations):
    coverage[rel["name"]] = {}
    for side, type_index, covered in (("source", schema.source_type[i], stats["coverage"][i][0]),
                                      ("target", schema.target_type[i], stats["coverage"][i][1])):
      total = entity_counts[type_index]
      coverage[rel["name"]][side] = dict(type=schema.types[type_index], entities=int(covered),
                                         share=round(covered / total, 6) if total else 0.0)
  manifest = dict(
      format_version=graph_lib.FORMAT_VERSION,
      schema=dict(
          entities={t: dict(count=int(n), num_partitions=p)
                    for t, n, p in zip(schema.types, entity_counts, schema.num_partitions)},
          relations=[dict(name=r["name"], source=r["source"], target=r["target"],
                          operator=r["operator"], weight=float(r.get("weight", 1.0)))
                     for r in schema.relations]),
      counts=counts,
      relation_counts={name: {split: int(c[i]) for split, c in relation_counts.items()}
                       for i, name in enumerate(names)},
      skipped=skipped,
      # What the data holds, beyond its size (see docs/import.md).
      quality=dict(
          self_loops={k: int(v) for k, v in stats["self_loops"].items()},
          duplicate_edges={k: int(v) for k, v in stats["duplicates"].items()},
          entities_without_train_edges={t: int(n) for t, n in
                                        zip(schema.types, stats["without_train"])},
          eval_edges_with_unseen_entities={k: int(v) for k, v in
                                           stats["eval_edges_with_unseen"].items()},
          dropped_unseen_eval_edges={k: int(v) for k, v in
                                     stats["dropped_unseen_eval_edges"].items()}),
      coverage=coverage,
      sources=source_records,
      # Everything besides the sources that shapes the result, so that the
      # hash changes whenever the graph would.
      options=import_options(config),
      bucket_sizes=stats["bucket_sizes"],
      weighted=weighted,
      created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
  manifest["hash"] = manifest_hash(manifest)
  return manifest


def relation_names_from_files(specs: list[dict], *, delimiter: str = "") -> list[str]:
  """Sorted distinct relation names in the relation column of the train
  files among ``specs`` (used while building a config, e.g. a KG's 237
  relations, see datasets.kg_config).

  The files go through the importer's own readers and field checks, so a bad
  line fails here with ``path:line:`` as it would in the import. Only train
  files count: a relation seen only in valid or test has nothing to learn
  from (the import then rejects those lines as unknown relations). A
  relation whose only occurrence is line 1 of a file is taken for a header
  the spec does not declare, and rejected.
  """
  names = collections.Counter()
  first_line_relation = {}
  data = config_lib.base_config().data
  data.delimiter = delimiter
  for spec in specs:
    if (spec.get("split") or "train") != "train":
      continue
    if spec.get("relation") is None:
      raise ValueError(f"{spec.get('path')}: relation names are read from a relation "
                       "column; this spec has none")
    source = resolve_source(
        spec, _RelationFreeSchema())
    reader = open_reader(source, data)
    blocks = (reader.blocks(lambda _: None) if source.format == "parquet" else None)
    with open(source.path, "rb") as raw:
      if blocks is None:
        blocks = reader.blocks(_ByteTap(raw, lambda _: None))
      for block in blocks:
        reasons = np.zeros(block.num_rows, np.int8)
        for column in block.columns.values():
          _flag(reasons, _is_empty(column), EMPTY_FIELD)
        bad = np.flatnonzero(reasons)
        if len(bad):
          row = int(bad[0])
          found = reader.locate(block.first_row + row)
          role = next(r for r in block.columns if _is_empty(block.columns[r].slice(row, 1))[0])
          raise GraphImportError(source.path, found[0] if found else None,
                                 f"empty {role} field", EMPTY_FIELD)
        column = pc.fill_null(block.columns["relation"], "")
        if block.first_row == 0 and block.num_rows:
          first_line_relation[source.path] = column[0].as_py()
        names.update(dict(zip(*[x.to_pylist() for x in
                                pc.value_counts(column).flatten()])))
      if reader.invalid_rows:
        found = reader.locate(None)
        raise GraphImportError(source.path, found[0] if found else None,
                               found[2] if found else "malformed line", COLUMN_COUNT)
  for path, name in first_line_relation.items():
    if names[name] == 1:
      found = None
      raise GraphImportError(path, 1, f"relation {name!r} occurs only on the first line: "
                             "a header? Set header=True in the file spec")
  if not names:
    raise ValueError("no relation names: no train file among the specs, or they are empty")
  return sorted(names)


class _RelationFreeSchema:
  """Stands in for Schema when reading relation names before a config has
  its relations: every relation name is accepted."""
  relation_index = collections.defaultdict(int)
