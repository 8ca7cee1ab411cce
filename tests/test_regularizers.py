"""The regularisers: values and gradients against their closed forms, and the
step's use of them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from twhin_jax import regularizers

jax.config.update("jax_enable_x64", False)


def _rows(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


def test_l2_is_weighted_squared_norms():
  s, t = _rows(0, (5, 6)), _rows(1, (5, 6))
  w = jnp.asarray([1.0, 2.0, 0.0, 0.5, 1.0])
  got = regularizers.penalty("l2", "translation", s, t, w)
  want = np.sum(np.asarray(w) * (np.sum(np.square(s), 1) + np.sum(np.square(t), 1)))
  np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("operator", ["translation", "diagonal", "complex_diagonal"])
def test_n3_value_and_gradient_match_closed_form(operator):
  c, d = 4, 6
  s, t = _rows(0, (c, d)), _rows(1, (c, d))
  w = jnp.asarray([1.0, 0.5, 2.0, 0.0])

  def closed_form_cubes(x):
    x = np.asarray(x, np.float64)
    if operator == "complex_diagonal":
      modulus = np.sqrt(x[..., :d // 2] ** 2 + x[..., d // 2:] ** 2)
      return np.sum(modulus ** 3, -1)
    return np.sum(np.abs(x) ** 3, -1)

  def closed_form_grad(x):
    """d/dx |x|^3 = 3|x| x; for a complex coordinate a + ib, d/da |z|^3 = 3|z| a."""
    x = np.asarray(x, np.float64)
    if operator == "complex_diagonal":
      modulus = np.sqrt(x[..., :d // 2] ** 2 + x[..., d // 2:] ** 2)
      return 3 * np.concatenate([modulus, modulus], -1) * x
    return 3 * np.abs(x) * x

  value = regularizers.penalty("n3", operator, s, t, w)
  wn = np.asarray(w, np.float64)
  want = np.sum(wn * (closed_form_cubes(s) + closed_form_cubes(t)))
  np.testing.assert_allclose(value, want, rtol=1e-5)

  gs, gt = jax.grad(regularizers.penalty, argnums=(2, 3))("n3", operator, s, t, w)
  np.testing.assert_allclose(gs, wn[:, None] * closed_form_grad(s), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(gt, wn[:, None] * closed_form_grad(t), rtol=1e-4, atol=1e-6)


def test_n3_gradient_is_finite_at_zero():
  """The complex modulus has a kink at 0; the cube must not give NaN there."""
  zeros = jnp.zeros((2, 4))
  grads = jax.grad(regularizers.penalty, argnums=2)("n3", "complex_diagonal", zeros, zeros,
                                                    jnp.ones(2))
  assert np.all(np.isfinite(grads)) and np.all(grads == 0)


def test_unknown_regularizer_is_rejected():
  with pytest.raises(ValueError, match="unknown regularizer"):
    regularizers.penalty("l1", "translation", jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.ones(1))


def test_step_adds_the_penalty_gradient():
  """The training step's gradient with model.regularization = lambda differs
  from the unregularised one by exactly lambda * dOmega/drow on the rows of
  the positive edges (n3; step.py's hook)."""
  from twhin_jax import state as state_lib
  from twhin_jax import step as step_lib
  rng = np.random.default_rng(0)
  rows, d, c, lam = 12, 6, 4, 0.3
  table = rng.normal(size=(rows, d)).astype(np.float32)  # numpy: the step donates its input
  src = np.array([[[0, 1, 2, 3]]], np.int32)
  dst = np.array([[[4, 5, 6, 7]]], np.int32)
  batch = step_lib.StepBatch(
      src=jnp.asarray(src), dst=jnp.asarray(dst), rel=jnp.zeros((1, 1), jnp.int32),
      weight=jnp.ones((1, 1, c), jnp.float32), src_lo=jnp.zeros((1, 1), jnp.int32),
      src_n=jnp.full((1, 1), rows, jnp.int32), dst_lo=jnp.zeros((1, 1), jnp.int32),
      dst_n=jnp.full((1, 1), rows, jnp.int32), step_index=jnp.zeros((1,), jnp.int32))

  def updated(regularization):
    fn = step_lib.make_train_steps("complex_diagonal", "dot", "softmax", 0.1, 1.0, 1e-9, 0,
                                   reciprocal=True, regularization=regularization,
                                   regularizer="n3")
    params = jnp.asarray(rng.normal(size=(2, d)).astype(np.float32))
    state = state_lib.init_step_state(jnp.asarray(table.copy()), jnp.zeros(rows), params, 1e-9)
    new, _, _ = fn(state, batch, jax.random.key(0))
    return np.asarray(new.home.table), np.asarray(new.home.acc)

  rng = np.random.default_rng(1)
  plain_table, plain_acc = updated(0.0)
  rng = np.random.default_rng(1)
  reg_table, reg_acc = updated(lam)
  # One row-Adagrad step from a zero accumulator: theta - lr g / sqrt(mean(g^2)).
  # Recover each row's gradient direction from the two updates and compare the
  # accumulators: acc = mean(g^2) with g = g_loss + lam * dOmega.
  touched = np.r_[src.ravel(), dst.ravel()]
  penalty_grad = np.asarray(jax.grad(regularizers.penalty, argnums=(2, 3))(
      "n3", "complex_diagonal", jnp.asarray(table[src.ravel()]), jnp.asarray(table[dst.ravel()]),
      jnp.ones(c)))
  penalty_grad = np.concatenate(penalty_grad)  # rows in `touched` order
  g_plain = (table[touched] - plain_table[touched]) * np.sqrt(plain_acc[touched])[:, None]
  g_reg = (table[touched] - reg_table[touched]) * np.sqrt(reg_acc[touched])[:, None]
  np.testing.assert_allclose(g_reg - g_plain, lam * penalty_grad, rtol=2e-3, atol=2e-4)
  untouched = np.setdiff1d(np.arange(rows), touched)
  np.testing.assert_array_equal(reg_table[untouched], table[untouched])
