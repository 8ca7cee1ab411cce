"""Host-side batch preparation (batching.py): per-process packing."""

from __future__ import annotations

import pytest

from twhin_jax import batching
from twhin_jax import demo_config
from twhin_jax import residency
from twhin_jax import train as train_lib

from test_sharded import assert_same_local_arrays
from test_sharded import bucket_setup


@pytest.fixture(scope="module")
def tiny_graph(tmp_path_factory):
  config = demo_config.get_config("test")
  workdir = str(tmp_path_factory.mktemp("graph"))
  return config, train_lib.prepare_graph(config, workdir, progress=False)


@pytest.mark.parametrize("schedule,local", [("ring", {1, 3}), ("ring", {0}),
                                            ("tournament", {2, 3})])
def test_a_process_packs_only_its_devices_and_they_match_the_full_packing(
    tiny_graph, schedule, local):
  """With ``local_devices`` the calls (rounds, groups, order) and the local
  devices' arrays equal the packing of every device; the other devices'
  slices are left zero."""
  config, graph = tiny_graph
  shards, bucket = 4, (0, 1)
  dims, working, layout, capacity = bucket_setup(config, graph, shards, bucket)
  if schedule == "tournament":
    sub_rows = {t: 2 * -(-e.partition_size // (2 * shards)) for t, e in graph.entities.items()}
    capacity = residency.shard_capacity(graph, dims, sub_rows)
    working = residency.layout_for(graph, dims, residency.bucket_blocks(graph, bucket), shards,
                                   sub_rows, capacity, schedule="tournament")
  full = list(batching.prepare_bucket(graph, layout, working, bucket, config, (0, 1, 2)))
  mine = list(batching.prepare_bucket(graph, layout, working, bucket, config, (0, 1, 2),
                                      frozenset(local)))
  assert_same_local_arrays(full, mine, local, shards)
  others = [g for g in range(shards) if g not in local]
  # The skipped devices did have edges.
  assert sum(int((call.batch.weight[others] > 0).sum()) for _, call in full) > 0
