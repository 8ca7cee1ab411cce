"""Networks over one import (networks.py): TwHIN-Follow and TwHIN-Engagement."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from twhin_jax import cli
from twhin_jax import config as config_lib
from twhin_jax import demo_config
from twhin_jax import networks
from twhin_jax import rundir
from twhin_jax import train as train_lib
from twhin_jax.graph import Graph

FOLLOW = ["follows", "promotes", "clicks"]
ENGAGEMENT = ["favorites", "retweets", "promotes", "clicks"]


def networks_config():
  config = demo_config.get_config("test")
  config.train.epochs = 1
  config.train.eval_every_epochs = 0
  config.networks = [{"name": "follow", "relations": FOLLOW},
                     {"name": "engagement", "relations": ENGAGEMENT}]
  return config


@pytest.fixture(scope="module")
def networks_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("networks"))
  runs = train_lib.train_networks(networks_config(), workdir, progress=False)
  return workdir, runs


def test_each_network_trains_its_own_tables_over_one_import(networks_run):
  workdir, runs = networks_run
  assert set(runs) == {"follow", "engagement"}
  parent = Graph(os.path.join(workdir, rundir.GRAPH_DIR))
  # One import: the networks' graphs are views (no bucket files of their own).
  for name, relations in (("follow", FOLLOW), ("engagement", ENGAGEMENT)):
    run = rundir.open_run(runs[name])
    assert isinstance(run.graph, networks.NetworkGraph)
    assert not os.path.exists(os.path.join(runs[name], rundir.GRAPH_DIR, "buckets"))
    assert [r.name for r in run.graph.relations] == [r.name for r in parent.relations
                                                     if r.name in relations]
    used = {r.source for r in run.graph.relations} | {r.target for r in run.graph.relations}
    assert set(run.graph.entities) == used
    assert set(run.all_embeddings()) == used
    # The network's train edges are exactly the parent's edges of its relations.
    parent_train = parent.split_edges("train")
    keep = [parent.relation_index[r] for r in relations]
    expected = int(np.isin(parent_train["rel"], keep).sum())
    view_train = run.graph.split_edges("train")
    assert run.graph.num_edges("train") == expected == len(view_train["rel"])
    assert set(np.unique(view_train["rel"]).tolist()) == set(range(len(relations)))
    for i, relation in enumerate(run.graph.relations):
      index = parent.relation_index[relation.name]
      assert int((view_train["rel"] == i).sum()) == int((parent_train["rel"] == index).sum())
    # Same ids and names as the shared import.
    assert run.graph.names_of("user", [0, 5]) == parent.names_of("user", [0, 5])
  follow_users = rundir.open_run(runs["follow"]).embeddings("user")
  engagement_users = rundir.open_run(runs["engagement"]).embeddings("user")
  assert follow_users.shape == engagement_users.shape
  assert not np.allclose(follow_users, engagement_users)  # two models, two tables


def test_network_degrees_count_only_its_relations(networks_run):
  workdir, runs = networks_run
  graph = rundir.open_run(runs["follow"]).graph
  edges = graph.split_edges("train")
  users = graph.entities["user"].count
  expected = np.zeros(users, np.int64)
  for i, relation in enumerate(graph.relations):
    chosen = edges["rel"] == i
    if relation.source == "user":
      expected += np.bincount(edges["src"][chosen], minlength=users)
    if relation.target == "user":
      expected += np.bincount(edges["dst"][chosen], minlength=users)
  np.testing.assert_array_equal(graph.degrees("user"), expected)


def test_cli_reads_one_network(networks_run, tmp_path, capsys):
  workdir, runs = networks_run
  out = str(tmp_path / "export")
  assert cli.main(["export", "--workdir", workdir, "--network", "follow", "--out", out]) == 0
  written = os.listdir(out)
  assert any(name.startswith("user") for name in written)
  assert not any(name.startswith("tweet") for name in written)
  assert cli.main(["eval", "--workdir", workdir, "--network", "engagement", "--json"]) == 0
  metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert metrics["mrr"] > 0
  assert cli.main(["eval", "--workdir", workdir, "--network", "nope"]) == 2
  assert "no network 'nope'" in capsys.readouterr().err
  assert cli.main(["inspect", "--workdir", workdir, "--network", "follow", "--no-stats",
                   "--json"]) == 0
  info = json.loads(capsys.readouterr().out)
  assert info["graph"]["network"] == "follow"
  assert {row["relation"] for row in info["graph"]["coverage"]} == set(FOLLOW)


def test_two_high_coverage_relations_in_one_network_warn():
  manifest = {"coverage": {
      "follows": {"source": {"type": "user", "share": 0.9}},
      "favorites": {"source": {"type": "user", "share": 0.8}},
      "clicks": {"source": {"type": "user", "share": 0.05}}}}
  warnings = networks.coverage_warnings(manifest, [
      {"name": "split", "relations": ["follows", "clicks"]},
      {"name": "mixed", "relations": ["follows", "favorites", "clicks"]}])
  assert len(warnings) == 1 and "'mixed'" in warnings[0] and "Sec. 4.3" in warnings[0]


@pytest.mark.parametrize("networks_value, field", [
    ([{"name": "a", "relations": ["nope"]}], "networks[0].relations"),
    ([{"name": "a", "relations": []}], "networks[0].relations"),
    ([{"name": "a", "relations": ["follows"]}, {"name": "a", "relations": ["clicks"]}],
     "networks[1].name"),
    ([{"name": "../x", "relations": ["follows"]}], "networks[0].name"),
    ([{"name": "a", "relations": ["follows"], "extra": 1}], "networks[0].extra"),
])
def test_bad_networks_name_the_field(networks_value, field):
  config = demo_config.get_config("test")
  config.networks = networks_value
  with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
    config_lib.validate(config)
