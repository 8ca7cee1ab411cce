"""Row-wise Adagrad and the training step: sparse updates equal dense ones."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from twhin_jax import losses as losses_lib
from twhin_jax import model
from twhin_jax import optim
from twhin_jax import state as state_lib
from twhin_jax import step as step_lib

EPS = optim.ADAGRAD_EPS


# --- row_adagrad_update against a dense reference ----------------------------

def dense_row_adagrad(table, acc, rows, row_grads, lr):
  """Dense reference in float64: sum duplicate rows into G [R, d], then update
  the touched rows only; out-of-range rows are ignored."""
  table = np.asarray(table, np.float64)
  acc = np.asarray(acc, np.float64)
  num_rows = table.shape[0]
  dense = np.zeros_like(table)
  touched = np.zeros(num_rows, bool)
  for row, grad in zip(np.asarray(rows), np.asarray(row_grads, np.float64)):
    if 0 <= row < num_rows:
      dense[row] += grad
      touched[row] = True
  new_table, new_acc = table.copy(), acc.copy()
  new_acc[touched] += np.mean(np.square(dense[touched]), axis=1)
  new_table[touched] -= lr * dense[touched] / (np.sqrt(new_acc[touched])[:, None] + EPS)
  return new_table, new_acc, touched


_row_adagrad = jax.jit(optim.row_adagrad_update, static_argnames=("lr",))


def _sparse(table, acc, rows, grads, lr):
  new_table, state = _row_adagrad(jnp.asarray(table), optim.RowAdagradState(jnp.asarray(acc)),
                                  jnp.asarray(rows, jnp.int32), jnp.asarray(grads), lr=lr)
  return np.asarray(new_table), np.asarray(state.acc)


def _check_against_dense(table, acc, rows, grads, lr):
  got_table, got_acc = _sparse(table, acc, rows, grads, lr)
  ref_table, ref_acc, touched = dense_row_adagrad(table, acc, rows, grads, lr)
  assert got_table.shape == table.shape and got_acc.shape == acc.shape
  # Untouched rows: bit-for-bit.
  np.testing.assert_array_equal(got_table[~touched], table[~touched])
  np.testing.assert_array_equal(got_acc[~touched], acc[~touched])
  np.testing.assert_allclose(got_table[touched], ref_table[touched], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(got_acc[touched], ref_acc[touched], rtol=1e-5, atol=1e-9)
  return got_table, got_acc, touched


def test_init_state_is_zero():
  state = optim.row_adagrad_init(jnp.ones((7, 3)))
  assert state.acc.shape == (7,)
  assert not np.any(np.asarray(state.acc))


def test_row_adagrad_duplicates_equal_dense():
  rng = np.random.default_rng(0)
  num_rows, dim = 12, 5
  table = rng.standard_normal((num_rows, dim)).astype(np.float32)
  acc = rng.uniform(0.2, 2.0, num_rows).astype(np.float32)
  rows = np.array([3, 7, 3, 0, 11, 7, 3, 5], np.int32)  # 3 thrice, 7 twice
  grads = rng.standard_normal((len(rows), dim)).astype(np.float32)
  _, got_acc, touched = _check_against_dense(table, acc, rows, grads, lr=0.1)
  assert set(np.flatnonzero(touched)) == {0, 3, 5, 7, 11}
  # Summing before squaring matters: squaring each duplicate separately gives
  # a different accumulator for row 3.
  wrong = acc[3] + sum(np.mean(np.square(grads[k].astype(np.float64))) for k in (0, 2, 6))
  assert not np.isclose(got_acc[3], wrong, rtol=1e-3)


def test_row_adagrad_cancelling_duplicates_change_nothing():
  rng = np.random.default_rng(1)
  table = rng.standard_normal((6, 4)).astype(np.float32)
  acc = rng.uniform(0.5, 1.0, 6).astype(np.float32)
  g = rng.standard_normal(4).astype(np.float32)
  rows = np.array([2, 4, 2], np.int32)
  grads = np.stack([g, rng.standard_normal(4).astype(np.float32), -g])
  got_table, got_acc = _sparse(table, acc, rows, grads, 0.5)
  np.testing.assert_array_equal(got_table[2], table[2])
  assert got_acc[2] == acc[2]
  assert not np.array_equal(got_table[4], table[4])


def test_row_adagrad_two_successive_updates():
  rng = np.random.default_rng(2)
  num_rows, dim = 10, 3
  table = rng.standard_normal((num_rows, dim)).astype(np.float32)
  acc = np.zeros(num_rows, np.float32)  # fresh state
  rows1 = np.array([1, 1, 4, 9, 4, 4], np.int32)
  grads1 = rng.standard_normal((6, dim)).astype(np.float32)
  table1, acc1, _ = _check_against_dense(table, acc, rows1, grads1, lr=0.05)
  rows2 = np.array([4, 6, 1, 6, 0, 0], np.int32)
  grads2 = rng.standard_normal((6, dim)).astype(np.float32)
  table2, acc2, _ = _check_against_dense(table1, acc1, rows2, grads2, lr=0.05)
  # Composite against two dense steps from the start.
  ref1, refacc1, _ = dense_row_adagrad(table, acc, rows1, grads1, 0.05)
  ref2, refacc2, _ = dense_row_adagrad(ref1, refacc1, rows2, grads2, 0.05)
  np.testing.assert_allclose(table2, ref2, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(acc2, refacc2, rtol=1e-5)
  # Rows never touched by either update: bit-for-bit.
  for r in (2, 3, 5, 7, 8):
    np.testing.assert_array_equal(table2[r], table[r])
    assert acc2[r] == 0.0


def test_row_adagrad_ignores_out_of_range_padding():
  rng = np.random.default_rng(3)
  num_rows, dim = 8, 4
  table = rng.standard_normal((num_rows, dim)).astype(np.float32)
  acc = rng.uniform(0.1, 1.0, num_rows).astype(np.float32)
  rows = np.array([num_rows, 2, num_rows, num_rows + 3, 5, 2, 2**30, num_rows + 1], np.int32)
  grads = rng.standard_normal((len(rows), dim)).astype(np.float32) * 100.0
  got_table, got_acc, touched = _check_against_dense(table, acc, rows, grads, lr=0.2)
  assert set(np.flatnonzero(touched)) == {2, 5}
  # Same result as without the padding entries at all.
  real = (rows < num_rows)
  clean_table, clean_acc = _sparse(table, acc, rows[real], grads[real], 0.2)
  np.testing.assert_array_equal(got_table, clean_table)
  np.testing.assert_array_equal(got_acc, clean_acc)


def test_row_adagrad_update_magnitude_with_fresh_state():
  # With G = 0 the first step is lr * g / rms(g): every coordinate moves by
  # lr * g_k / sqrt(mean(g^2)).
  table = jnp.zeros((3, 2), jnp.float32)
  new_table, state = _row_adagrad(table, optim.row_adagrad_init(table), jnp.asarray([1], jnp.int32),
                                  jnp.asarray([[3.0, 4.0]]), lr=1.0)
  rms = np.sqrt((9.0 + 16.0) / 2.0)
  np.testing.assert_allclose(np.asarray(new_table)[1], [-3.0 / rms, -4.0 / rms], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(state.acc), [0.0, 12.5, 0.0], rtol=1e-6)


# --- the training step --------------------------------------------------------

OPERATORS = ("none", "translation", "diagonal", "complex_diagonal", "rotation", "linear")
COMPARATORS = ("dot", "cos", "l2")
LOSSES = ("logistic", "softmax", "ranking")
# Each operator, comparator and loss appears (compiling a step takes seconds
# on CPU, so not the whole product). translation + dot + logistic is TwHIN's
# default.
COMBOS = [
    ("translation", "dot", "logistic"),
    ("diagonal", "cos", "softmax"),
    ("complex_diagonal", "l2", "ranking"),
    ("linear", "l2", "logistic"),
    ("none", "cos", "ranking"),
    ("rotation", "l2", "softmax"),  # RotatE's distance, squared
]
assert {c[0] for c in COMBOS} == set(OPERATORS)
assert {c[1] for c in COMBOS} == set(COMPARATORS)
assert {c[2] for c in COMBOS} == set(LOSSES)

T, S, C, U = 2, 2, 4, 3
DIM = 4
NUM_ROWS = 40
MARGIN, LR, REL_LR = 0.1, 0.1, 0.05
NUM_RELATIONS = 3  # relation 2 never appears in a batch


def _random_rel_params(operator, rng):
  params = model.init_operator_params(operator, NUM_RELATIONS, DIM)
  return (params + 0.1 * rng.standard_normal(params.shape)).astype(np.float32)


def _step_batch(rng, num_steps, src_pool, dst_pool, pad_rows, src_lo, dst_lo, n):
  """A StepBatch [num_steps, S, C] with a few weight-0 (padded) edges; the
  uniform ranges of each chunk start at one of ``src_lo`` / ``dst_lo``."""
  src = rng.choice(src_pool, (num_steps, S, C)).astype(np.int32)
  dst = rng.choice(dst_pool, (num_steps, S, C)).astype(np.int32)
  weight = rng.uniform(0.5, 2.0, (num_steps, S, C)).astype(np.float32)
  # Pad the tail of chunk (0, 1) and the last edge of chunk (-1, 0).
  weight[0, 1, 2:] = 0.0
  weight[-1, 0, -1] = 0.0
  pads = iter(itertools.cycle(pad_rows))
  for idx in zip(*np.nonzero(weight == 0.0)):
    src[idx], dst[idx] = next(pads), next(pads)
  rel = np.array([[0, 1], [1, 0]] * num_steps, np.int32)[:num_steps]
  shape2 = (num_steps, S)
  return step_lib.StepBatch(
      src=jnp.asarray(src), dst=jnp.asarray(dst), rel=jnp.asarray(rel), weight=jnp.asarray(weight),
      src_lo=jnp.asarray(rng.choice(src_lo, shape2).astype(np.int32)),
      src_n=jnp.asarray(np.full(shape2, n, np.int32)),
      dst_lo=jnp.asarray(rng.choice(dst_lo, shape2).astype(np.int32)),
      dst_n=jnp.asarray(np.full(shape2, n, np.int32)),
      step_index=jnp.arange(num_steps, dtype=jnp.int32) + 100)


def _state(table, acc, rel_params, rel_acc=None):
  state = state_lib.init_step_state(jnp.asarray(table), jnp.asarray(acc), rel_params, REL_LR)
  if rel_acc is not None:
    assert len(jax.tree.leaves(state.rel_opt)) == 1  # the Adagrad accumulator
    rel_opt = jax.tree.map(lambda leaf: jnp.asarray(rel_acc, leaf.dtype), state.rel_opt)
    state = state._replace(rel_opt=rel_opt)
  return state


@pytest.mark.parametrize("operator,comparator,loss", COMBOS)
def test_train_steps_touch_only_batch_rows(operator, comparator, loss):
  rng = np.random.default_rng(4)
  # Working table layout: sources of the batch in [0, 8), uniform sources in
  # [8, 12), targets in [16, 24), uniform targets in [24, 28), padded edges
  # point at [36, 40); [12, 16) and [28, 36) belong to no range at all.
  table = (0.3 * rng.standard_normal((NUM_ROWS, DIM))).astype(np.float32)
  acc = np.zeros(NUM_ROWS, np.float32)
  rel_params = _random_rel_params(operator, rng)
  batch = _step_batch(rng, T, np.arange(0, 8), np.arange(16, 24), [36, 37, 38, 39],
                      src_lo=[8, 10], dst_lo=[24, 26], n=2)
  train_steps = step_lib.make_train_steps(operator, comparator, loss, MARGIN, LR, REL_LR, U)
  state, loss_sum, edges = train_steps(_state(table, acc, rel_params), batch, jax.random.key(0))
  new_table = np.asarray(state.home.table)
  new_acc = np.asarray(state.home.acc)
  new_rel = np.asarray(state.rel_params)

  assert np.isfinite(float(loss_sum))
  assert float(loss_sum) != 0.0
  weight = np.asarray(batch.weight)
  assert int(edges) == int(np.sum(weight > 0))
  assert np.all(np.isfinite(new_table))

  src, dst = np.asarray(batch.src), np.asarray(batch.dst)
  allowed = np.zeros(NUM_ROWS, bool)
  allowed[src[weight > 0]] = True
  allowed[dst[weight > 0]] = True
  for lo, n in itertools.chain(zip(np.asarray(batch.src_lo).ravel(), np.asarray(batch.src_n).ravel()),
                               zip(np.asarray(batch.dst_lo).ravel(), np.asarray(batch.dst_n).ravel())):
    allowed[lo:lo + n] = True
  changed = np.any(new_table != table, axis=1)
  assert not np.any(changed & ~allowed), np.flatnonzero(changed & ~allowed)
  assert not np.any((new_acc != acc) & ~allowed)
  # Rows in no range (and the rows of padded edges) are bit-identical.
  for lo, hi in ((12, 16), (28, 40)):
    np.testing.assert_array_equal(new_table[lo:hi], table[lo:hi])
    np.testing.assert_array_equal(new_acc[lo:hi], acc[lo:hi])
  # Every row of a real edge moved, and so did some uniform negatives.
  real_rows = np.unique(np.concatenate([src[weight > 0], dst[weight > 0]]))
  assert np.all(changed[real_rows]), real_rows[~changed[real_rows]]
  assert np.any(changed[8:12]) and np.any(changed[24:28])

  # Relation parameters: the two relations in the batch were trained (every
  # entry moved), the absent one kept its values exactly.
  for relation in (0, 1):
    assert np.all(new_rel[relation] != rel_params[relation]), (relation, new_rel[relation])
  np.testing.assert_array_equal(new_rel[2], rel_params[2])


def _reference_loss(table, rel_params, src, dst, rel, weight, src_lo, dst_lo,
                    operator, comparator, loss, num_uniform):
  """Loss of one step from the whole table [R, d], pair by pair with
  compare_pairs (not compare_all). Uniform ranges hold one row (n = 1), so
  the U uniform negatives of a chunk are U copies of row lo."""
  loss_fn = losses_lib.LOSSES[loss]
  total = 0.0
  for s in range(src.shape[0]):
    param = rel_params[rel[s]]
    lhs = model.apply_operator(operator, param, table[src[s]])  # [C, d]
    rhs = table[dst[s]]  # [C, d]
    uni_src = model.apply_operator(operator, param, table[jnp.full((num_uniform,), src_lo[s])])  # [U, d]
    uni_dst = table[jnp.full((num_uniform,), dst_lo[s])]  # [U, d]
    w = weight[s]
    pos = model.compare_pairs(comparator, lhs, rhs)  # [C]
    # A candidate counts as a negative of edge i when it is a real edge's (or
    # uniform) entity other than edge i's own positive entity on that side.
    valid = (w > 0).astype(jnp.float32)

    def mask_for(ids, uniform_id):
      batch_part = valid[None, :] * (ids[None, :] != ids[:, None])  # [C, C]
      uniform_part = jnp.broadcast_to((uniform_id != ids)[:, None], (C, num_uniform))  # [C, U]
      return jnp.concatenate([batch_part, uniform_part], axis=1).astype(jnp.float32)

    dst_mask = mask_for(jnp.asarray(dst[s]), dst_lo[s])  # [C, C+U]
    src_mask = mask_for(jnp.asarray(src[s]), src_lo[s])  # [C, C+U]
    # [i, j] = f(s_i, r, t_j), then f(s_i, r, u_k): corrupt the target of edge i.
    neg_dst = jnp.concatenate([model.compare_pairs(comparator, lhs[:, None, :], rhs[None, :, :]),
                               model.compare_pairs(comparator, lhs[:, None, :], uni_dst[None, :, :])],
                              axis=1)  # [C, C+U]
    # [i, j] = f(s_j, r, t_i), then f(u_k, r, t_i): corrupt the source of edge i.
    neg_src = jnp.concatenate([model.compare_pairs(comparator, lhs[None, :, :], rhs[:, None, :]),
                               model.compare_pairs(comparator, uni_src[None, :, :], rhs[:, None, :])],
                              axis=1)  # [C, C+U]
    total = (total + loss_fn(pos, neg_dst, dst_mask, w, MARGIN)
             + loss_fn(pos, neg_src, src_mask, w, MARGIN))
  return total


def _check_sparse_equals_dense(operator, comparator, loss, num_uniform, num_steps):
  rng = np.random.default_rng(5)
  table = (0.3 * rng.standard_normal((NUM_ROWS, DIM))).astype(np.float32)
  acc = rng.uniform(0.05, 0.5, NUM_ROWS).astype(np.float32)  # nonzero: scale-sensitive
  rel_params = _random_rel_params(operator, rng)
  rel_acc = rng.uniform(0.01, 0.1, rel_params.shape).astype(np.float32)
  # Sources and targets from overlapping pools, uniform rows inside them too:
  # rows repeat inside a chunk, across chunks and across the sides.
  batch = _step_batch(rng, num_steps, np.arange(0, 8), np.arange(4, 12), [12, 13],
                      src_lo=[3, 14], dst_lo=[5, 15], n=1)
  train_steps = step_lib.make_train_steps(operator, comparator, loss, MARGIN, LR, REL_LR, num_uniform)
  state, loss_sum, _ = train_steps(_state(table, acc, rel_params, rel_acc), batch, jax.random.key(1))

  # Dense: gradients w.r.t. the whole table, step after step.
  dense_grad = jax.jit(jax.value_and_grad(
      lambda t, p, *b: _reference_loss(t, p, *b, operator, comparator, loss, num_uniform),
      argnums=(0, 1)))
  ref_table, ref_acc = table.astype(np.float64), acc.astype(np.float64)
  ref_rel, ref_rel_acc = rel_params.astype(np.float64), rel_acc.astype(np.float64)
  ref_loss = 0.0
  touched = np.zeros(NUM_ROWS, bool)
  for t in range(num_steps):
    b = [np.asarray(x)[t] for x in (batch.src, batch.dst, batch.rel, batch.weight,
                                    batch.src_lo, batch.dst_lo)]
    step_loss, (g_table, g_rel) = dense_grad(jnp.asarray(ref_table, jnp.float32),
                                             jnp.asarray(ref_rel, jnp.float32), *b)
    ref_loss += float(step_loss)
    g_table, g_rel = np.asarray(g_table, np.float64), np.asarray(g_rel, np.float64)
    assert np.any(g_table != 0.0)
    # Row-wise Adagrad on every row (a zero-gradient row does not move).
    ref_acc = ref_acc + np.mean(np.square(g_table), axis=1)
    ref_table = ref_table - LR * g_table / (np.sqrt(ref_acc)[:, None] + EPS)
    # Relation Adagrad: G <- G + g^2, p <- p - lr g / sqrt(G + eps).
    ref_rel_acc = ref_rel_acc + np.square(g_rel)
    ref_rel = ref_rel - REL_LR * g_rel / np.sqrt(ref_rel_acc + EPS)
    touched[np.concatenate([b[0].ravel(), b[1].ravel()])] = True
    if num_uniform:
      touched[b[4]] = touched[b[5]] = True

  np.testing.assert_allclose(float(loss_sum), ref_loss, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(state.home.acc), ref_acc, rtol=1e-5, atol=1e-9)
  np.testing.assert_allclose(np.asarray(state.home.table), ref_table, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(np.asarray(state.home.table)[~touched], table[~touched])
  np.testing.assert_allclose(np.asarray(state.rel_params), ref_rel, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(np.asarray(state.rel_params)[2], rel_params[2])


@pytest.mark.parametrize("operator,comparator,loss", COMBOS)
def test_sparse_steps_equal_dense(operator, comparator, loss):
  # Same compiled step as above (U = 3, T = 2); ranges of one row make the
  # uniform negatives deterministic.
  _check_sparse_equals_dense(operator, comparator, loss, num_uniform=U, num_steps=T)


def test_sparse_step_equals_dense_without_uniform_negatives():
  _check_sparse_equals_dense("translation", "dot", "logistic", num_uniform=0, num_steps=1)
