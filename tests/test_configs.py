"""Every dataset config in configs/ builds, validates, and points at real files."""

from __future__ import annotations

import glob
import importlib.util
import os

import pytest

from twhin_jax import config as config_lib
from twhin_jax import config_builders

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs")
DATASET_CONFIGS = ("kinship", "nations", "umls", "fb15k237", "lastfm", "ciao", "flickr")
KG_RELATIONS = {"kinship": 25, "nations": 55, "umls": 46, "fb15k237": 237}


def _data_present() -> bool:
  path = os.environ.get("TWHIN_DATA_DIR")
  return bool(path) and os.path.isdir(path)


def load_config(name: str, variant: str):
  """Loads configs/<name>.py by path, as the CLI does, and builds a variant.
  KG configs read their relation names from the data: skip without it."""
  path = os.path.join(CONFIG_DIR, f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if name in KG_RELATIONS and not _data_present():
    pytest.skip("TWHIN_DATA_DIR is not set or missing: KG configs read their relations "
                "from the data")
  return module.get_config(variant)


def test_every_dataset_has_a_config():
  present = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(CONFIG_DIR, "*.py"))}
  assert set(DATASET_CONFIGS) <= present


@pytest.mark.parametrize("variant", config_builders.VARIANTS)
@pytest.mark.parametrize("name", DATASET_CONFIGS)
def test_config_builds_and_validates(name, variant):
  config = load_config(name, variant)
  config_lib.validate(config)
  assert config.data.files and not config.data.generator
  if name in KG_RELATIONS:
    assert len(config.relations) == KG_RELATIONS[name]
    assert list(config.entities.keys()) == ["entity"]
  if variant == "test":
    assert config.train.epochs <= 3 and config.model.dim <= 32
  else:
    assert config.model.dim == 200


@pytest.mark.parametrize("name", DATASET_CONFIGS)
def test_config_data_files_exist(name):
  if not _data_present():
    pytest.skip("TWHIN_DATA_DIR is not set or is not a directory (point it at ../shared/data)")
  config = load_config(name, "")
  for spec in config.data.files:
    assert spec["path"].startswith("$TWHIN_DATA_DIR/"), spec["path"]
    path = config_lib.resolve_path(spec["path"])
    assert os.path.isfile(path), path


def test_unknown_variant_is_rejected():
  with pytest.raises(ValueError, match="unknown config variant"):
    load_config("flickr", "huge")
