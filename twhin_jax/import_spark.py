"""The Spark import engine (``data.import_engine = "spark"``): the same graph
as the DuckDB engine, computed by Spark for inputs no single machine holds.

Spark reads every source itself (text lines, gzipped or not; Parquet;
adjacency lists), numbers the lines of text files without a single-partition
step (per-partition counts, then offsets), validates the rows with the
reading stage's rules (edge_reading.py), and computes the graph:

* ids: eq. (1) of ``import_duckdb.py`` (md5 of a seeded, typed prefix +
  name), assigned in parallel: the key space is cut into ``R`` ranges by the
  key's first 8 hex digits; the names of each range are ranked inside it
  (a window partitioned by range, so ranges rank in parallel), and a range's
  first id is the number of names in the ranges before it (a table of R
  counts per type). Never through one partition.
* buckets, eval splits, degrees, statistics: joins, range-partitioned sorts
  and aggregates, written as staged Parquet.

The driver then streams the staged, sorted Parquet into the graph directory
with ``graph_writer.py`` (the files both engines write), one batch at a time.
That last step is sequential I/O on the driver, which must see the output
directory; everything before it runs on the cluster.

Differences from the DuckDB engine (docs/import.md): errors name the file
and the physical line (Parquet: the row) but for CSV only quoting-aware
field counts are not checked (from_csv parses the fields); invalid UTF-8 is
replaced by Spark instead of being an error; ``data.valid_fraction`` /
``test_fraction`` (a sequential seeded draw) are not supported.
"""

from __future__ import annotations

import glob
import os
import re
import shutil

import pyarrow.parquet as pq
from tqdm import tqdm

from twhin_jax import graph_writer
from twhin_jax import import_duckdb
from twhin_jax import edge_reading

#: Hash ranges for the parallel id assignment, per core of the session
#: (Spark's default parallelism): a few tasks per core.
RANGES_PER_CORE = 2
#: Bits of pos below the file index: pos = (file index << 40) + line.
_LINE_BITS = 40


def session(master: str, memory: str, local_dir: str):
  """A Spark session (local[*] by default) with its scratch under ``local_dir``."""
  # lazy: pyspark (and its JVM) loads only when the Spark engine runs
  from pyspark.sql import SparkSession
  os.makedirs(local_dir, exist_ok=True)
  builder = (SparkSession.builder.master(master or "local[*]").appName("twhin-import")
             .config("spark.driver.memory", _spark_size(memory))
             .config("spark.local.dir", local_dir)
             .config("spark.ui.enabled", "false")
             .config("spark.ui.showConsoleProgress", "false")
             .config("spark.sql.session.timeZone", "UTC")
             .config("spark.sql.ansi.enabled", "false"))
  spark = builder.getOrCreate()
  spark.sparkContext.setLogLevel("ERROR")
  # Shuffles into a few partitions per core (Spark's default of 200 is for
  # clusters; adaptive execution merges small ones further).
  spark.conf.set("spark.sql.shuffle.partitions",
                 str(RANGES_PER_CORE * spark.sparkContext.defaultParallelism))
  return spark


def _spark_size(size: str) -> str:
  """'1GB' / '512MiB' -> Spark's '1g' / '512m'."""
  text = str(size).strip().upper().replace("IB", "B")
  number, unit = text[:-2].strip(), text[-2]
  return f"{int(float(number))}{unit.lower()}"


def _line_numbers(spark, frame):
  """Adds ``line`` (1-based, in file order) to a DataFrame read from one
  text file, without one partition: each partition's rows are counted, and
  a row's line is the rows of earlier partitions plus its index in its own
  (monotonically_increasing_id holds the partition in its upper bits)."""
  # lazy: pyspark (and its JVM) loads only when the Spark engine runs
  from pyspark.sql import functions as F
  frame = frame.withColumn("_pid", F.spark_partition_id()).withColumn(
      "_mid", F.monotonically_increasing_id())
  counts = sorted(frame.groupBy("_pid").count().collect())
  offsets, total = [], 0
  for pid, count in counts:
    offsets.append((pid, total))
    total += count
  offset_frame = spark.createDataFrame(offsets or [(0, 0)], "_pid INT, _offset LONG")
  return (frame.join(F.broadcast(offset_frame), "_pid")
          .withColumn("line", F.col("_offset") + (F.col("_mid") - F.shiftleft(
              F.col("_pid").cast("long"), 33)) + 1)
          .drop("_pid", "_mid", "_offset"))


def _read_source(spark, index: int, source, data, relation_table):
  """One source as rows (file, line, sub, src, dst, relname, weight, ncols,
  ok_text); ``sub`` orders the edges of one adjacency line."""
  # lazy: pyspark (and its JVM) loads only when the Spark engine runs
  from pyspark.sql import functions as F
  columns = source.columns
  if source.format == "parquet":
    reader = edge_reading.ParquetReader(source)
    frame = spark.read.parquet(source.path).select(
        *[F.col(f"`{name}`").alias(f"c_{role}") for role, name in reader.column_name.items()],
        (F.col("_metadata.row_index") + 1).alias("line"))
    for role in reader.column_name:
      if role != "weight":
        frame = frame.withColumn(f"c_{role}", F.col(f"c_{role}").cast("string"))
    frame = frame.withColumn("ncols", F.lit(None).cast("int"))
    expected = None
  else:
    text = _line_numbers(spark, spark.read.text(source.path))
    if source.header:
      text = text.where(F.col("line") > 1)
    if source.format == "adjacency":
      delimiter = data.delimiter
      stripped = F.trim(F.col("value")) if not delimiter else F.col("value")
      text = text.where(F.length(F.trim(F.col("value"))) > 0)
      fields = (F.split(stripped, r"\s+") if not delimiter
                else F.split(F.col("value"), _regex_quote(delimiter), -1))
      frame = (text.select("line", fields.alias("f"))
               .select("line", F.col("f")[0].alias("c_source"),
                       F.posexplode(F.slice(F.col("f"), 2, 1 << 30)).alias("sub", "c_target"))
               .withColumn("ncols", F.lit(None).cast("int")))
      expected = None
    else:
      reader = edge_reading.TextReader(source, data.delimiter, data.on_error == "skip")
      expected = reader.num_columns
      text = text.where(F.length(F.col("value")) > 0)
      delimiter = reader.delimiter
      if source.format == "csv":
        ddl = ", ".join(f"c{i} STRING" for i in range(expected or 1))
        parsed = F.from_csv(F.col("value"), ddl, {"sep": delimiter, "quote": '"'})
        fields = F.array(*[parsed[f"c{i}"] for i in range(expected or 1)])
        count = F.lit(expected)
      else:
        fields = F.split(F.col("value"), _regex_quote(delimiter), -1)
        count = F.size(fields)
      frame = text.select("line", fields.alias("f"), count.alias("ncols"))
      frame = frame.select("line", "ncols", *[
          F.col("f")[reader.column_index[role]].alias(f"c_{role}") for role in columns])
  if "sub" not in frame.columns:
    frame = frame.withColumn("sub", F.lit(0))
  if "relation" in columns:
    relname = F.coalesce(F.col("c_relation"), F.lit(""))
    if source.relation_name:
      prefix, _, suffix = source.relation_name.partition("{}")
      relname = F.concat(F.lit(prefix), relname, F.lit(suffix))
  else:
    relname = F.lit(source.relation_name)
  frame = frame.withColumn("relname", relname)
  frame = frame.join(F.broadcast(relation_table), "relname", "left")
  weight = (F.col("c_weight").cast("string") if "weight" in columns
            else F.lit(None).cast("string"))
  return frame.select(
      F.lit(index).alias("file"), "line", "sub", F.col("c_source").alias("src"),
      F.col("c_target").alias("dst"), "relname", "rel", "stype", "dtype",
      weight.alias("weight_text"), "ncols",
      F.lit(expected).cast("int").alias("expected"),
      F.lit("weight" in columns).alias("has_weight"),
      F.lit(source.format == "parquet").alias("is_parquet"),
      F.lit(source.split).alias("split_name"))


def _materialise(spark, frame, path: str):
  """Writes a DataFrame to Parquet and reads it back: later queries start
  from a plain scan instead of re-planning (and re-running) the whole
  lineage, which otherwise grows with every step (and, on a JVM of 1 GB,
  ran out of heap just printing its plan)."""
  frame.write.parquet(path)
  return spark.read.parquet(path)


def _regex_quote(text: str) -> str:
  return re.escape(text)


def _reasons(frame):
  """Adds ``reason`` (0: fine, else 1 + index in edge_reading.REASONS, first
  problem wins as in the DuckDB engine) and ``weight``."""
  # lazy: pyspark (and its JVM) loads only when the Spark engine runs
  from pyspark.sql import functions as F
  code = {r: i + 1 for i, r in enumerate(edge_reading.REASONS)}
  weight = F.expr("try_cast(weight_text AS DOUBLE)")
  empty = lambda c: F.col(c).isNull() | (F.length(F.col(c)) == 0)  # noqa: E731
  bad_weight_text = F.col("has_weight") & empty("weight_text")
  reason = (F.when(F.col("ncols").isNotNull() & (F.col("ncols") != F.col("expected")),
                   code[edge_reading.COLUMN_COUNT])
            .when(empty("src") | empty("dst") | bad_weight_text
                  | (F.col("relname") == F.lit("")), code[edge_reading.EMPTY_FIELD])
            .when(F.col("is_parquet") & (F.col("src").rlike("[\r\n]")
                                         | F.col("dst").rlike("[\r\n]")),
                  code[edge_reading.NEWLINE_IN_NAME])
            .when(F.col("rel").isNull(), code[edge_reading.UNKNOWN_RELATION])
            .when(F.col("has_weight") & weight.isNull(), code[edge_reading.WEIGHT_NOT_A_NUMBER])
            .when(F.col("has_weight") & (F.isnan(weight) | (F.abs(weight) == float("inf"))),
                  code[edge_reading.WEIGHT_NOT_FINITE])
            .when(F.col("has_weight") & (weight < 0), code[edge_reading.WEIGHT_NEGATIVE])
            .otherwise(0))
  return frame.withColumn("reason", reason).withColumn(
      "weight", F.when(F.col("has_weight"), weight).otherwise(1.0).cast("float"))


def _row_error(row, sources, relation_names) -> edge_reading.GraphImportError:
  reason = edge_reading.REASONS[row["reason"] - 1]
  if reason == edge_reading.COLUMN_COUNT:
    message = f"expected {row['expected']} columns, found {row['ncols']}"
  elif reason == edge_reading.EMPTY_FIELD:
    role = ("source" if not row["src"] else "target" if not row["dst"]
            else "relation" if not row["relname"] else "weight")
    message = f"empty {role} field"
  elif reason == edge_reading.NEWLINE_IN_NAME:
    message = "entity name contains a line break"
  elif reason == edge_reading.UNKNOWN_RELATION:
    message = (f"unknown relation {row['relname']!r} (declared: "
               f"{edge_reading.preview(relation_names)})")
  else:
    problem = {edge_reading.WEIGHT_NOT_A_NUMBER: "is not a number",
               edge_reading.WEIGHT_NOT_FINITE: "is not finite",
               edge_reading.WEIGHT_NEGATIVE: "is negative"}[reason]
    message = f"weight {row['weight_text']!r} {problem}"
  return edge_reading.GraphImportError(sources[row["file"]].path, int(row["line"]), message,
                                       reason)


def _stream_parquet(directory: str):
  """Batches of the part files Spark wrote for a globally sorted DataFrame,
  in order (part-00000, part-00001, ...: the range partitions in order)."""
  for path in sorted(glob.glob(os.path.join(directory, "part-*.parquet"))):
    yield from pq.ParquetFile(path).iter_batches(batch_size=import_duckdb.FETCH_ROWS)


def build(config, schema, sources, work_dir: str, progress: bool) -> dict:
  """The Spark import into ``work_dir``; returns the manifest."""
  data = config.data
  if float(data.valid_fraction) or float(data.test_fraction):
    raise ValueError("config.data.valid_fraction / test_fraction: the spark engine does not "
                     "draw holdout splits; split the files beforehand, or use the duckdb engine")
  stage = os.path.join(work_dir, "spark")
  spark = session(data.get("spark_master", ""), data.get("import_memory_limit", "1GB"),
                  os.path.join(stage, "local"))
  try:
    with tqdm(total=9, desc="import: spark", disable=not progress) as bar:
      def step(name: str) -> None:
        bar.set_postfix_str(name)
        bar.update(1)
      return _build(spark, config, schema, sources, work_dir, stage, step)
  finally:
    # The session goes with the import: a JVM left running would hold its
    # memory through the training that follows.
    spark.stop()
    shutil.rmtree(stage, ignore_errors=True)


def _build(spark, config, schema, sources, work_dir, stage, step) -> dict:
  # lazy: pyspark (and its JVM) loads only when the Spark engine runs
  from pyspark.sql import Window
  # lazy: pyspark (and its JVM) loads only when the Spark engine runs
  from pyspark.sql import functions as F
  data = config.data
  seed = int(config.train.seed)
  skip = data.on_error == "skip"
  relation_names = [r["name"] for r in schema.relations]
  relation_table = spark.createDataFrame(
      [(name, i, int(schema.source_type[i]), int(schema.target_type[i]))
       for i, name in enumerate(relation_names)], "relname STRING, rel INT, stype INT, dtype INT")
  weighted = any("weight" in s.columns for s in sources)

  step("read")
  frames = [_read_source(spark, i, s, data, relation_table) for i, s in enumerate(sources)]
  rows = frames[0]
  for frame in frames[1:]:
    rows = rows.unionByName(frame)
  rows = _reasons(rows).withColumn(
      "pos", F.shiftleft(F.col("file").cast("long"), _LINE_BITS) + F.col("line"))
  rows = _materialise(spark, rows, os.path.join(stage, "rows"))

  skipped = {}
  bad = rows.where(F.col("reason") > 0)
  if not skip:
    first = bad.orderBy("pos", "sub").limit(1).collect()
    if first:
      raise _row_error(first[0].asDict(), sources, relation_names)
  else:
    for reason, count in bad.groupBy("reason").count().collect():
      skipped[edge_reading.REASONS[reason - 1]] = int(count)
  split_code = F.create_map(*[x for name, code in edge_reading.SPLIT_CODES.items()
                              for x in (F.lit(name), F.lit(code))])
  edges = rows.where(F.col("reason") == 0).select(
      "pos", "sub", "src", "dst", "rel", "stype", "dtype", "weight",
      split_code[F.col("split_name")].alias("split"))

  step("types")
  if bool(data.names_global) and len(schema.types) > 1:
    occurrences = edges.select(F.col("src").alias("name"), F.col("stype").alias("type"),
                               "pos", "sub").unionByName(
        edges.select(F.col("dst").alias("name"), F.col("dtype").alias("type"), "pos", "sub"))
    first_use = occurrences.groupBy("name", "type").agg(
        F.min(F.struct("pos", "sub")).alias("first"))
    contested = (first_use.groupBy("name")
                 .agg(F.min(F.struct("first", "type")).alias("winner"), F.count("*").alias("n"))
                 .where(F.col("n") > 1).select("name", F.col("winner.type").alias("owner")))
    conflicts = (edges.join(contested, edges.src == contested.name)
                 .where(F.col("stype") != F.col("owner"))
                 .select("pos", "sub", "name", F.col("stype").alias("type"), "owner",
                         F.lit(0).alias("side"))
                 .unionByName(edges.join(contested, edges.dst == contested.name)
                              .where(F.col("dtype") != F.col("owner"))
                              .select("pos", "sub", "name", F.col("dtype").alias("type"),
                                      "owner", F.lit(1).alias("side"))))
    if not skip:
      first = conflicts.orderBy("pos", "sub", "side").limit(1).collect()
      if first:
        row = first[0]
        file_index = row["pos"] >> _LINE_BITS
        types = schema.types
        raise edge_reading.GraphImportError(
            sources[file_index].path, row["pos"] & ((1 << _LINE_BITS) - 1),
            f"{row['name']!r} is used as entity type {types[row['type']]!r} here but is "
            f"already of type {types[row['owner']]!r} (data.names_global: a name has one "
            "entity type)", edge_reading.ENTITY_TYPE_CONFLICT)
    else:
      dropped = conflicts.select("pos", "sub").distinct()
      count = dropped.count()
      if count:
        skipped[edge_reading.ENTITY_TYPE_CONFLICT] = int(count)
        edges = edges.join(dropped, ["pos", "sub"], "left_anti")
  edges = _materialise(spark, edges, os.path.join(stage, "edges"))

  step("ids")
  id_ranges = RANGES_PER_CORE * spark.sparkContext.defaultParallelism
  drop_unseen = bool(data.get("drop_unseen_eval_entities", False))
  named = edges.where(F.col("split") == 0) if drop_unseen else edges
  prefixes = spark.createDataFrame(
      [(t, import_duckdb.type_prefix(seed, name)) for t, name in enumerate(schema.types)],
      "type INT, prefix STRING")
  distinct = (named.select(F.col("stype").alias("type"), F.col("src").alias("name"))
              .unionByName(named.select(F.col("dtype").alias("type"), F.col("dst").alias("name")))
              .distinct()
              .join(F.broadcast(prefixes), "type")
              .withColumn("key", F.md5(F.concat(F.col("prefix"), F.col("name"))))
              # Range of the key: its first 8 hex digits scaled to [0, id_ranges).
              .withColumn("range", F.expr(
                  f"(cast(conv(substring(key, 1, 8), 16, 10) AS BIGINT) * {id_ranges}) "
                  "div 4294967296").cast("int"))
              .drop("prefix"))
  distinct = _materialise(spark, distinct.repartition(id_ranges, "type", "range"),
                          os.path.join(stage, "distinct"))
  range_counts = {(t, r): n for t, r, n in
                  distinct.groupBy("type", "range").count().collect()}
  offsets, counts = [], []
  for t in range(len(schema.types)):
    total = 0
    for r in range(id_ranges):
      offsets.append((t, r, total))
      total += range_counts.get((t, r), 0)
    counts.append(total)
  offset_table = spark.createDataFrame(offsets, "type INT, range INT, first_id LONG")
  rank = F.row_number().over(Window.partitionBy("type", "range").orderBy("key", "name"))
  vocab = _materialise(spark, distinct.join(F.broadcast(offset_table), ["type", "range"])
                       .withColumn("id", F.col("first_id") + rank - 1)
                       .select("type", "name", "id"), os.path.join(stage, "vocab"))

  step("vocabulary files")
  for t, name in enumerate(schema.types):
    by_id = os.path.join(stage, f"vocab_{t}_by_id")
    by_name = os.path.join(stage, f"vocab_{t}_by_name")
    typed = vocab.where(F.col("type") == t)
    typed.orderBy("id").select("name").write.parquet(by_id)
    typed.orderBy("name").select("name", "id").write.parquet(by_name)
    graph_writer.write_vocabulary(work_dir, name, _stream_parquet(by_id),
                                  _stream_parquet(by_name))

  step("join")
  source_ids = vocab.select(F.col("type").alias("stype"), F.col("name").alias("src"),
                            F.col("id").alias("src_id"))
  target_ids = vocab.select(F.col("type").alias("dtype"), F.col("name").alias("dst"),
                            F.col("id").alias("dst_id"))
  remapped = _materialise(
      spark, edges.join(source_ids, ["stype", "src"]).join(target_ids, ["dtype", "dst"])
      .select("pos", "sub", "split", "rel", "stype", "dtype", "src_id", "dst_id", "weight"),
      os.path.join(stage, "remapped"))

  step("buckets")
  sizes = [max(1, -(-n // p)) for n, p in zip(counts, schema.num_partitions)]
  size_table = spark.createDataFrame(
      [(i, sizes[int(schema.source_type[i])], sizes[int(schema.target_type[i])])
       for i in range(len(relation_names))], "rel INT, src_size LONG, dst_size LONG")
  train_dir = os.path.join(stage, "train")
  (remapped.where(F.col("split") == 0).join(F.broadcast(size_table), "rel")
   .select(F.expr("src_id div src_size").cast("int").alias("lhs"),
           F.expr("dst_id div dst_size").cast("int").alias("rhs"),
           (F.col("src_id") % F.col("src_size")).cast("int").alias("src"),
           (F.col("dst_id") % F.col("dst_size")).cast("int").alias("dst"),
           "rel", "weight", "pos", "sub")
   .orderBy("lhs", "rhs", "pos", "sub").drop("pos", "sub").write.parquet(train_dir))
  bucket_sizes = graph_writer.write_buckets(work_dir, _stream_parquet(train_dir), schema.grid,
                                            weighted)

  step("splits")
  for split in ("valid", "test"):
    split_dir = os.path.join(stage, split)
    (remapped.where(F.col("split") == edge_reading.SPLIT_CODES[split]).orderBy("pos", "sub")
     .select(F.col("src_id").alias("src"), F.col("dst_id").alias("dst"), "rel")
     .write.parquet(split_dir))
    graph_writer.write_split(work_dir, split, _stream_parquet(split_dir))

  step("degrees")
  train = remapped.where(F.col("split") == 0)
  degree = (train.select(F.col("stype").alias("type"), F.col("src_id").alias("id"))
            .unionByName(train.select(F.col("dtype").alias("type"), F.col("dst_id").alias("id")))
            .groupBy("type", "id").agg(F.count("*").alias("degree")))
  degree = _materialise(spark, degree, os.path.join(stage, "degree"))
  without_train = []
  for t, name in enumerate(schema.types):
    degree_dir = os.path.join(stage, f"degree_{t}")
    degree.where(F.col("type") == t).orderBy("id").select("id", "degree").write.parquet(
        degree_dir)
    without_train.append(graph_writer.write_degrees(work_dir, name, counts[t],
                                                    _stream_parquet(degree_dir)))

  step("statistics")
  num_relations = len(relation_names)
  names = {code: s for s, code in edge_reading.SPLIT_CODES.items()}
  relation_counts = {s: [0] * num_relations for s in edge_reading.SPLIT_CODES}
  self_loops = {s: 0 for s in edge_reading.SPLIT_CODES}
  loop = ((F.col("stype") == F.col("dtype")) & (F.col("src_id") == F.col("dst_id"))).cast("int")
  for row in remapped.groupBy("split", "rel").agg(F.count("*").alias("n"),
                                                  F.sum(loop).alias("loops")).collect():
    relation_counts[names[row["split"]]][row["rel"]] = int(row["n"])
    self_loops[names[row["split"]]] += int(row["loops"])
  duplicates = {s: 0 for s in edge_reading.SPLIT_CODES}
  for row in (remapped.groupBy("split", "rel", "src_id", "dst_id").count()
              .where(F.col("count") > 1).groupBy("split")
              .agg(F.sum(F.col("count") - 1).alias("extra")).collect()):
    duplicates[names[row["split"]]] = int(row["extra"])
  coverage = [(0, 0)] * num_relations
  for row in (train.groupBy("rel").agg(F.countDistinct("src_id").alias("s"),
                                       F.countDistinct("dst_id").alias("d")).collect()):
    coverage[row["rel"]] = (int(row["s"]), int(row["d"]))
  trained = degree.select("type", "id")
  evaluation = remapped.where(F.col("split") > 0)
  source_seen = trained.select(F.col("type").alias("stype"), F.col("id").alias("src_id"),
                               F.lit(True).alias("s_seen"))
  target_seen = trained.select(F.col("type").alias("dtype"), F.col("id").alias("dst_id"),
                               F.lit(True).alias("d_seen"))
  with_unseen = {s: 0 for s in ("valid", "test")}
  for row in (evaluation.join(source_seen, ["stype", "src_id"], "left")
              .join(target_seen, ["dtype", "dst_id"], "left")
              .where(F.col("s_seen").isNull() | F.col("d_seen").isNull())
              .groupBy("split").count().collect()):
    with_unseen[names[row["split"]]] = int(row["count"])
  kept = {names[row["split"]]: int(row["count"])
          for row in edges.groupBy("split").count().collect()}
  dropped = {s: kept.get(s, 0) - sum(relation_counts[s]) for s in ("valid", "test")}
  stats = dict(counts=counts, bucket_sizes=bucket_sizes, without_train=without_train,
               relation_counts=relation_counts, self_loops=self_loops, duplicates=duplicates,
               coverage=coverage, eval_edges_with_unseen=with_unseen,
               dropped_unseen_eval_edges=dropped)
  records = [edge_reading.source_record(s, edge_reading.hash_file(s.path)) for s in sources]
  return edge_reading.make_manifest(config, schema, stats, records, skipped, weighted)
