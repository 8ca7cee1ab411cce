"""The trainable state as pytrees, and where each leaf lives on the mesh.

One jitted step (step.py) updates one ``StepState``:

  home       the device's home rows of one dim's working table, their
             row-wise Adagrad accumulators and, for warm-started versions with
             L2-to-previous, the previous version's rows and a 0/1 weight per
             row (``Rows``)
  visiting   in ring rounds k > 0 (sharding.py) the copy of another device's
             home rows that the targets index (None in a local round)
  rel_params one relation group's parameters [R_g, ...] (replicated)
  rel_opt    their Adagrad state (replicated)

``state_spec`` builds the matching ``PartitionSpec`` tree with
``jax.tree_util.tree_map``: every row leaf is row-sharded, the relation leaves
replicated. ``relation_state`` is the host-side starting point of the
relation half (what a checkpoint stores); the trainer and a warm start's
parent reader both build it here.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from twhin_jax import model
from twhin_jax import optim
from twhin_jax import sharding as sharding_lib


class Rows(NamedTuple):
  """Rows of one dim's working table (home or a visiting copy)."""
  table: jax.Array  # [R, d]
  acc: jax.Array  # [R] row-wise Adagrad accumulators
  # L2-to-previous (versions.py): the previous version's rows in the same
  # layout and a 0/1 weight per row (0: entity new in this version). Read-only.
  anchor: jax.Array | None = None  # [R, d]
  anchor_weight: jax.Array | None = None  # [R]

  @property
  def row_state(self) -> optim.RowAdagradState:
    return optim.RowAdagradState(self.acc)


class StepState(NamedTuple):
  """What one jitted step reads and writes (donated to it)."""
  home: Rows
  visiting: Rows | None
  rel_params: jax.Array  # [R_g, ...]
  rel_opt: optax.OptState


def rows_spec(anchored: bool) -> Rows:
  """PartitionSpecs of a Rows: every leaf row-sharded."""
  template = Rows(0, 0, *((0, 0) if anchored else (None, None)))
  return jax.tree_util.tree_map(lambda _: sharding_lib.ROWS, template)


def state_spec(visiting: bool, anchored: bool) -> StepState:
  """PartitionSpecs of a StepState (the relation leaves: one replicated prefix)."""
  rows = rows_spec(anchored)
  return StepState(rows, rows if visiting else None, sharding_lib.REPLICATED,
                   sharding_lib.REPLICATED)


def relation_state(layout: model.RelationLayout, relation_lr: float, params=None) -> dict:
  """{"params", "opt"} of every relation group: ``params`` (default the
  layout's initial values) and a fresh Adagrad state, as numpy arrays."""
  if params is None:
    params = layout.init_params()
  params = {g: np.asarray(p) for g, p in params.items()}
  tx = optim.relation_adagrad(relation_lr)
  return {"params": params, "opt": {g: tx.init(p) for g, p in params.items()}}


def abstract_relation_state(layout: model.RelationLayout, relation_lr: float, sharding=None):
  """Shapes and dtypes of relation_state (what an Orbax restore fills in)."""
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=sharding),
      relation_state(layout, relation_lr))


def init_step_state(table, acc, rel_params, relation_lr: float) -> StepState:
  """A local-round StepState from one table, its accumulators and one group's
  parameters (fresh relation Adagrad state)."""
  rel_params = jnp.asarray(rel_params)
  return StepState(Rows(table, acc), None, rel_params,
                   optim.relation_adagrad(relation_lr).init(rel_params))


class TrainState(NamedTuple):
  """Everything the steps of one bucket update, for every dim and group:
  home rows per dim, visiting rows per dim (in ring rounds), and relation
  parameters and optimizer state per group. ``for_group`` is one step's
  StepState, ``with_group`` puts its result back."""
  home: dict[int, Rows]
  visiting: dict[int, Rows]
  rel_params: dict[str, jax.Array]
  rel_opt: dict[str, optax.OptState]

  def for_group(self, group: str, visiting: bool) -> StepState:
    dim = model.group_dim(group)
    return StepState(self.home[dim], self.visiting[dim] if visiting else None,
                     self.rel_params[group], self.rel_opt[group])

  def with_group(self, group: str, new: StepState) -> "TrainState":
    dim = model.group_dim(group)
    visiting = self.visiting if new.visiting is None else {**self.visiting, dim: new.visiting}
    return TrainState({**self.home, dim: new.home}, visiting,
                      {**self.rel_params, group: new.rel_params},
                      {**self.rel_opt, group: new.rel_opt})
