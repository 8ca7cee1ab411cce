"""Embedding entities that were absent at training time (paper Eq. 5).

A new entity x with known edges to trained entities gets the mean, over its
edges, of the vector that would score that edge best under the model's
f(s, r, t) = compare(op_r(theta_s), theta_t):

    theta_x = 1/|E_x| sum_{e in E_x} g_e                                   (Eq. 5)

with g_e by the side x stands on and the comparator:

  x is the target, e = (s, r, x): g_e = op_r(theta_s) for every comparator
      (dot and cos are maximised along op_r(theta_s), l2 at it).

  x is the source, e = (x, r, t), and op_r(y) = A_r y + b_r:
    dot:  f = y . (A_r^T theta_t) + b_r . theta_t, largest along the adjoint
          g_e = A_r^T theta_t. This keeps the relation's per-target term
          b_r . theta_t in the new entity's rankings, as it is in trained ones.
            none              theta_t
            translation       theta_t
            diagonal          p * theta_t
            complex_diagonal  conj(p) * theta_t   (halves: real, imaginary)
            rotation          e^{-i phi} * theta_t
            linear            P^T theta_t
    l2, cos: the inverse, op_r(g_e) = theta_t (f = 0 is l2's maximum, cos = 1):
            none              theta_t
            translation       theta_t - p
            diagonal          theta_t / p                 (needs p_i != 0)
            complex_diagonal  theta_t / p, complex        (needs |p_i| != 0)
            rotation          e^{-i phi} * theta_t        (the adjoint is the inverse)
            linear            P^{-1} theta_t              (needs P invertible)

Reciprocal models' reverse parameters are not used: the new entity is then
ranked as trained sources are, by the forward f. Unknown operators raise.
Its mixture (``twhin_jax.mixture``, Eq. 3) comes from the same engagements.

``evaluate_inductive`` measures it: hold users out of a graph, train without
them, embed them from part of their edges and rank the rest (see its doc).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import time
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from twhin_jax import config as config_lib
from twhin_jax import fold_in as fold_in_lib
from twhin_jax import generate
from twhin_jax import model
from twhin_jax import retrieval
from twhin_jax import train as train_lib
from twhin_jax.model import compare_all


def embed_new_entity(retriever, entity_type: str, edges: Sequence[tuple]) -> np.ndarray:
  """Eq. 5: the vector [d] of a new entity of ``entity_type``.

  Args:
    retriever: ``retrieval.Retriever`` of the trained run (tables, relations).
    entity_type: the new entity's type.
    edges: (relation, neighbour name or id) pairs, or triples with a third
      item "out" (the new entity is the source) or "in" (it is the target).
      Pairs take the only side ``entity_type`` can stand on, "out" when the
      relation joins the type to itself.
  """
  if not edges:
    raise ValueError("a new entity needs at least one edge to a trained entity")
  retriever._check_type(entity_type)
  groups: dict[tuple[str, str], list] = {}  # neighbour names or ids
  for edge in edges:
    relation, neighbour = edge[0], edge[1]
    rel = retriever.relation(relation)
    side = edge[2] if len(edge) > 2 else (
        "out" if rel.source == entity_type else "in" if rel.target == entity_type else None)
    if side not in ("out", "in") or entity_type != (rel.source if side == "out" else rel.target):
      raise ValueError(f"relation {relation!r} joins {rel.source} -> {rel.target}; a new "
                       f"{entity_type} cannot be its {'target' if side == 'in' else 'source'}")
    other_type = rel.target if side == "out" else rel.source
    groups.setdefault((relation, side), []).append(neighbour)
  parts = []
  for (relation, side), neighbours in groups.items():
    rel = retriever.relation(relation)
    other_type = rel.target if side == "out" else rel.source
    rows = retriever.lookup_many(other_type, neighbours)  # one vocabulary lookup per group
    vectors = np.asarray(retriever.table(other_type)[rows], np.float32)  # [E_r, d]
    if side == "out":
      parts.append(model.source_vectors(rel.operator, rel.forward, vectors, retriever.comparator))
    else:
      parts.append(model.target_vectors(rel.operator, rel.forward, vectors))
  return np.concatenate(parts).mean(axis=0)


@dataclasses.dataclass
class NewEntity:
  vector: np.ndarray  # [d], Eq. 5
  mixture: object | None  # mixture.Mixture from the engagements (Eq. 3), when a model is given


def embed_new_user(retriever, entity_type: str, edges: Sequence[tuple],
                   mixture_model=None) -> NewEntity:
  """Eq. 5 vector plus, given a ``mixture.MixtureModel``, the Eq. 3 mixture
  from those edges whose relation belongs to the mixture model."""
  vector = embed_new_entity(retriever, entity_type, edges)
  mix = None
  if mixture_model is not None:
    engagements = [(e[0], e[1]) for e in edges
                   if e[0] in mixture_model.relations and (len(e) < 3 or e[2] == "out")]
    mix = mixture_model.mixture_from_engagements(engagements, retriever)
  return NewEntity(vector, mix)


# ---------------------------------------------------------------------------
# Evaluation: inductive vs transductive on held-out users.


def _read_rows(path: str, delimiter: str, header: bool) -> tuple[list[str] | None, list[list[str]]]:
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt", encoding="utf-8") as f:
    lines = [line.rstrip("\n").rstrip("\r") for line in f]
  head = lines[0] if header and lines else None
  body = lines[1:] if header else lines
  return head, [line.split(delimiter) for line in body if line]


def _column(spec_value, head: list[str] | None) -> int:
  if isinstance(spec_value, int):
    return spec_value
  if head is None:
    raise ValueError(f"column {spec_value!r} named but the file has no header")
  return head.index(spec_value)


def read_edges(config) -> list[tuple[str, str, str]]:
  """Every (source name, relation, target name) of a config's text files
  (TSV/CSV, optionally gzipped; the generator's or a dataset's)."""
  edges = []
  for spec in config.data.files:
    path = config_lib.resolve_path(spec["path"])
    fmt = spec.get("format") or ("csv" if ".csv" in path else "tsv")
    delimiter = config.data.delimiter or ("," if fmt == "csv" else "\t")
    head, rows = _read_rows(path, delimiter, bool(spec.get("header")))
    head_names = head.split(delimiter) if head else None
    src = _column(spec["source"], head_names)
    dst = _column(spec["target"], head_names)
    rel = None if spec.get("relation") is None else _column(spec["relation"], head_names)
    for row in rows:
      edges.append((row[src], spec.get("relation_name") or row[rel], row[dst]))
  return edges


def _write_tsv(path: str, edges) -> None:
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(f"{s}\t{r}\t{t}\n" for s, r, t in edges)


def _train(config, workdir: str, files: list[str], progress: bool):
  config = config_lib.from_json_dict(config_lib.to_json_dict(config))
  config.data.generator = ""
  config.data.generator_args = {}
  config.data.files = [config_lib.file_spec(path, source=0, relation=1, target=2, format="tsv")
                       for path in files]
  config.data.delimiter = ""
  config.data.names_global = False
  config.data.valid_fraction = 0.0
  config.data.test_fraction = 0.0
  config.train.eval_every_epochs = 0
  started = time.perf_counter()
  trainer = train_lib.train(config, workdir, progress=progress)
  trainer.close()
  return time.perf_counter() - started


def _rank_metrics(retriever, user_vectors: dict[str, np.ndarray], known: dict, heldout: dict,
                  k: int) -> dict:
  """Recall@k per (user, relation) and filtered MRR per held-out edge, exact.

  known/heldout: (user, relation) -> set of target names. Known targets are
  filtered from both the top-k and the ranks.
  """
  recalls, reciprocal_ranks = [], []
  for (user, relation), targets in sorted(heldout.items()):
    if user not in user_vectors:
      continue
    rel = retriever.relation(relation)
    batch = retriever.query_vectors(relation, None, vectors=user_vectors[user][None])
    table = np.asarray(retriever.table(rel.target), np.float32)
    scores = np.array(compare_all(retriever.comparator, jnp.asarray(batch.vectors),
                                    jnp.asarray(table)))[0]  # [N]: f(u, r, every target)
    known_rows = []
    for t in known.get((user, relation), ()):
      try:  # a known target the model never saw is not a candidate: nothing to filter
        known_rows.append(retriever.lookup(rel.target, t))
      except KeyError:
        pass
    scores[known_rows] = -np.inf  # filtered
    true_rows = np.array([retriever.lookup(rel.target, t) for t in targets])
    top = np.argsort(-scores, kind="stable")[:k]
    recalls.append(len(np.intersect1d(top, true_rows)) / len(true_rows))
    for row in true_rows:
      others = np.delete(scores, true_rows[true_rows != row])  # other held-out answers filtered
      reciprocal_ranks.append(1.0 / (1 + np.sum(others > scores[row])))
  return {f"recall@{k}": float(np.mean(recalls)) if recalls else float("nan"),
          "mrr": float(np.mean(reciprocal_ranks)) if reciprocal_ranks else float("nan"),
          "queries": len(recalls), "edges": len(reciprocal_ranks)}


def evaluate_inductive(config, workdir: str, *, user_type: str = "user",
                       holdout_fraction: float = 0.1, known_fraction: float = 0.5,
                       min_edges: int = 10, k: int = 10, seed: int = 0,
                       fold_in_steps: int = 50, progress: bool = False) -> dict:
  """Inductive (Eq. 5) vs transductive vectors of held-out users.

  1. Read the config's edges (the generator's files, or a dataset's) and pick
     ``holdout_fraction`` of the users with >= ``min_edges`` outgoing edges.
  2. Split each held-out user's edges (either direction) at random: a
     ``known_fraction`` share is "known", the rest "held out". Edges between
     two held-out users are dropped.
  3. Transductive model: trained on every other edge plus the known ones.
     Inductive model: trained on every other edge only (the users are absent
     from its vocabulary), then embedded from their known edges (Eq. 5).
  4. Both rank every held-out edge (u, r, t) with u the source, exactly:
     recall@k per (user, relation) and filtered MRR (known targets and the
     user's other held-out targets removed). Also reported: a zero user
     vector (only the relation term ranks) as the floor, and the fold-in
     vectors (fold_in.py: ``fold_in_steps`` steps of the run's own loss on
     the new rows, from Eq. 5, all else frozen), with the share of the
     floor-to-transductive gap each inductive method closes:
     gap_closed = (m - m_floor) / (m_transductive - m_floor).
  Held-out edges whose target the inductive model never saw are skipped for
  all models, so every number is over the same edges.
  """
  rng = np.random.default_rng(seed)
  os.makedirs(workdir, exist_ok=True)
  if config.data.generator:
    generator = getattr(generate, config.data.generator)
    files = generator(os.path.join(workdir, "generated"), **dict(config.data.generator_args))
    config.data.files = list(files)
    config.data.generator = ""
  edges = read_edges(config)
  relations = {r["name"]: (r["source"], r["target"]) for r in config.relations}
  out_degree: dict[str, int] = {}
  for s, r, _ in edges:
    if relations[r][0] == user_type:
      out_degree[s] = out_degree.get(s, 0) + 1
  eligible = sorted(u for u, n in out_degree.items() if n >= min_edges)
  held = set(rng.choice(eligible, size=max(1, int(holdout_fraction * len(eligible))),
                        replace=False).tolist())

  def touches(name, entity_type):
    return entity_type == user_type and name in held

  rest, known_edges, heldout_edges = [], [], []
  for edge in edges:
    s, r, t = edge
    src_held, dst_held = touches(s, relations[r][0]), touches(t, relations[r][1])
    if src_held and dst_held:
      continue
    if not (src_held or dst_held):
      rest.append(edge)
    elif rng.random() < known_fraction:
      known_edges.append(edge)
    else:
      heldout_edges.append(edge)
  data_dir = os.path.join(workdir, "holdout")
  os.makedirs(data_dir, exist_ok=True)
  paths = {name: os.path.join(data_dir, f"{name}.tsv") for name in ("rest", "known")}
  _write_tsv(paths["rest"], rest)
  _write_tsv(paths["known"], known_edges)

  seconds = {
      "transductive": _train(config, os.path.join(workdir, "transductive"),
                             [paths["rest"], paths["known"]], progress),
      "inductive": _train(config, os.path.join(workdir, "inductive"), [paths["rest"]], progress),
  }
  trans = retrieval.Retriever.open(os.path.join(workdir, "transductive"), types=(),
                                   progress=progress)
  induct = retrieval.Retriever.open(os.path.join(workdir, "inductive"), types=(),
                                    progress=progress)

  def in_vocab(r, name, side):
    entity_type = relations[r][0 if side == "src" else 1]
    try:
      induct.lookup(entity_type, name)
      return True
    except KeyError:
      return False

  known: dict[tuple[str, str], set] = {}
  per_user_known: dict[str, list[tuple]] = {}
  for s, r, t in known_edges:
    if s in held and relations[r][0] == user_type:
      known.setdefault((s, r), set()).add(t)
      if in_vocab(r, t, "dst"):
        per_user_known.setdefault(s, []).append((r, t, "out"))
    elif in_vocab(r, s, "src"):  # the held-out user is the target
      per_user_known.setdefault(t, []).append((r, s, "in"))
  heldout: dict[tuple[str, str], set] = {}
  for s, r, t in heldout_edges:
    if s in held and relations[r][0] == user_type and in_vocab(r, t, "dst"):
      heldout.setdefault((s, r), set()).add(t)
  # Users need known edges to be embedded inductively: compare on those only.
  heldout = {key: v for key, v in heldout.items() if key[0] in per_user_known}
  dim = int(trans.run["entities"][user_type]["dim"])
  inductive_vectors = {u: embed_new_entity(induct, user_type, e)
                       for u, e in per_user_known.items()}
  transductive_vectors = {u: np.asarray(trans.table(user_type)[trans.lookup(user_type, u)])
                          for u in per_user_known}
  zero = {u: np.zeros(dim, np.float32) for u in per_user_known}
  users = sorted(per_user_known)
  started = time.perf_counter()
  folded = fold_in_lib.fold_in(
      induct, user_type, [per_user_known[u] for u in users],
      np.stack([inductive_vectors[u] for u in users]),
      fold_in_lib.FoldInSettings.from_config(config, steps=fold_in_steps, seed=seed))
  fold_in_seconds = time.perf_counter() - started
  metrics = {
      "transductive": _rank_metrics(trans, transductive_vectors, known, heldout, k),
      "inductive": _rank_metrics(induct, inductive_vectors, known, heldout, k),
      "fold_in": _rank_metrics(induct, dict(zip(users, folded)), known, heldout, k),
      "relation_only": _rank_metrics(induct, zero, known, heldout, k),
  }

  def gap_closed(name, key):
    floor, top = metrics["relation_only"][key], metrics["transductive"][key]
    return float((metrics[name][key] - floor) / (top - floor)) if top != floor else float("nan")

  return {
      "held_out_users": len(held), "embedded_users": len(per_user_known),
      "edges": {"rest": len(rest), "known": len(known_edges), "held_out": len(heldout_edges)},
      **metrics,
      "gap_closed": {name: {key: gap_closed(name, key) for key in (f"recall@{k}", "mrr")}
                     for name in ("inductive", "fold_in")},
      "train_seconds": seconds, "fold_in_seconds": round(fold_in_seconds, 2),
      "settings": {"holdout_fraction": holdout_fraction, "known_fraction": known_fraction,
                   "min_edges": min_edges, "k": k, "seed": seed,
                   "fold_in_steps": fold_in_steps,
                   "dim": int(config.model.dim), "epochs": int(config.train.epochs),
                   "comparator": config.model.comparator},
  }


def save_json(path: str, document: dict) -> None:
  with open(path, "w") as f:
    json.dump(document, f, indent=1)
