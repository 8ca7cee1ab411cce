"""Early stopping on a validation metric (pure; the loop does the I/O).

Training runs until the validation metric has not improved for ``patience``
consecutive evaluations, and ``train.epochs`` is only a maximum. An
evaluation improves on the best so far when

    higher-is-better:  m > best + min_delta
    lower-is-better:   m < best - min_delta      (mean rank, "mr")

The learning rates can also fall on a plateau (PyTorch's ReduceLROnPlateau,
which LibKGE's published searches use): every ``lr_patience`` consecutive
evaluations without improvement multiply them by ``lr_factor``,

    lr_scale <- lr_scale * lr_factor   when bad_evals > 0 and bad_evals mod lr_patience = 0

and the scale stays where it is after an improvement. With lr_patience below
the stopping patience a run takes one or more smaller steps on its plateau
before it stops.

The state is a small JSON-able NamedTuple, stored in the checkpoint meta so a
resumed run stops (and scales its learning rates) where an uninterrupted one
would. The loop keeps a copy of the tables at ``best_epoch`` and restores it
when training ends (train.py), so the checkpoint that evaluation and export
read is the best one, not the last.
"""

from __future__ import annotations

import math
from typing import NamedTuple

#: Metrics of a validation record (evaluation.py) that early stopping can follow.
METRICS = ("mrr", "hits@1", "hits@10", "auc", "mr")
#: Metrics where smaller is better.
LOWER_IS_BETTER = ("mr",)


class EarlyStopping(NamedTuple):
  """best: best metric so far (None before the first evaluation);
  best_epoch: the (0-based) epoch that reached it, -1 before;
  bad_evals: evaluations since the last improvement;
  stopped: patience ran out (a resumed run trains no further);
  lr_scale: what the learning rates are multiplied by (plateau decays so far)."""
  best: float | None = None
  best_epoch: int = -1
  bad_evals: int = 0
  stopped: bool = False
  lr_scale: float = 1.0

  def to_json(self) -> dict:
    return self._asdict()

  @classmethod
  def from_json(cls, data: dict | None) -> "EarlyStopping":
    return cls(**data) if data else cls()


def improves(metric_name: str, value: float, best: float | None, min_delta: float = 0.0) -> bool:
  """Whether ``value`` beats ``best`` by more than ``min_delta``."""
  if best is None:
    return not math.isnan(value)
  if metric_name in LOWER_IS_BETTER:
    return value < best - min_delta
  return value > best + min_delta


def update(state: EarlyStopping, epoch: int, value: float, *, metric_name: str = "mrr",
           patience: int = 3, min_delta: float = 0.0,
           min_epochs: int = 0, lr_patience: int = 0,
           lr_factor: float = 1.0) -> tuple[EarlyStopping, bool, bool]:
  """Folds in one validation result.

  Args:
    state: the state before this evaluation.
    epoch: the epoch just evaluated (0-based).
    value: its validation metric.
    metric_name: which metric (sets the direction; see LOWER_IS_BETTER).
    patience: evaluations without improvement tolerated; the next one stops.
      0 never stops (only tracks the best epoch).
    min_delta: smallest change that counts as an improvement.
    min_epochs: never stop before this many epochs have run: a model started
      near zero can lose a little validation MRR in its first epochs before
      it takes off (Kinship with N3 does), which is not a plateau.
    lr_patience: evaluations without improvement before the learning rates
      are multiplied by ``lr_factor`` (again after as many more); 0 never.
    lr_factor: the multiplier, in (0, 1].

  Returns:
    (new state, improved: this epoch is the new best, stop: training should end).
  """
  if metric_name not in METRICS:
    raise ValueError(f"unknown early-stopping metric {metric_name!r}; choose from {METRICS}")
  if improves(metric_name, value, state.best, min_delta):
    return EarlyStopping(float(value), int(epoch), 0, lr_scale=state.lr_scale), True, False
  bad = state.bad_evals + 1
  stop = bool(patience) and bad >= patience and epoch + 1 >= min_epochs
  scale = state.lr_scale * (lr_factor if lr_patience and bad % lr_patience == 0 else 1.0)
  return state._replace(bad_evals=bad, stopped=stop, lr_scale=scale), False, stop


def learning_rates(config, state: EarlyStopping) -> dict[str, float]:
  """The learning rates of the next steps ("entities", "relations"): the
  config's, times the plateau scale. After a validation that lowered the
  scale, these are the next epoch's, not the one just evaluated."""
  return {"entities": float(config.train.lr) * state.lr_scale,
          "relations": float(config.train.relation_lr) * state.lr_scale}
