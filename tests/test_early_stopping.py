"""Early stopping: the pure rule, and a real run that stops and ends on its
best epoch."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from twhin_jax import early_stopping
from twhin_jax.early_stopping import EarlyStopping


def _run(values, **kwargs):
  state, stops = EarlyStopping(), []
  for epoch, value in enumerate(values):
    state, _, stop = early_stopping.update(state, epoch, value, **kwargs)
    stops.append(stop)
  return state, stops


def test_stops_after_patience_evaluations_without_improvement():
  state, stops = _run([0.1, 0.3, 0.2, 0.25, 0.29], patience=3)
  assert stops == [False, False, False, False, True]
  assert state.best == 0.3 and state.best_epoch == 1 and state.stopped


def test_an_improvement_resets_the_count():
  state, stops = _run([0.1, 0.2, 0.15, 0.15, 0.21, 0.2, 0.2], patience=3)
  assert not any(stops)
  assert state.best_epoch == 4 and state.bad_evals == 2


def test_min_delta_and_lower_is_better():
  state, _ = _run([0.30, 0.305], patience=5, min_delta=0.01)
  assert state.best_epoch == 0  # +0.005 is below min_delta
  state, stops = _run([10.0, 8.0, 9.0, 8.5], metric_name="mr", patience=2)
  assert state.best == 8.0 and state.best_epoch == 1 and stops[-1]


def test_min_epochs_and_patience_zero():
  _, stops = _run([0.3, 0.2, 0.1, 0.1], patience=1, min_epochs=4)
  assert stops == [False, False, False, True]
  state, stops = _run([0.3, 0.2, 0.1, 0.1], patience=0)
  assert not any(stops) and state.best_epoch == 0


def test_learning_rates_fall_every_lr_patience_evaluations_on_a_plateau():
  """ReduceLROnPlateau's rule: every 2nd evaluation without improvement halves
  the scale, and an improvement keeps it (and restarts the count)."""
  state, scales = EarlyStopping(), []
  for epoch, value in enumerate([0.3, 0.2, 0.2, 0.2, 0.2, 0.31, 0.3, 0.3]):
    state, _, _ = early_stopping.update(state, epoch, value, patience=0, lr_patience=2,
                                        lr_factor=0.5)
    scales.append(state.lr_scale)
  assert scales == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25, 0.25, 0.125]
  state, _ = _run([0.3, 0.2, 0.2, 0.2], patience=0)  # lr_patience 0: constant rates
  assert state.lr_scale == 1.0


def test_state_round_trips_through_json():
  state, _ = _run([0.1, 0.3, 0.2], patience=3, lr_patience=1, lr_factor=0.5)
  assert state.lr_scale == 0.5
  assert EarlyStopping.from_json(json.loads(json.dumps(state.to_json()))) == state
  assert EarlyStopping.from_json(None) == EarlyStopping()
  # A checkpoint written before lr_scale existed resumes with constant rates.
  old = {k: v for k, v in state.to_json().items() if k != "lr_scale"}
  assert EarlyStopping.from_json(old).lr_scale == 1.0


def test_unknown_metric_is_rejected():
  with pytest.raises(ValueError, match="early-stopping metric"):
    early_stopping.update(EarlyStopping(), 0, 0.1, metric_name="ndcg")


def test_run_stops_and_ends_on_its_best_epoch(tmp_path):
  """A real (partitioned) run told that nothing after its first evaluation
  counts as an improvement (min_delta 1) stops after `patience` more epochs,
  and its final checkpoint holds epoch 0's tables and relation parameters,
  not the last epoch's: evaluation and a reopened run see epoch 0's MRR."""
  from twhin_jax import best_checkpoint
  from twhin_jax import demo_config
  from twhin_jax import train as train_lib
  config = demo_config.get_config("test")
  config.train.epochs = 10
  config.train.eval_every_epochs = 1
  config.train.early_stop_patience = 2
  config.train.early_stop_min_epochs = 0
  config.train.early_stop_min_delta = 1.0
  workdir = str(tmp_path / "run")
  trainer = train_lib.train(config, workdir, progress=False)
  mrrs = [r["valid"]["mrr"] for r in trainer.history]
  assert len(mrrs) == 3 and trainer.early_stop.stopped  # epoch 0, then 2 without improvement
  assert trainer.early_stop.best_epoch == 0 and trainer.cursor["epoch"] == 3
  assert abs(mrrs[2] - mrrs[0]) > 1e-3, mrrs  # the last epoch really differs from the best
  events = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [e["epoch"] for e in events if e.get("event") == "restored_best"] == [0]
  again = trainer.evaluate("valid", max_triples=config.eval.max_triples, progress=False)
  trainer.close()
  np.testing.assert_allclose(again["mrr"], mrrs[0], rtol=1e-5)
  # Reopening the run (as `twhin eval` does) sees the same values, and a
  # stopped run trains no further even with epochs to spare.
  reopened = train_lib.Trainer(train_lib.load_run_config(workdir), workdir, progress=False)
  assert reopened.early_stop == trainer.early_stop
  np.testing.assert_allclose(
      reopened.evaluate("valid", max_triples=config.eval.max_triples, progress=False)["mrr"],
      mrrs[0], rtol=1e-5)
  reopened.run()
  assert len(reopened.history) == 3 and reopened.cursor["epoch"] == 3
  reopened.close()
  with open(os.path.join(workdir, best_checkpoint.BEST_DIR, "best.json")) as f:
    assert json.load(f)["epoch"] == 0


def _plateau_config(epochs: int, factor: float):
  """The demo's test config where nothing after the first evaluation improves
  (min_delta 1), so with lr_plateau_patience 1 every later evaluation
  multiplies the rates by ``factor``."""
  from twhin_jax import demo_config
  config = demo_config.get_config("test")
  config.train.epochs = epochs
  config.train.eval_every_epochs = 1
  config.train.early_stop_patience = 0
  config.train.early_stop_min_delta = 1.0
  config.train.lr_plateau_patience = 1
  config.train.lr_plateau_factor = factor
  return config


def test_run_lowers_its_rates_on_a_plateau_and_resumes_them(tmp_path):
  """A real run: epochs 0 and 1 train at the config's rates, epoch 2 at half
  (epoch 1's evaluation did not improve), epoch 3 at a quarter, and from
  epoch 2 on its training loss differs from a run with constant rates'. A run
  stopped after epoch 2 and resumed trains epoch 3 as one that was never
  stopped (the same loss, bit for bit): the scale is in the checkpoint.
  (Final tables would not tell: both runs end on epoch 0's best copy.)"""
  from twhin_jax import train as train_lib
  config = _plateau_config(4, 0.5)
  straight = train_lib.train(config, str(tmp_path / "straight"), progress=False)
  straight.close()
  lr = config.train.lr
  assert [r["lr"]["entities"] for r in straight.history] == [lr, lr, lr / 2, lr / 4]
  assert straight.history[3]["lr"]["relations"] == config.train.relation_lr / 4
  losses = [r["loss"] for r in straight.history]
  constant = train_lib.train(_plateau_config(4, 1.0), str(tmp_path / "constant"), progress=False)
  constant.close()
  constant_losses = [r["loss"] for r in constant.history]
  assert losses[:2] == constant_losses[:2] and losses[2] != constant_losses[2]
  with open(os.path.join(str(tmp_path / "straight"), "metrics.jsonl")) as f:
    buckets_per_epoch = sum("bucket_index" in json.loads(line) for line in f) // 4
  workdir = str(tmp_path / "resumed")
  train_lib.train(config, workdir, progress=False,
                  stop_after_buckets=3 * buckets_per_epoch).close()  # after epoch 2's checkpoint
  resumed = train_lib.train(config, workdir, progress=False)
  resumed.close()
  assert len(resumed.history) == 4 and resumed.history[-1]["lr"]["entities"] == lr / 4
  assert resumed.history[-1]["loss"] == losses[3]


@pytest.mark.parametrize("field,value,message", [
    ("train.early_stop_metric", "ndcg", "train.early_stop_metric"),
    ("train.early_stop_patience", -1, "train.early_stop_patience"),
    ("train.early_stop_min_epochs", -2, "train.early_stop_min_epochs"),
    ("train.early_stop_min_delta", -0.1, "train.early_stop_min_delta"),
    ("model.regularizer", "n2", "model.regularizer"),
    ("train.lr_plateau_patience", -1, "train.lr_plateau_patience"),
    ("train.lr_plateau_factor", 0.0, "train.lr_plateau_factor"),
    ("train.lr_plateau_factor", 1.5, "train.lr_plateau_factor"),
])
def test_config_validation_names_the_field(field, value, message):
  from twhin_jax import config as config_lib
  from twhin_jax import demo_config
  config = demo_config.get_config("test")
  section, key = field.split(".")
  config[section][key] = value
  with pytest.raises(ValueError, match=message):
    config_lib.validate(config)


def test_config_stored_before_the_new_fields_still_opens():
  """A run's config.json written before train.early_stop_* and
  model.regularizer existed loads with their defaults and validates."""
  from twhin_jax import config as config_lib
  from twhin_jax import demo_config
  stored = config_lib.to_json_dict(demo_config.get_config("test"))
  for key in [k for k in stored["train"] if k.startswith("early_stop")]:
    del stored["train"][key]
  del stored["model"]["regularizer"]
  config = config_lib.from_json_dict(stored)
  config_lib.validate(config)
  assert config.model.regularizer == "l2"
  assert config.train.early_stop_patience == config_lib.base_config().train.early_stop_patience
  assert config.relations == demo_config.get_config("test").relations
