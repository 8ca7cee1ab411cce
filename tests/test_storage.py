"""TensorStore tables: layout, per-partition round trips, NaN guard, slot map."""

from __future__ import annotations

import json
import os

from hypothesis import given, settings
from hypothesis import strategies as st
import numpy as np
import pytest

from twhin_jax import storage
from twhin_jax.graph import EntityInfo

# 10 rows in 3 partitions: sizes 4, 4, 2 (the last one short); 7 rows in one.
ENTITIES = {"user": EntityInfo("user", 10, 3), "item": EntityInfo("item", 7, 1)}
DIMS = {"user": 3, "item": 5}


@settings(max_examples=200, deadline=None)
@given(size=st.integers(1, 10**7))
def test_chunk_layout_properties(size):
  rows = storage.chunk_rows(size)
  stored = storage.stored_partition_size(size)
  assert 1 <= rows <= storage.MAX_CHUNK_ROWS
  assert stored % rows == 0
  assert stored >= size
  assert stored - size < rows  # less than one chunk of padding


def test_chunk_layout_examples():
  assert storage.chunk_rows(10) == 10
  assert storage.stored_partition_size(10) == 10
  assert storage.chunk_rows(storage.MAX_CHUNK_ROWS) == storage.MAX_CHUNK_ROWS
  assert storage.chunk_rows(storage.MAX_CHUNK_ROWS + 1) == storage.MAX_CHUNK_ROWS // 2 + 1
  assert storage.stored_partition_size(storage.MAX_CHUNK_ROWS + 1) == storage.MAX_CHUNK_ROWS + 2


def _store(tmp_path, zarr_format, create=True, entities=ENTITIES):
  return storage.open_storage("tensorstore", str(tmp_path / "tables"), entities=entities, dims=DIMS,
                              zarr_format=zarr_format, create=create)


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_initialize_then_round_trip_per_partition(tmp_path, zarr_format):
  store = _store(tmp_path, zarr_format)
  assert store.blocks() == [("user", 0), ("user", 1), ("user", 2), ("item", 0)]
  store.initialize(seed=3, init_scale=0.5)
  expected_rows = {("user", 0): 4, ("user", 1): 4, ("user", 2): 2, ("item", 0): 7}
  initial = {}
  for block in store.blocks():
    emb, acc = store.read(block, 0)
    assert emb.shape == (expected_rows[block], DIMS[block[0]])
    assert emb.dtype == np.float32 and acc.dtype == np.float32
    assert acc.shape == (expected_rows[block],)
    assert np.all(np.isfinite(emb)) and np.any(emb != 0.0)
    assert not np.any(acc)
    initial[block] = emb
  # Partitions are seeded differently.
  assert not np.array_equal(initial[("user", 0)], initial[("user", 1)])
  # Same seed -> same values.
  again = storage.open_storage("tensorstore", str(tmp_path / "again"), entities=ENTITIES,
                               dims=DIMS, zarr_format=zarr_format, create=True)
  again.initialize(seed=3, init_scale=0.5)
  for block in store.blocks():
    np.testing.assert_array_equal(again.read(block, 0)[0], initial[block])

  # Write slot 1 partition by partition; read back through a reopened store.
  rng = np.random.default_rng(0)
  written = {}
  for block in store.blocks():
    rows = expected_rows[block]
    emb = rng.standard_normal((rows, DIMS[block[0]])).astype(np.float32)
    acc = rng.uniform(0, 1, rows).astype(np.float32)
    for future in store.write(block, 1, emb, acc):
      future.result()
    written[block] = (emb, acc)
  reopened = _store(tmp_path, zarr_format, create=False)
  for block in store.blocks():
    emb, acc = reopened.read(block, 1)
    np.testing.assert_array_equal(emb, written[block][0])
    np.testing.assert_array_equal(acc, written[block][1])
    # Slot 0 still holds the initial values.
    np.testing.assert_array_equal(reopened.read(block, 0)[0], initial[block])

  # Rewriting one partition leaves its neighbours alone.
  new = np.full((4, 3), 7.0, np.float32)
  for future in reopened.write(("user", 1), 1, new, np.ones(4, np.float32)):
    future.result()
  np.testing.assert_array_equal(reopened.read(("user", 1), 1)[0], new)
  np.testing.assert_array_equal(reopened.read(("user", 0), 1)[0], written[("user", 0)][0])
  np.testing.assert_array_equal(reopened.read(("user", 2), 1)[0], written[("user", 2)][0])

  # read_type concatenates the partitions of the slots a SlotMap names.
  slots = storage.SlotMap.fresh(store.blocks())
  slots.current[("user", 1)] = 1
  table = reopened.read_type("user", slots)
  assert table.shape == (10, 3)
  np.testing.assert_array_equal(table[:4], initial[("user", 0)])
  np.testing.assert_array_equal(table[4:8], new)
  np.testing.assert_array_equal(table[8:], initial[("user", 2)])
  np.testing.assert_array_equal(reopened.read_type("user", slots, use_committed=True)[4:8],
                                initial[("user", 1)])


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_arrays_hold_whole_chunks_per_partition(tmp_path, zarr_format):
  store = _store(tmp_path, zarr_format)
  user = ENTITIES["user"]
  stored = storage.stored_partition_size(user.partition_size)
  rows = storage.chunk_rows(user.partition_size)
  emb = store._arrays[("user", 0, "embeddings")]
  assert tuple(emb.shape) == (user.num_partitions * stored, DIMS["user"])
  assert tuple(emb.chunk_layout.read_chunk.shape) == (rows, DIMS["user"])
  assert tuple(store._arrays[("user", 1, "adagrad")].shape) == (user.num_partitions * stored,)
  assert os.path.isdir(tmp_path / "tables" / "user" / "slot1" / "embeddings")


@pytest.mark.parametrize("zarr_format", [2, 3])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_writing_non_finite_raises_and_keeps_data(tmp_path, zarr_format, bad):
  store = _store(tmp_path, zarr_format)
  store.initialize(seed=0, init_scale=1.0)
  before_emb, before_acc = store.read(("user", 2), 0)
  emb = np.ones((2, 3), np.float32)
  emb[1, 2] = bad
  with pytest.raises(FloatingPointError, match="NaN or inf"):
    store.write(("user", 2), 0, emb, np.ones(2, np.float32))
  after_emb, after_acc = store.read(("user", 2), 0)
  np.testing.assert_array_equal(after_emb, before_emb)
  np.testing.assert_array_equal(after_acc, before_acc)


def test_finite_check_sees_cancelling_infinities_and_sums_that_overflow():
  big = np.full(8, 3e38, np.float32)  # finite values whose float32 sum overflows
  assert storage._all_finite(big)
  assert not storage._all_finite(np.array([np.inf, -np.inf, 1.0], np.float32))
  assert not storage._all_finite(np.array([[1.0, np.nan]], np.float32))
  assert storage._all_finite(np.zeros((0, 4), np.float32))


def test_a_frozen_write_stores_the_rows(tmp_path):
  """frozen=True lets TensorStore write from the caller's arrays; the rows
  read back are those arrays' values."""
  store = _store(tmp_path, 3)
  store.initialize(seed=0, init_scale=1.0)
  rows = store.entities["user"].partition_rows(1)
  emb = np.arange(rows * 3, dtype=np.float32).reshape(rows, 3)
  acc = np.arange(rows, dtype=np.float32)
  for future in store.write_rows(("user", 1), 1, 0, emb, acc, frozen=True):
    future.result()
  got_emb, got_acc = store.read(("user", 1), 1)
  np.testing.assert_array_equal(got_emb, emb)
  np.testing.assert_array_equal(got_acc, acc)


def test_rows_are_read_into_arrays_a_cpu_device_uses_in_place(tmp_path):
  """read_rows returns HOST_ALIGNMENT-aligned arrays (TensorStore's own are
  16 bytes off), which jax's CPU client takes without a copy: out-of-core
  loads skip a copy of every row."""
  jax = pytest.importorskip("jax")
  store = _store(tmp_path, 3)
  store.initialize(seed=0, init_scale=1.0)
  rows = store.entities["user"].partition_rows(2)
  emb, acc = store.read_rows(("user", 2), 0, 1, rows)
  want_emb, want_acc = store.read(("user", 2), 0)
  np.testing.assert_array_equal(emb, want_emb[1:])
  np.testing.assert_array_equal(acc, want_acc[1:])
  for values in (emb, acc):
    assert values.ctypes.data % storage.HOST_ALIGNMENT == 0
  on_device = jax.device_put(emb, jax.devices("cpu")[0])
  assert on_device.unsafe_buffer_pointer() == emb.ctypes.data


def test_writing_wrong_row_count_raises(tmp_path):
  store = _store(tmp_path, 3)
  with pytest.raises(ValueError, match="expected 2 rows"):
    store.write(("user", 2), 0, np.ones((4, 3), np.float32), np.ones(4, np.float32))


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_opening_missing_table_raises_file_not_found(tmp_path, zarr_format):
  root = tmp_path / "nowhere"
  with pytest.raises(FileNotFoundError) as info:
    storage.open_storage("tensorstore", str(root), entities=ENTITIES, dims=DIMS,
                         zarr_format=zarr_format)
  assert str(root) in str(info.value)


def test_slot_map_write_target_and_commit():
  blocks = [("user", 0), ("user", 1), ("item", 0)]
  slots = storage.SlotMap.fresh(blocks)
  assert slots.committed == slots.current == {b: 0 for b in blocks}
  rng = np.random.default_rng(0)
  for _ in range(50):
    block = blocks[rng.integers(len(blocks))]
    target = slots.write_target(block)
    assert target in (0, 1)
    assert target != slots.committed[block]
    slots.current[block] = target  # what the training loop does after a write
    assert slots.write_target(block) != slots.committed[block]
    if rng.random() < 0.3:
      slots.commit()
      assert slots.committed == slots.current
      assert slots.committed is not slots.current  # a copy, not an alias
      for b in blocks:
        assert slots.write_target(b) != slots.current[b]


def test_slot_map_commit_is_a_copy():
  slots = storage.SlotMap.fresh([("user", 0)])
  slots.current[("user", 0)] = 1
  slots.commit()
  assert slots.committed[("user", 0)] == 1
  slots.current[("user", 0)] = 0
  assert slots.committed[("user", 0)] == 1
  assert slots.write_target(("user", 0)) == 0


def test_slot_map_json_round_trip():
  committed = {("user", 0): 1, ("user", 1): 0, ("item_v2", 12): 1, ("a/b", 3): 0}
  slots = storage.SlotMap(dict(committed), dict(committed))
  slots.current[("user", 1)] = 1  # uncommitted writes are not saved
  data = json.loads(json.dumps(slots.to_json()))
  restored = storage.SlotMap.from_json(data)
  assert restored.committed == committed
  assert restored.current == committed
  assert restored.current is not restored.committed


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_more_partitions_than_rows(tmp_path, zarr_format):
  # 2 rows in 3 partitions: sizes 1, 1, 0. The empty partition reads as 0 rows.
  entities = {"tag": EntityInfo("tag", 2, 3)}
  store = storage.open_storage("tensorstore", str(tmp_path / "t"), entities=entities,
                               dims={"tag": 4}, zarr_format=zarr_format, create=True)
  store.initialize(seed=1, init_scale=1.0)
  sizes = [store.read(("tag", p), 0)[0].shape for p in range(3)]
  assert sizes == [(1, 4), (1, 4), (0, 4)]
  slots = storage.SlotMap.fresh(store.blocks())
  assert store.read_type("tag", slots).shape == (2, 4)


class _MemoryStorage(storage.EntityStorage):
  """A second backend, in memory: what a new driver must provide (read_rows,
  write_rows and the attributes); the rest comes from EntityStorage."""

  def __init__(self, root, entities, dims, *, create=False, sub_partitions=1, num_slots=2):
    self.entities, self.dims = entities, dims
    self.chunk = {t: storage.chunk_rows(e.partition_size, sub_partitions)
                  for t, e in entities.items()}
    self.stored = {t: e.partition_size for t, e in entities.items()}
    self.arrays = {(t, p, s): (np.zeros((e.partition_rows(p), dims[t]), np.float32),
                               np.zeros(e.partition_rows(p), np.float32))
                   for t, e in entities.items() for p in range(e.num_partitions)
                   for s in range(num_slots)}

  def read_rows(self, block, slot, lo, hi):
    emb, acc = self.arrays[(*block, slot)]
    return emb[lo:hi].copy(), acc[lo:hi].copy()

  def write_rows(self, block, slot, lo, embeddings, adagrad, *, frozen=False):
    if not (np.all(np.isfinite(embeddings)) and np.all(np.isfinite(adagrad))):
      raise FloatingPointError(f"partition {block}: NaN or inf")
    emb, acc = self.arrays[(*block, slot)]
    emb[lo:lo + len(embeddings)], acc[lo:lo + len(adagrad)] = embeddings, adagrad

    class Done:
      def result(self):
        return None
    return [Done()]


def test_registry_opens_a_registered_driver_and_names_unknown_ones(tmp_path):
  assert "tensorstore" in storage.storage_drivers()
  assert isinstance(_store(tmp_path, 3), storage.TableStore)
  with pytest.raises(ValueError, match="config.storage.driver: 'nope'"):
    storage.open_storage("nope", str(tmp_path), entities=ENTITIES, dims=DIMS)
  storage.register_storage("memory-test")(_MemoryStorage)
  try:
    store = storage.open_storage("memory-test", str(tmp_path), entities=ENTITIES, dims=DIMS,
                                 create=True)
    disk = _store(tmp_path, 3)
    # The shared initialisation gives the same seeded rows on either backend.
    store.initialize(seed=3, init_scale=0.5)
    disk.initialize(seed=3, init_scale=0.5)
    slots = storage.SlotMap.fresh(store.blocks())
    for entity_type in ENTITIES:
      np.testing.assert_array_equal(store.read_type(entity_type, slots),
                                    disk.read_type(entity_type, slots))
    with pytest.raises(ValueError, match="expected 4 rows"):
      store.write(("user", 0), 1, np.zeros((3, 3), np.float32), np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="already registered"):
      storage.register_storage("tensorstore")(_MemoryStorage)
  finally:
    storage._DRIVERS.pop("memory-test")
