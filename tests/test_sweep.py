"""Sweeps: expansion, naming, a real 2-run sweep on the demo test graph,
--emit-commands, --collect and resume."""

from __future__ import annotations

import csv
import json
import os
import shlex

import pytest

from twhin_jax import cli
from twhin_jax import config as config_lib
from twhin_jax import sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SWEEP_CONFIG = """
from twhin_jax import demo_config

def get_config(variant=""):
  return demo_config.get_config(variant)

def get_sweep():
  return {"train.lr": [0.02, 0.3]}
"""
#: Every run: 1 epoch of the demo "test" graph (a few thousand edges).
BASE = ["--config.train.epochs=1", "--config.train.eval_every_epochs=0"]


def test_grid_is_a_product_first_key_slowest():
  runs = sweep.expand({"train.lr": [0.05, 0.1], "model.dim": [100, 200]})
  assert runs == [{"train.lr": 0.05, "model.dim": 100}, {"train.lr": 0.05, "model.dim": 200},
                  {"train.lr": 0.1, "model.dim": 100}, {"train.lr": 0.1, "model.dim": 200}]
  assert sweep.expand({"train.lr": 0.1}) == [{"train.lr": 0.1}]  # a scalar is one value


def test_list_of_runs_is_literal_and_composes_with_grid():
  runs = sweep.expand(sweep.grid({"config.train.lr": [1, 2]}) +
                      [{"--config.model.dim": 8, "train.loss": "softmax"}])
  assert runs == [{"train.lr": 1}, {"train.lr": 2}, {"model.dim": 8, "train.loss": "softmax"}]
  # A list value inside an explicit run is one value, not a grid axis.
  assert sweep.expand([{"data.files": [1, 2]}]) == [{"data.files": [1, 2]}]


@pytest.mark.parametrize("bad", [{"train.lr": []}, [{"a": 1}, {"a": 1}], ["train.lr=1"], 3, []])
def test_bad_sweeps_raise(bad):
  with pytest.raises(ValueError):
    sweep.expand(bad)


def test_names_are_readable_stable_unique_and_safe():
  runs = sweep.expand({"train.lr": [0.05, 0.1], "model.dim": [100, 200]})
  names = sweep.run_names(runs)
  assert names[0] == "train.lr=0.05,model.dim=100"
  assert len(set(names)) == 4
  assert names == sweep.run_names(sweep.expand({"train.lr": [0.05, 0.1],
                                                "model.dim": [100, 200]}))
  # Unsafe characters are replaced; a collision after sanitising gets hashes.
  tricky = [{"name": "a/b"}, {"name": "a b"}]
  tricky_names = sweep.run_names(tricky)
  assert len(set(tricky_names)) == 2
  assert all("/" not in n and " " not in n for n in tricky_names)
  assert all(n.startswith("name=a_b-") for n in tricky_names)
  long_name = sweep.run_name({f"train.field{i}": 0.123456 for i in range(10)})
  assert len(long_name) <= 80
  assert sweep.run_name({}) == "base"


def test_override_values_round_trip_through_load_config(tmp_path):
  path = tmp_path / "cfg.py"
  path.write_text(SWEEP_CONFIG)
  overrides = {"train.lr": 0.25, "train.loss": "softmax", "model.reciprocal": True,
               "name": "12"}  # a string that looks like a number stays a string
  config = config_lib.load_config(f"{path}:test", sweep.override_args(overrides))
  assert config.train.lr == 0.25 and config.train.loss == "softmax"
  assert config.model.reciprocal is True and config.name == "12"


def test_kinship_sweep_is_a_4_run_grid():
  runs = sweep.load_sweep(os.path.join(REPO, "configs", "kinship.py"))
  assert len(runs) == 4
  assert {tuple(sorted(r)) for r in runs} == {("model.dim", "train.lr")}


def test_sweep_end_to_end_table_emit_collect_resume(tmp_path, capsys):
  config_path = tmp_path / "demo_sweep.py"
  config_path.write_text(SWEEP_CONFIG)
  spec = f"{config_path}:test"
  workdir = str(tmp_path / "sweep")

  # --emit-commands first: one import line for the shared graph, one line per run.
  lines = sweep.emit_commands(spec, workdir, base_overrides=BASE)
  assert len(lines) == 3
  assert " import " in lines[0] and lines[0].count("--workdir") == 1
  for line, lr in zip(lines[1:], ["0.02", "0.3"]):
    train, evaluate = line.split(" && ")
    words = shlex.split(train)
    assert words[:2] == ["twhin", "train"]
    assert f"--config.train.lr={lr}" in words and "--config.train.epochs=1" in words
    assert words[words.index("--workdir") + 1] == os.path.join(workdir, f"train.lr={lr}")
    assert shlex.split(evaluate)[:2] == ["twhin", "eval"] and "valid" in evaluate
  # Both runs point at one shared import (not there yet: the emitted import makes it).
  links = {os.path.realpath(os.path.join(workdir, f"train.lr={lr}", "graph"))
           for lr in ("0.02", "0.3")}
  assert len(links) == 1

  rows = sweep.run_sweep(spec, workdir, split="valid", metric="mrr", base_overrides=BASE,
                         progress=False)
  assert [r["status"] for r in rows] == ["done", "done"]
  mrrs = [r["mrr"] for r in rows]
  assert mrrs == sorted(mrrs, reverse=True) and mrrs[0] > 0
  assert len(os.listdir(os.path.join(workdir, sweep.GRAPHS_DIR))) == 1  # imported once
  with open(os.path.join(workdir, sweep.RESULTS_CSV)) as f:
    table = list(csv.DictReader(f))
  assert [row["name"] for row in table] == [r["name"] for r in rows]
  with open(os.path.join(workdir, sweep.RESULTS_MD)) as f:
    markdown = f.read()
  assert "sorted by mrr (descending)" in markdown and rows[0]["name"] in markdown

  # Ascending for mr.
  by_mr = sweep.collect(workdir, metric="mr")
  assert [r["mr"] for r in by_mr] == sorted(r["mr"] for r in by_mr)

  # Resume: finished runs are skipped (their eval files stay untouched), and
  # nothing is left to emit.
  evals = [os.path.join(workdir, r["name"], "eval_valid.json") for r in rows]
  stamps = [os.path.getmtime(p) for p in evals]
  capsys.readouterr()
  sweep.run_sweep(spec, workdir, base_overrides=BASE, progress=False)
  assert "done, skipped" in capsys.readouterr().err
  assert [os.path.getmtime(p) for p in evals] == stamps
  assert sweep.emit_commands(spec, workdir, base_overrides=BASE) == []

  # A run whose result is missing is the only one redone; --collect via the CLI.
  os.remove(evals[1])
  assert cli.main(["sweep", "--collect", "--workdir", workdir]) == 0
  assert "pending" in capsys.readouterr().out
  assert len(sweep.emit_commands(spec, workdir, base_overrides=BASE)) == 1
  with open(os.path.join(workdir, sweep.SWEEP_FILE)) as f:
    assert len(json.load(f)["runs"]) == 2


def test_cli_errors(tmp_path, capsys):
  path = tmp_path / "nosweep.py"
  path.write_text("from twhin_jax import demo_config\nget_config = demo_config.get_config\n")
  assert cli.main(["sweep", "--config", f"{path}:test", "--workdir", str(tmp_path / "w")]) == 2
  assert "get_sweep" in capsys.readouterr().err
  assert cli.main(["sweep", "--workdir", str(tmp_path / "w")]) == 2
  assert cli.main(["sweep", "--collect", "--workdir", str(tmp_path / "none")]) == 2
  sweep_path = tmp_path / "s.py"
  sweep_path.write_text(SWEEP_CONFIG)
  assert cli.main(["sweep", "--config", f"{sweep_path}:test", "--workdir", str(tmp_path / "w"),
                   "--metric", "loss"]) == 2
