"""Scoring: relation operators and comparators (pure, jit-friendly).

The score of an edge (s, r, t) is

    f(s, r, t) = compare(op_r(theta_s), theta_t)                       (1)

with, for TwHIN's default (translation operator, dot comparator),
f = (theta_s + theta_r) . theta_t  (paper Eq. 1). The operator always acts on
the source side, for positives and for both kinds of negatives, so a single
scoring function serves all three (the released TwHIN code scored negatives
without the operator; we do not).

Operators, for a source row x in R^d and relation parameter p:
  none              x
  translation       x + p                                    p in R^d
  diagonal          x * p                                    p in R^d
  complex_diagonal  (a + ib) * (c + ie), halves of x and p   p in R^d
  linear            p @ x                                    p in R^{d x d}

Comparators of a transformed source u and target v:
  dot   u . v
  cos   u . v / (|u| |v|)
  l2    -|u - v|^2   (negative squared distance: larger is closer)

Relation parameters are grouped by (operator, dim): ``RelationLayout`` maps
each relation to its group and row, and the parameters are a dict
``{group_name: array [R_group, ...]}`` so one jitted step serves a group.

Reciprocal relations (``model.reciprocal``, PyTorch-BigGraph's "dynamic
relations", Lacroix et al. 2018): every relation r also has parameters r' for
the reverse direction, and source corruption scores

    f'(s', r, t) = compare(op_r'(theta_t), theta_s')                     (1')

With translation + dot and a single direction, the relation term of
(theta_s' + theta_r) . theta_t is the same for every candidate source s', so
ranking sources ignores the relation entirely; r' gives the source side its own
relation-specific term. Forward rows come first in a group, then the reverse
rows (``reverse_row``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

_COS_EPS = 1e-9
#: The operators and comparators a config may name (config.validate reads
#: these; add a name here with its case in the functions below).
OPERATORS = ("none", "translation", "diagonal", "complex_diagonal", "linear")
COMPARATORS = ("dot", "cos", "l2")


def init_operator_params(operator: str, num_relations: int, dim: int) -> np.ndarray:
  """Identity-initialised parameters: every operator starts as a no-op."""
  if operator == "none":
    return np.zeros((num_relations, 0), np.float32)
  if operator == "translation":
    return np.zeros((num_relations, dim), np.float32)
  if operator == "diagonal":
    return np.ones((num_relations, dim), np.float32)
  if operator == "complex_diagonal":
    # real part 1, imaginary part 0: multiplication by 1 + 0i.
    half = dim // 2
    return np.concatenate([np.ones((num_relations, half), np.float32),
                           np.zeros((num_relations, half), np.float32)], axis=1)
  if operator == "linear":
    return np.tile(np.eye(dim, dtype=np.float32)[None], (num_relations, 1, 1))
  raise ValueError(f"unknown operator {operator!r}")


def apply_operator(operator: str, param: jax.Array, x: jax.Array) -> jax.Array:
  """op(x) for rows x [..., d] and one relation's parameter (broadcast)."""
  if operator == "none":
    return x
  if operator == "translation":
    return x + param
  if operator == "diagonal":
    return x * param
  if operator == "complex_diagonal":
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    c, e = param[..., :half], param[..., half:]
    return jnp.concatenate([a * c - b * e, a * e + b * c], axis=-1)
  if operator == "linear":
    return jnp.einsum("...ij,...j->...i", param, x)  # [..., d]
  raise ValueError(f"unknown operator {operator!r}")


def _normalize(x: jax.Array) -> jax.Array:
  return x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + _COS_EPS)


def compare_pairs(comparator: str, u: jax.Array, v: jax.Array) -> jax.Array:
  """Row-by-row scores: u, v [..., d] -> [...]."""
  if comparator == "dot":
    return jnp.sum(u * v, axis=-1)
  if comparator == "cos":
    return jnp.sum(_normalize(u) * _normalize(v), axis=-1)
  if comparator == "l2":
    return -jnp.sum(jnp.square(u - v), axis=-1)
  raise ValueError(f"unknown comparator {comparator!r}")


def compare_all(comparator: str, u: jax.Array, v: jax.Array) -> jax.Array:
  """All-pairs scores as one matmul: u [..., A, d], v [..., B, d] -> [..., A, B]."""
  if comparator == "cos":
    u, v = _normalize(u), _normalize(v)
  dots = jnp.einsum("...ad,...bd->...ab", u, v)  # [..., A, B]
  if comparator in ("dot", "cos"):
    return dots
  if comparator == "l2":
    # -|u - v|^2 = 2 u.v - |u|^2 - |v|^2
    u_sq = jnp.sum(jnp.square(u), axis=-1)[..., :, None]  # [..., A, 1]
    v_sq = jnp.sum(jnp.square(v), axis=-1)[..., None, :]  # [..., 1, B]
    return 2.0 * dots - u_sq - v_sq
  raise ValueError(f"unknown comparator {comparator!r}")


def group_name(operator: str, dim: int) -> str:
  return f"{operator}:{dim}"


@dataclasses.dataclass(frozen=True)
class RelationLayout:
  """Where each relation's parameters live.

  Attributes:
    names: relation names in config order (the relation index).
    operators: operator of each relation.
    dims: embedding dimension of each relation (of its source/target types).
    group: group name of each relation ("operator:dim").
    row: the relation's row inside its group's stacked parameter array.
    groups: group name -> list of relation indices, in row order.
    reciprocal: whether each relation has reverse-direction parameters.
    reverse_row: row of the reverse parameters (== row when not reciprocal).
  """
  names: tuple[str, ...]
  operators: tuple[str, ...]
  dims: tuple[int, ...]
  group: tuple[str, ...]
  row: tuple[int, ...]
  groups: dict
  reciprocal: bool = False
  reverse_row: tuple[int, ...] = ()

  @classmethod
  def from_config(cls, config) -> "RelationLayout":
    names, operators, dims, group, row = [], [], [], [], []
    groups: dict[str, list[int]] = {}
    for index, rel in enumerate(config.relations):
      # config.entity_dim, spelled out: config.validate imports this module.
      dim = int(config.entities[rel["source"]].get("dim", 0) or 0) or int(config.model.dim)
      name = group_name(rel["operator"], dim)
      names.append(rel["name"])
      operators.append(rel["operator"])
      dims.append(dim)
      group.append(name)
      row.append(len(groups.setdefault(name, [])))
      groups[name].append(index)
    reciprocal = bool(config.model.reciprocal)
    reverse_row = tuple(r + len(groups[g]) if reciprocal else r for g, r in zip(group, row))
    return cls(tuple(names), tuple(operators), tuple(dims), tuple(group), tuple(row), groups,
               reciprocal, reverse_row)

  def init_params(self) -> dict[str, np.ndarray]:
    copies = 2 if self.reciprocal else 1
    return {name: init_operator_params(name.split(":")[0], copies * len(members),
                                       int(name.split(":")[1]))
            for name, members in self.groups.items()}

  def param(self, params: dict, relation: int):
    """The parameter array of one relation (index in config order)."""
    return params[self.group[relation]][self.row[relation]]

  def reverse_param(self, params: dict, relation: int):
    """Parameters used when corrupting the source (the forward ones unless reciprocal)."""
    return params[self.group[relation]][self.reverse_row[relation]]

  def score_targets(self, params: dict, comparator: str, relation: int,
                    sources: jax.Array, candidates: jax.Array) -> jax.Array:
    """Scores of sources [B, d] against candidate targets [N, d] -> [B, N]."""
    transformed = apply_operator(self.operators[relation], self.param(params, relation), sources)
    return compare_all(comparator, transformed, candidates)

  def score_sources(self, params: dict, comparator: str, relation: int,
                    candidates: jax.Array, targets: jax.Array) -> jax.Array:
    """Scores of candidate sources [N, d] against targets [B, d] -> [B, N]."""
    if self.reciprocal:  # eq. (1'): the reverse operator moves onto the target
      reverse = apply_operator(self.operators[relation], self.reverse_param(params, relation),
                               targets)
      return compare_all(comparator, reverse, candidates)
    transformed = apply_operator(self.operators[relation], self.param(params, relation), candidates)
    # Every comparator is symmetric, so targets may stand on the left.
    return compare_all(comparator, targets, transformed)
