"""Losses over a chunk's positive scores and its shared-negative score matrix.

All functions take

  pos       [C]        scores f(e) of the chunk's positive edges
  neg       [C, N]     scores f(e') of each edge against the chunk's N shared
                       negatives (batch negatives + uniform negatives)
  neg_mask  [C, N]     1 where the negative is real (not the edge itself, not
                       a padded edge), else 0
  weight    [C]        per-edge weight (relation weight x edge weight; 0 for
                       padding)

and return the summed (not averaged) loss, like PyTorch-BigGraph, so a chunk of
padding contributes nothing and the learning rate means the same at any chunk
size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_jvp
def log_sigmoid(x: jax.Array) -> jax.Array:
  """log sigma(x) = min(x, 0) - log(1 + exp(-|x|)), stable for any x.

  Same values as jax.nn.log_sigmoid, but about 3x faster forward and backward
  on XLA:CPU (measured), and the loss is a third of the step's time. The
  derivative is given explicitly, d/dx log sigma(x) = sigma(-x): differentiating
  min and |x| separately would give 1 instead of 1/2 at x = 0.
  """
  return jnp.minimum(x, 0.0) - jnp.log1p(jnp.exp(-jnp.abs(x)))


@log_sigmoid.defjvp
def _log_sigmoid_jvp(primals, tangents):
  (x,), (x_dot,) = primals, tangents
  return log_sigmoid(x), x_dot * jax.nn.sigmoid(-x)


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  return jnp.sum(values * mask, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)


def logistic(pos, neg, neg_mask, weight, margin=None):
  """Logistic loss (paper Eq. 2), negatives averaged per positive:

      L = - sum_e w_e [ log sigma(f(e)) + 1/|N_e| sum_{e' in N_e} log sigma(-f(e')) ]

  Averaging over the negatives (as PyTorch-BigGraph does) keeps one positive
  and its negatives on an equal footing whatever the number of negatives.
  """
  del margin
  pos_term = log_sigmoid(pos)  # [C]
  neg_term = _masked_mean(log_sigmoid(-neg), neg_mask)  # [C]
  return -jnp.sum(weight * (pos_term + neg_term))


def softmax(pos, neg, neg_mask, weight, margin=None):
  """Softmax (sampled cross-entropy) loss:

      L = - sum_e w_e [ f(e) - log( exp f(e) + sum_{e' in N_e} exp f(e') ) ]
  """
  del margin
  masked_neg = jnp.where(neg_mask > 0, neg, -jnp.inf)  # [C, N]
  logits = jnp.concatenate([pos[:, None], masked_neg], axis=1)  # [C, 1+N]
  log_z = jax.nn.logsumexp(logits, axis=1)  # [C]
  return -jnp.sum(weight * (pos - log_z))


def ranking(pos, neg, neg_mask, weight, margin=0.1):
  """Margin ranking loss:

      L = sum_e w_e sum_{e' in N_e} max(0, margin - f(e) + f(e'))
  """
  hinge = jax.nn.relu(margin - pos[:, None] + neg) * neg_mask  # [C, N]
  return jnp.sum(weight * jnp.sum(hinge, axis=1))


LOSSES = {"logistic": logistic, "softmax": softmax, "ranking": ranking}
