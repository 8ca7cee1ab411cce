"""New versions: warm start aligned by name, L2-to-previous, Eq. 5 initialisation."""

from __future__ import annotations

import numpy as np
import pytest

from twhin_jax import demo_config
from twhin_jax import drift
from twhin_jax import train as train_lib
from twhin_jax import versions
from twhin_jax.graph import Graph


def tiny_config(seed: int = 0, epochs: int = 2):
  config = demo_config.get_config("test")
  config.train.eval_every_epochs = 0
  config.train.epochs = epochs
  config.train.seed = seed
  return config


@pytest.fixture(scope="module")
def parent_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("v1"))
  trainer = train_lib.train(tiny_config(), workdir, progress=False)
  tables = trainer.embeddings()
  names = {t: trainer.graph.names(t) for t in trainer.graph.entities}
  relations = trainer.rel_state["params"]
  version = trainer.lineage["version_id"]
  trainer.close()
  return workdir, tables, names, relations, version


def by_name(tables, names):
  return {t: dict(zip(names[t], tables[t])) for t in tables}


def test_warm_start_copies_shared_rows_by_name(parent_run, tmp_path):
  parent_dir, parent_tables, parent_names, parent_relations, version = parent_run
  config = tiny_config(seed=1)  # another seed: another vocabulary order
  config.warm_start.parent = parent_dir
  trainer = train_lib.Trainer(config, str(tmp_path / "v2"), progress=False)
  assert trainer.lineage["parent_id"] == version
  new_tables = trainer.embeddings()
  old = by_name(parent_tables, parent_names)
  moved = 0
  assert trainer.graph.names("user") != parent_names["user"]  # ids were reshuffled
  for t in new_tables:
    names = trainer.graph.names(t)
    for name, row in zip(names, new_tables[t]):
      np.testing.assert_array_equal(row, old[t][name])
      moved += 1
  assert moved == sum(len(v) for v in parent_names.values())
  for group, params in trainer.rel_state["params"].items():
    np.testing.assert_array_equal(params, parent_relations[group])
  trainer.close()


def test_warm_start_never_loads_a_whole_vocabulary(parent_run, tmp_path, monkeypatch):
  """The id map is a join of the two on-disk vocabularies: Graph.names,
  _name_index and lookup (whole-vocabulary paths) are never called, and
  the rows still land by name."""
  parent_dir, parent_tables, parent_names = parent_run[:3]
  expected = {t: dict(zip(parent_names[t], parent_tables[t])) for t in parent_tables}

  def refuse(*args, **kwargs):
    raise AssertionError("warm start loaded a whole vocabulary")
  config = tiny_config(seed=2)
  config.warm_start.parent = parent_dir
  with monkeypatch.context() as patch:
    patch.setattr(Graph, "names", refuse)
    patch.setattr(Graph, "_name_index", property(refuse))
    patch.setattr(Graph, "lookup", refuse)
    trainer = train_lib.Trainer(config, str(tmp_path / "v2"), progress=False)
  for t, table in trainer.embeddings().items():
    for name, row in zip(trainer.graph.names(t), table):
      np.testing.assert_array_equal(row, expected[t][name])
  trainer.close()


def test_l2_to_previous_limits_drift(parent_run, tmp_path):
  parent_dir = parent_run[0]
  mean_drift = {}
  for name, alpha in (("warm", 0.0), ("anchored", 10.0)):
    config = tiny_config(seed=1)
    config.warm_start.parent = parent_dir
    config.warm_start.l2_to_previous = alpha
    workdir = str(tmp_path / name)
    train_lib.train(config, workdir, progress=False).close()
    mean_drift[name] = drift.drift(parent_dir, workdir, k=5, sample=200)["mean_rel_l2"]
  cold_dir = str(tmp_path / "cold")
  train_lib.train(tiny_config(seed=1), cold_dir, progress=False).close()
  mean_drift["cold"] = drift.drift(parent_dir, cold_dir, k=5, sample=200)["mean_rel_l2"]
  assert mean_drift["anchored"] < 0.3 * mean_drift["warm"] < 0.3 * mean_drift["cold"], mean_drift


def test_l2_needs_a_parent():
  from twhin_jax import config as config_lib
  config = tiny_config()
  config.warm_start.l2_to_previous = 1.0
  with pytest.raises(ValueError, match="warm_start.l2_to_previous"):
    config_lib.validate(config)


def test_missing_parent_is_named(tmp_path):
  config = tiny_config()
  config.warm_start.parent = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="nowhere"):
    train_lib.Trainer(config, str(tmp_path / "v2"), progress=False)


def test_neighbor_init_is_the_eq5_mean(parent_run):
  """New entities start at the mean over their edges to shared ones of
  theta_s + theta_r (new target) or theta_t (new source, dot's adjoint)."""
  parent_dir = parent_run[0]
  parent = versions.ParentVersion(parent_dir)
  graph = parent.graph
  config = parent.config
  tables = {t: parent.read_type(t)[0] for t in graph.entities}
  # Pretend every third user is new; everything else is shared.
  mapping = {t: np.arange(info.count) for t, info in graph.entities.items()}
  new_users = np.arange(0, graph.entities["user"].count, 3)
  mapping["user"] = mapping["user"].copy()
  mapping["user"][new_users] = -1
  inits = versions.neighbor_init(graph, parent, config, mapping, tables)
  sums, counts = inits["user"]
  # The same by hand, edge by edge.
  expected = np.zeros_like(sums)
  expected_counts = np.zeros_like(counts)
  is_new = np.zeros(graph.entities["user"].count, bool)
  is_new[new_users] = True
  sizes = {t: graph.entities[t].partition_size for t in graph.entities}
  for (i, j) in graph.bucket_sizes():
    edges = graph.bucket_edges(i, j)
    for rel, s, d in zip(np.asarray(edges["rel"]), np.asarray(edges["src"]),
                         np.asarray(edges["dst"])):
      info = graph.relations[rel]
      s = s + (i if graph.entities[info.source].num_partitions > 1 else 0) * sizes[info.source]
      d = d + (j if graph.entities[info.target].num_partitions > 1 else 0) * sizes[info.target]
      src_new = info.source == "user" and is_new[s]
      dst_new = info.target == "user" and is_new[d]
      _, param, _ = parent.relation(info.name)
      if src_new and not dst_new:
        expected[s] += tables[info.target][d]  # translation + dot: adjoint is theta_t
        expected_counts[s] += 1
      elif dst_new and not src_new and info.target == "user":
        expected[d] += tables[info.source][s] + param
        expected_counts[d] += 1
  np.testing.assert_array_equal(counts, expected_counts)
  np.testing.assert_allclose(sums, expected, rtol=1e-5, atol=1e-6)
  assert counts[new_users].sum() > 0 and counts[~is_new].sum() == 0
