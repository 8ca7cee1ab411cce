"""train.checkpoint_every_seconds: due checkpoints are skipped inside the
interval, the run's last bucket always saves, and a run resumed from an
older checkpoint replays what was not saved, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import record_calls

from twhin_jax import checkpoint as checkpoint_lib
from twhin_jax import config as config_lib
from twhin_jax import demo_config
from twhin_jax import train as train_lib


def _config(epochs: int, every_seconds: float):
  config = demo_config.get_config("test")
  config.train.epochs = epochs
  config.train.eval_every_epochs = 0
  config.train.checkpoint_every_buckets = 1
  config.train.checkpoint_every_seconds = every_seconds
  return config


def _count_saves(monkeypatch) -> list:
  """The cursor of every checkpoint saved from now on (the saves still run)."""
  cursors = []
  record_calls(monkeypatch, checkpoint_lib.Checkpointer, "_save_now", cursors,
               lambda self, step, state, meta: meta["cursor"])
  return cursors


def test_inside_the_interval_only_the_last_bucket_saves(tmp_path, monkeypatch):
  saves = _count_saves(monkeypatch)
  trainer = train_lib.train(_config(2, 3600.0), str(tmp_path / "long"), progress=False)
  trainer.close()
  assert saves == [{"epoch": 2, "bucket": 0}]
  saves.clear()
  # 0: every due checkpoint, one per bucket (the demo's 2 x 2 buckets, 2 epochs).
  trainer = train_lib.train(_config(2, 0.0), str(tmp_path / "every"), progress=False)
  buckets = trainer.graph.bucket_grid[0] * trainer.graph.bucket_grid[1]
  trainer.close()
  assert len(saves) == 2 * buckets and saves[-1] == {"epoch": 2, "bucket": 0}


def test_a_run_stopped_between_checkpoints_replays_to_the_same_tables(tmp_path):
  reference = train_lib.train(_config(2, 0.0), str(tmp_path / "reference"), progress=False)
  expected = reference.embeddings()
  reference.close()
  # Stops after 3 buckets with none of them saved (a kill inside the
  # interval): the resumed run starts from scratch and must end the same.
  workdir = str(tmp_path / "stopped")
  stopped = train_lib.train(_config(2, 3600.0), workdir, progress=False, stop_after_buckets=3)
  stopped.close()
  resumed = train_lib.train(_config(2, 3600.0), workdir, progress=False)
  got = resumed.embeddings()
  resumed.close()
  for entity_type, table in expected.items():
    np.testing.assert_array_equal(got[entity_type], table)


def test_interval_is_validated():
  config = _config(1, -1.0)
  with pytest.raises(ValueError, match="train.checkpoint_every_seconds"):
    config_lib.validate(config)
  config.train.checkpoint_every_seconds = float("nan")
  with pytest.raises(ValueError, match="train.checkpoint_every_seconds"):
    config_lib.validate(config)
