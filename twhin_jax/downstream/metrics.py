"""Metrics of downstream models, in numpy (no scikit-learn needed).

For labels y_i in {0, 1} and scores s_i (higher = more likely positive):

  ROC-AUC   = P(s_+ > s_-) + 1/2 P(s_+ = s_-)   over positive/negative pairs,
              computed from average ranks (Mann-Whitney U):
              AUC = (sum_{i: y_i=1} rank_i - n_+ (n_+ + 1) / 2) / (n_+ n_-)
  PR-AUC    = average precision, AP = sum_n (R_n - R_{n-1}) P_n over the
              distinct score thresholds in decreasing order (ties form one
              threshold; the same definition as scikit-learn's)
  CE        = -1/N sum_i [y_i log p_i + (1 - y_i) log(1 - p_i)]
  RCE       = 100 (CE_base - CE_model) / CE_base                     (paper Eq. 4)
              where the baseline predicts the training positive rate p_bar
              for every example: CE_base = -[y_bar log p_bar + (1 - y_bar) log(1 - p_bar)]
              with y_bar the evaluated examples' positive rate. RCE = 0 for
              the base-rate predictor, > 0 when the model beats it.
  MAP       = mean over queries (with at least one positive) of AP of the
              query's candidates: a ranking metric.

Multiclass: accuracy and macro one-vs-rest ROC-AUC (mean over classes that
have both positives and negatives among the examples).
"""

from __future__ import annotations

import math

import numpy as np

_EPS = 1e-7


def _average_ranks(scores: np.ndarray) -> np.ndarray:
  """1-based ranks of ``scores`` with ties given their average rank."""
  order = np.argsort(scores, kind="mergesort")
  sorted_scores = scores[order]
  # Start of each run of equal scores.
  starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
  ends = np.r_[starts[1:], len(scores)]
  average = (starts + ends + 1) / 2.0  # mean of 1-based ranks starts+1 .. ends
  ranks = np.empty(len(scores), np.float64)
  ranks[order] = np.repeat(average, ends - starts)
  return ranks


def roc_auc(labels, scores) -> float:
  """ROC-AUC with ties counted as 1/2 (nan if only one class is present)."""
  labels = np.asarray(labels).astype(bool)
  scores = np.asarray(scores, np.float64)
  positives, negatives = int(labels.sum()), int((~labels).sum())
  if positives == 0 or negatives == 0:
    return math.nan
  ranks = _average_ranks(scores)
  return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def average_precision(labels, scores) -> float:
  """Area under the precision-recall curve as average precision (nan without positives)."""
  labels = np.asarray(labels).astype(np.float64)
  scores = np.asarray(scores, np.float64)
  total = labels.sum()
  if total == 0:
    return math.nan
  order = np.argsort(-scores, kind="mergesort")
  sorted_scores, sorted_labels = scores[order], labels[order]
  # Last index of every run of equal scores: one threshold per distinct score.
  last = np.flatnonzero(np.r_[sorted_scores[1:] != sorted_scores[:-1], True])
  true_positives = np.cumsum(sorted_labels)[last]
  predicted = last + 1.0
  precision = true_positives / predicted
  recall = true_positives / total
  return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def log_loss(labels, probabilities) -> float:
  """Mean binary cross entropy (probabilities clipped to [1e-7, 1 - 1e-7])."""
  y = np.asarray(labels, np.float64)
  p = np.clip(np.asarray(probabilities, np.float64), _EPS, 1 - _EPS)
  return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def relative_cross_entropy(labels, probabilities, train_positive_rate: float) -> float:
  """Paper Eq. 4: 100 (CE_base - CE_model) / CE_base against a constant
  predictor of the training positive rate."""
  labels = np.asarray(labels, np.float64)
  baseline = log_loss(labels, np.full(len(labels), train_positive_rate))
  if baseline == 0:
    return math.nan
  return 100.0 * (baseline - log_loss(labels, probabilities)) / baseline


def mean_average_precision(query_ids, labels, scores) -> float:
  """MAP over queries that have at least one positive candidate."""
  query_ids = np.asarray(query_ids)
  labels = np.asarray(labels)
  scores = np.asarray(scores, np.float64)
  order = np.argsort(query_ids, kind="mergesort")
  query_ids, labels, scores = query_ids[order], labels[order], scores[order]
  bounds = np.flatnonzero(np.r_[True, query_ids[1:] != query_ids[:-1], True])
  values = [average_precision(labels[a:b], scores[a:b]) for a, b in zip(bounds[:-1], bounds[1:])
            if labels[a:b].any()]
  return float(np.mean(values)) if values else math.nan


def binary_metrics(labels, probabilities, train_positive_rate: float, query_ids=None) -> dict:
  """ROC-AUC, PR-AUC, RCE, log loss (and MAP when ``query_ids`` are given)."""
  out = {"roc_auc": roc_auc(labels, probabilities),
         "pr_auc": average_precision(labels, probabilities),
         "rce": relative_cross_entropy(labels, probabilities, train_positive_rate),
         "log_loss": log_loss(labels, probabilities),
         "positive_rate": float(np.mean(labels)), "examples": int(len(labels))}
  if query_ids is not None:
    out["map"] = mean_average_precision(query_ids, labels, probabilities)
  return out


def multiclass_metrics(labels, probabilities) -> dict:
  """Accuracy and macro one-vs-rest ROC-AUC of class probabilities [N, C]."""
  labels = np.asarray(labels)
  probabilities = np.asarray(probabilities, np.float64)
  aucs = [roc_auc(labels == c, probabilities[:, c]) for c in range(probabilities.shape[1])]
  aucs = [a for a in aucs if not math.isnan(a)]
  return {"accuracy": float(np.mean(np.argmax(probabilities, axis=1) == labels)),
          "macro_roc_auc": float(np.mean(aucs)) if aucs else math.nan,
          "classes": int(probabilities.shape[1]), "examples": int(len(labels))}
