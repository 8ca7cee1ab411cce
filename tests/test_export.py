"""Export: Parquet / .npy / relations files read back equal to the input."""

from __future__ import annotations

import json
import os

import ml_collections
import numpy as np
import pyarrow.parquet as pq
import pytest

from twhin_jax import config as config_lib
from twhin_jax import export
from twhin_jax import vocabulary
from twhin_jax.graph import FORMAT_VERSION, Graph
from twhin_jax.model import RelationLayout

ENTITIES = {"user": 7, "item": 5}
RELATIONS = [("follows", "user", "user", "translation"),
             ("likes", "user", "item", "diagonal"),
             ("file", "item", "user", "linear"),  # a name that clashes with np.savez
             ("/film/sees", "user", "item", "none"),  # a slash, as in Freebase
             ("tags", "item", "item", "complex_diagonal")]
NAMES = {"user": [f"user {i} é/“q”" for i in range(7)], "item": [f"/m/0{i}" for i in range(5)]}


def write_graph(root) -> Graph:
  """The parts of an imported graph that export reads: manifest and vocab."""
  manifest = {
      "format_version": FORMAT_VERSION, "hash": "test",
      "schema": {"entities": {t: {"count": n, "num_partitions": 1} for t, n in ENTITIES.items()},
                 "relations": [dict(name=n, source=s, target=t, operator=o, weight=1.0)
                               for n, s, t, o in RELATIONS]},
      "counts": {s: 0 for s in config_lib.SPLITS}, "bucket_sizes": {},
  }
  os.makedirs(os.path.join(root, "vocab"))
  with open(os.path.join(root, "manifest.json"), "w") as f:
    json.dump(manifest, f)
  for t, names in NAMES.items():
    vocabulary.write_vocabulary(str(root), t, names)
  return Graph(str(root))


def model(dim=6, reciprocal=False):
  config = config_lib.base_config()
  config.model.reciprocal = reciprocal
  for t in ENTITIES:
    config.entities[t] = ml_collections.ConfigDict(dict(num_partitions=1, dim=0))
  config.relations = [dict(name=n, source=s, target=t, operator=o, weight=1.0)
                      for n, s, t, o in RELATIONS]
  config.model.dim = dim
  layout = RelationLayout.from_config(config)
  rng = np.random.default_rng(0)
  emb = {t: rng.normal(size=(n, dim)).astype(np.float32) for t, n in ENTITIES.items()}
  params = {k: rng.normal(size=v.shape).astype(np.float32)
            for k, v in layout.init_params().items()}
  return layout, emb, params


@pytest.mark.parametrize("reciprocal", [False, True])
def test_round_trip(tmp_path, reciprocal):
  graph = write_graph(tmp_path / "graph")
  layout, emb, params = model(reciprocal=reciprocal)
  out = str(tmp_path / "export")
  written = export.export_embeddings(graph, emb, params, layout, out, comparator="dot",
                                     chunk_rows=3)  # several row groups
  for t, table in emb.items():
    paths = written["entities"][t]
    names, vectors = export.read_parquet(paths["parquet"])
    assert names == NAMES[t]
    np.testing.assert_array_equal(vectors, table)
    schema = pq.read_schema(paths["parquet"])
    assert str(schema.field("vector").type) == "fixed_size_list<element: float>[6]"
    assert schema.metadata[b"twhin.entity_type"] == t.encode()
    assert pq.ParquetFile(paths["parquet"]).num_row_groups == -(-len(table) // 3)
    loaded = np.load(paths["npy"])
    assert loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, table)
    with open(paths["names"], encoding="utf-8") as f:
      assert f.read().splitlines() == NAMES[t]

  with open(written["relations_json"]) as f:
    doc = json.load(f)
  npz = np.load(written["relations_npz"])
  assert doc["comparator"] == "dot"
  assert doc["reciprocal"] is reciprocal
  assert doc["format_version"] == export.FORMAT_VERSION
  reverse_npz = np.load(written["relations_reverse_npz"])
  assert sorted(reverse_npz.files) == sorted(r[0] for r in RELATIONS)
  assert doc["entities"] == {t: {"count": n, "dim": 6} for t, n in ENTITIES.items()}
  assert [r["name"] for r in doc["relations"]] == [r[0] for r in RELATIONS]
  assert sorted(npz.files) == sorted(r[0] for r in RELATIONS)
  for index, (name, source, target, operator) in enumerate(RELATIONS):
    entry = doc["relations"][index]
    assert (entry["source"], entry["target"], entry["operator"]) == (source, target, operator)
    want = np.asarray(layout.param(params, index))
    np.testing.assert_array_equal(np.asarray(entry["parameters"], np.float32).reshape(
        entry["shape"]), want)
    np.testing.assert_array_equal(npz[name], want)
    want_reverse = np.asarray(layout.reverse_param(params, index))
    np.testing.assert_array_equal(np.asarray(entry["reverse_parameters"], np.float32).reshape(
        entry["shape"]), want_reverse)
    np.testing.assert_array_equal(reverse_npz[name], want_reverse)
    if reciprocal:  # the reverse rows are their own parameters, not a copy
      assert not np.array_equal(want_reverse, want) or want.size == 0
  read = export.read_relations(out)
  for index, rel in enumerate(read["relations"]):
    np.testing.assert_array_equal(rel["reverse"], np.asarray(layout.reverse_param(params, index)))
  assert npz["file"].shape == (6, 6)
  assert not [p for p in os.listdir(out) if p.endswith(".tmp")]


def test_formats_and_errors(tmp_path):
  graph = write_graph(tmp_path / "graph")
  layout, emb, params = model()
  written = export.export_embeddings(graph, emb, params, layout, str(tmp_path / "npy"),
                                     formats=("npy",), comparator="cos")
  assert set(written["entities"]["user"]) == {"npy", "names"}
  assert not os.path.exists(tmp_path / "npy" / "user.parquet")
  with pytest.raises(ValueError, match="formats"):
    export.export_embeddings(graph, emb, params, layout, str(tmp_path / "x"), formats=("csv",),
                             comparator="dot")
  with pytest.raises(ValueError, match="shape"):
    export.export_embeddings(graph, {**emb, "item": emb["item"][:-1]}, params, layout,
                             str(tmp_path / "x"), comparator="dot")
  with pytest.raises(ValueError, match="no embeddings"):
    export.export_embeddings(graph, {"user": emb["user"]}, params, layout, str(tmp_path / "x"),
                             comparator="dot")
  with pytest.raises(ValueError, match="comparator None"):
    export.export_embeddings(graph, emb, params, layout, str(tmp_path / "x"), comparator=None)


# --------------------------------------------------------------------------
# A trained run: `twhin export` alone is enough to reproduce `twhin eval`.


def _apply(operator: str, param: np.ndarray, x: np.ndarray) -> np.ndarray:
  """op(x) for rows x [n, d] in numpy (model.py's table, written out again)."""
  if operator == "none":
    return x
  if operator == "translation":
    return x + param
  if operator == "diagonal":
    return x * param
  if operator == "complex_diagonal":
    half = x.shape[1] // 2
    a, b, c, e = x[:, :half], x[:, half:], param[:half], param[half:]
    return np.concatenate([a * c - b * e, a * e + b * c], axis=1)
  if operator == "linear":
    return x @ param.T
  raise AssertionError(operator)


def _compare(comparator: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Scores of rows u [n, d] against rows v [n, d] (broadcast)."""
  if comparator == "cos":
    u = u / (np.linalg.norm(u, axis=-1, keepdims=True) + 1e-9)
    v = v / (np.linalg.norm(v, axis=-1, keepdims=True) + 1e-9)
  if comparator in ("dot", "cos"):
    return np.sum(u * v, axis=-1)
  return -np.sum(np.square(u - v), axis=-1)


def mrr_from_export(export_dir: str, graph, split: str) -> float:
  """Filtered MRR (ties averaged) from the exported files only, plus the
  graph's edges (what to rank and what to filter)."""
  doc = export.read_relations(export_dir)
  tables = {}
  for t in doc["entities"]:
    tables[t] = np.load(os.path.join(export_dir, f"{t}.npy")).astype(np.float64)
    with open(os.path.join(export_dir, f"{t}.names.txt"), encoding="utf-8") as f:
      assert f.read().splitlines() == graph.names(t)  # row i is local id i
  known = set()
  for s in config_lib.SPLITS:
    edges = graph.split_edges(s)
    known.update(zip(edges["rel"].tolist(), edges["src"].tolist(), edges["dst"].tolist()))
  edges = graph.split_edges(split)
  reciprocal_ranks = []
  for r, s, t in zip(edges["rel"].tolist(), edges["src"].tolist(), edges["dst"].tolist()):
    rel = doc["relations"][r]
    forward, reverse = rel["forward"].astype(np.float64), rel["reverse"].astype(np.float64)
    sources, targets = tables[rel["source"]], tables[rel["target"]]
    tail = _compare(doc["comparator"], _apply(rel["operator"], forward, sources[s:s + 1]),
                    targets)
    if doc["reciprocal"]:
      head = _compare(doc["comparator"], _apply(rel["operator"], reverse, targets[t:t + 1]),
                      sources)
    else:
      head = _compare(doc["comparator"], _apply(rel["operator"], forward, sources),
                      targets[t:t + 1])
    for scores, answer, other in ((tail, t, lambda c: (r, s, c)),
                                  (head, s, lambda c: (r, c, t))):
      keep = np.array([c != answer and other(c) not in known for c in range(len(scores))])
      greater = np.sum(scores[keep] > scores[answer])
      equal = np.sum(scores[keep] == scores[answer])
      reciprocal_ranks.append(1.0 / (1 + greater + equal / 2))
  return float(np.mean(reciprocal_ranks))


@pytest.fixture(scope="module")
def reciprocal_run(tmp_path_factory):
  from conftest import train_tiny_demo
  return train_tiny_demo(str(tmp_path_factory.mktemp("reciprocal")), dim=16, reciprocal=True)


def test_exported_files_alone_reproduce_twhin_eval(reciprocal_run, tmp_path, capsys):
  from twhin_jax import cli
  from twhin_jax import rundir
  out = str(tmp_path / "export")
  assert cli.main(["export", "--workdir", reciprocal_run, "--out", out, "--quiet"]) == 0
  capsys.readouterr()
  assert cli.main(["eval", "--workdir", reciprocal_run, "--split", "test", "--json"]) == 0
  evaluated = json.loads(capsys.readouterr().out)
  assert evaluated["ranking"] == {"ranking": "full", "filtered": True, "num_sampled_negatives": 0}
  graph = rundir.open_graph(reciprocal_run)
  with open(os.path.join(out, "relations.json")) as f:
    assert json.load(f)["comparator"] == "dot"
  from_files = mrr_from_export(out, graph, "test")
  # Without the reverse parameters (what export wrote before) head ranks change.
  assert evaluated["count"] == 2 * graph.num_edges("test")
  np.testing.assert_allclose(from_files, evaluated["mrr"], rtol=0, atol=1e-6)


def test_projector_files_sample_every_type(reciprocal_run, tmp_path, capsys):
  from twhin_jax import cli
  from twhin_jax import rundir
  out = str(tmp_path / "export")
  assert cli.main(["export", "--workdir", reciprocal_run, "--out", out, "--quiet",
                   "--projector", "--sample", "50"]) == 0
  written = json.loads(capsys.readouterr().out)["projector"]
  run = rundir.open_run(reciprocal_run)
  with open(written["config"]) as f:
    config_text = f.read()
  assert config_text.count("embeddings {") == len(run.graph.entities)
  for entity_type, info in run.graph.entities.items():
    files = written["types"][entity_type]
    assert f'tensor_path: "{entity_type}.vectors.tsv"' in config_text
    vectors = np.loadtxt(files["vectors"], delimiter="\t", ndmin=2)
    with open(files["metadata"], encoding="utf-8") as f:
      header, *rows = f.read().splitlines()
    assert header == "name\tdegree"
    assert len(rows) == len(vectors) == min(50, info.count)
    table, names = run.embeddings(entity_type), run.graph.names(entity_type)
    index = {name: i for i, name in enumerate(names)}
    for row, vector in zip(rows, vectors):  # each vector is its named entity's row
      name, degree = row.split("\t")
      np.testing.assert_allclose(vector, table[index[name]], rtol=1e-6)
      assert int(degree) == int(run.graph.degrees(entity_type)[index[name]])
