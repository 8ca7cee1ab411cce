"""A downstream model over frozen TwHIN embeddings (Flax nnx) and its optax loop.

Inputs of one example: dense features x_dense [F] (already standardised by
the caller) and, per id feature j, the row id_j of an entity of type t_j
(-1: the entity has no vector, which looks up a zero vector). The model
concatenates

    h_0 = [x_dense, c_1 e_{t_1}(id_1), ..., c_J e_{t_J}(id_J), (pairwise products)]

where e_t is a *frozen* lookup, the full table (:class:`FrozenEmbed`) or
product-quantization codes decoded on the fly (``compress.PQEmbed``), and c_t
= 1 / mean row norm of the table keeps features of different types on one
scale. Optional products e_a * e_b (elementwise) give the MLP the pair's
interaction directly (for link prediction: the score of a dot comparator is
their sum). An MLP maps h_0 to one logit (binary) or C logits (multiclass).

Training: optax AdamW on the nnx.Param leaves only (the tables are
``compress.FrozenTable`` variables and never move), a jitted step over
shuffled mini-batches, and early stopping: after each epoch the validation
loss is computed; the best parameters so far are kept, and training stops
after ``patience`` epochs without improvement.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from twhin_jax.compress import FrozenTable, PQEmbed


class FrozenEmbed(nnx.Module):
  """ids [...] -> rows [..., d] of a fixed table (not trained)."""

  def __init__(self, table: np.ndarray):
    self.table = FrozenTable(jnp.asarray(np.asarray(table, np.float32)))  # [N, d]

  def __call__(self, ids: jax.Array) -> jax.Array:
    return self.table[...][ids]


@dataclasses.dataclass(frozen=True)
class IdFeature:
  """One id column of the input: its name in the batch and its entity type."""
  name: str
  entity_type: str


class DownstreamModel(nnx.Module):
  """Frozen lookups beside dense features, then an MLP (see the module doc)."""

  def __init__(self, num_dense: int, id_features: list[IdFeature], lookups: dict,
               scales: dict[str, float], products: list[tuple[str, str]], num_outputs: int,
               hidden: tuple[int, ...] = (128, 64), *, rngs: nnx.Rngs):
    self.id_features = list(id_features)
    self.products = list(products)
    self.lookups = nnx.Dict(lookups)  # entity type -> FrozenEmbed | PQEmbed
    self.scales = dict(scales)
    width = num_dense
    dims = {}
    for feature in self.id_features:
      dims[feature.name] = self._dim(lookups[feature.entity_type])
      width += dims[feature.name]
    for a, b in self.products:
      if dims[a] != dims[b]:
        raise ValueError(f"product of {a} (dim {dims[a]}) and {b} (dim {dims[b]})")
      width += dims[a]
    if width == 0:
      raise ValueError("a downstream model needs at least one feature")
    layers = []
    for size in hidden:
      layers.append(nnx.Linear(width, size, rngs=rngs))
      width = size
    self.hidden = nnx.List(layers)
    self.out = nnx.Linear(width, num_outputs, rngs=rngs)

  @staticmethod
  def _dim(lookup) -> int:
    return lookup.dim if isinstance(lookup, PQEmbed) else int(lookup.table.shape[1])

  def __call__(self, dense: jax.Array, ids: dict[str, jax.Array]) -> jax.Array:
    parts = [dense] if dense.shape[-1] else []
    vectors = {}
    for feature in self.id_features:
      row = ids[feature.name]  # [B]
      vector = self.lookups[feature.entity_type](jnp.maximum(row, 0))  # [B, d]
      vector = vector * (row >= 0)[:, None] * self.scales[feature.entity_type]
      vectors[feature.name] = vector
      parts.append(vector)
    for a, b in self.products:
      parts.append(vectors[a] * vectors[b])
    h = jnp.concatenate(parts, axis=-1)  # [B, width]
    for layer in self.hidden:
      h = jax.nn.relu(layer(h))
    return self.out(h)  # [B, num_outputs]


def build_model(embeddings, num_dense: int, id_features: list[IdFeature],
                products=(), num_outputs: int = 1, hidden=(128, 64), use_pq: bool = True,
                seed: int = 0) -> DownstreamModel:
  """A DownstreamModel whose lookups come from an ``embedding_set.EmbeddingSet``.

  A type with PQ codes (``embeddings.pq``) gets a PQEmbed when ``use_pq``,
  else the (decoded or full) table.
  """
  lookups, scales = {}, {}
  for entity_type in sorted({f.entity_type for f in id_features}):
    embeddings.check_type(entity_type)
    table = embeddings.tables[entity_type]
    norms = np.linalg.norm(np.asarray(table, np.float64), axis=1)
    scales[entity_type] = float(1.0 / max(norms.mean(), 1e-12))
    if use_pq and entity_type in embeddings.pq:
      codes, codebook = embeddings.pq[entity_type]
      lookups[entity_type] = PQEmbed(codes, codebook)
    else:
      lookups[entity_type] = FrozenEmbed(table)
  return DownstreamModel(num_dense, id_features, lookups, scales, list(products), num_outputs,
                         tuple(hidden), rngs=nnx.Rngs(seed))


@dataclasses.dataclass
class Examples:
  """A set of examples: dense [N, F] float32, ids {name: int32 [N]}, labels [N]."""
  dense: np.ndarray
  ids: dict[str, np.ndarray]
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)

  def take(self, rows) -> "Examples":
    return Examples(self.dense[rows], {k: v[rows] for k, v in self.ids.items()},
                    self.labels[rows])


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  batch_size: int = 512
  learning_rate: float = 1e-3
  weight_decay: float = 1e-4
  max_epochs: int = 100
  patience: int = 5
  seed: int = 0


def _loss(logits: jax.Array, labels: jax.Array, weight: jax.Array) -> jax.Array:
  """Mean binary (one logit) or softmax (C logits) cross entropy over weight-1 rows."""
  if logits.shape[-1] == 1:
    per_example = optax.sigmoid_binary_cross_entropy(logits[:, 0], labels.astype(jnp.float32))
  else:
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels.astype(jnp.int32))
  return jnp.sum(per_example * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def _batches(examples: Examples, batch_size: int, order: np.ndarray | None = None):
  """Fixed-size batches (the last one padded with weight 0): one compiled shape."""
  order = np.arange(len(examples)) if order is None else order
  for start in range(0, len(order), batch_size):
    rows = order[start:start + batch_size]
    weight = np.ones(batch_size, np.float32)
    if len(rows) < batch_size:
      weight[len(rows):] = 0.0
      rows = np.concatenate([rows, np.zeros(batch_size - len(rows), rows.dtype)])
    part = examples.take(rows)
    yield part.dense, part.ids, part.labels, weight


def train_model(model: DownstreamModel, train: Examples, valid: Examples,
                config: TrainConfig = TrainConfig(), progress: bool = False) -> dict:
  """Trains ``model`` in place (best validation epoch kept); returns the history."""
  graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
  tx = optax.adamw(config.learning_rate, weight_decay=config.weight_decay)
  opt_state = tx.init(params)

  def loss_fn(params, frozen, dense, ids, labels, weight):
    logits = nnx.merge(graphdef, params, frozen)(dense, ids)
    return _loss(logits, labels, weight)

  @jax.jit
  def train_step(params, opt_state, frozen, dense, ids, labels, weight):
    loss, grads = jax.value_and_grad(loss_fn)(params, frozen, dense, ids, labels, weight)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  eval_loss = jax.jit(loss_fn)
  rng = np.random.default_rng(config.seed)
  best = (math.inf, params, -1)
  history = []
  for epoch in range(config.max_epochs):
    order = rng.permutation(len(train))
    train_losses = []
    for dense, ids, labels, weight in _batches(train, config.batch_size, order):
      params, opt_state, loss = train_step(params, opt_state, frozen, dense, ids, labels, weight)
      train_losses.append(loss)
    valid_sum, valid_count = 0.0, 0
    for dense, ids, labels, weight in _batches(valid, config.batch_size):
      valid_sum += float(eval_loss(params, frozen, dense, ids, labels, weight)) * weight.sum()
      valid_count += weight.sum()
    valid_loss = valid_sum / max(valid_count, 1)
    history.append({"epoch": epoch, "train_loss": float(np.mean(jax.device_get(train_losses))),
                    "valid_loss": valid_loss})
    if progress:
      print(f"  epoch {epoch}: train {history[-1]['train_loss']:.4f} valid {valid_loss:.4f}")
    if valid_loss < best[0] - 1e-5:
      best = (valid_loss, params, epoch)
    elif epoch - best[2] >= config.patience:
      break
  nnx.update(model, best[1])
  return {"history": history, "best_epoch": best[2], "best_valid_loss": best[0]}


def predict(model: DownstreamModel, examples: Examples, batch_size: int = 2048) -> np.ndarray:
  """Probabilities: [N] (binary) or [N, C] (multiclass)."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, dense, ids):
    logits = nnx.merge(graphdef, state)(dense, ids)
    return jax.nn.sigmoid(logits[:, 0]) if logits.shape[-1] == 1 else jax.nn.softmax(logits)

  outputs = []
  for dense, ids, _, weight in _batches(examples, batch_size):
    out = np.asarray(forward(state, dense, ids))
    outputs.append(out[:int(weight.sum())])
  return np.concatenate(outputs) if outputs else np.zeros(0)
