"""Mini-batch k-means in JAX (Sculley, "Web-scale k-means clustering", WWW 2010).

Used to cluster a target type's embeddings for multi-modal user embeddings
(paper section 4.4, ``twhin_jax.mixture``) and, per subspace, to train product
quantization codebooks (``kmeans_subspaces``).

The update. Every center c keeps a count v_c of the points it has absorbed.
One step draws a mini-batch B of b points (uniformly, with replacement),
assigns each x in B to its nearest center c(x) (squared Euclidean distance),
and moves each center with a per-center learning rate eta = 1 / v_c:

    for x in B:  v_c(x) += 1;  c(x) <- (1 - 1/v_c(x)) c(x) + (1/v_c(x)) x      (Sculley, Alg. 1)

Applied point by point this is a running mean, so the whole batch collapses to
one exact vectorised update: with n_c points of the batch assigned to c and
their sum s_c,

    c <- (v_c c + s_c) / (v_c + n_c),    v_c <- v_c + n_c                       (2)

(the assignments are taken before the batch's updates, as in Alg. 1). Centers
start from k-means++ (Arthur & Vassilvitskii 2007: each next center drawn
with probability proportional to D(x)^2, the squared distance to the nearest
chosen one) over a random subsample, or from k distinct random points.
Everything is seeded (``seed`` -> ``jax.random.key``); the same inputs and
seed give the same centroids.

``kmeans_subspaces`` runs M independent problems at once with ``jax.vmap``
over the leading axis: input [M, N, d_sub] -> centroids [M, K, d_sub] and
codes [N, M] (the nearest center of each row in each subspace), which is
product quantization's training step (Jegou et al. 2011).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

INITS = ("k-means++", "random")
#: k-means++ seeding runs on at most this many points (times k, capped):
#: exact D^2 sampling over millions of rows would cost k passes over the table.
_KMEANSPP_POINTS_PER_CENTER = 64
_KMEANSPP_MIN_SAMPLE = 10_000
#: Mini-batch steps per jitted call (lax.scan length); between calls the
#: progress bar advances.
_STEPS_PER_CALL = 50
#: Rows per jitted call when assigning the whole table at the end.
_ASSIGN_BLOCK = 1 << 16


class KMeansState(NamedTuple):
  centroids: jax.Array  # [K, d]
  counts: jax.Array  # [K] float32: points absorbed by each center (v_c)


def _squared_distances(x: jax.Array, centroids: jax.Array) -> jax.Array:
  """|x - c|^2 for rows x [B, d] and centers [K, d] -> [B, K] (one matmul)."""
  x_sq = jnp.sum(jnp.square(x), axis=-1)[:, None]  # [B, 1]
  c_sq = jnp.sum(jnp.square(centroids), axis=-1)[None, :]  # [1, K]
  return jnp.maximum(x_sq - 2.0 * x @ centroids.T + c_sq, 0.0)  # [B, K]


def _nearest(x: jax.Array, centroids: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(index [B] int32, squared distance [B]) of each row's nearest center."""
  distances = _squared_distances(x, centroids)  # [B, K]
  index = jnp.argmin(distances, axis=-1).astype(jnp.int32)
  return index, jnp.take_along_axis(distances, index[:, None], axis=-1)[:, 0]


def _kmeanspp(points: jax.Array, k: int, key: jax.Array) -> jax.Array:
  """Greedy k-means++ seeding over ``points`` [S, d] -> centers [k, d].

  Each step draws L = 2 + floor(ln k) candidates with P(x) = D(x)^2 / sum D^2
  and keeps the one that lowers sum D^2 the most (the greedy variant of
  Arthur & Vassilvitskii, also scikit-learn's): plain D^2 sampling leaves two
  centers in one well-separated cluster noticeably often.
  """
  trials = 2 + int(math.log(k))
  first_key, loop_key = jax.random.split(key)
  first = points[jax.random.randint(first_key, (), 0, points.shape[0])]
  centers = jnp.zeros((k, points.shape[1]), points.dtype).at[0].set(first)
  nearest_sq = jnp.sum(jnp.square(points - first), axis=-1)  # [S]

  def add_center(i, carry):
    centers, nearest_sq = carry
    # All-zero distances (duplicate points) fall back to uniform draws.
    logits = jnp.where(jnp.sum(nearest_sq) > 0, jnp.log(nearest_sq), 0.0)
    picks = jax.random.categorical(jax.random.fold_in(loop_key, i), logits, shape=(trials,))
    candidates = points[picks]  # [L, d]
    new_sq = jnp.minimum(nearest_sq[None, :],
                         _squared_distances(candidates, points))  # [L, S]
    best = jnp.argmin(jnp.sum(new_sq, axis=-1))
    return centers.at[i].set(candidates[best]), new_sq[best]

  centers, _ = jax.lax.fori_loop(1, k, add_center, (centers, nearest_sq))
  return centers


def _init_centers(x: jax.Array, k: int, key: jax.Array, init: str) -> jax.Array:
  n = x.shape[0]
  if init == "random":
    return x[jax.random.choice(key, n, (k,), replace=False)]
  sample_size = min(n, max(_KMEANSPP_MIN_SAMPLE, _KMEANSPP_POINTS_PER_CENTER * k))
  sample_key, seed_key = jax.random.split(key)
  sample = x[jax.random.choice(sample_key, n, (sample_size,), replace=False)]
  return _kmeanspp(sample, k, seed_key)


def _minibatch_step(state: KMeansState, x: jax.Array, key: jax.Array,
                    batch_size: int) -> KMeansState:
  """One step of eq. (2) on a uniform mini-batch of ``x`` [N, d]."""
  k = state.centroids.shape[0]
  batch = x[jax.random.randint(key, (batch_size,), 0, x.shape[0])]  # [b, d]
  assigned, _ = _nearest(batch, state.centroids)  # [b]
  batch_counts = jax.ops.segment_sum(jnp.ones(batch_size, jnp.float32), assigned,
                                     num_segments=k)  # [K]
  batch_sums = jax.ops.segment_sum(batch, assigned, num_segments=k)  # [K, d]
  counts = state.counts + batch_counts
  # Centers that got no point keep their value (0/0 guarded).
  centroids = jnp.where(
      batch_counts[:, None] > 0,
      (state.counts[:, None] * state.centroids + batch_sums) / jnp.maximum(counts, 1.0)[:, None],
      state.centroids)
  return KMeansState(centroids, counts)


def _run_steps_impl(state: KMeansState, x: jax.Array, key: jax.Array, first_step: jax.Array,
                    batch_size: int, num_steps: int) -> KMeansState:
  def body(state, step):
    return _minibatch_step(state, x, jax.random.fold_in(key, step), batch_size), None
  state, _ = jax.lax.scan(body, state, first_step + jnp.arange(num_steps))
  return state


def _init_state_impl(x: jax.Array, key: jax.Array, k: int, init: str) -> KMeansState:
  return KMeansState(_init_centers(x, k, key, init), jnp.zeros(k, jnp.float32))


@functools.partial(jax.jit, static_argnames=("k", "init"))
def _init_state(x, key, *, k, init):
  return _init_state_impl(x, key, k, init)


@functools.partial(jax.jit, static_argnames=("batch_size", "num_steps"))
def _run_steps(state, x, key, first_step, *, batch_size, num_steps):
  return _run_steps_impl(state, x, key, first_step, batch_size, num_steps)


# Subspace variants: the same functions vmapped over a leading axis M (x [M, N, ds],
# one key per subspace).
@functools.partial(jax.jit, static_argnames=("k", "init"))
def _init_state_m(x, keys, *, k, init):
  return jax.vmap(lambda xm, key: _init_state_impl(xm, key, k, init))(x, keys)


@functools.partial(jax.jit, static_argnames=("batch_size", "num_steps"))
def _run_steps_m(state, x, keys, first_step, *, batch_size, num_steps):
  return jax.vmap(lambda s, xm, key: _run_steps_impl(s, xm, key, first_step, batch_size,
                                                     num_steps))(state, x, keys)


_nearest_jit = jax.jit(_nearest)
_nearest_m = jax.jit(jax.vmap(_nearest))


def _check_args(n: int, k: int, iters: int, batch_size: int, init: str) -> None:
  if init not in INITS:
    raise ValueError(f"unknown k-means init {init!r}; choose from {INITS}")
  if not 1 <= k <= n:
    raise ValueError(f"k must be in [1, N={n}], got {k}")
  if iters < 0:
    raise ValueError(f"iters must be >= 0, got {iters}")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def _train(x, k, iters, batch_size, seed, init, progress, init_fn, steps_fn, num_problems):
  key = jax.random.key(seed)
  init_key, step_key = jax.random.split(key)
  if num_problems:
    init_key = jax.random.split(init_key, num_problems)
    step_key = jax.random.split(step_key, num_problems)
  state = init_fn(x, init_key, k=k, init=init)
  bar = tqdm(total=iters, desc=f"k-means k={k}", unit="step", disable=not progress)
  done = 0
  while done < iters:
    # Full calls of _STEPS_PER_CALL, then one shorter call: at most two compilations.
    num_steps = _STEPS_PER_CALL if iters - done >= _STEPS_PER_CALL else iters - done
    state = steps_fn(state, x, step_key, jnp.int32(done), batch_size=batch_size,
                     num_steps=num_steps)
    done += num_steps
    bar.update(num_steps)
  bar.close()
  return state


def assign(x, centroids, *, block_rows: int = _ASSIGN_BLOCK) -> tuple[np.ndarray, np.ndarray]:
  """Nearest center of every row: (assignments int32 [N], squared distance [N]).

  ``x`` [N, d] may be a numpy memmap; it is read in blocks of ``block_rows``.
  """
  centroids = jnp.asarray(centroids, jnp.float32)
  ids, dists = [], []
  for start in range(0, len(x), block_rows):
    block = jnp.asarray(np.asarray(x[start:start + block_rows], np.float32))
    index, distance = _nearest_jit(block, centroids)
    ids.append(np.asarray(index))
    dists.append(np.asarray(distance))
  if not ids:
    return np.zeros(0, np.int32), np.zeros(0, np.float32)
  return np.concatenate(ids), np.concatenate(dists)


def kmeans(x, k: int, *, iters: int = 300, batch_size: int = 1024, seed: int = 0,
           init: str = "k-means++", progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """Mini-batch k-means of the rows of ``x`` (see the module doc).

  Args:
    x: [N, d] float array (numpy, memmap or jax); held in device memory.
    k: number of clusters, 1 <= k <= N.
    iters: mini-batch steps.
    batch_size: points per step (b).
    seed: PRNG seed of the init and of the mini-batches.
    init: "k-means++" (over a subsample of max(10k, 64 k) points) or "random".
    progress: tqdm bar over the steps.

  Returns:
    (centroids float32 [k, d], assignments int32 [N]: nearest centroid of each row).
  """
  x = jnp.asarray(np.asarray(x, np.float32)) if not isinstance(x, jax.Array) else x
  if x.ndim != 2:
    raise ValueError(f"kmeans expects [N, d] rows, got shape {x.shape}")
  _check_args(x.shape[0], k, iters, batch_size, init)
  state = _train(x, k, iters, batch_size, seed, init, progress, _init_state, _run_steps, 0)
  centroids = np.asarray(state.centroids)
  assignments, _ = assign(x, centroids)
  return centroids, assignments


def kmeans_subspaces(x_msd, k: int, *, iters: int = 300, batch_size: int = 1024, seed: int = 0,
                     init: str = "k-means++",
                     progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """M independent k-means problems at once (product quantization training).

  Args:
    x_msd: [M, N, d_sub] float: subspace m of every row (for PQ of a table
      [N, M * d_sub]: ``table.reshape(N, M, d_sub).transpose(1, 0, 2)``).
    k: centers per subspace (256 for one byte per code).
    iters, batch_size, seed, init, progress: as in :func:`kmeans`; each
      subspace gets its own PRNG stream split from ``seed``.

  Returns:
    (centroids float32 [M, k, d_sub], codes [N, M]: uint8 when k <= 256, else
    int32; codes[n, m] is the nearest center of row n in subspace m).
  """
  x = jnp.asarray(np.asarray(x_msd, np.float32)) if not isinstance(x_msd, jax.Array) else x_msd
  if x.ndim != 3:
    raise ValueError(f"kmeans_subspaces expects [M, N, d_sub], got shape {x.shape}")
  num_subspaces, n, _ = x.shape
  _check_args(n, k, iters, batch_size, init)
  state = _train(x, k, iters, batch_size, seed, init, progress, _init_state_m, _run_steps_m,
                 num_subspaces)
  centroids = np.asarray(state.centroids)  # [M, K, ds]
  code_dtype = np.uint8 if k <= 256 else np.int32
  codes = np.empty((n, num_subspaces), code_dtype)
  block_rows = max(1, _ASSIGN_BLOCK // max(1, num_subspaces))
  for start in range(0, n, block_rows):
    index, _ = _nearest_m(x[:, start:start + block_rows], state.centroids)  # [M, b]
    codes[start:start + block_rows] = np.asarray(index).T.astype(code_dtype)
  return centroids, codes


def inertia(x, centroids) -> float:
  """Mean squared distance of the rows of ``x`` to their nearest centroid."""
  _, distances = assign(x, centroids)
  return float(np.mean(distances)) if len(distances) else math.nan
