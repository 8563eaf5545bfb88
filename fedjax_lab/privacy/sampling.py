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

from fedjax_lab import keys


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


# From this many sites on, `poisson_cohort` draws in O(cohort) work (as keys.sample_cohort).
LARGE_POPULATION = keys.LARGE_POPULATION


def _log_uniform(rng, shape) -> jax.Array:
  """log(U), U uniform on (0, 1) at 47-bit resolution, accurate in float32 at both ends.

  A float32 uniform has 2^-23 steps, which would move P(gap = 0) = q by about one step in
  q 2^23 (0.1% at q = 1e-4): U is built from a 24-bit and a 23-bit word instead, and its log
  taken from whichever of U or 1 - U is small, so the gap law below is exact to float32
  rounding (tests/test_population.py checks it against float64)."""
  hi_rng, lo_rng = jax.random.split(rng)
  return log_uniform_from_words(jax.random.randint(hi_rng, shape, 0, 1 << 24),
                                jax.random.randint(lo_rng, shape, 0, 1 << 23))


def log_uniform_from_words(hi, lo) -> jax.Array:
  """log((hi + (2 lo + 1) / 2^24) / 2^24) in float32 for integer words hi < 2^24, lo < 2^23.

  2 lo + 1 < 2^24 and its complement are exact in float32 (a half-integer above 2^23 is not),
  so U never rounds to 0 or 1."""
  hi, lo = jnp.asarray(hi, jnp.int32), jnp.asarray(lo, jnp.int32)
  frac = (2 * lo + 1).astype(jnp.float32) * 2.0**-24
  frac_complement = (2 * ((1 << 23) - 1 - lo) + 1).astype(jnp.float32) * 2.0**-24  # 1 - frac
  one_minus_u = (((1 << 24) - 1 - hi).astype(jnp.float32) + frac_complement) * 2.0**-24
  # U <= 1/2: log U directly; U > 1/2: log1p(-(1 - U)), with 1 - U from the complements.
  return jnp.where(hi < (1 << 23), jnp.log(hi.astype(jnp.float32) + frac) - 24.0 * math.log(2.0),
                   jnp.log1p(-one_minus_u))


def poisson_cohort(rng, num_sites: int, rate: float, max_size: int):
  """Site-level Poisson cohort: each of `num_sites` sites joins independently w.p. `rate`;
  poisson_sample's (positions, mask, overflow) contract, selected sites in increasing order.

  Below LARGE_POPULATION, poisson_sample (a coin per site). From it on, in O(max_size): the
  selected sites of a Bernoulli(q) sequence are the partial sums of independent Geometric(q)
  gaps (failures before each success, floor(log U / log(1 - q))), the textbook equivalent of a
  coin per site (Devroye, "Non-Uniform Random Variate Generation", X.2). The surplus beyond
  max_size is not drawn site by site: its size is the Binomial(sites left, q) the coins after
  the last slot would give, reported in `overflow` like the coins' count."""
  if num_sites < LARGE_POPULATION or rate >= 1.0:
    return poisson_sample(rng, num_sites, rate, num_sites, max_size)
  return geometric_cohort(rng, num_sites, rate, max_size)


def geometric_cohort(rng, num_sites: int, rate: float, max_size: int):
  """poisson_cohort's large-population draw (any num_sites, rate < 1)."""
  gap_rng, rest_rng = jax.random.split(rng)
  failures = jnp.floor(_log_uniform(gap_rng, (max_size + 1,)) / math.log1p(-rate))
  # Clamped past the population so the running sum stays in int32 for any population.
  steps = jnp.minimum(failures, num_sites).astype(jnp.int32) + 1

  def advance(position, step):
    nxt = jnp.minimum(position + step, num_sites + 1)
    return nxt, nxt

  _, ends = jax.lax.scan(advance, jnp.int32(0), steps)
  sites = ends - 1  # the site of each success, increasing; num_sites: past the population
  selected = sites[:max_size] < num_sites
  mask = selected.astype(jnp.float32)
  positions = jnp.where(selected, sites[:max_size], 0).astype(jnp.int32)
  left = jnp.maximum(num_sites - 1 - sites[max_size], 0)  # sites after the (max_size+1)-th
  surplus = jnp.where(sites[max_size] < num_sites,
                      1 + jax.random.binomial(rest_rng, left.astype(jnp.float32), rate), 0)
  return positions, mask, surplus.astype(jnp.int32)
