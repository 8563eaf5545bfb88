"""Lower bounds and estimates of epsilon from membership scores (the statistics of
fedjax_lab/attacks/audit.py, which documents each; kept apart so that the training round's
in-run canaries (attacks/canaries.py) use them without importing the audit's trainers)."""

import numpy as np
from jax_privacy import auditing
from scipy import optimize, stats

from fedjax_lab.privacy import accounting

LOWER_BOUNDS = ("clopper_pearson", "one_run", "one_run_grid")
ESTIMATES = ("gdp", "one_run_fdp")


def _scores(name: str, values) -> np.ndarray:
  a = np.asarray(values, dtype=np.float64)
  if a.ndim != 1 or a.size == 0:
    raise ValueError(f"{name} must be a non-empty 1-D array of scores, got shape {a.shape}")
  if not np.all(np.isfinite(a)):
    raise ValueError(f"{name} has {int(np.sum(~np.isfinite(a)))} non-finite scores (NaN/inf); "
                     "clip or drop them before auditing")
  return a


def _auditor(scores_in, scores_out, delta: float, confidence: float):
  if not 0.5 < confidence < 1:
    raise ValueError(f"confidence must be in (0.5, 1), got {confidence}")
  if not 0 < delta < 1:
    raise ValueError(f"delta must be in (0, 1), got {delta}")
  s_in, s_out = _scores("scores_in", scores_in), _scores("scores_out", scores_out)
  return auditing.CanaryScoreAuditor(s_in, s_out)


def epsilon_lower_bound(scores_in, scores_out, delta: float, confidence: float = 0.95,
                        method: str = "clopper_pearson") -> float:
  """A lower bound on epsilon at `delta`, holding with probability `confidence` (a float >= 0)
  for every (eps, delta)-DP mechanism, under the method's independence assumption (module
  docstring)."""
  if method not in LOWER_BOUNDS:
    hint = (f"; {method!r} is an estimate that assumes a Gaussian trade-off curve: use "
            "epsilon_estimate") if method in ESTIMATES else ""
    raise ValueError(f"method must be one of {', '.join(LOWER_BOUNDS)}, got {method!r}{hint}")
  auditor = _auditor(scores_in, scores_out, delta, confidence)
  significance = 1.0 - confidence
  if method == "clopper_pearson":
    eps = auditor.epsilon_clopper_pearson(significance, delta, one_sided=True,
                                          threshold_strategy=auditing.Bonferroni())
  elif method == "one_run":
    eps = auditor.epsilon_one_run(significance, delta)
  else:
    eps = one_run_grid(scores_in, scores_out, delta, significance)
  return max(0.0, float(eps))


def guess_grid(m: int, smallest: int = 16) -> list[int]:
  """The numbers of guesses one_run_grid tries, fixed before any score is seen: m, m/2, m/4,
  ... down to `smallest` (or m alone when m is smaller)."""
  grid = [m]
  while grid[-1] // 2 >= smallest:
    grid.append(grid[-1] // 2)
  return grid


def one_run_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
  """Steinke, Nasr & Jagielski 2023 (the same p-value as jax-privacy's one_run): for an
  (eps, delta)-DP mechanism audited with m canaries, each in with probability 1/2, and r
  guesses (the rest abstain), P[at least v correct] <= this. The pure part is the tail of
  Binomial(r, e^eps / (1 + e^eps)); delta adds 2 m delta max_i (P[B >= v - i] - P[B >= v]) / i."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  q = 1.0 / (1.0 + np.exp(-eps))
  beta = float(stats.binom.sf(v - 1, r, q))
  if delta == 0 or v == 0:
    return min(beta, 1.0)
  i = np.arange(1, v + 1)
  alpha = float(np.max((stats.binom.sf(v - i - 1, r, q) - beta) / i, initial=0.0))
  return min(beta + alpha * 2 * m * delta, 1.0)


def one_run_grid(scores_in, scores_out, delta: float, significance: float,
                 smallest: int = 16, rng: np.random.Generator | None = None) -> float:
  """The one-run lower bound with abstention: for each r of guess_grid(m), guess "in" for the
  r/2 highest scores and "out" for the r/2 lowest, abstain on the rest, and count the correct
  guesses v; the bound is the largest eps whose one_run_p_value(m, r, v) is <= significance /
  len(grid), maximised over r. Valid at 1 - significance for every (eps, delta)-DP mechanism:
  each r is fixed in advance and the union bound covers the choice among them. Valid for ANY
  score that is a function of the mechanism's output (and of public, membership-independent
  inputs) computed without knowing who is in: the score only orders the guesses, so a better
  score (canaries.Scorer's likelihood ratio) tightens the bound and a poor one loosens it,
  neither makes it invalid.

  Ties at the guesses' edges are broken in a random order from `rng` (default: fresh OS
  entropy), which the guesser may use because it is independent of who is in; ordering the
  in scores before the out scores would give every tie to "in" and inflate v, and a fixed
  order of these two arrays would depend on the membership. Untied scores (cosines) give
  the same bound whatever rng; tied ones (randomized response's bits) may differ run to run.
  """
  from scipy import optimize  # pylint: disable=g-import-not-at-top
  s = np.concatenate([_scores("scores_in", scores_in), _scores("scores_out", scores_out)])
  member = np.arange(s.size) < len(scores_in)
  m = s.size
  shuffle = (rng if rng is not None else np.random.default_rng()).permutation(m)
  order = shuffle[np.argsort(s[shuffle], kind="stable")]  # ascending, ties in random order
  grid = guess_grid(m, smallest)
  alpha = significance / len(grid)
  best = 0.0
  for r in grid:
    low, high = r // 2, r - r // 2
    v = int(np.sum(member[order[m - high:]]) + np.sum(~member[order[:low]]))
    gap = lambda eps, r=r, v=v: alpha - one_run_p_value(m, r, v, eps, delta)
    if gap(0.0) <= 0:
      continue
    hi = 1.0
    while gap(hi) > 0:
      hi *= 2
    best = max(best, float(optimize.brentq(gap, 0.0, hi, xtol=1e-6)))
  return best


def epsilon_estimate(scores_in, scores_out, delta: float, confidence: float = 0.95,
                     method: str = "gdp") -> float:
  """An ESTIMATE of epsilon at `delta` that assumes a Gaussian trade-off curve; not a lower
  bound (it can exceed the true epsilon of a non-Gaussian mechanism): never a verdict."""
  if method not in ESTIMATES:
    raise ValueError(f"method must be one of {', '.join(ESTIMATES)}, got {method!r}")
  auditor = _auditor(scores_in, scores_out, delta, confidence)
  significance = 1.0 - confidence
  if method == "gdp":
    eps = _epsilon_from_gdp(auditor, significance, delta)
  else:
    eps = auditor.epsilon_one_run_fdp(significance, delta)
  return max(0.0, float(eps))


def canary_estimate(scores_in, null_std: float, delta: float) -> float:
  """Andrew et al. 2024's ESTIMATE from random-direction canaries: NOT a lower bound.

  An excluded canary's score (a cosine with the released delta, or a sum of T of them) is
  N(0, null_std^2) in high dimension, null_std^2 = 1/d (T/d): its direction is independent of
  the model. The included canaries' scores are taken as N(mu null_std, null_std^2): mu is
  their mean over null_std, and the estimate is the epsilon of mu-GDP at `delta`. It assumes
  the Gaussian trade-off curve the Gaussian mechanism has; it can exceed the true epsilon of
  another mechanism, and says nothing with guarantee.
  """
  s = _scores("scores_in", scores_in)
  if not null_std > 0:
    raise ValueError(f"null_std must be > 0, got {null_std}")
  return _gdp_epsilon(float(np.mean(s)) / null_std, delta)


# Below this noise multiplier dp-accounting's PLD takes seconds (0.1: 1.5 s, 0.05: 5.6 s at
# q = 0.1, 200 steps on the estimate's grid) and grows fast; an estimate past it is "at least".
SMALLEST_ESTIMATED_NOISE = 0.3


def participation_estimate(sums: dict, included, sampling_prob: float, steps: int,
                           delta: float, confidence: float = 0.95) -> dict:
  """The in-run canary audit's all-iterates ESTIMATE: NOT a lower bound.

  `sums` (canaries.Scorer.round_statistics): with z_jt = sqrt(d) cos(u_j, Delta_t) per canary
  j and counted round t, z_sum / z_sq = sum_t z_jt / z_jt^2, and part_z / part_z_sq / part_n
  the same sums over the rounds canary j took part in and their count. An excluded canary's
  z_jt is the null, N(m0, s0^2) (m0 ~ 0, s0 ~ 1: u_j is independent of the deltas); a taking-
  part canary's is shifted by its displacement of the released delta. mu = (mean of z over
  the participations - m0) / s0 is the shift of one participation in null deviations; the
  estimate is the epsilon at `delta` of the mechanism that shift defines: `steps` releases of
  a Gaussian with noise multiplier 1 / mu, each Poisson-sampled at `sampling_prob` (1: the
  adversary knows who takes part), by dp-accounting's PLD. For one release (steps = 1,
  sampling_prob = 1) it is Andrew et al.'s mu-GDP fit; over many rounds it keeps what a sum of
  cosines dilutes: each round's loss is that of the rounds a canary joins, at rate q.

  It assumes the released deltas are Gaussian in each canary's direction with the same spread
  with or without it, and uses which canaries took part in which round (the auditor's own
  draws). It says what epsilon the claimed mechanism has at the noise the canaries met; the
  real sites' updates add spread that is not noise, so a correct run's estimate sits a little
  under the PLD epsilon at its sigma. The interval maps mu +- z se(mu) (normal approximation,
  the (canary, round) pairs taken as independent) through the same function.
  """
  inc = np.asarray(included, bool)
  rounds = int(sums["rounds"])
  n0, n1 = int((~inc).sum()) * rounds, float(sums["part_n"][inc].sum())
  if n0 == 0 or n1 == 0:  # a run too short or too few canaries: nothing to measure
    return {"estimate": None, "interval": None, "participations": int(n1),
            "why": f"no estimate: {int((~inc).sum())} excluded canaries over {rounds} rounds "
                   f"and {n1:g} participations (more canaries or rounds are needed)"}
  m0 = sums["z_sum"][~inc].sum() / n0
  v0 = sums["z_sq"][~inc].sum() / n0 - m0**2
  m1 = sums["part_z"][inc].sum() / n1
  v1 = max(sums["part_z_sq"][inc].sum() / n1 - m1**2, 0.0)
  s0 = float(np.sqrt(v0))
  mu = float((m1 - m0) / s0)
  se = float(np.sqrt(v1 / n1 + v0 / n0) / s0)

  def eps(x):
    if x <= 0:
      return 0.0
    event = accounting.dp_event(max(1.0 / x, SMALLEST_ESTIMATED_NOISE), sampling_prob, steps)
    return accounting.event_epsilon(event, delta, "pld",
                                    accounting.ESTIMATE_PLD_DISCRETIZATION_INTERVAL)

  z = float(stats.norm.ppf(0.5 + confidence / 2))
  return {"estimate": eps(mu), "interval": [eps(mu - z * se), eps(mu + z * se)],
          "mu_per_participation": mu, "mu_se": se, "noise_multiplier": 1 / mu if mu > 0 else None,
          "sampling_prob": sampling_prob, "steps": steps,
          "participations": int(n1), "null_mean": float(m0), "null_std": s0,
          "at_least": bool(mu > 0 and 1.0 / mu < SMALLEST_ESTIMATED_NOISE)}


def _gdp_epsilon(mu: float, delta: float) -> float:
  """The epsilon of mu-GDP at delta (Dong, Roth & Su 2019, Cor. 2.13), in the log domain."""
  if mu <= 0:
    return 0.0

  def gap(eps):
    a = stats.norm.logcdf(-eps / mu + mu / 2)
    b = eps + stats.norm.logcdf(-eps / mu - mu / 2)
    return a + np.log1p(-np.exp(min(b - a, 0.0))) - np.log(delta) if b < a else -np.inf

  if gap(0.0) <= 0:
    return 0.0
  hi = 1.0
  while gap(hi) > 0:
    hi *= 2
  return float(optimize.brentq(gap, 0.0, hi, xtol=1e-9))


def _epsilon_from_gdp(auditor, significance: float, delta: float) -> float:
  """Nasr et al. 2023 through Gaussian DP, one-sided (members score higher).

  The Clopper-Pearson upper bounds on FPR and FNR at every threshold, Bonferroni-corrected
  over the 2 T bounds, give mu >= Phi^-1(1 - FPR_ub) - Phi^-1(FNR_ub) at each threshold; the
  largest such mu is turned into epsilon at delta. jax-privacy 2.0.0's epsilon_from_gdp takes
  |mu| instead, and a negative value of this difference is no evidence at all (identical
  score distributions then give eps ~2 from the extreme thresholds), so it is recomputed here
  from the auditor's counts.
  """
  fn = np.asarray(auditor._fn_counts)  # pylint: disable=protected-access
  tn = np.asarray(auditor._tn_counts)  # pylint: disable=protected-access
  n_pos, n_neg = int(fn[-1]), int(tn[-1])
  alpha = significance / (2 * len(fn))
  upper = lambda k, n: np.where(k < n, stats.beta.ppf(1 - alpha, k + 1, np.maximum(n - k, 1)),
                                1.0)
  fpr_ub, fnr_ub = upper(n_neg - tn, n_neg), upper(fn, n_pos)
  ok = (fpr_ub < 1 - delta) & (fnr_ub < 1 - delta)
  if not np.any(ok):
    return 0.0
  mu = float(np.max(stats.norm.isf(fpr_ub[ok]) - stats.norm.ppf(fnr_ub[ok])))
  return _gdp_epsilon(mu, delta)


def verdict(scores: dict, claimed_epsilon: float | None, delta: float,
            confidence: float = 0.95, method: str = "one_run") -> dict:
  """The audit's verdict: ONE pre-chosen lower-bound method over a Bonferroni-corrected family.

  `scores` maps each score (e.g. "white_box", "black_box") to (scores_in, scores_out); each
  bound is taken at confidence 1 - (1 - confidence) / len(scores), so the chance that ANY of
  them exceeds the true epsilon of a correct mechanism is at most 1 - confidence. privacy_bug
  is True when the largest bound exceeds the claim; estimates never enter a verdict.
  """
  if not scores:
    raise ValueError("scores must name at least one score: {name: (scores_in, scores_out)}")
  each = 1.0 - (1.0 - confidence) / len(scores)
  bounds = {name: epsilon_lower_bound(s_in, s_out, delta, each, method)
            for name, (s_in, s_out) in scores.items()}
  top = max(bounds.values())
  return {"method": method, "confidence": confidence, "bonferroni_family": len(scores),
          "confidence_each": each, "lower_bounds": bounds, "lower_bound": top,
          "claimed_epsilon": claimed_epsilon,
          "privacy_bug": claimed_epsilon is not None and top > claimed_epsilon}
