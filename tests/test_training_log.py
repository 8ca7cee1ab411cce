"""TensorBoard event files written beside metrics.jsonl (training_log.py)."""

from __future__ import annotations

import glob
import json
import os
import struct

import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from twhin_jax import demo_config
from twhin_jax import rundir
from twhin_jax import train as train_lib
from twhin_jax import training_log


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
  """tag -> [(step, value)] from the TFRecord event files of ``logdir``.

  TFRecord framing: uint64 length, uint32 masked CRC, data, uint32 masked CRC.
  """
  scalars: dict[str, list[tuple[int, float]]] = {}
  files = sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*")))
  assert files, f"no event file in {logdir}"
  for path in files:
    with open(path, "rb") as f:
      data = f.read()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack_from("<Q", data, offset)
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


@pytest.fixture(scope="module")
def run_with_validation(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("tb"))
  config = demo_config.get_config("test")
  config.train.epochs = 2
  config.train.eval_every_epochs = 1
  train_lib.train(config, workdir, progress=False).close()
  return workdir


def test_event_files_hold_loss_speed_validation_lr_and_norms(run_with_validation):
  scalars = read_scalars(os.path.join(run_with_validation, rundir.TENSORBOARD_DIR))
  for tag in ("train/loss", "train/edges_per_s", "epoch/loss", "valid/mrr", "valid/hits_10",  # TensorBoard tags have no "@"
              
              "lr/entities", "lr/relations", "norm/user", "norm/tweet"):
    assert tag in scalars, f"{tag} missing; have {sorted(scalars)}"
  with open(os.path.join(run_with_validation, rundir.METRICS_FILE)) as f:
    records = [json.loads(line) for line in f]
  buckets = [r for r in records if "bucket" in r]
  epochs = [r for r in records if r.get("event") == "epoch"]
  # The same numbers as metrics.jsonl, one point per bucket and per epoch.
  assert len(scalars["train/loss"]) == len(buckets)
  np.testing.assert_allclose([v for _, v in scalars["train/loss"]],
                             [r["loss"] for r in buckets], rtol=1e-6)
  assert [v for _, v in scalars["valid/mrr"]] == pytest.approx(
      [r["valid"]["mrr"] for r in epochs], rel=1e-6)
  steps = [s for s, _ in scalars["train/loss"]]
  assert steps == sorted(steps) and steps[-1] > steps[0]
  # Trained rows move away from their N(0, 1e-3^2) start: norms well above it.
  assert all(v > 1e-2 for _, v in scalars["norm/user"])


def test_resident_row_norms_skip_padding():
  from twhin_jax import sharding as sharding_lib
  from twhin_jax import state as state_lib
  import jax.numpy as jnp
  # One shard of capacity 5: block ("a", 0) rows 0-1, ("b", 0) rows 2-3, row 4 padding.
  table = jnp.asarray([[3.0, 4.0], [0.0, 1.0], [1.0, 0.0], [0.0, 2.0], [100.0, 0.0]])
  layout = sharding_lib.WorkingLayout(
      num_shards=1, blocks={2: [("a", 0), ("b", 0)]}, offsets={("a", 0): 0, ("b", 0): 2},
      sub_rows={("a", 0): 2, ("b", 0): 2}, block_rows={("a", 0): 2, ("b", 0): 2},
      shard_rows={2: 5})
  home = {2: state_lib.Rows(table, jnp.zeros(5), None, None)}
  norms = training_log.resident_row_norms(home, layout)
  assert norms == pytest.approx({"a": 3.0, "b": 1.5})
