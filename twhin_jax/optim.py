"""Optimizers: sparse Adagrad for entity tables, Adagrad for relations.

Both are optax-style pairs of pure functions (``init``, ``update``) with a
NamedTuple state. The entity update is *sparse*: it touches only the rows a
batch gathered, after summing the gradients of duplicate rows, so it equals the
dense row-wise Adagrad restricted to those rows (tests/test_optim.py checks it).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from twhin_jax import storage

#: Added to sqrt(G) so an all-zero gradient row divides 0 by a positive number.
ADAGRAD_EPS = 1e-10


class RowAdagradState(NamedTuple):
  """Accumulators of a table's rows: acc [rows] (one per row) or [rows, d]
  (one per coordinate) float32; the shape chooses the update."""
  acc: jax.Array


def row_adagrad_init(table: jax.Array, per_coordinate: bool = False) -> RowAdagradState:
  return RowAdagradState(acc=jnp.zeros(storage.accumulator_shape(*table.shape[:2], per_coordinate),
                                       jnp.float32))


def row_adagrad_update(table: jax.Array, state: RowAdagradState, rows: jax.Array,
                       row_grads: jax.Array, lr: float, anchor: jax.Array | None = None,
                       anchor_weight: jax.Array | None = None,
                       anchor_strength: float = 0.0) -> tuple[jax.Array, RowAdagradState]:
  """Sparse Adagrad step on the rows a batch touched.

  For every distinct row i among ``rows`` with summed gradient g_i in R^d,
  with accumulators [R] (one per row):

      G_i     <- G_i + (1/d) sum_k g_ik^2
      theta_i <- theta_i - lr * g_i / (sqrt(G_i) + eps)

  and with accumulators [R, d] (one per coordinate, torch.optim.Adagrad's
  update restricted to the touched rows):

      G_ik     <- G_ik + g_ik^2
      theta_ik <- theta_ik - lr * g_ik / (sqrt(G_ik) + eps)

  With an ``anchor`` (L2-to-previous, alpha = ``anchor_strength``, w_i =
  ``anchor_weight``), the penalty alpha w_i |theta_i - theta_i^prev|^2 is
  applied by its proximal step after the gradient step, with the row's own
  Adagrad step size eta_i = lr / (sqrt(G_i) + eps):

      theta_i <- (theta_i + 2 alpha w_i eta_i theta_i^prev) / (1 + 2 alpha w_i eta_i)

  Adding 2 alpha (theta_i - theta_i^prev) to g_i instead would be rescaled
  away by Adagrad's normalisation (any alpha moves a row about lr per step);
  the proximal form makes alpha mean what it says and is stable for any alpha.
  (Per coordinate, eta_ik and the same proximal step coordinate by coordinate.)

  Rows not in ``rows`` are untouched. With one accumulator per row this is
  the row-wise Adagrad of PyTorch-BigGraph (Lerer et al. 2019, Sec. 4.2),
  which stores one float per row instead of one per parameter.

  Args:
    table: [R, d] entity rows.
    state: accumulators [R] or [R, d].
    rows: [K] int32 row indices, duplicates allowed; indices >= R are ignored.
    row_grads: [K, d] gradient of the loss w.r.t. each gathered row.
    lr: learning rate.
  Returns:
    (new table, new state).
  """
  num_rows = table.shape[0]
  k = rows.shape[0]
  # Duplicates must be summed before squaring. Sort the row ids alone (XLA's
  # CPU sort of one array of ints is ~8x faster than an argsort, which sorts
  # (key, index) pairs with a generic comparator), number the runs of equal
  # rows, and find each entry's run by binary search in the sorted unique
  # rows: static shapes, no [R, d] buffer. The segment sum then adds each
  # run's gradients in input order, as the stable argsort did.
  sorted_rows = jnp.sort(rows)  # [K]
  starts_run = jnp.concatenate([jnp.ones((1,), bool), sorted_rows[1:] != sorted_rows[:-1]])
  run = jnp.cumsum(starts_run) - 1  # [K] run number of each sorted entry
  # The row of each run; runs that do not exist get distinct out-of-range ids
  # (base, base+1, ...), which the scatters drop. base is past every input id
  # (padding ids may exceed R), so unique_rows is ascending, as the search
  # needs. Distinct ids matter: XLA's CPU scatter is ~6x slower when one
  # padding id repeats.
  base = jnp.maximum(num_rows, sorted_rows[-1] + 1)
  unique_rows = (base + jnp.arange(k, dtype=rows.dtype)).at[run].set(sorted_rows)
  segment = jnp.searchsorted(unique_rows, rows)  # [K] run of each entry, in input order
  summed = jax.ops.segment_sum(row_grads, segment, num_segments=k)  # [K, d]
  acc_rows = state.acc.at[unique_rows].get(mode="fill", fill_value=0.0)  # [K] or [K, d]
  if state.acc.ndim == 2:  # one accumulator per coordinate
    acc_rows = acc_rows + jnp.square(summed)  # [K, d]
    eta = lr / (jnp.sqrt(acc_rows) + ADAGRAD_EPS)  # [K, d] per-coordinate step size
  else:
    acc_rows = acc_rows + jnp.mean(jnp.square(summed), axis=1)  # [K]
    eta = (lr / (jnp.sqrt(acc_rows) + ADAGRAD_EPS))[:, None]  # [K, 1] per-row step size
  step = eta * summed  # [K, d]
  if anchor is not None and anchor_strength:
    current = table.at[unique_rows].get(mode="fill", fill_value=0.0)  # [K, d]
    previous = anchor.at[unique_rows].get(mode="fill", fill_value=0.0)  # [K, d]
    pull = 2.0 * anchor_strength * anchor_weight.at[unique_rows].get(
        mode="fill", fill_value=0.0)[:, None] * eta  # [K, 1] or [K, d]
    proximal = (current - step + pull * previous) / (1.0 + pull)  # [K, d]
    step = current - proximal
  new_table = table.at[unique_rows].add(-step, mode="drop", unique_indices=True)
  new_acc = state.acc.at[unique_rows].set(acc_rows, mode="drop", unique_indices=True)
  return new_table, RowAdagradState(acc=new_acc)


def relation_adagrad(lr: float) -> optax.GradientTransformation:
  """Plain (element-wise) Adagrad for the small relation parameters:

      G <- G + g^2 ;  p <- p - lr * g / sqrt(G + eps)

  optax's default initial accumulator of 0.1 damps the first steps by ~3x;
  we start from 0 like PyTorch's Adagrad and PyTorch-BigGraph.
  """
  return optax.adagrad(learning_rate=lr, initial_accumulator_value=0.0, eps=ADAGRAD_EPS)
