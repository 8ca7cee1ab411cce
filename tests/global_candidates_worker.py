"""Run in its own process by tests/test_global_candidates.py (jax must see 4
CPU devices before it is imported).

``exact``: one call (T steps) of the sharded step with global candidates on 4
devices against the single-device step over the same edges and the union of
the candidates, with every row a candidate (negatives.all_candidates): the
4-device union is then every row of the type, as on one device. Each device
holds R rows and trains chunks whose rows are its own (as under the
tournament); the single device holds the 4 shards concatenated and trains
all 4 x S chunks in each step. Prints one JSON object: per operator variant,
the max absolute difference of the tables, Adagrad accumulators and
relation parameters, the largest change the call made, and the same
difference for the sharded step *without* global candidates (so the test
can tell that the comparison is not vacuous).
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from twhin_jax import model
from twhin_jax import sharding as sharding_lib
from twhin_jax import state as state_lib
from twhin_jax import step as step_lib

G = 4
R, D = 6, 8  # rows per device, embedding dim
T, S, C = 2, 2, 3  # steps per call, chunks per step and device, edges per chunk
NUM_REL = 3
LR, REL_LR = 0.1, 0.05
#: (operator, comparator, reciprocal): a query vector per edge; the KG
#: recipe's reciprocal complex product; candidates transformed per relation
#: (linear operator under l2: model.Query.candidate_params).
VARIANTS = (("translation", "dot", False), ("complex_diagonal", "dot", True),
            ("linear", "l2", False))


def random_calls(rng):
  """Per device [G, T, S, C] rows of its own shard, relations and weights."""
  src = rng.integers(0, R, (G, T, S, C))
  dst = rng.integers(0, R, (G, T, S, C))
  rel = rng.integers(0, NUM_REL, (G, T, S))
  weight = rng.uniform(0.5, 1.5, (G, T, S, C)).astype(np.float32)
  weight[0, 0, 1, 2] = 0.0  # a padded edge
  return src, dst, rel, weight


def sharded_batch(src, dst, rel, weight) -> step_lib.StepBatch:
  shape2 = (G, T, S)
  return step_lib.StepBatch(
      src=src.astype(np.int32), dst=dst.astype(np.int32), rel=rel.astype(np.int32),
      weight=weight, src_lo=np.zeros(shape2, np.int32), src_n=np.full(shape2, R, np.int32),
      dst_lo=np.zeros(shape2, np.int32), dst_n=np.full(shape2, R, np.int32),
      step_index=np.broadcast_to(np.arange(T, dtype=np.int32), (G, T)).copy(),
      rel_reverse=(rel + NUM_REL).astype(np.int32))


def single_batch(src, dst, rel, weight) -> step_lib.StepBatch:
  """The same edges on one device: shard g's row x is row g * R + x, and
  step t holds the S chunks of every device (device-major)."""
  offset = (np.arange(G) * R)[:, None, None, None]

  def merge(x):  # [G, T, S, ...] -> [T, G * S, ...]
    return np.moveaxis(x, 0, 1).reshape((T, G * S) + x.shape[3:])

  shape2 = (T, G * S)
  return step_lib.StepBatch(
      src=merge(src + offset).astype(np.int32), dst=merge(dst + offset).astype(np.int32),
      rel=merge(rel).astype(np.int32), weight=merge(weight),
      src_lo=np.zeros(shape2, np.int32), src_n=np.full(shape2, G * R, np.int32),
      dst_lo=np.zeros(shape2, np.int32), dst_n=np.full(shape2, G * R, np.int32),
      step_index=np.arange(T, dtype=np.int32), rel_reverse=merge(rel + NUM_REL).astype(np.int32))


def train_call(operator, comparator, reciprocal, table, params, batch, mesh, global_candidates):
  num_rows = R if mesh is not None else G * R
  fn = step_lib.make_train_steps(
      operator, comparator, "softmax", 0.0, LR, REL_LR, num_rows, reciprocal, mesh=mesh,
      all_candidates=True, global_candidates=global_candidates)
  key = jax.random.key(0)
  state = state_lib.init_step_state(jnp.asarray(table), jnp.zeros(G * R, jnp.float32),
                                    params, REL_LR)
  if mesh is None:
    new, loss, _ = fn(state, batch, key)
  else:
    rows = NamedSharding(mesh, sharding_lib.ROWS)
    state = state._replace(home=jax.tree_util.tree_map(lambda x: jax.device_put(x, rows),
                                                       state.home))
    batch = jax.tree_util.tree_map(
        lambda x: jax.device_put(x, NamedSharding(mesh, PartitionSpec(sharding_lib.AXIS))), batch)
    new, loss, _ = fn(state, batch, jax.random.key_data(key))
  return (np.asarray(new.home.table, np.float64), np.asarray(new.home.acc, np.float64),
          np.asarray(new.rel_params, np.float64), float(loss))


def exact_check(mesh) -> dict:
  rng = np.random.default_rng(7)
  out = {}
  for operator, comparator, reciprocal in VARIANTS:
    table = rng.normal(0, 0.3, (G * R, D)).astype(np.float32)
    params = model.init_operator_params(operator, 2 * NUM_REL, D)
    params = np.asarray(params) + rng.normal(0, 0.1, np.shape(params)).astype(np.float32)
    calls = random_calls(rng)
    args = (operator, comparator, reciprocal, table, params)
    reference = train_call(*args, single_batch(*calls), None, False)
    sharded = train_call(*args, sharded_batch(*calls), mesh, True)
    local = train_call(*args, sharded_batch(*calls), mesh, False)
    names = ("table", "acc", "rel_params")
    out[f"{operator}/{comparator}"] = {
        "max_error": {n: float(np.max(np.abs(a - b)))
                      for n, a, b in zip(names, sharded, reference)},
        "max_change": {n: float(np.max(np.abs(b - a0)))
                       for n, b, a0 in zip(names, reference,
                                           (table, np.zeros(G * R), params))},
        "local_error": {n: float(np.max(np.abs(a - b)))
                        for n, a, b in zip(names, local, reference)},
        "loss": [reference[3], sharded[3], local[3]],
    }
  return out


def main():
  if jax.device_count() < G:
    sys.exit(f"needs {G} devices, jax sees {jax.device_count()}")
  mesh = sharding_lib.make_mesh(G)
  print(json.dumps({"exact": exact_check(mesh)}))


if __name__ == "__main__":
  main()
