"""Padding steps (every edge weight 0, the tail of a group's last call) are
skipped under lax.cond on one device (step.StepSettings.skip_padding): the
result must be bit-identical to running them, and a step with one real edge
must still run."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from twhin_jax import model
from twhin_jax import state as state_lib
from twhin_jax import step as step_lib

T, S, C, U, DIM, ROWS = 4, 2, 3, 2, 4, 30


def _settings(skip: bool) -> step_lib.StepSettings:
  return step_lib.StepSettings(
      operator="translation", comparator="dot", loss="logistic", margin=0.1, lr=0.1,
      relation_lr=0.05, num_uniform=U, reciprocal=True, regularization=0.01,
      l2_to_previous=0.0, sharded=False, skip_padding=skip)


def _batch(weight: np.ndarray) -> step_lib.StepBatch:
  rng = np.random.default_rng(3)
  shape2 = (T, S)
  return step_lib.StepBatch(
      src=jnp.asarray(rng.integers(0, 10, (T, S, C)), jnp.int32),
      dst=jnp.asarray(rng.integers(10, 20, (T, S, C)), jnp.int32),
      rel=jnp.asarray(rng.integers(0, 2, shape2), jnp.int32),
      weight=jnp.asarray(weight),
      src_lo=jnp.zeros(shape2, jnp.int32), src_n=jnp.full(shape2, 10, jnp.int32),
      dst_lo=jnp.full(shape2, 10, jnp.int32), dst_n=jnp.full(shape2, 10, jnp.int32),
      step_index=jnp.arange(T, dtype=jnp.int32),
      rel_reverse=jnp.asarray(rng.integers(2, 4, shape2), jnp.int32))


def _run(skip: bool, weight: np.ndarray):
  rng = np.random.default_rng(0)
  table = jnp.asarray(0.3 * rng.standard_normal((ROWS, DIM)), jnp.float32)
  params = jnp.asarray(model.init_operator_params("translation", 4, DIM)
                       + 0.1 * rng.standard_normal((4, DIM)), jnp.float32)
  state = state_lib.init_step_state(table, jnp.full((ROWS,), 0.1, jnp.float32), params, 0.05)
  fn = jax.jit(functools.partial(step_lib.local_steps, _settings(skip)))
  state, loss, edges = fn(state, _batch(weight), jax.random.key(7))
  return jax.tree.map(np.asarray, (state.home.table, state.home.acc, state.rel_params,
                                   state.rel_opt)), float(loss), int(edges)


def _weights(real_in_last_step: int) -> np.ndarray:
  """Steps 0-1 real (one padded edge), steps 2-3 padding, except
  ``real_in_last_step`` real edges in step 3."""
  weight = np.ones((T, S, C), np.float32)
  weight[0, 1, 2] = 0.0
  weight[2:] = 0.0
  weight[3].flat[:real_in_last_step] = 1.0
  return weight


def test_skipped_padding_steps_are_bit_identical():
  weight = _weights(0)
  skipped, ran = _run(True, weight), _run(False, weight)
  for a, b in zip(jax.tree.leaves(skipped[0]), jax.tree.leaves(ran[0])):
    np.testing.assert_array_equal(a, b)
  assert skipped[1:] == ran[1:]
  assert skipped[2] == int(np.sum(weight > 0))


def test_a_step_with_one_real_edge_is_not_skipped():
  """One real edge in step 3: it must train (a predicate that skips steps
  with *any* padding edge, or all of them, would leave the state as without it)."""
  one, none = _run(True, _weights(1)), _run(True, _weights(0))
  assert one[2] == none[2] + 1
  assert not np.array_equal(one[0][0], none[0][0])
  ran = _run(False, _weights(1))
  for a, b in zip(jax.tree.leaves(one[0]), jax.tree.leaves(ran[0])):
    np.testing.assert_array_equal(a, b)
