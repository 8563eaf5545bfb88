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

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax._src import numerics

from fedjax_lab.optim import hessian


class AdaHessianState(NamedTuple):
  """State of `scale_by_adahessian`.

  Attributes:
    count: [] int32, update calls so far.
    curvature_count: [] int32, curvature estimates folded into `nu` so far.
    mu: moving average of the gradient, shaped like params.
    nu: moving average of the squared (spatially averaged) |diag(H)| estimate.
    key: [2] uint32 raw PRNG key data for the probes; split on every refresh.
  """

  count: jax.Array
  curvature_count: jax.Array
  mu: optax.Updates
  nu: optax.Updates
  key: jax.Array


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
    seed: seed of the probe PRNG key kept in the state.
    probe_fn: (key, params) -> probes; override to inject known probes.

  Returns:
    An optax.GradientTransformationExtraArgs whose update needs `params` and
    `obj_fn` (params -> scalar loss on the current minibatch).
  """

  def init_fn(params):
    return AdaHessianState(
        count=jnp.zeros([], jnp.int32),
        curvature_count=jnp.zeros([], jnp.int32),
        mu=optax.tree.zeros_like(params),
        nu=optax.tree.zeros_like(params),
        key=hessian.new_probe_key(seed),
    )

  def update_fn(updates, state, params=None, obj_fn=None, **extra_args):
    del extra_args  # Other transformations' arguments, e.g. from a chain.
    if params is None:
      raise ValueError(
          "adahessian needs params in update(updates, state, params).")
    if obj_fn is None:
      raise ValueError(
          "adahessian needs obj_fn=params -> loss in its update call.")

    def refresh(key, nu, curvature_count):
      key, probe_key = hessian.split_probe_key(key)
      diagonal = hessian.hutchinson_diagonal(
          obj_fn, params, probe_key, num_probes, probe_fn)
      magnitude = jax.tree.map(
          hessian.spatial_average if spatial_averaging else jnp.abs, diagonal)
      nu = optax.tree.update_moment(magnitude, nu, b2, 2)
      return key, nu, numerics.safe_int32_increment(curvature_count)

    # lax.cond, not where: outside vmap the skipped branch costs nothing.
    key, nu, curvature_count = jax.lax.cond(
        hessian.refresh_due(state.count, update_interval),
        refresh,
        lambda *carry: carry,
        state.key, state.nu, state.curvature_count)

    count = numerics.safe_int32_increment(state.count)
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    mu_hat = optax.tree.bias_correction(mu, b1, count)
    nu_hat = optax.tree.bias_correction(nu, b2, curvature_count)
    updates = jax.tree.map(
        lambda m, v: m / (jnp.sqrt(v) ** hessian_power + eps), mu_hat, nu_hat)
    return updates, AdaHessianState(
        count=count, curvature_count=curvature_count, mu=mu, nu=nu, key=key)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def adahessian(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-4,
    weight_decay: float = 0.0,
    hessian_power: float = 1.0,
    update_interval: int = 1,
    spatial_averaging: bool = True,
    num_probes: int = 1,
    seed: int = 0,
    probe_fn: hessian.ProbeFn = hessian.rademacher_like,
) -> optax.GradientTransformationExtraArgs:
  """AdaHessian (Yao et al. 2021) with decoupled weight decay.

  update = -learning_rate * (m_hat / (sqrt(nu_hat)^k + eps)
                             + weight_decay * params),
  as in the reference implementation.

  Args:
    learning_rate: global step size, or an optax schedule.
    b1: see `scale_by_adahessian`.
    b2: see `scale_by_adahessian`.
    eps: see `scale_by_adahessian`.
    weight_decay: decoupled weight decay, not preconditioned.
    hessian_power: see `scale_by_adahessian`.
    update_interval: see `scale_by_adahessian`.
    spatial_averaging: see `scale_by_adahessian`.
    num_probes: see `scale_by_adahessian`.
    seed: see `scale_by_adahessian`.
    probe_fn: see `scale_by_adahessian`.

  Returns:
    An optax.GradientTransformationExtraArgs; call its update with `obj_fn=`.
  """
  return optax.chain(
      scale_by_adahessian(
          b1=b1, b2=b2, eps=eps, hessian_power=hessian_power,
          update_interval=update_interval,
          spatial_averaging=spatial_averaging, num_probes=num_probes,
          seed=seed, probe_fn=probe_fn),
      optax.add_decayed_weights(weight_decay),
      optax.scale_by_learning_rate(learning_rate),
  )
