"""The skeleton ESGD and AdaHessian share: Adam's structure with a curvature statistic in the
denominator, refreshed from Hessian-vector products every `update_interval` updates.

    every refresh:  estimate = statistic(obj_fn, params, probe key)   (a fresh probe key)
                    nu = fold(nu, estimate, n)      n: estimates so far, this one included
    every update:   m = b1 m + (1 - b1) g;   m_hat = m / (1 - b1^t)
                    update = m_hat / denominator(nu, n)

`lax.cond` skips the refresh between refreshes outside vmap (under vmap it becomes select
and both branches run; docs/sharp_edges.md). The probe key lives in the state, so
`optim.reseed_probes` can give every site and round its own probes.
"""

from typing import Callable, NamedTuple

import jax
import optax
from optax._src import numerics

from fedjax_lab.optim import hessian


class DiagonalPreconditionerState(NamedTuple):
  """State of a diagonal preconditioner (`scale_by_diagonal_preconditioner`).

  Attributes:
    count: [] int32, update calls so far.
    curvature_count: [] int32, curvature estimates folded into `nu` so far.
    mu: moving average of the gradient, shaped like params.
    nu: the curvature statistic's running average, shaped like params.
    key: [2] uint32 raw PRNG key data for the probes; split on every refresh.
  """

  count: jax.Array
  curvature_count: jax.Array
  mu: optax.Updates
  nu: optax.Updates
  key: jax.Array


def scale_by_diagonal_preconditioner(
    name: str,
    statistic: Callable,    # (obj_fn, params, probe_key) -> estimate shaped like params
    fold: Callable,         # (estimate, nu, curvature_count) -> nu
    denominator: Callable,  # (nu, curvature_count) -> denominators shaped like params
    b1: float,
    refresh_due: Callable,  # (count) -> bool: refresh before this update?
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  """An optax transformation whose update needs `params` and `obj_fn` (params -> loss)."""

  def init_fn(params):
    return DiagonalPreconditionerState(
        count=jax.numpy.zeros([], jax.numpy.int32),
        curvature_count=jax.numpy.zeros([], jax.numpy.int32),
        mu=optax.tree.zeros_like(params),
        nu=optax.tree.zeros_like(params),
        key=hessian.new_probe_key(seed),
    )

  def update_fn(updates, state, params=None, obj_fn=None, **extra_args):
    del extra_args  # Other transformations' arguments, e.g. from a chain.
    if params is None:
      raise ValueError(f"{name} needs params in update(updates, state, params).")
    if obj_fn is None:
      raise ValueError(f"{name} needs obj_fn=params -> loss in its update call.")

    def refresh(key, nu, curvature_count):
      key, probe_key = hessian.split_probe_key(key)
      curvature_count = numerics.safe_int32_increment(curvature_count)
      return key, fold(statistic(obj_fn, params, probe_key), nu, curvature_count), curvature_count

    # lax.cond, not where: outside vmap the skipped branch costs nothing.
    key, nu, curvature_count = jax.lax.cond(
        refresh_due(state.count), refresh, lambda *carry: carry,
        state.key, state.nu, state.curvature_count)

    count = numerics.safe_int32_increment(state.count)
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    mu_hat = optax.tree.bias_correction(mu, b1, count)
    updates = jax.tree.map(lambda m, d: m / d, mu_hat, denominator(nu, curvature_count))
    return updates, DiagonalPreconditionerState(
        count=count, curvature_count=curvature_count, mu=mu, nu=nu, key=key)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def with_decoupled_weight_decay(scale_by: Callable, doc: str) -> Callable:
  """The optimizer of a `scale_by_*` transformation:
  optimizer(learning_rate, weight_decay=0.0, **scale_by_kwargs), whose update is
  -learning_rate * (scale_by(g) + weight_decay * params) (the decay is not preconditioned);
  call its update with `obj_fn=`."""

  def optimizer(learning_rate: optax.ScalarOrSchedule, weight_decay: float = 0.0,
                **kwargs) -> optax.GradientTransformationExtraArgs:
    return optax.chain(scale_by(**kwargs), optax.add_decayed_weights(weight_decay),
                       optax.scale_by_learning_rate(learning_rate))

  optimizer.__doc__ = doc
  return optimizer
