"""storage.sync: table writes reach the disk once per checkpoint, before the
checkpoint that names them is saved ("checkpoint"), with every write
("write", TensorStore's fsync per chunk file) or when the system decides
("none")."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import record_calls

from twhin_jax import checkpoint as checkpoint_lib
from twhin_jax import config as config_lib
from twhin_jax import demo_config
from twhin_jax import storage
from twhin_jax import train as train_lib
from twhin_jax.graph import EntityInfo

ENTITIES = {"user": EntityInfo("user", count=10, num_partitions=2)}
DIMS = {"user": 3}


def _store(root, create: bool, sync_each_write: bool) -> storage.TableStore:
  return storage.open_storage("tensorstore", str(root), entities=ENTITIES, dims=DIMS,
                              create=create, sync_each_write=sync_each_write)


def test_writes_without_per_write_sync_are_read_back_after_one_sync(tmp_path):
  store = _store(tmp_path, create=True, sync_each_write=False)
  rows = np.arange(15, dtype=np.float32).reshape(5, 3)
  for future in store.write(("user", 1), 1, rows, np.full(5, 2.0, np.float32)):
    future.result()
  store.sync()  # syncfs of the tables' file system: must not fail
  again = _store(tmp_path, create=False, sync_each_write=True)
  emb, acc = again.read(("user", 1), 1)
  np.testing.assert_array_equal(emb, rows)
  np.testing.assert_array_equal(acc, np.full(5, 2.0, np.float32))


def test_sync_of_a_removed_table_directory_names_it(tmp_path):
  root = tmp_path / "tables"
  store = _store(root, create=True, sync_each_write=False)
  shutil.rmtree(root)
  with pytest.raises(FileNotFoundError, match="tables"):
    store.sync()
  # Synced on every write: nothing is left for sync to do.
  _store(tmp_path / "other", create=True, sync_each_write=True).sync()


def test_setting_is_validated_and_picks_the_tables_mode(tmp_path):
  config = demo_config.get_config("test")
  assert config.storage.sync == "checkpoint"
  assert train_lib.table_options(config)["sync_each_write"] is False
  config.storage.sync = "write"
  assert train_lib.table_options(config)["sync_each_write"] is True
  config.storage.sync = "sometimes"
  with pytest.raises(ValueError, match="storage.sync"):
    config_lib.validate(config)


@pytest.mark.parametrize("background,sync", [("off", "checkpoint"), ("on", "checkpoint"),
                                             ("on", "none")])
def test_tables_are_synced_before_every_checkpoint_is_saved(tmp_path, monkeypatch, background,
                                                           sync):
  """The order of the real sync and the real save, recorded as they run:
  each checkpoint of a 2-epoch demo run follows a sync of the tables
  ("checkpoint"), in the trainer's thread or the background saver's; with
  "none" no sync runs."""
  events = []
  record_calls(monkeypatch, storage.TableStore, "sync", events, lambda *args: "sync")
  record_calls(monkeypatch, checkpoint_lib.Checkpointer, "_save_now", events,
               lambda *args: "save")
  config = demo_config.get_config("test")
  config.train.epochs = 2
  config.train.background_checkpoints = background
  config.storage.sync = sync
  trainer = train_lib.train(config, str(tmp_path), progress=False)
  trainer.close()
  saves = events.count("save")
  assert saves >= 2, events  # at least one checkpoint per epoch
  if sync == "checkpoint":
    # Every save directly follows a sync (the evaluation's flush syncs nothing).
    assert all(events[i - 1] == "sync" for i, e in enumerate(events) if e == "save"), events
  else:
    assert "sync" not in events, events
