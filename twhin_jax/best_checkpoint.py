"""The best-so-far copy of a run, kept for early stopping (early_stopping.py).

When a validation evaluation improves on the best, the trainer's tables
(embeddings and Adagrad accumulators, partition by partition) and relation
state are copied to ``<workdir>/best/``:

  best/tables/<type>/slot0/{embeddings,adagrad}   TensorStore, one slot
  best/relations.npz                              relation state leaves
  best/best.json                                  {"epoch", "metric", "value"}

When training ends (patience ran out, or train.epochs was reached) and the
best epoch is not the last one, the copy is written back into the run's
tables as a new version of every partition before the epoch's checkpoint is
written, so that checkpoint, and `twhin eval`, export and indexing, hold the
best epoch's values. A crash in between resumes from the previous epoch's
checkpoint and retrains the same epoch (seeded), so nothing is lost. The copy costs one full
read and write of the tables per improvement, the same order as the
validation pass itself (which reads the whole tables).
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from twhin_jax import distributed
from twhin_jax import early_stopping
from twhin_jax import rundir
from twhin_jax import sharding as sharding_lib
from twhin_jax import storage

BEST_DIR = rundir.BEST_DIR


def _store(trainer, create: bool) -> storage.TableStore:
  return storage.open_storage(
      trainer.config.storage.driver, os.path.join(trainer.workdir, BEST_DIR, "tables"),
      entities=trainer.graph.entities, dims=trainer.dims,
      zarr_format=trainer.config.storage.zarr_format, create=create,
      sub_partitions=trainer.num_shards, num_slots=1,
      coordinate_accumulators=trainer.tables.coordinate_accumulators)


def after_validation(trainer, epoch: int, valid: dict) -> bool:
  """Updates ``trainer.early_stop`` with one validation record, copies the
  tables when it improved, and returns whether training should stop.

  When training ends here (patience ran out, or this was the last epoch) the
  best copy is restored before the loop writes the epoch's checkpoint, so
  that checkpoint (one per epoch, as always) holds the best values.
  """
  t = trainer.config.train
  state, improved, stop = early_stopping.update(
      trainer.early_stop, epoch, float(valid[t.early_stop_metric]),
      metric_name=t.early_stop_metric, patience=int(t.early_stop_patience),
      min_delta=float(t.early_stop_min_delta), min_epochs=int(t.early_stop_min_epochs),
      lr_patience=int(t.lr_plateau_patience), lr_factor=float(t.lr_plateau_factor))
  trainer.early_stop = state
  if improved:
    trainer.flush()
    if trainer.primary:
      best = _store(trainer, create=True)
      writes = []
      for block in trainer.tables.blocks():
        emb, acc = trainer.tables.read(block, trainer.slots.current[block])
        writes.extend(best.write(block, 0, emb, acc))
      for write in writes:
        write.result()
      leaves = jax.tree_util.tree_leaves(trainer.rel_state)
      np.savez(os.path.join(trainer.workdir, BEST_DIR, "relations.npz"),
               *[np.asarray(x) for x in leaves])
      with open(os.path.join(trainer.workdir, BEST_DIR, "best.json"), "w") as f:
        json.dump({"epoch": epoch, "metric": t.early_stop_metric, "value": state.best}, f)
    distributed.sync("best copy written")
  if stop or epoch + 1 >= int(t.epochs):
    restore_best(trainer, epoch)
  return stop


def restore_best(trainer, last_epoch: int) -> bool:
  """Writes the best copy back as the run's current state (the caller
  checkpoints it).

  Returns whether anything was restored (False when ``last_epoch``, the
  epoch just trained, is the best, or there was no validation).
  """
  state = trainer.early_stop
  path = os.path.join(trainer.workdir, BEST_DIR, "best.json")
  if state.best_epoch < 0 or not os.path.exists(path):
    return False
  with open(path) as f:
    saved = json.load(f)
  if saved["epoch"] != state.best_epoch or state.best_epoch == last_epoch:
    return False
  trainer.flush()
  # The working tables on the devices hold the last epoch; drop them so the
  # next load reads the restored partitions.
  trainer.residency.drop()
  best = _store(trainer, create=False)
  writes = []
  for block in trainer.tables.blocks():
    slot = trainer.slots.write_target(block)
    trainer.slots.current[block] = slot
    if trainer.primary:
      emb, acc = best.read(block, 0)
      writes.extend(trainer.tables.write(block, slot, emb, acc))
  for write in writes:
    write.result()
  distributed.sync("best copy restored")
  with np.load(os.path.join(trainer.workdir, BEST_DIR, "relations.npz")) as saved_leaves:
    leaves = [saved_leaves[f"arr_{i}"] for i in range(len(saved_leaves.files))]
  treedef = jax.tree_util.tree_structure(trainer.rel_state)
  trainer._rel_state = jax.tree_util.tree_map(
      lambda x: sharding_lib.global_array(np.asarray(x), trainer.mesh),
      jax.tree_util.tree_unflatten(treedef, leaves))
  trainer.log.record({"event": "restored_best", "epoch": state.best_epoch, "value": state.best,
                "metric": trainer.config.train.early_stop_metric})
  return True
