"""Partition residency (residency.py): which partitions a bucket needs, and
swaps that keep every row (written back on eviction, read back unchanged)."""

from __future__ import annotations

import os
import types

import jax
import numpy as np
import pytest

from twhin_jax import demo_config
from twhin_jax import residency
from twhin_jax import sharding as sharding_lib
from twhin_jax import storage
from twhin_jax import train as train_lib


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
  config = demo_config.get_config("test")
  return train_lib.prepare_graph(config, str(tmp_path_factory.mktemp("graph")), progress=False)


def make_residency(graph, root, keep_all_bytes=0):
  dims = {t: 8 for t in graph.entities}
  tables = storage.TableStore(root, graph.entities, dims, create=True)
  tables.initialize(seed=0, init_scale=0.1)
  slots = storage.SlotMap.fresh(tables.blocks())
  mesh = sharding_lib.make_mesh(1)
  sub_rows = {t: sharding_lib.sub_partition_rows(e.partition_size, 1)
              for t, e in graph.entities.items()}
  return (residency.Residency(graph, dims, tables, slots, mesh, sub_rows,
                              keep_all_bytes=keep_all_bytes), tables, slots)


def test_bucket_blocks(graph):
  # user and tweet have 2 partitions, advertiser and ad one.
  blocks = residency.bucket_blocks(graph, (1, 0))
  assert blocks == sorted(blocks)
  assert ("advertiser", 0) in blocks and ("ad", 0) in blocks
  sources = {r.source for r in graph.relations}
  targets = {r.target for r in graph.relations}
  for t in ("user", "tweet"):
    expected = {(t, 1)} if t in sources else set()
    expected |= {(t, 0)} if t in targets else set()
    assert {b for b in blocks if b[0] == t} == expected
  for r, info in enumerate(graph.relations):
    src_block, dst_block = residency.relation_blocks(graph, (1, 0), r)
    assert src_block in blocks and dst_block in blocks
    assert src_block[0] == info.source and dst_block[0] == info.target


def test_swaps_keep_every_row(graph, tmp_path):
  res, tables, slots = make_residency(graph, str(tmp_path / "tables"))
  initial = {b: tables.read(b, 0) for b in tables.blocks()}
  res.load((0, 1))
  layout = res.layout
  # Every resident row sits at its offset in the working table.
  for block in layout.offsets:
    dim = res.dims[block[0]]
    home = np.asarray(res.home[dim].table)
    rows = layout.block_rows[block]
    start = layout.offsets[block]
    np.testing.assert_array_equal(home[start:start + rows], initial[block][0])
  # Change every resident row, then move to a bucket that evicts some.
  res.home = {dim: rows._replace(table=rows.table + 1.0, acc=rows.acc + 2.0)
              for dim, rows in res.home.items()}
  touched = set(layout.offsets)
  res.prefetch((1, 1))
  res.load((1, 1))
  res.flush()
  for block in tables.blocks():
    table, acc = tables.read(block, slots.current[block])
    if block in touched:
      np.testing.assert_allclose(table, initial[block][0] + 1.0, rtol=1e-6)
      np.testing.assert_allclose(acc, initial[block][1] + 2.0)
      assert slots.current[block] != slots.committed[block]  # never the committed slot
    else:
      np.testing.assert_array_equal(table, initial[block][0])
  res.close()


def test_same_bucket_is_not_reloaded(graph, tmp_path):
  res, _, _ = make_residency(graph, str(tmp_path / "tables"))
  res.load((0, 0))
  home = res.home
  res.load((0, 0))
  assert res.home is home
  res.close()


def test_chunked_transfers_keep_every_row(graph, tmp_path, monkeypatch):
  """Partitions move in many small chunks, the read-ahead covers only part of
  the next bucket and write-behind holds one chunk: every row still lands at
  its offset and is written back unchanged (an off-by-one chunk bound, a
  chunk read before its partition's write finished, or a dropped tail would
  show)."""
  monkeypatch.setattr(residency, "TRANSFER_BYTES", 3 * 9 * 4)  # 3 rows of d=8 (+ acc)
  monkeypatch.setattr(residency, "READ_AHEAD_BYTES", 7 * 9 * 4)
  monkeypatch.setattr(residency, "WRITE_BEHIND_BYTES", 1)
  monkeypatch.setattr(residency, "LOAD_WINDOW", 2)
  res, tables, slots = make_residency(graph, str(tmp_path / "tables"))
  initial = {b: tables.read(b, 0) for b in tables.blocks()}
  assert max(len(res._chunks(t)) for t in graph.entities) > 3
  expected = {b: (t.copy(), a.copy()) for b, (t, a) in initial.items()}
  for step, bucket in enumerate([(0, 1), (1, 1), (1, 0), (0, 0), (0, 1)]):
    res.load(bucket)
    for block, start in res.layout.offsets.items():
      dim = res.dims[block[0]]
      rows = res.layout.block_rows[block]
      np.testing.assert_array_equal(np.asarray(res.home[dim].table)[start:start + rows],
                                    expected[block][0])
      np.testing.assert_array_equal(np.asarray(res.home[dim].acc)[start:start + rows],
                                    expected[block][1])
      expected[block] = (expected[block][0] + (step + 1), expected[block][1] + 1)
    # Change the resident rows the way expected says (step + 1 per bucket).
    home = {}
    for dim, rows in res.home.items():
      table, acc = np.asarray(rows.table).copy(), np.asarray(rows.acc).copy()
      for block, start in res.layout.offsets.items():
        if res.dims[block[0]] == dim:
          n = res.layout.block_rows[block]
          table[start:start + n] += step + 1
          acc[start:start + n] += 1
      home[dim] = rows._replace(table=jax.device_put(table, rows.table.sharding),
                                acc=jax.device_put(acc, rows.acc.sharding))
    res.home = home
    if step < 4:
      res.prefetch([(1, 1), (1, 0), (0, 0), (0, 1)][step])
  res.flush()
  for block in tables.blocks():
    table, acc = tables.read(block, slots.current[block])
    np.testing.assert_array_equal(table, expected[block][0])
    np.testing.assert_array_equal(acc, expected[block][1])
  res.close()


@pytest.mark.parametrize("sizes", [(6, 6), (6, 4)])
def test_kept_partitions_move_without_mixing_rows(graph, tmp_path, monkeypatch, sizes):
  """Two kept partitions swap places (and, equal-sized, move chunk by chunk
  of 2 rows; unequal, in one program): every row ends at its new offset (a
  chunk written over rows not yet read would show as a duplicated row)."""
  monkeypatch.setattr(residency, "TRANSFER_BYTES", 2 * 2 * 9 * 4)  # 2 rows of 2 moves, d=8
  residency._move_rows.cache_clear()
  res, _, _ = make_residency(graph, str(tmp_path / "tables"))
  res.sub_rows = dict(res.sub_rows, a=sizes[0], b=sizes[1])
  res.dims = dict(res.dims, a=8, b=8)
  res.capacity = {8: 2 * max(sizes) + 6}
  first, second = ("a", 0), ("b", 0)
  old = types.SimpleNamespace(offsets={first: 0, second: sizes[0]})
  new = types.SimpleNamespace(offsets={second: 0, first: sizes[1]})
  rows = res.capacity[8]
  table = np.arange(rows * 8, dtype=np.float32).reshape(rows, 8)
  acc = np.arange(rows, dtype=np.float32) + 0.5
  moved = res._relayout(8, (jax.numpy.asarray(table), jax.numpy.asarray(acc)), old, new,
                        [first, second], per_coordinate=False)
  expected_table, expected_acc = table.copy(), acc.copy()
  for block, n in ((first, sizes[0]), (second, sizes[1])):
    a, b = old.offsets[block], new.offsets[block]
    expected_table[b:b + n], expected_acc[b:b + n] = table[a:a + n], acc[a:a + n]
  np.testing.assert_array_equal(np.asarray(moved[0]), expected_table)
  np.testing.assert_array_equal(np.asarray(moved[1]), expected_acc)
  assert (residency._move_rows.cache_info().currsize > 0) == (sizes[0] == sizes[1])
  res.close()


def test_small_tables_stay_whole(graph, tmp_path):
  """keep_all: every partition resident from the first bucket on, at the
  relative place it has in a bucket's own layout; no swap writes anything,
  flush writes every partition."""
  dims = {t: 8 for t in graph.entities}
  sub_rows = {t: e.partition_size for t, e in graph.entities.items()}
  size = residency.table_bytes(graph, dims, sub_rows)
  assert not make_residency(graph, str(tmp_path / "small"), size - 1)[0].keep_all
  res, tables, slots = make_residency(graph, str(tmp_path / "tables"), size)
  assert res.keep_all
  initial = {b: tables.read(b, 0) for b in tables.blocks()}
  res.load((0, 1))
  layout = res.layout
  used = residency.all_blocks(graph)
  assert sorted(layout.offsets) == used and set(used) >= set(residency.bucket_blocks(graph, (0, 1)))
  for block in used:
    start, rows = layout.offsets[block], layout.block_rows[block]
    table = np.asarray(res.home[res.dims[block[0]]].table)
    np.testing.assert_array_equal(table[start:start + rows], initial[block][0])
  # A bucket's blocks keep their order (the step sorts rows: same order, same sums).
  own = residency.layout_for(graph, dims, residency.bucket_blocks(graph, (1, 0)), 1, sub_rows,
                             residency.shard_capacity(graph, dims, sub_rows))
  pairs = sorted(own.offsets, key=own.offsets.get)
  assert pairs == sorted(pairs, key=layout.offsets.get)
  res.home = {dim: rows._replace(table=rows.table + 1.0) for dim, rows in res.home.items()}
  res.prefetch((1, 0))
  res.load((1, 0))
  assert res.layout is layout and not res.pending_writes  # nothing swapped
  assert slots.current == slots.committed
  res.flush()
  for block in used:
    np.testing.assert_allclose(tables.read(block, slots.current[block])[0],
                               initial[block][0] + 1.0, rtol=1e-6)


def test_keeping_tables_whole_trains_the_same(tmp_path, monkeypatch):
  """The trainer with small tables kept whole and with every bucket swapped:
  the same tables and relations, bit for bit (2 partitions, 2 epochs)."""
  config = demo_config.get_config("test")
  config.train.epochs = 2
  results = []
  for keep in (0, residency.KEEP_ALL_BYTES):
    monkeypatch.setattr(residency, "KEEP_ALL_BYTES", keep)
    trainer = train_lib.train(config, str(tmp_path / f"run{keep}"), progress=False)
    assert trainer.residency.keep_all == bool(keep)
    results.append((trainer.embeddings(), trainer.rel_state))
    trainer.close()
  (emb_a, rel_a), (emb_b, rel_b) = results
  for t in emb_a:
    np.testing.assert_array_equal(emb_a[t], emb_b[t])
  for a, b in zip(jax.tree.leaves(rel_a), jax.tree.leaves(rel_b)):
    np.testing.assert_array_equal(a, b)


def test_flush_writes_only_changed_rows(graph, tmp_path):
  """A flush right after a flush (the run's end after its last checkpoint)
  writes nothing: the slots stay on the committed copy; a change is written."""
  res, tables, slots = make_residency(graph, str(tmp_path / "tables"))
  res.load((0, 1))
  res.flush()
  slots.commit()
  res.flush()
  assert slots.current == slots.committed and not res.pending_writes
  res.home = {dim: rows._replace(table=rows.table * 2.0) for dim, rows in res.home.items()}
  res.flush()
  changed = [b for b in res.layout.offsets if slots.current[b] != slots.committed[b]]
  assert sorted(changed) == sorted(res.layout.offsets)


def test_every_write_passes_the_write_barrier(graph, tmp_path):
  """The trainer's checkpoints finish in the background; every write to
  storage (an eviction, a flush) must first wait for the last one (the
  barrier), or a kill could leave the latest final checkpoint's slots
  half overwritten."""
  res, tables, slots = make_residency(graph, str(tmp_path / "tables"))
  log = []
  res.write_barrier = lambda: log.append(dict(slots.current))
  write_rows = tables.write_rows

  def checked_write(*args, **kwargs):
    assert log, "a write before the barrier"
    return write_rows(*args, **kwargs)

  tables.write_rows = checked_write
  res.load((0, 1))
  res.home = {dim: rows._replace(table=rows.table + 1.0) for dim, rows in res.home.items()}
  res.load((1, 1))  # evicts
  assert log
  count = len(log)
  res.flush()
  assert len(log) > count


_ARENA_PROBE = r"""
import ctypes, sys, tempfile, threading
import numpy as np
if sys.argv[1] == "training":
  from twhin_jax import residency  # noqa: F401 - the training core caps the arenas
libc = ctypes.CDLL("libc.so.6")
libc.fopen.restype = ctypes.c_void_p
libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
libc.fclose.argtypes = [ctypes.c_void_p]
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]

def batch_arrays(ready, done):  # a preparation or io thread: bucket-sized arrays
  arrays = [np.ones(100_000, np.int64) for _ in range(4)]
  ready.wait()
  del arrays
  done.set()

ready = threading.Event()
threads = [threading.Thread(target=batch_arrays, args=(ready, threading.Event()))
           for _ in range(8)]
for t in threads:
  t.start()
ready.set()
for t in threads:
  t.join()
with tempfile.NamedTemporaryFile(suffix=".xml") as f:
  stream = libc.fopen(f.name.encode(), b"w")
  libc.malloc_info(0, stream)
  libc.fclose(stream)
  print(open(f.name).read().count("<heap nr="))
"""


@pytest.mark.skipif(residency._LIBC is None, reason="glibc only (mallopt, malloc_info)")
@pytest.mark.parametrize("mode", ["training", "control"])
def test_threads_share_malloc_arenas(mode):
  """Importing the training core caps glibc's arenas (limit_heap_fragmentation):
  eight threads allocating bucket-sized arrays share at most MALLOC_ARENAS
  heaps, so freed blocks are reused across threads instead of each arena
  keeping its own fragmented free memory; without the cap (control) they
  get an arena each."""
  import subprocess
  import sys
  env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
  env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-c", _ARENA_PROBE, mode], env=env, check=True,
                       capture_output=True, text=True).stdout
  heaps = int(out.strip().splitlines()[-1])
  if mode == "training":
    assert heaps <= residency.MALLOC_ARENAS, heaps
  else:
    assert heaps > residency.MALLOC_ARENAS + 2, heaps


def test_dispatching_the_next_bucket_early_trains_the_same(tmp_path, monkeypatch):
  """Trainer.run dispatches a bucket's swap and steps before the previous
  bucket has finished (its evicted rows are sliced behind its steps and
  written by the write-back thread). Against finishing every bucket before
  the next one starts: the same tables and relations, bit for bit, with a
  swap at every bucket (2 partitions, 2 epochs, small tables not kept whole)."""
  config = demo_config.get_config("test")
  config.train.epochs = 2
  monkeypatch.setattr(residency, "KEEP_ALL_BYTES", 0)
  results = []
  for ahead in (True, False):
    if not ahead:
      monkeypatch.setattr(train_lib, "_state_used_after", lambda *args: True)
    trainer = train_lib.train(config, str(tmp_path / f"run{ahead}"), progress=False)
    assert not trainer.residency.keep_all
    results.append((trainer.embeddings(), trainer.rel_state,
                    [r["edges"] for r in trainer.history]))
    trainer.close()
  (emb_a, rel_a, edges_a), (emb_b, rel_b, edges_b) = results
  assert edges_a == edges_b and all(edges_a)
  for t in emb_a:
    np.testing.assert_array_equal(emb_a[t], emb_b[t])
  for a, b in zip(jax.tree.leaves(rel_a), jax.tree.leaves(rel_b)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.skipif(residency.heap_info() is None, reason="glibc 2.33 or later only (mallinfo2)")
def test_free_heap_is_returned_past_the_kept_amount():
  """release_free_host_memory(keep_bytes) leaves up to keep_bytes of free
  heap with glibc (reused by the next bucket without page faults) and trims
  past it."""
  import ctypes
  libc = ctypes.CDLL("libc.so.6")
  libc.malloc.restype = ctypes.c_void_p
  libc.free.argtypes = [ctypes.c_void_p]
  blocks = [libc.malloc(64 << 10) for _ in range(1024)]  # 64 MiB in heap-sized blocks
  for block in blocks[:-1]:  # the last one keeps the heap from shrinking by itself
    libc.free(block)
  try:
    free = residency.heap_info().fordblks
    assert free >= 32 << 20, free
    assert not residency.release_free_host_memory(keep_bytes=free + (1 << 30))
    assert residency.release_free_host_memory(keep_bytes=1 << 20)
  finally:
    libc.free(blocks[-1])
