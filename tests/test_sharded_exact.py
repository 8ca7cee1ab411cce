"""Sharded training against references it must match exactly (up to float order).

tests/test_sharded.py compares 8 devices with one by final MRR, which a
missing relation-gradient psum or a dropped visiting-copy update barely moves.
These tests pin the parts instead (4 fake CPU devices, in their own process,
tests/sharded_exact_worker.py):

* relation parameters (and their Adagrad state) are bit-identical on every
  device after several calls, in the step and after a bucket of the trainer;
* one call of the round-0 step and of a visiting-round step equals a dense
  reference written independently (per device, L2-to-previous on);
* a whole bucket of a graph whose target type is never a source, trained on
  4 devices by the trainer (4 rounds, the ring, the merge), equals the same
  calls replayed by the single-device step on the concatenated table;
* with mesh.schedule = "tournament", a bucket of a graph where users also
  follow users equals its single-device replay too.

Plus, in this process, the L2-to-previous proximal row update against its
closed form.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from twhin_jax import optim

from test_sharded import REPO, cpu_env

#: A sharded result may differ from its reference by float summation order:
#: relative to the size of the change the call made.
RELATIVE_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def worker_result():
  out = subprocess.run([sys.executable, os.path.join(REPO, "tests", "sharded_exact_worker.py")],
                       env=cpu_env(4), capture_output=True, text=True, timeout=900, cwd=REPO)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def assert_matches(figures: dict, what: str):
  """Every array moved (the check is not vacuous) and sits on its reference."""
  for name, f in figures.items():
    assert f["max_change"] > 1e-3, f"{what}: {name} did not change at all ({f})"
  off = [f"{name} by {f['max_error']:.3g} (changed by up to {f['max_change']:.3g})"
         for name, f in figures.items()
         if f["max_error"] > RELATIVE_TOLERANCE * max(1.0, f["max_change"])]
  assert not off, f"{what}: off its reference: " + "; ".join(off)


@pytest.mark.multidevice
def test_relation_replicas_stay_bit_identical(worker_result):
  """The psum of relation gradients makes every replica take the same step."""
  for variant, spread in worker_result["replicas"].items():
    assert spread == 0.0, f"{variant} step: relation replicas differ by up to {spread}"
  spread = worker_result["target_only"]["replica_spread"]
  assert spread == 0.0, f"trainer bucket: relation replicas differ by up to {spread}"


@pytest.mark.multidevice
def test_round_zero_step_equals_dense_reference(worker_result):
  assert_matches(worker_result["step_local"], "round-0 step")


@pytest.mark.multidevice
def test_visiting_step_equals_dense_reference(worker_result):
  """Home rows take the source gradients, the visiting copy the target
  gradients (each with its own accumulators and anchors), relations the sum."""
  figures = worker_result["step_visiting"]
  assert {"visiting", "visiting_acc"} <= set(figures)
  assert_matches(figures, "visiting step")


@pytest.mark.multidevice
def test_target_only_bucket_equals_single_device_replay(worker_result):
  result = worker_result["target_only"]
  assert result["rounds"] == [0, 1, 2, 3]  # every round of the ring ran
  assert result["edges"] == 1500  # every edge once
  assert_matches({k: v for k, v in result.items() if isinstance(v, dict)},
                 "4-device bucket vs single-device replay")


# --- L2-to-previous: the proximal row update, in this process ------------------

LR, ALPHA = 0.1, 0.7


def test_proximal_row_update_equals_closed_form():
  """theta <- (theta - eta g + 2 alpha w eta prev) / (1 + 2 alpha w eta), on the
  distinct touched rows (gradients of duplicates summed first), eta the row's
  Adagrad step; untouched rows and out-of-range padding are left alone."""
  rng = np.random.default_rng(3)
  num_rows, dim = 12, 5
  table = rng.standard_normal((num_rows, dim)).astype(np.float32)
  acc = rng.uniform(0.0, 0.5, num_rows).astype(np.float32)
  anchor = rng.standard_normal((num_rows, dim)).astype(np.float32)
  anchor_weight = np.array([1, 0] * (num_rows // 2), np.float32)  # 0: a new entity
  rows = np.array([0, 3, 3, 4, 7, 7, 7, 9, num_rows + 2], np.int32)  # duplicates, padding
  grads = rng.standard_normal((len(rows), dim)).astype(np.float32)
  update = jax.jit(optim.row_adagrad_update, static_argnames=("lr", "anchor_strength"))
  got_table, got_state = update(
      jnp.asarray(table), optim.RowAdagradState(jnp.asarray(acc)), jnp.asarray(rows),
      jnp.asarray(grads), lr=LR, anchor=jnp.asarray(anchor),
      anchor_weight=jnp.asarray(anchor_weight), anchor_strength=ALPHA)
  want_table, want_acc = table.astype(np.float64), acc.astype(np.float64)
  for row in np.unique(rows[rows < num_rows]):
    g = grads[rows == row].astype(np.float64).sum(axis=0)
    want_acc[row] += np.mean(g * g)
    eta = LR / (np.sqrt(want_acc[row]) + optim.ADAGRAD_EPS)
    pull = 2 * ALPHA * anchor_weight[row] * eta
    want_table[row] = (table[row] - eta * g + pull * anchor[row]) / (1 + pull)
  np.testing.assert_allclose(np.asarray(got_state.acc), want_acc, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(got_table), want_table, rtol=1e-5, atol=1e-6)
  # An anchored row (weight 1) ends nearer its anchor than the plain step puts it.
  plain, _ = update(jnp.asarray(table), optim.RowAdagradState(jnp.asarray(acc)),
                    jnp.asarray(rows), jnp.asarray(grads), lr=LR)
  for row in (0, 4):
    assert (np.linalg.norm(np.asarray(got_table)[row] - anchor[row])
            < np.linalg.norm(np.asarray(plain)[row] - anchor[row]))


# --- The XLA:CPU launch deadlock (docs/architecture.md, "Fixed: ...") ----------

BOUND_SCRIPT = """
import json, types
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from twhin_jax import train as train_lib
mesh = Mesh(np.array(jax.devices()[:2]), ("d",))
def body(x):
  for _ in range(4):
    x = jnp.tanh(x * 0.5 + 1.0)
  return x, jax.lax.psum(jnp.sum(x[:8]), "d")
step = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("d"), out_specs=(P("d"), P())),
               donate_argnums=0)
x = jax.device_put(np.ones((2 * 200_000, 128), np.float32), NamedSharding(mesh, P("d")))
trainer = types.SimpleNamespace(num_shards=2, mesh=mesh)  # what _bound_inflight reads
results, most = [], 0
for _ in range(24):  # under XLA's 32 in-flight computations, so nothing can hang here
  x, total = step(x)
  results.append(total)
  train_lib.Trainer._bound_inflight(trainer, results)
  most = max(most, sum(not r.is_ready() for r in results))
jax.block_until_ready(results)
print(json.dumps({"most_in_flight": most, "bound": train_lib.MAX_INFLIGHT_CALLS}))
"""


@pytest.mark.multidevice
def test_trainer_bounds_the_sharded_calls_in_flight_on_cpu():
  """The trainer's dispatch loop waits for the call MAX_INFLIGHT_CALLS back on a
  CPU mesh: slow real two-device calls never pile up further than that."""
  out = subprocess.run([sys.executable, "-c", BOUND_SCRIPT], env=cpu_env(2),
                       capture_output=True, text=True, timeout=600, cwd=REPO)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert 1 <= result["most_in_flight"] <= result["bound"] + 1, result


@pytest.mark.multidevice
def test_bounded_dispatch_avoids_the_xla_cpu_deadlock():
  """tools/repro_cpu_collective_stall.py: 64 calls of a two-device program with
  an all-reduce, waiting for the call 8 back, finish (unbounded, they hang on
  this 2-core machine until XLA's rendezvous timeout aborts the process)."""
  out = subprocess.run([sys.executable, os.path.join(REPO, "tools",
                                                     "repro_cpu_collective_stall.py"),
                        "--window", "8"], env=cpu_env(2), capture_output=True, text=True,
                       timeout=600, cwd=REPO)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "ok: 64 calls" in out.stdout


@pytest.mark.multidevice
def test_tournament_bucket_with_a_source_and_target_type_equals_single_device_replay(
    worker_result):
  """mesh.schedule="tournament" (device_schedule.py): users follow users, yet
  4 devices train the bucket exactly as one device trains the same calls
  (the ring sums two devices' updates of such rows instead), also when the
  bucket cycles three times through the rounds (mesh.round_passes), and with
  one Adagrad accumulator per coordinate."""
  result = worker_result["tournament"]
  assert result["rounds"] == list(range(7))  # 2G - 1 rounds
  # mesh.round_passes = 3: every round visited three times, in turn.
  assert result["visits"] == list(range(21))
  assert result["edges"] == 1500
  assert len(result["acc_shape"]) == 2  # train.entity_accumulators = "coordinate"
  assert_matches({k: v for k, v in result.items() if isinstance(v, dict)},
                 "4-device tournament bucket vs single-device replay")
