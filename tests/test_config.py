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
    (lambda c: setattr(c.train, "batch_preparation", "gpu"), "train.batch_preparation"),
    (lambda c: setattr(c.train, "lr", 0.0), "train.lr"),
    (lambda c: setattr(c.train, "entity_accumulators", "column"), "train.entity_accumulators"),
    (lambda c: setattr(c.model, "comparator", "manhattan"), "model.comparator"),
    (lambda c: setattr(c.model, "regularization", -1.0), "model.regularization"),
    (lambda c: setattr(c.model, "relation_init", "zeros"), "model.relation_init"),
    (lambda c: setattr(c.model, "relation_dropout", 1.0), "model.relation_dropout"),
    (lambda c: setattr(c.model, "regularize_relations", True), "model.regularize_relations"),
    (lambda c: setattr(c.negatives, "chunk_size", 0), "negatives.chunk_size"),
    (lambda c: setattr(c.negatives, "logq_correction", True), "negatives.logq_correction"),
    (lambda c: setattr(c.data, "on_error", "ignore"), "data.on_error"),
    (lambda c: setattr(c.data, "test_fraction", 0.7), "data.test_fraction"),
    (lambda c: setattr(c.storage, "zarr_format", 4), "storage.zarr_format"),
    (lambda c: setattr(c.data, "files", [config_lib.file_spec("x.tsv")]), "data"),
    # Misspelt fields are errors, not silently ignored knobs.
    (lambda c: setattr(c.train, "learning_rate", 5.0), "train.learning_rate"),
    (lambda c: setattr(c, "trian", {}), "trian"),
    (lambda c: setattr(c.entities.user, "dimension", 8), "entities.user.dimension"),
    (lambda c: c.relations[0].update(operater="linear"), "relations[0].operater"),
    (lambda c: setattr(c.train, "margin", -0.5), "train.margin"),
    (lambda c: setattr(c.storage, "driver", "sqlite"), "storage.driver"),
])
def test_validate_names_the_bad_field(mutate, field):
  config = good()
  mutate(config)
  with pytest.raises(ValueError, match=f"config.{field.replace('[', '.').replace(']', '.')}"):
    config_lib.validate(config)


@pytest.mark.parametrize("operator", ["complex_diagonal", "rotation"])
def test_complex_operators_need_even_dim(operator):
  config = good()
  config.model.dim = 15
  for rel in config.relations:
    rel["operator"] = operator
  with pytest.raises(ValueError, match=f"{operator} needs an even dim"):
    config_lib.validate(config)


def test_a_misspelt_field_in_a_config_file_is_named(tmp_path):
  path = tmp_path / "typo.py"
  path.write_text("from twhin_jax import demo_config\n"
                  "def get_config():\n"
                  "  c = demo_config.get_config('test')\n"
                  "  c.train.learning_rate = 5.0\n"
                  "  return c\n")
  config = config_lib.load_config(str(path))
  with pytest.raises(ValueError, match=r"config\.train\.learning_rate: unknown field .*'lr'"):
    config_lib.validate(config)


@pytest.mark.parametrize("override, message", [
    ("--config.model.dim=abc", r"--config\.model\.dim: expected int, got 'abc'"),
    ("--config.train.lr=fast", r"--config\.train\.lr: expected float, got 'fast'"),
    ("--config.train.nope=1", r"--config\.train\.nope: unknown field 'nope'"),
    ("--config.model.dim", r"expected --config\.FIELD=VALUE"),
    ("--dim=3", r"unrecognised argument '--dim=3'"),
])
def test_bad_overrides_are_value_errors_naming_the_field(override, message):
  spec = os_path_of_demo_config()
  with pytest.raises(ValueError, match=message):
    config_lib.load_config(spec, [override])


def test_overrides_keep_their_types():
  config = config_lib.load_config(os_path_of_demo_config(), [
      "--config.train.lr=1", "--config.model.dim=32", "--config.name=x"])
  assert config.train.lr == 1.0 and isinstance(config.train.lr, float)
  assert config.model.dim == 32 and config.name == "x"


def test_names_come_from_the_implementations():
  from twhin_jax import losses
  from twhin_jax import model
  from twhin_jax import storage
  config = good()
  for loss in losses.LOSSES:  # every registered loss validates (no second list)
    config.train.loss = loss
    config.negatives.logq_correction = False
    config_lib.validate(config)
  assert config_lib.base_config().storage.driver in storage.storage_drivers()
  assert set(model.OPERATORS) >= {r["operator"] for r in config.relations}


def os_path_of_demo_config() -> str:
  import os
  return os.path.join(os.path.dirname(demo_config.__file__), "demo_config.py") + ":test"
