"""validate() names the bad field for every class of config error."""

from __future__ import annotations

import pytest

from twhin_jax import config as config_lib
from twhin_jax import demo_config


def good():
  return demo_config.get_config("test")


def test_demo_config_is_valid():
  config_lib.validate(good())


@pytest.mark.parametrize("mutate, field", [
    (lambda c: c.relations[0].update(source="robot"), "relations[0].source"),
    (lambda c: c.relations[0].update(operator="rotate"), "relations[0].operator"),
    (lambda c: c.relations[1].update(name=c.relations[0]["name"]), "relations[1].name"),
    (lambda c: c.relations[0].update(weight=-1.0), "relations[0].weight"),
    (lambda c: setattr(c.entities.user, "num_partitions", 0), "entities.user.num_partitions"),
    (lambda c: setattr(c.entities.user, "num_partitions", 3), "entities"),
    (lambda c: setattr(c.train, "batch_size", 1001), "train.batch_size"),
    (lambda c: setattr(c.train, "loss", "hinge"), "train.loss"),
    (lambda c: setattr(c.train, "bucket_order", "zigzag"), "train.bucket_order"),
    (lambda c: setattr(c.train, "lr", 0.0), "train.lr"),
    (lambda c: setattr(c.model, "comparator", "manhattan"), "model.comparator"),
    (lambda c: setattr(c.model, "regularization", -1.0), "model.regularization"),
    (lambda c: setattr(c.negatives, "chunk_size", 0), "negatives.chunk_size"),
    (lambda c: setattr(c.negatives, "logq_correction", True), "negatives.logq_correction"),
    (lambda c: setattr(c.data, "on_error", "ignore"), "data.on_error"),
    (lambda c: setattr(c.data, "test_fraction", 0.7), "data.test_fraction"),
    (lambda c: setattr(c.storage, "zarr_format", 4), "storage.zarr_format"),
    (lambda c: setattr(c.data, "files", [config_lib.file_spec("x.tsv")]), "data"),
])
def test_validate_names_the_bad_field(mutate, field):
  config = good()
  mutate(config)
  with pytest.raises(ValueError, match=f"config.{field.replace('[', '.').replace(']', '.')}"):
    config_lib.validate(config)


def test_complex_diagonal_needs_even_dim():
  config = good()
  config.model.dim = 15
  for rel in config.relations:
    rel["operator"] = "complex_diagonal"
  with pytest.raises(ValueError, match="even dim"):
    config_lib.validate(config)
