"""The negative sampler: chunk classes, uniform draws, log-q and masks.

A chunk holds C edges of one *chunk class*; each edge is scored against

  batch negatives    the other C - 1 edges' entities on the corrupted side
  uniform negatives  U rows drawn uniformly, per chunk and side, from the
                     corrupted type's loaded (sub-)partition

Host side (numpy, batching.py): which edges share a chunk (``chunk_classes``)
and the log of each candidate's expected count among a chunk's negatives
(``sampling_log_counts``, ``uniform_log_count``); device_batching.py computes
the same equation inside jit when batches are prepared on the device. Device side (jax, inside the
jitted step): the uniform draws (``draw_uniform``), the candidates' log q
(``log_q``) and which candidates count as negatives (``negative_mask``).

With the log-q correction (``negatives.logq_correction``) a negative's logit
f(e') becomes f(e') - log q(e'): sum_{e'} exp(f(e')) / q(e') is an unbiased
estimate of the sum over *all* candidates, so the sampled softmax approximates
the full softmax (Bengio & Senecal 2008; Yi et al. 2019, "logQ correction").
Without it, batch negatives, drawn in proportion to degree, cancel the
popularity prior that ranking needs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def chunk_classes(relations, relation_group: tuple[str, ...], mix_relations: bool) -> np.ndarray:
  """Chunk class of every relation [R] int64.

  Edges of one class share chunks (and so batch negatives). One relation per
  class, or, with ``negatives.mix_relations``, every relation of one
  parameter group between the same two entity types (PBG's dynamic
  relations): a chunk then mixes relations and its batch negatives follow the
  types' overall degrees, not one relation's few popular answers.
  ``relations``: the graph's relation infos (.source, .target);
  ``relation_group``: each relation's parameter group.
  """
  if not mix_relations:
    return np.arange(len(relations), dtype=np.int64)
  keys = [(relation_group[r], info.source, info.target) for r, info in enumerate(relations)]
  ordered = sorted(set(keys))
  return np.asarray([ordered.index(k) for k in keys], np.int64)


def sampling_log_counts(rel, src, dst, rel_counts, src_sizes, dst_sizes, chunk: int,
                        num_uniform: int):
  """Per-edge log q of its source and of its target (see step.StepBatch).

  A chunk of C edges of relation r (or chunk class r, in mixed chunks) offers
  each edge the other C - 1 edges' entities as negatives, so entity v appears
  there about (C - 1) c_r(v) / n_r times (c_r(v): v's edges of r in this
  bucket, n_r: all of them),
  and among U uniform draws from a (sub-)partition of N rows U / N times:

      q(v) = (C - 1) c_r(v) / n_r + U / N

  ``src_sizes``, ``dst_sizes``: N of each edge's source / target range [E].
  """
  def per_edge(entity, sizes):
    key = rel.astype(np.int64) * (int(entity.max(initial=0)) + 1) + entity
    _, inverse, key_counts = np.unique(key, return_inverse=True, return_counts=True)
    count = key_counts[inverse].astype(np.float64)
    share = count / np.maximum(rel_counts[rel], 1)
    return np.log((chunk - 1) * share + num_uniform / np.maximum(sizes, 1))

  return per_edge(src, src_sizes), per_edge(dst, dst_sizes)


def uniform_candidates(config, graph) -> int:
  """U, the uniform candidates per chunk and side: ``negatives.num_uniform``,
  or with ``negatives.all_candidates`` (1-vs-all) the rows of the largest
  partition of any type (a device's range is never larger), every row of a
  range then being one candidate (``all_rows``)."""
  if config.negatives.get("all_candidates", False):
    return max(info.partition_size for info in graph.entities.values())
  return int(config.negatives.num_uniform)


def uniform_log_count(sizes: np.ndarray, chunk: int, num_uniform: int) -> np.ndarray:
  """log q of a uniform draw from N = ``sizes`` rows: U / N plus the batch
  term of an average entity, (C - 1) / N."""
  return np.log((max(num_uniform, 1) + chunk - 1) / np.maximum(sizes, 1)).astype(np.float32)


# --------------------------------------------------------------------------
# Inside the jitted step.


def draw_uniform(key: jax.Array, lo: jax.Array, n: jax.Array, num_uniform: int) -> jax.Array:
  """U uniform rows per chunk from its range [lo, lo + n): lo + randint(n).

  lo, n: [S] -> rows [S, U] (an empty range, n = 0, draws row lo)."""
  return lo[:, None] + jax.random.randint(
      key, (lo.shape[0], num_uniform), 0, jnp.maximum(n, 1)[:, None])  # [S, U]


def all_rows(lo: jax.Array, n: jax.Array, num_rows: int) -> tuple[jax.Array, jax.Array]:
  """Every row of each chunk's range [lo, lo + n), padded to a static
  ``num_rows`` (>= every n): (rows [S, num_rows], valid [S, num_rows]), the
  padding positions pointing at row lo and marked invalid."""
  position = jnp.arange(num_rows)[None, :]  # [1, N]
  valid = position < n[:, None]  # [S, N]
  return lo[:, None] + jnp.where(valid, position, 0), valid


def log_q(batch) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """(src [S, C], dst [S, C], uniform src [S], uniform dst [S]) log q of one
  step's candidates; zeros (no correction) when the batch carries none."""
  if batch.src_logq is None:
    s, c = batch.src.shape
    zeros_c, zeros_s = jnp.zeros((s, c), jnp.float32), jnp.zeros((s,), jnp.float32)
    return zeros_c, zeros_c, zeros_s, zeros_s
  return batch.src_logq, batch.dst_logq, batch.uniform_src_logq, batch.uniform_dst_logq


def negative_mask(ids: jax.Array, weight: jax.Array, num_uniform: int,
                  uniform_valid: jax.Array | None = None,
                  batch_negatives: bool = True) -> jax.Array:
  """[C, C+U]: candidate j counts as a negative of edge i when it is a real
  edge's entity (weight > 0) or a (valid) uniform candidate *and not the same
  entity* as edge i's positive.

  ``ids`` [C+U]: the corrupted side's rows, the chunk's C then the U uniform
  draws. Besides the diagonal this drops the duplicates that single-relation
  chunks are full of (a gender or nationality relation has a handful of
  targets): they are true answers, not negatives. ``uniform_valid`` [U]
  (default: all) marks the padding of ``all_rows``; ``batch_negatives=False``
  drops the chunk's own entities as negatives (with every row among the
  uniform candidates they would count twice).
  """
  c = weight.shape[0]
  from_batch = (weight > 0) if batch_negatives else jnp.zeros_like(weight, bool)
  from_uniform = jnp.ones((num_uniform,), bool) if uniform_valid is None else uniform_valid
  valid = jnp.concatenate([from_batch, from_uniform]).astype(jnp.float32)  # [C+U]
  return valid[None, :] * (ids[None, :] != ids[:c, None]).astype(jnp.float32)


# --------------------------------------------------------------------------
# Global candidates (sharded steps; step.global_uniform_lse).

# The settings and the rule that decides them are config logic, with no jax,
# so config.validate can use them (config.py must stay jax-free).
from twhin_jax.config import GLOBAL_CANDIDATE_SETTINGS  # noqa: E402,F401 (re-exported)
from twhin_jax.config import global_candidates  # noqa: E402,F401 (re-exported)
from twhin_jax.config import global_candidates_obstacle  # noqa: E402,F401 (re-exported)
