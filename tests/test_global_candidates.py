"""Global candidates (negatives.global_candidates, step.global_uniform_lse):
on G devices every edge's softmax runs over all devices' candidates, so the
sharded step trains what one device trains.

* exactness (4 fake CPU devices, tests/global_candidates_worker.py): one
  call of the sharded step with every row a candidate equals the
  single-device step over the same edges (tables, Adagrad accumulators and
  relation parameters within 1e-5 of the change), for a plain, a
  reciprocal and a candidate-transforming operator; without global
  candidates the same call is far off (the comparison is not vacuous);
* the config: "auto" resolves by schedule, loss and type pairs, "on" is
  refused where it cannot apply.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from twhin_jax import config as config_lib
from twhin_jax import negatives

from test_sharded import REPO, cpu_env

RELATIVE_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def exact_result():
  out = subprocess.run([sys.executable, os.path.join(REPO, "tests", "global_candidates_worker.py")],
                       env=cpu_env(4), capture_output=True, text=True, timeout=900, cwd=REPO)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])["exact"]


@pytest.mark.multidevice
def test_sharded_step_with_global_candidates_equals_one_device(exact_result):
  for variant, figures in exact_result.items():
    for name, error in figures["max_error"].items():
      change = figures["max_change"][name]
      assert change > 1e-2, f"{variant}: {name} did not change ({figures})"
      assert error <= RELATIVE_TOLERANCE * max(1.0, change), (
          f"{variant}: {name} off the one-device step by {error:.3g} (changed by {change:.3g})")
    reference, sharded, _ = figures["loss"]
    assert abs(sharded - reference) <= 1e-5 * abs(reference), (variant, figures["loss"])


@pytest.mark.multidevice
def test_without_global_candidates_the_same_call_differs(exact_result):
  """The local softmax (each device's own rows only) is not the one-device
  step: what the exactness test rules out is a real difference."""
  for variant, figures in exact_result.items():
    assert figures["local_error"]["table"] > 1e-2, (variant, figures)


def _kg_config(loss: str = "softmax"):
  c = config_lib.base_config()
  c.mesh.schedule = "tournament"
  c.entities = {"entity": dict(num_partitions=1, dim=0)}
  c.relations = [dict(name=r, source="entity", target="entity", operator="translation")
                 for r in ("a", "b")]
  c.data.files = [config_lib.file_spec("edges.tsv")]
  c.train.loss = loss
  c.negatives.global_candidates = "auto"
  return c


def test_auto_resolves_by_schedule_loss_and_type_pairs():
  assert negatives.global_candidates(_kg_config())
  assert not negatives.global_candidates(_kg_config("logistic"))
  mixed = _kg_config()
  mixed.entities = {"user": dict(num_partitions=1, dim=0), "item": dict(num_partitions=1, dim=0)}
  mixed.relations = [dict(name="follows", source="user", target="user", operator="translation"),
                     dict(name="likes", source="user", target="item", operator="translation")]
  assert "type pairs" in negatives.global_candidates_obstacle(mixed)
  assert not negatives.global_candidates(mixed)
  # Different operators are different parameter groups: no obstacle.
  mixed.relations[1]["operator"] = "diagonal"
  assert negatives.global_candidates(mixed)
  off = _kg_config()
  off.negatives.global_candidates = "off"
  assert not negatives.global_candidates(off)
  # The ring (inexact for a type that is source and target) only when asked.
  ring = _kg_config()
  ring.mesh.schedule = "ring"
  assert not negatives.global_candidates(ring)
  ring.negatives.global_candidates = "on"
  assert negatives.global_candidates(ring)


def test_auto_by_default_and_off_for_runs_saved_without_the_field():
  """New configs take "auto" (on with the tournament); a config saved before
  the field existed resumes as it trained, with each device's own rows."""
  assert config_lib.base_config().negatives.global_candidates == "auto"
  config = _kg_config()
  del config.negatives["global_candidates"]
  assert not negatives.global_candidates(config)


def test_config_refuses_on_where_it_cannot_apply():
  config = _kg_config()
  config.negatives.global_candidates = "on"
  config_lib.validate(config)  # softmax, one type pair: fine
  config = _kg_config("logistic")
  config.negatives.global_candidates = "on"
  with pytest.raises(ValueError, match="negatives.global_candidates.*softmax"):
    config_lib.validate(config)
  config.negatives.global_candidates = "sometimes"
  with pytest.raises(ValueError, match="negatives.global_candidates"):
    config_lib.validate(config)


def test_edge_log_q_swaps_the_uniform_term_for_the_per_device_draws():
  """The host's q = (C - 1) c / n_r + U / n becomes (C - 1) c / n_r + u / n."""
  import numpy as np
  from twhin_jax import step as step_lib
  rel = np.zeros(6, np.int64)
  src = np.asarray([0, 0, 1, 2, 2, 2])
  dst = np.asarray([3, 4, 5, 5, 5, 6])
  sizes = np.full(6, 40)
  chunk, big_u, small_u = 3, 50, 13
  host, _ = negatives.sampling_log_counts(rel, src, dst, np.asarray([6]), sizes, sizes, chunk,
                                           big_u)
  share = np.asarray([2, 2, 1, 3, 3, 3]) / 6
  got = step_lib.global_edge_log_q(host[None, :].astype(np.float32), np.asarray([40]), big_u,
                                   small_u)
  np.testing.assert_allclose(np.asarray(got)[0], np.log((chunk - 1) * share + small_u / 40),
                             rtol=1e-5)
