"""Partition residency (residency.py): which partitions a bucket needs, and
swaps that keep every row (written back on eviction, read back unchanged)."""

from __future__ import annotations

import os

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


def make_residency(graph, root):
  dims = {t: 8 for t in graph.entities}
  tables = storage.TableStore(root, graph.entities, dims, create=True)
  tables.initialize(seed=0, init_scale=0.1)
  slots = storage.SlotMap.fresh(tables.blocks())
  mesh = sharding_lib.make_mesh(1)
  sub_rows = {t: sharding_lib.sub_partition_rows(e.partition_size, 1)
              for t, e in graph.entities.items()}
  return residency.Residency(graph, dims, tables, slots, mesh, sub_rows), tables, slots


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
