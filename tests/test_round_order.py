"""The order of the tournament's rounds (batching.py, device_schedule.round_passes
and chunks_per_device_step): a bucket cycles through its rounds K times, each
pass training a near-equal share of every (round, device) cell's chunks, and a
step of all G devices trains about train.batch_size edges."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from twhin_jax import batching
from twhin_jax import demo_config
from twhin_jax import device_schedule
from twhin_jax import residency
from twhin_jax import train as train_lib

from test_sharded import bucket_setup


def test_round_passes_takes_a_request_and_otherwise_one_step_a_visit_up_to_a_cap():
  assert device_schedule.round_passes(3, [40, 40]) == 3
  # Automatic: the busiest device's steps in the longest round, so no visit
  # is longer than a step.
  assert device_schedule.round_passes(0, [4, 2, 3, 3, 2]) == 4
  # Long rounds: at most MAX_AUTO_PASSES cycles (each visit costs a call and
  # a slot move).
  assert device_schedule.round_passes(0, [70, 71, 72]) == device_schedule.MAX_AUTO_PASSES
  # Rounds of one step still get two passes (part-full steps).
  assert device_schedule.round_passes(0, [1, 1, 1]) == device_schedule.MIN_AUTO_PASSES == 2
  assert device_schedule.round_passes(0, [0, 0]) == 1
  assert device_schedule.round_passes(0, []) == 1


@pytest.mark.parametrize("devices", [1, 2, 3, 4, 8, 16])
def test_a_step_of_all_devices_trains_about_one_batch(devices):
  batch, chunk = 1000, 50
  most = batch // chunk
  # Full chunks: S / G chunks a device, to the nearest power of two.
  per_device = device_schedule.chunks_per_device_step(batch, chunk, devices, chunk)
  assert 1 <= per_device <= most
  if devices == 1:
    assert per_device == most  # one device: its plain step
  else:
    # A half power of two (few shapes), within 25% of one device's batch.
    assert per_device in {round(2 ** (k / 2)) for k in range(12)}
    assert 0.75 < devices * per_device * chunk / batch < 1.25
  # Chunks a quarter full: about four times as many chunks, at most S.
  sparse = device_schedule.chunks_per_device_step(batch, chunk, devices, chunk / 4)
  assert sparse == most if devices <= 4 else 0.75 < devices * sparse * chunk / 4 / batch < 1.25


@pytest.fixture(scope="module")
def tiny_graph(tmp_path_factory):
  config = demo_config.get_config("test")
  workdir = str(tmp_path_factory.mktemp("graph"))
  return config, train_lib.prepare_graph(config, workdir, progress=False)


def tournament_calls(config, graph, shards: int, bucket, passes: int):
  config = config.copy_and_resolve_references()
  config.mesh.schedule = "tournament"
  config.mesh.round_passes = passes
  dims, _, layout, _ = bucket_setup(config, graph, shards, bucket)
  sub_rows = {t: 2 * -(-e.partition_size // (2 * shards)) for t, e in graph.entities.items()}
  capacity = residency.shard_capacity(graph, dims, sub_rows)
  working = residency.layout_for(graph, dims, residency.bucket_blocks(graph, bucket), shards,
                                 sub_rows, capacity, schedule="tournament")
  return list(batching.prepare_bucket(graph, layout, working, bucket, config, (0, 1, 2)))


def real_edges(batch, g):
  """Device g's real edges of a call as (src row, dst row, relation row) triples."""
  real = batch.weight[g] > 0
  rel = np.broadcast_to(batch.rel[g][..., None], real.shape) if batch.rel.ndim == 3 else batch.rel[g]
  return list(zip(batch.src[g][real].tolist(), batch.dst[g][real].tolist(), rel[real].tolist()))


def test_passes_cycle_through_the_rounds_and_deal_out_every_cell_evenly(tiny_graph):
  """With K passes, visits go round 0, 1, .., R - 1, K times; every
  (round, device) trains the same edges as with one pass, each pass about
  1/K of them; nothing is lost or repeated."""
  config, graph = tiny_graph
  shards, bucket, passes = 4, (0, 1), 3
  rounds = device_schedule.tournament(shards).num_rounds
  one = tournament_calls(config, graph, shards, bucket, 1)
  many = tournament_calls(config, graph, shards, bucket, passes)
  visits = [v for v, _ in many]
  assert visits == sorted(visits)  # visits in order
  assert set(visits) == set(range(passes * rounds))  # every pass visits every round
  assert {v for v, _ in one} == set(range(rounds))

  def per_cell(calls):
    cells = collections.defaultdict(list)  # (round, device) -> [edges], pass by pass
    shares = collections.defaultdict(collections.Counter)  # (round, device) -> pass -> edges
    for v, call in calls:
      k, p = v % rounds, v // rounds
      for g in range(shards):
        edges = real_edges(call.batch, g)
        cells[k, g].extend(edges)
        shares[k, g][p] += len(edges)
    return cells, shares

  cells_one, _ = per_cell(one)
  cells_many, shares = per_cell(many)
  assert cells_one.keys() == cells_many.keys()
  for cell, edges in cells_one.items():
    # Rows are those of the round's placement, so the same (round, device)
    # trains the same multiset of edges whatever the number of passes.
    assert sorted(edges) == sorted(cells_many[cell]), cell
  total = sum(len(e) for e in cells_many.values())
  assert total == graph.bucket_sizes()[bucket]
  busy = [(cell, share) for cell, share in shares.items() if sum(share.values()) >= 30 * passes]
  assert busy  # the check below is not vacuous
  for cell, share in busy:
    # Whole chunks are dealt out: each pass within a chunk or two of 1/K.
    chunk = config.negatives.chunk_size
    counts = [share[p] for p in range(passes)]
    assert max(counts) - min(counts) <= 2 * chunk * len(share) + chunk, (cell, counts)
    assert min(counts) > 0, (cell, counts)


def test_tournament_steps_fit_the_visit_and_the_batch(tiny_graph):
  """T of a call is a power of two that holds the visit (no all-padding
  steps beyond it), and S per device follows chunks_per_device_step."""
  config, graph = tiny_graph
  shards, bucket = 4, (0, 1)
  calls = tournament_calls(config, graph, shards, bucket, 0)
  most = config.train.batch_size // config.negatives.chunk_size
  for _, call in calls:
    steps, per_step = call.batch.weight.shape[1:3]
    assert steps & (steps - 1) == 0 and 1 <= steps <= batching.STEPS_PER_CALL
    assert 1 <= per_step <= most
    real_steps = (call.batch.weight > 0).any(axis=(0, 2, 3))  # [T]
    # The call's last real step lies in its second half: T is not oversized.
    assert steps == 1 or real_steps[steps // 2:].any()


@pytest.mark.parametrize("bad", [-1, -4])
def test_round_passes_must_be_a_count(bad):
  """(ConfigDict itself refuses a float, a string or a bool for the int field.)"""
  from twhin_jax import config as config_lib
  config = demo_config.get_config("test")
  config.mesh.round_passes = bad
  with pytest.raises(ValueError, match="mesh.round_passes"):
    config_lib.validate(config)
