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


def model(dim=6):
  config = config_lib.base_config()
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


def test_round_trip(tmp_path):
  graph = write_graph(tmp_path / "graph")
  layout, emb, params = model()
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
  assert npz["file"].shape == (6, 6)
  assert not [p for p in os.listdir(out) if p.endswith(".tmp")]


def test_formats_and_errors(tmp_path):
  graph = write_graph(tmp_path / "graph")
  layout, emb, params = model()
  written = export.export_embeddings(graph, emb, params, layout, str(tmp_path / "npy"),
                                     formats=("npy",))
  assert set(written["entities"]["user"]) == {"npy", "names"}
  assert not os.path.exists(tmp_path / "npy" / "user.parquet")
  with pytest.raises(ValueError, match="formats"):
    export.export_embeddings(graph, emb, params, layout, str(tmp_path / "x"), formats=("csv",))
  with pytest.raises(ValueError, match="shape"):
    export.export_embeddings(graph, {**emb, "item": emb["item"][:-1]}, params, layout,
                             str(tmp_path / "x"))
  with pytest.raises(ValueError, match="no embeddings"):
    export.export_embeddings(graph, {"user": emb["user"]}, params, layout, str(tmp_path / "x"))
