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
  s, t, p, q = _rows(0, (c, d)), _rows(1, (c, d)), _rows(2, (d,)), _rows(3, (d,))
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

  value = regularizers.penalty("n3", operator, s, t, w, p, q)
  wn = np.asarray(w, np.float64)
  want = np.sum(wn * (closed_form_cubes(s) + closed_form_cubes(t)
                      + closed_form_cubes(p) + closed_form_cubes(q)))
  np.testing.assert_allclose(value, want, rtol=1e-5)

  gs, gt, gp, gq = jax.grad(regularizers.penalty, argnums=(2, 3, 5, 6))(
      "n3", operator, s, t, w, p, q)
  np.testing.assert_allclose(gs, wn[:, None] * closed_form_grad(s), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(gt, wn[:, None] * closed_form_grad(t), rtol=1e-4, atol=1e-6)
  # The relation term is counted once per (weighted) edge of the chunk.
  np.testing.assert_allclose(gp, wn.sum() * closed_form_grad(p), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(gq, wn.sum() * closed_form_grad(q), rtol=1e-4, atol=1e-6)


def test_n3_gradient_is_finite_at_zero():
  """The complex modulus has a kink at 0; the cube must not give NaN there."""
  zeros = jnp.zeros((2, 4))
  grads = jax.grad(regularizers.penalty, argnums=2)("n3", "complex_diagonal", zeros, zeros,
                                                    jnp.ones(2))
  assert np.all(np.isfinite(grads)) and np.all(grads == 0)


def test_n3_per_edge_relation_parameters():
  """Mixed-relation chunks give one parameter per edge [C, d]."""
  s, t, p = _rows(0, (3, 4)), _rows(1, (3, 4)), _rows(2, (3, 4))
  w = jnp.asarray([1.0, 0.0, 2.0])
  got = regularizers.penalty("n3", "diagonal", s, t, w, p)
  cubes = lambda x: np.sum(np.abs(np.asarray(x)) ** 3, -1)
  want = np.sum(np.asarray(w) * (cubes(s) + cubes(t) + cubes(p)))
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_unknown_regularizer_is_rejected():
  with pytest.raises(ValueError, match="unknown regularizer"):
    regularizers.penalty("l1", "translation", jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.ones(1))
