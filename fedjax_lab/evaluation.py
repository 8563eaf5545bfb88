"""Global test accuracy and per-site accuracy.

Per-site accuracy weights the global test set's per-class accuracy by each site's own label
histogram: the accuracy the model would have on a test set drawn like that site's data. It is
exact for label-skew partitions and needs one pass over the test set, not one per site. Under
FedBN (per-site BatchNorm statistics) each site's model differs, so the pass is vmapped over
sites with their own statistics.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab.models import Model, cross_entropy


class EvalResult(NamedTuple):
  accuracy: float
  loss: float
  site_accuracy_mean: float
  site_accuracy_worst10: float  # mean accuracy of the worst 10% of sites (Li et al. 2020, q-FFL)


def make_class_evaluator(model: Model, x: np.ndarray, y: np.ndarray, num_classes: int,
                         batch_size: int):
  """Returns jitted fn(params, model_state) -> (correct [C], loss_sum) over the test set."""
  n = len(y)
  batch_size = min(batch_size, n)
  pad = (-n) % batch_size
  xs = jnp.asarray(np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)]))
  ys = jnp.asarray(np.concatenate([y, np.zeros(pad, y.dtype)]))
  valid = jnp.arange(n + pad) < n
  chunks = (xs.reshape(-1, batch_size, *x.shape[1:]), ys.reshape(-1, batch_size),
            valid.reshape(-1, batch_size))

  def evaluate(params, model_state):
    def one(chunk):
      xb, yb, vb = chunk
      logits, _ = model.apply(params, model_state, xb, False)
      hit = (logits.argmax(-1) == yb) & vb
      correct = jnp.zeros(num_classes).at[yb].add(hit.astype(jnp.float32))
      return correct, jnp.where(vb, cross_entropy(logits, yb), 0.0).sum()
    correct, loss = jax.lax.map(one, chunks)
    return correct.sum(0), loss.sum()

  return evaluate


def summarize(correct, loss_sum, y_test, site_hist) -> EvalResult:
  """correct: [C] (global model) or [sites, C] (per-site models); site_hist: [sites, C]."""
  correct, loss_sum = np.asarray(correct), np.asarray(loss_sum)
  class_count = np.bincount(y_test, minlength=site_hist.shape[1]).astype(np.float64)
  present = class_count > 0
  per_class = np.where(present, correct / np.maximum(class_count, 1), 0.0)
  hist = site_hist * present
  site_acc = (hist * per_class).sum(-1) / np.maximum(hist.sum(-1), 1)
  k = max(1, int(np.ceil(0.1 * len(site_acc))))
  if correct.ndim == 2:  # per-site models: report the cohort-mean global figures
    accuracy, loss = correct.sum(-1).mean() / len(y_test), loss_sum.mean() / len(y_test)
  else:
    accuracy, loss = correct.sum() / len(y_test), float(loss_sum) / len(y_test)
  return EvalResult(float(accuracy), float(loss), float(site_acc.mean()),
                    float(np.sort(site_acc)[:k].mean()))
