"""Clip, stochastically round into Z_{2^b}, and decode a sum: jax.numpy, vmapped, jittable.

A coordinate x is clipped to [-c, c] (every clipped coordinate is counted and returned, never
silent), mapped to s = x / step in [-L/2, L/2] (step = 2c / L, L = `levels`, even), rounded
to floor(s) + Bernoulli(s - floor(s)) (unbiased, |error| < one step) and shifted by L/2 in
integer arithmetic. Values live in
{0, .., L}; validate_secagg makes K * L < 2^b, so the masked sum of up to K sites, reduced mod
2^b, equals the integer sum: no wraparound. The server decodes sum_i q_i with the count n of
summed sites: sum_i x_i ~ (sum_i q_i - n L / 2) * step, the centring done in integers (so a
float32 never has to cancel n * c against itself).

Precision: s is computed in float32, so a value near c with L above ~2^24 carries float32's
relative rounding rather than the grid's; a small value keeps the grid's absolute precision
(the offset L/2 is added as an integer).
"""

import jax
import jax.numpy as jnp


def modulus_mask(bits: int):
  return jnp.uint32((1 << bits) - 1) if bits < 32 else jnp.uint32(0xFFFFFFFF)


def quantize(x: jax.Array, key: jax.Array, clip_range: float, levels: int):
  """x: [..., d] float -> (q uint32 in {0..levels}, number of clipped coordinates per row)."""
  x = x.astype(jnp.float32)
  bad = ~jnp.isfinite(x)  # NaN/inf would poison the sum: sent as 0, counted with the clipped
  clipped = jnp.sum(bad | (jnp.abs(x) > clip_range), axis=-1, dtype=jnp.int32)
  x = jnp.clip(jnp.where(bad, 0.0, x), -clip_range, clip_range)
  # Rounded around 0, the offset L/2 added in integers: (x + c) * L / 2c in float32 would
  # keep only 24 bits of a value near L / 2, i.e. lose a small update's precision to c's.
  half = jnp.asarray(levels, jnp.int32) // 2  # traced: no recompiles across cohort sizes
  scaled = x * (jnp.asarray(levels, jnp.float32) / (2.0 * clip_range))
  floor = jnp.floor(scaled)
  u = jax.random.uniform(key, x.shape, jnp.float32)
  q = (floor + (u < (scaled - floor)).astype(jnp.float32)).astype(jnp.int32)
  q = jnp.clip(q, -half, half) + half
  return q.astype(jnp.uint32), clipped


def decode_sum(total: jax.Array, n: int, clip_range: float, levels: int, bits: int):
  """The float sum of n sites' values from their integer sum mod 2^bits (no wraparound)."""
  del bits  # n * levels < 2^bits <= 2^32: the centred value fits int32
  centred = jax.lax.bitcast_convert_type(
      total.astype(jnp.uint32) - jnp.uint32(n * (levels // 2)), jnp.int32)
  return centred.astype(jnp.float32) * jnp.float32(2.0 * clip_range / levels)

