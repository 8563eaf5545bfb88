"""Poisson sampling at fixed array shapes, for the amplification the accountant assumes.

DP-SGD's accounting (PoissonSampledDpEvent) assumes every example (or site) joins a step
independently with probability q. jit needs fixed shapes, so the sampled set is compacted
into `max_size` slots, padded with weight-0 slots. If more are selected than fit, the surplus
is dropped and the draw reports it in `overflow`, so the logs show it.

Truncation is a different mechanism from the Poisson one the accountant composes, and the
gap is paid for in delta, not ignored: a run whose draws never overflow is the Poisson run
exactly, so if P(some draw of the unit's overflows during the run) <= eta, the truncated run
is (epsilon, delta_acc + (1 + e^epsilon) eta)-DP when the Poisson run is (epsilon,
delta_acc)-DP. privacy/plan.py (privacy_plan) gives the accountant delta (1 - 1e-3) and sizes the
slots (`max_sample_size` with an exact binomial tail) so that (1 + e^epsilon) eta stays
within the other 1e-3 of delta.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats


def site_rate(batch_size: int, count):
  """Each site's Poisson rate at example level, min(1, batch_size / count): its expected batch
  is batch_size (its whole data when smaller). The one place the rate is computed (FedAvg's
  client.py and the VAE sample at it, the plans size slots and the accountant's q with it);
  count is a public site size. jnp for jax arrays (traced counts), NumPy float64 otherwise."""
  if isinstance(count, jax.Array):
    return jnp.minimum(1.0, batch_size / count)
  return np.minimum(1.0, batch_size / np.asarray(count, np.float64))


def site_slots(site_counts, batch_size: int, tail: float) -> int:
  """Batch slots that hold every site's Poisson sample at its own site_rate, and that of its
  neighbours (one example added or removed: sizes n - 1 and n + 1 at THEIR rates), each draw
  overflowing with probability <= tail; never more than the largest site."""
  sizes = np.unique(np.asarray(site_counts, np.int64))
  slots = max_sample_size_over(np.concatenate([sizes - 1, sizes, sizes + 1]),
                               lambda n: float(site_rate(batch_size, n)), tail)
  return min(slots, int(sizes.max()))


def max_sample_size(expected: float, population: int, tail: float = 1e-9) -> int:
  """Slots for a Poisson sample at rate expected/population: the smallest m with
  P(Binomial(population, expected/population) > m) <= tail (all of them if tail <= 0)."""
  return max_sample_size_over([population], lambda n: expected / n, tail)


def max_sample_size_over(populations, rate, tail: float) -> int:
  """The smallest m that holds, with P(overflow) <= tail, the Poisson sample of each of
  `populations` at its own rate(population) (clipped to 1): one slot count for sites of
  many sizes, vmapped together."""
  populations = np.unique(np.asarray(populations, np.int64))
  populations = populations[populations > 0]
  if len(populations) == 0:
    return 0
  rates = np.minimum(1.0, np.array([rate(int(n)) for n in populations], np.float64))
  hi = int(populations.max())
  if tail <= 0:
    return hi
  lo = max(0, int(math.floor((populations * rates).max())) - 1)
  worst_tail = lambda m: float(np.max(stats.binom.sf(m, populations, rates)))
  if worst_tail(lo) <= tail:
    return lo
  while hi - lo > 1:  # worst_tail(lo) > tail >= worst_tail(hi) = 0
    mid = (lo + hi) // 2
    lo, hi = (lo, mid) if worst_tail(mid) <= tail else (mid, hi)
  return hi


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


def site_poisson_sample(rng, count, batch_size: int, population: int, max_size: int):
  """A site's DP-SGD minibatch at its own site_rate (the rate its slots were sized for):
  poisson_sample's (positions, mask, overflow). FedAvg's client and the VAE draw through it,
  so the rate they sample at is the plan's."""
  return poisson_sample(rng, count, site_rate(batch_size, count), population, max_size)


def cyclic_batches(count, batch_size: int):
  """k = count // batch_size: the fixed batches one epoch of a site's examples is cut into
  under example-level matrix-factorization noise (the last count mod batch_size examples of
  its permutation are never used). jnp for traced counts, int otherwise."""
  return count // batch_size


def cyclic_batch(perm_rng, count, population: int, batch_size: int, step):
  """[batch_size] positions of local step `step` under cyclic batches (no sampling): the
  site's `count` positions permuted ONCE for the run (from `perm_rng`), cut into
  k = count // batch_size batches; step t takes batch t mod k. So every example is in at most
  one batch, joins at most ceil(T / k) of T steps and any two of its steps are exactly k apart
  (the min-separation of mf_noise.sensitivity). Keys are drawn per position with fold_in, so
  the order does not depend on `population` (the padded width). Needs count >= batch_size."""
  keys = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(perm_rng, i)))(
      jnp.arange(population))
  keys = jnp.where(jnp.arange(population) < count, keys, 2.0)  # padding sorts last
  order = jnp.argsort(keys, stable=True)
  j = step % jnp.maximum(cyclic_batches(count, batch_size), 1)
  return jax.lax.dynamic_slice(order, (j * batch_size,), (batch_size,)).astype(jnp.int32)
