"""train.checkpoint_every_seconds: due checkpoints are skipped inside the
interval, the run's last bucket always saves, a run resumed from an
older checkpoint replays what was not saved, bit for bit, "auto" resolves
per backend, and several processes take one decision."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import record_calls

from twhin_jax import checkpoint as checkpoint_lib
from twhin_jax import config as config_lib
from twhin_jax import demo_config
from twhin_jax import distributed
from twhin_jax import sharding as sharding_lib
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


def test_auto_interval_resolves_per_backend():
  config = demo_config.get_config("test")
  assert config.train.checkpoint_every_seconds is None  # the default: auto
  config_lib.validate(config)
  cpu_mesh = sharding_lib.make_mesh(1)
  assert train_lib.checkpoint_interval(config, cpu_mesh) == 0.0  # every due checkpoint

  class _Device:  # no GPU here: only the platform name is read
    platform = "gpu"

  class _GpuMesh:
    devices = np.array([_Device()])

  assert train_lib.checkpoint_interval(config, _GpuMesh()) == config_lib.AUTO_CHECKPOINT_SECONDS
  config.train.checkpoint_every_seconds = 5
  assert train_lib.checkpoint_interval(config, _GpuMesh()) == 5.0


@pytest.mark.multihost
def test_processes_share_the_skip_decision(tmp_path):
  """Process 1's clock runs 10^6 times faster (clock_skew_worker.py), so on
  its own it would save every due checkpoint while process 0 skips them,
  and the job would stall in the first save; with process 0 deciding for
  both it ends, with the same tables as a run that saves every checkpoint."""
  from test_sharded import REPO, _free_port, committed_tables, cpu_env, wait_for_all

  def job(workdir: str, every: float) -> list[str]:
    port = _free_port()
    procs = [subprocess.Popen(
        [sys.executable, os.path.join(REPO, "tests", "clock_skew_worker.py"), "train",
         "--distributed", "--quiet",
         "--config", os.path.join(REPO, "twhin_jax", "demo_config.py") + ":test",
         "--workdir", workdir, "--config.train.epochs=2",
         "--config.train.eval_every_epochs=0",
         f"--config.train.checkpoint_every_seconds={every}"],
        env=cpu_env(2, **{distributed.ENV_COORDINATOR: f"127.0.0.1:{port}",
                          distributed.ENV_NUM_PROCESSES: "2",
                          distributed.ENV_PROCESS_ID: str(index)}),
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for index in range(2)]
    return wait_for_all(procs, timeout=300)

  skipping, every = str(tmp_path / "skipping"), str(tmp_path / "every")
  job(skipping, 3600.0)
  job(every, 0.0)
  a, b = committed_tables(skipping), committed_tables(every)
  for entity_type in a:
    np.testing.assert_array_equal(a[entity_type], b[entity_type])
