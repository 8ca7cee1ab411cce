"""The DuckDB stage of the default import engine: validated name edges ->
ids, shuffle, buckets, degrees and statistics, out of core.

Input: the spool written by pass 1 (``edge_reading.py``, run by
``importer.py``): one Parquet file of validated edges, with ``src``, ``dst``
names, their types ``stype``/``dtype``, ``rel``, ``split``, ``pos`` (input
order), and ``weight`` if weighted.
Everything else happens in an embedded DuckDB database file inside the
import's work directory, on all cores (``data.import_threads``), under
``data.import_memory_limit``; what does not fit spills to a temporary
directory there. No name passes through Python.

Ids (shared with ``import_spark.py``, so both engines give the same graph):
the local id of a name of type T is its rank among the distinct names of T
ordered by

    key(name) = md5("<seed>\\x1f<T>\\x1f" + name)   (hex), ties by name     (1)

A cryptographic hash makes the order a seeded uniform shuffle, unrelated
to the names' order in the files (hubs first, sorted ids...), so the
contiguous partitions of graph.py get a balanced share; any engine can
compute (1) row by row, in parallel.

Memory does not grow with the number of names: each step is one SQL
statement over all rows, and DuckDB's hash aggregate, hash join and sort
partition their input and spill to the work directory when it does not fit
the limit (see :func:`build`).
"""

from __future__ import annotations

import os
import re
from typing import Callable

import duckdb
import numpy as np
import pyarrow as pa

from twhin_jax import graph_writer
from twhin_jax.edge_reading import SPLIT_CODES

#: Rows per Arrow batch fetched from DuckDB.
FETCH_ROWS = 1 << 20
#: The order of eq. (1) over rows (type, name, key = the md5 hex): the key's
#: first 16 hex digits as an unsigned integer sort as the hex string does
#: (big-endian), but as a fixed-width key, without comparing strings; the
#: full hex and the name only break its ties.
RANK_ORDER = "type, ('0x' || key[1:16])::UBIGINT, key, name"


#: The share of ``data.import_memory_limit`` that the steps whose hash
#: tables grow with the number of names (the distinct names, their ranking,
#: the two joins, the per-entity statistics) may use; the sorts over the
#: edges that follow get the whole limit. Capped, those steps spill sooner
#: instead of raising the peak RSS with the number of names.
NAME_STEPS_MEMORY_SHARE = 0.4


#: Up to this many relations, coverage comes from a bit mask per entity
#: (2 bits per relation in a UBIGINT; see "statistics" in :func:`build`).
MASK_RELATIONS = 32


def memory_bytes(size: str) -> int:
  """Bytes of a size such as '1GB' or '512MiB' (config.data.import_memory_limit)."""
  match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B", str(size).strip())
  if match is None:
    raise ValueError(f"not a size: {size!r}")
  number, unit, binary = match.groups()
  return int(float(number) * (1024 if binary else 1000) ** " KMGT".index(unit or " "))


def type_prefix(seed: int, type_name: str) -> str:
  """The salt of eq. (1) for one entity type."""
  return f"{seed}\x1f{type_name}\x1f"


def connect(work_dir: str, memory_limit: str, threads: int) -> duckdb.DuckDBPyConnection:
  """A DuckDB database file in ``work_dir``, spilling to ``work_dir/spill``."""
  spill = os.path.join(work_dir, "spill")
  os.makedirs(spill, exist_ok=True)
  con = duckdb.connect(os.path.join(work_dir, "import.duckdb"))
  con.execute(f"SET memory_limit = '{_quote(memory_limit)}'")
  con.execute(f"SET temp_directory = '{_quote(spill)}'")
  con.execute(f"SET threads = {int(threads) or os.cpu_count() or 1}")
  con.execute("SET preserve_insertion_order = false")
  con.execute("SET enable_progress_bar = false")
  return con


def _quote(text: str) -> str:
  return str(text).replace("'", "''")


def _stream(con, sql: str):
  """The result of a query as Arrow batches, run only once iterated (one
  open result per connection)."""
  yield from con.sql(sql).to_arrow_reader(FETCH_ROWS)


def _scalar(con, sql: str, *params):
  return con.execute(sql, list(params)).fetchone()[0]


def find_type_conflicts(con, spool: str, skip: bool) -> tuple[int, dict | None]:
  """names_global with several types: a name belongs to the type of its
  earliest use (lowest pos; in one row, the lower type index); rows that use
  it under another type conflict.

  Returns (number of conflicting rows, the earliest one as {pos, name, type,
  owner}). With ``skip`` the conflicting rows are recorded in table
  ``dropped`` (pos) for the later stages to leave out.
  """
  con.execute(f"""
    CREATE TEMP TABLE contested AS
    SELECT name, arg_min(type, first * 65536 + type) AS owner FROM (
      SELECT name, type, min(pos) AS first FROM (
        SELECT src AS name, stype AS type, pos FROM read_parquet('{_quote(spool)}')
        UNION ALL
        SELECT dst, dtype, pos FROM read_parquet('{_quote(spool)}'))
      GROUP BY name, type)
    GROUP BY name HAVING count(*) > 1""")
  if not _scalar(con, "SELECT count(*) FROM contested"):
    return 0, None
  con.execute(f"""
    CREATE TEMP TABLE conflicts AS
    SELECT s.pos, c.name, s.stype AS type, c.owner, 0 AS side
      FROM read_parquet('{_quote(spool)}') s JOIN contested c
      ON s.src = c.name AND s.stype <> c.owner
    UNION ALL
    SELECT s.pos, c.name, s.dtype, c.owner, 1
      FROM read_parquet('{_quote(spool)}') s JOIN contested c
      ON s.dst = c.name AND s.dtype <> c.owner""")
  row = con.execute("SELECT pos, name, type, owner FROM conflicts "
                    "ORDER BY pos, side LIMIT 1").fetchone()
  count = _scalar(con, "SELECT count(DISTINCT pos) FROM conflicts")
  if skip:
    con.execute("CREATE TEMP TABLE dropped AS SELECT DISTINCT pos FROM conflicts")
  first = None if row is None else dict(pos=int(row[0]), name=row[1], type=int(row[2]),
                                        owner=int(row[3]))
  return int(count), first


def build(con, spool: str, graph_dir: str, *, memory_limit: str, types: list[str], num_partitions: list[int],
          source_type: np.ndarray, target_type: np.ndarray, num_relations: int,
          grid: tuple[int, int], weighted: bool, seed: int, drop_unseen: bool,
          conflicts_dropped: bool, step: Callable[[str], None] = lambda _: None) -> dict:
  """Writes vocab/, buckets/, splits/ and degrees/ into ``graph_dir`` from
  the spool; returns the statistics for the manifest (see
  ``edge_reading.make_manifest``).

  Every table is a TEMP table: held in DuckDB's buffer pool (evicted to
  the spill directory under the memory limit) rather than written to the
  database file, whose compression and checkpoints cost a third of the
  time of the steps that create them. One statement per step, each over
  all rows: DuckDB's hash aggregate,
  hash join and sort partition and spill to disk by themselves under the
  memory limit (a 20M-edge import with 5M names ran within a 250 MB limit
  at 400 MiB of RSS), so no step holds every name at once in memory. Names
  are touched three times only: the distinct names, their ranking by eq.
  (1) (one md5 per distinct name, not per occurrence), and the two joins
  that put ids on the edges; every later step works on integers.

  Ids: ``ranked`` holds the distinct (type, name) sorted by (type, key), so
  its rowid is a global id ``gid`` and a type's ids are a contiguous range:
  local id = gid - first(type).
  """
  read = f"read_parquet('{_quote(spool)}')"
  if conflicts_dropped:
    con.execute(f"CREATE TEMP VIEW kept AS SELECT * FROM {read} "
                "WHERE pos NOT IN (SELECT pos FROM dropped)")
  else:
    con.execute(f"CREATE TEMP VIEW kept AS SELECT * FROM {read}")
  con.register("type_table", pa.table({
      "type": pa.array(range(len(types)), pa.int16()),
      "prefix": pa.array([type_prefix(seed, t) for t in types], pa.string())}))
  con.execute("CREATE TEMP TABLE types AS SELECT * FROM type_table")
  con.unregister("type_table")

  # Vocabulary: distinct (type, name); with drop_unseen only train edges
  # contribute names.
  step("vocabulary")
  names_limit = int(memory_bytes(memory_limit) * NAME_STEPS_MEMORY_SHARE)
  con.execute(f"SET memory_limit = '{names_limit}B'")
  train_only = "WHERE split = 0" if drop_unseen else ""
  con.execute(f"""
    CREATE TEMP TABLE distinct_names AS SELECT DISTINCT type, name FROM (
      SELECT stype AS type, src AS name FROM kept {train_only}
      UNION ALL SELECT dtype, dst FROM kept {train_only})""")
  # Ranked by eq. (1) with an out-of-core sort, not a window function
  # (DuckDB's window operator ran out of memory on 7M names under a 1 GB
  # limit): inserted in sorted order, a row's rowid is its gid.
  con.execute("SET preserve_insertion_order = true")
  con.execute(f"""
    CREATE TEMP TABLE ranked AS SELECT type, name FROM (
      SELECT n.type, n.name, md5(t.prefix || n.name) AS key
      FROM distinct_names n JOIN types t ON t.type = n.type)
    ORDER BY {RANK_ORDER}""")
  con.execute("DROP TABLE distinct_names")
  con.execute("""CREATE TEMP TABLE first_rows AS
                 SELECT type, min(rowid) AS first, count(*) AS n FROM ranked GROUP BY type""")
  counts = [0] * len(types)
  firsts = [0] * len(types)
  for t, first, n in con.execute("SELECT type, first, n FROM first_rows").fetchall():
    counts[int(t)] = int(n)
    firsts[int(t)] = int(first)

  step("vocabulary files")
  for t, name in enumerate(types):
    # Still preserving insertion order: a plain scan of ranked is id order.
    by_id = _stream(con, f"SELECT name FROM ranked WHERE type = {t}")
    by_name = _stream(con, f"SELECT name, rowid - {firsts[t]} AS id FROM ranked "
                      f"WHERE type = {t} ORDER BY name")
    graph_writer.write_vocabulary(graph_dir, name, by_id, by_name)
  con.execute("SET preserve_insertion_order = false")

  # Edges as gids. Inner joins: with drop_unseen, valid/test edges with a
  # name outside the train vocabulary fall out here.
  step("ids")
  # Two joins, one after the other, so that DuckDB holds one hash table of
  # the names at a time, not two (on 5M edges with 3.5M names: 690 instead
  # of 786 MiB of peak RSS, for 0.9 more CPU seconds).
  weight = ", e.weight" if weighted else ""
  con.execute(f"""
    CREATE TEMP TABLE half_joined AS
    SELECT e.pos, e.split, e.rel, e.dtype, e.dst, s.rowid AS src_gid{weight}
    FROM kept e JOIN ranked s ON s.type = e.stype AND s.name = e.src""")
  con.execute(f"""
    CREATE TEMP TABLE edges AS
    SELECT e.pos, e.split, e.rel, e.src_gid, d.rowid AS dst_gid{weight}
    FROM half_joined e JOIN ranked d ON d.type = e.dtype AND d.name = e.dst""")
  con.execute("DROP TABLE half_joined")
  con.execute("DROP TABLE ranked")

  # Per-entity statistics from one aggregate of the train edges' endpoints,
  # grouped by entity: its degree, and a bit mask of the (relation, side)
  # pairs it takes part in, bit 2 rel + side; a relation's coverage of a side
  # is the number of entities with that bit. Grouping by entity alone keeps
  # one group per entity (grouping by (side, relation, entity) had up to
  # 2 R per entity, and on 20M edges raised the peak RSS to 1.4 GB).
  step("statistics")
  if num_relations <= MASK_RELATIONS:
    con.execute("""
      CREATE TEMP TABLE degree AS SELECT gid, count(*) AS degree, bit_or(mask) AS mask FROM (
        SELECT src_gid AS gid, 1::UBIGINT << (2 * rel) AS mask FROM edges WHERE split = 0
        UNION ALL SELECT dst_gid, 1::UBIGINT << (2 * rel + 1) FROM edges WHERE split = 0)
      GROUP BY gid""")
    bits = ", ".join(f"sum(((mask >> {b}) & 1)::BIGINT)" for b in range(2 * num_relations))
    covered = con.execute(f"SELECT {bits} FROM degree").fetchall()[0]
    con.register("coverage_table", pa.table({
        "side": pa.array([b % 2 for b in range(2 * num_relations)], pa.int8()),
        "rel": pa.array([b // 2 for b in range(2 * num_relations)], pa.int32()),
        "entities": pa.array([int(c or 0) for c in covered], pa.int64())}))
    con.execute("CREATE TEMP TABLE coverage_stats AS SELECT * FROM coverage_table")
    con.unregister("coverage_table")
  else:  # more (relation, side) pairs than bits in a UBIGINT
    con.execute("""
      CREATE TEMP TABLE endpoints AS SELECT side, rel, gid, count(*) AS n FROM (
        SELECT 0::TINYINT AS side, rel, src_gid AS gid FROM edges WHERE split = 0
        UNION ALL SELECT 1::TINYINT, rel, dst_gid FROM edges WHERE split = 0)
      GROUP BY ALL""")
    con.execute("CREATE TEMP TABLE degree AS SELECT gid, sum(n)::BIGINT AS degree "
                "FROM endpoints GROUP BY gid")
    con.execute("""CREATE TEMP TABLE coverage_stats AS
                   SELECT side, rel, count(*) AS entities FROM endpoints GROUP BY ALL""")
    con.execute("DROP TABLE endpoints")
  # A gid identifies its type, so (split, rel, src_gid, dst_gid) is an edge.
  con.execute("""CREATE TEMP TABLE duplicate_stats AS SELECT split, sum(n - 1) AS extra FROM (
                   SELECT split, rel, src_gid, dst_gid, count(*) AS n FROM edges
                   GROUP BY ALL HAVING count(*) > 1) GROUP BY split""")

  con.execute(f"SET memory_limit = '{memory_bytes(memory_limit)}B'")

  sizes = [max(1, -(-n // p)) for n, p in zip(counts, num_partitions)]
  con.register("rel_table", pa.table({
      "rel": pa.array(range(num_relations), pa.int32()),
      "src_first": pa.array([firsts[t] for t in source_type], pa.int64()),
      "dst_first": pa.array([firsts[t] for t in target_type], pa.int64()),
      "src_size": pa.array([sizes[t] for t in source_type], pa.int64()),
      "dst_size": pa.array([sizes[t] for t in target_type], pa.int64())}))
  con.execute("CREATE TEMP TABLE rels AS SELECT * FROM rel_table")
  con.unregister("rel_table")
  con.execute("""CREATE TEMP VIEW local_edges AS
                 SELECT e.*, e.src_gid - r.src_first AS src_id, e.dst_gid - r.dst_first AS dst_id,
                        r.src_size, r.dst_size
                 FROM edges e JOIN rels r ON r.rel = e.rel""")

  step("buckets")
  weight = ", weight" if weighted else ""
  stream = _stream(con, f"""
    SELECT (src_id // src_size)::INTEGER AS lhs, (dst_id // dst_size)::INTEGER AS rhs,
           (src_id % src_size)::INTEGER AS src, (dst_id % dst_size)::INTEGER AS dst,
           rel::INTEGER AS rel{weight}
    FROM local_edges WHERE split = 0 ORDER BY lhs, rhs, pos""")
  bucket_sizes = graph_writer.write_buckets(graph_dir, stream, grid, weighted)

  step("splits")
  for split in ("valid", "test"):
    stream = _stream(con, f"SELECT src_id AS src, dst_id AS dst, rel FROM local_edges "
                     f"WHERE split = {SPLIT_CODES[split]} ORDER BY pos")
    graph_writer.write_split(graph_dir, split, stream)

  step("degrees")
  without_train = []
  for t, name in enumerate(types):
    stream = _stream(con, f"SELECT gid - {firsts[t]} AS id, degree FROM degree "
                     f"WHERE gid >= {firsts[t]} AND gid < {firsts[t] + counts[t]} ORDER BY gid")
    without_train.append(graph_writer.write_degrees(graph_dir, name, counts[t], stream))

  step("counts")
  return dict(counts=counts, bucket_sizes=bucket_sizes, without_train=without_train,
              **statistics(con, num_relations))


def statistics(con, num_relations: int) -> dict:
  """Counts over table ``edges`` (and ``kept``, ``degree``,
  ``coverage_stats`` and ``duplicate_stats`` of :func:`build`) for the
  manifest."""
  relation_counts = {s: [0] * num_relations for s in SPLIT_CODES}
  self_loops = {s: 0 for s in SPLIT_CODES}
  names = {code: s for s, code in SPLIT_CODES.items()}
  for split, rel, n, loops in con.execute("""
      SELECT split, rel, count(*), count(*) FILTER (WHERE src_gid = dst_gid)
      FROM edges GROUP BY ALL""").fetchall():
    relation_counts[names[int(split)]][int(rel)] = int(n)
    self_loops[names[int(split)]] += int(loops)
  duplicates = {s: 0 for s in SPLIT_CODES}
  for split, extra in con.execute("SELECT split, sum(extra) FROM duplicate_stats "
                                  "GROUP BY split").fetchall():
    duplicates[names[int(split)]] = int(extra)
  coverage = [[0, 0] for _ in range(num_relations)]
  for side, rel, entities in con.execute("SELECT side, rel, sum(entities) FROM coverage_stats "
                                         "GROUP BY ALL").fetchall():
    coverage[int(rel)][int(side)] = int(entities)
  coverage = [tuple(c) for c in coverage]
  with_unseen = {s: 0 for s in ("valid", "test")}
  for split, n in con.execute("""
      SELECT split, count(*) FROM edges e
      WHERE split > 0 AND (
        NOT EXISTS (SELECT 1 FROM degree d WHERE d.gid = e.src_gid)
        OR NOT EXISTS (SELECT 1 FROM degree d WHERE d.gid = e.dst_gid))
      GROUP BY split""").fetchall():
    with_unseen[names[int(split)]] = int(n)
  kept = {s: 0 for s in SPLIT_CODES}
  for split, n in con.execute("SELECT split, count(*) FROM kept GROUP BY split").fetchall():
    kept[names[int(split)]] = int(n)
  dropped = {s: kept[s] - sum(relation_counts[s]) for s in ("valid", "test")}
  return dict(relation_counts=relation_counts, self_loops=self_loops, duplicates=duplicates,
              coverage=coverage, eval_edges_with_unseen=with_unseen,
              dropped_unseen_eval_edges=dropped)
