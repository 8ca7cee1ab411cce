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

Memory does not grow with the number of names: the steps that need a
name's every occurrence at once (the distinct names, the name -> id joins,
per-entity statistics) run one hash partition of names at a time,

    partition(name) = hash(name) mod K,   K = ceil(2 E / OCCURRENCES_PER_PARTITION)   (2)

for E edges (DuckDB's ``hash``; any split works, as ids come from (1) over
all partitions). A partition holds about 2E/K name occurrences whatever
the number of distinct names; on 100M edges with about 10M names a single
DISTINCT over all of them ran out of memory under a 1 GB limit.
"""

from __future__ import annotations

import os
import shutil
from typing import Callable

import duckdb
import numpy as np
import pyarrow as pa

from twhin_jax import graph_writer
from twhin_jax.edge_reading import SPLIT_CODES

#: Rows per Arrow batch fetched from DuckDB.
FETCH_ROWS = 1 << 20
#: Name occurrences (two per edge) per hash partition, eq. (2): each
#: partition's distinct names and joins fit in well under 1 GB of DuckDB
#: memory, whatever the total number of names.
OCCURRENCES_PER_PARTITION = 8_000_000


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


def partition_count(num_edges: int) -> int:
  """Hash partitions of the vocabulary build for ``num_edges`` edges (eq. (2))."""
  return max(1, -(-2 * int(num_edges) // OCCURRENCES_PER_PARTITION))


def build(con, spool: str, graph_dir: str, stage_dir: str, *, types: list[str], num_partitions: list[int],
          source_type: np.ndarray, target_type: np.ndarray, num_relations: int,
          grid: tuple[int, int], weighted: bool, seed: int, drop_unseen: bool,
          conflicts_dropped: bool, step: Callable[[str], None] = lambda _: None) -> dict:
  """Writes vocab/, buckets/, splits/ and degrees/ into ``graph_dir`` from
  the spool; returns the statistics for the manifest (see
  ``edge_reading.make_manifest``).

  Names are hash-partitioned (eq. (2)) so that no step holds more than one
  partition's names: the distinct names, the two name -> id joins and the
  statistics run partition by partition (a Grace hash join written out:
  edges partitioned by their source name, joined, repartitioned by their
  target name, joined). Only sorts (the id ranking, the vocabulary files,
  the bucket order) see every row at once, and DuckDB's sort spills.
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
  parts = partition_count(_scalar(con, f"SELECT count(*) FROM {read}"))
  partitioned = _Partitions(con, stage_dir, parts)

  # Vocabulary: distinct (type, name), partition by partition, then ranked by
  # eq. (1). With drop_unseen only train edges contribute names.
  step("vocabulary")
  partitioned.write("by_source", "SELECT * FROM kept", "src")
  train_only = "WHERE split = 0" if drop_unseen else ""
  partitioned.write("target_names", f"SELECT dtype AS type, dst AS name FROM kept {train_only}",
                    "name")
  con.execute("CREATE TABLE distinct_names (type SMALLINT, name VARCHAR)")
  for k in range(parts):
    names = [x for x in (partitioned.read("by_source", k, "stype AS type, src AS name, split"),
                         partitioned.read("target_names", k, "type, name, 0 AS split"))
             if x is not None]
    if names:
      union = " UNION ALL ".join(f"SELECT type, name FROM {x} {train_only}" for x in names)
      con.execute(f"INSERT INTO distinct_names SELECT DISTINCT type, name FROM ({union})")
  partitioned.remove("target_names")
  # Ranked by an out-of-core sort, not a window function (DuckDB's window
  # operator ran out of memory on 7M names under a 1 GB limit): inserted in
  # sorted order, a row's rowid minus its type's first rowid is its rank.
  con.execute("SET preserve_insertion_order = true")
  con.execute("""
    CREATE TABLE ranked AS
    SELECT n.type, n.name FROM distinct_names n JOIN types t ON t.type = n.type
    ORDER BY n.type, md5(t.prefix || n.name), n.name""")
  con.execute("DROP TABLE distinct_names")
  # A view, not a table: writing 14M names into a DuckDB table again cost 8 s
  # of 143 on 20M edges.
  con.execute("""CREATE TEMP TABLE first_rows AS
                 SELECT type, min(rowid) AS first, count(*) AS n FROM ranked GROUP BY type""")
  con.execute("""
    CREATE TEMP VIEW vocab AS
    SELECT r.type, r.name, (r.rowid - f.first)::BIGINT AS id
    FROM ranked r JOIN first_rows f ON f.type = r.type""")
  counts = [0] * len(types)
  for t, n in con.execute("SELECT type, n FROM first_rows").fetchall():
    counts[int(t)] = int(n)

  step("vocabulary files")
  for t, name in enumerate(types):
    # Still preserving insertion order: a plain scan of ranked is id order.
    by_id = _stream(con, f"SELECT name FROM ranked WHERE type = {t}")
    by_name = _stream(con, f"SELECT name, id FROM vocab WHERE type = {t} ORDER BY name")
    graph_writer.write_vocabulary(graph_dir, name, by_id, by_name)
  con.execute("SET preserve_insertion_order = false")
  partitioned.write("vocab", "SELECT type, name, id FROM vocab", "name")

  # Edges as ids, one partition of names at a time. Inner joins: with
  # drop_unseen, valid/test edges with a name outside the train vocabulary
  # fall out here. The statistics that group by an entity (degrees,
  # coverage, duplicates) are taken per partition too: an entity's rows all
  # lie in its name's partition.
  step("ids")
  weight = ", e.weight" if weighted else ""
  # Train edges per (relation, entity), for degrees and coverage.
  con.execute("""CREATE TABLE source_degree (part INTEGER, rel INTEGER, type SMALLINT,
                                             id BIGINT, n BIGINT)""")
  for k in range(parts):
    edges_k = partitioned.read("by_source", k, "*")
    vocab_k = partitioned.read("vocab", k, "type, name, id")
    if edges_k is None or vocab_k is None:
      continue
    con.execute(f"""
      CREATE OR REPLACE TEMP TABLE joined AS
      SELECT e.pos, e.split, e.rel, e.stype, e.dtype, e.dst, s.id AS src_id{weight}
      FROM {edges_k} e JOIN {vocab_k} s ON s.type = e.stype AND s.name = e.src""")
    con.execute(f"""INSERT INTO source_degree SELECT {k}, rel, stype, src_id, count(*)
                    FROM joined WHERE split = 0 GROUP BY ALL""")
    partitioned.write("by_target", "SELECT * FROM joined", "dst", append=True)
  con.execute("DROP TABLE IF EXISTS joined")
  partitioned.remove("by_source")

  weight = ", h.weight" if weighted else ""
  con.execute(f"""CREATE TABLE edges (pos BIGINT, split TINYINT, rel INTEGER, stype SMALLINT,
                    dtype SMALLINT, src_id BIGINT, dst_id BIGINT
                    {", weight FLOAT" if weighted else ""})""")
  con.execute("CREATE TABLE coverage_stats (side TINYINT, rel INTEGER, entities BIGINT)")
  con.execute("""INSERT INTO coverage_stats SELECT 0, rel, count(*) FROM source_degree
                 GROUP BY rel""")
  con.execute("CREATE TABLE duplicate_stats (split TINYINT, extra BIGINT)")
  con.execute("CREATE TABLE degree (type SMALLINT, id BIGINT, degree BIGINT)")
  for k in range(parts):
    half_k = partitioned.read("by_target", k, "*")
    vocab_k = partitioned.read("vocab", k, "type, name, id")
    if half_k is not None and vocab_k is not None:
      con.execute(f"""
        CREATE OR REPLACE TEMP TABLE joined AS
        SELECT h.pos, h.split, h.rel, h.stype, h.dtype, h.src_id, d.id AS dst_id{weight}
        FROM {half_k} h JOIN {vocab_k} d ON d.type = h.dtype AND d.name = h.dst""")
    else:
      con.execute("CREATE OR REPLACE TEMP TABLE joined AS SELECT * FROM edges LIMIT 0")
    con.execute("INSERT INTO edges SELECT * FROM joined")
    # Copies of one edge share its target, so they meet in one partition.
    con.execute("""INSERT INTO duplicate_stats SELECT split, sum(n - 1) FROM (
                     SELECT split, rel, src_id, dst_id, count(*) AS n FROM joined
                     GROUP BY ALL HAVING count(*) > 1) GROUP BY split""")
    con.execute("""CREATE OR REPLACE TEMP TABLE target_degree AS
                   SELECT rel, dtype AS type, dst_id AS id, count(*) AS n FROM joined
                   WHERE split = 0 GROUP BY ALL""")
    con.execute("""INSERT INTO coverage_stats SELECT 1, rel, count(*) FROM target_degree
                   GROUP BY rel""")
    con.execute(f"""
      INSERT INTO degree SELECT type, id, sum(n) FROM (
        SELECT type, id, n FROM target_degree
        UNION ALL SELECT type, id, n FROM source_degree WHERE part = {k})
      GROUP BY ALL""")
  con.execute("DROP TABLE IF EXISTS joined")
  con.execute("DROP TABLE IF EXISTS target_degree")
  con.execute("DROP TABLE source_degree")
  partitioned.remove()
  con.execute("DROP VIEW vocab")
  con.execute("DROP TABLE ranked")

  sizes = [max(1, -(-n // p)) for n, p in zip(counts, num_partitions)]
  con.register("rel_table", pa.table({
      "rel": pa.array(range(num_relations), pa.int32()),
      "src_size": pa.array([sizes[t] for t in source_type], pa.int64()),
      "dst_size": pa.array([sizes[t] for t in target_type], pa.int64())}))
  con.execute("CREATE TEMP TABLE rels AS SELECT * FROM rel_table")
  con.unregister("rel_table")

  step("buckets")
  weight = ", e.weight" if weighted else ""
  stream = _stream(con, f"""
    SELECT (e.src_id // r.src_size)::INTEGER AS lhs, (e.dst_id // r.dst_size)::INTEGER AS rhs,
           (e.src_id % r.src_size)::INTEGER AS src, (e.dst_id % r.dst_size)::INTEGER AS dst,
           e.rel::INTEGER AS rel{weight}
    FROM edges e JOIN rels r ON r.rel = e.rel
    WHERE e.split = 0 ORDER BY lhs, rhs, e.pos""")
  bucket_sizes = graph_writer.write_buckets(graph_dir, stream, grid, weighted)

  step("splits")
  for split in ("valid", "test"):
    stream = _stream(con, f"SELECT src_id AS src, dst_id AS dst, rel FROM edges "
                     f"WHERE split = {SPLIT_CODES[split]} ORDER BY pos")
    graph_writer.write_split(graph_dir, split, stream)

  step("degrees")
  without_train = []
  for t, name in enumerate(types):
    stream = _stream(con, f"SELECT id, degree FROM degree WHERE type = {t} ORDER BY id")
    without_train.append(graph_writer.write_degrees(graph_dir, name, counts[t], stream))

  step("statistics")
  return dict(counts=counts, bucket_sizes=bucket_sizes, without_train=without_train,
              **statistics(con, num_relations))


class _Partitions:
  """Tables written as Parquet, hash-partitioned on a name column (eq. (2)):
  ``<stage>/parts/<table>/part=<k>/*.parquet``. With one partition nothing
  is written: the query itself stands for partition 0."""

  def __init__(self, con, stage: str, parts: int):
    self.con = con
    self.parts = parts
    self.root = os.path.join(stage, "parts")
    self._single: dict[str, str] = {}

  def write(self, table: str, query: str, name_column: str, append: bool = False) -> None:
    if self.parts == 1:
      if append:  # one call per partition: there is only one
        self.con.execute(f"CREATE TABLE single_{table} AS {query}")
        self._single[table] = f"single_{table}"
      else:
        self._single[table] = f"({query})"
      return
    path = os.path.join(self.root, table)
    os.makedirs(self.root, exist_ok=True)
    self.con.execute(f"""
      COPY (SELECT *, (hash({name_column}) % {self.parts})::INTEGER AS part FROM ({query}))
      TO '{_quote(path)}' (FORMAT parquet, PARTITION_BY (part), COMPRESSION lz4
                           {", APPEND" if append else ""})""")

  def read(self, table: str, k: int, columns: str) -> str | None:
    """A FROM item for partition ``k`` of ``table`` (None: no rows there)."""
    if self.parts == 1:
      return f"(SELECT {columns} FROM {self._single[table]})"
    directory = os.path.join(self.root, table, f"part={k}")
    if not os.path.isdir(directory):
      return None
    return (f"(SELECT {columns} FROM read_parquet('{_quote(directory)}/*.parquet', "
            "hive_partitioning = false))")

  def remove(self, table: str | None = None) -> None:
    """Deletes a table's files (all tables' without an argument)."""
    for name in ([table] if table else list(self._single)):
      if self._single.get(name, "").startswith("single_"):
        self.con.execute(f"DROP TABLE {self._single[name]}")
    if table is None:
      self._single.clear()
    shutil.rmtree(os.path.join(self.root, table) if table else self.root, ignore_errors=True)


def statistics(con, num_relations: int) -> dict:
  """Counts over table ``edges`` (and ``kept``, ``degree``, and the
  per-partition tables of :func:`build`) for the manifest."""
  relation_counts = {s: [0] * num_relations for s in SPLIT_CODES}
  self_loops = {s: 0 for s in SPLIT_CODES}
  names = {code: s for s, code in SPLIT_CODES.items()}
  for split, rel, n, loops in con.execute("""
      SELECT split, rel, count(*), count(*) FILTER (WHERE stype = dtype AND src_id = dst_id)
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
        NOT EXISTS (SELECT 1 FROM degree d WHERE d.type = e.stype AND d.id = e.src_id)
        OR NOT EXISTS (SELECT 1 FROM degree d WHERE d.type = e.dtype AND d.id = e.dst_id))
      GROUP BY split""").fetchall():
    with_unseen[names[int(split)]] = int(n)
  kept = {s: 0 for s in SPLIT_CODES}
  for split, n in con.execute("SELECT split, count(*) FROM kept GROUP BY split").fetchall():
    kept[names[int(split)]] = int(n)
  dropped = {s: kept[s] - sum(relation_counts[s]) for s in ("valid", "test")}
  return dict(relation_counts=relation_counts, self_loops=self_loops, duplicates=duplicates,
              coverage=coverage, eval_edges_with_unseen=with_unseen,
              dropped_unseen_eval_edges=dropped)
