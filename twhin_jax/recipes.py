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
entities), and training until validation MRR has not improved for
``PATIENCE`` evaluations (``MAX_EPOCHS`` is only a cap); the run ends on its
best epoch. The KG recipe replaces the sampled softmax by the exact one
(1-vs-all, ``negatives.all_candidates``) and adds mixed-relation chunks and
N3 on the entity rows each step touches (regularizers.py); where the
operator is trilinear (TRILINEAR_OPERATORS) N3 on the relation parameters
too and one Adagrad accumulator per coordinate of an entity row; otherwise
(translation, rotation) learning rates halved on a validation plateau, and
for rotation one accumulator per coordinate as well.
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


#: Settings every recipe shares (dotted config fields).
COMMON = {
    "model.dim": DIM,
    "model.comparator": "dot",
    "model.reciprocal": True,
    "train.loss": "softmax",
    "negatives.logq_correction": True,
    "negatives.mix_relations": True,
    "train.epochs": MAX_EPOCHS,
    "train.eval_every_epochs": 1,
    "train.early_stop_metric": "mrr",
    "train.early_stop_patience": PATIENCE,
    "train.batch_size": 1000,
    "eval.max_triples": 3000,  # per-epoch validation on a seeded subsample
}

#: Knowledge graphs: 1-vs-all scoring, the published ComplEx / DistMult
#: recipes' (Lacroix et al. 2018; LibKGE's 1vsAll): every edge against every
#: entity of the corrupted type (a KG's entity set is small: FB15k-237 has
#: 14,541), one chunk per batch so the batch shares one pass over the rows,
#: N3 weight 0.05 and batches of 100 edges with Adagrad lr 0.1 (Lacroix et
#: al.'s FB15k-237 values), and early stopping on the whole validation split
#: (ranking all of a KG's validation triples costs a few seconds an epoch;
#: the 3,000-triple subsample's standard error, about 0.005 MRR, is the size
#: of the differences between epochs on the plateau). Measured on an H200
#: against the sampled softmax (25 batch + 1000 uniform) it replaced:
#: FB15k-237 test MRR +0.013 to +0.017 (translation, complex_diagonal,
#: diagonal), Kinship and UMLS within 0.005, Nations -0.027 (docs/recipes.md).
#: Batches of 100 and the whole validation split against batches of 1,000
#: and the subsample (CPU, docs/recipes.md): FB15k-237 complex_diagonal
#: 0.339 -> 0.341, translation 0.314 -> 0.315, UMLS 0.893 -> 0.895, Nations
#: 0.789 -> 0.791, Kinship 0.829 -> 0.833.
KG_BATCH = 100
KG = {
    "train.lr": 0.1,
    "train.relation_lr": 0.1,
    "train.batch_size": KG_BATCH,
    "model.regularizer": "n3",
    "model.regularization": 0.05,
    "negatives.all_candidates": True,
    "negatives.chunk_size": KG_BATCH,  # one chunk per step
    "negatives.num_uniform": 1000,  # unused with all_candidates
    "eval.max_triples": 0,  # per-epoch validation on every triple
}

#: Heterogeneous social graphs (users, follows, items): PyTorch-BigGraph's
#: chunking (50 batch + 50 uniform negatives per chunk), which scales to types
#: with millions of rows, single-relation chunks, row Adagrad lr 0.05, no
#: regulariser (the settings the social-graph results in the docs were
#: measured with), and the same stopping rule as every recipe.
SOCIAL = {
    "negatives.mix_relations": False,
    "negatives.chunk_size": 50,
    "negatives.num_uniform": 50,
    "train.lr": 0.05,
    "train.relation_lr": 0.1,
    "model.regularization": 0.0,
}

#: User-item graphs (a ratings or adjacency-list file, users -> items): the
#: social recipe; its negatives and learning rate are the ones a graph with a
#: long-tailed item type needs, and a separate set of numbers would be one
#: more thing nobody tuned.
RECIPES = {"kg": KG, "social": SOCIAL, "user_item": SOCIAL}

#: Operators whose score is trilinear in (source row, relation, target row):
#: scaling both rows by c and the relation by 1 / c^2 changes no score, so a
#: penalty on the rows alone can be evaded through the relation parameters
#: (regularizers.py). Where a KG config uses one of them, the KG recipe
#: penalises the relation parameters too (Lacroix et al. 2018's N3 on all
#: three factors), which needs them to start near zero. Measured (test MRR,
#: identity start without the relation term -> with it; docs/recipes.md):
#: FB15k-237 complex_diagonal 0.301 -> 0.332 on the same 3,000-triple test
#: subsample (0.328 on the whole split), diagonal 0.296 (the subsample) ->
#: 0.324 (the whole split); UMLS 0.807 -> 0.877, Nations 0.639 -> 0.788,
#: Kinship 0.811 -> 0.789 (still climbing at the 100-epoch cap).
#: Translation's score (theta_s + r) . theta_t has no such symmetry; it
#: keeps the identity start.
#: The same operators take one Adagrad accumulator per coordinate
#: (train.entity_accumulators), the optimizer of the published ComplEx /
#: DistMult recipes: FB15k-237 complex_diagonal 0.328 -> 0.339, diagonal
#: 0.324 -> 0.339 (whole test split), UMLS 0.877 -> 0.893, Nations 0.788 ->
#: 0.789, Kinship 0.789 -> 0.829. Translation's validation MRR did not gain
#: (0.3231 against 0.3259 by epoch 8), so it keeps one per row; a KG's
#: entity table is small, so doubling its optimizer memory costs little.
TRILINEAR_OPERATORS = ("diagonal", "complex_diagonal", "linear")
KG_TRILINEAR = {
    "model.relation_init": "random",
    "model.regularize_relations": True,
    "train.entity_accumulators": "coordinate",
}

#: The other KG operators (translation, rotation, none) lower both learning
#: rates on a validation plateau: halved after every
#: 2 evaluations without improvement (train.lr_plateau_*; PyTorch's
#: ReduceLROnPlateau, which LibKGE's searches use). Translation's validation
#: MRR on FB15k-237 levels off by epoch 4 and then moves within +-0.002 at
#: the constant rate (best 0.3199 at epoch 9); halved from epoch 7 on by
#: this rule, it gained 0.008 in one epoch, and test MRR rose 0.315 -> 0.323
#: (docs/recipes.md). The trilinear operators climb to epoch 14-23 without
#: that oscillation and keep constant rates: on the small KGs the rule moved
#: complex_diagonal's test MRR by -0.003 to -0.011 (test sets of 200-1,100
#: triples), and on FB15k-237 it added 0.0005 of validation MRR to
#: complex_diagonal and nothing on test (0.341 both ways).
KG_PLATEAU_RATES = {
    "train.lr_plateau_patience": 2,
    "train.lr_plateau_factor": 0.5,
}

#: Rotation (RotatE's operator, model.py) is not trilinear: |e^{i phi}| = 1
#: leaves no scale to trade between rows and relation, so it keeps the
#: identity start, no relation penalty and the plateau rule. It takes one
#: Adagrad accumulator per coordinate, as RotatE's own optimizer (Adam)
#: keeps per-coordinate state: on the small KGs, against one per row (test
#: MRR, docs/recipes.md), UMLS 0.797 -> 0.806, Kinship 0.752 -> 0.792,
#: Nations 0.467 -> 0.459. FB15k-237 with this recipe: 0.307 (translation
#: 0.323, complex_diagonal 0.341; RotatE's published 0.338 uses d = 2000).
KG_ROTATION = {
    "train.entity_accumulators": "coordinate",
}


def settings(kind: str, operators=()) -> dict:
  """Every dotted field a recipe sets, with its value, for a graph whose
  relations use ``operators``."""
  if kind not in RECIPES:
    raise ValueError(f"unknown kind of graph {kind!r}; choose from {KINDS}")
  chosen = {**COMMON, **RECIPES[kind]}
  if kind == "kg":
    trilinear = set(operators) & set(TRILINEAR_OPERATORS)
    chosen.update(KG_TRILINEAR if trilinear else KG_PLATEAU_RATES)
    if "rotation" in operators:
      chosen.update(KG_ROTATION)
  return chosen


def apply(config: ml_collections.ConfigDict, kind: str) -> ml_collections.ConfigDict:
  """Applies the recipe of a kind of graph to a config (in place; returned)."""
  operators = [relation["operator"] for relation in config.get("relations", [])]
  for dotted, value in settings(kind, operators).items():
    *parents, leaf = dotted.split(".")
    node = config
    for name in parents:
      node = node[name]
    node[leaf] = value
  return config
