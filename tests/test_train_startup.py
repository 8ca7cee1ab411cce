"""The trainer's start-up shortcuts (train.py): the step compiled ahead from
shapes alone must be the program the first call uses (compiled once), and
the bucket key computed as one program must equal the op-by-op one."""

from __future__ import annotations

import logging
import os

import jax
import numpy as np
import pytest

from twhin_jax import batching
from twhin_jax import checkpoint as checkpoint_lib
from twhin_jax import demo_config
from twhin_jax import schedule
from twhin_jax import step as step_lib
from twhin_jax import train as train_lib


@pytest.mark.parametrize("seed,epoch,index", [(0, 0, 0), (1, 2, 3), (2 ** 31 - 1, 9, 15),
                                              (2 ** 40 + 5, 1, 1), (-7, 0, 2)])
def test_bucket_key_equals_the_op_by_op_key(seed, epoch, index):
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), epoch), index)
  expected = np.asarray(jax.random.key_data(key))
  got = train_lib.bucket_key(seed, epoch, index)
  assert got.dtype == expected.dtype
  np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("mixed,correct", [(False, True), (True, False)])
def test_abstract_batch_matches_a_prepared_call(tmp_path, mixed, correct):
  """Every field of a real host-prepared call has the shape and dtype the
  ahead-of-time compile assumed (a mismatch would compile the step twice)."""
  config = demo_config.get_config("test")
  config.negatives.mix_relations = mixed
  config.negatives.logq_correction = correct
  config.model.reciprocal = mixed  # mixed chunks need reciprocal relations
  config.train.loss = "softmax" if correct else "logistic"  # log q needs the softmax
  trainer = train_lib.Trainer(config, str(tmp_path / "run"), progress=False)
  plan = schedule.training_plan(config.train.bucket_order, trainer.graph.bucket_grid, 0, 1,
                                epoch=0, bucket=0)
  _, _, bucket = plan[0]
  _, call = next(batching.prepare_bucket(trainer.graph, trainer.layout,
                                         trainer.residency.layout_of(bucket), bucket, config,
                                         (0, 0, 0)))
  abstract = train_lib.abstract_call_batch(config, trainer.mesh)
  real = call.batch._replace(step_index=np.zeros((1, batching.STEPS_PER_CALL), np.int32))
  for name, want, got in zip(real._fields, abstract, real):
    assert (want is None) == (got is None), name
    if got is not None:
      got = np.asarray(got)
      assert (want.shape, want.dtype) == (got.shape, got.dtype), name
  trainer.close()


def test_the_step_compiles_once(tmp_path):
  """Training with the step compiled ahead: one compilation of the step
  program in all (the first call reuses the ahead-of-time one)."""
  config = demo_config.get_config("test")
  config.train.epochs = 1
  compiled = []
  # A step built and run by an earlier test of this process is reused from
  # step.make_train_steps' cache and jit's in-memory cache without compiling:
  # start from neither.
  step_lib.make_train_steps.cache_clear()
  jax.clear_caches()

  class Collect(logging.Handler):
    def emit(self, record):
      message = record.getMessage()
      if "Finished XLA compilation of jit(sharded_steps)" in message:
        compiled.append(message)

  handler = Collect()
  logger = logging.getLogger("jax._src.dispatch")
  logger.addHandler(handler)
  old_level = logger.level
  logger.setLevel(logging.DEBUG)
  try:
    with jax.log_compiles(True):
      trainer = train_lib.Trainer(config, str(tmp_path / "run"), progress=False)
      groups = set(trainer.layout.groups)
      trainer.run()
      trainer.close()
  finally:
    logger.removeHandler(handler)
    logger.setLevel(old_level)
  # Every group's step compiles exactly once (ahead of time; JAX logs a
  # program served by the persistent cache the same way).
  assert len(compiled) == len(groups), compiled


def test_checkpoint_is_final_when_training_returns(tmp_path):
  """Checkpoints finish in the background; train() returns only after the
  last one is in place (readers of the run directory find it at once)."""
  config = demo_config.get_config("test")
  config.train.epochs = 2
  trainer = train_lib.train(config, str(tmp_path / "run"), progress=False)
  root = checkpoint_lib.checkpoint_root(str(tmp_path / "run"))
  assert not trainer.checkpointer.manager.is_saving_in_progress()
  assert sorted(int(n) for n in os.listdir(root) if n.isdigit()) == [2_000_000]
  meta = checkpoint_lib.read_meta(os.path.join(str(root), "2000000"))
  assert meta["cursor"] == {"epoch": 2, "bucket": 0}
  trainer.close()
