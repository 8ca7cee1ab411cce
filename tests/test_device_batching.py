"""Device-side batch preparation (device_batching.py): the chunks it forms, the
log q it computes, and training with it against the host path."""

from __future__ import annotations

import collections
import logging
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from twhin_jax import batching
from twhin_jax import config as config_lib
from twhin_jax import demo_config
from twhin_jax import device_batching
from twhin_jax import negatives
from twhin_jax import train as train_lib

# Five relations in two parameter groups; relations 0 and 1 (and 3 and 4) share
# a group and a type pair, so mixed chunks put them in one class.
RELATIONS = [SimpleNamespace(source="u", target="t"), SimpleNamespace(source="u", target="t"),
             SimpleNamespace(source="u", target="u"), SimpleNamespace(source="u", target="t"),
             SimpleNamespace(source="u", target="t")]
GROUPS = ("translation:8", "translation:8", "translation:8", "diagonal:8", "diagonal:8")
SRC_ROWS, DST_ROWS = 300, 40


def _classes(mixed: bool) -> device_batching.Classes:
  layout = SimpleNamespace(group=GROUPS)
  return device_batching.Classes.of(SimpleNamespace(relations=RELATIONS), layout, mixed)


def _tables(classes, chunk, uniform) -> device_batching.RelationTables:
  num_rel = len(RELATIONS)
  src_n = np.full(num_rel, SRC_ROWS, np.int32)
  dst_n = np.asarray([DST_ROWS, DST_ROWS, SRC_ROWS, DST_ROWS, DST_ROWS], np.int32)
  return device_batching.RelationTables(
      src_lo=np.asarray([0, 0, 0, 0, 0], np.int32), src_n=src_n,
      dst_lo=np.asarray([SRC_ROWS, SRC_ROWS, 0, SRC_ROWS, SRC_ROWS], np.int32), dst_n=dst_n,
      weight=np.asarray([1.0, 0.5, 2.0, 1.0, 1.0], np.float32),
      row=np.asarray([0, 1, 2, 0, 1], np.int32), reverse_row=np.asarray([3, 4, 5, 2, 3], np.int32),
      uniform_src_logq=negatives.uniform_log_count(src_n, chunk, uniform),
      uniform_dst_logq=negatives.uniform_log_count(dst_n, chunk, uniform),
      class_of_rel=classes.class_of_rel)


def _edges(num: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  rel = rng.choice(len(RELATIONS), num, p=[0.5, 0.2, 0.15, 0.1, 0.05]).astype(np.int32)
  src = (rng.zipf(1.6, num) % SRC_ROWS).astype(np.int32)
  dst = np.where(rel == 2, rng.integers(0, SRC_ROWS, num), rng.integers(0, DST_ROWS, num))
  weight = rng.uniform(0.5, 2.0, num).astype(np.float32)
  return src, dst.astype(np.int32), rel, weight


def _prepare(num, mixed, correct, chunk=7, uniform=5, per_step=3, seed=0, rank_by="auto"):
  classes = _classes(mixed)
  tables = _tables(classes, chunk, uniform)
  src, dst, rel, weight = _edges(num)
  capacity = device_batching.capacity_for(num)
  pad = lambda x: np.concatenate([x, np.zeros(capacity - num, x.dtype)])
  per_call = per_step * batching.STEPS_PER_CALL
  prepared = device_batching.prepare_slice(
      device_batching.slice_key(seed, 0, 0, 0), pad(src), pad(dst), pad(rel), pad(weight),
      np.int32(num), tables, classes.class_group, chunk=chunk, num_uniform=uniform,
      num_classes=classes.num_classes, per_call=per_call, correct=correct, rank_by=rank_by)
  return classes, tables, (src, dst, rel, weight), prepared, per_call


@pytest.mark.parametrize("mixed,rank_by", [(False, "count"), (True, "count"), (False, "sort"),
                                           (True, "sort")])
def test_chunks_hold_every_real_edge_once_and_one_class_each(mixed, rank_by):
  num, chunk, per_step = 1_500, 7, 3
  classes, tables, (src, dst, rel, weight), prepared, per_call = _prepare(
      num, mixed, correct=False, chunk=chunk, per_step=per_step, rank_by=rank_by)
  edge = np.asarray(prepared.edge)  # [B, C]
  real = edge[edge >= 0]
  np.testing.assert_array_equal(np.sort(real), np.arange(num))  # each edge exactly once
  calls = device_batching.plan_calls(np.bincount(rel, minlength=len(RELATIONS)), classes, chunk, per_call, np.random.default_rng(0))
  group_chunks = collections.Counter()
  seen = []
  for group, start, end in calls:
    for position in range(start, min(start + per_call, end)):
      members = edge[position][edge[position] >= 0]
      assert len(members) > 0, "a chunk inside a group's range is never all padding"
      assert len(set(classes.class_of_rel[rel[members]])) == 1, "a chunk mixes chunk classes"
      assert classes.groups[classes.class_group[classes.class_of_rel[rel[members[0]]]]] \
          == classes.groups[group]
      # Padding only at the end of a chunk (its class's last chunk).
      assert (edge[position][:len(members)] >= 0).all()
      group_chunks[group] += 1
      seen.append(members)
  np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(num))  # calls cover all
  for group in range(len(classes.groups)):  # ceil(n_k / C) chunks per class, nothing more
    members = np.flatnonzero(classes.class_group == group)
    counts = np.bincount(classes.class_of_rel[rel], minlength=classes.num_classes)[members]
    assert group_chunks[group] == sum(-(-counts // chunk))
  if not mixed:  # one relation per chunk
    for row in edge[:sum(group_chunks.values())]:
      assert len(set(rel[row[row >= 0]])) == 1


@pytest.mark.parametrize("mixed,correct", [(False, False), (True, True), (False, True)])
def test_call_batches_carry_each_edge_with_its_rows_and_weight(mixed, correct):
  num, chunk, uniform, per_step = 2_000, 7, 5, 3
  classes, tables, (src, dst, rel, weight), prepared, per_call = _prepare(
      num, mixed, correct, chunk=chunk, uniform=uniform, per_step=per_step)
  tables_device = jax.device_put(tables)
  layout_groups = {g: [r for r in range(len(GROUPS)) if GROUPS[r] == g] for g in set(GROUPS)}
  expected = collections.Counter(
      (int(tables.src_lo[r] + s), int(tables.dst_lo[r] + d), float(w * tables.weight[r]))
      for s, d, r, w in zip(src, dst, rel, weight))
  got = collections.Counter()
  calls = device_batching.plan_calls(np.bincount(rel, minlength=len(RELATIONS)), classes, chunk, per_call, np.random.default_rng(1))
  for number, (group, start, end) in enumerate(calls):
    name = classes.groups[group]
    call = device_batching.DeviceCall(name, prepared, tables_device, start, end,
                                      layout_groups[name][0], batching.STEPS_PER_CALL, per_step,
                                      mixed)
    batch = jax.tree_util.tree_map(np.asarray, call.batch_at(100 * number))
    assert batch.src.shape == (1, batching.STEPS_PER_CALL, per_step, chunk)
    np.testing.assert_array_equal(batch.step_index[0], 100 * number + np.arange(16))
    live = batch.weight > 0
    for s, d, w in zip(batch.src[live], batch.dst[live], batch.weight[live]):
      got[(int(s), int(d), float(w))] += 1
    # Every chunk's relation rows belong to its group; uniform ranges are its relation's.
    rows = batch.rel if mixed else batch.rel[..., None]
    assert set(np.unique(rows)) <= {tables.row[r] for r in layout_groups[name]}
    assert (batch.src_n == SRC_ROWS).all()
    assert set(np.unique(batch.dst_n)) <= {SRC_ROWS, DST_ROWS}
    assert (batch.src[~live] == 0).all() and (batch.dst[~live] == 0).all()
    if correct:
      assert (batch.src_logq[~live] == 0).all()
      assert np.isfinite(batch.uniform_dst_logq).all()
    else:
      assert batch.src_logq is None
  assert got == expected


@pytest.mark.parametrize("mixed", [False, True])
def test_log_q_matches_the_host_equation(mixed):
  """The device's per-edge log q equals negatives.sampling_log_counts on the
  same edges (float32 against float64)."""
  num, chunk, uniform = 3_000, 11, 13
  classes, tables, (src, dst, rel, weight), prepared, _ = _prepare(
      num, mixed, correct=True, chunk=chunk, uniform=uniform)
  edge_class = classes.class_of_rel[rel].astype(np.int64)
  host_src, host_dst = negatives.sampling_log_counts(
      edge_class, src.astype(np.int64), dst.astype(np.int64),
      np.bincount(edge_class, minlength=classes.num_classes), tables.src_n[rel],
      tables.dst_n[rel], chunk, uniform)
  edge = np.asarray(prepared.edge)
  real = edge >= 0
  np.testing.assert_allclose(np.asarray(prepared.src_logq)[real], host_src[edge[real]], rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(np.asarray(prepared.dst_logq)[real], host_dst[edge[real]], rtol=1e-5,
                             atol=1e-6)


@pytest.mark.parametrize("rank_by", ["count", "sort"])
def test_preparation_is_seeded_and_shuffles(rank_by):
  _, _, (src, dst, rel, weight), first, _ = _prepare(1_000, True, True, seed=3, rank_by=rank_by)
  _, _, _, again, _ = _prepare(1_000, True, True, seed=3, rank_by=rank_by)
  _, _, _, other, _ = _prepare(1_000, True, True, seed=4, rank_by=rank_by)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.array_equal(np.asarray(first.edge), np.asarray(other.edge))
  # Shuffled: within a class the file order is gone (consecutive slots hold
  # edges about E / 3 apart, not 1 or a few).
  edge = np.asarray(first.edge).ravel()
  edge = edge[edge >= 0]
  assert np.median(np.abs(np.diff(edge))) > 100


def test_hash_permutation_is_a_seeded_bijection():
  key = jax.random.key(0)
  for size in (1 << 10, 1 << 16):
    perm = np.asarray(device_batching._hash_permutation(key, size))  # pylint: disable=protected-access
    np.testing.assert_array_equal(np.sort(perm), np.arange(size))
    assert np.median(np.abs(np.diff(perm))) > size / 10  # neighbours land far apart
  other = np.asarray(device_batching._hash_permutation(jax.random.key(1), 1 << 10))
  assert not np.array_equal(other, np.asarray(device_batching._hash_permutation(key, 1 << 10)))
  with pytest.raises(ValueError, match="power of two"):
    device_batching._hash_permutation(key, 1000)


def test_large_buckets_split_into_balanced_slices_of_every_edge():
  num = 5 * batching.READ_BLOCK_EDGES + 123
  edges = {"src": np.arange(num, dtype=np.int32), "dst": np.arange(num, dtype=np.int32) % 7,
           "rel": np.zeros(num, np.int32), "weight": np.ones(num, np.float32)}
  slices = list(device_batching.read_slices(edges, (0, 1, 2), 2 * batching.READ_BLOCK_EDGES))
  assert len(slices) == 3
  assert [s.number for s in slices] == [0, 1, 2]
  sizes = [s.num_real for s in slices]
  assert max(sizes) - min(sizes) <= batching.READ_BLOCK_EDGES
  read = np.concatenate([s.src[:s.num_real] for s in slices])
  np.testing.assert_array_equal(np.sort(read), np.arange(num))
  for s in slices:
    assert len(s.src) == device_batching.capacity_for(s.num_real)
    assert (s.weight[s.num_real:] == 0).all()
  whole = list(device_batching.read_slices(edges, (0, 1, 2), num))
  assert len(whole) == 1 and whole[0].num_real == num
  np.testing.assert_array_equal(whole[0].src[:num], edges["src"])


def test_read_slices_of_a_grouped_bucket_sample_every_cell():
  """A bucket grouped by cell (bucket_index.py) is read in slices that each
  take a proportional share of every cell, not runs of consecutive edges
  (which would hold a few cells only)."""
  cell_sizes = np.array([40_000, 0, 25_000, 70_000, 5_000, 60_000])
  starts = np.concatenate([[0], np.cumsum(cell_sizes)])
  num = int(starts[-1])
  cell_of_row = np.repeat(np.arange(len(cell_sizes)), cell_sizes)
  edges = {"src": np.arange(num, dtype=np.int32), "dst": cell_of_row.astype(np.int32),
           "rel": np.zeros(num, np.int32), "weight": np.ones(num, np.float32)}
  slices = list(device_batching.read_slices(edges, (0, 1, 2), 50_000, cell_starts=starts))
  assert len(slices) == 4
  read = np.concatenate([s.src[:s.num_real] for s in slices])
  np.testing.assert_array_equal(np.sort(read), np.arange(num))  # every row once
  for s in slices:
    assert len(s.src) == device_batching.capacity_for(s.num_real)
    per_cell = np.bincount(s.dst[:s.num_real], minlength=len(cell_sizes))
    np.testing.assert_allclose(per_cell, cell_sizes / 4, atol=1)
  again = list(device_batching.read_slices(edges, (0, 1, 2), 50_000, cell_starts=starts))
  other = list(device_batching.read_slices(edges, (0, 1, 3), 50_000, cell_starts=starts))
  assert all((a.src == b.src).all() for a, b in zip(slices, again))  # seeded
  assert any((a.src != b.src).any() for a, b in zip(slices, other))  # and the seed matters


def test_resolve_path():
  resolve = device_batching.resolve_path
  assert resolve("auto", 1, 1, "cpu") == "host"
  assert resolve("auto", 1, 1, "gpu") == "device"
  assert resolve("auto", 1, 1, "tpu") == "device"
  assert resolve("device", 1, 1, "cpu") == "device"
  assert resolve("device", 4, 1, "gpu") == "host"  # several devices: the host path
  assert resolve("device", 1, 2, "gpu") == "host"  # several processes: the host path
  assert resolve("host", 1, 1, "gpu") == "host"
  config = demo_config.get_config("test")
  config.train.batch_preparation = "gpu"
  with pytest.raises(ValueError, match="train.batch_preparation"):
    config_lib.validate(config)


# --------------------------------------------------------------------------
# Training with it.


def _train(tmp_path, name, path, **overrides):
  config = demo_config.get_config("test")
  config.train.batch_preparation = path
  config.train.eval_every_epochs = 0
  for key, value in overrides.items():
    section, field = key.split("__")
    setattr(config[section], field, value)
  trainer = train_lib.train(config, str(tmp_path / name), progress=False)
  return trainer


def test_device_path_trains_like_the_host_path_and_is_reproducible(tmp_path):
  results = {}
  for name, path in (("host", "host"), ("device", "device"), ("device_again", "device")):
    trainer = _train(tmp_path, name, path)
    results[name] = (trainer.evaluate("test", progress=False)["mrr"], trainer.embeddings())
    trainer.close()
  host_mrr, device_mrr = results["host"][0], results["device"][0]
  # Random ranking gives well under 0.02 (test_train.py); the host path ~0.067.
  assert device_mrr > 0.05, device_mrr
  assert abs(device_mrr - host_mrr) < 0.01, (device_mrr, host_mrr)
  assert results["device_again"][0] == device_mrr
  for entity_type, table in results["device"][1].items():
    np.testing.assert_array_equal(table, results["device_again"][1][entity_type])
    # The paths draw different batches: the tables differ.
    assert not np.array_equal(table, results["host"][1][entity_type])


def test_device_path_with_groups_mixed_chunks_and_log_q(tmp_path, caplog):
  """Two parameter groups (translation and diagonal relations), mixed chunks,
  softmax with the log-q correction: the step takes the device's batches
  (per-edge relation rows) and the model learns."""
  config = demo_config.get_config("test")
  for i, relation in enumerate(config.relations):
    relation["operator"] = "translation" if i % 2 else "diagonal"
  config.model.reciprocal = True
  config.negatives.mix_relations = True
  config.negatives.logq_correction = True
  config.train.loss = "softmax"
  config.train.batch_preparation = "device"
  config.train.eval_every_epochs = 0
  with caplog.at_level(logging.INFO, logger="twhin_jax.device_batching"):
    trainer = train_lib.train(config, str(tmp_path / "mixed"), progress=False)
  assert "batch preparation: device" in caplog.text  # the trainer says which path runs
  assert len(trainer.layout.groups) == 2
  metrics = trainer.evaluate("test", progress=False)
  losses = [h["loss"] for h in trainer.history]
  trainer.close()
  assert losses[-1] < losses[0], losses
  assert metrics["mrr"] > 0.05, metrics


def test_a_run_resumes_with_the_other_batch_preparation(tmp_path):
  """Stopped after two buckets on the host path, the run resumes on the
  device path (train.batch_preparation may change on resume) and finishes."""
  config = demo_config.get_config("test")
  config.train.epochs = 1
  config.train.eval_every_epochs = 0
  config.train.batch_preparation = "host"
  workdir = str(tmp_path / "switch")
  train_lib.train(config, workdir, progress=False, stop_after_buckets=2).close()
  config.train.batch_preparation = "device"
  trainer = train_lib.Trainer(config, workdir, progress=False)
  assert trainer.cursor == {"epoch": 0, "bucket": 2}
  history = trainer.run()
  trainer.close()
  assert len(history) == 1 and history[0]["edges"] > 0
