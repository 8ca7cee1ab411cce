"""The low-coverage claim (paper, after Table 2), measured on public graphs.

The paper co-embeds each low-coverage relation (ads, advertisers, apps: few
users take part) with a dense, high-coverage relation (follows), and reports
that embedding the low-coverage relations alone "yielded much lower
improvements, and sometimes even model degradation" (experiment not shown).

The public graphs have no low-coverage relation (every Last.fm user listens;
98.7% of Flickr's users interact with images), so one is made: the
engagement relation (Last.fm ``listened``, Flickr ``interacts``) is kept for
a seeded 10% of its users, the *covered* users, and dropped for the rest.
The covered users' engagements are split 80/10/10 (train / valid / test,
seeded, written to files so both setups see the same split). Two setups
train on the same files:

  alone        the low-coverage relation only;
  co_embedded  the low-coverage relation plus the whole follow relation.

Both are measured for the covered users only (the only users with held-out
engagements):

  link prediction  the run's filtered test MRR and Hits@10 of the
                   low-coverage relation (``Trainer.evaluate("test")``);
  downstream       a held-out engagement classifier from twhin_jax.downstream
                   (model, early-stopped loop and metrics): the covered
                   users' valid + test engagements against 4 random
                   non-engaged items each (same user; items drawn from
                   those the covered users engage with), features "none"
                   (log train degree of the user and of the item) or "U+I"
                   (plus frozen user and item embeddings and their product),
                   examples split 60/20/20 by user; ROC-AUC and RCE (Eq. 4).

The number of epochs of each setup is chosen on the valid share (filtered
validation MRR of the low-coverage relation, evaluated every few epochs of
one long run); every seed then trains that many epochs.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from typing import Callable, Sequence

import numpy as np

from twhin_jax import config as config_lib
from twhin_jax import inspection
from twhin_jax import shipped_configs
from twhin_jax import who_to_follow

SETUPS = ("alone", "co_embedded")


@dataclasses.dataclass(frozen=True)
class Dataset:
  name: str
  config: str  # shipped config name or path
  follow: str  # the dense relation (user -> user)
  relation: str  # the relation made low-coverage (user -> item)
  user_type: str = "user"
  item_type: str = "item"
  folder: str = ""


DATASETS = {
    "lastfm": Dataset("lastfm", "lastfm", "friend", "listened", "user", "artist",
                      "social/hetrec2011-lastfm-2k"),
    "flickr": Dataset("flickr", "flickr", "follows", "interacts", "user", "image",
                      "social/diffnet-flickr"),
}


@dataclasses.dataclass(frozen=True)
class Settings:
  coverage: float = 0.1  # share of the relation's users kept
  dim: int = 64
  max_epochs: int = 40  # the validation run's length
  eval_every: int = 5  # epochs between validation evaluations
  negatives: int = 4  # downstream negatives per positive


# ---------------------------------------------------------------------------
# Pure parts.


def covered_users(users: Sequence[str], coverage: float, seed: int) -> set[str]:
  """A seeded ``coverage`` share (at least one) of the distinct users."""
  if not 0 < coverage <= 1:
    raise ValueError(f"coverage must be in (0, 1], got {coverage}")
  unique = sorted(set(users))
  count = max(1, int(round(coverage * len(unique))))
  order = np.random.default_rng([seed, 0xC0FE]).permutation(len(unique))
  return {unique[i] for i in order[:count]}


def split_edges(edges: Sequence[tuple[str, str]], seed: int, fractions=(0.8, 0.1, 0.1)):
  """Distinct edges split (train, valid, test) by a seeded permutation."""
  unique = sorted(set(edges))
  order = np.random.default_rng([seed, 0x5B1]).permutation(len(unique))
  cut = np.cumsum([int(round(f * len(unique))) for f in fractions[:2]])
  parts = np.split(order, cut)
  return tuple([unique[i] for i in sorted(part)] for part in parts)


def engagement_examples(train, held, items: Sequence[str], negatives: int, seed: int):
  """Downstream examples: every held-out (user, item) as a positive, plus
  ``negatives`` items per positive drawn uniformly from ``items`` that the
  user has no edge with. Returns (users, items, labels [n] int, dense [n, 2]
  = log1p train degree of the user and of the item)."""
  known = set(train) | set(held)
  items = sorted(set(items))
  rng = np.random.default_rng([seed, 0xAB])
  users, targets, labels = [], [], []
  for user, item in sorted(set(held)):
    users.append(user)
    targets.append(item)
    labels.append(1)
    drawn = 0
    while drawn < negatives:
      candidate = items[int(rng.integers(len(items)))]
      if (user, candidate) not in known:
        users.append(user)
        targets.append(candidate)
        labels.append(0)
        drawn += 1
  user_degree: dict[str, int] = {}
  item_degree: dict[str, int] = {}
  for user, item in train:
    user_degree[user] = user_degree.get(user, 0) + 1
    item_degree[item] = item_degree.get(item, 0) + 1
  dense = np.stack([np.log1p([user_degree.get(u, 0) for u in users]),
                    np.log1p([item_degree.get(i, 0) for i in targets])], axis=1)
  return users, targets, np.array(labels, np.int64), dense.astype(np.float32)


def best_epochs(history: list[dict]) -> tuple[int, float]:
  """(epochs, validation MRR) of the best evaluated epoch of a run's history;
  ties go to fewer epochs."""
  evaluated = [(h["epoch"] + 1, h["valid"]["mrr"]) for h in history if "valid" in h]
  if not evaluated:
    raise ValueError("the run has no validation evaluation in its history")
  return max(evaluated, key=lambda e: (round(e[1], 6), -e[0]))


# ---------------------------------------------------------------------------
# Runs.


def write_edges(path: str, edges) -> str:
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(f"{u}\t{v}\n" for u, v in edges)
  return path


def setup_config(config, dataset: Dataset, setup: str, files: dict[str, str], *, dim: int,
                 epochs: int, seed: int, eval_every: int = 0):
  """The run config of one setup: the low-coverage relation from ``files``
  (split -> path), plus, for co_embedded, the follow relation's files (all
  train). The graph is not split further (valid/test come from the files)."""
  if setup not in SETUPS:
    raise ValueError(f"unknown setup {setup!r}; choose from {SETUPS}")
  config = copy.deepcopy(config)
  kept = {dataset.relation} | ({dataset.follow} if setup == "co_embedded" else set())
  names = {r["name"] for r in config.relations}
  missing = kept - names
  if missing:
    raise ValueError(f"config {config.name} has no relation(s) {sorted(missing)}")
  config.relations = [dict(r) for r in config.relations if r["name"] in kept]
  template = next(dict(s) for s in config.data.files if s.get("relation_name") == dataset.relation)
  specs = []
  if setup == "co_embedded":
    specs += [dict(s) for s in config.data.files if s.get("relation_name") == dataset.follow]
  for split in ("train", "valid", "test"):
    spec = dict(template)
    spec.update(path=files[split], split=split, header=False, format="tsv", source=0, target=1,
                relation=None, relation_name=dataset.relation)
    spec.pop("weight", None)
    specs.append(spec)
  config.data.files = specs
  return config_lib.for_external_evaluation(config, dim=dim, epochs=epochs, seed=seed,
                                            eval_every=eval_every)


def load_relation_edges(config, relation: str):
  """Distinct (source, target) names of a relation's train files."""
  edges = []
  for spec in config.data.files:
    if spec.get("relation_name") == relation and spec.get("relation") is None \
        and spec.get("split", "train") == "train":
      edges += who_to_follow.read_pairs(config_lib.resolve_path(spec["path"]),
                                        bool(spec.get("header")), spec["source"], spec["target"])
  if not edges:
    raise ValueError(f"config {config.name}: no train file of relation {relation!r}")
  return sorted(set(edges))


def downstream_task(run_dir: str, dataset: Dataset, examples, feature_set: str,
                    seed: int) -> dict:
  """The held-out engagement classifier on one run's embeddings."""
  from twhin_jax.downstream import model as model_lib  # lazy: jax (the report imports this module into the jax-free cli)
  from twhin_jax.downstream import tasks  # lazy, as model_lib above
  users, items, labels, dense = examples
  embeddings = inspection.load_embeddings(run_dir, [dataset.user_type, dataset.item_type])
  ids = {"user": embeddings.rows(dataset.user_type, users).astype(np.int32),
         "item": embeddings.rows(dataset.item_type, items).astype(np.int32)}
  id_features, products = [], []
  if feature_set == "U+I":
    id_features = [model_lib.IdFeature("user", dataset.user_type),
                   model_lib.IdFeature("item", dataset.item_type)]
    products = [("user", "item")]
  elif feature_set != "none":
    raise ValueError(f"unknown feature set {feature_set!r}; choose from ('none', 'U+I')")
  user_codes = np.unique(np.asarray(users), return_inverse=True)[1]
  # tasks._run_binary is the downstream package's standardise-fit-predict-score
  # step shared by its tasks; the split groups examples by user.
  return tasks._run_binary(f"{dataset.name}_{dataset.relation}_engagement", feature_set,
                           embeddings, dense, ids, id_features, products, labels,
                           tasks._split(len(labels), seed, groups=user_codes), user_codes,
                           model_lib.TrainConfig(seed=seed), False, False)


def run(dataset: Dataset, *, seeds: Sequence[int] = (0, 1, 2), settings: Settings = Settings(),
        workdir: str, log: Callable[[str], None] = lambda m: None) -> dict:
  """Both setups on one dataset: epochs chosen on validation (first seed),
  then link prediction and the downstream task per seed. Returns {"chosen",
  "rows": one dict per (setup, measure) with mean and spread}."""
  from twhin_jax import train as train_lib  # lazy: jax (the report imports this module into the jax-free cli)
  if os.path.exists(dataset.config.partition(":")[0]):
    config = config_lib.load_config(dataset.config)
  else:
    config = shipped_configs.load(dataset.config)
  edges = load_relation_edges(config, dataset.relation)
  all_users = sorted({u for u, _ in edges})
  # The split files' paths are part of each run's config: a canonical path lets
  # a run reached through a link (another report's runs dir) resume.
  workdir = os.path.realpath(workdir)
  os.makedirs(workdir, exist_ok=True)

  def prepare(seed):
    covered = covered_users(all_users, settings.coverage, seed)
    kept = [e for e in edges if e[0] in covered]
    train, valid, test = split_edges(kept, seed)
    folder = os.path.join(workdir, f"seed{seed}")
    os.makedirs(folder, exist_ok=True)
    files = {s: write_edges(os.path.join(folder, f"{dataset.relation}.{s}.tsv"), part)
             for s, part in (("train", train), ("valid", valid), ("test", test))}
    return covered, train, valid, test, files

  chosen = {}
  covered, train, valid, test, files = prepare(seeds[0])
  for setup in SETUPS:
    run_dir = os.path.join(workdir, f"tune_{setup}")
    started = time.perf_counter()
    trainer = train_lib.train(setup_config(config, dataset, setup, files, dim=settings.dim,
                                           epochs=settings.max_epochs, seed=seeds[0],
                                           eval_every=settings.eval_every),
                              run_dir, progress=False)
    history = list(trainer.history)
    trainer.close()
    epochs, mrr = best_epochs(history)
    chosen[setup] = {"epochs": epochs, "valid_mrr": round(mrr, 4),
                     "curve": [(h["epoch"] + 1, round(h["valid"]["mrr"], 4))
                               for h in history if "valid" in h]}
    log(f"{dataset.name} {setup}: validation MRR by epoch {chosen[setup]['curve']} -> "
        f"{epochs} epochs ({time.perf_counter() - started:.0f} s)")

  measures: dict[tuple[str, str], list] = {}
  info = {}
  for seed in seeds:
    covered, train, valid, test, files = prepare(seed)
    # Negatives come from the items the covered users engage with, so every
    # example's item has a vector in both setups.
    items = sorted({i for _, i in train + valid + test})
    examples = engagement_examples(train, valid + test, items, settings.negatives, seed)
    info[seed] = {"covered_users": len(covered), "users": len(all_users),
                  "edges": [len(train), len(valid), len(test)],
                  "downstream_examples": int(len(examples[2]))}
    baseline = None
    for setup in SETUPS:
      run_dir = os.path.join(workdir, f"seed{seed}_{setup}")
      started = time.perf_counter()
      trainer = train_lib.train(setup_config(config, dataset, setup, files, dim=settings.dim,
                                             epochs=chosen[setup]["epochs"], seed=seed),
                                run_dir, progress=False)
      metrics = trainer.evaluate("test", progress=False)
      trainer.close()
      link = metrics.get("per_relation", {}).get(dataset.relation, metrics)
      down = downstream_task(run_dir, dataset, examples, "U+I", seed)
      if baseline is None:
        baseline = downstream_task(run_dir, dataset, examples, "none", seed)
        measures.setdefault(("none", "downstream"), []).append(baseline)
      measures.setdefault((setup, "link"), []).append(link)
      measures.setdefault((setup, "downstream"), []).append(down)
      log(f"{dataset.name} seed {seed} {setup}: test MRR {link['mrr']:.4f} Hits@10 "
          f"{link['hits@10']:.4f}; downstream ROC-AUC {down['roc_auc']:.4f} (none "
          f"{baseline['roc_auc']:.4f}) RCE {down['rce']:.2f} "
          f"({time.perf_counter() - started:.0f} s)")

  rows = []
  for (setup, measure), results in measures.items():
    keys = ("mrr", "hits@10") if measure == "link" else ("roc_auc", "rce", "pr_auc")
    row = {"dataset": dataset.name, "relation": dataset.relation, "follow": dataset.follow,
           "setup": setup, "measure": measure, "seeds": list(seeds),
           "coverage": settings.coverage,
           "epochs": chosen.get(setup, {}).get("epochs"), "dim": settings.dim,
           "covered_users": info[seeds[0]]["covered_users"], "users": info[seeds[0]]["users"],
           "edges_train_valid_test": info[seeds[0]]["edges"],
           "downstream_examples": info[seeds[0]]["downstream_examples"]}
    for key in keys:
      stats = who_to_follow.spread([r[key] for r in results])
      name = key.replace("@", "_at_")
      row[name] = round(stats["mean"], 4)
      row[name + "_std"] = round(stats["std"], 4)
      row[name + "_per_seed"] = [round(float(r[key]), 4) for r in results]
    rows.append(row)
  return {"chosen": chosen, "rows": rows}


def table_rows(rows: list[dict]) -> list[list]:
  """Markdown-ready rows: dataset, setup, link MRR, Hits@10, downstream ROC-AUC, RCE."""
  out = []
  for dataset in dict.fromkeys(r["dataset"] for r in rows):
    mine = [r for r in rows if r["dataset"] == dataset]
    get = lambda setup, measure: next((r for r in mine if r["setup"] == setup
                                       and r["measure"] == measure), None)
    for setup in ("none",) + SETUPS:
      link, down = get(setup, "link"), get(setup, "downstream")
      if down is None:
        continue
      fmt = lambda r, k: None if r is None else f"{r[k]:.4f} ± {r[k + '_std']:.4f}"
      out.append([dataset, {"none": "no embeddings", "alone": "relation alone",
                            "co_embedded": "co-embedded with follows"}[setup],
                  fmt(link, "mrr"), fmt(link, "hits_at_10"), fmt(down, "roc_auc"),
                  None if down is None else f"{down['rce']:.2f} ± {down['rce_std']:.2f}"])
  return out
