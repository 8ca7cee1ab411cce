"""1-vs-all training (negatives.all_candidates): the step's loss is the exact
softmax over every row of the corrupted type, computed here independently."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

from twhin_jax import config as config_lib
from twhin_jax import negatives
from twhin_jax import step as step_lib
from twhin_jax import train as train_lib


def full_softmax_loss(table, rel_vec, src, dst, weight):
  """sum_e w_e [ -f(s,t) + log sum_{t'} exp f(s,t') ] + the same over sources,
  f(s, t) = (theta_s + r) . theta_t, every row of the table a candidate."""
  total = 0.0
  for s, t, w in zip(src, dst, weight):
    targets = (table[s] + rel_vec) @ table.T  # [N]: all targets of source s
    sources = (table + rel_vec) @ table[t]  # [N]: all sources of target t
    total += w * (np.log(np.exp(targets).sum()) - targets[t])
    total += w * (np.log(np.exp(sources).sum()) - sources[s])
  return total


def test_all_rows_pads_and_marks_validity():
  rows, valid = negatives.all_rows(jnp.array([10, 3]), jnp.array([3, 5]), 5)
  np.testing.assert_array_equal(rows, [[10, 11, 12, 10, 10], [3, 4, 5, 6, 7]])
  np.testing.assert_array_equal(valid, [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])


def chunk_loss_and_full_softmax(all_candidates: bool, padding: int, weight, logq):
  """(the step's chunk loss, the independent full softmax) for one chunk of
  3 edges over a 7-row table, every row (plus ``padding`` masked slots)
  among the uniform candidates."""
  rng = np.random.default_rng(0)
  num_rows, dim = 7, 5
  table = rng.normal(size=(num_rows, dim)).astype(np.float32)
  rel_vec = rng.normal(size=dim).astype(np.float32)
  src, dst = np.array([0, 3, 5]), np.array([2, 2, 6])
  cand, valid = negatives.all_rows(jnp.array([0]), jnp.array([num_rows]), num_rows + padding)
  src_ids = jnp.concatenate([jnp.asarray(src), cand[0]])
  dst_ids = jnp.concatenate([jnp.asarray(dst), cand[0]])
  settings = step_lib.StepSettings(
      operator="translation", comparator="dot", loss="softmax", margin=0.0, lr=0.1,
      relation_lr=0.1, num_uniform=num_rows + padding, reciprocal=False, regularization=0.0,
      l2_to_previous=0.0, sharded=False, all_candidates=all_candidates)
  params = jnp.asarray(rel_vec)
  loss = step_lib.chunk_loss(settings, jnp.asarray(table)[src_ids], jnp.asarray(table)[dst_ids],
                             src_ids, dst_ids, params, params, jnp.asarray(weight), logq,
                             valid[0], valid[0])
  return float(loss), full_softmax_loss(table.astype(np.float64), rel_vec, src, dst, weight)


@pytest.mark.parametrize("padding", [0, 4])
def test_chunk_loss_is_the_full_softmax(padding):
  # U = rows + padding; the padding positions must not count.
  weight = np.array([1.0, 0.5, 1.0], np.float32)
  # Non-zero log-q inputs must be ignored: every candidate is seen once.
  logq = (jnp.ones(3), jnp.ones(3), jnp.array(2.0), jnp.array(2.0))
  loss, expected = chunk_loss_and_full_softmax(True, padding, weight, logq)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_sampled_mode_differs_from_the_full_softmax():
  """The same chunk with batch negatives on (the sampled mode) is not the full
  softmax: the test above would notice if the flag were ignored."""
  zeros = (jnp.zeros(3), jnp.zeros(3), jnp.array(0.0), jnp.array(0.0))
  loss, expected = chunk_loss_and_full_softmax(False, 0, np.ones(3, np.float32), zeros)
  assert abs(loss - expected) > 1e-3


DATA = os.environ.get("TWHIN_DATA_DIR")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(not DATA or not os.path.isdir(os.path.join(DATA or "", "kg", "kinship")),
                    reason="TWHIN_DATA_DIR is not set or has no kg/kinship (point it at ../shared/data)")
def test_one_vs_all_training_learns_kinship(tmp_path):
  """The trainer end to end in 1-vs-all mode (104 entities: every row a
  candidate): far better than chance (0.05) after 20 epochs."""
  config = config_lib.load_config(
      os.path.join(REPO, "configs", "kinship.py"),
      ["--config.train.epochs=20", "--config.train.eval_every_epochs=0",
       "--config.negatives.all_candidates=True"])
  trainer = train_lib.train(config, str(tmp_path / "kinship"), progress=False)
  metrics = trainer.evaluate("test", progress=False)
  trainer.close()
  assert metrics["mrr"] >= 0.5, metrics
