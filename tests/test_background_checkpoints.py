"""Background checkpoints (train.background_checkpoints): a checkpoint that
waits for its table writes in a thread never names slots not yet written."""

from __future__ import annotations

import concurrent.futures
import os

import jax
import numpy as np
import pytest

from twhin_jax import checkpoint as checkpoint_lib
from twhin_jax import config as config_lib
from twhin_jax import demo_config
from twhin_jax import sharding as sharding_lib
from twhin_jax import train as train_lib


def _state(value: float) -> dict:
  return {"w": np.full((3,), value, np.float32)}


def _saved_steps(workdir: str) -> list[int]:
  root = checkpoint_lib.checkpoint_root(workdir)
  return sorted(int(name) for name in os.listdir(root) if name.isdigit())


def test_save_after_waits_for_the_writes_then_commits(tmp_path):
  workdir = str(tmp_path)
  checkpointer = checkpoint_lib.Checkpointer(workdir)
  checkpointer.save(1, _state(1.0), {"cursor": 1})
  checkpointer.wait()
  write = concurrent.futures.Future()
  committed = []
  history = [{"epoch": 0}]
  checkpointer.save_after([write], 2, _state(2.0), {"cursor": 2, "history": history},
                          lambda: committed.append(2))
  # The table write is not done: no checkpoint may name its slots yet.
  assert _saved_steps(workdir) == [1] and committed == []
  history.append({"epoch": 1})  # the trainer's next epoch ends before the save
  write.set_result(None)
  checkpointer.wait()
  assert _saved_steps(workdir) == [2] and committed == [2]
  meta = checkpointer.restore_meta()
  assert meta["cursor"] == 2 and meta["history"] == [{"epoch": 0}]
  checkpointer.close()


def test_failed_write_is_raised_and_the_last_checkpoint_stays(tmp_path):
  workdir = str(tmp_path)
  checkpointer = checkpoint_lib.Checkpointer(workdir)
  checkpointer.save(1, _state(1.0), {"cursor": 1})
  write = concurrent.futures.Future()
  write.set_exception(OSError("disk full"))
  committed = []
  checkpointer.save_after([write], 2, _state(2.0), {"cursor": 2}, lambda: committed.append(2))
  with pytest.raises(OSError, match="disk full"):
    checkpointer.wait()
  assert committed == []
  assert checkpointer.restore_meta()["cursor"] == 1
  checkpointer.close()


def test_auto_is_off_on_cpu_and_settings_are_validated():
  config = demo_config.get_config("test")
  config_lib.validate(config)
  mesh = sharding_lib.make_mesh(1)
  assert jax.default_backend() == "cpu"
  assert not train_lib.background_checkpoints(config, mesh)  # "auto" on CPU
  config.train.background_checkpoints = "on"
  assert train_lib.background_checkpoints(config, mesh)
  config.train.background_checkpoints = "off"
  assert not train_lib.background_checkpoints(config, mesh)
  config.train.background_checkpoints = "sometimes"
  with pytest.raises(ValueError, match="train.background_checkpoints"):
    config_lib.validate(config)
