"""Buckets grouped by cell (bucket_index.py): the grouping, the reads of one
process's share, and the packing from that share (batching.py)."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from test_sharded import assert_same_local_arrays
from test_sharded import wait_for_all
from twhin_jax import batching
from twhin_jax import bucket_index
from twhin_jax import demo_config
from twhin_jax import residency
from twhin_jax import train as train_lib
from twhin_jax.graph import Graph

from test_sharded import bucket_setup


@pytest.fixture(scope="module")
def tiny_graph(tmp_path_factory):
  config = demo_config.get_config("test")
  workdir = str(tmp_path_factory.mktemp("graph"))
  return config, train_lib.prepare_graph(config, workdir, progress=False)


def test_import_groups_every_bucket_by_cell(tiny_graph):
  _, graph = tiny_graph
  assert graph.manifest["bucket_index"]["grid"] == bucket_index.GRID
  cell_grid = graph.cell_grid
  for (i, j), size in graph.bucket_sizes().items():
    if not size:
      continue
    edges = graph.bucket_edges(i, j)
    cells = cell_grid.cells(edges["src"], edges["dst"], edges["rel"])
    assert (np.diff(cells) >= 0).all(), f"bucket {i}_{j} is not grouped by cell"
    starts = graph.bucket_cells(i, j)
    np.testing.assert_array_equal(np.diff(starts), np.bincount(cells, minlength=len(starts) - 1))


def test_group_bucket_is_a_stable_counting_sort(tmp_path):
  """Several blocks (block_edges < E): the result is the stable sort by
  cell, every column moved alike, and the counts are written."""
  rng = np.random.default_rng(3)
  num = 10_007
  sizes = {"a": 500, "b": 37}
  relations = [dict(source="a", target="a"), dict(source="a", target="b"),
               dict(source="b", target="a"), dict(source="a", target="b")]
  rel = rng.integers(0, 4, num).astype(np.int32)
  src_size = np.asarray([sizes[r["source"]] for r in relations])[rel]
  dst_size = np.asarray([sizes[r["target"]] for r in relations])[rel]
  columns = dict(src=(rng.random(num) * src_size).astype(np.int32),
                 dst=(rng.random(num) * dst_size).astype(np.int32), rel=rel,
                 weight=rng.random(num).astype(np.float32))
  for name, values in columns.items():
    np.save(tmp_path / f"{name}.npy", values)
  cell_grid = bucket_index.CellGrid.of(sizes, relations, grid=8)
  assert cell_grid.type_pairs == (("a", "a"), ("a", "b"), ("b", "a"))
  counts = bucket_index.group_bucket(str(tmp_path), cell_grid, block_edges=1000)
  cells = cell_grid.cells(columns["src"], columns["dst"], columns["rel"])
  expected = np.argsort(cells, kind="stable")
  for name, values in columns.items():
    np.testing.assert_array_equal(np.load(tmp_path / f"{name}.npy"), values[expected], name)
  np.testing.assert_array_equal(np.load(tmp_path / bucket_index.INDEX_FILE), counts)
  np.testing.assert_array_equal(counts.ravel(), np.bincount(cells, minlength=3 * 64))
  assert sorted(os.listdir(tmp_path)) == ["cells.npy", "dst.npy", "rel.npy", "src.npy",
                                          "weight.npy"]


def test_read_ranges_merge_adjacent_cells_and_skip_empty_ones():
  starts = np.asarray([0, 3, 3, 7, 10, 12])  # cells of 3, 0, 4, 3, 2 edges
  assert bucket_index.read_ranges(starts, [True, True, True, False, True]) == [(0, 7), (10, 12)]
  assert bucket_index.read_ranges(starts, [False, True, False, False, False]) == []


def test_stratified_slices_split_the_bucket_and_sample_every_cell():
  counts = np.asarray([0, 50, 7, 300, 1, 0, 120])
  starts = np.concatenate([[0], np.cumsum(counts)])
  slices = bucket_index.stratified_slices(starts, 4, np.random.default_rng(0))
  rows = np.concatenate(slices)
  np.testing.assert_array_equal(np.sort(rows), np.arange(counts.sum()))  # each row once
  for piece in slices:
    assert (np.diff(piece) > 0).all()  # file order
    per_cell = np.bincount(np.searchsorted(starts, piece, side="right") - 1, minlength=7)
    assert (np.abs(per_cell - counts / 4) <= 1).all()  # a proportional share of every cell
  other = bucket_index.stratified_slices(starts, 4, np.random.default_rng(1))
  assert not all(np.array_equal(a, b) for a, b in zip(slices, other))  # rotated per seed


class InProcessSum:
  """prepare_bucket's ``exchange`` between threads standing in for processes."""

  def __init__(self, parties: int):
    self._barrier = threading.Barrier(parties, timeout=60)
    self._lock = threading.Lock()
    self._total = None

  def __call__(self, counts: np.ndarray) -> np.ndarray:
    with self._lock:
      self._total = counts.copy() if self._total is None else self._total + counts
    self._barrier.wait()
    total = self._total.copy()
    self._barrier.wait()
    return total


def _working(config, graph, shards, bucket, schedule):
  dims, working, layout, _ = bucket_setup(config, graph, shards, bucket)
  if schedule == "tournament":
    sub_rows = {t: 2 * -(-e.partition_size // (2 * shards)) for t, e in graph.entities.items()}
    capacity = residency.shard_capacity(graph, dims, sub_rows)
    working = residency.layout_for(graph, dims, residency.bucket_blocks(graph, bucket), shards,
                                   sub_rows, capacity, schedule="tournament")
  return working, layout


class ReadsPerThread(bucket_index.ReadStats):
  """READ_STATS that also keeps each thread's edges read."""

  def __init__(self):
    super().__init__()
    self.by_thread: dict[int, int] = {}

  def add(self, edges: int, num_bytes: int) -> None:
    super().add(edges, num_bytes)
    with self._lock:
      key = threading.get_ident()
      self.by_thread[key] = self.by_thread.get(key, 0) + int(edges)


def _pack_as_processes(config, graph, layout, working, bucket, parties, monkeypatch):
  """prepare_bucket of every party (a set of local devices) at once, in
  threads standing in for processes: [(calls, edges read)] per party."""
  reads = ReadsPerThread()
  monkeypatch.setattr(bucket_index, "READ_STATS", reads)
  exchange = InProcessSum(len(parties))
  results = [None] * len(parties)

  def run(n, local):
    calls = list(batching.prepare_bucket(graph, layout, working, bucket, config, (0, 1, 2),
                                         frozenset(local), exchange))
    results[n] = (calls, reads.by_thread.get(threading.get_ident(), 0))

  threads = [threading.Thread(target=run, args=(n, local)) for n, local in enumerate(parties)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  assert all(r is not None for r in results), "a party failed"
  return results


@pytest.mark.parametrize("schedule,parties", [("ring", [{0, 1}, {2, 3}]),
                                              ("ring", [{0}, {1, 2, 3}]),
                                              ("tournament", [{0, 1}, {2, 3}])])
def test_each_process_reads_its_cells_and_packs_what_the_full_read_packs(
    tiny_graph, schedule, parties, monkeypatch):
  """Each party (process) reads only the cells of its devices, far fewer
  than the bucket's edges, and its devices' arrays equal those of one
  process that reads the whole bucket and packs every device; the calls
  (rounds, groups, order) are the same for all."""
  config, graph = tiny_graph
  shards, bucket = 4, (0, 1)
  size = graph.bucket_sizes()[bucket]
  working, layout = _working(config, graph, shards, bucket, schedule)
  full = list(batching.prepare_bucket(graph, layout, working, bucket, config, (0, 1, 2)))
  results = _pack_as_processes(config, graph, layout, working, bucket, parties, monkeypatch)
  for local, (calls, read) in zip(parties, results):
    trained = sum(int((call.batch.weight[g] > 0).sum()) for _, call in full for g in local)
    # Every edge its devices train, and few others (boundary blocks).
    assert trained <= read <= trained + size // 8, (local, trained, read, size)
    assert_same_local_arrays(full, calls, local, shards)


def test_a_graph_without_the_index_is_read_whole(tiny_graph, tmp_path, monkeypatch):
  """An older import (no cells.npy) is read whole by every process, and
  packs the same arrays as the grouped one read by cells."""
  import shutil
  config, graph = tiny_graph
  copy = tmp_path / "old"
  shutil.copytree(graph.path, copy)
  for name in os.listdir(copy / "buckets"):
    os.remove(copy / "buckets" / name / bucket_index.INDEX_FILE)
  old = Graph(str(copy))
  assert old.bucket_cells(0, 1) is None
  shards, bucket, parties = 4, (0, 1), [{0, 1}, {2, 3}]
  working, layout = _working(config, graph, shards, bucket, "ring")
  by_cells = _pack_as_processes(config, graph, layout, working, bucket, parties, monkeypatch)
  whole = _pack_as_processes(config, old, layout, working, bucket, parties, monkeypatch)
  for local, (calls, read), (old_calls, old_read) in zip(parties, by_cells, whole):
    assert old_read == graph.bucket_sizes()[bucket] > read
    assert_same_local_arrays(calls, old_calls, local, shards)


def _run_two_processes(base: str, schedule: str, epochs: int) -> list[dict]:
  import json
  import subprocess
  import sys

  from test_sharded import REPO, _free_port, cpu_env
  from twhin_jax import distributed
  port = _free_port()
  procs = []
  for index in range(2):
    env = cpu_env(2, **{distributed.ENV_COORDINATOR: f"127.0.0.1:{port}",
                        distributed.ENV_NUM_PROCESSES: "2",
                        distributed.ENV_PROCESS_ID: str(index)})
    env["PYTHONPATH"] = REPO
    procs.append(subprocess.Popen(
        [sys.executable, os.path.join(REPO, "tests", "host_share_worker.py"), base, schedule,
         str(epochs)], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True))
  results = []
  for log in wait_for_all(procs):
    line = [x for x in log.splitlines() if x.startswith("HOST_SHARE ")][-1]
    results.append(json.loads(line[len("HOST_SHARE "):]))
  return results


@pytest.mark.multihost
@pytest.mark.parametrize("schedule", ["ring", "tournament"])
def test_two_processes_read_their_share_and_train_what_whole_reads_train(tmp_path, schedule):
  """2 processes x 2 devices (jax.distributed on localhost): reading only
  each process's cells trains bit-identical tables to reading whole buckets,
  while each process reads about the edges its devices train (whole: all of
  them), about half of them."""
  from test_train import committed_tables
  epochs = 1
  per_process = _run_two_processes(str(tmp_path), schedule, epochs)
  cells = committed_tables(str(tmp_path / "cells"))
  whole = committed_tables(str(tmp_path / "whole"))
  for entity_type in whole:
    np.testing.assert_array_equal(cells[entity_type], whole[entity_type], err_msg=entity_type)
  total = Graph(str(tmp_path / "cells" / "graph")).num_edges("train") * epochs
  assert [r["whole"]["edges"] for r in per_process] == [total, total]
  read = [r["cells"]["edges"] for r in per_process]
  kept = [r["cells"]["kept"] for r in per_process]  # what its devices train
  assert sum(kept) == total and [r["whole"]["kept"] for r in per_process] == kept
  for process_read, process_kept in zip(read, kept):
    # Every edge its devices train and few others (the grid's boundary blocks).
    assert process_kept <= process_read <= 1.05 * process_kept, (read, kept)
  if schedule == "ring":  # the tournament gives a chunk-sized type's slots to device 0
    assert max(read) < 0.6 * total, read
  for r in per_process:
    assert r["cells"]["bytes"] == r["cells"]["edges"] * 12  # src, dst, rel int32 (unweighted)
    assert r["cells"]["train_edges"] == r["whole"]["train_edges"] == total


def test_a_process_without_edges_in_a_bucket_packs_padding(tiny_graph):
  """A process whose devices train no edge of a bucket (possible with small
  types) still makes every call, all padding for its devices."""
  config, graph = tiny_graph
  shards, bucket = 4, (0, 1)
  working, layout = _working(config, graph, shards, bucket, "ring")
  full = list(batching.prepare_bucket(graph, layout, working, bucket, config, (0, 1, 2)))
  edges = graph.bucket_edges(*bucket)
  everyone = batching._BucketPacker(graph, layout, working, bucket, config, edges,
                                    np.arange(len(edges["src"])))
  nothing = batching._BucketPacker(graph, layout, working, bucket, config, edges,
                                   np.zeros(0, np.int64), frozenset({3}),
                                   lambda counts: counts + everyone.cell_counts)
  calls = list(nothing.calls(np.random.default_rng([0, 1, 2])))
  assert len(calls) == len(full) > 1
  for _, call in calls:
    assert not call.batch.weight.any()
