"""What a training run records while it trains: metrics.jsonl and TensorBoard.

Every record goes to ``<workdir>/metrics.jsonl`` (one JSON object a line, the
file the report, sweeps and tests read) and, as scalars, to TensorBoard event
files under ``<workdir>/tensorboard`` (``tensorboard --logdir runs/NAME``):

  train/loss, train/edges_per_s          per bucket
  epoch/loss, epoch/edges_per_s          per epoch
  valid/mrr, valid/hits@10, ...          per validation
  lr/entities, lr/relations              per epoch (Adagrad's base rates)
  norm/<type>                            per epoch: mean row L2 norm of each
                                         entity type's resident rows

tensorboardX writes the event files: it needs neither TensorFlow nor PyTorch,
where clu's summary writer pulls in TensorFlow. Only the primary process
writes (the others hold the same numbers).
"""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from twhin_jax import rundir


class TrainingLog:
  """Appends records to metrics.jsonl and scalars to TensorBoard."""

  def __init__(self, workdir: str, primary: bool, tensorboard: bool = True):
    self.primary = primary
    self.metrics_path = os.path.join(workdir, rundir.METRICS_FILE)
    self.writer = None
    if primary and tensorboard:
      from tensorboardX import SummaryWriter  # only when a run writes events
      self.writer = SummaryWriter(logdir=os.path.join(workdir, rundir.TENSORBOARD_DIR),
                                  flush_secs=30)

  def record(self, record: dict) -> None:
    """One JSON line, as it is."""
    if self.primary:
      with open(self.metrics_path, "a") as f:
        f.write(json.dumps(record) + "\n")

  def scalars(self, prefix: str, values: dict, step: int) -> None:
    """``prefix/key`` for each finite number in ``values`` at ``step``."""
    if self.writer is None:
      return
    for key, value in values.items():
      if isinstance(value, (int, float, np.floating, np.integer)) and math.isfinite(value):
        self.writer.add_scalar(f"{prefix}/{key}", float(value), step)

  def bucket(self, record: dict, step: int) -> None:
    self.record(record)
    self.scalars("train", {k: record[k] for k in ("loss", "edges_per_s")}, step)

  def epoch(self, record: dict, step: int, learning_rates: dict, norms: dict) -> None:
    self.record({"event": "epoch", **record})
    self.scalars("epoch", {k: record[k] for k in ("loss", "edges_per_s")}, step)
    self.scalars("valid", record.get("valid", {}), step)
    self.scalars("lr", learning_rates, step)
    self.scalars("norm", norms, step)
    if self.writer is not None:
      self.writer.flush()

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()
      self.writer = None


@jax.jit
def _row_norms(table: jax.Array) -> jax.Array:
  return jnp.linalg.norm(table, axis=-1)  # [rows]


def resident_row_norms(home: dict, layout) -> dict[str, float]:
  """Mean L2 norm of each entity type's resident rows (on this process's devices).

  ``home``: dim -> state.Rows (the sharded working tables); ``layout``: the
  sharding.WorkingLayout that says which rows of each shard belong to which
  partition (the rest is padding). Only the norms, 1/d of the table, leave
  the device.
  """
  if layout is None:
    return {}
  sums: dict[str, float] = {}
  counts: dict[str, int] = {}
  for dim, rows in home.items():
    capacity = layout.shard_rows[dim]
    for shard in rows.table.addressable_shards:
      g = (shard.index[0].start or 0) // capacity
      norms = np.asarray(_row_norms(shard.data))  # [capacity]
      for block in layout.blocks[dim]:
        entity_type, start = block[0], layout.offsets[block]
        count = layout.rows_in_shard(block, g)
        sums[entity_type] = sums.get(entity_type, 0.0) + float(norms[start:start + count].sum())
        counts[entity_type] = counts.get(entity_type, 0) + count
  return {t: sums[t] / counts[t] for t in sums if counts[t]}
