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
  rotation          (a + ib) * e^{i phi}, halves of x        phi in R^{d/2}
  linear            p @ x                                    p in R^{d x d}

rotation is RotatE's operator (Sun et al., ICLR 2019): complex_diagonal with
every coordinate of the relation on the unit circle, c + ie = cos phi +
i sin phi, parameterised by its phases. It keeps every modulus,
|op(x)_k| = |x_k|, so op is orthogonal: its inverse and its adjoint are the
rotation by -phi, and (unlike diagonal and complex_diagonal) no rescaling of
the rows can be absorbed by the relation. RotatE's own score is the distance
-sum_k |op(x)_k - v_k| (an l1 norm of complex moduli); the nearest here is
the l2 comparator, -|op(x) - v|^2.

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
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

_COS_EPS = 1e-9
#: The operators and comparators a config may name (config.validate reads
#: these; add a name here with its case in the functions below).
OPERATORS = ("none", "translation", "diagonal", "complex_diagonal", "rotation", "linear")
#: Operators whose dimension holds complex numbers (real half, imaginary half),
#: so it must be even.
COMPLEX_OPERATORS = ("complex_diagonal", "rotation")
COMPARATORS = ("dot", "cos", "l2")
#: How relation parameters start (config model.relation_init).
RELATION_INITS = ("identity", "random")


def init_operator_params(operator: str, num_relations: int, dim: int, init: str = "identity",
                         scale: float = 1e-3, rng: np.random.Generator | None = None) -> np.ndarray:
  """Initial parameters of ``num_relations`` relations of one operator.

  ``init="identity"``: every operator starts as a no-op (PyTorch-BigGraph's
  choice), so the first epochs train the entity rows against the plain
  comparator. ``init="random"``: every parameter ~ N(0, scale^2), like the
  entity rows (Lacroix et al. 2018's CP / ComplEx start): the form that an N3
  penalty on the relations (``model.regularize_relations``) needs, since a
  penalty on parameters that start at modulus 1 pulls every relation to the
  zero map before the entity rows have grown (regularizers.py).
  """
  if init == "random":
    shape = init_operator_params(operator, num_relations, dim).shape
    rng = rng if rng is not None else np.random.default_rng(0)
    return (scale * rng.standard_normal(shape)).astype(np.float32)
  if init != "identity":
    raise ValueError(f"unknown relation init {init!r}; choose from {RELATION_INITS}")
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
  if operator == "rotation":
    return np.zeros((num_relations, dim // 2), np.float32)  # phase 0: e^{i0} = 1
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
    half = param.shape[-1] // 2
    return complex_multiply(x, param[..., :half], param[..., half:])
  if operator == "rotation":
    return rotate(x, param)
  if operator == "linear":
    return jnp.einsum("...ij,...j->...i", param, x)  # [..., d]
  raise ValueError(f"unknown operator {operator!r}")


def complex_multiply(x, c, e, xp=jnp):
  """Rows x [..., d] (real half a, imaginary half b) times c + ie [..., d/2]:

      (a + ib)(c + ie) = (ac - be) + i(ae + bc)

  ``xp``: jax.numpy, or numpy for the host-side formulas (Eq. 5)."""
  half = x.shape[-1] // 2
  a, b = x[..., :half], x[..., half:]
  return xp.concatenate([a * c - b * e, a * e + b * c], axis=-1)


def rotate(x, phases, xp=jnp):
  """Rows x [..., d] times e^{i phases} = cos phases + i sin phases [..., d/2].
  Rotating by -phases undoes it (the inverse and the adjoint of the rotation)."""
  return complex_multiply(x, xp.cos(phases), xp.sin(phases), xp)


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


#: Precisions of the score matmuls (config ``model.matmul_precision``).
MATMUL_PRECISIONS = ("auto", "float32", "tf32", "bfloat16")


def resolve_matmul_precision(name: str, backend: str | None = None) -> str:
  """"auto" -> "tf32" on GPU (JAX's own default there), "float32" elsewhere.

  On CPU bf16 gains nothing (XLA's CPU dot has no bf16 fast path): the step
  alone ran 1.01x fp32's edges/s at d=128 with 50 + 50 negatives and 0.94x
  at d=200 with 25 + 1000 (tools/bench_step.py settings, 2 shared cores), so
  CPU stays float32. bf16 holds FB15k-237's quality: configs/fb15k237.py,
  10 epochs, filtered test MRR 0.3067 in both (Hits@10 0.4861 vs 0.4863).
  On an H200 (docs/gpu/h200/2026-11-29) bf16 ran the step at 0.94-0.95x
  tf32's edges/s (d=100, 500 + 500 negatives: matmuls too small for the
  matrix units to bound them), and FB15k-237 scored 0.3052 in float32 and
  tf32 and 0.3051 in bf16, so GPUs stay tf32.
  """
  if name not in MATMUL_PRECISIONS:
    raise ValueError(f"matmul_precision {name!r} not in {MATMUL_PRECISIONS}")
  backend = backend or jax.default_backend()
  if name == "auto":
    return "tf32" if backend == "gpu" else "float32"
  if name == "tf32" and backend != "gpu":
    raise ValueError(f"matmul_precision 'tf32' needs an NVIDIA GPU (backend is {backend!r}); "
                     "use 'float32' or 'bfloat16'")
  return name


def _matmul(u: jax.Array, v: jax.Array, precision: str | None) -> jax.Array:
  """u [..., A, d] . v [..., B, d] -> [..., A, B] at a resolved precision.

    None      XLA's default for the backend (evaluation, retrieval)
    float32   true fp32 products (lax.Precision.HIGHEST; on a GPU this turns TF32 off)
    tf32      lax.Precision.DEFAULT on an NVIDIA GPU, which is TF32 tensor cores
              with fp32 sums on Ampere and later: the path fp32 matmuls took
              before this option existed
    bfloat16  u and v rounded to bf16 (8 significant bits), products summed in
              fp32 (preferred_element_type): the same numbers on every backend
              (XLA's CPU dot silently ignores a bf16 precision hint)

  Only the operands are rounded; autodiff casts the gradient back to the fp32
  rows, so tables and Adagrad state stay fp32.
  """
  if precision is None:
    return jnp.einsum("...ad,...bd->...ab", u, v)
  if precision == "bfloat16":
    u, v = u.astype(jnp.bfloat16), v.astype(jnp.bfloat16)
  dot_precision = {"float32": jax.lax.Precision.HIGHEST, "tf32": jax.lax.Precision.DEFAULT,
                   "bfloat16": None}[precision]
  return jnp.einsum("...ad,...bd->...ab", u, v, precision=dot_precision,
                    preferred_element_type=jnp.float32)


def compare_all(comparator: str, u: jax.Array, v: jax.Array,
                precision: str | None = None) -> jax.Array:
  """All-pairs scores as one matmul: u [..., A, d], v [..., B, d] -> [..., A, B].

  ``precision``: a resolved matmul precision (see resolve_matmul_precision);
  the cos normalisation and the l2 norms stay fp32 whatever it is.
  """
  if comparator == "cos":
    u, v = _normalize(u), _normalize(v)
  dots = _matmul(u, v, precision)  # [..., A, B]
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


def group_operator(group: str) -> str:
  return group.split(":")[0]


def group_dim(group: str) -> int:
  return int(group.split(":")[1])


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
    init: how parameters start (RELATION_INITS; init_operator_params).
    init_scale: the standard deviation of ``init="random"``.
    seed: seeds ``init="random"`` (train.seed), one stream per group.
  """
  names: tuple[str, ...]
  operators: tuple[str, ...]
  dims: tuple[int, ...]
  group: tuple[str, ...]
  row: tuple[int, ...]
  groups: dict
  reciprocal: bool = False
  reverse_row: tuple[int, ...] = ()
  init: str = "identity"
  init_scale: float = 1e-3
  seed: int = 0

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
               reciprocal, reverse_row, str(config.model.get("relation_init", "identity")),
               float(config.model.init_scale), int(config.train.seed))

  def init_params(self) -> dict[str, np.ndarray]:
    copies = 2 if self.reciprocal else 1
    params = {}
    for index, (name, members) in enumerate(self.groups.items()):
      # One seeded stream per group (its config-order index), so a group's
      # start does not depend on the sizes of the others.
      rng = np.random.default_rng([self.seed, index])
      params[name] = init_operator_params(name.split(":")[0], copies * len(members),
                                          int(name.split(":")[1]), self.init, self.init_scale, rng)
    return params

  def param(self, params: dict, relation: int):
    """The parameter array of one relation (index in config order)."""
    return params[self.group[relation]][self.row[relation]]

  def reverse_param(self, params: dict, relation: int):
    """Parameters used when corrupting the source (the forward ones unless reciprocal)."""
    return params[self.group[relation]][self.reverse_row[relation]]

  def score_targets(self, params: dict, comparator: str, relation: int,
                    sources: jax.Array, candidates: jax.Array) -> jax.Array:
    """Scores of sources [B, d] against candidate targets [N, d] -> [B, N]."""
    query = target_query(self.operators[relation], comparator, self.param(params, relation),
                         sources)
    return score(self.operators[relation], query, candidates)

  def score_sources(self, params: dict, comparator: str, relation: int,
                    candidates: jax.Array, targets: jax.Array) -> jax.Array:
    """Scores of candidate sources [N, d] against targets [B, d] -> [B, N]."""
    query = source_query(self.operators[relation], comparator, self.reciprocal,
                         self.param(params, relation), self.reverse_param(params, relation),
                         targets, per_row=False, fold=False)
    return score(self.operators[relation], query, candidates)


# --------------------------------------------------------------------------
# The scoring rule of each query direction: one known end -> a query.


class Query(NamedTuple):
  """How the candidates c [N, d] of B queries are scored:

      score[b, n] = compare(vectors_b, c_n) + offset_b            (a query vector)
      score[b, n] = compare(vectors_b, op(candidate_params, c_n))  (no single one)

  ``offset`` [B] is None where it is 0, or where the caller drops it (it is
  constant per query, so no rank depends on it).
  """
  vectors: jax.Array  # [B, d]
  comparator: str
  offset: jax.Array | None = None  # [B]
  candidate_params: jax.Array | None = None


def target_query(operator: str, comparator: str, params, sources: jax.Array) -> Query:
  """Target candidates of known sources [B, d]: f = compare(op_r(theta_s), c), eq. (1)."""
  return Query(apply_operator(operator, params, sources), comparator)


def folds_into_query(operator: str, comparator: str) -> bool:
  """Whether candidate sources of a target have one query vector per target
  (so queries of several relations share a batch): the operator is none, the
  comparator dot (the adjoint), l2 with translation (a shifted target), or
  rotation with any comparator (a target rotated back: rotations keep norms)."""
  return (operator in ("none", "rotation") or comparator == "dot"
          or (comparator == "l2" and operator == "translation"))


def source_query(operator: str, comparator: str, reciprocal: bool, params, reverse_params,
                 targets: jax.Array, *, per_row: bool = True, fold: bool = True,
                 with_offset: bool = True) -> Query:
  """Source candidates s' of known targets t [B, d] (a corrupted source).

    reciprocal       compare(op_r'(theta_t), s'), the reverse parameters, eq. (1')
    otherwise        f(s', r, t) = compare(op_r(s'), theta_t), folded when it can:
      none             compare(theta_t, s')
      dot              s' . (A_r^T theta_t) + b_r . theta_t, op_r(x) = A_r x + b_r
                       (the adjoint; ``offset`` = b_r . theta_t)
      l2, translation  -|s' + p - t|^2 = -|s' - (t - p)|^2
      l2 / cos, rotation  compare(R_phi s', t) = compare(s', R_{-phi} t)
      others           compare(theta_t, op_r(s')): the candidates are transformed

  ``params`` / ``reverse_params``: one relation's parameters, or one row per
  target [B, ...] with ``per_row``. ``fold=False`` keeps the exact form
  compare(theta_t, op_r(s')) for every operator (the training step, whose
  scores must equal the batch block's transpose). Every comparator is
  symmetric, so the target may stand on the left.
  """
  if reciprocal:
    return Query(apply_operator(operator, reverse_params, targets), comparator)
  if operator == "none":
    return Query(targets, comparator)
  if fold and comparator == "dot":
    vectors, offset = adjoint(operator, params, targets, per_row=per_row)
    return Query(vectors, "dot", offset if with_offset else None)
  if fold and operator == "rotation":  # l2 or cos: rotations keep norms
    return Query(rotate(targets, -params), comparator)
  if fold and folds_into_query(operator, comparator):  # l2 + translation
    return Query(targets - params, "l2")
  return Query(targets, comparator, candidate_params=params)


def score(operator: str, query: Query, candidates: jax.Array,
          precision: str | None = None) -> jax.Array:
  """Scores of a Query's B queries against candidates [N, d] -> [B, N]
  (``precision``: of the matmul, see compare_all)."""
  if query.candidate_params is not None:
    candidates = apply_operator(operator, query.candidate_params, candidates)  # [N, d]
  scores = compare_all(query.comparator, query.vectors, candidates, precision)  # [B, N]
  return scores if query.offset is None else scores + query.offset[:, None]


def adjoint(operator: str, params, targets: jax.Array, per_row: bool = True):
  """(g [B, d], b . t [B]) with op(p, x) . t_b = x . g_b + op(p, 0) . t_b for all x.

  Every operator is affine in x, so the pullback of its linear part at 0 is
  exact: g_b = J_b^T t_b (translation: t; diagonal: p * t; linear: P^T t).
  ``params``: one row per target [B, ...] (``per_row``) or one for all.
  """
  def one(param, target):
    at_zero, pullback = jax.vjp(lambda x: apply_operator(operator, param, x),
                                jnp.zeros_like(target))
    return pullback(target)[0], jnp.dot(at_zero, target)
  return jax.vmap(one, in_axes=(0 if per_row else None, 0))(params, targets)  # [B, d], [B]


# --------------------------------------------------------------------------
# The rule inverted: the vector that scores one edge best (paper Eq. 5; the
# formulas per operator and comparator are in inductive.py's docstring).

SUPPORTED_OPERATORS = ("none", "translation", "diagonal", "complex_diagonal", "rotation",
                       "linear")
_SINGULAR = 1e-6


def _check_operator(operator: str) -> None:
  if operator not in SUPPORTED_OPERATORS:
    raise ValueError(f"inductive embedding (Eq. 5) does not support operator {operator!r}; "
                     f"supported: {SUPPORTED_OPERATORS}")


def source_vectors(operator: str, param: np.ndarray, targets: np.ndarray,
                   comparator: str) -> np.ndarray:
  """g_e [E, d] for edges (x, r, t_e) of a new source x (module doc)."""
  _check_operator(operator)
  t = np.asarray(targets, np.float32)
  p = np.asarray(param, np.float32)
  if operator == "none":
    return t.copy()
  if operator == "rotation":  # orthogonal: the adjoint is the inverse, R_{-phi} t
    if comparator not in COMPARATORS:
      raise ValueError(f"unknown comparator {comparator!r}")
    return rotate(t, -p, xp=np)
  if comparator == "dot":  # adjoint A^T t
    if operator == "translation":
      return t.copy()
    if operator == "diagonal":
      return t * p
    if operator == "complex_diagonal":  # conj(p) * t
      half = t.shape[-1] // 2
      return complex_multiply(t, p[:half], -p[half:], xp=np)
    return t @ p  # rows of (P^T t) = t P
  if comparator not in ("l2", "cos"):
    raise ValueError(f"unknown comparator {comparator!r}")
  if operator == "translation":  # inverse
    return t - p
  if operator == "diagonal":
    if np.min(np.abs(p)) < _SINGULAR:
      raise ValueError("diagonal relation parameter has a zero entry: no inverse")
    return t / p
  if operator == "complex_diagonal":
    half = t.shape[-1] // 2
    c, e = p[:half], p[half:]
    modulus = c * c + e * e
    if np.min(modulus) < _SINGULAR:
      raise ValueError("complex_diagonal relation parameter has a zero entry: no inverse")
    re, im = t[:, :half], t[:, half:]
    return np.concatenate([(re * c + im * e) / modulus, (im * c - re * e) / modulus], axis=1)
  if np.linalg.cond(p) > 1 / _SINGULAR:
    raise ValueError("linear relation parameter is singular: no inverse")
  return np.linalg.solve(p, t.T).T


def target_vectors(operator: str, param: np.ndarray, sources: np.ndarray) -> np.ndarray:
  """g_e [E, d] = op_r(theta_s) for edges (s_e, r, x) of a new target x."""
  _check_operator(operator)
  return np.asarray(apply_operator(operator, jnp.asarray(param), jnp.asarray(
      np.asarray(sources, np.float32))))
