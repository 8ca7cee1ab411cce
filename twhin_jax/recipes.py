"""One training recipe per kind of graph, chosen once (docs/recipes.md).

A recipe sets everything that is not the graph itself: dimension, loss,
negatives, learning rates, regulariser and the stopping rule. Dataset configs
apply the recipe of their kind and do not tune it: a recipe that only works
on the graph it was tuned on is a benchmark result, not a recipe.

Kinds:
  kg         knowledge graphs (one entity type, many relations, small degree
             skew), e.g. FB15k-237, Kinship, Nations, UMLS.
  social     heterogeneous social graphs (users, follows, a few item types),
             e.g. Last.fm, Ciao, Flickr.
  user_item  a recommendation graph (users -> items), e.g. a ratings file.

Every recipe: dimension DIM, dot comparator, reciprocal relation parameters
(each direction of a relation has its own operator parameters, model.py
eq. 1'), softmax loss over C batch + U uniform negatives with the log-q
correction (so the sampled softmax estimates the full softmax over all
entities: 1-vs-all scoring without its cost), and training until validation
MRR has not improved for ``PATIENCE`` evaluations (``MAX_EPOCHS`` is only a
cap); the run ends on its best epoch. The KG recipe adds mixed-relation
chunks and N3 on the entity rows each step touches (regularizers.py).
Measured figures: docs/recipes.md.
"""

from __future__ import annotations

import ml_collections

KINDS = ("kg", "social", "user_item")
#: The embedding dimension of every recipe (complex operators: DIM / 2
#: complex coordinates).
DIM = 200
MAX_EPOCHS = 100
PATIENCE = 10  # as config.base_config(); see its comment


def _common(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  config.model.dim = DIM
  config.model.comparator = "dot"
  config.model.reciprocal = True
  config.train.loss = "softmax"
  config.negatives.logq_correction = True
  config.negatives.mix_relations = True
  config.train.epochs = MAX_EPOCHS
  config.train.eval_every_epochs = 1
  config.train.early_stop_metric = "mrr"
  config.train.early_stop_patience = PATIENCE
  return config


def kg(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Knowledge graphs: many uniform negatives (a KG's entity set is small
  enough that 1000 uniform draws cover a good share of it), N3 weight 0.05."""
  _common(config)
  config.train.lr = 0.1
  config.train.relation_lr = 0.1
  config.model.regularizer = "n3"
  config.model.regularization = 0.05
  config.negatives.chunk_size = 25
  config.negatives.num_uniform = 1000
  config.train.batch_size = 1000
  config.eval.max_triples = 3000  # per-epoch validation on a seeded subsample
  return config


def social(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Heterogeneous social graphs (users, follows, items): PyTorch-BigGraph's
  chunking (50 batch + 50 uniform negatives per chunk), which scales to
  types with millions of rows, single-relation chunks, row Adagrad lr 0.05,
  no regulariser (the settings the social-graph results in the docs were
  measured with), and the same stopping rule as every recipe."""
  _common(config)
  config.negatives.mix_relations = False
  config.negatives.chunk_size = 50
  config.negatives.num_uniform = 50
  config.train.batch_size = 1000
  config.train.lr = 0.05
  config.train.relation_lr = 0.1
  config.model.regularization = 0.0
  config.eval.max_triples = 3000  # per-epoch validation on a seeded subsample
  return config


def user_item(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """User-item graphs (a ratings or adjacency-list file, users -> items): the
  social recipe; its negatives and learning rate are the ones a graph with a
  long-tailed item type needs, and a separate set of numbers would be one
  more thing nobody tuned."""
  return social(config)


RECIPES = {"kg": kg, "social": social, "user_item": user_item}


def apply(config: ml_collections.ConfigDict, kind: str) -> ml_collections.ConfigDict:
  """Applies the recipe of a kind of graph to a config (in place; returned)."""
  if kind not in RECIPES:
    raise ValueError(f"unknown kind of graph {kind!r}; choose from {KINDS}")
  return RECIPES[kind](config)
