"""What secure aggregation's quantization costs in delta: the sum of stochastically rounded
Gaussian-noised updates is not exactly the Gaussian sum the accountant composes.

Adversary: whoever sees the decoded secure sum (the server) or anything computed from it (the
released models). Assumed: each of the n summed sites sends R(x_i + Z_i) per coordinate, with
Z_i ~ N(0, s_i^2) independent of x_i and of everything else, s_i >= s, and R stochastic
rounding onto the grid h Z: R(y) = h floor(y / h + U), U ~ U[0, 1) fresh per value.

Per coordinate. Given S = sum_i (x_i + Z_i), the vector Y = x + Z is a + S/n + W with
a_i = x_i - mean(x) and W Gaussian on the sum-zero hyperplane H, Var(v.W) >= s^2 |v|^2 for
v in H (Var(v.Z | 1.Z) = min_l Var((v - l 1).Z) >= s^2 |v|^2). The released sum of R(Y_i) is
S - h sum_i f_i + h sum_i B_i, f_i the fractional part of Y_i / h and B_i ~ Bernoulli(f_i):
given S its law depends only on Y mod hL, L = Z^n ∩ H. By Poisson summation the law of W mod
hL has a density within a factor 1 +- theta of uniform, theta = sum over nonzero v in
L* = P(Z^n) (P the projection onto H) of exp(-2 pi^2 tau^2 |v|^2), tau = s / h. Each v = Pz
has a representative z with |sum z| <= n/2, for which |Pz|^2 = |z|^2 - (sum z)^2 / n >=
|z|^2 - |sum z| / 2 >= |z|^2 / 2 (integers: |sum z| <= sum z_i^2), so
  theta <= theta_bar(n, tau) = (sum_{m in Z} exp(-pi^2 tau^2 m^2))^n - 1
                             <= exp(2 n e^{-pi^2 tau^2} / (1 - e^{-3 pi^2 tau^2})) - 1
(sum_{m >= 1} e^{-a m^2} <= e^{-a} / (1 - e^{-3a}) as m^2 - 1 >= 3 (m - 1)). So the released
sum is within total variation theta_bar of K_n(S), a randomised function of S alone (the same
rounding with Y mod hL uniform). Over d coordinates (independent noise and rounding) and R
rounds, a hybrid argument gives TV <= R d theta_bar. Clipping each coordinate to [-c, c]
before rounding changes nothing unless a value leaves [-c, c]; coordinates of a clipped update
lie in [-b, b] (b: its L2 bound), so that costs at most R P(any value clipped), the union bound
of secagg/noise.py clip_probability. No modular wrap-around: the grid is sized for the slots
(secagg/config.py levels_for), slots L < 2^bits. With eta the total, a run whose Gaussian
mechanism is (eps, d)-DP is (eps, d + (1 + e^eps) eta)-DP as quantized.

K_n, exactly (per coordinate, in grid units: s' = S/h, h = 1). Given S, Y is uniform on
{y : sum y = s'} mod L, i.e. y_1 .. y_{n-1} uniform on [0, 1) and y_n = s' - their sum (L has
the basis e_i - e_n), so each offset O_i = R(y_i) - y_i = B_i - f_i has the triangle law
Lambda on [-1, 1] (f uniform: O = 1 - f w.p. f, -f w.p. 1 - f), and the n offsets are iid
Lambda conditioned on s' + sum O_i being an integer: P(K_n = k) = Lambda^{*n}(k - s') (the
normaliser is 1: any density convolved with box = U[-1/2, 1/2] sums to 1 over a coset of Z).
As Lambda = box * box, Lambda^{*n}(k - s') = P(|s' + B_n - k| < 1/2) with B_n ~ box^{*(2n-1)}:
  K_n(S) = h round(S/h + B_n),   B_n independent of S,
checked against the integral over y for n = 1, 2, 3 (tests/test_secagg_dp.py).

The n-dependence, paid. At example level n is the fixed cohort (or its survivors, whose
dropouts do not depend on the data), so K_n is a post-processing the accountant allows. At
site level n is the realised Poisson cohort, which amplification treats as hidden, and the
target's presence changes it: m rows (the others' sample) without it, m + 1 with it. As
B_{m+1} = B_m + T, T ~ Lambda independent (support [-1, 1]), and coordinated noise keeps the
noise on the sum at N(0, sigma^2 I) whatever n, both releases are the common channel
"y -> h round(y/h + B_m)" (post-processing) applied to N(A, sigma^2 I) (without it) or to the
mixture over t in [-1, 1]^d of N(A + x + h t, sigma^2 I) (with it: x its update, |x| <= C in
sent units), whose shifts have norm <= C + h sqrt(d). Poisson sampling gives, for given
others' sample, the pair (N(A), (1 - q) N(A) + q that mixture), then the mixture over the
others' samples. The hockey-stick divergences (PLD) are jointly convex, and exp((a - 1) D_a)
(Renyi, RDP) jointly convex too, so each pair is dominated by the worst of its components:
the (subsampled) Gaussian pair with shift norm C + h sqrt(d), whose divergences grow with the
shift (d = 1 checked against the Gaussian closed form, tests/test_secagg_dp.py). So at site
level the accountant composes
  z_eff = z C / (C + h sqrt(d))            (site_sensitivity_factor),
z the noise multiplier the sites add, C = dp.clip_norm / cohort_size (the update is divided by
the expected cohort before it is quantized: aggregators.site_dp, site_row), h the grid step
and d the number of summed coordinates: privacy/plan.py calibrates z_eff to dp.target_epsilon
and has the sites add z = z_eff (1 + h sqrt(d) / C), and every guarantee entry (the server's
and the colluders', who see n, included: the target still changes n) uses z_eff. The same holds
for the colluders' rows: they subtract their own rows, leaving K_{n-k} of the honest sum. A
round whose cohort is empty releases the server's noise N(0, sigma^2 I) rounded onto the same
grid (aggregators.gaussian_noise): K_1 of a zero update, so at m = 0 the pair is K_1(N(0)) vs
K_1(N(x)), the common channel "+ B_1, round" and shift norm <= C. (The divergences of the
subsampled Gaussian growing with the shift norm is what dp-accounting's sensitivity-1 events
assume for any shift of norm <= 1.)
The theta_bar term above still holds for every n and is paid as before.

The grid (step h = 2c / levels_for(slots, bits)) and every number here depend on public
quantities only: the slots, never the realised cohort.
"""

import math
from typing import NamedTuple

import numpy as np
from fedjax_lab.errors import ConfigError
from fedjax_lab.privacy import shares
from fedjax_lab.secagg.noise import clip_probability
from fedjax_lab.secagg.config import levels_for, validate_secagg

# The share of dp.delta reserved for the quantization (next to the truncation's, plan.py).
SECAGG_SHARE = 1e-3


def theta_bar(n: int, tau: float) -> float:
  """The closed-form bound above on the wrapped Gaussian's deviation from uniform."""
  a = math.pi ** 2 * tau ** 2
  if a > 745:  # e^{-a} underflows: the bound is 0 to double precision (below 1e-320)
    return 0.0
  x = 2.0 * n * math.exp(-a) / -math.expm1(-3.0 * a)
  return math.expm1(x) if x < 700 else math.inf


def check_secagg(config, max_cohort: int) -> None:
  """secagg.validate_secagg's checks for a cohort of up to `max_cohort` sites, as a ConfigError
  naming the key (its ValueError names the key first: 'secagg.bits=...')."""
  s = config.secagg
  try:
    validate_secagg(max_cohort, s.neighbours, s.threshold, s.bits, s.clip_range, s.dropout_rate)
  except ValueError as e:
    message = str(e)
    key = message.split("=")[0] if message.startswith("secagg.") else "secagg.enabled"
    raise ConfigError(key, message) from None


def grid(config, grid_cohort: int) -> tuple[float, int]:
  """(clip_range, levels) of the secure sum's grid for up to `grid_cohort` rows (the slots at
  site level, the cohort at example level): public numbers only."""
  return float(config.secagg.clip_range), levels_for(grid_cohort, config.secagg.bits)


def grid_step(config, grid_cohort: int) -> float:
  c, levels = grid(config, grid_cohort)
  return 2.0 * c / levels


def site_sensitivity_factor(config, slots: int, d: int) -> float:
  """Site level under secure aggregation: C / (C + h sqrt(d)), C the clip norm in the units the
  sites send (dp.clip_norm / cohort_size): z_eff = z x this (module docstring)."""
  c_sent = config.dp.clip_norm / config.cohort_size
  return c_sent / (c_sent + grid_step(config, slots) * math.sqrt(d))


class Row(NamedTuple):
  """One site's row in the secure sum: its noise std per coordinate (the least any site
  sends) and a bound on a coordinate of its update before noise."""
  share_std: float
  bound: float


def site_row(config, update_noise_multiplier: float, n: int) -> Row:
  """Site level: the update clipped to C, a share z C / sqrt(n) (coordinated, n the round's
  sites) or z C (parallel), all divided by the expected cohort (aggregators.site_dp)."""
  dp, k = config.dp, config.cohort_size
  share = update_noise_multiplier * dp.clip_norm
  if dp.noise == "coordinated":
    share /= math.sqrt(n)
  return Row(share / k, dp.clip_norm / k)


def example_row(config, plan, site_counts) -> Row:
  """Example level, one SGD step (checked by gate): -lr (sum of <= slots clipped gradients +
  N(0, (share C)^2)) / divisor, times the site's weight (shares.example_dp_divisor)."""
  dp, c = config.dp, config.client
  counts = np.sort(np.asarray(site_counts, np.float64))
  k = config.cohort_size
  share = plan.noise_multiplier
  if dp.noise == "coordinated":
    share = shares.example_share(config, share)
    div_min = div_max = float(c.batch_size)
  else:  # min(count, batch_size) per site
    div_min, div_max = min(counts[0], c.batch_size), min(counts[-1], c.batch_size)
  if config.server.weighting == "uniform":
    w_min = w_max = 1.0 / k
  else:  # count / the cohort's total, at its smallest and largest
    w_min = counts[0] / counts[-k:].sum()
    w_max = counts[-1] / (counts[-1] + counts[:k - 1].sum())
  return Row(c.lr * share * dp.clip_norm / div_max * w_min,
             c.lr * plan.slots * dp.clip_norm / div_min * w_max)


class Terms(NamedTuple):
  step: float            # grid step h
  aliasing: float        # per round: d max_n theta_bar(n, s_n / h)
  clipping: float        # per round: max_n P(any of the n rows' d values clipped)
  rounds: int
  eta: float             # rounds (aliasing + clipping): the TV to the Gaussian run
  worst_n: int           # the n at which aliasing + clipping is largest


def terms(config, plan, d: int, site_counts) -> Terms:
  """eta for the whole run, over every n the secure sum can hold (1 .. slots at site level,
  the survivors t .. K at example level)."""
  s = config.secagg
  site = config.dp.level == "site"
  h = grid_step(config, plan.slots if site else config.cohort_size)
  if site:
    ns, row_of = range(1, plan.slots + 1), lambda n: site_row(
        config, plan.update_noise_multiplier, n)
  else:
    row = example_row(config, plan, site_counts)
    ns, row_of = range(shares.noise_shares(config), config.cohort_size + 1), lambda n: row
  worst = (-1.0, 0.0, 0.0, 0)
  for n in ns:
    r = row_of(n)
    a = d * theta_bar(n, r.share_std / h)
    c = clip_probability(s.clip_range, r.bound, r.share_std, n, d)
    if a + c > worst[0]:
      worst = (a + c, a, c, n)
  _, a, c, n = worst
  return Terms(h, a, c, config.rounds, min(1.0, config.rounds * (a + c)), n)


def gate(config, plan, d: int, site_counts) -> Terms:
  """Refuses (ConfigError on secagg.bits, or secagg.clip_range when clipping dominates) a run whose quantization costs more than its share
  SECAGG_SHARE dp.delta: (1 + e^eps) eta, eps the headline epsilon after config.rounds."""
  c = config.client
  if config.dp.level == "example" and (c.local_steps != 1 or c.optimizer != "sgd"):
    raise ConfigError("client.local_steps", "example-level DP with secure aggregation is "
                      "accounted for one SGD step a round (the rounding bound needs the "
                      "last noise to enter the update linearly); use client.local_steps=1 "
                      "and client.optimizer=sgd")
  t = terms(config, plan, d, site_counts)
  eps = plan.accountant.epsilon_after(config.rounds * plan.steps_per_round)
  cost = (1 + math.exp(min(eps, 700.0))) * t.eta
  budget = SECAGG_SHARE * config.dp.delta
  if cost <= budget:
    return t
  why = (f"over {t.rounds} rounds the quantization is within TV {t.eta:.3g} of the Gaussian "
         f"sum (aliasing {t.aliasing:.3g} + clipping {t.clipping:.3g} a round, at n="
         f"{t.worst_n} sites), which costs (1 + e^{eps:.3g}) x that = {cost:.3g} > "
         f"{SECAGG_SHARE:g} dp.delta = {budget:.3g}")
  if t.clipping >= t.aliasing:
    raise ConfigError("secagg.clip_range", f"{config.secagg.clip_range:g} clips the noised "
                      f"updates too often: {why}; raise secagg.clip_range (and secagg.bits "
                      f"with it if the grid then gets too coarse)")
  raise ConfigError("secagg.bits", f"{config.secagg.bits} bits give a grid step {t.step:.3g} "
                    f"too coarse for the noise shares: {why}; raise secagg.bits (or lower "
                    f"secagg.clip_range)")
