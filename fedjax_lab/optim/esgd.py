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

from typing import Optional

import jax
import jax.numpy as jnp
import optax

from fedjax_lab.optim import hessian, preconditioner


ESGDState = preconditioner.DiagonalPreconditionerState


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
    seed, probe_fn: the probe key's seed and the probes' law (hessian.py).

  Returns the transformation of preconditioner.scale_by_diagonal_preconditioner (its
  update needs `params` and `obj_fn`).
  """

  def statistic(obj_fn, params, probe_key):
    return hessian.equilibration_diagonal(obj_fn, params, probe_key, num_probes, probe_fn)

  def fold(sq_hv, nu, curvature_count):
    if b2 is None:  # Arithmetic mean: nu_n = nu_{n-1} + (x_n - nu_{n-1}) / n.
      return jax.tree.map(lambda a, x: a + (x - a) / curvature_count.astype(a.dtype), nu, sq_hv)
    return optax.tree.update_moment(sq_hv, nu, b2, 1)

  def denominator(nu, curvature_count):
    nu_hat = nu if b2 is None else optax.tree.bias_correction(nu, b2, curvature_count)
    return jax.tree.map(lambda v: jnp.sqrt(v) + eps, nu_hat)

  return preconditioner.scale_by_diagonal_preconditioner(
      "esgd", statistic, fold, denominator, b1,
      lambda count: hessian.refresh_due(count, update_interval, warmup_steps), seed)


esgd = preconditioner.with_decoupled_weight_decay(scale_by_esgd, """ESGD (Dauphin et al. 2015) with decoupled weight decay.

  update = -learning_rate * (m_hat / (sqrt(nu_hat) + eps) + weight_decay * params);
  learning_rate: a step size or an optax schedule; the other arguments: `scale_by_esgd`.
  """)
