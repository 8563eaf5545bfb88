"""How a round's noise is split among the sites, and what each site divides by.

Coordinated noise: each of the round's sites adds sigma / sqrt(noise_shares) so the sum
carries sigma; parallel: each adds sigma. At example level a site divides its noised clipped
sum by its expected batch size, or by batch_size at every site under coordinated noise
(client.ExampleDP.fixed_divisor); `noise_coverage` checks that these divisors and shares give
every site's examples at least the accountant's sigma. Plain numbers and the config object in,
numbers out: nothing of the lab above privacy/ is imported.
"""

import math

import jax.numpy as jnp
import numpy as np

from fedjax_lab.errors import ConfigError
from fedjax_lab.privacy.sampling import site_rate
from fedjax_lab.secagg import round as secagg_round


def noise_shares(config) -> int:
  """How many coordinated noise shares a round's sum is sure to hold: the cohort, or with
  secure aggregation and dropouts the threshold t (a round that finishes has >= t uploads),
  so each site adds sigma / sqrt(this) and the sum always carries at least sigma. (Site level:
  the round's own cohort size n, as no dropouts are allowed there.)"""
  s = config.secagg
  if s.enabled and s.dropout_rate > 0:
    return int(secagg_round.min_survivors(config.cohort_size, s.neighbours, s.threshold))
  return config.cohort_size


def example_share(config, noise_multiplier: float) -> float:
  """The noise multiplier one site adds at example level: sigma (parallel) or
  sigma / sqrt(noise_shares) (coordinated)."""
  if config.dp.noise == "coordinated":
    return noise_multiplier / math.sqrt(noise_shares(config))
  return noise_multiplier


def example_fixed_divisor(config) -> float | None:
  """batch_size under coordinated noise (a site smaller than its batch would otherwise divide
  by its own size while its share is calibrated to batch_size: client.ExampleDP), else None
  (each site divides by its expected batch size)."""
  return float(config.client.batch_size) if config.dp.noise == "coordinated" else None


def expected_batch(batch_size: int, site_count):
  """A site's expected Poisson batch, site_rate x count: what DP-SGD divides by (never the
  realised size, which depends on who was sampled). float32 for NumPy counts too
  (noise_coverage): the divisor the clients really use."""
  return jnp.asarray(site_rate(batch_size, site_count)) * site_count


def example_dp_divisor(dp, batch_size: int, site_count):
  """What a site divides its noised clipped gradient sum by (jnp or NumPy counts); `dp` has
  the field fixed_divisor (client.ExampleDP)."""
  if dp.fixed_divisor is not None:
    return dp.fixed_divisor + 0 * site_count
  return expected_batch(batch_size, site_count)


def noise_coverage(site_counts, batch_size: int, example_dp, cohort_size: int,
                   noise_multiplier: float) -> np.ndarray:
  """[sites]: for each site j, the std of the noise in a round's uniform average over the
  cohort, over noise_multiplier x the sensitivity of one of site j's examples in it, at the
  cohort holding j that carries the least noise. >= 1 means the accountant's sigma covers
  every example of j, whoever else is in the cohort.

  From the client's own divisors (example_dp_divisor) and noise share: site k sends
  (S_k + N(0, (share C)^2)) / d_k and the server averages with weight 1/K, so one example of
  j moves the average by C / (K d_j) while the noise has std share C sqrt(sum_k d_k^-2) / K.
  """
  d = np.asarray(example_dp_divisor(example_dp, batch_size, np.asarray(site_counts, np.float64)),
                 np.float64)
  share = example_dp.noise_multiplier
  ratios = np.empty(len(d))
  for j, dj in enumerate(d):
    least = np.sort(np.delete(d, j) ** -2.0)[:cohort_size - 1].sum()  # the quietest others
    ratios[j] = share * np.sqrt(dj ** -2.0 + least) / (noise_multiplier / dj)
  return ratios


def check_noise_coverage(config, site_counts, example_dp, noise_multiplier: float) -> None:
  """Refuses a plan in which some site's examples see less noise than the accountant's sigma
  (a guard: the divisors chosen by example_fixed_divisor make every ratio >= 1)."""
  ratios = noise_coverage(np.asarray(site_counts), config.client.batch_size, example_dp,
                          noise_shares(config), noise_multiplier)
  worst = int(np.argmin(ratios))
  if ratios[worst] < 1 - 1e-9:
    raise ConfigError("dp.noise", f"site {worst}'s examples would see noise "
                      f"{ratios[worst]:.3f} x sigma, less than the accountant composes; "
                      "use dp.noise=parallel")
