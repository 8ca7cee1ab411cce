"""Shared fixtures: tiny trained runs of the demo graph's "test" variant."""

from __future__ import annotations

import os

import pytest

from twhin_jax import demo_config
from twhin_jax import train as train_lib


def train_tiny_demo(workdir: str, *, dim: int | None = None, epochs: int = 2,
                    keep_trainer: bool = False, reciprocal: bool = False):
  """Trains the demo's tiny graph into ``workdir`` (seconds on 2 cores).

  Returns the workdir, or the open trainer with ``keep_trainer`` (the caller
  closes it).
  """
  config = demo_config.get_config("test")
  if dim is not None:
    config.model.dim = dim
  config.train.epochs = epochs
  config.train.eval_every_epochs = 0
  config.model.reciprocal = reciprocal
  trainer = train_lib.train(config, workdir, progress=False)
  if keep_trainer:
    return trainer
  trainer.close()
  return workdir


def record_calls(monkeypatch, owner, name: str, records: list, record) -> None:
  """Wraps method ``name`` of class ``owner`` so that every call appends
  ``record(*args)`` to ``records`` and then runs the real method (a spy,
  not a mock: the real work still happens)."""
  real = getattr(owner, name)

  def recording(*args, **kwargs):
    records.append(record(*args, **kwargs))
    return real(*args, **kwargs)

  monkeypatch.setattr(owner, name, recording)


@pytest.fixture(scope="session")
def demo_run_d16(tmp_path_factory):
  """A read-only tiny run (d=16, 2 epochs) shared by modules that only read it
  (tests that write into a run make their own)."""
  return train_tiny_demo(str(tmp_path_factory.mktemp("demo_d16")), dim=16)


@pytest.fixture(autouse=True)
def _keep_data_dir_setting():
  """Restores TWHIN_DATA_DIR after every test: a report (reproduction_report
  sets it for the configs it expands) must not point later tests, or the
  workers they start, at its own folder."""
  before = os.environ.get("TWHIN_DATA_DIR")
  yield
  if before is None:
    os.environ.pop("TWHIN_DATA_DIR", None)
  else:
    os.environ["TWHIN_DATA_DIR"] = before
