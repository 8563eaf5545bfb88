"""The privacy plan: what the accountant composes for a run, built from its config.

`privacy_plan(config, site_counts)` states the unit (one example or one site), the sampling
(Poisson minibatches or cohorts, truncated to `slots`), sigma (given or calibrated to
dp.target_epsilon), the accountant, the delta split between the accountant, the truncation
and (secure aggregation) the quantization (secagg_delta.py), the randomness, and the one log
line that says all of it; `PrivacyPlan.mechanism` is what privacy/guarantees.py turns into an
epsilon per adversary. The noise shares and divisors are privacy/shares.py's.
"""

import logging
import math
from typing import Any, NamedTuple

import numpy as np

from fedjax_lab.privacy import (accounting, adaptive_clipping, guarantees, sampling,
                                secagg_delta)
from fedjax_lab.privacy.shares import noise_shares

log = logging.getLogger("fedjax_lab")


class PrivacyPlan(NamedTuple):
  noise_multiplier: float      # sigma of the aggregate (per-site shares derive from it)
  sampling_prob: float         # Poisson rate the accountant uses
  steps_per_round: int         # DP-SGD steps (example) or 1 (site) per round
  accountant: accounting.Accountant
  budget: float | None         # stop before epsilon would exceed this
  description: str             # the one log line stating what is protected and how
  # Adaptive clipping (site DP) splits noise_multiplier over two releases: the update's
  # multiplier z_update > noise_multiplier and the count's std sigma_b. Otherwise the update
  # gets noise_multiplier itself and count_noise_multiplier is None.
  update_noise_multiplier: float | None = None
  count_noise_multiplier: float | None = None
  # Poisson samples are truncated to `slots` (sampling.py): the batch of a site (example
  # level) or the cohort (site level). P(a draw of the unit's overflows during the run) <=
  # overflow_bound, paid for by the delta the accountant does not get (TRUNCATION_SHARE).
  slots: int = 0
  overflow_bound: float = 0.0
  # "secret": the DP noise and sampling come from OS entropy kept in the checkpoint; "seeded":
  # from config.seed (reproducible, and no guarantee against anyone who knows the seed).
  randomness: str = "seeded"
  # secagg.enabled: the TV distance between the run as quantized and the Gaussian run over
  # all its rounds (privacy/secagg_delta.py), paid from the SECAGG_SHARE of delta; set by
  # experiment once the model's size is known (0 until then, and without secure aggregation).
  secagg_tv: float = 0.0
  # dp.mechanism (privacy/mechanism.py): "gaussian" here; a matrix-factorization run also
  # carries its participation and sensitivity (mechanism.MfInfo) and its correlated noise
  # (mf_noise.CorrelatedNoise: init / step / correlate).
  mechanism_name: str = "gaussian"
  mf: Any = None
  noise: Any = None

  def event(self, steps: int):
    """The dp_accounting DpEvent the first `steps` steps compose to."""
    if self.mf is not None:
      return self.accountant.event
    return accounting.dp_event(self.noise_multiplier, self.sampling_prob, steps)

  def mechanism(self, config, steps: int) -> guarantees.Mechanism:
    return guarantees.Mechanism(
        level=config.dp.level, noise=config.dp.noise,
        noise_multiplier=self.noise_multiplier, sampling_prob=self.sampling_prob,
        steps=steps, accountant_delta=self.accountant.delta, delta=config.dp.delta,
        overflow_bound=self.overflow_bound, accountant=config.dp.accountant,
        cohort_size=config.cohort_size, max_cohort=max(self.slots, 1),
        randomness=self.randomness, secure_aggregation=bool(config.secagg.enabled),
        noise_shares=noise_shares(config), secagg_tv=self.secagg_tv,
        secagg_neighbours=config.secagg.neighbours, secagg_threshold=config.secagg.threshold,
        secagg_dropouts=bool(config.secagg.enabled and config.secagg.dropout_rate > 0))


# The share of dp.delta set aside for truncated Poisson samples (sampling.py): the accountant
# composes at delta (1 - share), and the slots are sized so (1 + e^eps) P(overflow) <= share
# delta, so (eps, dp.delta) holds for the run as it is really sampled.
TRUNCATION_SHARE = 1e-3


def accountant_delta(config) -> float:
  """dp.delta less the truncation's share and, with secure aggregation, the quantization's
  (secagg_delta.SECAGG_SHARE): what dp-accounting is asked for."""
  share = TRUNCATION_SHARE + (secagg_delta.SECAGG_SHARE if config.secagg.enabled else 0.0)
  return config.dp.delta * (1 - share)


def privacy_plan(config, site_counts: np.ndarray,
                 summed_coordinates: int | None = None) -> PrivacyPlan | None:
  """What the accountant composes, from the config; sigma calibrated if asked.

  summed_coordinates: the length d of the rows secure aggregation sums; needed (and used) only
  at site level with secagg.enabled, where the accountant composes z_eff = z C / (C + h sqrt(d))
  while the sites add z (secagg_delta.py: the grid lets the private cohort size move the sum
  by up to h sqrt(d))."""
  dp = config.dp
  if dp.level == "none":
    return None
  if dp.level == "example":
    # Every site runs DP-SGD on its own examples; the smallest site samples at the highest
    # rate, so its epsilon bounds every site's. No amplification by cohort sampling is
    # claimed: a site is accounted as if it took part in every round.
    q = float(sampling.site_rate(config.client.batch_size, int(site_counts.min())))
    steps_per_round, units = config.client.local_steps, int(site_counts.sum())
    unit = "one example"
    scheme = (f"Poisson minibatches at rate batch_size/site_size (q={q:.4g} at the smallest "
              f"site), {steps_per_round} DP-SGD step(s) a round, no cohort amplification")
  else:
    q, steps_per_round, units = config.cohort_size / config.data.num_sites, 1, config.data.num_sites
    unit = "one site (all its examples)"
    scheme = f"Poisson cohorts at rate cohort_size/num_sites (q={q:.4g}), updates clipped"
  site_grid = dp.level == "site" and bool(config.secagg.enabled)
  if site_grid and summed_coordinates is None:
    raise ValueError("privacy_plan needs summed_coordinates (the secure sum's row length) at "
                     "site level with secure aggregation")
  total_steps = config.rounds * steps_per_round
  accountant_delta_ = accountant_delta(config)
  sigma, budget, how = dp.noise_multiplier, dp.target_epsilon, "given"
  if sigma == 0:
    sigma = accounting.noise_multiplier_for(dp.target_epsilon, q, total_steps,
                                            accountant_delta_, dp.accountant)
    budget, how = None, f"calibrated to epsilon<={dp.target_epsilon} after {config.rounds} rounds"

  def sized(z):
    """The accountant for noise multiplier z, and the slots its epsilon needs (every draw that
    can hold the unit: its site's batch at every step, sizes n and n +- 1 for the neighbours,
    each at rate batch_size / its size; or the cohort at every round)."""
    accountant = accounting.Accountant(z, q, accountant_delta_, dp.accountant)
    eps = accountant.epsilon_after(total_steps)
    overflow_bound = TRUNCATION_SHARE * dp.delta / (1 + math.exp(min(eps, 700.0)))
    tail = overflow_bound / total_steps
    if dp.level == "example":
      slots = sampling.site_slots(site_counts, config.client.batch_size, tail)
    else:
      n = config.data.num_sites
      slots = min(n, sampling.max_sample_size_over([n - 1, n, n + 1], lambda _: q, tail))
    return accountant, overflow_bound, slots

  added = sigma  # the noise multiplier the sites add (the accountant's, but for site_grid)
  accountant, overflow_bound, slots = sized(sigma)
  grid_note = ""
  if site_grid:
    # The grid step depends on the slots, which depend on epsilon: calibrated, sigma is z_eff
    # (epsilon at the target whatever the grid) and the sites add more; given, the sites add
    # sigma and z_eff shrinks as the slots grow, so grow them to a fixed point (monotone).
    secagg_delta.check_secagg(config, slots)
    if how == "given":
      while True:
        factor = secagg_delta.site_sensitivity_factor(config, slots, summed_coordinates)
        accountant, overflow_bound, more = sized(added * factor)
        if more <= slots:
          break
        slots = more
        secagg_delta.check_secagg(config, slots)
      sigma = added * factor
    else:
      factor = secagg_delta.site_sensitivity_factor(config, slots, summed_coordinates)
      added = sigma / factor
    grid_note = (f"; secure aggregation's grid (step {secagg_delta.grid_step(config, slots):.3g},"
                 f" d={summed_coordinates}) lets the private cohort size move the sum by up to "
                 f"step sqrt(d): the sites add noise multiplier {added:.4f}, the accountant "
                 f"composes {sigma:.4f} = that x C/(C + step sqrt(d)) (privacy/secagg_delta.py)")
  eps = accountant.epsilon_after(total_steps)
  if dp.delta > 1.0 / units:
    log.warning("dp.delta=%g > 1/%d (1/number of protected units): a mechanism that "
                "publishes one unit's data outright meets this delta", dp.delta, units)
  if dp.noise == "coordinated":
    shares = noise_shares(config)
    noise = (f"coordinated: each site adds sigma/sqrt({shares}), so the sum carries sigma"
             + (f" (with dropouts: at least the threshold t={shares} of the cohort's uploads "
                "are in any round that finishes)" if shares != config.cohort_size else ""))
    noise += ("; secure aggregation: the server learns only the sum" if config.secagg.enabled
              else "; without secure aggregation the server sees each weakly noised update "
              "(the guarantees below say what holds against whom)")
  else:
    noise = "parallel: every site adds the full sigma"
  if dp.level == "site":
    noise += "; a round with an empty cohort gets the noise from the server"
  randomness = guarantees.resolve_randomness(dp.randomness, config.data.name)
  update_sigma, count_stddev, clip = float(added), None, f"clip_norm={dp.clip_norm:g}"
  if dp.adaptive_clip:  # the accountant still composes sigma (Andrew et al. 2021, Thm 1)
    update_sigma, count_stddev = adaptive_clipping.adaptive_clip_noise(config, sigma)
    clip = adaptive_clipping.describe(sigma, count_stddev, dp.target_quantile, dp.clip_lr,
                                      dp.clip_norm)
  truncation = (f"samples truncated to {slots} slots, P(any overflow of the unit's draws) <= "
                f"{overflow_bound:.3g}, covered by delta: the accountant composes at "
                f"delta={accountant_delta_:g}"
                + (f" (dp.delta less {secagg_delta.SECAGG_SHARE:g} of it for secure "
                   "aggregation's rounding, less the truncation's share)"
                   if config.secagg.enabled else ""))
  description = (f"privacy: unit={unit}; neighbouring relation=add/remove one; sampling="
                 f"{scheme}; {truncation}; accountant={dp.accountant}; delta={dp.delta:g}; "
                 f"noise_multiplier={sigma:.4f} ({how}{grid_note}); {clip}; noise {noise}; "
                 f"randomness={randomness} (dp.randomness={dp.randomness})")
  return PrivacyPlan(noise_multiplier=float(sigma), sampling_prob=q,
                     steps_per_round=steps_per_round, accountant=accountant,
                     budget=budget, description=description,
                     update_noise_multiplier=update_sigma, count_noise_multiplier=count_stddev,
                     slots=slots, overflow_bound=overflow_bound, randomness=randomness)
