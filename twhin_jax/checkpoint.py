"""Checkpoints: Orbax for the small state, slot maps for the big tables.

A checkpoint (``<workdir>/checkpoints/<n>/``, written atomically by Orbax's
CheckpointManager: a temporary directory renamed on success) holds

  state   relation parameters and their Adagrad state (a pytree)
  meta    JSON: format version, bucket cursor, optimizer step count, seed,
          the slot map naming the committed TensorStore slot of every entity
          partition (see storage.py), the full config, lineage (version id,
          parent id, graph manifest hash, config hash, creation time) and the
          metrics so far.

The entity tables themselves stay in TensorStore; the slot map makes the
checkpoint a consistent snapshot of them without copying. Only the latest
checkpoint's slots are guaranteed untouched, so we keep a single one plus the
one being written.

The resume order matters: first restore the meta (cursor, slots), then open
the tables on those slots, then rebuild the relation state from the config
and restore into it.
"""

from __future__ import annotations

import concurrent.futures
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

# The names and the meta reader are rundir's (readers of a run need no jax).
from twhin_jax.rundir import CHECKPOINT_DIR, checkpoint_root, read_meta  # noqa: F401
from twhin_jax.rundir import CHECKPOINT_FORMAT_VERSION as FORMAT_VERSION


class Checkpointer:
  """Save/restore of (state pytree, meta JSON) under ``<workdir>/checkpoints``.

  With one process a save finishes in the background (Orbax's async
  checkpointing: the state is copied to the host before ``save`` returns;
  writing, syncing and the final rename follow in a thread; a save took
  about 0.2 s of waiting for 0.04 s of CPU). ``wait`` blocks until it is
  final. The trainer waits before anything is written to the table slots the
  previous checkpoint names (Residency's write barrier), so a kill at any
  moment leaves the latest final checkpoint intact.
  """

  def __init__(self, workdir: str):
    asynchronous = jax.process_count() == 1
    options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True,
                                           enable_async_checkpointing=asynchronous)
    self.manager = ocp.CheckpointManager(checkpoint_root(workdir), options=options)
    #: save_after's thread: waits for the table writes, then saves.
    self._saver = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    self._pending: concurrent.futures.Future | None = None

  def latest_step(self) -> int | None:
    self.wait()
    return self.manager.latest_step()

  def save(self, step: int, state, meta: dict) -> None:
    """Starts writing a checkpoint (after the one before is final)."""
    self.wait()
    self._save_now(step, state, meta)

  def _save_now(self, step: int, state, meta: dict) -> None:
    meta = dict(meta, format_version=FORMAT_VERSION)
    self.manager.wait_until_finished()
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))

  def save_after(self, writes: list, step: int, state, meta: dict, on_saved=None,
                 before_save=None) -> None:
    """Starts a save that waits for ``writes`` (futures of the table writes
    its slot map names) first, in a thread, and returns at once; calls
    ``before_save`` (the trainer syncs the tables to disk), saves, then calls
    ``on_saved`` (the trainer commits its slot map). ``state`` must not
    change meanwhile (the trainer passes a copy). Until the writes are done
    no checkpoint names their slots: a kill leaves the one before final.
    A failed write is raised by the next ``wait``. ``meta`` is copied now
    (the trainer's history grows while the writes run)."""
    self.wait()
    meta = json.loads(json.dumps(meta))

    def finish():
      for write in writes:
        write.result()
      if before_save is not None:
        before_save()
      self._save_now(step, state, meta)
      if on_saved is not None:
        on_saved()

    self._pending = self._saver.submit(finish)

  def wait(self) -> None:
    """Blocks until the last save is final (renamed into place)."""
    pending, self._pending = self._pending, None
    if pending is not None:
      pending.result()
    self.manager.wait_until_finished()

  def restore_meta(self, step: int | None = None) -> dict:
    self.wait()
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"{self.manager.directory}: no checkpoint")
    return read_meta(os.path.join(str(self.manager.directory), str(step)))

  def restore_state(self, abstract_state, step: int | None = None):
    self.wait()
    step = self.latest_step() if step is None else step
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))
    return restored["state"]

  def close(self) -> None:
    self.wait()
    self._saver.shutdown(wait=True)
    self.manager.close()


def to_numpy_tree(tree):
  return jax.tree_util.tree_map(np.asarray, tree)
