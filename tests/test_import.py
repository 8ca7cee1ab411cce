"""Tests of twhin_jax.importer: input formats, the on-disk result, bad input."""

from __future__ import annotations

import collections
import glob
import gzip
import hashlib
import math
import os

import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from twhin_jax import config as config_lib
from twhin_jax import graph as graph_lib
from twhin_jax import edge_reading
from twhin_jax import importer
from twhin_jax.importer import GraphImportError, import_graph

RELATIONS = [("likes", "node", "node"), ("knows", "node", "node")]


def make_config(files, *, entities=None, relations=None, seed=0, **data):
  config = config_lib.base_config()
  for name, partitions in (entities or {"node": 1}).items():
    config.entities[name] = ml_collections.ConfigDict(dict(num_partitions=partitions, dim=0))
  config.relations = [dict(name=n, source=s, target=t, operator="translation", weight=1.0)
                      for n, s, t in (relations or RELATIONS)]
  config.data.files = files
  config.train.seed = seed
  for key, value in data.items():
    config.data[key] = value
  return config


def write_text(path, lines, *, newline="\n", header=None, compress=False) -> str:
  text = "".join(line + newline for line in ([header] if header else []) + list(lines))
  data = text.encode("utf-8")
  if compress:
    data = gzip.compress(data)
  with open(path, "wb") as f:
    f.write(data)
  return str(path)


def kg_triples(num_edges: int, num_nodes: int, seed: int = 0) -> list[tuple[str, str, str]]:
  """Distinct (head, relation, tail) triples; names include a space and non-ASCII."""
  rng = np.random.default_rng(seed)
  names = [f"node {i}" if i % 7 else f"nöde_{i}" for i in range(num_nodes)]
  triples = set()
  while len(triples) < num_edges:
    h, t = rng.integers(0, num_nodes, 2)
    triples.add((names[h], RELATIONS[rng.integers(0, 2)][0], names[t]))
  return sorted(triples, key=lambda x: rng.random())


def train_triples_from_buckets(graph) -> collections.Counter:
  """Rebuilds named train triples (with multiplicity) from the bucket files
  with the partition math of graph.py, independently of Graph.split_edges."""
  names = {t: graph.names(t) for t in graph.entities}
  triples = []
  for (i, j), size in graph.bucket_sizes().items():
    edges = graph.bucket_edges(i, j)
    assert len(edges["src"]) == size
    assert edges["src"].dtype == np.int32 and edges["dst"].dtype == np.int32
    assert edges["rel"].dtype == np.int32
    for s, r, d in zip(edges["src"], edges["rel"], edges["dst"]):
      rel = graph.relations[r]
      src_info, dst_info = graph.entities[rel.source], graph.entities[rel.target]
      src_part = i if src_info.num_partitions > 1 else 0
      dst_part = j if dst_info.num_partitions > 1 else 0
      assert 0 <= s < src_info.partition_rows(src_part)
      assert 0 <= d < dst_info.partition_rows(dst_part)
      triples.append((names[rel.source][src_part * src_info.partition_size + s], rel.name,
                      names[rel.target][dst_part * dst_info.partition_size + d]))
  return collections.Counter(triples)


def named_split(graph, split) -> set[tuple[str, str, str]]:
  edges = graph.split_edges(split)
  out = set()
  for s, r, d in zip(edges["src"], edges["rel"], edges["dst"]):
    rel = graph.relations[r]
    out.add((graph.names(rel.source)[s], rel.name, graph.names(rel.target)[d]))
  return out


def assert_same_graph(a, b):
  assert a.entities == b.entities
  for t in a.entities:
    assert a.names(t) == b.names(t), t
    np.testing.assert_array_equal(a.degrees(t), b.degrees(t))
  assert a.bucket_sizes() == b.bucket_sizes()
  for (i, j) in a.bucket_sizes():
    edges_a, edges_b = a.bucket_edges(i, j), b.bucket_edges(i, j)
    for key in ("src", "dst", "rel", "weight"):
      np.testing.assert_array_equal(edges_a[key], edges_b[key], err_msg=f"{i}_{j} {key}")
  for split in ("valid", "test"):
    for key, values in a.split_edges(split).items():
      np.testing.assert_array_equal(values, b.split_edges(split)[key])
  for key in ("counts", "relation_counts", "skipped", "quality", "coverage", "bucket_sizes",
              "sources", "options", "weighted", "hash"):
    assert a.manifest[key] == b.manifest[key], key



# ----------------------------------------------------------------------------
# Round trips


def test_tsv_round_trip(tmp_path):
  triples = kg_triples(300, 40)
  train, valid, test = triples[:240], triples[240:270], triples[270:]
  files = [config_lib.file_spec(write_text(tmp_path / f"{name}.tsv", ["\t".join(t) for t in part]),
                                split=name)
           for name, part in (("train", train), ("valid", valid), ("test", test))]
  graph = import_graph(make_config(files, entities={"node": 3}), str(tmp_path / "g"),
                       progress=False)

  # Every name of every split is in the vocabulary, exactly once.
  names = graph.names("node")
  everything = {n for h, _, t in triples for n in (h, t)}
  assert sorted(names) == sorted(everything)
  for name in everything:
    assert names[graph.lookup("node", name)] == name
  with pytest.raises(KeyError, match="unknown node"):
    graph.lookup("node", "nobody")

  info = graph.entities["node"]
  assert info.count == len(everything) and info.num_partitions == 3
  assert info.partition_size == math.ceil(len(everything) / 3)
  assert train_triples_from_buckets(graph) == collections.Counter(train)
  assert named_split(graph, "train") == set(train)
  assert named_split(graph, "valid") == set(valid)
  assert named_split(graph, "test") == set(test)

  degrees = graph.degrees("node")
  expected = collections.Counter(n for h, _, t in train for n in (h, t))
  assert degrees.dtype == np.int64 and degrees.sum() == 2 * len(train)
  for name in everything:
    assert degrees[graph.lookup("node", name)] == expected[name]

  m = graph.manifest
  assert m["format_version"] == graph_lib.FORMAT_VERSION
  assert m["counts"] == {"train": 240, "valid": 30, "test": 30}
  assert m["skipped"] == {} and m["weighted"] is False
  assert set(m["bucket_sizes"]) == {f"{i}_{j}" for i in range(3) for j in range(3)}
  assert sum(m["bucket_sizes"].values()) == 240
  assert m["schema"]["entities"] == {"node": {"count": len(everything), "num_partitions": 3}}
  assert [r["name"] for r in m["schema"]["relations"]] == ["likes", "knows"]
  assert m["relation_counts"]["likes"]["train"] == sum(r == "likes" for _, r, _ in train)
  with open(files[0]["path"], "rb") as f:
    assert m["sources"][0]["sha256"] == hashlib.sha256(f.read()).hexdigest()
  assert m["sources"][0]["bytes"] == os.path.getsize(files[0]["path"])
  assert [s["split"] for s in m["sources"]] == ["train", "valid", "test"]
  assert m["hash"] == edge_reading.manifest_hash(m) and len(m["hash"]) == 16
  assert not os.path.exists(os.path.join(graph.path, "spool"))
  assert "train 240" in importer.summarize(graph)


def test_partitions_are_balanced_and_seeded(tmp_path):
  # Names in degree order: without the shuffle, partition 0 would hold the hubs.
  lines = [f"hub{i % 10}\tlikes\tleaf{i}" for i in range(2000)]
  path = write_text(tmp_path / "e.tsv", lines)
  graphs = [import_graph(make_config([config_lib.file_spec(path)], entities={"node": 4}, seed=s),
                         str(tmp_path / f"g{k}"), progress=False)
            for k, s in enumerate((0, 0, 1))]
  # Edges per source partition: the 10 hubs (200 edges each) are spread out.
  rows = collections.Counter()
  for (i, _), size in graphs[0].bucket_sizes().items():
    rows[i] += size
  assert max(rows.values()) <= 1000, rows
  assert graphs[0].names("node") == graphs[1].names("node")
  assert graphs[0].names("node") != graphs[2].names("node")
  assert graphs[0].manifest_hash == graphs[1].manifest_hash != graphs[2].manifest_hash


def test_two_entity_types_bucket_grid(tmp_path, capsys):
  users = write_text(tmp_path / "follows.tsv", [f"u{i}\tu{(i * 7) % 50}" for i in range(50)])
  clicks = write_text(tmp_path / "clicks.tsv", [f"u{i % 50}\t{i % 13}" for i in range(120)])
  files = [
      config_lib.file_spec(users, source=0, target=1, relation=None, relation_name="follows"),
      config_lib.file_spec(clicks, source=0, target=1, relation=None, relation_name="clicks")]
  config = make_config([], entities={"user": 2, "item": 1},
                       relations=[("follows", "user", "user"), ("clicks", "user", "item")],
                       names_global=False)
  # Files passed in (as a generator would) rather than from the config; with
  # progress bars.
  graph = import_graph(config, str(tmp_path / "g"), files=files, progress=True)
  assert "import: read" in capsys.readouterr().err
  assert graph.bucket_grid == (2, 2)
  assert graph.entities["user"].count == 50 and graph.entities["item"].count == 13
  triples = train_triples_from_buckets(graph)
  assert triples == collections.Counter(
      [(f"u{i}", "follows", f"u{(i * 7) % 50}") for i in range(50)]
      + [(f"u{i % 50}", "clicks", str(i % 13)) for i in range(120)])
  # Items are unpartitioned: every click is in column 0 of the grid.
  clicks_rel = graph.relation_index["clicks"]
  for (i, j), size in graph.bucket_sizes().items():
    rel = graph.bucket_edges(i, j)["rel"]
    if j == 1:
      assert clicks_rel not in rel
  assert sum(graph.degrees("item")) == 120


def _same_graph(a, b):
  assert a.names("node") == b.names("node")
  assert a.bucket_sizes() == b.bucket_sizes()
  for (i, j) in a.bucket_sizes():
    for key in ("src", "dst", "rel"):
      np.testing.assert_array_equal(a.bucket_edges(i, j)[key], b.bucket_edges(i, j)[key])


def test_gz_csv_parquet_inputs_give_the_same_graph(tmp_path):
  triples = kg_triples(200, 30)
  lines = ["\t".join(t) for t in triples]
  plain = write_text(tmp_path / "e.tsv", lines)
  crlf_gz = write_text(tmp_path / "e.txt.gz", lines, newline="\r\n", compress=True)
  csv_lines = [",".join(f'"{x}"' if " " in x else x for x in t) for t in triples]
  csv_path = write_text(tmp_path / "e.csv", csv_lines, header="head,relation,tail")
  parquet = str(tmp_path / "e.parquet")
  pq.write_table(pa.table({"h": [t[0] for t in triples], "r": [t[1] for t in triples],
                           "t": [t[2] for t in triples]}), parquet)
  specs = {
      "tsv": config_lib.file_spec(plain),
      "gz": config_lib.file_spec(crlf_gz),
      "csv": config_lib.file_spec(csv_path, header=True),
      "csv_named": config_lib.file_spec(csv_path, header=True, source="head",
                                        relation="relation", target="tail"),
      "parquet": config_lib.file_spec(parquet, source="h", relation="r", target="t"),
      "parquet_index": config_lib.file_spec(parquet),
  }
  graphs = {k: import_graph(make_config([spec], entities={"node": 2}), str(tmp_path / k),
                            progress=False) for k, spec in specs.items()}
  assert train_triples_from_buckets(graphs["tsv"]) == collections.Counter(triples)
  for key, graph in graphs.items():
    _same_graph(graphs["tsv"], graph)
    assert graph.manifest["counts"]["train"] == 200, key
  # The sources (and so the hash) differ; the content does not.
  assert graphs["gz"].manifest_hash != graphs["tsv"].manifest_hash


def test_parquet_integer_ids_and_weights(tmp_path):
  path = str(tmp_path / "ratings.parquet")
  pq.write_table(pa.table({"user": np.array([1, 2, 3, 1], np.int64),
                           "item": np.array([10, 10, 20, 30], np.int32),
                           "stars": np.array([5, 4, 0.5, 2], np.float64)}), path)
  config = make_config(
      [config_lib.file_spec(path, source="user", target="item", relation=None,
                            relation_name="rated", weight="stars")],
      entities={"user": 1, "item": 1}, relations=[("rated", "user", "item")], names_global=False)
  graph = import_graph(config, str(tmp_path / "g"), progress=False)
  assert sorted(graph.names("user")) == ["1", "2", "3"]
  edges = graph.bucket_edges(0, 0)
  got = {(graph.names("user")[s], graph.names("item")[d], float(w))
         for s, d, w in zip(edges["src"], edges["dst"], edges["weight"])}
  assert got == {("1", "10", 5.0), ("2", "10", 4.0), ("3", "20", 0.5), ("1", "30", 2.0)}


def test_relation_format_string_and_weights(tmp_path):
  # Ciao-like: user, product, category, rating, helpfulness; weighted by helpfulness.
  rows = [("u1", "p1", "c1", "5", "2"), ("u2", "p1", "c1", "1", "0.5"),
          ("u1", "p2", "c2", "3", "1")]
  path = write_text(tmp_path / "rating.tsv.gz", ["\t".join(r) for r in rows], compress=True)
  trust = write_text(tmp_path / "trust.tsv", ["u1\tu2"])
  config = make_config(
      [config_lib.file_spec(path, source=0, target=1, relation=3, relation_name="rated_{}",
                            weight=4),
       config_lib.file_spec(path, source=1, target=2, relation=None, relation_name="in_category"),
       config_lib.file_spec(trust, source=0, target=1, relation=None, relation_name="trust")],
      entities={"user": 1, "product": 1, "category": 1},
      relations=[(f"rated_{k}", "user", "product") for k in range(1, 6)]
      + [("in_category", "product", "category"), ("trust", "user", "user")],
      names_global=False)
  graph = import_graph(config, str(tmp_path / "g"), progress=False)
  assert graph.weighted
  # Duplicate edges are kept: p1 is in c1 once per rating of p1.
  assert train_triples_from_buckets(graph) == collections.Counter({
      ("u1", "rated_5", "p1"): 1, ("u2", "rated_1", "p1"): 1, ("u1", "rated_3", "p2"): 1,
      ("p1", "in_category", "c1"): 2, ("p2", "in_category", "c2"): 1, ("u1", "trust", "u2"): 1})
  edges = graph.bucket_edges(0, 0)
  weights = {(graph.relations[r].name, float(w)) for r, w in zip(edges["rel"], edges["weight"])}
  # Files without a weight column give weight 1.
  assert weights == {("rated_5", 2.0), ("rated_1", 0.5), ("rated_3", 1.0),
                     ("in_category", 1.0), ("trust", 1.0)}
  assert graph.manifest["relation_counts"]["in_category"]["train"] == 3


def test_holdout_fractions_are_seeded(tmp_path):
  lines = [f"n{i}\tlikes\tn{(i * 31) % 997}" for i in range(3000)]
  spec = config_lib.file_spec(write_text(tmp_path / "e.tsv", lines))

  def run(name, seed):
    config = make_config([spec], seed=seed, valid_fraction=0.1, test_fraction=0.2)
    return import_graph(config, str(tmp_path / name), progress=False)

  a, b, c = run("a", 0), run("b", 0), run("c", 1)
  counts = a.manifest["counts"]
  assert sum(counts.values()) == 3000
  assert 200 < counts["valid"] < 400 and 480 < counts["test"] < 720
  for split in ("train", "valid", "test"):
    assert named_split(a, split) == named_split(b, split)
  assert named_split(a, "valid") != named_split(c, "valid")
  assert a.manifest_hash != c.manifest_hash
  assert a.degrees("node").sum() == 2 * counts["train"]


def test_names_global_false_keeps_types_apart(tmp_path):
  path = write_text(tmp_path / "e.tsv", ["1\t1", "2\t1"])
  config = make_config([config_lib.file_spec(path, source=0, target=1, relation=None,
                                             relation_name="owns")],
                       entities={"user": 1, "item": 1}, relations=[("owns", "user", "item")],
                       names_global=False)
  graph = import_graph(config, str(tmp_path / "g"), progress=False)
  assert graph.entities["user"].count == 2 and graph.entities["item"].count == 1


def test_empty_blank_and_header_only_files(tmp_path):
  data = write_text(tmp_path / "e.tsv", ["", "a\tlikes\tb", "", ""])
  header_only = write_text(tmp_path / "h.tsv", [], header="h\tr\tt")
  graph = import_graph(make_config([config_lib.file_spec(data),
                                    config_lib.file_spec(header_only, header=True)]),
                       str(tmp_path / "g"), progress=False)
  assert graph.num_edges("train") == 1 and graph.entities["node"].count == 2


# ----------------------------------------------------------------------------
# Bad input


GOOD = ["a\tlikes\tb\t1", "b\tknows\tc\t2.5", "c\tlikes\ta\t0"]
BAD_LINES = {
    "column_count": ("a\tlikes\tb", "expected 4 columns, found 3"),
    "empty_field": ("a\tlikes\t\t1", "empty target field"),
    "weight_not_a_number": ("a\tlikes\tb\tlots", "weight 'lots' is not a number"),
    "weight_nan": ("a\tlikes\tb\tnan", "weight 'nan' is not finite"),
    "weight_inf": ("a\tlikes\tb\t-inf", "weight '-inf' is not finite"),
    "weight_negative": ("a\tlikes\tb\t-2", "weight '-2' is negative"),
    "unknown_relation": ("a\thates\tb\t1", "unknown relation 'hates'"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_line_is_reported_with_its_line_number(tmp_path, case):
  bad, message = BAD_LINES[case]
  # Header, CRLF and a blank line before the bad one: line 1 header, 2-4
  # good, 5 blank, 6 good, 7 bad, 8 good.
  lines = GOOD + ["", GOOD[0], bad, GOOD[1]]
  path = write_text(tmp_path / "e.tsv.gz", lines, newline="\r\n", header="h\tr\tt\tw",
                    compress=True)
  config = make_config([config_lib.file_spec(path, header=True, weight=3)])
  with pytest.raises(GraphImportError) as error:
    import_graph(config, str(tmp_path / "g"), progress=False)
  assert str(error.value).startswith(f"{path}:7: "), str(error.value)
  assert message in str(error.value)
  assert error.value.line == 7


def test_entity_type_conflict_names_file_and_line(tmp_path):
  users = write_text(tmp_path / "users.tsv", ["alice\tbob", "bob\tcarol"])
  items = write_text(tmp_path / "items.tsv", ["alice\tbook", "dave\tcarol", "bob\tcup"])
  config = make_config(
      [config_lib.file_spec(users, source=0, target=1, relation=None, relation_name="follows"),
       config_lib.file_spec(items, source=0, target=1, relation=None, relation_name="buys")],
      entities={"user": 1, "item": 1},
      relations=[("follows", "user", "user"), ("buys", "user", "item")])
  assert config.data.names_global
  with pytest.raises(GraphImportError) as error:
    import_graph(config, str(tmp_path / "g"), progress=False)
  # items.tsv line 1 is fine (alice is a user, book an item); line 2 uses
  # carol, a user in users.tsv, as an item.
  assert str(error.value).startswith(
      f"{items}:2: 'carol' is used as entity type 'item' here but is already of type 'user'"
  ), str(error.value)


def test_entity_type_conflict_inside_one_file(tmp_path):
  # Both x's are new in the same block: the earlier line decides x's type.
  path = write_text(tmp_path / "e.tsv", ["x\tfollows\ty", "y\tbuys\tz", "q\tbuys\tx"])
  relations = [("follows", "user", "user"), ("buys", "user", "item")]
  config = make_config([config_lib.file_spec(path)], entities={"user": 1, "item": 1},
                       relations=relations)
  with pytest.raises(GraphImportError,
                     match=rf"^{path}:3: 'x' is used as entity type 'item' here but is "
                     "already of type 'user'"):
    import_graph(config, str(tmp_path / "g"), progress=False)

  config.data.on_error = "skip"
  with pytest.warns(importer.SkippedLinesWarning):
    graph = import_graph(config, str(tmp_path / "g"), progress=False)
  assert graph.manifest["skipped"] == {"entity_type_conflict": 1}
  assert sorted(graph.names("user")) == ["x", "y"] and graph.names("item") == ["z"]

  # The item comes first this time.
  path = write_text(tmp_path / "f.tsv", ["a\tbuys\tb", "c\tfollows\td", "b\tfollows\tc"])
  config = make_config([config_lib.file_spec(path)], entities={"user": 1, "item": 1},
                       relations=relations)
  with pytest.raises(GraphImportError, match=rf"^{path}:3: 'b' is used as entity type 'user'"):
    import_graph(config, str(tmp_path / "g2"), progress=False)


@pytest.mark.parametrize("first", ["malformed", "empty"])
def test_first_error_wins_across_blocks(tmp_path, monkeypatch, first):
  # Small blocks: pyarrow parses ahead, so it may report the malformed line
  # of a later block while an earlier block is still being processed.
  monkeypatch.setattr(edge_reading, "TEXT_BLOCK_BYTES", 2048)
  lines = [f"n{i}\tlikes\tn{i + 1}" for i in range(3000)]
  # ~110 lines per block: the second bad line is in the next block.
  malformed, empty = (1500, 1630) if first == "malformed" else (1630, 1500)
  lines[malformed - 1] = "n1\tlikes"
  lines[empty - 1] = "n1\tlikes\t"
  path = write_text(tmp_path / "e.tsv", lines)
  with pytest.raises(GraphImportError) as error:
    import_graph(make_config([config_lib.file_spec(path)]), str(tmp_path / "g"), progress=False)
  assert str(error.value).startswith(f"{path}:1500: ")
  assert error.value.reason == ("column_count" if first == "malformed" else "empty_field")


def test_invalid_utf8_is_located(tmp_path):
  path = tmp_path / "e.tsv"
  path.write_bytes(b"a\tlikes\tb\nc\tlikes\t\xff\xfe\n")
  with pytest.raises(GraphImportError, match=rf"^{path}:2: column 2 is not valid UTF-8"):
    import_graph(make_config([config_lib.file_spec(str(path))]), str(tmp_path / "g"),
                 progress=False)


def test_missing_file_and_bad_specs(tmp_path):
  missing = str(tmp_path / "nope.tsv")
  with pytest.raises(GraphImportError, match=rf"^{missing}: no such file"):
    import_graph(make_config([config_lib.file_spec(missing)]), str(tmp_path / "g"),
                 progress=False)
  path = write_text(tmp_path / "e.tsv", ["a\tlikes\tb"])
  with pytest.raises(GraphImportError, match="relation is column 5, but lines have 3 columns"):
    import_graph(make_config([config_lib.file_spec(path, relation=5)]), str(tmp_path / "g"),
                 progress=False)
  with pytest.raises(GraphImportError, match="not a declared relation"):
    import_graph(make_config([config_lib.file_spec(path, relation=None, relation_name="x")]),
                 str(tmp_path / "g"), progress=False)
  odd = write_text(tmp_path / "e.links", ["a\tlikes\tb"])
  with pytest.raises(GraphImportError, match="cannot tell the format"):
    import_graph(make_config([config_lib.file_spec(odd)]), str(tmp_path / "g"), progress=False)
  assert not glob.glob(str(tmp_path / "g*"))


def test_skip_counts_every_reason(tmp_path):
  lines = GOOD + [bad for bad, _ in BAD_LINES.values()] + ["", GOOD[1]]
  path = write_text(tmp_path / "e.tsv", lines)
  conflict = write_text(tmp_path / "c.tsv", ["u1\tb", "u2\tu9"])  # b is a node
  config = make_config(
      [config_lib.file_spec(path, weight=3),
       config_lib.file_spec(conflict, source=0, target=1, relation=None, relation_name="buys")],
      entities={"node": 1, "item": 1},
      relations=RELATIONS + [("buys", "node", "item")], on_error="skip")
  with pytest.warns(importer.SkippedLinesWarning, match="skipped 8 bad lines"):
    graph = import_graph(config, str(tmp_path / "g"), progress=False)
  assert graph.manifest["skipped"] == {
      "column_count": 1, "empty_field": 1, "unknown_relation": 1, "weight_negative": 1,
      "weight_not_a_number": 1, "weight_not_finite": 2, "entity_type_conflict": 1}
  assert graph.num_edges("train") == len(GOOD) + 1 + 1
  # Names of skipped lines did not enter the vocabularies.
  assert sorted(graph.names("node")) == ["a", "b", "c", "u2"]
  assert graph.names("item") == ["u9"]


def test_failed_import_leaves_nothing_behind(tmp_path):
  path = write_text(tmp_path / "e.tsv", ["a\tlikes\tb", "a\tlikes"])
  graph_dir = str(tmp_path / "out" / "g")
  with pytest.raises(GraphImportError):
    import_graph(make_config([config_lib.file_spec(path)]), graph_dir, progress=False)
  assert not os.path.exists(graph_dir)
  assert os.listdir(tmp_path / "out") == []


def test_existing_graph_dir_is_untouched(tmp_path):
  graph_dir = tmp_path / "g"
  graph_dir.mkdir()
  (graph_dir / "keep.txt").write_text("precious")
  path = write_text(tmp_path / "e.tsv", ["a\tlikes\tb"])
  with pytest.raises(FileExistsError):
    import_graph(make_config([config_lib.file_spec(path)]), str(graph_dir), progress=False)
  assert os.listdir(graph_dir) == ["keep.txt"]
  assert (graph_dir / "keep.txt").read_text() == "precious"
  assert glob.glob(str(graph_dir) + ".tmp-*") == []


# ----------------------------------------------------------------------------
# Real data


def _data_dir(*parts):
  root = os.environ.get("TWHIN_DATA_DIR")
  if not root:
    pytest.skip("TWHIN_DATA_DIR is not set (point it at the datasets, e.g. ../shared/data)")
  path = os.path.join(root, *parts)
  if not os.path.isdir(path):
    pytest.skip(f"{path} does not exist")
  return path


def test_kinship(tmp_path):
  folder = _data_dir("kg", "kinship")
  from twhin_jax import config_builders
  config = config_builders.kg_config("kinship", "$TWHIN_DATA_DIR/kg/kinship")
  graph = import_graph(config, str(tmp_path / "kinship"), progress=False)
  assert graph.manifest["counts"] == {"train": 8544, "valid": 1068, "test": 1074}
  assert graph.entities["entity"].count == 104
  assert len(graph.relations) == 25
  with open(os.path.join(folder, "valid.txt")) as f:
    valid = {tuple(line.rstrip("\n").split("\t")) for line in f}
  assert named_split(graph, "valid") == valid
  assert graph.degrees("entity").sum() == 2 * 8544


# ----------------------------------------------------------------------------
# Issue 15: bad input the importer used to accept or crash on


def test_truncated_gz_names_the_file(tmp_path):
  lines = [f"n{i}\tlikes\tn{i + 1}" for i in range(200_000)]
  whole = gzip.compress("".join(line + "\n" for line in lines).encode())
  for name, cut in (("short.tsv.gz", 100), ("long.tsv.gz", len(whole) // 2)):
    path = tmp_path / name
    path.write_bytes(whole[:cut])  # 100 bytes: cut inside the first lines
    with pytest.raises(GraphImportError, match=rf"^{path}: truncated or corrupt gzip file"):
      import_graph(make_config([config_lib.file_spec(str(path))]), str(tmp_path / "g"),
                   progress=False)
    assert not glob.glob(str(tmp_path / "g*"))
  path = tmp_path / "adjacency.txt.gz"
  path.write_bytes(whole[:len(whole) // 2])
  config = make_config([config_lib.file_spec(str(path), format="adjacency", relation=None,
                                             relation_name="likes")])
  with pytest.raises(GraphImportError, match=rf"^{path}: truncated or corrupt gzip file"):
    import_graph(config, str(tmp_path / "g"), progress=False)


def test_empty_train_split_is_an_error(tmp_path):
  valid = write_text(tmp_path / "valid.tsv", ["a\tlikes\tb"])
  header_only = write_text(tmp_path / "train.tsv", [], header="h\tr\tt")
  config = make_config([config_lib.file_spec(header_only, header=True),
                        config_lib.file_spec(valid, split="valid")])
  with pytest.raises(GraphImportError, match=r"train.tsv: no train edges"):
    import_graph(config, str(tmp_path / "g"), progress=False)
  # Every train line bad and skipped: also empty.
  bad = write_text(tmp_path / "bad.tsv", ["a\thates\tb"])
  config = make_config([config_lib.file_spec(bad), config_lib.file_spec(valid, split="valid")],
                       on_error="skip")
  with pytest.raises(GraphImportError, match=r"no train edges.*unknown_relation"):
    import_graph(config, str(tmp_path / "g"), progress=False)
  assert not glob.glob(str(tmp_path / "g*"))


def test_unseen_eval_entities_are_counted_and_can_be_dropped(tmp_path):
  train = write_text(tmp_path / "train.tsv", ["a\tlikes\tb", "b\tlikes\tc"])
  valid = write_text(tmp_path / "valid.tsv", ["a\tlikes\tc", "a\tlikes\tnew1"])
  test = write_text(tmp_path / "test.tsv", ["new2\tknows\tnew3", "c\tknows\ta"])
  files = [config_lib.file_spec(train), config_lib.file_spec(valid, split="valid"),
           config_lib.file_spec(test, split="test")]
  graph = import_graph(make_config(files), str(tmp_path / "kept"), progress=False)
  quality = graph.manifest["quality"]
  assert quality["entities_without_train_edges"] == {"node": 3}
  assert quality["eval_edges_with_unseen_entities"] == {"valid": 1, "test": 1}
  assert quality["dropped_unseen_eval_edges"] == {"valid": 0, "test": 0}
  assert graph.manifest["counts"] == {"train": 2, "valid": 2, "test": 2}
  assert "valid 1, test 1" in importer.summarize(graph)

  config = make_config(files, drop_unseen_eval_entities=True)
  graph = import_graph(config, str(tmp_path / "dropped"), progress=False)
  assert sorted(graph.names("node")) == ["a", "b", "c"]
  assert graph.manifest["counts"] == {"train": 2, "valid": 1, "test": 1}
  assert named_split(graph, "valid") == {("a", "likes", "c")}
  assert named_split(graph, "test") == {("c", "knows", "a")}
  quality = graph.manifest["quality"]
  assert quality["dropped_unseen_eval_edges"] == {"valid": 1, "test": 1}
  assert quality["entities_without_train_edges"] == {"node": 0}
  assert graph.manifest["options"]["drop_unseen_eval_entities"] is True


def test_self_loops_duplicates_and_coverage_are_in_the_manifest(tmp_path):
  users = write_text(tmp_path / "follows.tsv",
                     ["u1\tu1", "u1\tu2", "u1\tu2", "u1\tu2", "u2\tu2", "u3\tu1"])
  clicks = write_text(tmp_path / "clicks.tsv", ["u1\tx", "u2\tx", "u2\tx"])
  valid = write_text(tmp_path / "valid.tsv", ["u3\tu3"])
  files = [config_lib.file_spec(users, source=0, target=1, relation=None,
                                relation_name="follows"),
           config_lib.file_spec(clicks, source=0, target=1, relation=None,
                                relation_name="clicks"),
           config_lib.file_spec(valid, source=0, target=1, relation=None,
                                relation_name="follows", split="valid")]
  config = make_config(files, entities={"user": 2, "item": 1},
                       relations=[("follows", "user", "user"), ("clicks", "user", "item"),
                                  ("unused", "item", "user")], names_global=False)
  graph = import_graph(config, str(tmp_path / "g"), progress=False)
  quality = graph.manifest["quality"]
  assert quality["self_loops"] == {"train": 2, "valid": 1, "test": 0}
  # u1->u2 three times (2 extra copies), u2->x twice (1 extra).
  assert quality["duplicate_edges"] == {"train": 3, "valid": 0, "test": 0}
  # Duplicates are kept, as before.
  assert graph.num_edges("train") == 9
  coverage = graph.manifest["coverage"]
  # follows: sources u1, u2, u3 of 3 users; targets u1, u2.
  assert coverage["follows"]["source"] == {"type": "user", "entities": 3, "share": 1.0}
  assert coverage["follows"]["target"] == {"type": "user", "entities": 2,
                                           "share": round(2 / 3, 6)}
  assert coverage["clicks"]["source"]["share"] == round(2 / 3, 6)
  assert coverage["clicks"]["target"] == {"type": "item", "entities": 1, "share": 1.0}
  assert coverage["unused"]["source"]["entities"] == 0


def test_kg_relation_names_get_the_importers_checks(tmp_path):
  from twhin_jax import config_builders as datasets
  folder = tmp_path / "kg"
  folder.mkdir()
  write_text(folder / "train.txt", ["a\tr1\tb", "b\tr2\tc", "c\tr1\ta"])
  write_text(folder / "valid.txt", ["a\tr1\tc", "a\tonly_in_valid\tb"])
  write_text(folder / "test.txt", ["b\tr2\ta"])
  specs = datasets.kg_split_files(str(folder))
  # Relations come from train only: 'only_in_valid' is not declared ...
  assert datasets.read_relation_names(specs) == ["r1", "r2"]
  config = datasets.kg_config("kg", str(folder))
  assert [r["name"] for r in config.relations] == ["r1", "r2"]
  # ... so the import rejects that valid line with its file and line.
  with pytest.raises(GraphImportError,
                     match=rf"^{folder / 'valid.txt'}:2: unknown relation 'only_in_valid'"):
    import_graph(config, str(tmp_path / "g"), progress=False)

  # A line with a missing field: file and line, not a pyarrow traceback.
  write_text(folder / "train.txt", ["a\tr1\tb", "b\tr2", "c\tr1\ta"])
  with pytest.raises(GraphImportError, match=rf"^{folder / 'train.txt'}:2: expected 3 columns"):
    datasets.read_relation_names(specs)
  write_text(folder / "train.txt", ["a\tr1\tb", "b\t\tc"])
  with pytest.raises(GraphImportError, match=rf"^{folder / 'train.txt'}:2: empty relation"):
    datasets.read_relation_names(specs)
  # A stray header is not taken for an edge of a relation named 'relation'.
  write_text(folder / "train.txt", ["a\tr1\tb", "b\tr2\tc"], header="head\trelation\ttail")
  with pytest.raises(GraphImportError, match=rf"^{folder / 'train.txt'}:1: relation "
                     "'relation' occurs only on the first line: a header"):
    datasets.read_relation_names(specs)


# ----------------------------------------------------------------------------
# Issue 14: adjacency lists


def test_adjacency_lists(tmp_path):
  lines = ["u1 i1 i2  i3", "u2", "", "  u3\ti1 ", "u1 i4"]
  plain = write_text(tmp_path / "train.txt", lines)
  packed = write_text(tmp_path / "train.txt.gz", lines, newline="\r\n", compress=True)
  expected = collections.Counter(
      [("u1", "likes", i) for i in ("i1", "i2", "i3", "i4")] + [("u3", "likes", "i1")])
  for name, path in (("plain", plain), ("gz", packed)):
    spec = config_lib.file_spec(path, format="adjacency", relation=None, relation_name="likes")
    config = make_config([spec], entities={"user": 1, "item": 1},
                         relations=[("likes", "user", "item")])
    graph = import_graph(config, str(tmp_path / name), progress=False)
    assert train_triples_from_buckets(graph) == expected
    # u2 has no items, so no edge: it is not an entity of the graph.
    assert sorted(graph.names("user")) == ["u1", "u3"] and graph.entities["item"].count == 4

  # An explicit delimiter: an empty field is reported with its line.
  bad = write_text(tmp_path / "bad.tsv", ["user\titems", "u1\ti1\ti2", "u2\ti1\t\ti3"])
  spec = config_lib.file_spec(bad, format="adjacency", relation=None, relation_name="likes",
                              header=True)
  config = make_config([spec], entities={"user": 1, "item": 1},
                       relations=[("likes", "user", "item")], delimiter="\t")
  with pytest.raises(GraphImportError, match=rf"^{bad}:3: empty target field"):
    import_graph(config, str(tmp_path / "bad"), progress=False)
  config.data.on_error = "skip"
  with pytest.warns(importer.SkippedLinesWarning):
    graph = import_graph(config, str(tmp_path / "skipped"), progress=False)
  assert graph.num_edges("train") == 4 and graph.manifest["skipped"] == {"empty_field": 1}
  # A type conflict in an adjacency file names the line of the pair.
  mixed = write_text(tmp_path / "mixed.txt", ["u1 i1", "u2 i2 u1"])
  config = make_config([config_lib.file_spec(mixed, format="adjacency", relation=None,
                                             relation_name="likes")],
                       entities={"user": 1, "item": 1}, relations=[("likes", "user", "item")])
  with pytest.raises(GraphImportError, match=rf"^{mixed}:2: 'u1' is used as entity type 'item'"):
    import_graph(config, str(tmp_path / "mixed"), progress=False)
  with pytest.raises(GraphImportError, match="holds one relation"):
    import_graph(make_config([config_lib.file_spec(plain, format="adjacency")]),
                 str(tmp_path / "g"), progress=False)


# ----------------------------------------------------------------------------
# The on-disk vocabulary and the per-host reader


def test_vocabulary_lookups_read_only_row_groups(tmp_path, monkeypatch):
  from twhin_jax import vocabulary
  monkeypatch.setattr(vocabulary, "ROW_GROUP_ROWS", 7)  # many row groups
  triples = kg_triples(400, 90)
  path = write_text(tmp_path / "e.tsv", ["\t".join(t) for t in triples])
  graph = import_graph(make_config([config_lib.file_spec(path)], entities={"node": 2}),
                       str(tmp_path / "g"), progress=False)
  names = graph.names("node")
  assert len(names) == graph.entities["node"].count == len(set(names))
  by_name = pq.ParquetFile(os.path.join(graph.path, "vocab", "node.by_name.parquet"))
  assert by_name.metadata.num_row_groups == math.ceil(len(names) / 7)
  rng = np.random.default_rng(0)
  ids = rng.integers(0, len(names), 500)
  assert graph.names_of("node", ids) == [names[i] for i in ids]
  queries = [names[i] for i in ids] + ["nobody", "", "zzzz", "\x00"]
  found = graph.lookup_ids("node", queries, missing=-1)
  np.testing.assert_array_equal(found, np.concatenate([ids, [-1, -1, -1, -1]]))
  with pytest.raises(KeyError, match="unknown node 'nobody'"):
    graph.lookup_ids("node", [names[0], "nobody"])
  with pytest.raises(IndexError, match="out of range"):
    graph.names_of("node", [len(names)])
  assert all(graph.lookup("node", n) == i for i, n in enumerate(names))
  # The by-name file is sorted (byte order) and holds each id once.
  table = by_name.read()
  assert table.column("name").to_pylist() == sorted(names)
  assert sorted(table.column("id").to_pylist()) == list(range(len(names)))


def test_old_graph_format_is_refused(tmp_path):
  (tmp_path / "manifest.json").write_text('{"format_version": 1}')
  with pytest.raises(ValueError, match=r"graph format 1, this code reads 2.*older twhin-jax"):
    graph_lib.Graph(str(tmp_path))


def test_host_slices_cover_every_bucket_once(tmp_path):
  lines = [f"n{i % 97}\tlikes\tn{(i * 13) % 89}" for i in range(1000)]
  graph = import_graph(make_config([config_lib.file_spec(write_text(tmp_path / "e.tsv", lines))],
                                   entities={"node": 3}), str(tmp_path / "g"), progress=False)
  for count in (1, 2, 3, 7):
    shares = [graph.host_slices(k, count) for k in range(count)]
    for (i, j), size in graph.bucket_sizes().items():
      if not size:
        assert all((i, j) not in {(s.lhs, s.rhs) for s in share} for share in shares)
        continue
      pieces = [next(s for s in share if (s.lhs, s.rhs) == (i, j)) for share in shares]
      assert pieces[0].start == 0 and pieces[-1].stop == size
      assert all(a.stop == b.start for a, b in zip(pieces, pieces[1:]))
      assert max(p.stop - p.start for p in pieces) - min(p.stop - p.start for p in pieces) <= 1
      whole = graph.bucket_edges(i, j)
      for piece in pieces:
        part = graph.bucket_edges(i, j, rows=piece.rows)
        for key in ("src", "dst", "rel", "weight"):
          np.testing.assert_array_equal(part[key], whole[key][piece.rows])
  with pytest.raises(ValueError, match="process_index"):
    graph.host_slices(2, 2)


def test_ids_follow_the_seeded_md5_order(tmp_path):
  """Eq. (1) of import_duckdb.py, recomputed with hashlib: the id order is
  the md5 order of "<seed>\\x1f<type>\\x1f<name>" (what both engines use)."""
  lines = [f"u{i}\tt{(i * 7) % 301}" for i in range(3000)]
  path = write_text(tmp_path / "e.tsv", lines)
  config = make_config([config_lib.file_spec(path, source=0, target=1, relation=None,
                                             relation_name="wrote")],
                       entities={"user": 3, "tweet": 2}, relations=[("wrote", "user", "tweet")],
                       seed=11)
  graph = import_graph(config, str(tmp_path / "g"), progress=False)
  for entity_type, names in (("user", {f"u{i}" for i in range(3000)}),
                             ("tweet", {f"t{(i * 7) % 301}" for i in range(3000)})):
    expected = sorted(names, key=lambda n: (
        hashlib.md5(f"11\x1f{entity_type}\x1f{n}".encode()).hexdigest(), n.encode()))
    assert graph.names(entity_type) == expected


@pytest.mark.parametrize("drop_unseen", [False, True])
def test_hash_partitioned_build_gives_the_same_graph(tmp_path, monkeypatch, drop_unseen):
  """The DuckDB stage split into many hash partitions of names (eq. (2) of
  import_duckdb.py; some partitions empty) gives the graph of the
  one-partition build: ids, buckets, splits, degrees and every statistic,
  including duplicates, self-loops, coverage and unseen entities."""
  from twhin_jax import import_duckdb
  rng = np.random.default_rng(3)
  users = [f"u{i}" for i in range(80)] + ["both"]
  lines = [f"{users[a]}\tfollows\t{users[b]}\t{w:.2f}" for a, b, w in
           zip(rng.integers(0, 81, 400) ** 2 % 81, rng.integers(0, 81, 400), rng.random(400))]
  lines += ["u1\tfollows\tu2\t1"] * 3 + ["u5\tfollows\tu5\t1"]
  lines += ["u7\tfollows\t\t1"]  # skipped: empty field
  follows = write_text(tmp_path / "follows.tsv", lines)
  clicks = write_text(tmp_path / "clicks.tsv",
                      [f"{users[a]}\tclicks\ti{b}\t1" for a, b in
                       zip(rng.integers(0, 81, 200), rng.integers(0, 30, 200))]
                      + ["u3\tclicks\tboth\t1"])  # skipped: 'both' is a user
  valid = write_text(tmp_path / "valid.tsv", ["u1\tfollows\tu3\t1", "new\tfollows\tu2\t1",
                                              "u4\tclicks\tnew_item\t1"])
  files = [config_lib.file_spec(follows, weight=3), config_lib.file_spec(clicks, weight=3),
           config_lib.file_spec(valid, weight=3, split="valid")]
  config = make_config(files, entities={"user": 2, "item": 3},
                       relations=[("follows", "user", "user"), ("clicks", "user", "item")],
                       seed=11, on_error="skip", drop_unseen_eval_entities=drop_unseen)
  with pytest.warns(UserWarning, match="import skipped"):
    whole = import_graph(config, str(tmp_path / "whole"), progress=False)
  monkeypatch.setattr(import_duckdb, "OCCURRENCES_PER_PARTITION", 40)
  assert import_duckdb.partition_count(whole.num_edges("train")) > 20
  with pytest.warns(UserWarning, match="import skipped"):
    parts = import_graph(config, str(tmp_path / "parts"), progress=False)
  assert whole.manifest["quality"]["duplicate_edges"]["train"] >= 2
  assert whole.manifest["quality"]["self_loops"]["train"] >= 1
  assert whole.manifest["skipped"] == {"empty_field": 1, "entity_type_conflict": 1}
  assert_same_graph(whole, parts)
