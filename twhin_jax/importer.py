"""Importer: edge files -> the graph directory that ``twhin_jax.graph`` reads.

The input is the list of file specs of ``config.data.files`` (TSV/CSV, plain
or gzipped, Parquet, or adjacency lists; see ``config.FILE_SPEC_FIELDS``);
the output is the directory format documented in ``twhin_jax/graph.py``.
No vocabulary is ever held in memory: memory is bounded by the block size
and ``data.import_memory_limit``, whatever the number of entities or edges.
``data.import_engine`` picks the engine (docs/import.md):

"duckdb" (default, one machine), in two stages:

Pass 1 (read and validate, ``edge_reading.py``, shared with the Spark
  engine): every file is read in blocks (pyarrow's
  streaming CSV reader, Parquet record batches, or whitespace-split lines for
  adjacency lists). Each block is validated with vectorised checks, and its
  good rows are appended, still as names, to a Parquet spool: source and
  target name and type, relation index, split, weight, and ``pos``, the
  row's position in the input (file order, then row order).

Stage 2 (``import_duckdb.py``): an embedded DuckDB database in the work
  directory checks names against types (``data.names_global``), assigns ids
  (a seeded hash order, eq. (1) there), joins them onto the edges one hash
  partition of names at a time (eq. (2) there), and
  streams buckets (sorted by bucket, then ``pos``), eval splits, degrees,
  the vocabulary files and the statistics of the manifest
  (``graph_writer.py`` writes the files). It runs on all cores and spills to
  disk under the memory limit.

"spark" (``import_spark.py``): the same graph computed by Spark, for inputs
  no single machine holds.

Bad input is reported as :class:`GraphImportError` with a ``path:line:``
prefix (1-based physical lines of the source file, header included; for
Parquet the 1-based row number). pyarrow does not report line numbers, so on
an error the file is re-scanned in Python up to the offending row (see
``edge_reading.TextReader.locate``); the fast path never pays for this.
With ``config.data.on_error == "skip"`` bad lines are dropped and counted per
reason in the manifest instead. A name used under two entity types
(``data.names_global``) is found in stage 2, after every file is read: when
a file has both such a conflict and another bad line, the other one is
reported first even if it comes later.

The import is atomic: everything is built in ``<graph_dir>.tmp-<pid>`` and
renamed into place only once complete; a failure removes the temporary
directory and leaves any existing ``graph_dir`` alone.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import time

import numpy as np
from tqdm import tqdm

from twhin_jax import bucket_index
from twhin_jax import config as config_lib
from twhin_jax import graph as graph_lib
from twhin_jax.edge_reading import (
    ENTITY_TYPE_CONFLICT, REASONS, SPLIT_CODES, GraphImportError, ReadPass, Schema,
    SkippedLinesWarning, Source, Spool, import_options, make_manifest, manifest_hash, open_reader,
    read_sources, relation_names_from_files, resolve_source)

# The importer's public names; the reading stage's are re-exported from here
# (callers import GraphImportError, SkippedLinesWarning... from the importer).
__all__ = ["ENGINES", "GraphImportError", "REASONS", "SPLIT_CODES", "SkippedLinesWarning",
           "import_graph", "import_options", "make_manifest", "relation_names_from_files",
           "summarize"]

ENGINES = ("duckdb", "spark")


def import_graph(config, graph_dir: str, *, files: list[dict] | None = None,
                 progress: bool = True, engine: str | None = None) -> graph_lib.Graph:
  """Imports edge files into a new graph directory and returns its reader.

  Args:
    config: a run config (see ``twhin_jax.config``): its entities, relations,
      ``data`` section and ``train.seed`` (entity shuffle and holdout draws).
    graph_dir: the directory to create; it must not exist yet.
    files: file specs to read instead of ``config.data.files`` (generators).
    progress: show tqdm progress bars on stderr.
    engine: "duckdb" or "spark"; default ``config.data.import_engine``.

  Raises:
    FileExistsError: ``graph_dir`` already exists (it is left untouched).
    GraphImportError: a missing file or, unless ``data.on_error == "skip"``,
      a bad line; the message starts with ``path:line:``. Also an import
      without any train edge.
  """
  graph_dir = os.path.normpath(graph_dir)
  if os.path.exists(graph_dir):
    raise FileExistsError(f"{graph_dir}: already exists; remove it or import elsewhere")
  schema = Schema(config)
  specs = list(config.data.files if files is None else files)
  if not specs:
    raise ValueError("no input files: config.data.files is empty")
  sources = [resolve_source(spec, schema) for spec in specs]
  data = config.data
  if data.on_error not in config_lib.ON_ERROR:
    raise ValueError(f"config.data.on_error: {data.on_error!r} not in {config_lib.ON_ERROR}")
  engine = engine or data.get("import_engine", "duckdb") or "duckdb"
  if engine not in ENGINES:
    raise ValueError(f"config.data.import_engine: {engine!r} not in {ENGINES}")

  parent = os.path.dirname(os.path.abspath(graph_dir))
  os.makedirs(parent, exist_ok=True)
  work_dir = f"{graph_dir}.tmp-{os.getpid()}"
  shutil.rmtree(work_dir, ignore_errors=True)  # a crashed run with our pid
  try:
    os.makedirs(work_dir)
    started = time.perf_counter()
    if engine == "spark":
      from twhin_jax import import_spark  # heavy (a JVM); only when asked for
      manifest = import_spark.build(config, schema, sources, work_dir, progress)
    else:
      manifest = _build(config, schema, sources, work_dir, progress)
    # Buckets grouped by cell, so that each host reads only its own edges.
    index_buckets(work_dir, manifest, progress=progress)
    manifest["build"] = dict(engine=engine, seconds=round(time.perf_counter() - started, 2))
    with open(os.path.join(work_dir, graph_lib.MANIFEST), "w") as f:
      json.dump(manifest, f, indent=1)
    if os.path.exists(graph_dir):
      raise FileExistsError(f"{graph_dir}: appeared while importing; not replacing it")
    os.rename(work_dir, graph_dir)
  except BaseException:
    shutil.rmtree(work_dir, ignore_errors=True)
    raise
  return graph_lib.Graph(graph_dir)


def index_buckets(graph_dir: str, manifest: dict, grid: int = bucket_index.GRID,
                  progress: bool = False) -> None:
  """Groups every non-empty bucket of the graph being imported into
  ``graph_dir`` (manifest not yet written) by cell (bucket_index.py) and
  records the grid in ``manifest`` (its hash recomputed: the stored order
  changed)."""
  manifest["bucket_index"] = {"grid": grid}
  cell_grid = bucket_index.CellGrid.of_manifest(manifest)
  manifest["bucket_index"]["type_pairs"] = [list(p) for p in cell_grid.type_pairs]
  buckets = [key for key, n in sorted(manifest["bucket_sizes"].items()) if n]
  for key in tqdm(buckets, desc="import: index buckets", disable=not progress):
    i, j = (int(x) for x in key.split("_"))
    bucket_index.group_bucket(graph_lib.bucket_dir(graph_dir, i, j), cell_grid)
  manifest["hash"] = manifest_hash(manifest)


def _conflict_error(first: dict, reader_pass: "ReadPass", sources: list[Source], data,
                    types: list[str]) -> GraphImportError:
  """The error for the earliest row that uses a name under a second type."""
  index, row = reader_pass.source_of(first["pos"])
  source = sources[index]
  found = open_reader(source, data).locate(row)
  line = found[0] if found is not None else None
  return GraphImportError(
      source.path, line,
      f"{first['name']!r} is used as entity type {types[first['type']]!r} here but is "
      f"already of type {types[first['owner']]!r} (data.names_global: a name has one "
      "entity type)", ENTITY_TYPE_CONFLICT)


def _build(config, schema: Schema, sources: list[Source], work_dir: str,
           progress: bool) -> dict:
  """Pass 1 and the DuckDB stage, into ``work_dir``; returns the manifest."""
  from twhin_jax import import_duckdb  # the engine's own dependency
  data = config.data
  seed = int(config.train.seed)
  weighted = any("weight" in s.columns for s in sources)
  spool_path = os.path.join(work_dir, "spool.parquet")
  spool = Spool(spool_path, weighted)
  reader_pass = ReadPass(schema, spool, skip_errors=data.on_error == "skip", weighted=weighted,
                        holdout=(float(data.valid_fraction), float(data.test_fraction)),
                        seed=seed)
  try:
    source_records = read_sources(reader_pass, sources, data, progress)
  finally:
    spool.close()
  skipped = collections.Counter(reader_pass.skipped)

  stage_dir = os.path.join(work_dir, "duckdb")
  os.makedirs(stage_dir)
  con = import_duckdb.connect(stage_dir, data.get("import_memory_limit", "1GB"),
                              int(data.get("import_threads", 0)))
  try:
    conflicts_dropped = False
    if bool(data.names_global) and len(schema.types) > 1:
      count, first = import_duckdb.find_type_conflicts(con, spool_path,
                                                       skip=data.on_error == "skip")
      if count and data.on_error != "skip":
        raise _conflict_error(first, reader_pass, sources, data, schema.types)
      if count:
        skipped[ENTITY_TYPE_CONFLICT] += count
        conflicts_dropped = True
    with tqdm(total=7, desc="import: build", disable=not progress) as bar:
      def step(name: str) -> None:
        bar.set_postfix_str(name)
        bar.update(1)
      stats = import_duckdb.build(
          con, spool_path, work_dir, stage_dir, types=schema.types,
          num_partitions=schema.num_partitions,
          source_type=schema.source_type, target_type=schema.target_type,
          num_relations=len(schema.relations), grid=schema.grid, weighted=weighted, seed=seed,
          drop_unseen=bool(data.get("drop_unseen_eval_entities", False)),
          conflicts_dropped=conflicts_dropped, step=step)
  finally:
    con.close()
    shutil.rmtree(stage_dir, ignore_errors=True)
    os.remove(spool_path) if os.path.exists(spool_path) else None
  return make_manifest(config, schema, stats, source_records, dict(skipped), weighted)


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
  quality = m.get("quality", {})
  if quality:
    lines.append("self-loops: " + ", ".join(f"{k} {v:,}" for k, v in quality["self_loops"].items())
                 + "   duplicate edges: "
                 + ", ".join(f"{k} {v:,}" for k, v in quality["duplicate_edges"].items()))
    unseen = quality["eval_edges_with_unseen_entities"]
    dropped = quality["dropped_unseen_eval_edges"]
    if any(unseen.values()) or any(dropped.values()):
      lines.append("valid/test edges with an entity that has no train edge: "
                   + ", ".join(f"{k} {v:,}" for k, v in unseen.items())
                   + ("  (dropped: " + ", ".join(f"{k} {v:,}" for k, v in dropped.items()) + ")"
                      if any(dropped.values()) else ""))
  if m.get("skipped"):
    lines.append("skipped lines: " + ", ".join(f"{k} {v:,}" for k, v in m["skipped"].items()))
  return "\n".join(lines)
