"""Poisson sampling at fixed array shapes, for the amplification the accountant assumes.

DP-SGD's accounting (PoissonSampledDpEvent) assumes every example (or site) joins a step
independently with probability q. jit needs fixed shapes, so the sampled set is compacted
into `max_size` slots, padded with weight-0 slots. `max_size` is the expectation plus
`_TAIL_SIGMAS` binomial standard deviations: P(more than max_size selected) is below 1e-9
per draw. If it ever happens the surplus is dropped (which only removes examples, never adds
one) and the draw reports it in `overflow` so the logs show it.
"""

import math

import jax
import jax.numpy as jnp

_TAIL_SIGMAS = 6.0


def max_sample_size(expected: float, population: int) -> int:
  """Slots for a Poisson sample of `expected` mean out of `population` elements."""
  return int(min(population, math.ceil(expected + _TAIL_SIGMAS * math.sqrt(expected) + 4)))


def poisson_sample(rng, count, rate, population: int, max_size: int):
  """Each of the first `count` of `population` positions joins independently w.p. `rate`.

  Inclusion coins are drawn per position with fold_in, so a position's coin does not depend
  on `population` (the padded width): a site samples the same examples padded or alone.

  Returns:
    positions: [max_size] int32, selected positions first (in increasing order), then 0s.
    mask:      [max_size] float32, 1 for a selected position, 0 for padding.
    overflow:  int32, how many selected positions did not fit (almost always 0).
  """
  u = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(rng, i)))(jnp.arange(population))
  selected = (u < rate) & (jnp.arange(population) < count)
  # Stable sort puts the selected positions first, in order.
  order = jnp.argsort(~selected, stable=True)[:max_size]
  num_selected = selected.sum()
  mask = (jnp.arange(max_size) < num_selected).astype(jnp.float32)
  positions = jnp.where(mask > 0, order, 0).astype(jnp.int32)
  return positions, mask, jnp.maximum(num_selected - max_size, 0).astype(jnp.int32)
