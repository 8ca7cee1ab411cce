"""Fold-in: new entities trained on their own edges, everything else frozen.

Eq. 5 (inductive.py) gives a new entity x the mean of the vectors that would
score each of its edges best. That ignores the negatives: a user who follows
popular accounts lands where everybody's vectors are, and ranks popular
targets as the popularity floor does. Fold-in instead minimises the training
loss itself over the new rows only, starting from the Eq. 5 vector:

    X* = argmin_X  sum_{e in E_new} w_e [ L(f(e), f(N_e)) + L'(f'(e), f'(N'_e)) ]
                   + lambda Omega(X)

where E_new are the new entities' known edges, f is the model's score
(model.py eq. 1, eq. 1' for the source side of reciprocal models), L the
run's loss (logistic, softmax or ranking; losses.py) over the same kind of
negatives training used (C - 1 + U entities of the corrupted side's type per
edge, drawn uniformly each step; the softmax's log-q correction for uniform
draws, log((C - 1 + U) / N), when the run used it), and Omega the run's
regulariser (regularizers.py). The trained tables and relation parameters
are constants; X takes T steps of the trainer's row-wise Adagrad (optim.py)
with its learning rate. New entities do not interact (each one's edges go to
trained entities only), so the problem separates per entity and the whole
batch of new entities is solved at once.

This is the "fold-in" of matrix factorisation (e.g. Hu, Koren & Volinsky
2008's user update with item factors fixed), done with the model's own loss.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from twhin_jax import losses as losses_lib
from twhin_jax import model
from twhin_jax import optim
from twhin_jax import regularizers


@dataclasses.dataclass(frozen=True)
class FoldInSettings:
  """The parts of a training config that fold-in reuses (see from_config)."""
  loss: str = "logistic"
  margin: float = 0.1
  lr: float = 0.1
  num_negatives: int = 100  # C - 1 + U of training
  logq_correction: bool = False
  reciprocal: bool = False
  regularization: float = 0.0
  regularizer: str = "l2"
  steps: int = 50
  seed: int = 0

  @classmethod
  def from_config(cls, config, steps: int = 50, seed: int = 0) -> "FoldInSettings":
    n = config.negatives
    return cls(loss=config.train.loss, margin=float(config.train.margin),
               lr=float(config.train.lr), num_negatives=int(n.chunk_size - 1 + n.num_uniform),
               logq_correction=bool(n.logq_correction), reciprocal=bool(config.model.reciprocal),
               regularization=float(config.model.regularization),
               regularizer=config.model.regularizer, steps=steps, seed=seed)


@dataclasses.dataclass(frozen=True)
class _Group:
  """Edges of one (relation, side): new rows, the other end's rows."""
  operator: str
  out: bool  # the new entity is the source
  new_rows: np.ndarray  # [E] rows of X
  other_rows: np.ndarray  # [E] rows of the other end's trained table
  other_type: str
  param: np.ndarray
  reverse: np.ndarray


def fold_in(retriever, entity_type: str, edges_per_entity: Sequence[Sequence[tuple]],
            init: np.ndarray, settings: FoldInSettings) -> np.ndarray:
  """Vectors [U, d] of U new entities of ``entity_type``.

  Args:
    retriever: ``retrieval.Retriever`` of the trained run (frozen tables and
      relation parameters, comparator).
    entity_type: the new entities' type.
    edges_per_entity: for each new entity, its (relation, neighbour name or
      id, "out" | "in") edges to trained entities (inductive.embed_new_entity's
      format, with the side given).
    init: [U, d] starting vectors (Eq. 5).
    settings: loss, negatives, optimiser (FoldInSettings.from_config).
  """
  comparator = retriever.comparator
  loss_fn = losses_lib.LOSSES[settings.loss]
  by_key: dict[tuple[str, bool], tuple[list[int], list[int]]] = {}
  for u, edges in enumerate(edges_per_entity):
    for relation, neighbour, side in edges:
      rel = retriever.relation(relation)
      out = side == "out"
      other_type = rel.target if out else rel.source
      rows = by_key.setdefault((relation, out), ([], []))
      rows[0].append(u)
      rows[1].append(retriever.lookup(other_type, neighbour))
  groups = []
  for (relation, out), (new_rows, other_rows) in sorted(by_key.items()):
    rel = retriever.relation(relation)
    groups.append(_Group(rel.operator, out, np.asarray(new_rows, np.int32),
                         np.asarray(other_rows, np.int32), rel.target if out else rel.source,
                         np.asarray(rel.forward, np.float32), np.asarray(rel.reverse, np.float32)))
  # Candidate tables of both ends of every group's relation (frozen).
  types = set()
  for g in groups:
    rel_source, rel_target = (entity_type, g.other_type) if g.out else (g.other_type, entity_type)
    types.update((rel_source, rel_target))
  tables = {t: jnp.asarray(np.asarray(retriever.table(t), np.float32)) for t in types}
  k = settings.num_negatives

  def group_loss(x_table, g: _Group, arrays, tables, key):
    # Arrays are jit arguments, not closure constants: XLA would constant-fold
    # gathers from whole captured tables (minutes on Last.fm).
    new_rows, other_rows, param, reverse = arrays
    x = x_table[new_rows]  # [E, d]
    other = tables[g.other_type][other_rows]  # [E, d]
    sources, targets = (x, other) if g.out else (other, x)
    source_type, target_type = (entity_type, g.other_type) if g.out else (g.other_type,
                                                                          entity_type)
    weight = jnp.ones(new_rows.shape[0], jnp.float32)
    total = 0.0
    # Tail query: op(s) against the true target and uniform targets; head
    # query: the true source against uniform sources (eq. 1' when reciprocal).
    for side, side_key in (("tail", 0), ("head", 1)):
      cand_type = target_type if side == "tail" else source_type
      n = tables[cand_type].shape[0]
      neg_ids = jax.random.randint(jax.random.fold_in(key, side_key), (k,), 0, n)  # [K]
      negatives = tables[cand_type][neg_ids]  # [K, d]
      if side == "tail":
        query = model.apply_operator(g.operator, param, sources)  # [E, d]
        pos = model.compare_pairs(comparator, query, targets)  # [E]
        neg = model.compare_all(comparator, query, negatives)  # [E, K]
      elif settings.reciprocal:
        query = model.apply_operator(g.operator, reverse, targets)  # [E, d]
        pos = model.compare_pairs(comparator, query, sources)
        neg = model.compare_all(comparator, query, negatives)  # [E, K]
      else:
        query = model.apply_operator(g.operator, param, sources)
        pos = model.compare_pairs(comparator, query, targets)
        corrupted = model.apply_operator(g.operator, param, negatives)  # [K, d]
        neg = model.compare_all(comparator, targets, corrupted)  # [E, K]
      # A draw of the edge's own trained end is not a negative (as in step.py).
      mask = jnp.ones(neg.shape, jnp.float32)
      if (side == "tail") == g.out:
        mask = (neg_ids[None, :] != other_rows[:, None]).astype(jnp.float32)
      if settings.logq_correction and settings.loss == "softmax":
        neg = neg - jnp.log(k / n)  # uniform draws: q = K / N per candidate
      total = total + loss_fn(pos, neg, mask, weight, settings.margin)
    if settings.regularization:
      total = total + settings.regularization * regularizers.penalty(
          settings.regularizer, g.operator, sources if g.out else jnp.zeros_like(sources),
          targets if not g.out else jnp.zeros_like(targets), weight)
    return total

  def loss(x_table, group_arrays, tables, key):
    return sum(group_loss(x_table, g, arrays, tables, jax.random.fold_in(key, i))
               for i, (g, arrays) in enumerate(zip(groups, group_arrays)))

  group_arrays = [tuple(jnp.asarray(a) for a in (g.new_rows, g.other_rows, g.param, g.reverse))
                  for g in groups]

  @jax.jit
  def step(x_table, state, key, group_arrays, tables):
    grads = jax.grad(loss)(x_table, group_arrays, tables, key)  # [U, d]; rows without edges: 0
    rows_all = jnp.arange(x_table.shape[0], dtype=jnp.int32)
    return optim.row_adagrad_update(x_table, state, rows_all, grads, settings.lr)

  x_table = jnp.asarray(np.asarray(init, np.float32))
  state = optim.RowAdagradState(acc=jnp.zeros(init.shape[0], jnp.float32))
  key = jax.random.key(settings.seed)
  for t in range(settings.steps):
    x_table, state = step(x_table, state, jax.random.fold_in(key, t), group_arrays, tables)
  return np.asarray(x_table)
