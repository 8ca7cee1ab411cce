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

On a mesh with global candidates (negatives.global_candidates) the uniform
part of every edge's softmax runs over all devices' candidates: a
distributed logsumexp over gathered queries (global_uniform_lse).
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
  #: Global candidates (sharded softmax steps, negatives.global_candidates):
  #: each query's softmax runs over the union of every device's uniform
  #: candidates (global_uniform_lse), not only its own device's.
  global_candidates: bool = False
  #: Uniform draws per chunk and side on each device with global candidates:
  #: ceil(U / G), so the union of the G devices' draws is U uniform draws
  #: from the whole type, as on one device, at 1/G of its scoring work.
  uniform_per_device: int = 0
  #: Steps whose edges are all padding (weight 0: the tail of a group's last
  #: call) skip the work under lax.cond. Exact: such a step's gradients are
  #: zero, so its Adagrad updates leave rows, accumulators and relations
  #: unchanged. One device only: with several, every device must take the
  #: same branch (the step's collectives).
  skip_padding: bool = False
  #: model.regularize_relations: lambda * Omega_rel on the relation parameters
  #: each positive edge uses (regularizers.relation_penalty).
  regularize_relations: bool = False
  #: model.relation_dropout: the probability p that a relation parameter is
  #: zeroed for one chunk (one edge in mixed-relation chunks) in training,
  #: the rest scaled by 1 / (1 - p) (inverted dropout: evaluation uses the
  #: parameters as they are).
  relation_dropout: float = 0.0


def chunk_loss(settings: StepSettings, src_rows, dst_rows, src_ids, dst_ids, params,
               reverse_params, weight, logq, src_valid, dst_valid, uniform_lse=None):
  """src_rows, dst_rows [C+U, d] (chunk, then uniform negatives), their row
  ids [C+U] and which uniform candidates are real [U] -> chunk loss.

  ``uniform_lse`` (global candidates): (source side [C], target side [C]),
  log sum_{e'} exp(f(e') - log q(e')) of each edge over every device's
  uniform candidates; it stands in for the local uniform columns as one
  logit, which leaves the softmax unchanged: logsumexp composes."""
  operator, comparator = settings.operator, settings.comparator
  num_uniform = src_rows.shape[0] - weight.shape[0]  # U (global candidates: this device's)
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
  if uniform_lse is None:
    uniform_dst = model.score(operator, forward, neg_dst, settings.matmul_precision)  # [C, U]
    uniform_dst = uniform_dst - uniform_dst_logq
  else:  # one column, [C, 1]: the logsumexp over every device's candidates
    uniform_dst = uniform_lse[1][:, None]
    dst_mask = _global_mask(dst_ids, weight, batch_negatives, uniform_lse[1])
  neg_for_dst = jnp.concatenate([batch_block - dst_logq[None, :], uniform_dst], axis=1)
  # Source corruption: model.py's rule for the C targets as queries (the
  # exact form, fold=False, so a chunk's own sources score as in the batch
  # block).
  backward = model.source_query(operator, comparator, settings.reciprocal, params,
                                reverse_params, rhs, per_row=False, fold=False)
  if uniform_lse is None:
    uniform_src = model.score(operator, backward, neg_src, settings.matmul_precision)  # [C, U]
    uniform_src = uniform_src - uniform_src_logq
  else:
    uniform_src = uniform_lse[0][:, None]
    src_mask = _global_mask(src_ids, weight, batch_negatives, uniform_lse[0])
  if settings.reciprocal:  # f'(s_j, r, t_i) with the reverse parameters, eq. (1') of model.py
    reverse_block = model.score(operator, backward, lhs, settings.matmul_precision)  # [C, C]
    pos_for_src = jnp.diagonal(reverse_block)  # [C]
  else:
    # The same f: edge i needs f(s_j, r, t_i), the transpose of the batch block.
    reverse_block, pos_for_src = batch_block.T, pos
  neg_for_src = jnp.concatenate([reverse_block - src_logq[None, :], uniform_src],
                                axis=1)  # [C, C+U] (global candidates: [C, C+1])
  total = (loss_fn(pos, neg_for_dst, dst_mask, weight, settings.margin)
           + loss_fn(pos_for_src, neg_for_src, src_mask, weight, settings.margin))
  if settings.regularization:  # lambda * Omega, Omega from regularizers.py ("l2" or "n3")
    total = total + settings.regularization * regularizers.penalty(
        settings.regularizer, operator, lhs, rhs, weight)
  return total


def _global_mask(ids, weight, batch_negatives: bool, uniform_lse) -> jax.Array:
  """[C, C+1]: negative_mask's batch columns, then the global-candidates
  column (real when some device had a valid candidate for the edge)."""
  batch = negatives.negative_mask(ids[:weight.shape[0]], weight, 0, None, batch_negatives)
  return jnp.concatenate([batch, jnp.isfinite(uniform_lse)[:, None].astype(jnp.float32)], axis=1)


def _side_lse(settings: StepSettings, queries, positives, candidates, candidate_ids,
              candidate_valid, candidate_logq) -> jax.Array:
  """One corrupted side of global_uniform_lse.

  queries: this device's (vectors [S, C, d], offset [S, C] | None,
  candidate_params [S, ...] | None) of model.Query; positives [S, C]: each
  edge's own row on this side; candidates [S, U, d], their rows [S, U],
  valid [S, U] and log q [S]. Returns [S, C]: for each of this device's
  edges, log sum over *every device's* valid candidates of the same chunk
  position of exp(f(e') - log q(e')) (-inf where there is none).
  """
  axis = sharding_lib.AXIS
  me = jax.lax.axis_index(axis)
  # Every device's queries, [G, S, C, ...]: small next to the candidates.
  gathered = jax.tree_util.tree_map(lambda x: jax.lax.all_gather(x, axis), queries)
  gathered_positives = jax.lax.all_gather(positives, axis)  # [G, S, C]
  num_devices = gathered_positives.shape[0]

  def one_chunk(vectors, offset, params, pos, device, rows, ids, valid, logq):
    """Device ``device``'s chunk [C] against this device's candidates [U]."""
    query = model.Query(vectors, settings.comparator, offset, params)
    scores = model.score(settings.operator, query, rows, settings.matmul_precision) - logq
    # Row ids only name the same entity on the same device: rows are
    # disjoint across devices, so the edge's own entity is a candidate only
    # on its own device.
    same_entity = (device == me) & (ids[None, :] == pos[:, None])  # [C, U]
    return scores, valid[None, :] & ~same_entity

  over_devices = jax.vmap(one_chunk, in_axes=(0, 0, 0, 0, 0, None, None, None, None))
  over_chunks = jax.vmap(over_devices, in_axes=(1, 1, 1, 1, None, 0, 0, 0, 0))
  scores, mask = over_chunks(*gathered, gathered_positives, jnp.arange(num_devices),
                             candidates, candidate_ids, candidate_valid,
                             candidate_logq)  # [S, G, C, U] each
  # The distributed logsumexp: log Z = M + log sum_devices sum_{e'} exp(s - M)
  # with M the largest score over all devices (pmax; its gradient cancels, so
  # it is held constant).
  masked = jnp.where(mask, scores, -jnp.inf)
  top = jax.lax.pmax(jax.lax.stop_gradient(jnp.max(masked, axis=-1)), axis)  # [S, G, C]
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  partial_sum = jnp.sum(jnp.exp(jnp.where(mask, scores - top[..., None], -jnp.inf)),
                        axis=-1)  # [S, G, C]
  # Sum over devices, each keeping its own edges' sums (the transpose, in the
  # backward pass, is an all_gather: every device's candidates get the
  # gradient of every device's edges).
  total = jax.lax.psum_scatter(partial_sum, axis, scatter_dimension=1)  # [S, C]
  mine = jax.lax.dynamic_index_in_dim(top, me, axis=1, keepdims=False)  # [S, C]
  found = total > 0
  return jnp.where(found, mine + jnp.log(jnp.where(found, total, 1.0)), -jnp.inf)


def global_uniform_lse(settings: StepSettings, src_rows, dst_rows, params, reverse_params,
                       src_ids, dst_ids, weight, logq, src_valid, dst_valid):
  """(source side, target side) [S, C] of chunk_loss's ``uniform_lse``: the
  uniform-candidate part of each edge's softmax over the union of all
  devices' candidates, Megatron's vocabulary-parallel cross-entropy.

  Every device gathers all devices' queries (op(theta_s) for target
  corruption, the source-side queries for source corruption), scores them
  against its own candidates of the same chunk position, and the partial
  sums meet in a distributed logsumexp (pmax of the maxima, psum of the sums
  of exp). Chunk s of every device belongs to one relation group whose
  relations join one (source, target) type pair (negatives.global_candidates
  checks it), so these candidates are rows of the same type: with the
  tournament schedule (disjoint rows) the union is what one device holding
  every row would draw, and autodiff through all_gather / psum_scatter
  hands each device's rows the gradient of every device's edges.
  """
  c = weight.shape[1]
  src_logq, dst_logq, uniform_src_logq, uniform_dst_logq = logq
  del src_logq, dst_logq
  if settings.all_candidates:  # every row once: q = 1
    uniform_src_logq = jnp.zeros_like(uniform_src_logq)
    uniform_dst_logq = jnp.zeros_like(uniform_dst_logq)

  def chunk_queries(src, dst, p, reverse_p):
    forward = model.target_query(settings.operator, settings.comparator, p, src[:c])
    backward = model.source_query(settings.operator, settings.comparator, settings.reciprocal,
                                  p, reverse_p, dst[:c], per_row=False, fold=False)
    return ((forward.vectors, forward.offset, forward.candidate_params),
            (backward.vectors, backward.offset, backward.candidate_params))

  forward, backward = jax.vmap(chunk_queries)(src_rows, dst_rows, params, reverse_params)
  dst_lse = _side_lse(settings, forward, dst_ids[:, :c], dst_rows[:, c:], dst_ids[:, c:],
                      dst_valid, uniform_dst_logq)
  src_lse = _side_lse(settings, backward, src_ids[:, :c], src_rows[:, c:], src_ids[:, c:],
                      src_valid, uniform_src_logq)
  return src_lse, dst_lse


def global_uniform_log_count(n: jax.Array, chunk: int, per_device: int) -> jax.Array:
  """log q of a uniform candidate under global candidates, per chunk [S].

  Device h draws u = ceil(U / G) rows uniformly from its range of n_h rows,
  and the ranges of the G devices' chunks at one position partition the
  type's N = sum_h n_h loaded rows (psum), so a row of device h is drawn
  u / n_h times (G u / N ~ U / N when the ranges are equal: the union is a
  uniform draw of G u rows from the whole type, as one device draws U). The
  batch term of an average entity is (C - 1) / N, as in
  negatives.uniform_log_count:

      q = u / n_h + (C - 1) / N
  """
  total = jax.lax.psum(n, sharding_lib.AXIS)
  return jnp.log(per_device / jnp.maximum(n, 1) + (chunk - 1) / jnp.maximum(total, 1)).astype(
      jnp.float32)


def global_edge_log_q(logq: jax.Array, n: jax.Array, num_uniform: int,
                      per_device: int) -> jax.Array:
  """A chunk's own entities' log q [S, C] with u = ceil(U / G) draws per
  device instead of the U the host assumed (negatives.sampling_log_counts:
  q = (C - 1) c_r(v) / n_r + U / n, n [S] the device's range, which holds
  v): q' = q - U / n + u / n (the batch term clamped at 0 against rounding)."""
  n = jnp.maximum(n, 1)[:, None].astype(jnp.float32)
  batch_term = jnp.maximum(jnp.exp(logq) - num_uniform / n, 0.0)
  return jnp.log(batch_term + per_device / n)


def step_loss(settings: StepSettings, src_rows, dst_rows, rel_params, src_ids, dst_ids, rel,
              rel_reverse, weight, logq, src_valid, dst_valid, dropout_key=None):
  """src_rows, dst_rows [S, C+U, d], rel_params [R_g, ...] -> summed loss of S chunks."""
  params = rel_params[rel]  # [S, ...] ([S, C, ...] with mixed-relation chunks)
  reverse_params = rel_params[rel_reverse]  # [S, ...]
  penalty = 0.0
  if settings.regularize_relations:  # make_train_steps sets it only with a lambda
    # On the parameters themselves, not their dropped-out copies. Source
    # corruption scores with the reverse parameters only when relations are
    # reciprocal; otherwise both sides use the forward ones.
    source_side = reverse_params if settings.reciprocal else params
    penalty = settings.regularization * jnp.sum(jax.vmap(functools.partial(
        regularizers.relation_penalty, settings.regularizer, settings.operator))(
            params, source_side, weight))
  if settings.relation_dropout:
    forward_key, reverse_key = jax.random.split(dropout_key)
    params = _dropout(forward_key, params, settings.relation_dropout)
    reverse_params = _dropout(reverse_key, reverse_params, settings.relation_dropout)
  uniform_lse = None
  if settings.global_candidates:
    uniform_lse = global_uniform_lse(settings, src_rows, dst_rows, params, reverse_params,
                                     src_ids, dst_ids, weight, logq, src_valid, dst_valid)
  return penalty + jnp.sum(jax.vmap(functools.partial(chunk_loss, settings))(
      src_rows, dst_rows, src_ids, dst_ids, params, reverse_params, weight, logq, src_valid,
      dst_valid, uniform_lse))


def _dropout(key: jax.Array, x: jax.Array, rate: float) -> jax.Array:
  """Inverted dropout: x_i * b_i / (1 - rate), b_i ~ Bernoulli(1 - rate)."""
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0)


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


def _step_log_q(settings: StepSettings, batch: StepBatch):
  """negatives.log_q, with the uniform terms of global candidates (sampled
  draws with the correction on; see global_uniform_log_count)."""
  logq = negatives.log_q(batch)
  if not settings.global_candidates or settings.all_candidates or batch.src_logq is None:
    return logq
  c, u, per_device = batch.src.shape[1], settings.num_uniform, settings.uniform_per_device
  return (global_edge_log_q(logq[0], batch.src_n, u, per_device),
          global_edge_log_q(logq[1], batch.dst_n, u, per_device),
          global_uniform_log_count(batch.src_n, c, per_device),
          global_uniform_log_count(batch.dst_n, c, per_device))


def one_step(settings: StepSettings, carry, batch: StepBatch):
  """One step of S chunks (or, with settings.skip_padding, nothing when all
  its edges are padding: with T steps per call a group's last call is mostly
  padding when a bucket holds few steps, e.g. 17 real steps in 2 calls of 16)."""
  if not settings.skip_padding:
    return _real_step(settings, carry, batch)
  nothing = lambda carry, batch: (carry, (jnp.zeros((), jnp.float32),
                                          jnp.zeros((), jnp.int32)))
  return jax.lax.cond(jnp.any(batch.weight > 0), functools.partial(_real_step, settings),
                      nothing, carry, batch)


def _real_step(settings: StepSettings, carry, batch: StepBatch):
  """One step of S chunks: draw negatives, score, update rows and relations."""
  state, key = carry
  num_uniform = settings.num_uniform
  step_key = jax.random.fold_in(key, batch.step_index)
  src_key, dst_key = jax.random.split(step_key)
  if settings.all_candidates:
    neg_src, src_valid = negatives.all_rows(batch.src_lo, batch.src_n, num_uniform)  # [S, U]
    neg_dst, dst_valid = negatives.all_rows(batch.dst_lo, batch.dst_n, num_uniform)  # [S, U]
  else:
    if settings.global_candidates:
      num_uniform = settings.uniform_per_device
    neg_src = negatives.draw_uniform(src_key, batch.src_lo, batch.src_n, num_uniform)  # [S, U]
    neg_dst = negatives.draw_uniform(dst_key, batch.dst_lo, batch.dst_n, num_uniform)  # [S, U]
    src_valid = dst_valid = jnp.ones(neg_src.shape, bool)
    if settings.global_candidates:
      # An empty range (a tournament slot past the partition's end) draws
      # row lo, which is no candidate; locally only its own padding saw it.
      src_valid = jnp.broadcast_to((batch.src_n > 0)[:, None], neg_src.shape)
      dst_valid = jnp.broadcast_to((batch.dst_n > 0)[:, None], neg_dst.shape)
  src_ids = jnp.concatenate([batch.src, neg_src], axis=1)  # [S, C+U]
  dst_ids = jnp.concatenate([batch.dst, neg_dst], axis=1)  # [S, C+U]
  dst_table = state.home.table if state.visiting is None else state.visiting.table
  src_rows = state.home.table.at[src_ids].get(mode="clip")  # [S, C+U, d]
  dst_rows = dst_table.at[dst_ids].get(mode="clip")  # [S, C+U, d]
  loss, (src_grads, dst_grads, param_grads) = jax.value_and_grad(
      functools.partial(step_loss, settings), argnums=(0, 1, 2))(
          src_rows, dst_rows, state.rel_params, src_ids, dst_ids, batch.rel,
          batch.rel if batch.rel_reverse is None else batch.rel_reverse, batch.weight,
          _step_log_q(settings, batch), src_valid, dst_valid,
          # Its own stream: the negatives' keys stay what they were without dropout.
          jax.random.fold_in(step_key, 2) if settings.relation_dropout else None)
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
                     all_candidates: bool = False, global_candidates: bool = False,
                     regularize_relations: bool = False, relation_dropout: float = 0.0):
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
  keeps popular entities from growing without bound; ``regularize_relations``
  adds the same penalty on the relation parameters each edge uses.
  ``relation_dropout`` (p) drops each relation parameter a chunk uses with
  probability p in training (StepSettings.relation_dropout).

  ``matmul_precision`` sets the chunk score matmuls only (model.compare_all);
  tables, gradients and Adagrad state stay float32.

  ``all_candidates`` (1-vs-all): ``num_uniform`` is then the largest range
  (rows of a loaded type sub-partition) and every row of it is a candidate.

  ``global_candidates`` (softmax loss; negatives.global_candidates decides):
  on a mesh of more than one device, every edge's softmax runs over the
  uniform candidates of all devices (global_uniform_lse), as on one device.
  One device, or no mesh, is the plain step, bit for bit.
  """
  if global_candidates and loss != "softmax":
    raise ValueError(f"global candidates need the softmax loss, got {loss!r}")
  global_candidates = bool(global_candidates and mesh is not None and mesh.size > 1
                           and num_uniform > 0)
  settings = StepSettings(operator, comparator, loss, margin, lr, relation_lr, num_uniform,
                          reciprocal, regularization, l2_to_previous, mesh is not None,
                          regularizer, model.resolve_matmul_precision(matmul_precision),
                          all_candidates, global_candidates,
                          -(-num_uniform // mesh.size) if global_candidates else 0,
                          skip_padding=mesh is None or mesh.size == 1,
                          regularize_relations=bool(regularize_relations and regularization),
                          relation_dropout=float(relation_dropout))
  if mesh is None:
    return jax.jit(functools.partial(local_steps, settings), donate_argnums=(0,))
  state_spec = state_lib.state_spec(visiting, anchored=bool(l2_to_previous))
  batch_spec = jax.sharding.PartitionSpec(sharding_lib.AXIS)
  replicated = sharding_lib.REPLICATED
  mapped = jax.shard_map(functools.partial(sharded_steps, settings), mesh=mesh,
                         in_specs=(state_spec, batch_spec, replicated),
                         out_specs=(state_spec, replicated, replicated), check_vma=False)
  return jax.jit(mapped, donate_argnums=(0,))
