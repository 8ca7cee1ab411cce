"""Building blocks for the dataset configs in ``configs/``.

The configs describe the public datasets of ``$TWHIN_DATA_DIR`` (see its
README.md). Knowledge graphs share one shape (three split files of
``head<TAB>relation<TAB>tail``, one entity type), so :func:`kg_config` builds
their whole config; the heterogeneous social graphs are spelled out in their
own files with :func:`entity_type`, :func:`relation` and :func:`apply_variant`.

Relations must be declared in a config, but a KG has dozens or hundreds
(FB15k-237: 237), so :func:`kg_config` reads their names from the split files
when the config is built (train files only, with the importer's checks).
That needs ``$TWHIN_DATA_DIR``.
"""

from __future__ import annotations

import ml_collections

from twhin_jax import config as config_lib
from twhin_jax import recipes

#: Variants every dataset config accepts: "" (the real run) and "test", a
#: CPU-sized run of a few epochs for smoke tests. KG configs built by
#: kg_config also accept "recipe": the package's KG recipe (recipes.KG).
VARIANTS = ("", "test")

KG_SPLITS = ("train", "valid", "test")


def entity_type(num_partitions: int = 1, dim: int = 0) -> ml_collections.ConfigDict:
  """One entry of ``config.entities`` (dim 0: use model.dim)."""
  return ml_collections.ConfigDict(dict(num_partitions=num_partitions, dim=dim))


def relation(name: str, source: str, target: str, operator: str = "translation",
             weight: float = 1.0) -> dict:
  """One entry of ``config.relations``; TwHIN's default translation operator."""
  return dict(name=name, source=source, target=target, operator=operator, weight=weight)


def kg_split_files(folder: str, suffix: str = ".txt") -> list[dict]:
  """File specs of ``<folder>/{train,valid,test}<suffix>`` (head, relation, tail)."""
  return [config_lib.file_spec(f"{folder}/{split}{suffix}", split=split, source=0, relation=1,
                               target=2, format="tsv")
          for split in KG_SPLITS]


def read_relation_names(specs: list[dict]) -> list[str]:
  """Sorted distinct relation names of the train files among ``specs``.

  Sorted rather than in order of appearance, so the relation order (and a
  checkpoint's relation parameters) does not depend on file order. Read by
  the importer's own readers (``importer.relation_names_from_files``): a bad
  line fails with its file and line, a relation seen only in valid/test is
  not declared, and an undeclared header line is refused.
  """
  from twhin_jax import importer  # pyarrow; only when a config reads files
  return importer.relation_names_from_files(specs)


def apply_variant(config: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
  """Shrinks a config for the "test" variant: small dim, 2 epochs, few eval
  triples against sampled negatives, so a CPU finishes in seconds."""
  if variant not in VARIANTS:
    raise ValueError(f"unknown config variant {variant!r}; choose from {VARIANTS}")
  if variant == "test":
    config.name = f"{config.name}-test"
    config.model.dim = 16
    config.train.epochs = 2
    config.train.checkpoint_every_buckets = 0
    config.eval.batch_size = 64
    config.eval.max_triples = 200
    config.eval.num_sampled_negatives = 100
  return config


def kg_config(name: str, folder: str, *, suffix: str = ".txt", epochs: int = 50,
              operator: str = "complex_diagonal", loss: str = "softmax",
              reciprocal: bool = True, dim: int = 200, lr: float = 0.1,
              relation_lr: float | None = None, regularization: float = 0.0,
              variant: str = "") -> ml_collections.ConfigDict:
  """The config of a link-prediction KG with standard train/valid/test files.

  One entity type, "entity", unpartitioned; every relation with the given
  operator and weight 1; dot comparator, reciprocal relation parameters,
  softmax loss over 50 batch + 50 uniform negatives, filtered full ranking.
  """
  config = config_lib.base_config()
  config.name = name
  config.entities.entity = entity_type()
  config.data.files = kg_split_files(folder, suffix)
  config.relations = [relation(r, "entity", "entity", operator=operator)
                      for r in read_relation_names(config.data.files)]
  config.data.names_global = True
  config.model.dim = dim
  config.model.comparator = "dot"
  config.model.reciprocal = reciprocal
  config.model.regularization = regularization
  config.train.epochs = epochs
  config.train.lr = lr
  config.train.relation_lr = lr if relation_lr is None else relation_lr
  config.train.loss = loss
  config.eval.filtered = True
  if variant not in VARIANTS and variant != "recipe":
    # ":<operator>": the recipe with that operator on every relation, the
    # variants configs/fb15k237.py names, for every KG.
    from twhin_jax import model  # imports jax: only these variants need its names
    if variant not in model.OPERATORS:
      raise ValueError(f"unknown config variant {variant!r}; choose from "
                       f"{VARIANTS + ('recipe',) + model.OPERATORS}")
    for rel in config.relations:
      rel["operator"] = variant
    config.name, variant = f"{name}-{variant}", "recipe"
  if variant == "recipe":
    # The package's KG recipe (recipes.KG) instead of this dataset's settings:
    # what a graph nobody tuned on gets.
    config.name = config.name if config.name != name else f"{name}-recipe"
    return recipes.apply(config, "kg")
  return apply_variant(config, variant)
