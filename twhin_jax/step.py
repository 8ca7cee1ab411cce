"""The jitted training step: chunks of one relation with shared negatives.

One *step* takes a batch of S chunks of C edges (S * C = train.batch_size).
Every chunk holds edges of a single relation, so its source rows and target
rows are entities of one type each and can serve as negatives for each other:

  target side: op(theta_s) for the C sources against the C targets of the
               chunk (batch negatives) and U targets drawn uniformly from the
               target type's loaded partition             -> scores [C, C+U]
  source side: the C targets against op(.) of the C sources of the chunk and
               U uniformly drawn sources                  -> scores [C, C+U]

The edge's own positive (the diagonal of the batch block) and padded edges are
masked out. Gradients are taken with respect to the gathered rows only, and
the row-wise Adagrad update is sparse (see optim.py). A call runs T steps
under ``lax.scan`` so Python dispatch is paid once per T steps.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from twhin_jax import losses as losses_lib
from twhin_jax import model
from twhin_jax import negatives
from twhin_jax import optim
from twhin_jax import regularizers
from twhin_jax import sharding as sharding_lib
from twhin_jax import state as state_lib


class StepBatch(NamedTuple):
  """T steps of S chunks of C edges, as rows of the working table.

  src, dst:        [T, S, C] int32 working-table rows of sources / targets
  rel:             [T, S]    int32 relation row inside the parameter group, or
                   [T, S, C] one per edge (mixed chunks, model.reciprocal only)
  weight:          [T, S, C] float32 edge weight (0 marks a padded edge)
  src_lo, src_n:   [T, S]    int32 first row and row count of the range
                             uniform source negatives are drawn from
  dst_lo, dst_n:   [T, S]    int32 the same for target negatives
  step_index:      [T]       int32 global step number (PRNG fold-in)
  rel_reverse:     [T, S]    int32 row of the reverse-direction parameters
                             (None: the same as rel; see model.py, reciprocal)
  src_logq, dst_logq:  [T, S, C] log of the expected number of times each
                       chunk source / target appears among the chunk's
                       negatives (None: no sampling correction)
  uniform_src_logq, uniform_dst_logq: [T, S] the same for a uniform draw

  With the correction, a negative's logit f(e') becomes f(e') - log q(e'):
  sum_{e'} exp(f(e')) / q(e') is an unbiased estimate of the sum over *all*
  candidates, so the sampled softmax approximates the full softmax
  (Bengio & Senecal 2008; Yi et al. 2019, "logQ correction"). Without it,
  batch negatives, drawn in proportion to degree, cancel the popularity prior
  that ranking needs.
  """
  src: jax.Array
  dst: jax.Array
  rel: jax.Array
  weight: jax.Array
  src_lo: jax.Array
  src_n: jax.Array
  dst_lo: jax.Array
  dst_n: jax.Array
  step_index: jax.Array
  rel_reverse: jax.Array | None = None
  src_logq: jax.Array | None = None
  dst_logq: jax.Array | None = None
  uniform_src_logq: jax.Array | None = None
  uniform_dst_logq: jax.Array | None = None


class StepSettings(NamedTuple):
  """The static settings of one compiled step (see make_train_steps)."""
  operator: str
  comparator: str
  loss: str
  margin: float
  lr: float
  relation_lr: float
  num_uniform: int
  reciprocal: bool
  regularization: float
  l2_to_previous: float
  sharded: bool
  regularizer: str = "l2"
  matmul_precision: str = "float32"  # resolved (model.resolve_matmul_precision)
  #: 1-vs-all: the U candidates are every row of the range (negatives.all_rows,
  #: U = the largest range), no batch negatives, no log-q (each candidate is
  #: seen exactly once, q = 1): the loss is the exact softmax over all rows.
  all_candidates: bool = False


def chunk_loss(settings: StepSettings, src_rows, dst_rows, src_ids, dst_ids, params,
               reverse_params, weight, logq, src_valid, dst_valid):
  """src_rows, dst_rows [C+U, d] (chunk, then uniform negatives), their row
  ids [C+U] and which uniform candidates are real [U] -> chunk loss."""
  operator, comparator, num_uniform = settings.operator, settings.comparator, settings.num_uniform
  loss_fn = losses_lib.LOSSES[settings.loss]
  c = weight.shape[0]
  lhs, rhs = src_rows[:c], dst_rows[:c]  # [C, d] each
  neg_src, neg_dst = src_rows[c:], dst_rows[c:]  # [U, d] each
  batch_negatives = not settings.all_candidates
  dst_mask = negatives.negative_mask(dst_ids, weight, num_uniform, dst_valid,
                                     batch_negatives)  # target corruption
  src_mask = negatives.negative_mask(src_ids, weight, num_uniform, src_valid,
                                     batch_negatives)  # source corruption
  src_logq, dst_logq, uniform_src_logq, uniform_dst_logq = logq
  if settings.all_candidates:  # every candidate exactly once: q = 1, log q = 0
    src_logq, dst_logq = jnp.zeros_like(src_logq), jnp.zeros_like(dst_logq)
    uniform_src_logq, uniform_dst_logq = (jnp.zeros_like(uniform_src_logq),
                                          jnp.zeros_like(uniform_dst_logq))

  # Target corruption: op(theta_s) against the chunk's and the uniform targets.
  forward = model.target_query(operator, comparator, params, lhs)  # [C, d]
  # Row i, column j: f(s_i, r, t_j). Its diagonal holds the positives.
  batch_block = model.score(operator, forward, rhs, settings.matmul_precision)  # [C, C]
  pos = jnp.diagonal(batch_block)  # [C]
  uniform_dst = model.score(operator, forward, neg_dst, settings.matmul_precision)  # [C, U]
  neg_for_dst = jnp.concatenate([batch_block - dst_logq[None, :],
                                 uniform_dst - uniform_dst_logq], axis=1)  # [C, C+U]
  # Source corruption: model.py's rule for the C targets as queries (the
  # exact form, fold=False, so a chunk's own sources score as in the batch
  # block).
  backward = model.source_query(operator, comparator, settings.reciprocal, params,
                                reverse_params, rhs, per_row=False, fold=False)
  uniform_src = model.score(operator, backward, neg_src, settings.matmul_precision)  # [C, U]
  if settings.reciprocal:  # f'(s_j, r, t_i) with the reverse parameters, eq. (1') of model.py
    reverse_block = model.score(operator, backward, lhs, settings.matmul_precision)  # [C, C]
    pos_for_src = jnp.diagonal(reverse_block)  # [C]
  else:
    # The same f: edge i needs f(s_j, r, t_i), the transpose of the batch block.
    reverse_block, pos_for_src = batch_block.T, pos
  neg_for_src = jnp.concatenate([reverse_block - src_logq[None, :],
                                 uniform_src - uniform_src_logq], axis=1)  # [C, C+U]
  total = (loss_fn(pos, neg_for_dst, dst_mask, weight, settings.margin)
           + loss_fn(pos_for_src, neg_for_src, src_mask, weight, settings.margin))
  if settings.regularization:  # lambda * Omega, Omega from regularizers.py ("l2" or "n3")
    total = total + settings.regularization * regularizers.penalty(
        settings.regularizer, operator, lhs, rhs, weight)
  return total


def step_loss(settings: StepSettings, src_rows, dst_rows, rel_params, src_ids, dst_ids, rel,
              rel_reverse, weight, logq, src_valid, dst_valid):
  """src_rows, dst_rows [S, C+U, d], rel_params [R_g, ...] -> summed loss of S chunks."""
  params = rel_params[rel]  # [S, ...]
  reverse_params = rel_params[rel_reverse]  # [S, ...]
  return jnp.sum(jax.vmap(functools.partial(chunk_loss, settings))(
      src_rows, dst_rows, src_ids, dst_ids, params, reverse_params, weight, logq, src_valid,
      dst_valid))


def update_rows(settings: StepSettings, state: state_lib.StepState, src_ids, dst_ids, src_grads,
                dst_grads) -> tuple[state_lib.Rows, state_lib.Rows | None]:
  """Sparse row-wise Adagrad on the rows the step touched -> (home, visiting)."""
  d, lr, strength = src_grads.shape[-1], settings.lr, settings.l2_to_previous
  home = state.home
  anchored = dict(anchor=home.anchor, anchor_weight=home.anchor_weight, anchor_strength=strength)
  if state.visiting is None:
    # Both sides live in one table: one update, so a row that is a source
    # and a target in the same step gets the sum of both gradients.
    table, row_state = optim.row_adagrad_update(
        home.table, home.row_state,
        jnp.concatenate([src_ids.reshape(-1), dst_ids.reshape(-1)]),
        jnp.concatenate([src_grads.reshape(-1, d), dst_grads.reshape(-1, d)]), lr, **anchored)
    return home._replace(table=table, acc=row_state.acc), None
  table, row_state = optim.row_adagrad_update(
      home.table, home.row_state, src_ids.reshape(-1), src_grads.reshape(-1, d), lr, **anchored)
  visiting = state.visiting
  visiting_table, visiting_state = optim.row_adagrad_update(
      visiting.table, visiting.row_state, dst_ids.reshape(-1), dst_grads.reshape(-1, d), lr,
      anchor=visiting.anchor, anchor_weight=visiting.anchor_weight, anchor_strength=strength)
  return (home._replace(table=table, acc=row_state.acc),
          visiting._replace(table=visiting_table, acc=visiting_state.acc))


def one_step(settings: StepSettings, carry, batch: StepBatch):
  """One step of S chunks: draw negatives, score, update rows and relations."""
  state, key = carry
  num_uniform = settings.num_uniform
  step_key = jax.random.fold_in(key, batch.step_index)
  src_key, dst_key = jax.random.split(step_key)
  if settings.all_candidates:
    neg_src, src_valid = negatives.all_rows(batch.src_lo, batch.src_n, num_uniform)  # [S, U]
    neg_dst, dst_valid = negatives.all_rows(batch.dst_lo, batch.dst_n, num_uniform)  # [S, U]
  else:
    neg_src = negatives.draw_uniform(src_key, batch.src_lo, batch.src_n, num_uniform)  # [S, U]
    neg_dst = negatives.draw_uniform(dst_key, batch.dst_lo, batch.dst_n, num_uniform)  # [S, U]
    src_valid = dst_valid = jnp.ones(neg_src.shape, bool)
  src_ids = jnp.concatenate([batch.src, neg_src], axis=1)  # [S, C+U]
  dst_ids = jnp.concatenate([batch.dst, neg_dst], axis=1)  # [S, C+U]
  dst_table = state.home.table if state.visiting is None else state.visiting.table
  src_rows = state.home.table.at[src_ids].get(mode="clip")  # [S, C+U, d]
  dst_rows = dst_table.at[dst_ids].get(mode="clip")  # [S, C+U, d]
  loss, (src_grads, dst_grads, param_grads) = jax.value_and_grad(
      functools.partial(step_loss, settings), argnums=(0, 1, 2))(
          src_rows, dst_rows, state.rel_params, src_ids, dst_ids, batch.rel,
          batch.rel if batch.rel_reverse is None else batch.rel_reverse, batch.weight,
          negatives.log_q(batch), src_valid, dst_valid)
  home, visiting = update_rows(settings, state, src_ids, dst_ids, src_grads, dst_grads)
  if settings.sharded:
    # Replicated relation parameters: sum the gradients of all devices so
    # every replica takes the same step.
    param_grads = jax.lax.psum(param_grads, sharding_lib.AXIS)
  updates, rel_opt = optim.relation_adagrad(settings.relation_lr).update(
      param_grads, state.rel_opt, state.rel_params)
  rel_params = optax.apply_updates(state.rel_params, updates)
  new_state = state_lib.StepState(home, visiting, rel_params, rel_opt)
  return (new_state, key), (loss, jnp.sum(batch.weight > 0))


def local_steps(settings: StepSettings, state: state_lib.StepState, batch: StepBatch,
                key: jax.Array):
  """T steps (lax.scan over the batch's leading axis) -> (state, loss sum, edges)."""
  (state, _), (step_losses, step_edges) = jax.lax.scan(
      functools.partial(one_step, settings), (state, key), batch)
  return state, jnp.sum(step_losses), jnp.sum(step_edges)


def sharded_steps(settings: StepSettings, state: state_lib.StepState, batch: StepBatch,
                  key: jax.Array):
  """local_steps on one device under shard_map; loss and edges summed over devices."""
  # Inside shard_map every batch field is [1, T, ...]: this device's slice.
  batch = jax.tree_util.tree_map(lambda x: x[0], batch)
  # The key travels as raw uint32 data (a replicated global array); each
  # device draws its own negatives.
  key = jax.random.fold_in(jax.random.wrap_key_data(key), jax.lax.axis_index(sharding_lib.AXIS))
  state, loss, edges = local_steps(settings, state, batch, key)
  return (state, jax.lax.psum(loss, sharding_lib.AXIS), jax.lax.psum(edges, sharding_lib.AXIS))


@functools.lru_cache(maxsize=None)
def make_train_steps(operator: str, comparator: str, loss: str, margin: float,
                     lr: float, relation_lr: float, num_uniform: int, reciprocal: bool = False,
                     regularization: float = 0.0, mesh: jax.sharding.Mesh | None = None,
                     visiting: bool = False, l2_to_previous: float = 0.0,
                     regularizer: str = "l2", matmul_precision: str = "auto",
                     all_candidates: bool = False):
  """Builds the jitted function (state, batch, key) -> (state, loss_sum, edge_count).

  With a ``mesh`` the function runs under ``shard_map`` over its one axis
  (sharding.AXIS): the tables are row-sharded (each device holds its home
  sub-partitions), every batch field carries a leading device axis [G, ...],
  relation parameters are replicated and their gradients are summed over the
  devices (``psum``), so every replica applies the same Adagrad update.
  The sharded function takes the PRNG key as ``jax.random.key_data``.
  ``visiting=True`` builds the ring-round variant where targets index the
  ``visiting`` rows. Without a mesh it is the plain single-device function.

  ``l2_to_previous`` (alpha) adds alpha * |theta_v - theta_v^prev|^2 for every
  distinct row v a step touches (paper Sec. 7.2), anchored at the state's
  ``anchor`` rows; see optim.row_adagrad_update.

  ``regularization`` (lambda) adds lambda * Omega over the positive edges, a
  penalty on the rows each batch touches (``regularizer``: "l2",
  sum_e w_e (|theta_s|^2 + |theta_t|^2), or "n3"; see regularizers.py), which
  keeps popular entities from growing without bound.

  ``matmul_precision`` sets the chunk score matmuls only (model.compare_all);
  tables, gradients and Adagrad state stay float32.

  ``all_candidates`` (1-vs-all): ``num_uniform`` is then the largest range
  (rows of a loaded type sub-partition) and every row of it is a candidate.
  """
  settings = StepSettings(operator, comparator, loss, margin, lr, relation_lr, num_uniform,
                          reciprocal, regularization, l2_to_previous, mesh is not None,
                          regularizer, model.resolve_matmul_precision(matmul_precision),
                          all_candidates)
  if mesh is None:
    return jax.jit(functools.partial(local_steps, settings), donate_argnums=(0,))
  state_spec = state_lib.state_spec(visiting, anchored=bool(l2_to_previous))
  batch_spec = jax.sharding.PartitionSpec(sharding_lib.AXIS)
  replicated = sharding_lib.REPLICATED
  mapped = jax.shard_map(functools.partial(sharded_steps, settings), mesh=mesh,
                         in_specs=(state_spec, batch_spec, replicated),
                         out_specs=(state_spec, replicated, replicated), check_vma=False)
  return jax.jit(mapped, donate_argnums=(0,))
