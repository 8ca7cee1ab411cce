"""The recipes: one per kind of graph, applied without per-dataset tuning."""

from __future__ import annotations

import os

import pytest

from twhin_jax import config as config_lib
from twhin_jax import recipes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.environ.get("TWHIN_DATA_DIR")
needs_fb = pytest.mark.skipif(
    not DATA or not os.path.isdir(os.path.join(DATA, "kg", "fb15k-237")),
    reason="TWHIN_DATA_DIR is not set or has no kg/fb15k-237 (point it at ../shared/data)")


def test_unknown_kind_is_rejected():
  with pytest.raises(ValueError, match="unknown kind of graph"):
    recipes.apply(config_lib.base_config(), "molecule")


@pytest.mark.parametrize("kind", recipes.KINDS)
def test_every_recipe_stops_on_validation_with_one_dimension(kind):
  config = recipes.apply(config_lib.base_config(), kind)
  assert config.model.dim == recipes.DIM
  assert config.train.epochs == recipes.MAX_EPOCHS and config.train.early_stop_patience > 0
  assert config.train.eval_every_epochs >= 1


def test_kg_recipe_penalises_relations_only_of_trilinear_operators():
  """N3 on the relation parameters (and the random start it needs) and one
  Adagrad accumulator per coordinate where the score is trilinear in them;
  translation and rotation (|e^{i phi}| = 1: no scale to trade) keep the
  identity start and lower their rates on a validation plateau; rotation
  takes per-coordinate accumulators, translation one per row."""
  for operator in ("diagonal", "complex_diagonal", "linear"):
    chosen = recipes.settings("kg", ["translation", operator])
    assert chosen["model.regularize_relations"] is True
    assert chosen["model.relation_init"] == "random"
    assert chosen["train.entity_accumulators"] == "coordinate"
    assert "train.lr_plateau_patience" not in chosen  # constant rates
  for operators in ([], ["translation"], ["none", "translation"], ["rotation"]):
    assert "model.regularize_relations" not in recipes.settings("kg", operators)
    assert "model.relation_init" not in recipes.settings("kg", operators)
    assert recipes.settings("kg", operators)["train.lr_plateau_patience"] == 2
    accumulators = recipes.settings("kg", operators).get("train.entity_accumulators", "row")
    assert accumulators == ("coordinate" if "rotation" in operators else "row")
  assert "model.regularize_relations" not in recipes.settings("social", ["complex_diagonal"])
  assert "train.lr_plateau_patience" not in recipes.settings("social", ["translation"])
  config = config_lib.base_config()
  config.relations = [{"name": "r", "source": "a", "target": "a", "operator": "complex_diagonal"}]
  assert recipes.apply(config, "kg").model.regularize_relations


@needs_fb
@pytest.mark.parametrize("operator", ["translation", "diagonal", "complex_diagonal", "rotation",
                                      "linear"])
def test_fb15k237_operator_variants_share_the_kg_recipe(operator):
  """Every operator variant is the KG recipe with only the operator changed."""
  config = config_lib.load_config(os.path.join(REPO, "configs", f"fb15k237.py:{operator}"), [])
  config_lib.validate(config)
  assert {r["operator"] for r in config.relations} == {operator}
  reference = recipes.apply(config_lib.from_json_dict(config_lib.to_json_dict(config)), "kg")
  for section in ("model", "train", "negatives", "eval"):
    assert config_lib.to_json_dict(config[section]) == config_lib.to_json_dict(reference[section])


@needs_fb
def test_fb15k237_default_is_the_measured_twhin_run():
  config = config_lib.load_config(os.path.join(REPO, "configs", "fb15k237.py"), [])
  assert config.train.epochs == 10 and config.train.early_stop_patience == 0
  assert {r["operator"] for r in config.relations} == {"translation"}


needs_kinship = pytest.mark.skipif(
    not DATA or not os.path.isdir(os.path.join(DATA, "kg", "kinship")),
    reason="TWHIN_DATA_DIR is not set or has no kg/kinship (point it at ../shared/data)")


@needs_kinship
@pytest.mark.parametrize("name", ["kinship", "nations", "umls"])
def test_every_kg_config_has_the_operator_variants(name):
  """configs/<kg>.py:<operator> is the KG recipe with that operator on every
  relation, as fb15k237's variants are; an unknown variant is named."""
  for operator in ("translation", "complex_diagonal"):
    config = config_lib.load_config(os.path.join(REPO, "configs", f"{name}.py:{operator}"), [])
    config_lib.validate(config)
    assert config.name == f"{name}-{operator}"
    assert {r["operator"] for r in config.relations} == {operator}
    assert config.negatives.all_candidates and config.model.regularizer == "n3"
    # Trilinear operators take the relation penalty, translation does not.
    assert config.model.get("regularize_relations", False) == (operator == "complex_diagonal")
  with pytest.raises(ValueError, match="unknown config variant 'tset'"):
    config_lib.load_config(os.path.join(REPO, "configs", f"{name}.py:tset"), [])
