"""Regularisers of the rows a training step touches (pure, jit-friendly).

For a chunk of positive edges e = (s, r, t) with weights w_e, the step adds
lambda * Omega to the chunk loss (``model.regularization`` = lambda,
``model.regularizer`` picks Omega):

  l2   Omega = sum_e w_e ( |theta_s|_2^2 + |theta_t|_2^2 )

  n3   Omega = sum_e w_e ( |theta_s|_3^3 + |theta_t|_3^3 )

N3 is the weighted nuclear 3-norm of Lacroix, Usunier & Obozinski,
"Canonical Tensor Decomposition for Knowledge Base Completion" (ICML 2018),
the regulariser of the published ComplEx / CP recipes. For complex-valued
operators (complex_diagonal, rotation) |x|_3^3 = sum_i |x_i|^3 with |x_i| the modulus
sqrt(a_i^2 + b_i^2) of the i-th complex coordinate (real part in the first
half of the row, imaginary part in the second, as model.py stores them); for
real operators it is sum_i |x_i|^3.

Relation parameters (``model.regularize_relations``, relation_penalty):

  Omega_rel = sum_e w_e ( |p_r|^q + |p'_r|^q )   (q = 2 or 3 as above)

with p_r the parameters that score the edge's target side and p'_r those of
its source side (the reverse parameters with reciprocal relations, else p_r
again). Lacroix et al. penalise all three factors of a score: with a
trilinear score (diagonal, complex_diagonal), scaling both rows by c and
the relation by 1 / c^2 leaves every score unchanged and divides the entity
term by c^3, so a penalty on the rows alone can be evaded through free
relations. It needs parameters that start near zero (model.relation_init
"random"): ours start by default at the identity operator (modulus 1 per
coordinate), where |p_r|_3^3 = d/2 per edge outweighs the loss while the
entity rows are small and pulls every relation to the zero map, where all
scores vanish. Measured on Kinship (KG recipe, identity start, 8 epochs):
valid MRR stays at chance (0.017) with the relation term, 0.70 without.

Weighting every occurrence (rather than every distinct row once) is what
makes these "weighted" norms: an entity is penalised in proportion to its
degree, which is what the analysis of Lacroix et al. (and Srebro &
Salakhutdinov's weighted trace norm) asks for. Lacroix et al. divide by
the batch size of a loss averaged over queries, and each edge is two
queries there (reciprocal augmentation); our loss is summed over edges and
both directions, so their lambda corresponds to ours at about 2x theirs.

Derivatives (checked in tests/test_regularizers.py):
  d/dx x^2 = 2x;  d/dx |x|^3 = 3|x| x;  d/da (a^2 + b^2)^{3/2} = 3 sqrt(a^2 + b^2) a.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from twhin_jax.model import COMPLEX_OPERATORS

REGULARIZERS = ("l2", "n3")


def cubed_norm(x: jax.Array, complex_valued: bool) -> jax.Array:
  """|x|_3^3 over the last axis: [..., d] -> [...]."""
  if complex_valued:
    half = x.shape[-1] // 2
    squared = jnp.square(x[..., :half]) + jnp.square(x[..., half:])  # [..., d/2]
    # (a^2 + b^2)^{3/2}: pow has a finite derivative at 0, sqrt(.)^3 would give NaN.
    modulus_cubed = jnp.power(squared, 1.5)
    return jnp.sum(modulus_cubed, axis=-1)
  return jnp.sum(jnp.abs(x) ** 3, axis=-1)


def penalty(regularizer: str, operator: str, sources: jax.Array, targets: jax.Array,
            weight: jax.Array) -> jax.Array:
  """Omega of one chunk (see the module docstring).

  Args:
    regularizer: "l2" or "n3".
    operator: the chunk's relation operator (model.OPERATORS).
    sources, targets: [C, d] entity rows of the chunk's positive edges.
    weight: [C] edge weights (0 for padding).

  Returns:
    A scalar, to be multiplied by lambda and added to the chunk loss.
  """
  per_edge = _norm(regularizer, operator, sources) + _norm(regularizer, operator, targets)
  return jnp.sum(weight * per_edge)


def _norm(regularizer: str, operator: str, x: jax.Array) -> jax.Array:
  """Omega's norm of rows x [..., d] over the last axis: |x|_2^2 ("l2") or
  |x|_3^3 ("n3", complex moduli for complex operators) -> [...]."""
  if regularizer == "l2":
    return jnp.sum(jnp.square(x), axis=-1)
  if regularizer == "n3":
    return cubed_norm(x, operator in COMPLEX_OPERATORS)
  raise ValueError(f"unknown regularizer {regularizer!r}; choose from {REGULARIZERS}")


def _parameter_norm(regularizer: str, operator: str, x: jax.Array) -> jax.Array:
  """_norm of relation parameters [..., *param_shape] -> [...]: a linear
  operator's matrix counts as its d^2 entries; "none" has no parameters, and
  a rotation's are phases, whose operator has modulus 1 whatever they are
  (nothing to shrink, so nothing to penalise)."""
  if (x.ndim and x.shape[-1] == 0) or operator == "rotation":
    return jnp.zeros(x.shape[:-1], x.dtype)
  if operator == "linear":
    x = x.reshape(*x.shape[:-2], -1)
  return _norm(regularizer, operator, x)


def relation_penalty(regularizer: str, operator: str, params: jax.Array,
                     reverse_params: jax.Array, weight: jax.Array) -> jax.Array:
  """Omega_rel of one chunk (module docstring).

  params, reverse_params: one relation's parameters (broadcast to every edge)
  or one per edge [C, *param_shape] (mixed-relation chunks); weight [C].
  """
  per_edge = (_parameter_norm(regularizer, operator, params)
              + _parameter_norm(regularizer, operator, reverse_params))
  return jnp.sum(weight * per_edge)
