"""Who-to-follow evaluation (TwHIN paper, Table 1) on HetRec Last.fm and Flickr.

    .venv/bin/python tools/who_to_follow.py [--datasets lastfm,flickr] [--json]
        [--epochs N] [--dim D] [--lr LR] [--mix-relations] [--holdout 0.1] [--seed 0]

Holdout. For every user with >= 2 follows (distinct out-edges of the follow
relation), ``max(1, round(fraction * degree))`` of them are held out (seeded
greedy pass over a shuffled edge list), never leaving the user or, for the
reverse edge, the followee without a training follow. A held-out pair is
removed in BOTH directions: Last.fm stores each friendship twice and Flickr
has reciprocal links, so keeping v -> u would leak u -> v. Every removed
directed edge that was in the data is a held-out edge to recover.

Methods, each ranking every user as a candidate followee of each evaluated
user, with the user itself and its training follows excluded:

  (a) hetero    TwHIN trained on the dataset config (follow + engagement
                relations) with the follow file replaced by its training copy;
  (b) follow    the same recipe trained on the follow relation alone;
  (c) cosine    cos(A_u, A_v) between rows of the training follow adjacency A
                (followees in common, normalised: user-based CF); ties broken
                by the lower user index. Exact only.

(a) and (b) query the relation-aware vector op_follow(theta_u) against the
user table (``Retriever.query_vectors`` + ``search``), through the ScaNN index
(built even for these small tables: exact_below=0) and through the exact
brute-force path.

Metrics, micro-averaged over held-out edges (u, v): Recall@10 = share of
held-out v found among u's top 10 (after exclusions); MRR = mean of 1/rank of
v in u's filtered ranking, ranks beyond --depth (default 100) counting 0
(MRR@100, the same cut for every method and path).

``--json`` prints one JSON object per (dataset, method, path).
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

#: dataset -> (config file, follow relation, user type, the data folder it needs)
DATASETS = {
    "lastfm": ("configs/lastfm.py", "friend", "user", "social/hetrec2011-lastfm-2k"),
    "flickr": ("configs/flickr.py", "follows", "user", "social/diffnet-flickr"),
}
DEFAULT_DATA_DIR = "/work/shared/data"


# ---------------------------------------------------------------------------
# Holdout (pure).


def read_pairs(path: str, header: bool, source: int = 0, target: int = 1) -> list[tuple[str, str]]:
  """(source name, target name) per line of a TSV file (plain or .gz)."""
  opener = gzip.open if path.endswith(".gz") else open
  pairs = []
  with opener(path, "rt", encoding="utf-8") as f:
    if header:
      next(f, None)
    for line in f:
      fields = line.rstrip("\r\n").split("\t")
      if len(fields) > max(source, target):
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
  import scipy.sparse as sp
  rows = np.array([index[u] for u, _ in train_pairs], np.int64)
  cols = np.array([index[v] for _, v in train_pairs], np.int64)
  n = len(index)
  matrix = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(n, n))
  matrix.sum_duplicates()
  matrix.data[:] = 1.0
  return matrix


def cosine_rankings(adjacency, users, depth: int, block: int = 1024) -> dict[int, list[int]]:
  """User-based CF: candidates v of u by cos(A_u, A_v) (rows of the follow
  adjacency), excluding u and u's training follows; ties to the lower index.

  Returns user -> the first ``depth`` candidates (user indices)."""
  import scipy.sparse as sp
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
      order = np.lexsort((np.arange(n), -scores[row]))  # score desc, index asc
      keep = order[np.isfinite(scores[row, order])][:depth]
      out[int(user)] = keep.tolist()
  return out


# ---------------------------------------------------------------------------
# Configs and training.


def write_pairs(path: str, pairs) -> None:
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(f"{u}\t{v}\n" for u, v in pairs)


def follow_specs(config, follow: str) -> list[dict]:
  specs = [s for s in config.data.files
           if s.get("relation") is None and s.get("relation_name") == follow]
  if not specs:
    raise ValueError(f"config has no file of relation {follow!r}")
  return specs


def holdout_config(config, follow: str, train_path: str, *, follow_only: bool, epochs: int,
                   dim: int, lr: float | None, mix_relations: bool, follow_weight: float = 1.0):
  """A copy of ``config`` that trains on the training follows (plus, unless
  ``follow_only``, the other relations' train files), no valid/test split.
  ``follow_weight`` multiplies the follow relation's loss weight: on these
  graphs engagements outnumber follows 30 to 1, and with equal weights they
  dominate the user rows' updates."""
  config = copy.deepcopy(config)
  config.relations = [dict(r, weight=float(follow_weight) * r.get("weight", 1.0))
                      if r["name"] == follow else dict(r) for r in config.relations]
  follow_type = next(r for r in config.relations if r["name"] == follow)["source"]
  files = []
  for spec in config.data.files:
    spec = dict(spec)
    if spec.get("split", "train") != "train":
      continue  # evaluation happens here, not through the run's splits
    if spec.get("relation") is None and spec.get("relation_name") == follow:
      if any(f.get("relation_name") == follow for f in files):
        continue
      spec.update(path=train_path, header=False, format="tsv", source=0, target=1)
    elif follow_only:
      continue
    files.append(spec)
  config.data.files = files
  if follow_only:
    config.relations = [r for r in config.relations if r["name"] == follow]
    for name in list(config.entities.keys()):
      if name != follow_type:
        del config.entities[name]
  config.data.valid_fraction = 0.0
  config.data.test_fraction = 0.0
  config.train.epochs = epochs
  config.model.dim = dim
  if lr is not None:
    config.train.lr = lr
  config.negatives.mix_relations = bool(mix_relations)
  config.train.eval_every_epochs = 0
  config.train.checkpoint_every_buckets = 0
  return config


def embedding_rankings(retriever, follow: str, user_type: str, query_users: list[str],
                       index: dict[str, int], train_follows: dict[int, set], depth: int,
                       exact: bool, batch: int = 512) -> dict[int, list[int]]:
  """Filtered top-``depth`` candidates (common user indices) of each user by
  the model's follow score, through ScaNN or the exact path."""
  names = retriever.names(user_type)
  to_common = np.array([index.get(n, -1) for n in names], np.int64)  # retriever row -> index
  known = [u for u in query_users if _has(retriever, user_type, u)]
  out: dict[int, list[int]] = {}
  known.sort(key=lambda u: len(train_follows.get(index[u], ())))
  for start in range(0, len(known), batch):
    part = known[start:start + batch]
    excluded = [train_follows.get(index[u], set()) | {index[u]} for u in part]
    k = min(depth + max(len(e) for e in excluded), len(names))
    queries = retriever.query_vectors(follow, part, direction="forward")
    ids, _ = retriever.search(user_type, queries, k, exact=exact)  # [B, k]
    for user, row, skip in zip(part, ids, excluded):
      # Rows outside the follow graph (users seen only in engagements) keep
      # their place as (unhittable) candidates: -1 - row keeps them distinct.
      common = to_common[row]
      ranked = np.where(common >= 0, common, -1 - row)
      out[index[user]] = filtered_top(ranked, skip, depth)
  return out


def _has(retriever, entity_type: str, name: str) -> bool:
  try:
    retriever.lookup(entity_type, name)
    return True
  except KeyError:
    return False


def run_dataset(name: str, data_dir: str, args, emit) -> None:
  from twhin_jax import config as config_lib
  from twhin_jax import retrieval
  from twhin_jax import train as train_lib

  config_file, follow, user_type, folder = DATASETS[name]
  os.environ["TWHIN_DATA_DIR"] = data_dir
  config = config_lib.load_config(os.path.join(ROOT, config_file))
  pairs = []
  for spec in follow_specs(config, follow):
    pairs += read_pairs(config_lib.resolve_path(spec["path"]), bool(spec.get("header")),
                        spec["source"], spec["target"])
  train_pairs, held_pairs = holdout_follows(pairs, args.holdout, args.seed)
  users = sorted({u for p in pairs for u in p})
  index = {u: i for i, u in enumerate(users)}
  held: dict[int, set] = {}
  for u, v in held_pairs:
    held.setdefault(index[u], set()).add(index[v])
  train_follows: dict[int, set] = {}
  for u, v in train_pairs:
    train_follows.setdefault(index[u], set()).add(index[v])
  query_users = [users[i] for i in sorted(held)]
  base = {"dataset": name, "follow_relation": follow, "users": len(users),
          "follow_edges": len(set(pairs)), "train_follows": len(train_pairs),
          "heldout_edges": len(held_pairs), "query_users": len(query_users),
          "holdout": args.holdout, "seed": args.seed, "depth": args.depth}
  if not args.json:
    print(f"\n{name}: {len(users)} users, {len(set(pairs))} follow edges, "
          f"{len(held_pairs)} held out for {len(query_users)} users", file=sys.stderr)

  started = time.perf_counter()
  adjacency = follow_matrix(train_pairs, index)
  rankings = cosine_rankings(adjacency, sorted(held), args.depth)
  metrics = rank_metrics(rankings, held)
  emit(dict(base, method="cosine", path="exact", seconds=round(time.perf_counter() - started, 1),
            **_metric_fields(metrics)))

  with tempfile.TemporaryDirectory(prefix=f"wtf_{name}_") as scratch:
    work = args.workdir or scratch
    os.makedirs(work, exist_ok=True)
    train_path = os.path.join(work, f"{follow}.train.tsv")
    write_pairs(train_path, train_pairs)
    for method, follow_only in (("hetero", False), ("follow_only", True)):
      run_config = holdout_config(config, follow, train_path, follow_only=follow_only,
                                  epochs=args.epochs, dim=args.dim, lr=args.lr,
                                  mix_relations=args.mix_relations,
                                  follow_weight=args.follow_weight if not follow_only else 1.0)
      run_dir = os.path.join(work, method)
      started = time.perf_counter()
      train_lib.train(run_config, run_dir, progress=False).close()
      train_seconds = time.perf_counter() - started
      retriever = retrieval.Retriever.open(run_dir, types=(user_type,), exact_below=0,
                                           progress=False)
      for path, exact in (("scann", False), ("exact", True)):
        started = time.perf_counter()
        rankings = embedding_rankings(retriever, follow, user_type, query_users, index,
                                      train_follows, args.depth, exact)
        metrics = rank_metrics(rankings, held)
        emit(dict(base, method=method, path=path, epochs=args.epochs, dim=args.dim,
                  lr=float(run_config.train.lr), loss=run_config.train.loss,
                  mix_relations=bool(run_config.negatives.mix_relations),
                  follow_weight=args.follow_weight if method == "hetero" else 1.0,
                  relations=[r["name"] for r in run_config.relations],
                  train_seconds=round(train_seconds, 1),
                  backend=retriever.manifests.get(user_type, {}).get("backend"),
                  seconds=round(time.perf_counter() - started, 1), **_metric_fields(metrics)))


def _metric_fields(metrics: dict) -> dict:
  return {"recall_at_10": round(metrics["recall_at_10"], 4), "mrr": round(metrics["mrr"], 4)}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--datasets", default="lastfm,flickr")
  parser.add_argument("--epochs", type=int, default=20)
  parser.add_argument("--dim", type=int, default=100)
  parser.add_argument("--lr", type=float, default=None, help="entity lr (default: config's)")
  parser.add_argument("--mix-relations", action="store_true",
                      help="negatives.mix_relations (PBG dynamic relations)")
  parser.add_argument("--follow-weight", type=float, default=1.0,
                      help="loss weight of the follow relation in the heterogeneous run (a)")
  parser.add_argument("--holdout", type=float, default=0.1, help="share of follows held out")
  parser.add_argument("--depth", type=int, default=100, help="ranks counted by MRR")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--workdir", default=None, help="keep runs here (default: a temp dir)")
  parser.add_argument("--json", action="store_true", help="one JSON object per result")
  args = parser.parse_args(argv)
  data_dir = os.environ.get("TWHIN_DATA_DIR", DEFAULT_DATA_DIR)
  rows = []

  def emit(row):
    rows.append(row)
    if args.json:
      print(json.dumps(row), flush=True)
    else:
      print(f"{row['dataset']:<8} {row['method']:<12} {row['path']:<6} "
            f"recall@10 {row['recall_at_10']:.4f}  MRR {row['mrr']:.4f}", flush=True)

  for name in [d.strip() for d in args.datasets.split(",") if d.strip()]:
    if name not in DATASETS:
      parser.error(f"unknown dataset {name!r}; choose from {sorted(DATASETS)}")
    folder = os.path.join(data_dir, DATASETS[name][3])
    if not os.path.isdir(folder):
      print(f"skipping {name}: {folder} not found (set TWHIN_DATA_DIR)", file=sys.stderr)
      continue
    run_dataset(name, data_dir, args, emit)
  return 0


if __name__ == "__main__":
  sys.exit(main())
