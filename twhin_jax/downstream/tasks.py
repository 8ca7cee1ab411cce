"""Downstream tasks on the public datasets, each a function returning a metrics dict.

Every task takes an *embedding source*: anything
``load_embeddings`` reads (a run directory, an export or
compressed directory, an ``EmbeddingSet``, or ``{type: (names, array)}``),
and a ``feature_set`` naming which entity embeddings are added to id-free
baseline features (paper Table 2 style; "none" is the baseline alone).

  ciao_category   Ciao product -> category (28 classes) from the product
                  embedding. Feature sets: none (log rating count, mean stars,
                  mean helpfulness of the product), P. Metrics: accuracy,
                  macro one-vs-rest ROC-AUC. The embedding run must not have
                  the in_category relation (``ciao_config_without_category``).
  ciao_rating     rating >= 4 of a (user, product) pair the embedding run held
                  out (its valid + test rated_k edges: the vectors never saw
                  these pairs). Feature sets: none (log rating counts and mean
                  stars of user and product over the run's train edges), U, P,
                  U+P. Metrics: ROC-AUC, PR-AUC, RCE (Eq. 4), MAP per user.
  entity_category any entity type -> a label read from a file (one row per
                  entity or many: the majority label), with log row count and
                  the means of chosen numeric columns as dense features.
                  Feature sets: none, E (the entity's embedding). Ciao's
                  category task is this over rating.tsv.gz (product, category,
                  stars, helpfulness), kept as its own function for its
                  numeric-id order.
  lastfm_friends  held-out Last.fm friendships against random non-friend
                  pairs (``negatives`` per positive, same first user).
                  Feature sets: none (log degrees of both users and log common
                  friends in the training friend graph), U (both users'
                  embeddings and their elementwise product). Metrics as above,
                  MAP per first user. The embedding run must be trained on
                  ``write_lastfm_train_friends`` output (checked: a held-out
                  pair in the run's graph is an error).

Examples are split 60/20/20 (train/valid/test; friend examples grouped by
first user) with a seeded permutation; dense features are standardised with
the train mean and deviation; the model and loop are in ``model.py``.
"""

from __future__ import annotations

import functools
import gzip
import os
import time

import numpy as np

from twhin_jax import config as config_lib
from twhin_jax import rundir
from twhin_jax.embedding_set import load_embeddings
import twhin_jax.downstream.metrics as metrics_lib
from twhin_jax.downstream.model import (Examples, IdFeature, TrainConfig, build_model, predict,
                                        train_model)
from twhin_jax.graph import Graph

CIAO = "social/ciao-tang2012"
LASTFM = "social/hetrec2011-lastfm-2k"
SPLIT_FRACTIONS = (0.6, 0.2, 0.2)
CATEGORY_FEATURE_SETS = ("none", "P")
RATING_FEATURE_SETS = ("none", "U", "P", "U+P")
FRIEND_FEATURE_SETS = ("none", "U")


def _data_dir(data_dir: str | None) -> str:
  path = data_dir or os.environ.get("TWHIN_DATA_DIR") or os.path.join("..", "shared", "data")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: no datasets folder (set TWHIN_DATA_DIR)")
  return path


def _check_feature_set(feature_set: str, allowed: tuple[str, ...], task: str) -> None:
  if feature_set not in allowed:
    raise ValueError(f"{task}: unknown feature set {feature_set!r}; choose from {allowed}")


def _split(n: int, seed: int, groups: np.ndarray | None = None):
  """Row indices of train / valid / test (60/20/20), seeded; whole groups if given."""
  rng = np.random.default_rng(seed)
  if groups is None:
    order = rng.permutation(n)
    cut = np.cumsum([int(f * n) for f in SPLIT_FRACTIONS[:2]])
    return np.split(order, cut)
  unique = rng.permutation(np.unique(groups))
  cut = np.cumsum([int(f * len(unique)) for f in SPLIT_FRACTIONS[:2]])
  parts = np.split(unique, cut)
  return [np.flatnonzero(np.isin(groups, part)) for part in parts]


def _standardise(dense: np.ndarray, train_rows: np.ndarray) -> np.ndarray:
  if dense.shape[1] == 0:
    return dense.astype(np.float32)
  mean = dense[train_rows].mean(axis=0)
  std = dense[train_rows].std(axis=0) + 1e-6
  return ((dense - mean) / std).astype(np.float32)


def _run_binary(task: str, feature_set: str, embeddings, dense, ids, id_features, products,
                labels, split, query_ids, train_config, use_pq, progress) -> dict:
  started = time.perf_counter()
  train_rows, valid_rows, test_rows = split
  examples = Examples(_standardise(dense, train_rows), ids, labels.astype(np.int32))
  model = build_model(embeddings, dense.shape[1], id_features, products, num_outputs=1,
                      use_pq=use_pq, seed=train_config.seed)
  info = train_model(model, examples.take(train_rows), examples.take(valid_rows), train_config,
                     progress=progress)
  probabilities = predict(model, examples.take(test_rows))
  result = metrics_lib.binary_metrics(labels[test_rows], probabilities,
                                      float(labels[train_rows].mean()), query_ids[test_rows])
  return {"task": task, "feature_set": feature_set, **result,
          "train_examples": int(len(train_rows)), "best_epoch": info["best_epoch"],
          "seconds": time.perf_counter() - started,
          "pq": sorted(t for t in embeddings.pq if any(f.entity_type == t for f in id_features))
          if use_pq else []}


# --------------------------------------------------------------------------
# Ciao.


@functools.lru_cache(maxsize=2)
def ciao_ratings(data_dir: str | None = None) -> np.ndarray:
  """rating.tsv.gz as int64 [R, 5]: user, product, category, stars, helpfulness."""
  path = os.path.join(_data_dir(data_dir), CIAO, "rating.tsv.gz")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: Ciao ratings not found")
  return np.loadtxt(path, dtype=np.int64, delimiter="\t").reshape(-1, 5)


def config_without_relations(spec: str, relations, overrides=(), suffix: str = "-without"):
  """A config file's config without the named relations (their files too),
  and without the entity types no remaining relation uses: for a label that
  a relation encodes (Ciao's in_category), which must not be an input of the
  embeddings that predict it."""
  config = config_lib.load_config(spec, list(overrides))
  dropped = set(relations)
  unknown = dropped - {r["name"] for r in config.relations}
  if unknown:
    raise ValueError(f"{spec}: no relation(s) {sorted(unknown)} to drop")
  config.relations = [r for r in config.relations if r["name"] not in dropped]
  config.data.files = [f for f in config.data.files if f["relation_name"] not in dropped]
  used = {t for r in config.relations for t in (r["source"], r["target"])}
  for name in [t for t in config.entities.keys() if t not in used]:
    del config.entities[name]
  config.name = config.name + suffix
  config_lib.validate(config)
  return config


def ciao_config_without_category(spec: str = "configs/ciao.py", overrides=()):
  """configs/ciao.py without in_category (and the category type): the product
  category must not be an input of the embeddings that predict it."""
  config = config_without_relations(spec, ["in_category"], overrides, suffix="")
  config.name = config.name.replace("ciao", "ciao-nocat")
  return config


def _no_category_relation(embeddings, run_dir: str | None) -> None:
  if run_dir and os.path.exists(os.path.join(run_dir, rundir.GRAPH_DIR, "manifest.json")):
    graph = rundir.open_graph(run_dir)
    if "in_category" in graph.relation_index:
      raise ValueError(f"{run_dir}: the run was trained with the in_category relation, so its "
                       "product vectors encode the label; use ciao_config_without_category()")
  if "category" in embeddings.tables and run_dir is None:
    raise ValueError(f"{embeddings.origin}: has category embeddings; the product vectors may "
                     "encode the label (train without in_category)")


def ciao_category(source, *, feature_set: str = "P", data_dir: str | None = None,
                  run_dir: str | None = None, seed: int = 0,
                  train_config: TrainConfig = TrainConfig(), use_pq: bool = True,
                  progress: bool = False) -> dict:
  """Product category classification (see the module doc); returns metrics."""
  _check_feature_set(feature_set, CATEGORY_FEATURE_SETS, "ciao_category")
  embeddings = load_embeddings(source, ["product"])
  run_dir = run_dir or (source if isinstance(source, str) and
                        os.path.isdir(os.path.join(source, rundir.GRAPH_DIR)) else None)
  _no_category_relation(embeddings, run_dir)
  ratings = ciao_ratings(data_dir)
  # A product's category: the most frequent among its rating rows (they agree
  # in Ciao); dense features: log rating count, mean stars and helpfulness.
  products, label, classes, dense = _labels_per_entity(ratings[:, 1], ratings[:, 2],
                                                       ratings[:, 3:5])
  return _classify_entities("ciao_category", embeddings, "product", [str(p) for p in products],
                            label, len(classes), dense, feature_set=feature_set, seed=seed,
                            train_config=train_config, use_pq=use_pq, progress=progress)


def _labels_per_entity(entity_of_row: np.ndarray, label_of_row: np.ndarray,
                       values: np.ndarray):
  """Rows (entity, label, numeric values [N, F]) -> (entities [E] sorted,
  label index [E], classes [C], dense [E, 1 + F]): each entity's most
  frequent label (ties: the smallest class), log(1 + its row count) and the
  mean of each value column over its rows."""
  entities, entity_index = np.unique(entity_of_row, return_inverse=True)
  classes, class_index = np.unique(label_of_row, return_inverse=True)
  counts = np.bincount(entity_index).astype(np.float64)
  pair_counts = np.bincount(entity_index * len(classes) + class_index,
                            minlength=len(entities) * len(classes))
  label = pair_counts.reshape(len(entities), len(classes)).argmax(axis=1)
  means = [np.bincount(entity_index, weights=values[:, j]) / counts
           for j in range(values.shape[1])]
  return entities, label, classes, np.stack([np.log1p(counts), *means], axis=1)


def _classify_entities(task: str, embeddings, entity_type: str, names: list[str],
                       label: np.ndarray, num_classes: int, dense: np.ndarray, *,
                       feature_set: str, seed: int, train_config: TrainConfig,
                       use_pq: bool, progress: bool) -> dict:
  """One label per entity from its dense features, plus its embedding unless
  ``feature_set`` is "none": the entities with a vector, split 60/20/20, an MLP with
  softmax over ``num_classes``; accuracy and macro ROC-AUC on test."""
  rows = embeddings.rows(entity_type, names)
  keep = np.flatnonzero(rows >= 0)  # entities the embedding run knows
  if len(keep) == 0:
    raise ValueError(f"{embeddings.origin}: no {entity_type} of the labels has a vector")
  dense, label, rows = dense[keep], label[keep], rows[keep].astype(np.int32)
  train_rows, valid_rows, test_rows = _split(len(keep), seed)
  started = time.perf_counter()
  id_features = [IdFeature(entity_type, entity_type)] if feature_set != "none" else []
  examples = Examples(_standardise(dense, train_rows), {entity_type: rows}, label)
  model = build_model(embeddings, dense.shape[1], id_features, (), num_outputs=num_classes,
                      use_pq=use_pq, seed=seed)
  info = train_model(model, examples.take(train_rows), examples.take(valid_rows), train_config,
                     progress=progress)
  probabilities = predict(model, examples.take(test_rows))
  return {"task": task, "feature_set": feature_set,
          **metrics_lib.multiclass_metrics(label[test_rows], probabilities),
          "train_examples": int(len(train_rows)), "best_epoch": info["best_epoch"],
          "seconds": time.perf_counter() - started,
          "pq": [entity_type] if use_pq and entity_type in embeddings.pq and id_features else []}


# --------------------------------------------------------------------------
# Any labelled entity type (``--task entity_category`` of tools/downstream_eval.py).

#: Feature sets of entity_category: the dense features alone, or with the
#: labelled entity's own embedding ("E").
ENTITY_FEATURE_SETS = ("none", "E")


def read_entity_labels(path: str, *, name_column: int, label_column: int,
                       feature_columns=(), delimiter: str = "\t", header: bool = False):
  """A table of rows that each name an entity and its label (plain or .gz),
  one entity per row or many (Ciao's ratings name a product's category on
  every rating). Returns (names [E] sorted, label index [E], classes [C],
  dense [E, 1 + F]): an entity's label is the most frequent among its rows
  (ties: the smallest class), its dense features log(1 + row count) and the
  mean of each numeric ``feature_columns``. Errors name the file and line."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: label file not found")
  columns = (name_column, label_column, *feature_columns)
  names, labels, values = [], [], []
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt", encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if (header and number == 1) or not line.strip():
        continue
      fields = line.rstrip("\r\n").split(delimiter)
      if len(fields) <= max(columns):
        raise ValueError(f"{path}:{number}: {len(fields)} field(s), column {max(columns)} "
                         "needed (0-based)")
      try:
        values.append([float(fields[c]) for c in feature_columns])
      except ValueError:
        raise ValueError(f"{path}:{number}: a feature column is not a number: "
                         f"{[fields[c] for c in feature_columns]}") from None
      names.append(fields[name_column])
      labels.append(fields[label_column])
  if not names:
    raise ValueError(f"{path}: no labelled rows")
  unique_names, label, classes, dense = _labels_per_entity(
      np.asarray(names), np.asarray(labels),
      np.asarray(values, np.float64).reshape(len(names), len(feature_columns)))
  return [str(n) for n in unique_names], label, [str(c) for c in classes], dense


def entity_category(source, *, entity_type: str, labels_path: str, name_column: int = 0,
                    label_column: int = 1, feature_columns=(), delimiter: str = "\t",
                    header: bool = False, feature_set: str = "E", seed: int = 0,
                    train_config: TrainConfig = TrainConfig(), use_pq: bool = True,
                    progress: bool = False, run_dir: str | None = None) -> dict:
  """Classification of any entity type from a label file (read_entity_labels):
  the dense features alone ("none") or with the entity's embedding ("E").
  The embedding run must not have been trained on a relation that encodes
  the label (``config_without_relations``)."""
  del run_dir  # the tools pass it to every task; the labels live in their own file
  _check_feature_set(feature_set, ENTITY_FEATURE_SETS, "entity_category")
  embeddings = load_embeddings(source, [entity_type])
  names, label, classes, dense = read_entity_labels(
      labels_path, name_column=name_column, label_column=label_column,
      feature_columns=feature_columns, delimiter=delimiter, header=header)
  result = _classify_entities("entity_category", embeddings, entity_type, names, label,
                              len(classes), dense, feature_set=feature_set, seed=seed,
                              train_config=train_config, use_pq=use_pq, progress=progress)
  return dict(result, entity_type=entity_type, labels=os.path.basename(labels_path),
              classes=len(classes))


def _rated_edges(graph: Graph, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(user local ids, product local ids, stars) of a split's rated_k edges."""
  edges = graph.split_edges(split)
  stars_of_relation = np.zeros(len(graph.relations), np.int64)
  for index, relation in enumerate(graph.relations):
    if relation.name.startswith("rated_"):
      stars_of_relation[index] = int(relation.name.split("_")[1])
  stars = stars_of_relation[edges["rel"]]
  keep = stars > 0
  return edges["src"][keep], edges["dst"][keep], stars[keep]


def ciao_rating(source, *, feature_set: str = "U+P", run_dir: str | None = None,
                seed: int = 0, train_config: TrainConfig = TrainConfig(), use_pq: bool = True,
                progress: bool = False) -> dict:
  """rating >= 4 of the run's held-out (user, product) pairs (see the module doc).

  ``run_dir``: the Ciao embedding run whose held-out rated_k edges are the
  examples (default: ``source`` when it is a run directory).
  """
  _check_feature_set(feature_set, RATING_FEATURE_SETS, "ciao_rating")
  run_dir = run_dir or (source if isinstance(source, str) else None)
  manifest = os.path.join(run_dir, rundir.GRAPH_DIR, "manifest.json") if run_dir else ""
  if not manifest or not os.path.exists(manifest):
    raise FileNotFoundError(f"{run_dir}: ciao_rating needs the Ciao embedding run directory "
                            "(its held-out ratings are the examples); pass run_dir=")
  graph = rundir.open_graph(run_dir)
  if "user" not in graph.entities or "product" not in graph.entities:
    raise ValueError(f"{run_dir}: not a Ciao run (entity types {sorted(graph.entities)})")
  types = {"none": [], "U": ["user"], "P": ["product"], "U+P": ["user", "product"]}[feature_set]
  embeddings = load_embeddings(source if types else run_dir, types or ["user"])
  # Baseline features from the train edges only (no held-out rating leaks into them).
  train_users, train_products, train_stars = _rated_edges(graph, "train")

  def count_and_mean(ids, size):
    count = np.bincount(ids, minlength=size).astype(np.float64)
    total = np.bincount(ids, weights=train_stars, minlength=size)
    mean = np.where(count > 0, total / np.maximum(count, 1), train_stars.mean())
    return np.log1p(count), mean

  user_count, user_mean = count_and_mean(train_users, graph.entities["user"].count)
  product_count, product_mean = count_and_mean(train_products, graph.entities["product"].count)
  held = [_rated_edges(graph, split) for split in ("valid", "test")]
  users = np.concatenate([h[0] for h in held])
  products = np.concatenate([h[1] for h in held])
  stars = np.concatenate([h[2] for h in held])
  if len(users) == 0:
    raise ValueError(f"{run_dir}: the run holds out no ratings (data.valid/test_fraction = 0)")
  labels = (stars >= 4).astype(np.int32)
  dense = np.stack([user_count[users], user_mean[users], product_count[products],
                    product_mean[products]], axis=1)
  # Names of the held-out examples' entities only, from the on-disk vocabulary.
  ids = {"user": embeddings.rows("user", graph.names_of("user", users)).astype(np.int32)
         if "user" in types else np.zeros(len(users), np.int32),
         "product": embeddings.rows("product", graph.names_of("product", products)).astype(
             np.int32) if "product" in types else np.zeros(len(users), np.int32)}
  id_features = [IdFeature(t, t) for t in types]
  return _run_binary("ciao_rating", feature_set, embeddings, dense, ids, id_features, (), labels,
                     _split(len(labels), seed), users, train_config, use_pq, progress)


# --------------------------------------------------------------------------
# Last.fm.


@functools.lru_cache(maxsize=4)
def lastfm_friend_split(data_dir: str | None = None, holdout_fraction: float = 0.2,
                        seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Undirected friendships (a < b) of user_friends.dat: (kept [n, 2], held out [m, 2])."""
  path = os.path.join(_data_dir(data_dir), LASTFM, "user_friends.dat")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: Last.fm friends not found")
  pairs = np.loadtxt(path, dtype=np.int64, delimiter="\t", skiprows=1).reshape(-1, 2)
  pairs = np.unique(np.sort(pairs, axis=1), axis=0)  # each friendship once
  pairs = pairs[pairs[:, 0] != pairs[:, 1]]
  order = np.random.default_rng([seed, 0xF41E]).permutation(len(pairs))
  held = int(round(holdout_fraction * len(pairs)))
  return pairs[np.sort(order[held:])], pairs[np.sort(order[:held])]


def write_lastfm_train_friends(path: str, data_dir: str | None = None,
                               holdout_fraction: float = 0.2, seed: int = 0) -> str:
  """Writes the kept friendships in both directions, in user_friends.dat's format
  (header, tab-separated), for the embedding run of ``lastfm_friends``."""
  kept, _ = lastfm_friend_split(data_dir, holdout_fraction, seed)
  both = np.concatenate([kept, kept[:, ::-1]])
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write("userID\tfriendID\n")
    f.writelines(f"{a}\t{b}\n" for a, b in both)
  os.replace(tmp, path)
  return path


def lastfm_config_with_held_out_friends(friends_path: str, spec: str = "configs/lastfm.py",
                                        overrides=()):
  """configs/lastfm.py reading its friend edges from ``friends_path``."""
  config = config_lib.load_config(spec, list(overrides))
  files = [dict(f) for f in config.data.files]
  for f in files:
    if f["relation_name"] == "friend":
      f["path"] = os.path.abspath(friends_path)
  config.data.files = files
  config.name = config.name.replace("lastfm", "lastfm-heldout")
  config_lib.validate(config)
  return config


def _check_no_leak(run_dir: str, held: np.ndarray) -> None:
  graph = rundir.open_graph(run_dir)
  if "friend" not in graph.relation_index:
    raise ValueError(f"{run_dir}: no friend relation; not a Last.fm run")
  friend = graph.relation_index["friend"]
  seen = []
  for split in ("train", "valid", "test"):
    edges = graph.split_edges(split)
    mask = edges["rel"] == friend
    # The friendship ends' names, read from the on-disk vocabulary.
    seen.append(np.stack([graph.names_of("user", edges["src"][mask]),
                          graph.names_of("user", edges["dst"][mask])], axis=1))
  seen = np.concatenate(seen).astype(np.int64)
  seen = {(min(a, b), max(a, b)) for a, b in seen}
  leaked = sum((int(a), int(b)) in seen for a, b in held)
  if leaked:
    raise ValueError(f"{run_dir}: the embedding run saw {leaked} of the {len(held)} held-out "
                     "friendships; train it on write_lastfm_train_friends() output")


def lastfm_friends(source, *, feature_set: str = "U", run_dir: str | None = None,
                   data_dir: str | None = None, holdout_fraction: float = 0.2,
                   negatives: int = 4, seed: int = 0, train_config: TrainConfig = TrainConfig(),
                   use_pq: bool = True, progress: bool = False) -> dict:
  """Held-out friendship prediction (see the module doc); returns metrics."""
  _check_feature_set(feature_set, FRIEND_FEATURE_SETS, "lastfm_friends")
  run_dir = run_dir or (source if isinstance(source, str) else None)
  if run_dir is not None and os.path.exists(
      os.path.join(run_dir, rundir.GRAPH_DIR, "manifest.json")):
    _check_no_leak(run_dir, lastfm_friend_split(data_dir, holdout_fraction, seed)[1])
  embeddings = load_embeddings(source, ["user"])
  kept, held = lastfm_friend_split(data_dir, holdout_fraction, seed)
  everyone = np.unique(np.concatenate([kept.ravel(), held.ravel()]))
  known = {(int(a), int(b)) for a, b in np.concatenate([kept, held])}
  neighbours: dict[int, set] = {}
  for a, b in kept:
    neighbours.setdefault(int(a), set()).add(int(b))
    neighbours.setdefault(int(b), set()).add(int(a))
  rng = np.random.default_rng([seed, 0xAB])
  flip = rng.random(len(held)) < 0.5  # random orientation of each held-out pair
  first = np.where(flip, held[:, 1], held[:, 0])
  second = np.where(flip, held[:, 0], held[:, 1])
  rows_a, rows_b, labels = list(first), list(second), [1] * len(held)
  for a in first:
    drawn = 0
    while drawn < negatives:
      c = int(everyone[rng.integers(len(everyone))])
      if c != a and (min(a, c), max(a, c)) not in known:
        rows_a.append(int(a))
        rows_b.append(c)
        labels.append(0)
        drawn += 1
  a_ids, b_ids, labels = np.array(rows_a), np.array(rows_b), np.array(labels)
  degree = {u: len(v) for u, v in neighbours.items()}
  common = np.array([len(neighbours.get(int(a), set()) & neighbours.get(int(b), set()))
                     for a, b in zip(a_ids, b_ids)])
  dense = np.stack([np.log1p([degree.get(int(a), 0) for a in a_ids]),
                    np.log1p([degree.get(int(b), 0) for b in b_ids]), np.log1p(common)], axis=1)
  ids = {"user_a": embeddings.rows("user", [str(a) for a in a_ids]).astype(np.int32),
         "user_b": embeddings.rows("user", [str(b) for b in b_ids]).astype(np.int32)}
  id_features, products = [], []
  if feature_set == "U":
    id_features = [IdFeature("user_a", "user"), IdFeature("user_b", "user")]
    products = [("user_a", "user_b")]
  return _run_binary("lastfm_friends", feature_set, embeddings, dense, ids, id_features, products,
                     labels, _split(len(labels), seed, groups=a_ids), a_ids, train_config, use_pq,
                     progress)
