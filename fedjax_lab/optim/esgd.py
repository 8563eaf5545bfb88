"""ESGD: equilibrated stochastic gradient descent, as an optax transformation.

Dauphin, de Vries and Bengio, "Equilibrated adaptive learning rates for non-convex
optimization", NeurIPS 2015 (arXiv 1502.04390). The preconditioner is the
equilibration matrix D = sqrt(diag(H^2)), the row norms of the Hessian, estimated
matrix-free from E[(H v)^2] = diag(H^2) with random probes v:

    every refresh:  v ~ Rademacher;  nu <- average of (H v)^2
    every step:     m <- b1 m + (1 - b1) g
                    update = -lr * m_hat / (sqrt(nu_hat) + eps)

with m_hat and nu_hat the Adam-style bias-corrected averages. Unlike |diag(H)|
(AdaHessian) the equilibration statistic stays large in directions of negative
or mixed curvature, which is the paper's argument for saddle-rich landscapes.

Defaults follow the variant that "Preconditioners for the Stochastic Training of
Implicit Neural Representations" (Chng et al., arXiv 2402.08784) ran, ESGD with
momentum and an exponential average of (H v)^2 (b1=0.9, b2=0.999, eps=1e-4),
refreshed on each of the first `warmup_steps` updates and then every
`update_interval`. Dauphin et al.'s original algorithm is b1=0, b2=None (plain
arithmetic mean of all estimates so far), update_interval=20, warmup_steps=0.
Rademacher probes replace the paper's Gaussian ones (same expectation, lower
variance).

Like `optax.contrib.sophia`, the update needs the objective as an extra argument:

    tx = esgd(learning_rate=0.1)
    state = tx.init(params)
    updates, state = tx.update(grads, state, params, obj_fn=lambda p: loss(p, batch))

Cost: a refresh is one Hessian-vector product (about 2-3 gradients); between
refreshes `lax.cond` skips it. Under `jax.vmap` (the round vmaps client updates)
the condition is batched, cond becomes select, and the product is computed on
EVERY step, so update_interval > 1 then saves nothing.

`obj_fn` must be the loss of the SAME minibatch the gradient came from; the
Hessian-vector product is jax.jvp of jax.grad(obj_fn), never a dense Hessian.
"""

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from optax._src import numerics

from fedjax_lab.optim import hessian


class ESGDState(NamedTuple):
  """State of `scale_by_esgd`.

  Attributes:
    count: [] int32, update calls so far.
    curvature_count: [] int32, curvature estimates folded into `nu` so far.
    mu: moving average of the gradient, shaped like params.
    nu: running average of (H v)^2, shaped like params.
    key: [2] uint32 raw PRNG key data for the probes; split on every refresh.
  """

  count: jax.Array
  curvature_count: jax.Array
  mu: optax.Updates
  nu: optax.Updates
  key: jax.Array


def scale_by_esgd(
    b1: float = 0.9,
    b2: Optional[float] = 0.999,
    eps: float = 1e-4,
    update_interval: int = 10,
    warmup_steps: int = 20,
    num_probes: int = 1,
    seed: int = 0,
    probe_fn: hessian.ProbeFn = hessian.rademacher_like,
) -> optax.GradientTransformationExtraArgs:
  """Rescales updates by the equilibration preconditioner sqrt(E[(H v)^2]).

  Args:
    b1: decay of the gradient's moving average (0 = no momentum, as in
      Dauphin et al.).
    b2: decay of the exponential average of (H v)^2, bias-corrected by the
      number of estimates; None = arithmetic mean of all estimates (Dauphin et
      al.).
    eps: damping added to sqrt(nu_hat) (the paper's lambda).
    update_interval: re-estimate the curvature every this many updates.
    warmup_steps: also re-estimate on each of the first this many updates.
    num_probes: probes averaged per estimate.
    seed: seed of the probe PRNG key kept in the state.
    probe_fn: (key, params) -> probes; override to inject known probes.

  Returns:
    An optax.GradientTransformationExtraArgs whose update needs `params` and
    `obj_fn` (params -> scalar loss on the current minibatch).
  """

  def init_fn(params):
    return ESGDState(
        count=jnp.zeros([], jnp.int32),
        curvature_count=jnp.zeros([], jnp.int32),
        mu=optax.tree.zeros_like(params),
        nu=optax.tree.zeros_like(params),
        key=hessian.new_probe_key(seed),
    )

  def update_fn(updates, state, params=None, obj_fn=None, **extra_args):
    del extra_args  # Other transformations' arguments, e.g. from a chain.
    if params is None:
      raise ValueError("esgd needs params in update(updates, state, params).")
    if obj_fn is None:
      raise ValueError("esgd needs obj_fn=params -> loss in its update call.")

    def refresh(key, nu, curvature_count):
      key, probe_key = hessian.split_probe_key(key)
      sq_hv = hessian.equilibration_diagonal(
          obj_fn, params, probe_key, num_probes, probe_fn)
      curvature_count = numerics.safe_int32_increment(curvature_count)
      if b2 is None:
        # Arithmetic mean: nu_n = nu_{n-1} + (x_n - nu_{n-1}) / n.
        nu = jax.tree.map(
            lambda a, x: a + (x - a) / curvature_count.astype(a.dtype),
            nu, sq_hv)
      else:
        nu = optax.tree.update_moment(sq_hv, nu, b2, 1)
      return key, nu, curvature_count

    # lax.cond, not where: outside vmap the skipped branch costs nothing.
    key, nu, curvature_count = jax.lax.cond(
        hessian.refresh_due(state.count, update_interval, warmup_steps),
        refresh,
        lambda *carry: carry,
        state.key, state.nu, state.curvature_count)

    count = numerics.safe_int32_increment(state.count)
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    mu_hat = optax.tree.bias_correction(mu, b1, count)
    nu_hat = nu if b2 is None else optax.tree.bias_correction(
        nu, b2, curvature_count)
    updates = jax.tree.map(
        lambda m, v: m / (jnp.sqrt(v) + eps), mu_hat, nu_hat)
    return updates, ESGDState(
        count=count, curvature_count=curvature_count, mu=mu, nu=nu, key=key)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def esgd(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: Optional[float] = 0.999,
    eps: float = 1e-4,
    weight_decay: float = 0.0,
    update_interval: int = 10,
    warmup_steps: int = 20,
    num_probes: int = 1,
    seed: int = 0,
    probe_fn: hessian.ProbeFn = hessian.rademacher_like,
) -> optax.GradientTransformationExtraArgs:
  """ESGD (Dauphin et al. 2015) with decoupled weight decay.

  update = -learning_rate * (m_hat / (sqrt(nu_hat) + eps) + weight_decay * params)

  Args:
    learning_rate: global step size, or an optax schedule.
    b1: see `scale_by_esgd`.
    b2: see `scale_by_esgd`.
    eps: see `scale_by_esgd`.
    weight_decay: decoupled weight decay, not preconditioned.
    update_interval: see `scale_by_esgd`.
    warmup_steps: see `scale_by_esgd`.
    num_probes: see `scale_by_esgd`.
    seed: see `scale_by_esgd`.
    probe_fn: see `scale_by_esgd`.

  Returns:
    An optax.GradientTransformationExtraArgs; call its update with `obj_fn=`.
  """
  return optax.chain(
      scale_by_esgd(
          b1=b1, b2=b2, eps=eps, update_interval=update_interval,
          warmup_steps=warmup_steps, num_probes=num_probes, seed=seed,
          probe_fn=probe_fn),
      optax.add_decayed_weights(weight_decay),
      optax.scale_by_learning_rate(learning_rate),
  )
