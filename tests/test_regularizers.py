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


@pytest.mark.parametrize("operator", ["translation", "diagonal", "complex_diagonal", "rotation"])
def test_n3_value_and_gradient_match_closed_form(operator):
  c, d = 4, 6
  s, t = _rows(0, (c, d)), _rows(1, (c, d))
  w = jnp.asarray([1.0, 0.5, 2.0, 0.0])

  def closed_form_cubes(x):
    x = np.asarray(x, np.float64)
    if operator in ("complex_diagonal", "rotation"):  # rows of complex numbers
      modulus = np.sqrt(x[..., :d // 2] ** 2 + x[..., d // 2:] ** 2)
      return np.sum(modulus ** 3, -1)
    return np.sum(np.abs(x) ** 3, -1)

  def closed_form_grad(x):
    """d/dx |x|^3 = 3|x| x; for a complex coordinate a + ib, d/da |z|^3 = 3|z| a."""
    x = np.asarray(x, np.float64)
    if operator in ("complex_diagonal", "rotation"):
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


@pytest.mark.parametrize("operator", ["translation", "diagonal", "complex_diagonal", "linear"])
@pytest.mark.parametrize("regularizer", ["l2", "n3"])
def test_relation_penalty_is_weighted_norms_of_both_sides_parameters(operator, regularizer):
  """Omega_rel = sum_e w_e (|p_e|^q + |p'_e|^q), per edge (mixed chunks) and
  with one relation broadcast to the chunk."""
  c, d = 4, 6
  shape = (c, d, d) if operator == "linear" else (c, d)
  forward, reverse = _rows(2, shape), _rows(3, shape)
  w = np.asarray([1.0, 0.5, 2.0, 0.0])

  def norm(x):
    x = np.asarray(x, np.float64).reshape(x.shape[0], -1) if operator == "linear" else np.asarray(
        x, np.float64)
    if regularizer == "l2":
      return np.sum(x ** 2, -1)
    if operator == "complex_diagonal":
      return np.sum(np.sqrt(x[..., :d // 2] ** 2 + x[..., d // 2:] ** 2) ** 3, -1)
    return np.sum(np.abs(x) ** 3, -1)

  got = regularizers.relation_penalty(regularizer, operator, forward, reverse, jnp.asarray(w))
  np.testing.assert_allclose(got, np.sum(w * (norm(forward) + norm(reverse))), rtol=1e-5)
  one = regularizers.relation_penalty(regularizer, operator, forward[0], forward[0],
                                      jnp.asarray(w))
  np.testing.assert_allclose(one, 2 * np.sum(w) * norm(forward[:1])[0], rtol=1e-5)


def test_the_none_operator_has_no_relation_penalty():
  value = regularizers.relation_penalty("n3", "none", jnp.zeros((3, 0)), jnp.zeros((3, 0)),
                                        jnp.ones(3))
  assert float(value) == 0.0


@pytest.mark.parametrize("regularizer", ["l2", "n3"])
def test_rotation_phases_have_no_relation_penalty(regularizer):
  """A rotation has modulus 1 whatever its phases: no penalty, no gradient."""
  phases = _rows(4, (3, 5))
  value, grad = jax.value_and_grad(regularizers.relation_penalty, argnums=2)(
      regularizer, "rotation", phases, phases, jnp.ones(3))
  assert float(value) == 0.0
  np.testing.assert_array_equal(grad, np.zeros_like(phases))


def test_step_penalises_the_relation_parameters_only_when_asked():
  """With regularize_relations the relation gradient gains exactly
  lambda * dOmega_rel/dp (n3, reciprocal: the forward and the reverse row
  each get their own term); without it the relations see only the loss."""
  from twhin_jax import state as state_lib
  from twhin_jax import step as step_lib
  rng = np.random.default_rng(0)
  rows, d, c, lam, rel_lr = 12, 6, 4, 0.3, 0.05
  table = rng.normal(size=(rows, d)).astype(np.float32)
  params = rng.normal(size=(2, d)).astype(np.float32)  # forward row 0, reverse row 1
  batch = step_lib.StepBatch(
      src=jnp.asarray([[[0, 1, 2, 3]]], jnp.int32), dst=jnp.asarray([[[4, 5, 6, 7]]], jnp.int32),
      rel=jnp.zeros((1, 1), jnp.int32), rel_reverse=jnp.ones((1, 1), jnp.int32),
      weight=jnp.ones((1, 1, c), jnp.float32), src_lo=jnp.zeros((1, 1), jnp.int32),
      src_n=jnp.full((1, 1), rows, jnp.int32), dst_lo=jnp.zeros((1, 1), jnp.int32),
      dst_n=jnp.full((1, 1), rows, jnp.int32), step_index=jnp.zeros((1,), jnp.int32))

  def relation_step(regularize_relations):
    fn = step_lib.make_train_steps("complex_diagonal", "dot", "softmax", 0.1, 1.0, rel_lr, 0,
                                   reciprocal=True, regularization=lam, regularizer="n3",
                                   regularize_relations=regularize_relations)
    state = state_lib.init_step_state(jnp.asarray(table.copy()), jnp.zeros(rows),
                                      jnp.asarray(params.copy()), rel_lr)
    new, _, _ = fn(state, batch, jax.random.key(0))
    # One Adagrad step from a zero accumulator moves each coordinate by
    # lr * g / |g|; the new accumulator is g^2, so g = -(step) * sqrt(acc) / lr.
    moved = np.asarray(new.rel_params) - params
    acc = np.asarray(jax.tree_util.tree_leaves(new.rel_opt)[0])
    return -moved * np.sqrt(acc) / rel_lr

  plain, regularised = relation_step(False), relation_step(True)
  penalty_grad = np.asarray(jax.grad(regularizers.relation_penalty, argnums=(2, 3))(
      "n3", "complex_diagonal", jnp.asarray(params[0]), jnp.asarray(params[1]), jnp.ones(c)))
  np.testing.assert_allclose(regularised - plain, lam * penalty_grad, rtol=2e-3, atol=2e-4)
  assert np.abs(lam * penalty_grad).min() > 1e-3  # the difference is not lost in tolerance


def test_random_relation_init_is_seeded_and_small():
  from twhin_jax import model
  identity = model.init_operator_params("complex_diagonal", 3, 8)
  np.testing.assert_array_equal(identity[:, :4], 1.0)
  a = model.init_operator_params("complex_diagonal", 3, 8, "random", 1e-3,
                                 np.random.default_rng(5))
  b = model.init_operator_params("complex_diagonal", 3, 8, "random", 1e-3,
                                 np.random.default_rng(5))
  np.testing.assert_array_equal(a, b)
  assert a.shape == identity.shape and 2e-4 < np.std(a) < 5e-3
  with pytest.raises(ValueError, match="unknown relation init"):
    model.init_operator_params("diagonal", 1, 4, "zeros")
  # The layout seeds each group from train.seed: same seed, same start.
  from twhin_jax import demo_config
  config = demo_config.get_config("test")
  config.model.relation_init = "random"
  first = model.RelationLayout.from_config(config).init_params()
  again = model.RelationLayout.from_config(config).init_params()
  config.train.seed += 1
  other = model.RelationLayout.from_config(config).init_params()
  for group in first:
    np.testing.assert_array_equal(first[group], again[group])
    if first[group].size:
      assert not np.array_equal(first[group], other[group])


def test_relation_dropout_zeroes_the_gradient_of_the_parameters_it_drops():
  """A dropped relation parameter takes no part in the chunk's scores, so its
  loss gradient, and its Adagrad step, is exactly zero; a kept one moves. The
  same key drops the same parameters; without dropout every one moves."""
  from twhin_jax import state as state_lib
  from twhin_jax import step as step_lib
  rng = np.random.default_rng(0)
  rows, d, c, rel_lr = 16, 64, 8, 0.05
  table = rng.normal(size=(rows, d)).astype(np.float32)
  params = rng.normal(size=(2, d)).astype(np.float32)
  batch = step_lib.StepBatch(
      src=jnp.asarray([[np.arange(c)]], jnp.int32), dst=jnp.asarray([[np.arange(c, 2 * c)]],
                                                                    jnp.int32),
      rel=jnp.zeros((1, 1), jnp.int32), rel_reverse=jnp.ones((1, 1), jnp.int32),
      weight=jnp.ones((1, 1, c), jnp.float32), src_lo=jnp.zeros((1, 1), jnp.int32),
      src_n=jnp.full((1, 1), rows, jnp.int32), dst_lo=jnp.zeros((1, 1), jnp.int32),
      dst_n=jnp.full((1, 1), rows, jnp.int32), step_index=jnp.zeros((1,), jnp.int32))

  def moved(rate, seed):
    fn = step_lib.make_train_steps("diagonal", "dot", "softmax", 0.1, 1.0, rel_lr, 0,
                                   reciprocal=True, relation_dropout=rate)
    state = state_lib.init_step_state(jnp.asarray(table.copy()), jnp.zeros(rows),
                                      jnp.asarray(params.copy()), rel_lr)
    new, _, _ = fn(state, batch, jax.random.key(seed))
    return np.asarray(new.rel_params) != params

  assert moved(0.0, 0).all()
  dropped = ~moved(0.5, 0)
  assert 0.3 < dropped.mean() < 0.7  # about half of each row
  np.testing.assert_array_equal(dropped, ~moved(0.5, 0))
  assert not np.array_equal(dropped, ~moved(0.5, 1))
