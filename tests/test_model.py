"""Scoring: operators, comparators and the relation layout against numpy."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from twhin_jax import config as config_lib
from twhin_jax import model

OPERATORS = ("none", "translation", "diagonal", "complex_diagonal", "rotation", "linear")
COMPARATORS = ("dot", "cos", "l2")


# Jitted entry points: one compile per shape instead of one per eager op.
_apply = jax.jit(model.apply_operator, static_argnums=0)
_pairs = jax.jit(model.compare_pairs, static_argnums=0)
_all = jax.jit(model.compare_all, static_argnums=0)


def _rng(seed=0):
  return np.random.default_rng(seed)


def _random_param(operator, dim, rng):
  if operator == "none":
    return np.zeros((0,), np.float32)
  if operator == "linear":
    return rng.standard_normal((dim, dim)).astype(np.float32)
  if operator == "rotation":  # phases, anywhere on the circle
    return rng.uniform(-np.pi, np.pi, dim // 2).astype(np.float32)
  return rng.standard_normal((dim,)).astype(np.float32)


def _numpy_operator(operator, param, x):
  """Reference op(x) in float64, written independently of model.py."""
  x = np.asarray(x, np.float64)
  param = np.asarray(param, np.float64)
  if operator == "none":
    return x
  if operator == "translation":
    return x + param
  if operator == "diagonal":
    return x * param
  if operator == "complex_diagonal":
    half = x.shape[-1] // 2
    z = (x[..., :half] + 1j * x[..., half:]) * (param[:half] + 1j * param[half:])
    return np.concatenate([z.real, z.imag], axis=-1)
  if operator == "rotation":
    half = x.shape[-1] // 2
    z = (x[..., :half] + 1j * x[..., half:]) * np.exp(1j * param)
    return np.concatenate([z.real, z.imag], axis=-1)
  if operator == "linear":
    return np.stack([param @ row for row in x.reshape(-1, x.shape[-1])]).reshape(x.shape)
  raise AssertionError(operator)


def _numpy_compare(comparator, u, v):
  u = np.asarray(u, np.float64)
  v = np.asarray(v, np.float64)
  if comparator == "dot":
    return float(u @ v)
  if comparator == "cos":
    return float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))
  if comparator == "l2":
    return float(-np.sum((u - v) ** 2))
  raise AssertionError(comparator)


@pytest.mark.parametrize("operator", OPERATORS)
def test_init_is_identity(operator):
  dim, num_relations = 6, 3
  params = model.init_operator_params(operator, num_relations, dim)
  assert params.shape[0] == num_relations
  x = _rng(1).standard_normal((5, dim)).astype(np.float32)
  for r in range(num_relations):
    out = np.asarray(_apply(operator, jnp.asarray(params[r]), jnp.asarray(x)))
    assert out.shape == x.shape
    np.testing.assert_array_equal(out, x)


def test_init_shapes():
  assert model.init_operator_params("none", 2, 4).shape == (2, 0)
  assert model.init_operator_params("translation", 2, 4).shape == (2, 4)
  assert model.init_operator_params("diagonal", 2, 4).shape == (2, 4)
  assert model.init_operator_params("complex_diagonal", 2, 4).shape == (2, 4)
  assert model.init_operator_params("rotation", 2, 4).shape == (2, 2)  # one phase a coordinate
  assert model.init_operator_params("linear", 2, 4).shape == (2, 4, 4)
  with pytest.raises(ValueError):
    model.init_operator_params("bogus", 2, 4)
  with pytest.raises(ValueError):
    _apply("bogus", jnp.zeros(4), jnp.zeros(4))


def test_operators_hand_computed():
  x = jnp.asarray([[1.0, 2.0, 3.0, 4.0]])
  p = jnp.asarray([0.5, -1.0, 2.0, 0.0])
  np.testing.assert_allclose(_apply("translation", p, x), [[1.5, 1.0, 5.0, 4.0]])
  np.testing.assert_allclose(_apply("diagonal", p, x), [[0.5, -2.0, 6.0, 0.0]])
  # halves: x = (1 + 3i, 2 + 4i), p = (0.5 + 2i, -1 + 0i)
  # (1 + 3i)(0.5 + 2i) = 0.5 + 2i + 1.5i - 6 = -5.5 + 3.5i
  # (2 + 4i)(-1 + 0i) = -2 - 4i
  np.testing.assert_allclose(_apply("complex_diagonal", p, x),
                             [[-5.5, -2.0, 3.5, -4.0]])
  m = jnp.asarray([[1.0, 0.0, 0.0, 0.0],
                   [0.0, 0.0, 1.0, 0.0],
                   [1.0, 1.0, 1.0, 1.0],
                   [0.0, 2.0, 0.0, -1.0]])
  np.testing.assert_allclose(_apply("linear", m, x), [[1.0, 3.0, 10.0, 0.0]])
  # phases (pi/2, pi): (1 + 3i) i = -3 + i, (2 + 4i)(-1) = -2 - 4i
  np.testing.assert_allclose(_apply("rotation", jnp.asarray([np.pi / 2, np.pi]), x),
                             [[-3.0, -2.0, 1.0, -4.0]], atol=1e-6)


def test_rotation_keeps_moduli_and_is_complex_diagonal_on_the_unit_circle():
  rng = _rng(4)
  x = rng.standard_normal((5, 8)).astype(np.float32)
  phases = rng.uniform(-np.pi, np.pi, 4).astype(np.float32)
  out = np.asarray(_apply("rotation", jnp.asarray(phases), jnp.asarray(x)))
  modulus = lambda rows: np.hypot(rows[:, :4], rows[:, 4:])
  np.testing.assert_allclose(modulus(out), modulus(x), rtol=1e-5)
  on_circle = np.concatenate([np.cos(phases), np.sin(phases)])
  np.testing.assert_allclose(out, _apply("complex_diagonal", jnp.asarray(on_circle), jnp.asarray(x)),
                             rtol=1e-5, atol=1e-6)
  # Rotating back by -phases is the inverse.
  back = np.asarray(_apply("rotation", jnp.asarray(-phases), jnp.asarray(out)))
  np.testing.assert_allclose(back, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("operator", ("translation", "diagonal", "complex_diagonal", "rotation",
                                      "linear"))
def test_operators_random_against_numpy(operator):
  rng = _rng(2)
  dim = 8
  param = _random_param(operator, dim, rng)
  x = rng.standard_normal((7, dim)).astype(np.float32)
  out = np.asarray(_apply(operator, jnp.asarray(param), jnp.asarray(x)))
  np.testing.assert_allclose(out, _numpy_operator(operator, param, x), rtol=1e-5, atol=1e-5)


def test_complex_diagonal_is_complex_multiplication():
  rng = _rng(3)
  dim = 6
  x = rng.standard_normal((4, dim)).astype(np.float32)
  p = rng.standard_normal(dim).astype(np.float32)
  out = np.asarray(_apply("complex_diagonal", jnp.asarray(p), jnp.asarray(x)))
  z = out[:, :3] + 1j * out[:, 3:]
  expected = (x[:, :3] + 1j * x[:, 3:]) * (p[:3] + 1j * p[3:])
  np.testing.assert_allclose(z, expected, rtol=1e-5, atol=1e-6)
  # |z w| = |z| |w| for complex numbers.
  np.testing.assert_allclose(np.abs(z), np.abs(x[:, :3] + 1j * x[:, 3:]) * np.abs(p[:3] + 1j * p[3:]),
                             rtol=1e-5)


@pytest.mark.parametrize("comparator", COMPARATORS)
def test_compare_pairs_against_numpy(comparator):
  rng = _rng(4)
  u = rng.standard_normal((5, 6)).astype(np.float32)
  v = rng.standard_normal((5, 6)).astype(np.float32)
  got = np.asarray(_pairs(comparator, jnp.asarray(u), jnp.asarray(v)))
  assert got.shape == (5,)
  expected = [_numpy_compare(comparator, a, b) for a, b in zip(u, v)]
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("comparator", COMPARATORS)
def test_compare_all_equals_compare_pairs(comparator):
  rng = _rng(5)
  u = rng.standard_normal((4, 6)).astype(np.float32)
  v = rng.standard_normal((7, 6)).astype(np.float32)
  scores = np.asarray(_all(comparator, jnp.asarray(u), jnp.asarray(v)))
  assert scores.shape == (4, 7)
  # Every (a, b) pair through compare_pairs, by broadcasting [4, 1, d] x [1, 7, d].
  pairs = np.asarray(_pairs(comparator, jnp.asarray(u)[:, None, :],
                                         jnp.asarray(v)[None, :, :]))  # [4, 7]
  np.testing.assert_allclose(scores, pairs, rtol=1e-5, atol=1e-5)
  for a, b in itertools.product(range(4), range(7)):
    np.testing.assert_allclose(scores[a, b], _numpy_compare(comparator, u[a], v[b]),
                               rtol=1e-5, atol=1e-5)


def test_compare_all_batched_leading_axes():
  rng = _rng(6)
  u = rng.standard_normal((3, 4, 5)).astype(np.float32)
  v = rng.standard_normal((3, 2, 5)).astype(np.float32)
  for comparator in COMPARATORS:
    scores = np.asarray(_all(comparator, jnp.asarray(u), jnp.asarray(v)))
    assert scores.shape == (3, 4, 2)
    for s, a, b in itertools.product(range(3), range(4), range(2)):
      np.testing.assert_allclose(scores[s, a, b], _numpy_compare(comparator, u[s, a], v[s, b]),
                                 rtol=1e-5, atol=1e-5)


def test_l2_is_negative_squared_distance():
  u = jnp.asarray([[0.0, 0.0], [1.0, 1.0]])
  v = jnp.asarray([[3.0, 4.0], [1.0, 1.0]])
  np.testing.assert_allclose(_all("l2", u, v), [[-25.0, -2.0], [-13.0, 0.0]])
  np.testing.assert_allclose(_pairs("l2", u, v), [-25.0, 0.0])
  # Larger is closer, and never positive.
  rng = _rng(7)
  a = jnp.asarray(rng.standard_normal((6, 3)).astype(np.float32))
  assert float(jnp.max(_all("l2", a, a))) <= 1e-5
  np.testing.assert_allclose(np.diag(_all("l2", a, a)), 0.0, atol=1e-5)


def test_cos_is_scale_invariant_and_bounded():
  rng = _rng(8)
  u = rng.standard_normal((4, 5)).astype(np.float32)
  v = rng.standard_normal((3, 5)).astype(np.float32)
  base = np.asarray(_all("cos", jnp.asarray(u), jnp.asarray(v)))
  scaled = np.asarray(_all("cos", jnp.asarray(3.0 * u), jnp.asarray(0.5 * v)))
  np.testing.assert_allclose(base, scaled, rtol=1e-5, atol=1e-6)
  assert np.all(np.abs(base) <= 1.0 + 1e-6)


def test_unknown_comparator_raises():
  with pytest.raises(ValueError):
    _pairs("bogus", jnp.zeros((2, 3)), jnp.zeros((2, 3)))
  with pytest.raises(ValueError):
    _all("bogus", jnp.zeros((2, 3)), jnp.zeros((2, 3)))


# --- RelationLayout ---------------------------------------------------------

def _layout_config():
  c = config_lib.base_config()
  c.model.dim = 4
  c.entities.user = {"num_partitions": 1, "dim": 0}  # model.dim
  c.entities.item = {"num_partitions": 1, "dim": 4}
  c.entities.topic = {"num_partitions": 1, "dim": 6}
  c.relations = [
      {"name": "follows", "source": "user", "target": "user", "operator": "translation", "weight": 1.0},
      {"name": "likes", "source": "user", "target": "item", "operator": "translation", "weight": 1.0},
      {"name": "related", "source": "topic", "target": "topic", "operator": "translation", "weight": 1.0},
      {"name": "buys", "source": "user", "target": "item", "operator": "linear", "weight": 1.0},
      {"name": "parent", "source": "topic", "target": "topic", "operator": "complex_diagonal", "weight": 1.0},
      {"name": "sees", "source": "user", "target": "item", "operator": "translation", "weight": 1.0},
      {"name": "is", "source": "user", "target": "user", "operator": "none", "weight": 1.0},
      {"name": "near", "source": "topic", "target": "topic", "operator": "diagonal", "weight": 1.0},
  ]
  return c


def test_layout_groups_by_operator_and_dim():
  layout = model.RelationLayout.from_config(_layout_config())
  assert layout.names == ("follows", "likes", "related", "buys", "parent", "sees", "is", "near")
  assert layout.dims == (4, 4, 6, 4, 6, 4, 4, 6)
  assert layout.groups == {
      "translation:4": [0, 1, 5],
      "translation:6": [2],
      "linear:4": [3],
      "complex_diagonal:6": [4],
      "none:4": [6],
      "diagonal:6": [7],
  }
  for name, members in layout.groups.items():
    for row, relation in enumerate(members):
      assert layout.group[relation] == name
      assert layout.row[relation] == row
      assert name == model.group_name(layout.operators[relation], layout.dims[relation])
  params = layout.init_params()
  assert params["translation:4"].shape == (3, 4)
  assert params["translation:6"].shape == (1, 6)
  assert params["linear:4"].shape == (1, 4, 4)
  assert params["complex_diagonal:6"].shape == (1, 6)
  assert params["none:4"].shape == (1, 0)
  assert params["diagonal:6"].shape == (1, 6)


def _random_params(layout, rng):
  params = {}
  for name, members in layout.groups.items():
    operator, dim = name.split(":")[0], int(name.split(":")[1])
    params[name] = np.stack([_random_param(operator, dim, rng) for _ in members])
  return params


def test_layout_param_picks_the_relation_row():
  layout = model.RelationLayout.from_config(_layout_config())
  params = _random_params(layout, _rng(9))
  np.testing.assert_array_equal(layout.param(params, 5), params["translation:4"][2])
  np.testing.assert_array_equal(layout.param(params, 1), params["translation:4"][1])
  np.testing.assert_array_equal(layout.param(params, 3), params["linear:4"][0])


@pytest.mark.parametrize("comparator", COMPARATORS)
def test_score_targets_and_sources_brute_force(comparator):
  layout = model.RelationLayout.from_config(_layout_config())
  rng = _rng(10)
  params = _random_params(layout, rng)
  jparams = {k: jnp.asarray(v) for k, v in params.items()}
  for relation in range(len(layout.names)):
    dim = layout.dims[relation]
    operator = layout.operators[relation]
    param = params[layout.group[relation]][layout.row[relation]]
    left = rng.standard_normal((3, dim)).astype(np.float32)
    cands = rng.standard_normal((5, dim)).astype(np.float32)

    got = np.asarray(layout.score_targets(jparams, comparator, relation,
                                          jnp.asarray(left), jnp.asarray(cands)))
    assert got.shape == (3, 5)
    expected = np.array([[_numpy_compare(comparator, _numpy_operator(operator, param, left[b][None])[0],
                                         cands[n]) for n in range(5)] for b in range(3)])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)

    # score_sources: candidates are sources (transformed), left rows are targets.
    got = np.asarray(layout.score_sources(jparams, comparator, relation,
                                          jnp.asarray(cands), jnp.asarray(left)))
    assert got.shape == (3, 5)
    expected = np.array([[_numpy_compare(comparator, _numpy_operator(operator, param, cands[n][None])[0],
                                         left[b]) for n in range(5)] for b in range(3)])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("comparator", COMPARATORS)
@pytest.mark.parametrize("operator", OPERATORS)
@pytest.mark.parametrize("per_row", [False, True])
def test_source_query_scores_equal_f_of_each_candidate(operator, comparator, per_row):
  """model.source_query + model.score, folded or not, give f(s', r, t) =
  compare(op_r(s'), t) for every candidate source s' (dot: with the offset;
  without it, the same up to a per-target constant, so the same ranks)."""
  rng = _rng(11)
  dim = 6
  targets = rng.standard_normal((4, dim)).astype(np.float32)
  cands = rng.standard_normal((7, dim)).astype(np.float32)
  params = np.stack([_random_param(operator, dim, rng) for _ in range(4)])
  expected = np.array([[_numpy_compare(comparator, _numpy_operator(
      operator, params[b if per_row else 0], cands[n][None])[0], targets[b]) for n in range(7)]
      for b in range(4)])
  given = jnp.asarray(params if per_row else params[0])
  for fold in (True, False):
    query = model.source_query(operator, comparator, False, given, None, jnp.asarray(targets),
                               per_row=per_row, fold=fold)
    if per_row and query.candidate_params is not None:
      continue  # candidates transformed per query: callers batch one relation instead
    got = np.asarray(model.score(operator, query, jnp.asarray(cands)))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert fold or query.offset is None
    folds = model.folds_into_query(operator, comparator)
    assert (query.candidate_params is None) == (operator == "none" or (fold and folds))
  dropped = model.source_query(operator, comparator, False, given, None, jnp.asarray(targets),
                               per_row=per_row, with_offset=False)
  if dropped.candidate_params is None:
    got = np.asarray(model.score(operator, dropped, jnp.asarray(cands)))
    shift = expected - got  # constant along each row: ranks unchanged
    np.testing.assert_allclose(shift, shift[:, :1].repeat(7, axis=1), atol=1e-4)


def test_source_query_reciprocal_uses_the_reverse_parameters():
  rng = _rng(12)
  dim = 4
  forward = _random_param("diagonal", dim, rng)
  reverse = _random_param("diagonal", dim, rng)
  targets = rng.standard_normal((3, dim)).astype(np.float32)
  cands = rng.standard_normal((5, dim)).astype(np.float32)
  query = model.source_query("diagonal", "dot", True, jnp.asarray(forward), jnp.asarray(reverse),
                             jnp.asarray(targets), per_row=False)
  got = np.asarray(model.score("diagonal", query, jnp.asarray(cands)))
  np.testing.assert_allclose(got, (targets * reverse) @ cands.T, rtol=1e-5, atol=1e-5)
