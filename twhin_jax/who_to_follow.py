"""Who-to-follow candidate generation, the paper's Table 1, on public graphs.

Three methods rank every user as a candidate followee of each evaluated user
(the user itself and its known follows excluded):

  twhin_follow  TwHIN-Follow (Section 4.3): TwHIN trained on the follow
                relation plus the dataset's low-coverage relations, never a
                second high-coverage relation (the paper keeps user-tweet
                engagement in its own network to avoid cross-type
                interference). Query op_follow(theta_u) against the user
                table, exact and through a ScaNN index.
  cosine        cos(A_u, A_v) between rows of the training follow adjacency
                A (user-based collaborative filtering). Exact only: the
                vectors are sparse and as wide as the user count.
  skipgram      word2vec SkipGram with negative sampling (gensim) on each
                user's follow sequence; a user's query is the mean of its
                followees' input vectors, scored by inner product against
                every account's output vector (``skipgram_queries``), exact
                and through ScaNN.

Splits. Test and validation shares of the follows are held out separately
(``split_follows``): hyper-parameters are chosen on validation with the
training follows only; the reported numbers come from models trained on
train + validation and scored on test, with train + validation follows
excluded from the candidates.

Metrics, micro-averaged over held-out edges (u, v): Recall@10 = share of
held-out v in u's top 10; MRR = mean of 1/rank of v in u's filtered
ranking, ranks beyond ``depth`` (100) counting 0 (MRR@100).
"""

from __future__ import annotations

import copy
import dataclasses
import gzip
import hashlib
import json
import os
import tempfile
import time
from typing import Callable, Sequence

import numpy as np

from twhin_jax import config as config_lib
from twhin_jax import recipes
from twhin_jax import rundir
from twhin_jax import shipped_configs


@dataclasses.dataclass(frozen=True)
class Dataset:
  """What the experiment needs to know of a dataset config."""
  name: str
  config: str  # a shipped config name or a path to a config file
  follow: str  # the follow relation (user -> user)
  user_type: str = "user"
  low_coverage: tuple[str, ...] = ()  # relations co-embedded in TwHIN-Follow
  folder: str = ""  # under $TWHIN_DATA_DIR, for a clear "not found"


#: Every relation of these two configs covers (nearly) every user: Last.fm's
#: 1,892 users all listen and tag; Flickr's interactions cover 8,252 of its
#: 8,358 users. They are high-coverage, so TwHIN-Follow is the follow
#: relation alone (Section 4.3), not follow + engagement.
DATASETS = {
    "lastfm": Dataset("lastfm", "lastfm", "friend", folder="social/hetrec2011-lastfm-2k"),
    "flickr": Dataset("flickr", "flickr", "follows", folder="social/diffnet-flickr"),
}


# ---------------------------------------------------------------------------
# Holdout (pure).


def read_pairs(path: str, header: bool, source: int = 0, target: int = 1) -> list[tuple[str, str]]:
  """(source name, target name) per line of a TSV file (plain or .gz)."""
  opener = gzip.open if path.endswith(".gz") else open
  pairs = []
  with opener(path, "rt", encoding="utf-8") as f:
    if header:
      next(f, None)
    for number, line in enumerate(f, 2 if header else 1):
      fields = line.rstrip("\r\n").split("\t")
      if len(fields) <= max(source, target):
        if line.strip():
          raise ValueError(f"{path}:{number}: expected at least {max(source, target) + 1} "
                           f"tab-separated fields, got {len(fields)}")
        continue
      pairs.append((fields[source], fields[target]))
  return pairs


def holdout_follows(pairs, fraction: float = 0.1, seed: int = 0, min_follows: int = 2):
  """Splits directed follow pairs into (train, held_out) lists of (u, v).

  Distinct pairs only, self-loops dropped. Users with at least ``min_follows``
  follows get a quota of max(1, round(fraction * degree)); edges are visited
  in a seeded random order and an edge u -> v is held out while u is under
  its quota and removing it (and v -> u, if present) leaves both u and v at
  least one training follow. The reverse v -> u of a held-out pair is always
  removed from train too, and counts as held out (a held-out edge of v, and
  toward v's quota).
  """
  unique = sorted({(u, v) for u, v in pairs if u != v})
  present = set(unique)
  out_degree: dict[str, int] = {}
  for u, _ in unique:
    out_degree[u] = out_degree.get(u, 0) + 1
  quota = {u: max(1, int(round(fraction * d))) for u, d in out_degree.items()
           if d >= min_follows}
  remaining = dict(out_degree)
  taken: dict[str, int] = {}
  held: set[tuple[str, str]] = set()
  rng = np.random.default_rng(seed)
  for index in rng.permutation(len(unique)):
    u, v = unique[index]
    if (u, v) in held or u not in quota or taken.get(u, 0) >= quota[u]:
      continue
    reverse = (v, u) in present and (v, u) not in held
    if remaining[u] <= 1 or (reverse and remaining[v] <= 1):
      continue
    held.add((u, v))
    remaining[u] -= 1
    taken[u] = taken.get(u, 0) + 1
    if reverse:  # counts toward v's quota too: each user loses ~fraction of its follows
      held.add((v, u))
      remaining[v] -= 1
      taken[v] = taken.get(v, 0) + 1
  train = [p for p in unique if p not in held]
  return train, sorted(held)


def split_follows(pairs, valid_fraction: float = 0.1, test_fraction: float = 0.1,
                  seed: int = 0):
  """(train, valid, test) follow pairs: ``test_fraction`` of each user's follows
  held out first, then ``valid_fraction`` (of the original degree) of what
  is left, each by ``holdout_follows`` (reverse edges go with their pair)."""
  if not 0 < valid_fraction < 1 or not 0 < test_fraction < 1 or \
      valid_fraction + test_fraction >= 1:
    raise ValueError(f"valid_fraction {valid_fraction} and test_fraction {test_fraction} must "
                     "be in (0, 1) with a sum below 1")
  rest, test = holdout_follows(pairs, test_fraction, seed)
  train, valid = holdout_follows(rest, valid_fraction / (1 - test_fraction), seed + 7919)
  return train, valid, test


# ---------------------------------------------------------------------------
# Ranking and metrics (pure).


def filtered_top(ids: np.ndarray, excluded: set, depth: int) -> list[int]:
  """The first ``depth`` ids of a ranked row that are not excluded."""
  out = []
  for i in ids:
    i = int(i)
    if i not in excluded:
      out.append(i)
      if len(out) == depth:
        break
  return out


def rank_metrics(rankings: dict, held_out: dict, k: int = 10) -> dict:
  """Recall@k and MRR over held-out edges.

  rankings: user -> filtered ranked candidate list (truncated at some depth);
  held_out: user -> set of held-out followees. A followee missing from the
  list counts as a miss (reciprocal rank 0).
  """
  hits = reciprocal = 0.0
  edges = 0
  for user, targets in held_out.items():
    ranking = rankings.get(user, [])
    position = {c: r for r, c in enumerate(ranking)}
    for target in targets:
      edges += 1
      rank = position.get(target)
      if rank is not None:
        reciprocal += 1.0 / (rank + 1)
        hits += rank < k
  return {f"recall_at_{k}": hits / max(edges, 1), "mrr": reciprocal / max(edges, 1),
          "heldout_edges": edges, "users": len(held_out)}


def follow_matrix(train_pairs, index: dict[str, int]):
  """Sparse [U, U] 0/1 adjacency (scipy CSR) of the training follows."""
  import scipy.sparse as sp  # lazy: only the cosine baseline needs scipy (slow to import)
  rows = np.array([index[u] for u, _ in train_pairs], np.int64)
  cols = np.array([index[v] for _, v in train_pairs], np.int64)
  n = len(index)
  matrix = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(n, n))
  matrix.sum_duplicates()
  matrix.data[:] = 1.0
  return matrix


def cosine_rankings(adjacency, users, depth: int, block: int = 1024,
                    excluded: dict | None = None) -> dict[int, list[int]]:
  """User-based CF: candidates v of u by cos(A_u, A_v) (rows of the follow
  adjacency), excluding u, u's follows in A and ``excluded[u]``; ties go to
  the lower index. Returns user -> the first ``depth`` candidates."""
  import scipy.sparse as sp  # lazy: only the cosine baseline needs scipy (slow to import)
  norms = np.sqrt(np.asarray(adjacency.multiply(adjacency).sum(axis=1)).ravel())  # [U]
  inverse = np.where(norms > 0, 1.0 / np.maximum(norms, 1e-12), 0.0).astype(np.float32)
  normalized = sp.diags(inverse) @ adjacency  # [U, U], unit rows
  users = np.asarray(users, np.int64)
  n = adjacency.shape[0]
  out = {}
  for start in range(0, len(users), block):
    part = users[start:start + block]
    scores = np.asarray((normalized[part] @ normalized.T).todense(), np.float64)  # [B, U]
    for row, user in enumerate(part):
      scores[row, user] = -np.inf
      scores[row, adjacency.indices[adjacency.indptr[user]:adjacency.indptr[user + 1]]] = -np.inf
      if excluded and int(user) in excluded:
        scores[row, list(excluded[int(user)])] = -np.inf
      order = np.lexsort((np.arange(n), -scores[row]))  # score desc, index asc
      keep = order[np.isfinite(scores[row, order])][:depth]
      out[int(user)] = keep.tolist()
  return out


# ---------------------------------------------------------------------------
# SkipGram (word2vec on follow sequences).


def follow_sequences(follows: dict[int, Sequence[int]], seed: int) -> list[list[str]]:
  """One "sentence" per user: its followees as tokens. Neither public graph
  has follow timestamps, so each sequence is in a seeded random order (the
  file order is by id, which would put similar ids side by side)."""
  rng = np.random.default_rng([seed, 0x5EC])
  out = []
  for user in sorted(follows):
    followees = np.array(sorted(follows[user]), np.int64)
    if len(followees):
      out.append([str(v) for v in followees[rng.permutation(len(followees))]])
  return out


@dataclasses.dataclass(frozen=True)
class SkipGramSettings:
  dim: int = 100
  window: int = 5
  epochs: int = 5
  negative: int = 5
  alpha: float = 0.025  # gensim's default initial learning rate


def train_skipgram(follows: dict[int, Sequence[int]], num_users: int,
                   settings: SkipGramSettings, seed: int):
  """(input vectors [U, d], output vectors [U, d], has_vector [U] bool) of
  gensim SkipGram with negative sampling trained on ``follow_sequences``.
  One worker thread, so a seed gives one result."""
  from gensim.models import Word2Vec  # optional extra "claims"
  sentences = follow_sequences(follows, seed)
  model = Word2Vec(sentences, vector_size=settings.dim, window=settings.window, min_count=1,
                   sg=1, hs=0, negative=settings.negative, alpha=settings.alpha,
                   epochs=settings.epochs, sample=0, workers=1, seed=seed + 1)
  inputs = np.zeros((num_users, settings.dim), np.float32)
  outputs = np.zeros((num_users, settings.dim), np.float32)
  present = np.zeros(num_users, bool)
  for token, row in model.wv.key_to_index.items():
    inputs[int(token)] = model.wv.vectors[row]
    outputs[int(token)] = model.syn1neg[row]
    present[int(token)] = True
  return inputs, outputs, present


def skipgram_queries(inputs: np.ndarray, follows: dict[int, Sequence[int]],
                     users: Sequence[int]) -> np.ndarray:
  """Query of each user: the mean of its followees' input vectors [Q, d].

  Scored against output vectors by inner product, this is SkipGram's own
  logit for "w appears in the same follow list as v", averaged over u's
  followees v: mean_v <in_v, out_w> = <mean_v in_v, out_w>. (Cosine between
  input vectors, a second-order similarity, recalled 3-6x less on Last.fm's
  validation share.)"""
  out = np.zeros((len(users), inputs.shape[1]), np.float32)
  for row, user in enumerate(users):
    followees = list(follows.get(int(user), ()))
    if followees:
      out[row] = inputs[followees].mean(axis=0)
  return out


def vector_rankings(table: np.ndarray, present: np.ndarray, queries: np.ndarray,
                    users: Sequence[int], excluded: dict[int, set], depth: int,
                    exact: bool) -> dict[int, list[int]]:
  """Filtered top-``depth`` rows of ``table`` (those with ``present``) by inner
  product with each query, exact or through a ScaNN index (the retrieval
  library's settings for the table size, built even for small tables)."""
  from twhin_jax import retrieval  # lazy: jax (the report imports this module into the jax-free cli)
  rows = np.flatnonzero(present)
  candidates = np.ascontiguousarray(table[rows], np.float32)
  largest = max((len(excluded.get(int(u), ())) for u in users), default=0)
  k = min(depth + largest + 1, len(rows))
  if exact:
    ids, _ = retrieval.exact_search(candidates, queries, k, "dot")
  else:
    settings = retrieval.choose_settings(len(rows), candidates.shape[1], "dot")
    searcher = retrieval.build_scann(candidates, settings, k)
    ids, _ = retrieval.scann_search(searcher, queries, k, settings)
  out = {}
  for user, row in zip(users, ids):
    ranked = rows[row[row >= 0]]
    out[int(user)] = filtered_top(ranked, excluded.get(int(user), set()) | {int(user)}, depth)
  return out


# ---------------------------------------------------------------------------
# TwHIN-Follow.


def write_pairs(path: str, pairs) -> None:
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(f"{u}\t{v}\n" for u, v in pairs)


def follow_specs(config, follow: str) -> list[dict]:
  specs = [s for s in config.data.files
           if s.get("relation") is None and s.get("relation_name") == follow]
  if not specs:
    raise ValueError(f"config has no file of relation {follow!r}")
  return specs


def network_config(config, follow: str, train_path: str, *, keep: Sequence[str] = (),
                   epochs: int, dim: int, lr: float | None, seed: int = 0):
  """A copy of ``config`` for one network: the follow relation, read from
  ``train_path`` (the training copy of the follows), plus the relations in
  ``keep`` (their train files); no valid/test split, no per-epoch eval."""
  config = copy.deepcopy(config)
  names = {r["name"] for r in config.relations}
  unknown = [k for k in keep if k not in names]
  if unknown:
    raise ValueError(f"unknown relation(s) {unknown}; the config has {sorted(names)}")
  kept = {follow, *keep}
  config.relations = [dict(r) for r in config.relations if r["name"] in kept]
  files = []
  for spec in config.data.files:
    spec = dict(spec)
    if spec.get("split", "train") != "train":
      continue  # evaluation happens here, not through the run's splits
    if spec.get("relation") is None and spec.get("relation_name") == follow:
      if any(f.get("relation_name") == follow for f in files):
        continue
      spec.update(path=train_path, header=False, format="tsv", source=0, target=1)
    elif spec.get("relation_name") not in kept:
      continue
    files.append(spec)
  config.data.files = files
  config_lib.for_external_evaluation(config, dim=dim, epochs=epochs, seed=seed)
  if lr is not None:
    config.train.lr = float(lr)
  return config


def embedding_rankings(retriever, follow: str, user_type: str, query_users: list[str],
                       index: dict[str, int], excluded: dict[int, set], depth: int,
                       exact: bool, batch: int = 512) -> dict[int, list[int]]:
  """Filtered top-``depth`` candidates (common user indices) of each user by
  the model's follow score, through ScaNN or the exact path."""
  names = retriever.names(user_type)
  # retriever row -> common index, from the common users' names looked up in
  # the on-disk vocabulary (no pass over every name of the type)
  to_common = np.full(len(names), -1, np.int64)
  common_names = list(index)
  rows = names.ids(common_names, missing=-1)
  found = rows >= 0
  to_common[rows[found]] = np.fromiter((index[n] for n in common_names), np.int64,
                                       count=len(common_names))[found]
  known = [u for u in query_users if _has(retriever, user_type, u)]
  out: dict[int, list[int]] = {}
  known.sort(key=lambda u: len(excluded.get(index[u], ())))
  for start in range(0, len(known), batch):
    part = known[start:start + batch]
    skip = [excluded.get(index[u], set()) | {index[u]} for u in part]
    k = min(depth + max(len(e) for e in skip), len(names))
    queries = retriever.query_vectors(follow, part, direction="forward")
    ids, _ = retriever.search(user_type, queries, k, exact=exact)  # [B, k]
    for user, row, user_skip in zip(part, ids, skip):
      # Rows outside the follow graph keep their place as (unhittable)
      # candidates: -1 - row keeps them distinct.
      common = to_common[row]
      ranked = np.where(common >= 0, common, -1 - row)
      out[index[user]] = filtered_top(ranked, user_skip, depth)
  return out


def _has(retriever, entity_type: str, name: str) -> bool:
  try:
    retriever.lookup(entity_type, name)
    return True
  except KeyError:
    return False


# ---------------------------------------------------------------------------
# One split of one dataset.


class Split:
  """Follows of one dataset split three ways, in common user indices."""

  def __init__(self, pairs, valid_fraction: float, test_fraction: float, seed: int):
    self.train, self.valid, self.test = split_follows(pairs, valid_fraction, test_fraction, seed)
    self.users = sorted({u for p in pairs for u in p})
    self.index = {u: i for i, u in enumerate(self.users)}
    self.seed = seed

  def by_user(self, pairs) -> dict[int, set]:
    out: dict[int, set] = {}
    for u, v in pairs:
      out.setdefault(self.index[u], set()).add(self.index[v])
    return out

  def stage(self, stage: str):
    """(training pairs, held-out {user: followees}) of "valid" or "test"."""
    if stage == "valid":
      return self.train, self.by_user(self.valid)
    if stage == "test":
      return sorted(set(self.train) | set(self.valid)), self.by_user(self.test)
    raise ValueError(f"stage must be 'valid' or 'test', got {stage!r}")


def evaluate_cosine(split: Split, stage: str, depth: int = 100) -> dict:
  train, held = split.stage(stage)
  adjacency = follow_matrix(train, split.index)
  return {"exact": rank_metrics(cosine_rankings(adjacency, sorted(held), depth), held)}


def evaluate_skipgram(split: Split, stage: str, settings: SkipGramSettings, seed: int,
                      depth: int = 100, paths=("exact", "scann")) -> dict:
  train, held = split.stage(stage)
  follows = split.by_user(train)
  inputs, outputs, present = train_skipgram(follows, len(split.users), settings, seed)
  users = sorted(held)
  queries = skipgram_queries(inputs, follows, users)
  return {path: rank_metrics(vector_rankings(outputs, present, queries, users, follows, depth,
                                             exact=path == "exact"), held)
          for path in paths}


def evaluate_twhin(split: Split, stage: str, dataset: Dataset, config, workdir: str, *,
                   epochs: int, dim: int, lr: float | None, seed: int, depth: int = 100,
                   paths=("exact", "scann")) -> dict:
  from twhin_jax import retrieval  # lazy: jax (the report imports this module into the jax-free cli)
  from twhin_jax import train as train_lib  # lazy, as retrieval above
  train, held = split.stage(stage)
  os.makedirs(workdir, exist_ok=True)
  train_path = os.path.join(workdir, f"{dataset.follow}.train.tsv")
  write_pairs(train_path, train)
  run_config = network_config(config, dataset.follow, train_path, keep=dataset.low_coverage,
                              epochs=epochs, dim=dim, lr=lr, seed=seed)
  run_dir = os.path.join(workdir, "run")
  train_lib.train(run_config, run_dir, progress=False).close()
  retriever = retrieval.Retriever.open(run_dir, types=(dataset.user_type,), exact_below=0,
                                       progress=False)
  follows = split.by_user(train)
  query_users = [split.users[i] for i in sorted(held)]
  return {path: rank_metrics(embedding_rankings(retriever, dataset.follow, dataset.user_type,
                                                query_users, split.index, follows, depth,
                                                exact=path == "exact"), held)
          for path in paths}


def load_follow_pairs(dataset: Dataset, overrides=()):
  """(config, directed follow pairs) of a dataset."""
  if os.path.exists(dataset.config.partition(":")[0]):
    config = config_lib.load_config(dataset.config, list(overrides))
  else:
    config = shipped_configs.load(dataset.config, overrides)
  pairs = []
  for spec in follow_specs(config, dataset.follow):
    pairs += read_pairs(config_lib.resolve_path(spec["path"]), bool(spec.get("header")),
                        spec["source"], spec["target"])
  return config, pairs


# ---------------------------------------------------------------------------
# The experiment: tune on validation, report test over seeds.


@dataclasses.dataclass
class Grid:
  """Hyper-parameters tried on the validation share (seed of the first split).

  TwHIN's epochs are not a grid of separate runs but the evaluation points of
  one run per learning rate: the run trains to each point in turn (resuming
  its checkpoint, which gives the numbers a fresh run to that epoch would:
  the learning rates do not depend on the epoch count) and is scored on
  validation there. It stops once ``twhin_patience`` points in a row have not
  improved validation R@10 (0: every point is scored), so the epoch count is
  early stopping's, not a number fixed for the datasets measured here."""
  twhin_lr: tuple[float, ...] = (0.01, 0.025, 0.05)
  twhin_epochs: tuple[int, ...] = (10, 20, 40, 80, 160)
  twhin_patience: int = 1
  twhin_dim: int = recipes.DIM
  skipgram_window: tuple[int, ...] = (5, 20)
  skipgram_epochs: tuple[int, ...] = (10, 30)
  skipgram_dim: int = recipes.DIM


def spread(values: Sequence[float]) -> dict:
  """mean, sample standard deviation (ddof=1; 0 for one value), min, max."""
  values = np.asarray(values, np.float64)
  return {"mean": float(values.mean()),
          "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
          "min": float(values.min()), "max": float(values.max())}


def _validation_key(trial: dict) -> tuple:
  """What tuning maximises: validation R@10, then MRR, then fewer epochs
  (ties go to the cheaper setting)."""
  return round(trial["recall_at_10"], 6), round(trial["mrr"], 6), -trial["epochs"]


#: A tuning run's scored validation points, beside its run (a rerun with the
#: same --workdir reads them instead of training past them).
POINTS_FILE = "validation_points.json"


def _scored_points(run_dir: str, settings: dict) -> dict:
  """{epochs: validation metrics} already scored in ``run_dir`` for these
  settings; {} for a new run. A run tuned with other settings, or trained
  past its last scored point, cannot give a point's numbers: that is an
  error naming the directory, never a silent reuse."""
  path = os.path.join(run_dir, POINTS_FILE)
  if not os.path.exists(path):
    if rundir.checkpoint_steps(os.path.join(run_dir, "run")):
      raise ValueError(f"{run_dir}: holds a trained run but no {POINTS_FILE} (stopped "
                       "before its first point was scored, or tuned by older code); "
                       "use a fresh --workdir")
    return {}
  with open(path, encoding="utf-8") as f:
    stored = json.load(f)
  if stored.get("settings") != settings:
    raise ValueError(f"{path}: tuned with {stored.get('settings')}, not {settings}; "
                     "use a fresh --workdir")
  return {int(e): m for e, m in stored["points"].items()}


def _trained_epochs(run_dir: str) -> int:
  """Epochs the tuning run in ``run_dir`` has finished (0 before its first)."""
  run = os.path.join(run_dir, "run")
  if not rundir.checkpoint_steps(run):
    return 0
  return int(rundir.read_meta(rundir.checkpoint_dir(run))["cursor"]["epoch"])


def _split_fingerprint(split: Split) -> str:
  """sha256 of the training and validation follows: which split a run saw."""
  digest = hashlib.sha256()
  for share in (split.train, split.valid):
    digest.update("\n".join(f"{u}\t{v}" for u, v in share).encode("utf-8") + b"\x00")
  return digest.hexdigest()


def tune(dataset: Dataset, config, split: Split, grid: Grid, workdir: str,
         log: Callable[[str], None], depth: int = 100) -> dict:
  """Validation R@10 (exact) of every TwHIN evaluation point reached (Grid)
  and every SkipGram grid point; returns the chosen settings and the table."""
  trials, fingerprint = [], _split_fingerprint(split)
  for lr in grid.twhin_lr:
    run_dir, best, bad_points = os.path.join(workdir, f"tune_lr{lr}"), None, 0
    settings = {"lr": lr, "dim": grid.twhin_dim, "seed": split.seed, "depth": depth,
                "split": fingerprint}
    scored = _scored_points(run_dir, settings)
    started = time.perf_counter()
    for epochs in sorted(set(grid.twhin_epochs)):
      if epochs in scored:
        metrics = scored[epochs]
      else:
        trained = _trained_epochs(run_dir)
        if trained > epochs:
          raise ValueError(f"{run_dir}: trained to epoch {trained}, past the unscored point "
                           f"{epochs}; use a fresh --workdir")
        metrics = evaluate_twhin(split, "valid", dataset, config, run_dir, epochs=epochs,
                                 dim=grid.twhin_dim, lr=lr, seed=split.seed, depth=depth,
                                 paths=("exact",))["exact"]
        scored[epochs] = {"recall_at_10": metrics["recall_at_10"], "mrr": metrics["mrr"]}
        rundir.write_json_atomically(os.path.join(run_dir, POINTS_FILE),
                                     {"settings": settings, "points": scored})
      trial = {"method": "twhin_follow", "lr": lr, "epochs": epochs, "dim": grid.twhin_dim,
               "recall_at_10": metrics["recall_at_10"], "mrr": metrics["mrr"],
               "seconds": round(time.perf_counter() - started, 1)}
      trials.append(trial)
      log(f"{dataset.name} valid twhin_follow lr {lr} epochs {epochs}: "
          f"R@10 {metrics['recall_at_10']:.4f} MRR {metrics['mrr']:.4f}")
      if best is None or _validation_key(trial)[:2] > _validation_key(best)[:2]:
        best, bad_points = trial, 0
      else:
        bad_points += 1
        if grid.twhin_patience and bad_points >= grid.twhin_patience:
          log(f"{dataset.name} valid twhin_follow lr {lr}: stopped at epoch {epochs} "
              f"(best {best['epochs']})")
          break
  for window in grid.skipgram_window:
    for epochs in grid.skipgram_epochs:
      settings = SkipGramSettings(dim=grid.skipgram_dim, window=window, epochs=epochs)
      started = time.perf_counter()
      metrics = evaluate_skipgram(split, "valid", settings, split.seed, depth,
                                  paths=("exact",))["exact"]
      trials.append({"method": "skipgram", "window": window, "epochs": epochs,
                     "dim": grid.skipgram_dim, "recall_at_10": metrics["recall_at_10"],
                     "mrr": metrics["mrr"], "seconds": round(time.perf_counter() - started, 1)})
      log(f"{dataset.name} valid skipgram window {window} epochs {epochs}: "
          f"R@10 {metrics['recall_at_10']:.4f} MRR {metrics['mrr']:.4f}")

  def best_of(method):
    return max((t for t in trials if t["method"] == method), key=_validation_key)

  return {"twhin_follow": best_of("twhin_follow"), "skipgram": best_of("skipgram"),
          "trials": trials}


METHODS = ("twhin_follow", "cosine", "skipgram")
#: Not in Table 1: the follows co-embedded with every other relation of the
#: config (the dense engagements included), which Section 4.3 avoids.
EXTRA_METHODS = ("follow_engagement",)


def run_table1(dataset: Dataset, *, seeds: Sequence[int] = (0, 1, 2), grid: Grid = Grid(),
               valid_fraction: float = 0.1, test_fraction: float = 0.1, depth: int = 100,
               workdir: str | None = None, chosen: dict | None = None,
               methods: Sequence[str] = METHODS,
               log: Callable[[str], None] = lambda m: None) -> dict:
  """Table 1 on one dataset: tuning on seed ``seeds[0]``'s validation share
  (unless ``chosen`` gives the settings), then every method trained on train
  + validation and scored on test for every seed. ``follow_engagement`` uses
  the settings chosen for TwHIN-Follow. Returns {"chosen", "trials", "rows":
  one dict per method with mean and spread}."""
  unknown = [m for m in methods if m not in METHODS + EXTRA_METHODS]
  if unknown:
    raise ValueError(f"unknown method(s) {unknown}; choose from {METHODS + EXTRA_METHODS}")
  config, pairs = load_follow_pairs(dataset)
  with tempfile.TemporaryDirectory(prefix=f"wtf_{dataset.name}_") as scratch:
    work = workdir or scratch
    if chosen is None:
      split = Split(pairs, valid_fraction, test_fraction, seeds[0])
      tuned = tune(dataset, config, split, grid, os.path.join(work, "tune"), log, depth)
    else:
      tuned = {"twhin_follow": chosen["twhin_follow"], "skipgram": chosen["skipgram"],
               "trials": []}
    t, s = tuned["twhin_follow"], tuned["skipgram"]
    per_seed: dict[str, list] = {m: [] for m in methods}
    everything_else = tuple(r["name"] for r in config.relations if r["name"] != dataset.follow)
    test_edges = []
    for seed in seeds:
      split = Split(pairs, valid_fraction, test_fraction, seed)
      test_edges.append(len(split.test))
      started = time.perf_counter()
      if "cosine" in per_seed:
        per_seed["cosine"].append(evaluate_cosine(split, "test", depth))
      if "skipgram" in per_seed:
        per_seed["skipgram"].append(evaluate_skipgram(
            split, "test", SkipGramSettings(dim=s["dim"], window=s["window"],
                                            epochs=s["epochs"]), seed, depth))
      if "twhin_follow" in per_seed:
        per_seed["twhin_follow"].append(evaluate_twhin(
            split, "test", dataset, config, os.path.join(work, f"test_seed{seed}"),
            epochs=t["epochs"], dim=t["dim"], lr=t["lr"], seed=seed, depth=depth))
      if "follow_engagement" in per_seed:
        engaged = dataclasses.replace(dataset, low_coverage=everything_else)
        per_seed["follow_engagement"].append(evaluate_twhin(
            split, "test", engaged, config, os.path.join(work, f"test_seed{seed}_engagement"),
            epochs=t["epochs"], dim=t["dim"], lr=t["lr"], seed=seed, depth=depth))
      log(f"{dataset.name} seed {seed} test ({time.perf_counter() - started:.0f} s): " + "; ".join(
          f"{m} R@10 {r[-1]['exact']['recall_at_10']:.4f} MRR {r[-1]['exact']['mrr']:.4f}"
          for m, r in per_seed.items()))
    base = {"dataset": dataset.name, "follow_relation": dataset.follow,
            "low_coverage_relations": list(dataset.low_coverage), "users": len(split.users),
            "follow_edges": len(set(p for p in pairs if p[0] != p[1])),
            "valid_fraction": valid_fraction, "test_fraction": test_fraction,
            "test_edges": test_edges, "seeds": list(seeds), "depth": depth}
    rows = []
    for method, results in per_seed.items():
      row = dict(base, method=method)
      for path in ("exact", "scann"):
        if path not in results[0]:
          continue
        prefix = "" if path == "exact" else "scann_"
        for metric in ("recall_at_10", "mrr"):
          stats = spread([r[path][metric] for r in results])
          row[prefix + metric] = round(stats["mean"], 4)
          row[prefix + metric + "_std"] = round(stats["std"], 4)
          row[prefix + metric + "_per_seed"] = [round(r[path][metric], 4) for r in results]
      if method == "follow_engagement":
        row["relations"] = [dataset.follow, *everything_else]
      row["settings"] = ({"lr": t["lr"], "epochs": t["epochs"], "dim": t["dim"]}
                         if method in ("twhin_follow", "follow_engagement") else
                         {"window": s["window"], "epochs": s["epochs"], "dim": s["dim"],
                          "negative": SkipGramSettings.negative, "alpha": SkipGramSettings.alpha}
                         if method == "skipgram" else {})
      rows.append(row)
  return {"chosen": {"twhin_follow": t, "skipgram": s}, "trials": tuned["trials"], "rows": rows}


def beats(rows: list[dict], metric: str, method: str = "twhin_follow") -> dict:
  """Per baseline: whether ``method``'s mean exceeds the baseline's by more
  than the larger of the two seed standard deviations."""
  mine = next(r for r in rows if r["method"] == method)
  out = {}
  for other in rows:
    if other["method"] == method or other["method"] in EXTRA_METHODS:
      continue
    margin = mine[metric] - other[metric]
    noise = max(mine.get(metric + "_std", 0.0), other.get(metric + "_std", 0.0))
    out[other["method"]] = {"margin": round(margin, 4), "spread": noise,
                            "above_spread": bool(margin > noise)}
  return out
