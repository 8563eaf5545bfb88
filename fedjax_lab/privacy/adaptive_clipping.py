"""Adaptive clipping to a target quantile of the site update norms.

Andrew, Thakkar, McMahan, Ramaswamy 2021, "Differentially Private Learning with Adaptive
Clipping" (arXiv 1905.03871), Algorithm 1 with the geometric update. Each round, with clip
norm C_t, every site k of the cohort also reports whether its update fitted:

  b_k     = 1[||Δ_k|| <= C_t]
  b̃_t     = (Σ_k (b_k - 1/2) + N(0, σ_b²)) / m + 1/2     m = expected cohort size
  C_{t+1} = C_t · exp(-η_C (b̃_t - γ))                    γ = target quantile, η_C = clip lr

The bits are summed centred, b_k - 1/2 in {-1/2, +1/2}, so adding or removing one site moves
the sum by 1/2 (not 1): the count's noise multiplier in the usual sense is 2σ_b. This is what
tensorflow_privacy's QuantileEstimatorQuery does, and what makes Theorem 1 hold: a site's
contribution to the pair of releases (Σ clip(Δ_k) + N(0, (z_Δ C_t)²), Σ (b_k - 1/2) +
N(0, σ_b²)) has norm at most sqrt(z_Δ⁻² + (2σ_b)⁻²) = 1/z in noise units, so one round is
exactly one Gaussian mechanism with noise multiplier z:

  z_Δ = (z⁻² - (2σ_b)⁻²)^(-1/2)     finite only for 2σ_b > z

The accountant composes z; the update carries the larger z_Δ. b̃_t is clamped to [0, 1]
(post-processing, as in tensorflow_privacy), so C moves by at most a factor exp(η_C) a round.
"""

import jax.numpy as jnp

from fedjax_lab.errors import ConfigError


def default_count_stddev(expected_cohort: float) -> float:
  """σ_b = m / 20, the paper's choice (noise std 0.05 on the fraction b̃)."""
  return expected_cohort / 20.0


def update_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
  """z_Δ = (z⁻² - (2σ_b)⁻²)^(-1/2): the update's share of the accountant's z (Theorem 1).

  Raises ValueError unless 2σ_b > z > 0 (otherwise the count alone spends more than z).
  """
  if not noise_multiplier > 0 or not 2 * count_stddev > noise_multiplier:
    raise ValueError(f"need 2 * count_stddev > noise_multiplier > 0, got count_stddev="
                     f"{count_stddev}, noise_multiplier={noise_multiplier}")
  return (noise_multiplier ** -2 - (2 * count_stddev) ** -2) ** -0.5


def fraction_below(below, in_cohort, count_noise, expected_cohort):
  """b̃ = (Σ_k in_k (b_k - 1/2) + noise) / m + 1/2, clamped to [0, 1].

  Args:
    below: [K] bool, b_k: the site's update norm is <= the clip norm.
    in_cohort: [K] float, 1 for a site in the cohort, 0 for padding.
    count_noise: scalar, the sum of the sites' noise shares on the count.
    expected_cohort: m, the expected cohort size (public, unlike the sampled size).
  """
  centred = jnp.dot(in_cohort, below.astype(jnp.float32) - 0.5)
  return jnp.clip((centred + count_noise) / expected_cohort + 0.5, 0.0, 1.0)


def next_clip_norm(clip_norm, update_norms, in_cohort, count_noise, expected_cohort,
                   target_quantile, clip_lr):
  """C_{t+1} = C_t exp(-η_C (b̃ - γ)) from the cohort's update norms [K] (pure, jittable).

  Args:
    clip_norm: C_t, scalar.
    update_norms: [K] the L2 norms of the sites' (unclipped) updates.
    in_cohort: [K] float, 1 for a site in the cohort, 0 for padding.
    count_noise: scalar, the noise added to the centred count Σ_k (b_k - 1/2).
    expected_cohort: m.
    target_quantile: γ in (0, 1).
    clip_lr: η_C > 0.
  """
  below = update_norms <= clip_norm
  frac = fraction_below(below, in_cohort, count_noise, expected_cohort)
  return clip_norm * jnp.exp(-clip_lr * (frac - target_quantile))


def describe(noise_multiplier: float, count_stddev: float, target_quantile: float,
             clip_lr: float, initial_clip_norm: float) -> str:
  """The log line's account of the split, with the numbers the round uses."""
  z_update = update_noise_multiplier(noise_multiplier, count_stddev)
  return (f"adaptive clipping to the {target_quantile:g} quantile of the site update norms "
          f"(Andrew et al. 2021, geometric, clip_lr={clip_lr:g}, initial clip_norm="
          f"{initial_clip_norm:g}): update noise multiplier z_update={z_update:.4f} "
          f"(x the current clip_norm), count noise std sigma_b={count_stddev:.4g} on "
          f"sum(b_k - 1/2); together one Gaussian mechanism with noise_multiplier "
          f"z={noise_multiplier:.4f}, which the accountant composes "
          f"(z_update/z = {z_update / noise_multiplier:.4f})")


def adaptive_clip_noise(config, noise_multiplier: float) -> tuple[float, float]:
  """(z_update, sigma_b): the update's noise multiplier and the count's noise std that
  together spend exactly the accountant's `noise_multiplier` z (this module's docstring).

  Raises ConfigError naming dp.count_noise_multiplier unless 2 sigma_b > z.
  """
  sigma_b = config.dp.count_noise_multiplier
  given = sigma_b is not None
  if not given:
    sigma_b = default_count_stddev(config.cohort_size)
  if not 2 * sigma_b > noise_multiplier:
    what = f"{sigma_b:g}" if given else f"unset, so cohort_size / 20 = {sigma_b:g},"
    raise ConfigError("dp.count_noise_multiplier", f"{what} is too small: adaptive clipping "
                      f"needs 2 * count_noise_multiplier > the noise_multiplier z="
                      f"{noise_multiplier:.4g} (the update then gets (z^-2 - (2 sigma_b)^-2)"
                      f"^-1/2); set it above {noise_multiplier / 2:.4g}, e.g. 2.5 z = "
                      f"{2.5 * noise_multiplier:.4g} (update noise ~2% above z)")
  return update_noise_multiplier(noise_multiplier, sigma_b), sigma_b
