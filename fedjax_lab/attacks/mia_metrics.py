"""Membership-inference metrics: ROC, AUC, TPR at a fixed FPR with its Clopper-Pearson
interval, the summary table and the log-log ROC plot."""

import math

import numpy as np
from scipy import stats
from sklearn import metrics as skm

from fedjax_lab import metrics

FPRS = (1e-3, 1e-2)


def roc_curve(scores, labels):
  """(fpr, tpr) at every distinct threshold, from (0, 0) to (1, 1); member iff score >= thr
  (sklearn.metrics.roc_curve, every threshold kept)."""
  scores, labels = np.ravel(np.asarray(scores, np.float64)), np.ravel(np.asarray(labels, bool))
  _check_scores(scores, labels)
  fpr, tpr, _ = skm.roc_curve(labels, scores, drop_intermediate=False)
  return fpr, tpr


def auc(scores, labels) -> float:
  """Area under roc_curve (metrics.binary_auc: the lab's one AUC, fast enough for bootstraps)."""
  scores, labels = np.ravel(np.asarray(scores, np.float64)), np.ravel(np.asarray(labels, bool))
  _check_scores(scores, labels)
  return metrics.binary_auc(labels, scores)


def _check_scores(scores, labels):
  if scores.shape != labels.shape:
    raise ValueError(f"scores and labels differ in size: {scores.size} vs {labels.size}")
  n_in, n_out = int(labels.sum()), int((~labels).sum())
  if n_in == 0 or n_out == 0:
    raise ValueError(f"need members and non-members, got {n_in} and {n_out}")


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
  """The exact (Clopper-Pearson) two-sided interval of k successes in n trials."""
  ci = stats.binomtest(k, n).proportion_ci(confidence_level=confidence, method="exact")
  return float(ci.low), float(ci.high)


def tpr_at_fpr(scores, labels, fpr: float, confidence: float = 0.95) -> dict:
  """TPR at the threshold above the floor(fpr n_out) highest non-member scores, with its
  Clopper-Pearson interval; also the realised FPR and the counts."""
  scores, labels = np.ravel(np.asarray(scores, np.float64)), np.ravel(np.asarray(labels, bool))
  if not 0 < fpr < 1:
    raise ValueError(f"fpr must be in (0, 1), got {fpr}")
  s_in, s_out = scores[labels], np.sort(scores[~labels])[::-1]
  k = int(math.floor(fpr * len(s_out)))
  thr = s_out[k] if k < len(s_out) else -np.inf
  tp, fp = int(np.sum(s_in > thr)), int(np.sum(s_out > thr))
  lo, hi = clopper_pearson(tp, len(s_in), confidence)
  return {"tpr": tp / len(s_in), "tpr_lo": lo, "tpr_hi": hi, "fpr": fp / len(s_out),
          "n_in": len(s_in), "n_out": len(s_out)}


def evaluate(scores, labels, fprs=FPRS) -> dict:
  out = {"auc": auc(scores, labels)}
  for f in fprs:
    out[f"at_fpr_{f:g}"] = tpr_at_fpr(scores, labels, f)
  return out


def plot_roc(curves: dict, path: str, title: str = "") -> str:
  """Log-log ROC curves {name: (scores, labels)} to `path` (png)."""
  import matplotlib  # optional: pyplot is slow to import and only the plots need it
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # optional: as matplotlib above
  fig, ax = plt.subplots(figsize=(4.5, 4.5))
  lo = 1.0
  for name, (scores, labels) in curves.items():
    fpr, tpr = roc_curve(scores, labels)
    lo = min(lo, 1.0 / max(1, int((~np.asarray(labels, bool)).sum())))
    ax.plot(fpr, tpr, label=f"{name} (AUC {auc(scores, labels):.3f})")
  ax.plot([lo, 1], [lo, 1], "k--", lw=0.8, label="chance")
  ax.set(xscale="log", yscale="log", xlim=(lo, 1), ylim=(lo, 1), xlabel="FPR", ylabel="TPR",
         title=title)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def summarize(results: dict) -> dict:
  return {name: evaluate(s, l) for name, (s, l) in results.items()}


def format_table(summary: dict) -> str:
  lines = ["attack                   AUC    TPR@0.1%FPR [95% CI]      TPR@1%FPR [95% CI]"]
  for name, r in summary.items():
    a, b = r["at_fpr_0.001"], r["at_fpr_0.01"]
    lines.append(f"{name:<22} {r['auc']:.3f}  {a['tpr']:.4f} [{a['tpr_lo']:.4f}, "
                 f"{a['tpr_hi']:.4f}]  {b['tpr']:.4f} [{b['tpr_lo']:.4f}, {b['tpr_hi']:.4f}]")
  first = next(iter(summary.values()))["at_fpr_0.001"]
  lines.append(f"(n_in={first['n_in']}, n_out={first['n_out']} trials)")
  return "\n".join(lines)
