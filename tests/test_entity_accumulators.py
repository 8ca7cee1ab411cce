"""One Adagrad accumulator per coordinate (train.entity_accumulators =
"coordinate"): the sparse update equals optax's dense Adagrad, the tables
store [rows, d] accumulators, and training with them swaps, resumes and
keeps tables whole exactly as with one accumulator per row."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from twhin_jax import demo_config
from twhin_jax import inspection
from twhin_jax import optim
from twhin_jax import residency
from twhin_jax import rundir
from twhin_jax import storage
from twhin_jax import train as train_lib
from twhin_jax.graph import EntityInfo

_update = jax.jit(optim.row_adagrad_update, static_argnames=("lr", "anchor_strength"))


def _dense_gradient(rows, grads, num_rows):
  """The [R, d] gradient of a batch: duplicates summed, out-of-range rows dropped."""
  dense = np.zeros((num_rows, grads.shape[1]), np.float32)
  for row, grad in zip(rows, grads):
    if 0 <= row < num_rows:
      dense[row] += grad
  return dense


def test_sparse_coordinate_update_equals_optax_dense_adagrad():
  """Two sparse steps (duplicate and padding rows) against optax.adagrad on
  the dense gradient, whose zero rows it leaves alone: the same rows and
  accumulators (optax puts eps inside the square root; ours, outside, is
  1e-10: far below the tolerance)."""
  rng = np.random.default_rng(0)
  num_rows, dim, lr = 9, 4, 0.3
  table = rng.standard_normal((num_rows, dim)).astype(np.float32)
  state = optim.row_adagrad_init(jnp.asarray(table), per_coordinate=True)
  assert state.acc.shape == (num_rows, dim)
  reference = optax.adagrad(lr, initial_accumulator_value=0.0, eps=0.0)
  ref_params = jnp.asarray(table)
  ref_state = reference.init(ref_params)
  ours = jnp.asarray(table)
  for rows in ([3, 7, 3, 0, num_rows, 3], [7, 1, 1, num_rows + 2, 8, 0]):
    rows = np.asarray(rows, np.int32)
    grads = rng.standard_normal((len(rows), dim)).astype(np.float32)
    ours, state = _update(ours, state, jnp.asarray(rows), jnp.asarray(grads), lr=lr)
    updates, ref_state = reference.update(jnp.asarray(_dense_gradient(rows, grads, num_rows)),
                                          ref_state, ref_params)
    ref_params = optax.apply_updates(ref_params, updates)
  np.testing.assert_allclose(np.asarray(ours), np.asarray(ref_params), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(state.acc), np.asarray(ref_state[0].sum_of_squares),
                             rtol=1e-5)
  untouched = [2, 4, 5, 6]
  np.testing.assert_array_equal(np.asarray(ours)[untouched], table[untouched])
  # Per coordinate, not per row: the accumulators of one row differ.
  assert np.ptp(np.asarray(state.acc)[3]) > 0


def test_coordinate_update_moves_every_coordinate_by_lr_on_a_fresh_state():
  """G = g^2 after one step, so each coordinate moves by lr * sign(g_k)
  (the row-wise update moves by lr * g_k / rms(g) instead)."""
  table = jnp.zeros((3, 2), jnp.float32)
  state = optim.row_adagrad_init(table, per_coordinate=True)
  new, state = _update(table, state, jnp.asarray([1], jnp.int32), jnp.asarray([[3.0, -0.5]]),
                       lr=0.2)
  np.testing.assert_allclose(np.asarray(new)[1], [-0.2, 0.2], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(state.acc), [[0, 0], [9.0, 0.25], [0, 0]], rtol=1e-6)


def test_coordinate_update_applies_the_anchor_proximal_step_per_coordinate():
  """L2-to-previous: theta_ik <- (theta_ik - eta_ik g_ik + 2 a w_i eta_ik prev_ik)
  / (1 + 2 a w_i eta_ik), with eta_ik = lr / (sqrt(G_ik) + eps)."""
  rng = np.random.default_rng(1)
  table = rng.standard_normal((4, 3)).astype(np.float32)
  anchor = rng.standard_normal((4, 3)).astype(np.float32)
  weight = np.array([1.0, 0.0, 2.0, 1.0], np.float32)
  acc = rng.uniform(0.5, 2.0, (4, 3)).astype(np.float32)
  rows = np.array([0, 1, 2], np.int32)
  grads = rng.standard_normal((3, 3)).astype(np.float32)
  lr, alpha = 0.1, 0.7
  new, state = _update(jnp.asarray(table), optim.RowAdagradState(jnp.asarray(acc)),
                       jnp.asarray(rows), jnp.asarray(grads), lr=lr, anchor=jnp.asarray(anchor),
                       anchor_weight=jnp.asarray(weight), anchor_strength=alpha)
  g = grads.astype(np.float64)
  big_g = acc[:3].astype(np.float64) + g ** 2
  eta = lr / (np.sqrt(big_g) + optim.ADAGRAD_EPS)
  pull = 2 * alpha * weight[:3, None] * eta
  expected = (table[:3] - eta * g + pull * anchor[:3]) / (1 + pull)
  np.testing.assert_allclose(np.asarray(new)[:3], expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(new)[3], table[3])
  np.testing.assert_allclose(np.asarray(state.acc)[:3], big_g, rtol=1e-6)


ENTITIES = {"user": EntityInfo(name="user", count=7, num_partitions=2)}
DIMS = {"user": 3}


def test_tables_store_coordinate_accumulators_and_reopen_with_them(tmp_path):
  root = str(tmp_path / "tables")
  made = storage.open_storage("tensorstore", root, entities=ENTITIES, dims=DIMS, create=True,
                              coordinate_accumulators=True)
  made.initialize(seed=0, init_scale=0.1)
  emb, acc = made.read(("user", 0), 0)
  assert acc.shape == (len(emb), 3) and not acc.any()
  acc = np.arange(acc.size, dtype=np.float32).reshape(acc.shape)
  for future in made.write(("user", 0), 1, emb, acc):
    future.result()
  # Opened without saying so (as rundir and inspection open a run): the
  # accumulators the tables were made with.
  reopened = storage.open_storage("tensorstore", root, entities=ENTITIES, dims=DIMS)
  assert reopened.coordinate_accumulators
  np.testing.assert_array_equal(reopened.read(("user", 0), 1)[1], acc)
  with pytest.raises(ValueError, match=r"accumulators \(4,\) .*accumulators \(4, 3\)"):
    reopened.write(("user", 0), 1, emb, np.zeros(len(emb), np.float32))
  row_tables = storage.open_storage("tensorstore", str(tmp_path / "rows"), entities=ENTITIES,
                                    dims=DIMS, create=True)
  assert not row_tables.coordinate_accumulators
  assert row_tables.read(("user", 1), 0)[1].shape == (3,)


def test_accumulators_convert_between_row_and_coordinate():
  rows = np.array([1.0, 4.0], np.float32)
  per_coordinate = storage.convert_accumulators(rows, 3, per_coordinate=True)
  np.testing.assert_array_equal(per_coordinate, [[1, 1, 1], [4, 4, 4]])
  np.testing.assert_allclose(storage.convert_accumulators(
      np.array([[1.0, 2.0, 6.0]], np.float32), 3, per_coordinate=False), [3.0])
  assert storage.convert_accumulators(rows, 3, per_coordinate=False) is rows


def _demo(epochs: int):
  config = demo_config.get_config("test")
  config.train.epochs = epochs
  config.train.entity_accumulators = "coordinate"
  return config


def test_training_with_coordinate_accumulators_swaps_keeps_whole_and_resumes_the_same(
    tmp_path, monkeypatch):
  """The demo's 2-partition graph, 2 epochs: every bucket swapped from
  storage, the tables kept whole, and 1 epoch then a resume to 2 give the
  same tables and [rows, d] accumulators, bit for bit."""
  runs = {}
  for name, keep in (("swapped", 0), ("whole", residency.KEEP_ALL_BYTES)):
    monkeypatch.setattr(residency, "KEEP_ALL_BYTES", keep)
    trainer = train_lib.train(_demo(2), str(tmp_path / name), progress=False)
    assert trainer.residency.keep_all == bool(keep)
    trainer.close()
    runs[name] = rundir.open_run(str(tmp_path / name))
  monkeypatch.setattr(residency, "KEEP_ALL_BYTES", 0)
  resumed = str(tmp_path / "resumed")
  train_lib.train(_demo(1), resumed, progress=False).close()
  again = train_lib.Trainer(_demo(2), resumed, progress=False)
  assert again.cursor == {"epoch": 1, "bucket": 0}
  again.run()
  again.close()
  runs["resumed"] = rundir.open_run(resumed)
  reference = runs.pop("swapped")
  for entity_type, info in reference.graph.entities.items():
    table, acc = reference.read_type(entity_type)
    assert acc.shape == (info.count, reference.tables.dims[entity_type])
    assert np.isfinite(acc).all() and (acc > 0).any()
    for name, run in runs.items():
      other_table, other_acc = run.read_type(entity_type)
      np.testing.assert_array_equal(other_table, table, err_msg=f"{name} {entity_type}")
      np.testing.assert_array_equal(other_acc, acc, err_msg=f"{name} {entity_type}")
    # `twhin inspect` averages over every accumulator, not over rows.
    stats = inspection.table_stats(reference, [entity_type])[entity_type]
    np.testing.assert_allclose(stats["adagrad_mean"], acc.mean(dtype=np.float64), rtol=1e-5)

  # A warm start from this parent into one accumulator per row: each row
  # starts from the mean of its parent's coordinates.
  child_config = demo_config.get_config("test")
  child_config.warm_start.parent = str(tmp_path / "swapped")
  child = train_lib.Trainer(child_config, str(tmp_path / "child"), progress=False)
  for entity_type in reference.graph.entities:
    _, parent_acc = reference.read_type(entity_type)
    first = child.tables.read((entity_type, 0), 0)[1]
    assert first.ndim == 1
    np.testing.assert_allclose(first, parent_acc[:len(first)].mean(axis=1), rtol=1e-6)
  child.close()


def test_large_tables_reopen_with_the_chunks_they_were_made_with(tmp_path):
  """A [rows, d] accumulator array large enough that TensorStore reads it
  in smaller inner chunks (zarr3 sharding): reopening must take the chunk
  grid the tables were made with, not the read chunk (a run of FB15k-237's
  size failed to reopen its best checkpoint so)."""
  entities = {"entity": EntityInfo(name="entity", count=14541, num_partitions=1)}
  dims = {"entity": 200}
  root = str(tmp_path / "tables")
  made = storage.open_storage("tensorstore", root, entities=entities, dims=dims, create=True,
                              num_slots=1, coordinate_accumulators=True)
  reopened = storage.open_storage("tensorstore", root, entities=entities, dims=dims,
                                  num_slots=1)
  assert reopened.chunk == made.chunk and reopened.stored == made.stored
  assert reopened.coordinate_accumulators
