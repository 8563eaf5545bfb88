"""Global test accuracy and per-site accuracy; for a regression task test RMSE and R^2.

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

  def fields(self) -> dict:
    """The metrics.jsonl / summary.json keys of a classification task."""
    return {"test_accuracy": self.accuracy, "test_loss": self.loss,
            "site_accuracy_mean": self.site_accuracy_mean,
            "site_accuracy_worst10": self.site_accuracy_worst10}


class RegressionResult(NamedTuple):
  rmse: float   # sqrt(mean (f(x) - y)^2) over the test set
  r2: float     # 1 - sum (f(x) - y)^2 / sum (y - mean y)^2: 0 = predicting the test mean
  loss: float   # the test MSE (whatever model.loss trained: FAR is a batch loss, not a mean)

  def fields(self) -> dict:
    """The metrics.jsonl / summary.json keys of a regression task."""
    return {"test_rmse": self.rmse, "test_r2": self.r2, "test_loss": self.loss}


def fields(result, task: str) -> dict:
  """result.fields(), or the same keys with None on a round that was not evaluated."""
  if result is not None:
    return result.fields()
  cls = RegressionResult if task == "regression" else EvalResult
  return dict.fromkeys(cls(*[None] * len(cls._fields)).fields())


def _test_batches(x: np.ndarray, y: np.ndarray, batch_size: int):
  """The test set as (x, y, valid) chunks [batches, batch_size, ...], zero-padded to a whole
  number of batches (`valid` marks the real examples), for a lax.map over batches."""
  n = len(y)
  batch_size = min(batch_size, n)
  pad = (-n) % batch_size
  xs = jnp.asarray(np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)]))
  ys = jnp.asarray(np.concatenate([y, np.zeros(pad, y.dtype)]))
  valid = jnp.arange(n + pad) < n
  return (xs.reshape(-1, batch_size, *x.shape[1:]), ys.reshape(-1, batch_size),
          valid.reshape(-1, batch_size))


def make_class_evaluator(model: Model, x: np.ndarray, y: np.ndarray, num_classes: int,
                         batch_size: int):
  """Returns jitted fn(params, model_state) -> (correct [C], loss_sum) over the test set."""
  chunks = _test_batches(x, y, batch_size)

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


def make_regression_evaluator(model: Model, x: np.ndarray, y: np.ndarray, batch_size: int):
  """Returns jitted fn(params, model_state) -> sum of squared errors over the test set."""
  chunks = _test_batches(x, np.asarray(y, np.float32), batch_size)

  def evaluate(params, model_state):
    def one(chunk):
      xb, yb, vb = chunk
      out, _ = model.apply(params, model_state, xb, False)
      return jnp.where(vb, (out[:, 0] - yb) ** 2, 0.0).sum()
    return jax.lax.map(one, chunks).sum()

  return evaluate


def summarize_regression(sse, y_test) -> RegressionResult:
  """sse: scalar (global model) or [sites] (per-site models: their mean is reported)."""
  y = np.asarray(y_test, np.float64)
  mse = float(np.mean(np.asarray(sse, np.float64))) / len(y)
  sst = float(np.sum((y - y.mean()) ** 2))
  return RegressionResult(rmse=float(np.sqrt(mse)), r2=1.0 - mse * len(y) / max(sst, 1e-300),
                          loss=mse)
