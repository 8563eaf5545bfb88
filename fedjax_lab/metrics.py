"""Ranking and per-class metrics in NumPy, with example weights, and a bootstrap interval.

All take optional example weights `w` [N] (>= 0), which is how per-site metrics are computed:
the test set reweighted to a site's label histogram (evaluation.py's per-site accuracy does the
same for accuracy). They agree with scikit-learn's roc_auc_score / f1_score(average="macro",
zero_division=0) given the same `sample_weight` (tests/test_gse7390.py checks it).

- `binary_auc(y, score, w)`: area under the ROC curve = P(score of a positive > score of a
  negative) + 1/2 P(tie), pairs weighted by w_pos w_neg. nan if a class has no weight.
- `macro_auc(y, probs, w)`: binary AUC of probs[:, 1] with 2 classes; otherwise one-vs-rest,
  averaged over the classes that have both positive and negative weight.
- `macro_f1(y, pred, w)`: F1 = 2 TP / (2 TP + FP + FN) per class in (y union pred) (weights
  > 0), unweighted mean over those classes.
- `bootstrap_ci(metric, n, ...)`: percentile interval over resamples of the N test examples
  with replacement (scipy.stats.bootstrap); resamples where the metric is nan (one class
  only) are dropped.

Why AUC and F1 are the lab's own code and not sklearn.metrics: they run on the hot path of
every evaluation, once per bootstrap resample (eval.bootstrap, 1000 by default) and once per
site. Measured on this 2-core VM (numpy 2.4, sklearn 1.8), per call on n=300 test examples:
macro_auc 0.58 ms here vs 18.6 ms with roc_auc_score per class (10 classes; 0.15 vs 1.9 ms
binary), macro_f1 0.18 ms vs 2.0 ms with f1_score: 18 s instead of 0.6 s for one bootstrap.
tests/test_gse7390.py checks both against sklearn.
"""

from typing import Callable
import warnings

import numpy as np
from scipy import stats


def _weights(w, n):
  return np.ones(n) if w is None else np.asarray(w, np.float64)


def binary_auc(y, score, w=None) -> float:
  y = np.asarray(y).astype(bool)
  score = np.asarray(score, np.float64)
  w = _weights(w, len(y))
  w_pos, w_neg = np.where(y, w, 0.0), np.where(y, 0.0, w)
  total_pos, total_neg = w_pos.sum(), w_neg.sum()
  if total_pos <= 0 or total_neg <= 0:
    return float("nan")
  order = np.argsort(score, kind="mergesort")
  s, wp, wn = score[order], w_pos[order], w_neg[order]
  # Group ties: per distinct score, the negative weight strictly below and at that score.
  distinct, start = np.unique(s, return_index=True)
  neg_at = np.add.reduceat(wn, start)
  pos_at = np.add.reduceat(wp, start)
  neg_below = np.cumsum(neg_at) - neg_at
  return float((pos_at * (neg_below + 0.5 * neg_at)).sum() / (total_pos * total_neg))


def macro_auc(y, probs, w=None) -> float:
  y, probs = np.asarray(y), np.asarray(probs, np.float64)
  if probs.shape[1] == 2:
    return binary_auc(y == 1, probs[:, 1], w)
  aucs = [binary_auc(y == k, probs[:, k], w) for k in range(probs.shape[1])]
  aucs = [a for a in aucs if np.isfinite(a)]
  return float(np.mean(aucs)) if aucs else float("nan")


def macro_f1(y, pred, w=None) -> float:
  y, pred = np.asarray(y), np.asarray(pred)
  w = _weights(w, len(y))
  mask = w > 0
  labels = np.union1d(y[mask], pred[mask])
  if len(labels) == 0:
    return float("nan")
  f1 = []
  for k in labels:
    tp = w[(y == k) & (pred == k)].sum()
    fp = w[(y != k) & (pred == k)].sum()
    fn = w[(y == k) & (pred != k)].sum()
    denom = 2 * tp + fp + fn
    f1.append(2 * tp / denom if denom > 0 else 0.0)
  return float(np.mean(f1))


def accuracy(y, pred, w=None) -> float:
  w = _weights(w, len(y))
  return float((w * (np.asarray(y) == np.asarray(pred))).sum() / max(w.sum(), 1e-300))


def bootstrap_ci(metric: Callable[[np.ndarray], float], n: int, num_resamples: int = 1000,
                 seed: int = 0, level: float = 0.95) -> tuple[float, float] | None:
  """Percentile interval of metric(indices) over resamples of range(n); None if none valid.

  scipy.stats.bootstrap draws the resamples (default_rng(seed)) and evaluates the metric;
  the percentiles are taken over the finite values only, since a resample holding one class
  has no AUC (scipy's own interval would then be nan).
  """
  if num_resamples <= 0:
    return None
  with warnings.catch_warnings():  # nan resamples: scipy warns, the percentiles skip them
    warnings.simplefilter("ignore", stats.DegenerateDataWarning)
    result = stats.bootstrap((np.arange(n),), metric, n_resamples=num_resamples,
                             vectorized=False, method="percentile", confidence_level=level,
                             random_state=np.random.default_rng(seed))
  values = result.bootstrap_distribution
  values = values[np.isfinite(values)]
  if len(values) == 0:
    return None
  tail = 100 * (1 - level) / 2
  return float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))


def site_weights(y_test: np.ndarray, site_hist: np.ndarray) -> np.ndarray:
  """[sites, N]: test example i weighted by site s's share of its class over the test count
  of that class: the test set as site s's label mix (evaluation.summarize's definition)."""
  counts = np.bincount(y_test, minlength=site_hist.shape[1]).astype(np.float64)
  share = site_hist / np.maximum(site_hist.sum(-1, keepdims=True), 1)
  return share[:, y_test] / np.maximum(counts[y_test], 1)[None, :]
