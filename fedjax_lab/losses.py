"""The training losses by name (`model.loss`): what every site minimizes.

A `Loss` is `batch(outputs, targets, weights=None) -> scalar`: outputs [B, K] are the model's
outputs (logits for classification; K = 1 for regression), targets [B] (int labels or float
values), weights [B] summing to 1 (None: 1/B each; the full-batch path weighs a site's real
rows). A per-example loss also has `example(out [K], target []) -> scalar`, the loss of ONE
example, which DP-SGD's per-example clipping takes (privacy/clipping.py). FAR is a batch loss
(its terms compare the examples of a batch with each other), so it has no `example` form and
example-level DP refuses it (config.py says why).

  cross_entropy  classification  softmax cross-entropy (optax.losses), per example
  mse            regression      (f(x) - y)^2, per example
  far            regression      Function Aligned Regression (Zhu & Jerby, arXiv 2402.06104v2),
                                 a batch loss; `far` below
"""

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_lab.errors import ConfigError
from fedjax_lab.models import cross_entropy

TASKS = ("classification", "regression")
LOSSES = {"cross_entropy": "classification", "mse": "regression", "far": "regression"}
FAR_BASES = ("mae", "mse")
FAR_EPS = 1e-7  # the reference implementation's eps: std floor and added to every term


class Loss(NamedTuple):
  name: str
  task: str
  batch: Callable              # (outputs [B, K], targets [B], weights [B] | None) -> scalar
  example: Callable | None     # (out [K], target []) -> scalar; None for a batch loss
  per_example: Callable | None  # (outputs [B, K], targets [B]) -> [B]; None for a batch loss


def squared_error(outputs, targets):
  """[B, 1] x [B] -> [B]: (f(x) - y)^2."""
  return (outputs[..., 0] - targets) ** 2


def _mean(per_example, outputs, targets, weights=None):
  values = per_example(outputs, targets)
  return values.mean() if weights is None else jnp.sum(weights * values)


def far_terms(pred, y, weights=None, base="mae"):
  """(L_c, L_diff, L_ndiff) of FAR on a batch: pred, y [B]; weights [B] summing to 1.

  With weights 1/B (the paper's batch), r = pred - y, z_f and z_y the batch z-scores of pred
  and y with the sample std (ddof 1, floored at FAR_EPS, as the reference implementation):
    L_c     = mean |r| (base mae, the reference implementation's) or mean r^2 (base mse)
    L_diff  = 1/(4 B^2) sum_{i,j} ((f_i - f_j) - (y_i - y_j))^2  = var(r) / 2
    L_ndiff = 1/(4 B^2) sum_{i,j} ((f_i - f_j)/s_f - (y_i - y_j)/s_y)^2
            = mean (z_f - z_y)^2 / 2  = (B-1)/B (1 - pearson(f, y))
  L_diff matches the pairwise differences (the finite-difference derivatives of the target
  function between the batch's examples), L_ndiff their normalised version. The pairwise
  double sums are computed in O(B) through the variance identities.
  """
  b = pred.shape[0]
  w = jnp.full((b,), 1.0 / b, pred.dtype) if weights is None else weights
  n = jnp.sum(w > 0).astype(pred.dtype)  # real examples (weights 0 are padding)
  r = pred - y
  l_c = jnp.sum(w * (jnp.abs(r) if base == "mae" else r * r))
  fc, yc = pred - jnp.sum(w * pred), y - jnp.sum(w * y)
  l_diff = jnp.sum(w * (fc - yc) ** 2) / 2
  ddof = n / jnp.maximum(n - 1, 1)
  # sqrt(max(var, eps^2)), not max(sqrt(var), eps): the same value, but a batch of equal
  # predictions (var exactly 0, e.g. every ReLU dead) would get 0 * inf = NaN from sqrt's
  # derivative at 0 (the reference code's torch.std does; it diverged a run of the study).
  s_f = jnp.sqrt(jnp.maximum(jnp.sum(w * fc * fc) * ddof, FAR_EPS ** 2))
  s_y = jnp.sqrt(jnp.maximum(jnp.sum(w * yc * yc) * ddof, FAR_EPS ** 2))
  l_ndiff = jnp.sum(w * (fc / s_f - yc / s_y) ** 2) / 2
  return l_c, l_diff, l_ndiff


def far(outputs, targets, weights=None, *, alpha=1.0, base="mae"):
  """Function Aligned Regression (Zhu & Jerby 2024, arXiv 2402.06104v2: its three losses and
  their robust (DRO) reconciliation; the constants, eps and ddof here follow the authors'
  reference implementation, github.com/DixianZhu/FAR loss.py `FAR`, as the paper's equation
  numbers could not be checked offline when this was written).

  The three terms of `far_terms` (each + FAR_EPS) reconciled by KL-regularised DRO over their
  logarithms, max_{p in simplex} sum_k p_k log L_k - alpha KL(p || uniform), whose value is
    FAR = alpha * log( (1/3) sum_k L_k^(1/alpha) )
  (alpha -> 0: the largest term; alpha -> inf: the mean of the logs; alpha = 1: log of the
  mean). Computed as alpha * (logsumexp(log L_k / alpha) - log 3), stable for any alpha. The
  reference code divides the terms by a detached min/max first, which shifts the VALUE by a
  constant and leaves the gradient as here. outputs [B, 1], targets [B] -> scalar.
  """
  terms = jnp.stack(far_terms(outputs[..., 0], targets, weights, base)) + FAR_EPS
  return alpha * (jax.nn.logsumexp(jnp.log(terms) / alpha) - jnp.log(3.0))


def task_loss_default(task: str) -> str:
  return "cross_entropy" if task == "classification" else "mse"


def check(loss_name: str, task: str, far_alpha: float = 1.0, far_base: str = "mae") -> None:
  """ConfigError naming model.loss (or its hyperparameters) unless the loss fits the task."""
  if loss_name not in LOSSES:
    raise ConfigError("model.loss", f"unknown '{loss_name}'; allowed: {', '.join(LOSSES)}")
  if LOSSES[loss_name] != task:
    allowed = ", ".join(k for k, t in LOSSES.items() if t == task)
    raise ConfigError("model.loss", f"'{loss_name}' is a {LOSSES[loss_name]} loss and this data "
                      f"set is a {task} task; allowed for {task}: {allowed}")
  if loss_name == "far":
    if not far_alpha > 0:
      raise ConfigError("model.far_alpha", f"must be > 0, got {far_alpha}")
    if far_base not in FAR_BASES:
      raise ConfigError("model.far_base", f"unknown '{far_base}'; allowed: {', '.join(FAR_BASES)}")


def make(name: str = "cross_entropy", far_alpha: float = 1.0, far_base: str = "mae") -> Loss:
  """The Loss called `name` (model.loss), with FAR's hyperparameters bound."""
  if name == "cross_entropy":
    return Loss(name, "classification", functools.partial(_mean, cross_entropy), cross_entropy,
                cross_entropy)
  if name == "mse":
    return Loss(name, "regression", functools.partial(_mean, squared_error),
                lambda out, y: (out[0] - y) ** 2, squared_error)
  if name == "far":
    return Loss(name, "regression", functools.partial(far, alpha=far_alpha, base=far_base),
                None, None)
  raise ConfigError("model.loss", f"unknown '{name}'; allowed: {', '.join(LOSSES)}")


def from_config(model_config) -> Loss:
  """make() for the `model` sub-config."""
  return make(model_config.loss, model_config.far_alpha, model_config.far_base)
