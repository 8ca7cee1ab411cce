"""The command line: strict arguments, clear errors, honest eval output."""

from __future__ import annotations

import json
import os

import pytest

from twhin_jax import cli
from twhin_jax import demo_config
from twhin_jax import rundir
from twhin_jax import train as train_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "configs", "demo.py:test")


@pytest.mark.parametrize("argv", [
    ["eval", "--workdir", "x", "--jsno"],
    ["eval", "--workdir", "x", "--config.model.dim=8"],
    ["export", "--workdir", "x", "--bogus"],
    ["inspect", "--workdir", "x", "extra"],
    ["train", "--config", DEMO, "--workdir", "x", "--epochs=3"],
])
def test_unknown_arguments_exit_nonzero_with_a_message(argv, capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(argv)
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert "unrecognized arguments" in err
  assert argv[-1] in err


def test_ill_typed_override_is_a_clear_error_not_a_traceback(tmp_path, capsys):
  code = cli.main(["train", "--config", DEMO, "--workdir", str(tmp_path / "w"),
                   "--config.model.dim=abc"])
  err = capsys.readouterr().err
  assert code == 2
  assert "--config.model.dim: expected int, got 'abc'" in err
  assert "Traceback" not in err
  assert not os.path.exists(tmp_path / "w")  # nothing started


def test_every_command_comes_from_the_one_table():
  parser = cli.build_parser()
  subcommands = parser._subparsers._group_actions[0].choices
  assert set(subcommands) == set(cli.COMMANDS)
  assert {"import", "train", "eval", "export", "index", "cluster", "sweep", "drift", "inspect",
          "compress", "serve", "report", "demo"} <= set(cli.COMMANDS)
  overridable = {name for name, c in cli.COMMANDS.items() if c.config_overrides}
  assert overridable == {"import", "train", "sweep", "demo"}


def test_eval_heading_and_json_name_full_filtered_ranking(demo_run_d16, capsys):
  assert cli.main(["eval", "--workdir", demo_run_d16, "--split", "valid", "--quiet"]) == 0
  out = capsys.readouterr().out
  assert "Filtered full ranking on valid" in out
  with open(rundir.eval_file(demo_run_d16, "valid")) as f:
    written = json.load(f)
  assert written["ranking"] == {"ranking": "full", "filtered": True, "num_sampled_negatives": 0}
  assert written["split"] == "valid"


@pytest.fixture(scope="module")
def sampled_run_without_test(tmp_path_factory):
  """A run ranked by sampling whose graph has no test split."""
  config = demo_config.get_config("test")
  config.model.dim = 8
  config.train.epochs = 1
  config.train.eval_every_epochs = 0
  config.data.test_fraction = 0.0
  config.eval.num_sampled_negatives = 20
  workdir = str(tmp_path_factory.mktemp("sampled"))
  train_lib.train(config, workdir, progress=False).close()
  return workdir


def test_eval_says_when_it_ran_sampled_ranking(sampled_run_without_test, capsys):
  assert cli.main(["eval", "--workdir", sampled_run_without_test, "--split", "valid",
                   "--quiet"]) == 0
  out = capsys.readouterr().out
  assert "Filtered sampled ranking (20 uniform + 20 degree-proportional negatives) on valid" in out
  assert "full ranking" not in out
  assert cli.main(["eval", "--workdir", sampled_run_without_test, "--split", "valid",
                   "--json"]) == 0
  metrics = json.loads(capsys.readouterr().out)
  assert metrics["ranking"] == {"ranking": "sampled", "filtered": True,
                                "num_sampled_negatives": 20}


def test_eval_of_an_empty_split_is_an_error(sampled_run_without_test, capsys):
  code = cli.main(["eval", "--workdir", sampled_run_without_test, "--json"])
  captured = capsys.readouterr()
  assert code == 2
  assert captured.out == ""  # no {"mrr": NaN}
  assert "the test split has no edges" in captured.err
  assert not os.path.exists(rundir.eval_file(sampled_run_without_test, "test"))


def test_eval_of_a_missing_run_names_it(tmp_path, capsys):
  assert cli.main(["eval", "--workdir", str(tmp_path / "missing")]) == 2
  assert "missing: no such run directory" in capsys.readouterr().err
