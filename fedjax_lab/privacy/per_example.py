"""Per-example pieces both clipping paths share (clipping.py's vmap path, ghost.py's ghost
path): the clip factors, row scaling and norms, in exact float32."""

from typing import Any, Optional

import jax
from jax import lax
import jax.numpy as jnp

PyTree = Any
# Norms and sums in full float32 even where the backend would default to
# TF32/bf16 passes (GPU, TPU): a norm computed less precisely than the sum it
# bounds could let an example's clipped contribution exceed clip_norm. Free on
# CPU, where float32 matmuls are always exact float32.
EXACT = lax.Precision.HIGHEST


def clip_factors(norms: jax.Array, clip_norm: jax.Array,
                 weights: Optional[jax.Array] = None) -> jax.Array:
  """Per-example multipliers w_i * min(1, clip_norm / norm_i).

  Args:
    norms: [B] per-example gradient L2 norms.
    clip_norm: scalar clipping threshold C >= 0.
    weights: [B] optional example weights (0 for padding rows).

  Returns:
    [B] factors; 0 where the norm is not finite (NaN-safe).
  """
  # `norms > clip_norm` (not clip_norm / norms) so norm 0 and clip_norm 0
  # never divide 0 by 0.
  safe = jnp.where(norms > clip_norm, clip_norm / jnp.where(
      norms > 0, norms, 1.0), 1.0)
  factors = jnp.where(jnp.isfinite(norms), safe, 0.0)
  if weights is not None:
    factors = factors * weights
  return factors


def leading_size(tree: PyTree) -> int:
  sizes = {x.shape[0] for x in jax.tree.leaves(tree)}
  if len(sizes) != 1:
    raise ValueError(
        f"every leaf of the batch must have the same leading (batch) axis; "
        f"got sizes {sorted(sizes)}.")
  return sizes.pop()


def global_sq_norms(per_example_tree: PyTree) -> jax.Array:
  """[B] squared L2 norms over all leaves of a tree with leading axis B."""
  leaves = jax.tree.leaves(per_example_tree)
  return sum(
      jnp.sum(jnp.square(x.astype(jnp.promote_types(x.dtype, jnp.float32)))
              .reshape(x.shape[0], -1), axis=1) for x in leaves)


def scale_rows(x: jax.Array, factors: jax.Array) -> jax.Array:
  """x * factors along axis 0, with rows of factor 0 set to exactly 0.

  `where`, not a bare product, so a NaN/inf row with factor 0 becomes 0.
  """
  f = factors.reshape((-1,) + (1,) * (x.ndim - 1))
  return jnp.where(f != 0, x * f.astype(x.dtype), jnp.zeros((), x.dtype))


