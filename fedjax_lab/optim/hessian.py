"""Matrix-free curvature probes: Hessian-vector products and Hutchinson estimates.

Everything here reads the Hessian H of a scalar objective `obj_fn(params)` only
through products H @ v, computed as the forward-mode derivative of the reverse-mode
gradient (`jax.jvp` of `jax.grad`). One product costs about two to three gradient
evaluations and never forms H, so the memory stays O(#params).

Two diagonal statistics are built from random probes v with E[v v^T] = I
(Rademacher: entries +-1 with probability 1/2):

* Hutchinson (Bekas et al. 2007), used by AdaHessian and Sophia:
  E[v * (H v)] = diag(H).
* Equilibration (Dauphin et al. 2015), used by ESGD:
  E[(H v)^2] = diag(H^2), i.e. the squared row norms of H; its square root is the
  equilibration preconditioner, which, unlike |diag(H)|, does not vanish where
  positive and negative curvature cancel on the diagonal.

All functions take and return pytrees shaped like `params`.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

Params = Any  # A pytree of arrays.
ObjectiveFn = Callable[[Params], jax.Array]  # params -> scalar loss.
# (key, params) -> probes shaped like params. The optimizers take one so tests
# (and users who want Gaussian probes) can replace the Rademacher default.
ProbeFn = Callable[[jax.Array, Params], Params]


def hvp(obj_fn: ObjectiveFn, params: Params, tangents: Params) -> Params:
  """Hessian-vector product H @ tangents, with H the Hessian of obj_fn at params.

  Forward-over-reverse: cheaper than reverse-over-reverse, and exact (no finite
  differences).

  Args:
    obj_fn: params -> scalar objective.
    params: point at which the Hessian is taken, a pytree.
    tangents: the vector v, a pytree shaped like params.

  Returns:
    H @ v, a pytree shaped like params.
  """
  return jax.jvp(jax.grad(obj_fn), (params,), (tangents,))[1]


def rademacher_like(key: jax.Array, tree: Params) -> Params:
  """Independent +-1 entries (probability 1/2 each) shaped like `tree`.

  Args:
    key: a JAX PRNG key (typed or raw uint32).
    tree: a pytree of arrays; each leaf gets a probe of its shape and dtype.

  Returns:
    A pytree of +-1 arrays shaped like `tree`.
  """
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  probes = [
      jax.random.rademacher(k, jnp.shape(x), jnp.result_type(x))
      for k, x in zip(keys, leaves)
  ]
  return jax.tree.unflatten(treedef, probes)


def _probe_statistic(
    statistic: Callable[[Params, Params], Params],
    obj_fn: ObjectiveFn,
    params: Params,
    key: jax.Array,
    num_probes: int,
    probe_fn: ProbeFn,
) -> Params:
  """Mean over `num_probes` probes of statistic(v, H v)."""

  def one(k):
    v = probe_fn(k, params)
    return statistic(v, hvp(obj_fn, params, v))

  if num_probes == 1:
    return one(key)
  # vmap over probes: all products run as one batched program, which on small
  # models is much faster than a loop; memory grows with num_probes.
  per_probe = jax.vmap(one)(jax.random.split(key, num_probes))
  return jax.tree.map(lambda x: jnp.mean(x, axis=0), per_probe)


def _probe_estimator(per_probe: Callable, doc: str) -> Callable:
  """estimator(obj_fn, params, key, num_probes=1, probe_fn=rademacher_like) -> the mean over
  probes of per_probe(v, H v), a pytree shaped like params: obj_fn is params -> scalar
  objective, params the point at which the Hessian is taken, key the probes' PRNG key."""

  def estimator(obj_fn: ObjectiveFn, params: Params, key: jax.Array, num_probes: int = 1,
                probe_fn: ProbeFn = rademacher_like) -> Params:
    return _probe_statistic(per_probe, obj_fn, params, key, num_probes, probe_fn)

  estimator.__doc__ = doc
  return estimator


hutchinson_diagonal = _probe_estimator(
    lambda v, hv: jax.tree.map(jnp.multiply, v, hv),
    """Hutchinson estimate of diag(H): mean over probes of v * (H v) (`_probe_estimator`).

  Unbiased; with Rademacher probes the variance of entry i per probe is
  sum_{j != i} H_ij^2, so it is exact for a diagonal H.""")

equilibration_diagonal = _probe_estimator(
    lambda v, hv: jax.tree.map(jnp.square, hv),
    """ESGD's statistic: mean over probes of (H v)^2, an estimate of diag(H^2) (non-negative).

  Unbiased for any probe with E[v v^T] = I. The equilibration preconditioner of
  Dauphin et al. (2015) is its square root.""")


def spatial_average(diagonal: jax.Array) -> jax.Array:
  """AdaHessian's spatial averaging of |diag(H)| for 2-D convolution kernels.

  Yao et al. (2021) average the Hessian diagonal of a conv kernel over its
  spatial window, one value per (input channel, output channel), because the
  single-probe estimate of each of the kh*kw taps is noisy while their curvatures
  are similar. The reference PyTorch code averages |estimate| over dims (2, 3) of
  [cout, cin, kh, kw]; Flax stores kernels as [kh, kw, cin, cout], so here it is
  axes (0, 1). Leaves of any other rank (dense kernels, biases, scales) are only
  made non-negative.

  Args:
    diagonal: Hutchinson estimate for one parameter leaf.

  Returns:
    |diagonal|, averaged over the spatial axes and broadcast back to the leaf's
    shape for rank-4 leaves.
  """
  magnitude = jnp.abs(diagonal)
  if magnitude.ndim != 4:
    return magnitude
  mean = jnp.mean(magnitude, axis=(0, 1), keepdims=True)
  return jnp.broadcast_to(mean, magnitude.shape)


# --- Probe key and refresh schedule, shared by the curvature optimizers. ---


def new_probe_key(seed: int) -> jax.Array:
  """Raw uint32 key data for an optimizer state, from an integer seed.

  The state holds raw key data rather than a typed key so that optimizer states
  checkpoint and `jax.tree.map` like every other array.
  """
  return jax.random.key_data(jax.random.key(seed))


def split_probe_key(key_data: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Returns (next raw key data to store, typed key for this refresh's probes)."""
  next_key, probe_key = jax.random.split(jax.random.wrap_key_data(key_data))
  return jax.random.key_data(next_key), probe_key


def refresh_due(
    count: jax.Array, update_interval: int, warmup_steps: int = 0
) -> jax.Array:
  """Whether update number `count` (0-based) re-estimates the curvature.

  Every one of the first `warmup_steps` updates does, so the running average
  starts from several probes instead of one; afterwards every
  `update_interval`-th does, which amortizes the Hessian-vector product.

  Args:
    count: [] int, updates done before this one.
    update_interval: refresh every this many updates (>= 1).
    warmup_steps: refresh on each of the first this many updates.

  Returns:
    [] bool.
  """
  return jnp.logical_or(count < warmup_steps, count % update_interval == 0)
