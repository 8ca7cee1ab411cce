"""model.matmul_precision: the chunk score matmuls in float32 / bfloat16 / tf32
(model.compare_all's precision), with float32 tables and Adagrad state."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from twhin_jax import config as config_lib
from twhin_jax import model
from twhin_jax import optim
from twhin_jax import state as state_lib
from twhin_jax import step as step_lib


def _rows(seed, *shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


@pytest.mark.parametrize("comparator", model.COMPARATORS)
def test_float32_is_compare_all(comparator):
  u, v = _rows(0, 3, 25, 64), _rows(1, 3, 120, 64)
  got = model.compare_all(comparator, u, v, "float32")
  np.testing.assert_allclose(got, model.compare_all(comparator, u, v), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("comparator", model.COMPARATORS)
def test_bfloat16_rounds_the_operands_only(comparator):
  """bf16 scores = fp32 scores of bf16-rounded operands (fp32 sums), which
  differ from the fp32 scores by bf16's rounding (2^-8 relative), not more."""
  u, v = _rows(2, 2, 25, 200), _rows(3, 2, 1025, 200)
  got = model.compare_all(comparator, u, v, "bfloat16")
  assert got.dtype == jnp.float32
  round_bf16 = lambda x: x.astype(jnp.bfloat16).astype(jnp.float32)
  if comparator == "cos":
    expected = jnp.einsum("...ad,...bd->...ab", round_bf16(model._normalize(u)),
                          round_bf16(model._normalize(v)), precision="highest")
  else:
    dots = jnp.einsum("...ad,...bd->...ab", round_bf16(u), round_bf16(v), precision="highest")
    expected = dots if comparator == "dot" else model.compare_all(comparator, u, v) + 2 * (
        dots - jnp.einsum("...ad,...bd->...ab", u, v, precision="highest"))
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-3)
  exact = model.compare_all(comparator, u, v)
  error = float(jnp.max(jnp.abs(got - exact)) / jnp.max(jnp.abs(exact)))
  assert 1e-5 < error < 1e-2  # really rounded, and only by bf16's precision


def test_resolve_and_validate():
  assert model.resolve_matmul_precision("auto", "cpu") == "float32"
  assert model.resolve_matmul_precision("auto", "gpu") == "tf32"
  assert model.resolve_matmul_precision("bfloat16", "cpu") == "bfloat16"
  with pytest.raises(ValueError, match="tf32"):
    model.resolve_matmul_precision("tf32", "cpu")
  with pytest.raises(ValueError, match="matmul_precision"):
    model.resolve_matmul_precision("float16", "cpu")
  config = config_lib.base_config()
  config.entities.node = dict(num_partitions=1, dim=0)
  config.relations = [dict(name="r", source="node", target="node", operator="translation",
                           weight=1.0)]
  config.data.files = [config_lib.file_spec("edges.tsv")]
  config_lib.validate(config)  # valid as it stands (matmul_precision "auto")
  config.model.matmul_precision = "float16"
  with pytest.raises(ValueError, match="model.matmul_precision"):
    config_lib.validate(config)


def test_bfloat16_step_keeps_float32_state():
  """One jitted call of 16 steps: tables and Adagrad state stay fp32 and move
  almost as in fp32 (the updates differ by bf16 rounding only)."""
  rows, dim, chunk, uniform, per_step = 500, 32, 10, 20, 4
  rng = np.random.default_rng(0)
  shape3 = (16, per_step, chunk)
  shape2 = (16, per_step)
  batch = step_lib.StepBatch(
      src=rng.integers(0, rows, shape3).astype(np.int32),
      dst=rng.integers(0, rows, shape3).astype(np.int32),
      rel=rng.integers(0, 3, shape2).astype(np.int32),
      weight=np.ones(shape3, np.float32),
      src_lo=np.zeros(shape2, np.int32), src_n=np.full(shape2, rows, np.int32),
      dst_lo=np.zeros(shape2, np.int32), dst_n=np.full(shape2, rows, np.int32),
      step_index=np.arange(16, dtype=np.int32))
  table = rng.standard_normal((rows, dim)).astype(np.float32) * 0.1
  results = {}
  for precision in ("float32", "bfloat16"):
    state = state_lib.init_step_state(jnp.asarray(table), jnp.zeros((rows,), jnp.float32),
                                     np.zeros((3, dim), np.float32), 0.1)
    fn = step_lib.make_train_steps("translation", "dot", "logistic", 0.1, 0.1, 0.1, uniform,
                                   matmul_precision=precision)
    state, loss, edges = fn(state, batch, jax.random.key(0))
    assert state.home.table.dtype == jnp.float32 and state.home.acc.dtype == jnp.float32
    assert state.rel_params.dtype == jnp.float32
    results[precision] = (np.asarray(state.home.table), float(loss) / float(edges))
  # Mean absolute movement: a few rows whose summed gradient nearly cancels
  # get a large relative error, which Adagrad's normalisation carries into
  # the update, so compare means, not maxima.
  moved = np.abs(results["float32"][0] - table).mean()
  differ = np.abs(results["bfloat16"][0] - results["float32"][0]).mean()
  assert moved > 1e-3  # training moved the rows
  assert 0 < differ < 0.1 * moved
  assert results["bfloat16"][1] == pytest.approx(results["float32"][1], rel=1e-2)
