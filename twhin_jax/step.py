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

from twhin_jax import config as config_lib
from twhin_jax import losses as losses_lib
from twhin_jax import model
from twhin_jax import optim
from twhin_jax import sharding as sharding_lib


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


class GroupState(NamedTuple):
  """Trainable state one step updates: a working table and one relation group.

  ``table`` holds the device's *home* rows. In the rounds of the ring (see
  sharding.py) the targets come from ``visiting``, a copy of another device's
  home rows that travels around the ring; in a local round (and always with
  one device) ``visiting`` is None and both sides index ``table``.
  """
  table: jax.Array  # [R, d]
  row_state: optim.RowAdagradState  # acc [R]
  rel_params: jax.Array  # [R_g, ...]
  rel_opt: optax.OptState
  visiting: jax.Array | None = None  # [R, d]
  visiting_state: optim.RowAdagradState | None = None  # acc [R]
  # L2-to-previous (warm-started versions): the previous version's rows in
  # the same layout and a 0/1 weight per row (0: entity new in this version).
  anchor: jax.Array | None = None  # [R, d]
  anchor_weight: jax.Array | None = None  # [R]
  visiting_anchor: jax.Array | None = None  # [R, d]
  visiting_anchor_weight: jax.Array | None = None  # [R]


def resolve_matmul_precision(name: str, backend: str | None = None) -> str:
  """"auto" -> "tf32" on GPU (JAX's own default there), "float32" elsewhere.

  On CPU bf16 gains nothing (XLA's CPU dot has no bf16 fast path): the step
  alone ran 1.01x fp32's edges/s at d=128 with 50 + 50 negatives and 0.94x
  at d=200 with 25 + 1000 (tools/bench_step.py settings, 2 shared cores), so
  CPU stays float32. bf16 holds FB15k-237's quality: configs/fb15k237.py,
  10 epochs, filtered test MRR 0.3067 in both (Hits@10 0.4861 vs 0.4863).
  """
  if name not in config_lib.MATMUL_PRECISIONS:
    raise ValueError(f"matmul_precision {name!r} not in {config_lib.MATMUL_PRECISIONS}")
  backend = backend or jax.default_backend()
  if name == "auto":
    return "tf32" if backend == "gpu" else "float32"
  if name == "tf32" and backend != "gpu":
    raise ValueError(f"matmul_precision 'tf32' needs an NVIDIA GPU (backend is {backend!r}); "
                     "use 'float32' or 'bfloat16'")
  return name


def score_matmul(comparator: str, precision: str):
  """model.compare_all(comparator, u, v) -> [..., A, B] at a matmul precision.

    float32   true fp32 products (lax.Precision.HIGHEST; on a GPU this turns
              TF32 off)
    tf32      lax.Precision.DEFAULT on an NVIDIA GPU, which is TF32 tensor
              cores with fp32 sums on Ampere and later: the code path fp32
              matmuls took before this option existed
    bfloat16  u and v rounded to bf16 (8 significant bits), products summed
              in fp32 (preferred_element_type): the same numbers on every
              backend (XLA's CPU dot silently ignores a bf16 precision hint)

  Only the matmul operands are rounded: the cos normalisation and the l2
  norms (-|u - v|^2 = 2 u.v - |u|^2 - |v|^2) stay fp32, and autodiff casts
  the gradient back to the fp32 rows, so tables and Adagrad state are fp32.
  """
  precision = resolve_matmul_precision(precision)
  dot_precision = {"float32": jax.lax.Precision.HIGHEST, "tf32": jax.lax.Precision.DEFAULT,
                   "bfloat16": None}[precision]

  def compare(u, v):
    if comparator == "cos":
      u, v = model._normalize(u), model._normalize(v)
    a, b = (u, v) if precision != "bfloat16" else (u.astype(jnp.bfloat16),
                                                   v.astype(jnp.bfloat16))
    dots = jnp.einsum("...ad,...bd->...ab", a, b, precision=dot_precision,
                      preferred_element_type=jnp.float32)  # [..., A, B]
    if comparator == "l2":
      u_sq = jnp.sum(jnp.square(u), axis=-1)[..., :, None]  # [..., A, 1]
      v_sq = jnp.sum(jnp.square(v), axis=-1)[..., None, :]  # [..., 1, B]
      return 2.0 * dots - u_sq - v_sq
    if comparator not in ("dot", "cos"):
      raise ValueError(f"unknown comparator {comparator!r}")
    return dots
  return compare


@functools.lru_cache(maxsize=None)
def make_train_steps(operator: str, comparator: str, loss: str, margin: float,
                     lr: float, relation_lr: float, num_uniform: int, reciprocal: bool = False,
                     regularization: float = 0.0, mesh: jax.sharding.Mesh | None = None,
                     visiting: bool = False, l2_to_previous: float = 0.0,
                     matmul_precision: str = "auto"):
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

  ``regularization`` (lambda) adds lambda * sum_e w_e (|theta_s|^2 + |theta_t|^2)
  over the positive edges: an L2 penalty on the rows each batch touches, which
  keeps popular entities from growing without bound (FB15k-237 overfits
  without it).

  ``matmul_precision`` sets the chunk score matmuls only (see
  :func:`score_matmul`); tables, gradients and Adagrad state stay float32.
  """
  loss_fn = losses_lib.LOSSES[loss]
  compare_all = score_matmul(comparator, matmul_precision)
  rel_tx = optim.relation_adagrad(relation_lr)

  def chunk_scores(src_rows, dst_rows, src_ids, dst_ids, params, reverse_params, weight, logq):
    """src_rows, dst_rows [C+U, d] (chunk, then uniform negatives) and their
    row ids [C+U] -> chunk loss."""
    c = weight.shape[0]
    lhs, rhs = src_rows[:c], dst_rows[:c]  # [C, d] each
    neg_src, neg_dst = src_rows[c:], dst_rows[c:]  # [U, d] each
    valid = jnp.concatenate([(weight > 0).astype(jnp.float32),
                             jnp.ones((num_uniform,), jnp.float32)])  # [C+U]

    def negative_mask(ids):
      """[C, C+U]: candidate j counts as a negative of edge i when it is a real
      edge's entity (or a uniform draw) *and not the same entity* as edge i's
      positive. Besides the diagonal this drops the duplicates that
      single-relation chunks are full of (a gender or nationality relation
      has a handful of targets): they are true answers, not negatives."""
      return valid[None, :] * (ids[None, :] != ids[:c, None]).astype(jnp.float32)

    dst_mask = negative_mask(dst_ids)  # target corruption
    src_mask = negative_mask(src_ids)  # source corruption

    lhs_op = model.apply_operator(operator, params, lhs)  # [C, d]
    # Row i, column j: f(s_i, r, t_j). Its diagonal holds the positives.
    batch_block = compare_all(lhs_op, rhs)  # [C, C]
    pos = jnp.diagonal(batch_block)  # [C]
    # Target corruption: op(theta_s) against the chunk's and the uniform targets.
    uniform_dst = compare_all(lhs_op, neg_dst)  # [C, U]
    src_logq, dst_logq, uniform_src_logq, uniform_dst_logq = logq
    neg_for_dst = jnp.concatenate([batch_block - dst_logq[None, :],
                                   uniform_dst - uniform_dst_logq], axis=1)  # [C, C+U]
    if reciprocal:
      # Source corruption with the reverse parameters on the target side:
      # f'(s_j, r, t_i) = compare(op_r'(t_i), s_j), eq. (1') of model.py.
      rhs_op = model.apply_operator(operator, reverse_params, rhs)  # [C, d]
      reverse_block = compare_all(rhs_op, lhs)  # [C, C]
      pos_for_src = jnp.diagonal(reverse_block)  # [C]
      uniform_src = compare_all(rhs_op, neg_src)  # [C, U]
      neg_for_src = jnp.concatenate([reverse_block - src_logq[None, :],
                                     uniform_src - uniform_src_logq], axis=1)  # [C, C+U]
    else:
      # The same operator on the corrupted sources; edge i needs f(s_j, r, t_i),
      # the transpose of the batch block.
      pos_for_src = pos
      neg_src_op = model.apply_operator(operator, params, neg_src)  # [U, d]
      uniform_src = compare_all(rhs, neg_src_op)  # [C, U]
      neg_for_src = jnp.concatenate([batch_block.T - src_logq[None, :],
                                     uniform_src - uniform_src_logq], axis=1)  # [C, C+U]
    total = (loss_fn(pos, neg_for_dst, dst_mask, weight, margin)
             + loss_fn(pos_for_src, neg_for_src, src_mask, weight, margin))
    if regularization:
      squared = jnp.sum(jnp.square(lhs), axis=1) + jnp.sum(jnp.square(rhs), axis=1)  # [C]
      total = total + regularization * jnp.sum(weight * squared)
    return total

  def step_loss(src_rows, dst_rows, rel_params, src_ids, dst_ids, rel, rel_reverse, weight,
                logq):
    """src_rows, dst_rows [S, C+U, d], rel_params [R_g, ...] -> summed loss of S chunks."""
    params = rel_params[rel]  # [S, ...]
    reverse_params = rel_params[rel_reverse]  # [S, ...]
    return jnp.sum(jax.vmap(chunk_scores)(src_rows, dst_rows, src_ids, dst_ids, params,
                                          reverse_params, weight, logq))

  def one_step(carry, inputs):
    state, key = carry
    batch = inputs
    s, c = batch.src.shape
    step_key = jax.random.fold_in(key, batch.step_index)
    src_key, dst_key = jax.random.split(step_key)
    # U uniform negatives per chunk and side, from the entity type's loaded
    # (sub-)partition: row = lo + randint(n).
    neg_src = batch.src_lo[:, None] + jax.random.randint(
        src_key, (s, num_uniform), 0, jnp.maximum(batch.src_n, 1)[:, None])  # [S, U]
    neg_dst = batch.dst_lo[:, None] + jax.random.randint(
        dst_key, (s, num_uniform), 0, jnp.maximum(batch.dst_n, 1)[:, None])  # [S, U]
    src_ids = jnp.concatenate([batch.src, neg_src], axis=1)  # [S, C+U]
    dst_ids = jnp.concatenate([batch.dst, neg_dst], axis=1)  # [S, C+U]
    if batch.src_logq is None:
      zeros_c, zeros_s = jnp.zeros((s, c), jnp.float32), jnp.zeros((s,), jnp.float32)
      logq = (zeros_c, zeros_c, zeros_s, zeros_s)
    else:
      logq = (batch.src_logq, batch.dst_logq, batch.uniform_src_logq, batch.uniform_dst_logq)
    dst_table = state.table if state.visiting is None else state.visiting
    src_rows = state.table.at[src_ids].get(mode="clip")  # [S, C+U, d]
    dst_rows = dst_table.at[dst_ids].get(mode="clip")  # [S, C+U, d]
    loss, (src_grads, dst_grads, param_grads) = jax.value_and_grad(
        step_loss, argnums=(0, 1, 2))(
            src_rows, dst_rows, state.rel_params, src_ids, dst_ids, batch.rel,
            batch.rel if batch.rel_reverse is None else batch.rel_reverse, batch.weight, logq)
    d = src_grads.shape[-1]
    home_anchor = dict(anchor=state.anchor, anchor_weight=state.anchor_weight,
                       anchor_strength=l2_to_previous)
    if state.visiting is None:
      # Both sides live in one table: one update, so a row that is a source
      # and a target in the same step gets the sum of both gradients.
      table, row_state = optim.row_adagrad_update(
          state.table, state.row_state,
          jnp.concatenate([src_ids.reshape(-1), dst_ids.reshape(-1)]),
          jnp.concatenate([src_grads.reshape(-1, d), dst_grads.reshape(-1, d)]), lr,
          **home_anchor)
      visiting_table, visiting_state = None, None
    else:
      table, row_state = optim.row_adagrad_update(
          state.table, state.row_state, src_ids.reshape(-1), src_grads.reshape(-1, d), lr,
          **home_anchor)
      visiting_table, visiting_state = optim.row_adagrad_update(
          state.visiting, state.visiting_state, dst_ids.reshape(-1),
          dst_grads.reshape(-1, d), lr, anchor=state.visiting_anchor,
          anchor_weight=state.visiting_anchor_weight, anchor_strength=l2_to_previous)
    if mesh is not None:
      # Replicated relation parameters: sum the gradients of all devices so
      # every replica takes the same step.
      param_grads = jax.lax.psum(param_grads, sharding_lib.AXIS)
    updates, rel_opt = rel_tx.update(param_grads, state.rel_opt, state.rel_params)
    rel_params = optax.apply_updates(state.rel_params, updates)
    new_state = state._replace(table=table, row_state=row_state, rel_params=rel_params,
                               rel_opt=rel_opt, visiting=visiting_table,
                               visiting_state=visiting_state)
    return (new_state, key), (loss, jnp.sum(batch.weight > 0))

  def local_steps(state: GroupState, batch: StepBatch, key: jax.Array):
    (state, _), (step_losses, step_edges) = jax.lax.scan(one_step, (state, key), batch)
    return state, jnp.sum(step_losses), jnp.sum(step_edges)

  if mesh is None:
    return jax.jit(local_steps, donate_argnums=(0,))

  def sharded_steps(state: GroupState, batch: StepBatch, key: jax.Array):
    # Inside shard_map every batch field is [1, T, ...]: this device's slice.
    batch = jax.tree_util.tree_map(lambda x: x[0], batch)
    # The key travels as raw uint32 data (a replicated global array); each
    # device draws its own negatives.
    key = jax.random.fold_in(jax.random.wrap_key_data(key), jax.lax.axis_index(sharding_lib.AXIS))
    state, loss, edges = local_steps(state, batch, key)
    return (state, jax.lax.psum(loss, sharding_lib.AXIS),
            jax.lax.psum(edges, sharding_lib.AXIS))

  rows, replicated = sharding_lib.ROWS, jax.sharding.PartitionSpec()
  anchored = bool(l2_to_previous)
  state_spec = GroupState(rows, optim.RowAdagradState(rows), replicated, replicated,
                          rows if visiting else None,
                          optim.RowAdagradState(rows) if visiting else None,
                          rows if anchored else None, rows if anchored else None,
                          rows if anchored and visiting else None,
                          rows if anchored and visiting else None)
  batch_spec = jax.sharding.PartitionSpec(sharding_lib.AXIS)
  mapped = jax.shard_map(sharded_steps, mesh=mesh,
                         in_specs=(state_spec, batch_spec, replicated),
                         out_specs=(state_spec, replicated, replicated), check_vma=False)
  train_steps = jax.jit(mapped, donate_argnums=(0,))

  return train_steps


def init_group_state(table, acc, rel_params, relation_lr: float) -> GroupState:
  rel_params = jnp.asarray(rel_params)
  return GroupState(table=table, row_state=optim.RowAdagradState(acc=acc),
                    rel_params=rel_params,
                    rel_opt=optim.relation_adagrad(relation_lr).init(rel_params))
