"""Inspecting runs without a model: arrays, stats, NaN detection, neighbours, diffs."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import tensorstore as ts

from twhin_jax import cli
from twhin_jax import inspection
from twhin_jax import rundir

from conftest import train_tiny_demo


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("inspect_run"))
  trainer = train_tiny_demo(workdir, dim=16, keep_trainer=True)
  expected = {"tables": trainer.embeddings(), "rel": trainer.rel_state,
              "version": trainer.lineage["version_id"]}
  trainer.close()
  return workdir, expected


def _write_nan(workdir: str, entity_type: str, row: int, columns: slice) -> None:
  """Writes NaN into the committed slot of a table, as a diverged writer might."""
  opened = rundir.open_run(workdir)
  slot = opened.slots.committed[(entity_type, 0)]
  path = os.path.join(workdir, "tables", entity_type, f"slot{slot}", "embeddings")
  array = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": path},
                   "open": True}).result()
  values = np.asarray(array[row].read().result())
  values[columns] = np.nan
  array[row].write(values).result()


def test_summary_describes_the_run(run, capsys):
  workdir, expected = run
  assert cli.main(["inspect", "--workdir", workdir, "--json"]) == 0
  info = json.loads(capsys.readouterr().out)
  assert info["cursor"] == {"epoch": 2, "bucket": 0}
  assert info["versions"]["chain"][0]["version_id"] == expected["version"]
  assert info["versions"]["chain"][0]["parent_id"] is None
  arrays = {a["name"]: a for a in info["checkpoint_arrays"]}
  params = expected["rel"]["params"]["translation:16"]
  assert arrays["params/translation:16"]["shape"] == list(params.shape)
  assert arrays["params/translation:16"]["dtype"] == "float32"
  assert arrays["params/translation:16"]["bytes"] == params.nbytes
  assert "NamedSharding" in arrays["params/translation:16"]["sharding"]
  # 4 types x 2 slots x (embeddings, adagrad).
  assert len(info["tables"]) == 16
  user = [a for a in info["tables"] if a["type"] == "user" and a["array"] == "embeddings"]
  assert all(a["shape"] == [600, 16] for a in user)
  for entity_type, table in expected["tables"].items():
    stats = info["stats"][entity_type]
    norms = np.linalg.norm(table.astype(np.float64), axis=1)
    assert stats["count"] == len(table) and stats["dim"] == 16
    assert stats["norm_mean"] == pytest.approx(norms.mean(), rel=1e-6)
    assert stats["norm_max"] == pytest.approx(norms.max(), rel=1e-6)
    assert stats["nan_values"] == 0 and stats["nan_rows"] == 0
  assert info["config"]["model"]["dim"] == 16
  # The text rendering runs too.
  assert "checkpoint arrays" in inspection.format_summary(info)


def test_nan_written_into_a_copy_is_counted_and_diffed(run, tmp_path):
  workdir, _ = run
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy)
  _write_nan(copy, "user", row=3, columns=slice(0, 2))
  stats = inspection.table_stats(rundir.open_run(copy))
  assert stats["user"]["nan_values"] == 2 and stats["user"]["nan_rows"] == 1
  assert stats["tweet"]["nan_values"] == 0
  diff = inspection.diff_runs(workdir, copy)
  user = diff["leaves"]["tables/user/embeddings"]
  assert user["nan_a"] == 0 and user["nan_b"] == 2
  assert diff["leaves"]["tables/tweet/embeddings"]["status"] == "same"
  assert diff["leaves"]["state/params/translation:16"]["status"] == "same"


def test_diff_of_a_run_with_itself_is_all_same(run, capsys):
  workdir, _ = run
  assert cli.main(["inspect", "--diff", workdir, workdir, "--json"]) == 0
  diff = json.loads(capsys.readouterr().out)
  assert diff["leaves"] and all(leaf["status"] == "same" for leaf in diff["leaves"].values())
  assert all(leaf["max_abs_diff"] == 0.0 for leaf in diff["leaves"].values())


def test_neighbors_match_brute_force(run, capsys):
  workdir, expected = run
  names = rundir.open_run(workdir).graph.names("user")
  assert cli.main(["inspect", "--workdir", workdir, "--neighbors", f"user:{names[7]}",
                   "--k", "4", "--json"]) == 0
  found = json.loads(capsys.readouterr().out)
  table = expected["tables"]["user"]
  unit = table / np.linalg.norm(table, axis=1, keepdims=True)
  cosine = unit @ unit[7]
  cosine[7] = -np.inf
  assert [n["name"] for n in found] == [names[i] for i in np.argsort(-cosine)[:4]]
  assert found[0]["score"] == pytest.approx(cosine.max(), rel=1e-5)


def test_errors_name_the_thing(run, tmp_path, capsys):
  workdir, _ = run
  assert cli.main(["inspect", "--workdir", str(tmp_path / "missing")]) == 2
  assert "missing: no such run directory" in capsys.readouterr().err
  assert cli.main(["inspect", "--workdir", workdir, "--neighbors", "user:nobody"]) == 2
  assert "unknown user 'nobody'" in capsys.readouterr().err
  assert cli.main(["inspect", "--workdir", workdir, "--neighbors", "planet:x"]) == 2
  assert "unknown entity type 'planet'" in capsys.readouterr().err
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
    rundir.open_run(str(empty))


def test_diff_aligns_rows_by_name_through_the_vocabularies(run, tmp_path, monkeypatch):
  """Another seed shuffles the ids: the diff joins the two on-disk
  vocabularies (never Graph.names / _name_index) and compares rows by name."""
  from twhin_jax import demo_config
  from twhin_jax import train as train_lib
  from twhin_jax.graph import Graph

  workdir, expected = run
  config = demo_config.get_config("test")
  config.model.dim, config.train.epochs, config.train.eval_every_epochs = 16, 1, 0
  config.train.seed = 1
  other = str(tmp_path / "other")
  trainer = train_lib.train(config, other, progress=False)
  tables_b = trainer.embeddings()
  names_a = {t: rundir.open_run(workdir).graph.names(t) for t in tables_b}
  names_b = {t: trainer.graph.names(t) for t in tables_b}
  trainer.close()
  assert names_a["user"] != names_b["user"]

  def refuse(*args, **kwargs):
    raise AssertionError("the diff loaded a whole vocabulary")
  monkeypatch.setattr(Graph, "names", refuse)
  monkeypatch.setattr(Graph, "_name_index", property(refuse))
  diff = inspection.diff_runs(workdir, other)
  for t, table_b in tables_b.items():
    assert diff["entities"][t] == {"shared": len(names_a[t]), "only_a": 0, "only_b": 0}
    row_b = {n: i for i, n in enumerate(names_b[t])}
    aligned_b = table_b[[row_b[n] for n in names_a[t]]]
    want = float(np.max(np.abs(aligned_b - expected["tables"][t])))
    assert diff["leaves"][f"tables/{t}/embeddings"]["max_abs_diff"] == pytest.approx(want)
