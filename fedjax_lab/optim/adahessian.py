"""AdaHessian, as an optax transformation.

Yao, Gholami, Shen, Mustafa, Keutzer and Mahoney, "ADAHESSIAN: An Adaptive Second
Order Optimizer for Machine Learning", AAAI 2021 (arXiv 2006.00719). Adam with the
squared gradient replaced by the squared Hutchinson estimate of the Hessian
diagonal:

    every refresh:  v ~ Rademacher;  d = |v * (H v)|  (spatially averaged for
                    conv kernels);   nu <- b2 nu + (1 - b2) d^2
    every step:     m <- b1 m + (1 - b1) g
                    update = -lr * m_hat / (sqrt(nu_hat)^k + eps)

m_hat = m / (1 - b1^t) with t the update count; nu_hat = nu / (1 - b2^n) with n
the number of curvature estimates (equal to t in the paper, which refreshes every
step; counting estimates keeps the correction right for update_interval > 1).
k is the Hessian power (1 in the paper). Defaults are the reference
implementation's: b1=0.9, b2=0.999, eps=1e-4, k=1, a refresh every step.

Spatial averaging: for a 2-D conv kernel [kh, kw, cin, cout] (Flax layout) the
|estimate| is averaged over kh, kw (see `hessian.spatial_average`); every other
leaf is used per coordinate.

Cost: a refresh is one Hessian-vector product (about 2-3 gradients); between
refreshes `lax.cond` skips it. Under `jax.vmap` (the round vmaps client updates)
the condition is batched, cond becomes select, and the product is computed on
EVERY step, so update_interval > 1 then saves nothing.

Like `optax.contrib.sophia`, the update needs the objective as an extra argument:

    updates, state = tx.update(grads, state, params, obj_fn=lambda p: loss(p, batch))
"""

import jax
import jax.numpy as jnp
import optax

from fedjax_lab.optim import hessian, preconditioner


AdaHessianState = preconditioner.DiagonalPreconditionerState


def scale_by_adahessian(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-4,
    hessian_power: float = 1.0,
    update_interval: int = 1,
    spatial_averaging: bool = True,
    num_probes: int = 1,
    seed: int = 0,
    probe_fn: hessian.ProbeFn = hessian.rademacher_like,
) -> optax.GradientTransformationExtraArgs:
  """Rescales updates by the AdaHessian preconditioner.

  Args:
    b1: decay of the gradient's moving average.
    b2: decay of the moving average of the squared Hessian-diagonal estimate.
    eps: added to the denominator.
    hessian_power: k in (0, 1]; the denominator is sqrt(nu_hat)^k.
    update_interval: re-estimate the curvature every this many updates (1 in the
      paper; larger values save Hessian-vector products).
    spatial_averaging: average over the spatial axes of rank-4 (conv) leaves.
    num_probes: probes averaged per estimate (before the absolute value).
    seed, probe_fn: the probe key's seed and the probes' law (hessian.py).

  Returns the transformation of preconditioner.scale_by_diagonal_preconditioner (its
  update needs `params` and `obj_fn`).
  """

  def statistic(obj_fn, params, probe_key):
    diagonal = hessian.hutchinson_diagonal(obj_fn, params, probe_key, num_probes, probe_fn)
    return jax.tree.map(hessian.spatial_average if spatial_averaging else jnp.abs, diagonal)

  def fold(magnitude, nu, curvature_count):
    return optax.tree.update_moment(magnitude, nu, b2, 2)

  def denominator(nu, curvature_count):
    nu_hat = optax.tree.bias_correction(nu, b2, curvature_count)
    return jax.tree.map(lambda v: jnp.sqrt(v) ** hessian_power + eps, nu_hat)

  return preconditioner.scale_by_diagonal_preconditioner(
      "adahessian", statistic, fold, denominator, b1,
      lambda count: hessian.refresh_due(count, update_interval), seed)


adahessian = preconditioner.with_decoupled_weight_decay(scale_by_adahessian, """AdaHessian (Yao et al. 2021) with decoupled weight decay, as in the reference
  implementation: update = -learning_rate * (m_hat / (sqrt(nu_hat)^k + eps)
  + weight_decay * params); the other arguments: `scale_by_adahessian`.
  """)
