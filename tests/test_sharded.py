"""Sharded training: sub-bucket schedule (pure numpy), 8 fake CPU devices
against one device, the golden shardings, and a 2-process run with resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from twhin_jax import batching
from twhin_jax import demo_config
from twhin_jax import distributed
from twhin_jax import model
from twhin_jax import residency
from twhin_jax import sharding as sharding_lib
from twhin_jax import train as train_lib

from test_train import committed_tables

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(REPO, "tests", "golden", "sharding_8dev.json")


def cpu_env(devices: int, **extra) -> dict:
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu")
  for name in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES,
               distributed.ENV_PROCESS_ID):
    env.pop(name, None)
  env.update(extra)
  return env


def test_sub_partition_rows_cover_the_partition():
  for size in (1, 7, 300, 1001):
    for shards in (1, 2, 3, 8):
      for align in (1, 4, 64):
        sub = sharding_lib.sub_partition_rows(size, shards, align)
        assert sub % align == 0
        assert sub * shards >= size  # every row has a device
        assert sub >= 1


@pytest.fixture(scope="module")
def tiny_graph(tmp_path_factory):
  config = demo_config.get_config("test")
  workdir = str(tmp_path_factory.mktemp("graph"))
  return config, train_lib.prepare_graph(config, workdir, progress=False)


def bucket_setup(config, graph, shards: int, bucket):
  """(dims, working layout, relation layout, shard capacity) of one bucket."""
  dims = {t: 64 for t in graph.entities}
  sub_rows = {t: sharding_lib.sub_partition_rows(e.partition_size, shards)
              for t, e in graph.entities.items()}
  capacity = residency.shard_capacity(graph, dims, sub_rows)
  working = residency.layout_for(graph, dims, residency.bucket_blocks(graph, bucket), shards,
                                 sub_rows, capacity)
  return dims, working, model.RelationLayout.from_config(config), capacity


@pytest.mark.parametrize("shards", [1, 3, 4])
def test_rounds_give_each_device_its_own_rows(tiny_graph, shards):
  """Every real edge is trained exactly once; in round k device g's sources
  lie in its home sub-partition and its targets in sub-partition (g+k) mod G."""
  config, graph = tiny_graph
  bucket = (0, 1)
  dims, working, layout, capacity = bucket_setup(config, graph, shards, bucket)
  seen, rounds = 0, set()
  for k, call in batching.prepare_bucket(graph, layout, working, bucket, config, (0, 0, 0)):
    rounds.add(k)
    batch = call.batch
    assert batch.src.shape[0] == shards
    real = batch.weight > 0  # [G, T, S, C]
    seen += int(real.sum())
    for g in range(shards):
      src = batch.src[g][real[g]]
      dst = batch.dst[g][real[g]]
      assert src.max(initial=0) < capacity[64] and dst.max(initial=0) < capacity[64]
      # Rows are shard-local: below the shard's capacity, above 0.
      assert (src >= 0).all() and (dst >= 0).all()
      # Uniform ranges belong to the right sub-partitions.
      j = (g + k) % shards
      for r, lo, n in zip(batch.rel[g].ravel(), batch.dst_lo[g].ravel(), batch.dst_n[g].ravel()):
        del r
        assert 0 <= lo <= capacity[64] and 0 <= n <= max(working.sub_rows.values())
      del j
  assert seen == graph.bucket_sizes()[bucket]
  assert rounds <= set(range(shards))


def test_rows_map_back_to_entities(tiny_graph):
  """Decoding (device, shard row) back to local ids recovers the bucket's edges."""
  config, graph = tiny_graph
  shards = 4
  bucket = (1, 0)
  dims, working, layout, _ = bucket_setup(config, graph, shards, bucket)
  decoded = []
  for k, call in batching.prepare_bucket(graph, layout, working, bucket, config, (0, 0, 0)):
    b = call.batch
    for g in range(shards):
      j = (g + k) % shards
      real = b.weight[g] > 0
      rel_rows = np.broadcast_to(b.rel[g][..., None], real.shape)[real]
      for src_row, dst_row, row in zip(b.src[g][real], b.dst[g][real], rel_rows):
        r = layout.groups[call.group][row]
        info = graph.relations[r]
        src_block = (info.source, bucket[0] if graph.entities[info.source].num_partitions > 1 else 0)
        dst_block = (info.target, bucket[1] if graph.entities[info.target].num_partitions > 1 else 0)
        src_local = src_row - working.offsets[src_block] + g * working.sub_rows[src_block]
        dst_local = dst_row - working.offsets[dst_block] + j * working.sub_rows[dst_block]
        decoded.append((r, src_local, dst_local))
  edges = graph.bucket_edges(*bucket)
  expected = sorted(zip(np.asarray(edges["rel"]).tolist(), np.asarray(edges["src"]).tolist(),
                        np.asarray(edges["dst"]).tolist()))
  assert sorted((int(r), int(s), int(d)) for r, s, d in decoded) == expected


def test_distributed_settings_from_env():
  assert distributed.settings_from_env({}) == {}
  full = {distributed.ENV_COORDINATOR: "10.0.0.1:1234", distributed.ENV_NUM_PROCESSES: "4",
          distributed.ENV_PROCESS_ID: "3"}
  assert distributed.settings_from_env(full) == {
      "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}
  with pytest.raises(ValueError, match=distributed.ENV_PROCESS_ID):
    distributed.settings_from_env({k: v for k, v in full.items()
                                   if k != distributed.ENV_PROCESS_ID})
  with pytest.raises(ValueError, match="outside"):
    distributed.settings_from_env(dict(full, **{distributed.ENV_PROCESS_ID: "4"}))


@pytest.mark.multidevice
def test_eight_devices_match_one_device_and_golden_shardings():
  out = subprocess.run([sys.executable, os.path.join(REPO, "tests", "sharded_worker.py")],
                       env=cpu_env(8), capture_output=True, text=True, timeout=900, cwd=REPO)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  one, eight = result["one"], result["eight"]
  assert eight["edges"] == one["edges"]  # every edge trained once per epoch
  # Random ranking over ~600 users / ~2000 tweets gives MRR well under 0.02.
  assert one["mrr"] > 0.04 and eight["mrr"] > 0.04, result
  assert eight["mrr"] >= 0.8 * one["mrr"], result
  assert abs(eight["auc"] - one["auc"]) < 0.03, result
  with open(GOLDEN) as f:
    golden = json.load(f)
  assert result["shardings"] == golden, (
      "state shardings changed; if intended, regenerate tests/golden/sharding_8dev.json "
      f"from: {json.dumps(result['shardings'], indent=1)}")


def _train_two_processes(workdir: str, epochs: int, port: int) -> list[str]:
  procs = []
  for index in range(2):
    env = cpu_env(2, **{distributed.ENV_COORDINATOR: f"127.0.0.1:{port}",
                        distributed.ENV_NUM_PROCESSES: "2",
                        distributed.ENV_PROCESS_ID: str(index)})
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "twhin_jax.cli", "train", "--distributed", "--quiet",
         "--config", os.path.join(REPO, "twhin_jax", "demo_config.py") + ":test",
         "--workdir", workdir, f"--config.train.epochs={epochs}"],
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  return wait_for_all(procs)


def assert_same_local_arrays(full, calls, local, shards):
  """The calls packed for the devices in ``local`` hold, on those devices,
  exactly the arrays of the calls packed for every device (``full``), and
  nothing on the other devices."""
  assert len(calls) == len(full) > 1
  for (k_full, call_full), (k, call) in zip(full, calls):
    assert (k_full, call_full.group) == (k, call.group)
    for name, a, b in zip(call_full.batch._fields, call_full.batch, call.batch):
      if a is None:
        assert b is None
        continue
      for g in local:
        np.testing.assert_array_equal(a[g], b[g], err_msg=f"{name} of device {g}")
      for g in set(range(shards)) - set(local):
        assert not b[g].any(), f"{name} of device {g} was packed by {local}"


def wait_for_all(procs, timeout: float = 600) -> list[str]:
  """The combined output of every process, once each has exited with 0;
  on a timeout every process is killed (one stuck collective stalls all)."""
  logs = []
  for proc in procs:
    try:
      log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      for p in procs:
        p.kill()
      raise
    assert proc.returncode == 0, log[-3000:]
    logs.append(log)
  return logs


def _free_port() -> int:
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.multihost
def test_two_processes_train_checkpoint_and_resume(tmp_path):
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  logs = _train_two_processes(straight, 2, _free_port())
  for index, log in enumerate(logs):
    assert f"process {index} of 2" in log and "4 in all" in log, log
  # The same run cut after epoch 1, then resumed to epoch 2 in new processes.
  _train_two_processes(resumed, 1, _free_port())
  _train_two_processes(resumed, 2, _free_port())
  a, b = committed_tables(straight), committed_tables(resumed)
  for entity_type in a:
    np.testing.assert_array_equal(a[entity_type], b[entity_type])
  with open(os.path.join(straight, train_lib.METRICS_FILE)) as f:
    epochs = [json.loads(line) for line in f if '"event": "epoch"' in line]
  assert [e["epoch"] for e in epochs] == [0, 1]  # one writer: no duplicate records
  assert epochs[-1]["valid"]["mrr"] > 0.03


def test_mixed_chunks_hold_several_relations_of_one_type_pair(tiny_graph):
  config, graph = tiny_graph
  config = config.copy_and_resolve_references()
  config.model.reciprocal = True
  config.negatives.mix_relations = True
  bucket = (0, 0)
  dims, working, layout, _ = bucket_setup(config, graph, 1, bucket)
  mixed_chunks, seen = 0, 0
  for _, call in batching.prepare_bucket(graph, layout, working, bucket, config, (0, 0, 0)):
    b = call.batch
    assert b.rel.shape == b.src.shape  # one relation row per edge
    real = b.weight[0] > 0  # [T, S, C]
    seen += int(real.sum())
    for t, s in zip(*np.nonzero(real.any(axis=2))):
      relations = {layout.groups[call.group][row] for row in b.rel[0, t, s][real[t, s]]}
      types = {(graph.relations[r].source, graph.relations[r].target) for r in relations}
      assert len(types) == 1  # negatives stay within one source and one target type
      mixed_chunks += len(relations) > 1
  assert seen == graph.bucket_sizes()[bucket]
  assert mixed_chunks > 0


def test_mixed_chunks_need_reciprocal_relations():
  from twhin_jax import config as config_lib
  config = demo_config.get_config("test")
  config.negatives.mix_relations = True
  with pytest.raises(ValueError, match="negatives.mix_relations"):
    config_lib.validate(config)


def test_large_buckets_are_prepared_in_slices(tiny_graph, monkeypatch):
  """Sliced preparation (one device, parallel threads) trains every edge
  exactly once and is deterministic."""
  config, graph = tiny_graph
  bucket = (0, 1)
  dims, working, layout, _ = bucket_setup(config, graph, 1, bucket)
  monkeypatch.setattr(batching, "SLICE_EDGES", 500)
  monkeypatch.setattr(batching, "READ_BLOCK_EDGES", 100)  # slices of 5 runs of 100 edges
  monkeypatch.setattr(batching, "RUNS_PER_SLICE", 5)
  assert graph.bucket_sizes()[bucket] > 3 * 500

  def edges_of_run(seed_path=(0, 0, 0)):
    out = []
    for _, call in batching.prepare_bucket(graph, layout, working, bucket, config, seed_path):
      real = call.batch.weight[0] > 0
      out.append(np.stack([call.batch.src[0][real], call.batch.dst[0][real]], axis=1))
    return np.concatenate(out)

  first, second = edges_of_run(), edges_of_run()
  np.testing.assert_array_equal(first, second)
  assert len(first) == graph.bucket_sizes()[bucket]
  # Another seed: the same edges (as a multiset of row pairs) in another order.
  other = edges_of_run((0, 0, 1))
  assert not np.array_equal(first, other)
  assert sorted(map(tuple, first.tolist())) == sorted(map(tuple, other.tolist()))
