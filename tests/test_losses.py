"""Losses against direct numpy formulas; masks and zero weights contribute nothing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from twhin_jax import losses

C, N = 5, 7
MARGIN = 0.3


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  pos = rng.normal(0.0, 2.0, C).astype(np.float32)
  neg = rng.normal(0.0, 2.0, (C, N)).astype(np.float32)
  mask = (rng.random((C, N)) < 0.6).astype(np.float32)
  mask[0] = 1.0  # a full row
  mask[1] = 0.0  # a row without negatives
  weight = rng.uniform(0.5, 2.0, C).astype(np.float32)
  weight[3] = 0.0  # a padded edge
  return pos, neg, mask, weight


def _log_sigmoid(x):
  return -np.logaddexp(0.0, -np.asarray(x, np.float64))


def _ref_logistic(pos, neg, mask, weight):
  total = 0.0
  for e in range(C):
    negatives = [_log_sigmoid(-neg[e, j]) for j in range(N) if mask[e, j] > 0]
    neg_term = np.mean(negatives) if negatives else 0.0
    total += weight[e] * (_log_sigmoid(pos[e]) + neg_term)
  return -total


def _ref_softmax(pos, neg, mask, weight):
  total = 0.0
  for e in range(C):
    logits = [float(pos[e])] + [float(neg[e, j]) for j in range(N) if mask[e, j] > 0]
    log_z = np.logaddexp.reduce(np.asarray(logits, np.float64))
    total += weight[e] * (pos[e] - log_z)
  return -total


def _ref_ranking(pos, neg, mask, weight, margin=MARGIN):
  total = 0.0
  for e in range(C):
    for j in range(N):
      if mask[e, j] > 0:
        total += weight[e] * max(0.0, margin - float(pos[e]) + float(neg[e, j]))
  return total


REFERENCES = {"logistic": _ref_logistic, "softmax": _ref_softmax, "ranking": _ref_ranking}


JITTED = {name: jax.jit(fn) for name, fn in losses.LOSSES.items()}
_grad_log_sigmoid = jax.jit(jax.vmap(jax.grad(losses.log_sigmoid)))


def _call(name, pos, neg, mask, weight):
  return float(JITTED[name](jnp.asarray(pos), jnp.asarray(neg), jnp.asarray(mask),
                            jnp.asarray(weight), MARGIN))


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_loss_matches_numpy_formula(name):
  for seed in range(3):
    pos, neg, mask, weight = _inputs(seed)
    got = _call(name, pos, neg, mask, weight)
    expected = REFERENCES[name](pos, neg, mask, weight)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert got != 0.0


def test_hand_computed_values():
  pos = jnp.asarray([0.0])
  neg = jnp.asarray([[0.0, 1.0]])
  mask = jnp.asarray([[1.0, 1.0]])
  weight = jnp.asarray([2.0])
  # logistic: -2 [log(1/2) + (log(1/2) + log sigma(-1)) / 2]
  expected = -2.0 * (np.log(0.5) + (np.log(0.5) + np.log(1.0 / (1.0 + np.e))) / 2.0)
  np.testing.assert_allclose(JITTED['logistic'](pos, neg, mask, weight), expected, rtol=1e-6)
  # softmax: -2 [0 - log(1 + 1 + e)]
  np.testing.assert_allclose(JITTED['softmax'](pos, neg, mask, weight), 2.0 * np.log(2.0 + np.e),
                             rtol=1e-6)
  # ranking, margin 0.5: 2 [max(0, .5) + max(0, 1.5)] = 4
  np.testing.assert_allclose(JITTED['ranking'](pos, neg, mask, weight, 0.5), 4.0, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_masked_negatives_contribute_nothing(name):
  pos, neg, mask, weight = _inputs(1)
  base = _call(name, pos, neg, mask, weight)
  rng = np.random.default_rng(11)
  changed = np.where(mask > 0, neg, rng.normal(0.0, 50.0, neg.shape)).astype(np.float32)
  assert not np.array_equal(changed, neg)
  np.testing.assert_allclose(_call(name, pos, changed, mask, weight), base, rtol=1e-6, atol=1e-6)
  # Gradient w.r.t. masked negatives is exactly zero.
  grad = jax.jit(jax.grad(lambda n: losses.LOSSES[name](jnp.asarray(pos), n, jnp.asarray(mask),
                                                jnp.asarray(weight), MARGIN)))(jnp.asarray(neg))
  assert np.all(np.asarray(grad)[mask == 0] == 0.0)
  assert np.any(np.asarray(grad)[(mask > 0) & (weight[:, None] > 0)] != 0.0)


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_zero_weight_rows_contribute_nothing(name):
  pos, neg, mask, weight = _inputs(2)
  base = _call(name, pos, neg, mask, weight)
  pos2, neg2 = pos.copy(), neg.copy()
  pos2[3] = 40.0 if name != "softmax" else -40.0
  neg2[3] = np.linspace(-30, 30, N)
  np.testing.assert_allclose(_call(name, pos2, neg2, mask, weight), base, rtol=1e-6, atol=1e-6)
  # Equal to the loss with that row removed.
  keep = np.arange(C) != 3
  removed = _call(name, pos[keep], neg[keep], mask[keep], weight[keep])
  np.testing.assert_allclose(base, removed, rtol=1e-5, atol=1e-6)
  # All-zero weights: zero loss, zero gradient.
  zero = np.zeros_like(weight)
  assert _call(name, pos, neg, mask, zero) == 0.0
  grad_pos, grad_neg = jax.jit(jax.grad(
      lambda p, n: losses.LOSSES[name](p, n, jnp.asarray(mask), jnp.asarray(zero), MARGIN),
      argnums=(0, 1)))(jnp.asarray(pos), jnp.asarray(neg))
  assert not np.any(np.asarray(grad_pos)) and not np.any(np.asarray(grad_neg))


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_loss_is_linear_in_weight(name):
  pos, neg, mask, weight = _inputs(0)
  base = _call(name, pos, neg, mask, weight)
  np.testing.assert_allclose(_call(name, pos, neg, mask, 3.0 * weight), 3.0 * base, rtol=1e-5)


def test_better_positives_lower_the_loss():
  pos, neg, mask, weight = _inputs(0)
  for name in REFERENCES:
    assert _call(name, pos + 5.0, neg, mask, weight) < _call(name, pos, neg, mask, weight)
    assert _call(name, pos, neg - 5.0, mask, weight) < _call(name, pos, neg, mask, weight)


def test_log_sigmoid_matches_jax_on_wide_range():
  x = np.concatenate([np.linspace(-100.0, 100.0, 4001),
                      [-1e4, -1e3, -100.0, -88.0, -30.0, -1e-8, 0.0, 1e-8, 30.0, 88.0, 100.0,
                       1e3, 1e4]]).astype(np.float32)
  ours = np.asarray(jax.jit(losses.log_sigmoid)(jnp.asarray(x)))
  theirs = np.asarray(jax.jit(jax.nn.log_sigmoid)(jnp.asarray(x)))
  assert np.all(np.isfinite(ours))
  np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-30)
  np.testing.assert_allclose(ours, _log_sigmoid(x), rtol=2e-6, atol=1e-30)
  assert ours[x == -100.0][0] == -100.0
  assert np.all(ours <= 0.0)


def _sigmoid_neg(x):
  """sigma(-x) in float64, without overflow warnings."""
  x = np.asarray(x, np.float64)
  return np.exp(-np.logaddexp(0.0, x))


def test_log_sigmoid_gradient_on_wide_range():
  # d/dx log sigma(x) = sigma(-x), finite everywhere.
  x = np.concatenate([np.linspace(-100.0, 100.0, 4000),  # even count: 0 is not on the grid
                      [-1e4, -88.0, -1e-6, 1e-6, 88.0, 1e4]]).astype(np.float32)
  grad = np.asarray(_grad_log_sigmoid(jnp.asarray(x)))
  np.testing.assert_allclose(grad, _sigmoid_neg(x), rtol=1e-5, atol=1e-30)


def test_log_sigmoid_gradient_at_zero():
  # A score of exactly 0 is common (zero rows, identical rows under l2, the
  # first step from a symmetric init): the slope there must be sigma(0) = 1/2,
  # the same as jax.nn.log_sigmoid's.
  x = jnp.zeros((3,), jnp.float32)
  np.testing.assert_allclose(np.asarray(_grad_log_sigmoid(x)), 0.5, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(jax.vmap(jax.grad(jax.nn.log_sigmoid))(x)), 0.5, rtol=1e-6)


def test_log_sigmoid_infinities():
  out = np.asarray(jax.jit(losses.log_sigmoid)(jnp.asarray([-np.inf, np.inf], jnp.float32)))
  assert out[0] == -np.inf and out[1] == 0.0
