"""The dataset configs that ship inside the package.

``twhin_jax/configs`` is a link to the repository's ``configs/`` folder, and
pyproject.toml lists ``configs/*.py`` as package data, so a wheel carries the
same files: code that needs a dataset config (the reproduction report, the
who-to-follow and low-coverage experiments) finds it next to this module
whether it runs from a checkout or an installed wheel, never through a path
relative to the repository. (``importlib.resources.files`` is not used:
twhin_jax has no ``__init__.py``, and on a namespace package it fails.)
"""

from __future__ import annotations

import os

from twhin_jax import config as config_lib

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def config_path(name: str) -> str:
  """Path of the shipped config ``name`` ("lastfm" or "lastfm.py", optionally
  ``:variant``), for ``load_config``."""
  name, sep, variant = name.partition(":")
  if not name.endswith(".py"):
    name += ".py"
  path = os.path.join(CONFIG_DIR, name)
  if not os.path.isfile(path):
    available = sorted(p[:-3] for p in os.listdir(CONFIG_DIR) if p.endswith(".py")) \
        if os.path.isdir(CONFIG_DIR) else []
    raise FileNotFoundError(f"{path}: no such shipped config; available: {available}")
  return path + (sep + variant if sep else "")


def load(name: str, overrides=()):
  """The shipped config ``name`` with ``--config.X=Y`` overrides applied."""
  return config_lib.load_config(config_path(name), list(overrides))
