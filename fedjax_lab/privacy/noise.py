"""Gaussian noise on a clipped sum: the DP-SGD release (clipping.py clips, this adds noise)."""

import jax
import jax.numpy as jnp

PyTree = object


def check_nonnegative(name: str, value) -> None:
  # Only concrete Python numbers can be checked; traced values pass through.
  if isinstance(value, (int, float)) and not value >= 0:
    raise ValueError(f"{name} must be >= 0, got {value}.")


def privatize(grad_sum: PyTree, clip_norm: float | jax.Array,
              noise_multiplier: float | jax.Array,
              rng: jax.Array) -> PyTree:
  """Adds i.i.d. N(0, (noise_multiplier * clip_norm)^2) to every coordinate.

  Args:
    grad_sum: pytree of summed clipped gradients (sensitivity clip_norm under
      add/remove-one).
    clip_norm: C.
    noise_multiplier: sigma; the noise std is sigma * C.
    rng: a `jax.random.key`; split once into one key per leaf (in
      `jax.tree.leaves` order), so the noise is a deterministic function of
      rng and the tree structure.

  Returns:
    A pytree like grad_sum. Noise is drawn in float32 (at least) and cast to
    each leaf's dtype.
  """
  check_nonnegative("clip_norm", clip_norm)
  check_nonnegative("noise_multiplier", noise_multiplier)
  leaves, treedef = jax.tree.flatten(grad_sum)
  keys = jax.random.split(rng, len(leaves))
  std = jnp.asarray(noise_multiplier, jnp.float32) * jnp.asarray(
      clip_norm, jnp.float32)
  noisy = []
  for leaf, key in zip(leaves, keys):
    dtype = jnp.promote_types(leaf.dtype, jnp.float32)
    noise = std * jax.random.normal(key, leaf.shape, dtype)
    noisy.append((leaf.astype(dtype) + noise).astype(leaf.dtype))
  return jax.tree.unflatten(treedef, noisy)
