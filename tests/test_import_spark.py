"""The Spark import engine against the DuckDB one: the same graph (ids,
buckets, splits, degrees, statistics) for the same input and seed, and the
same errors. Runs Spark in local mode (local[2]); needs a JDK (CI installs
openjdk-17-jre-headless), and fails rather than skips without one."""

from __future__ import annotations

import gzip
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from twhin_jax import config as config_lib
from twhin_jax.importer import GraphImportError, import_graph

from test_import import assert_same_graph, make_config, write_text

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def java_present():
  assert shutil.which("java"), ("no java on PATH: the Spark engine needs a JDK "
                                "(apt-get install -y openjdk-17-jre-headless)")


def spark_config(config):
  config.data.spark_master = "local[2]"
  config.data.import_memory_limit = "1GB"
  return config


def mixed_input(tmp_path, with_bad_lines: bool):
  """Users (2 partitions) and items; TSV with weights (gz), quoted CSV with a
  header, Parquet with integer ad ids, an adjacency list, valid and test."""
  rng = np.random.default_rng(0)
  users = [f"u{i}" for i in range(60)]
  items = [f"item {i}, é" for i in range(25)]  # a comma: CSV must quote it
  follows = [f"{users[a]}\tfollows\t{users[b]}\t{w:.2f}" for a, b, w in
             zip(rng.integers(0, 60, 300), rng.integers(0, 60, 300), rng.random(300) * 3)]
  if with_bad_lines:
    follows[10] = "u1\tfollows"                  # column count
    follows[20] = "u1\tfollows\tu2\t-1"          # negative weight
    follows[30] = "u1\tunknown\tu2\t1"           # unknown relation
    follows[40] = "u1\tfollows\t\t1"             # empty field
    follows[50] = "item 3, é\tfollows\tu2\t1"    # an item used as a user
  write_text(tmp_path / "follows.tsv.gz", follows, compress=True)
  clicks = [f'{users[a]},"{items[b]}"' for a, b in
            zip(rng.integers(0, 60, 200), rng.integers(0, 25, 200))]
  write_text(tmp_path / "clicks.csv", clicks, header="user,item")
  pq.write_table(pa.table({"user": [users[u] for u in rng.integers(0, 60, 150)],
                           "ad": rng.integers(0, 40, 150)}),
                 tmp_path / "views.parquet")
  adjacency = [" ".join([users[u]] + [f"t{t}" for t in rng.integers(0, 30, rng.integers(0, 6))])
               for u in range(0, 60, 2)]
  write_text(tmp_path / "wrote.txt", adjacency)
  write_text(tmp_path / "valid.tsv", [f"u{i}\tfollows\tu{i + 1}\t1" for i in range(20)]
             + ["newcomer\tfollows\tu3\t1"])
  write_text(tmp_path / "test.tsv", [f"u{i}\tfollows\tu{i}\t1" for i in range(5)])
  files = [
      config_lib.file_spec(str(tmp_path / "follows.tsv.gz"), weight=3),
      config_lib.file_spec(str(tmp_path / "clicks.csv"), header=True, source="user",
                           target="item", relation=None, relation_name="clicks"),
      config_lib.file_spec(str(tmp_path / "views.parquet"), source="user", target="ad",
                           relation=None, relation_name="views"),
      config_lib.file_spec(str(tmp_path / "wrote.txt"), format="adjacency", relation=None,
                           relation_name="wrote"),
      config_lib.file_spec(str(tmp_path / "valid.tsv"), weight=3, split="valid"),
      config_lib.file_spec(str(tmp_path / "test.tsv"), weight=3, split="test")]
  config = make_config(
      files, entities={"user": 2, "item": 1, "ad": 1, "tweet": 2},
      relations=[("follows", "user", "user"), ("clicks", "user", "item"),
                 ("views", "user", "ad"), ("wrote", "user", "tweet")], seed=7)
  return spark_config(config)


def test_spark_and_duckdb_give_the_same_graph(tmp_path):
  config = mixed_input(tmp_path, with_bad_lines=True)
  config.data.on_error = "skip"
  with pytest.warns(UserWarning, match="import skipped"):
    duck = import_graph(config, str(tmp_path / "duck"), progress=False, engine="duckdb")
  with pytest.warns(UserWarning, match="import skipped"):
    spark = import_graph(config, str(tmp_path / "spark"), progress=False, engine="spark")
  # follows.tsv line 51 makes 'item 3, é' a user: every click on it conflicts.
  clicks_on_it = (tmp_path / "clicks.csv").read_text().count('"item 3, é"')
  assert clicks_on_it > 0
  assert duck.manifest["skipped"] == {"column_count": 1, "empty_field": 1,
                                      "entity_type_conflict": clicks_on_it,
                                      "unknown_relation": 1, "weight_negative": 1}
  assert duck.manifest["build"]["engine"] == "duckdb"
  assert spark.manifest["build"]["engine"] == "spark"
  assert duck.num_edges("train") > 600 and duck.bucket_grid == (2, 2)
  assert duck.manifest["quality"]["eval_edges_with_unseen_entities"]["valid"] == 1
  assert_same_graph(duck, spark)


def test_spark_reports_file_and_line(tmp_path):
  config = mixed_input(tmp_path, with_bad_lines=True)
  path = str(tmp_path / "follows.tsv.gz")
  with pytest.raises(GraphImportError, match=rf"^{path}:11: expected 4 columns, found 2"):
    import_graph(config, str(tmp_path / "g"), progress=False, engine="spark")
  with gzip.open(path, "rt") as f:
    lines = f.read().splitlines()
  lines[10] = "u1\tfollows\tu9\t1"
  write_text(path, [line for i, line in enumerate(lines) if i not in (20, 30, 40)],
             compress=True)
  # The item name in line 51 (now 48) of follows was first seen as a user? No:
  # clicks.csv comes later, so the user wins and clicks.csv's line is at fault.
  with pytest.raises(GraphImportError, match=r"'item 3, é' is used as entity type 'item' here "
                     "but is already of type 'user'") as spark_error:
    import_graph(config, str(tmp_path / "g"), progress=False, engine="spark")
  with pytest.raises(GraphImportError) as duck_error:
    import_graph(config, str(tmp_path / "g"), progress=False, engine="duckdb")
  assert str(spark_error.value) == str(duck_error.value)
  assert not os.path.exists(tmp_path / "g")
