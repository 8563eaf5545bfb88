"""Empirical lower bounds on epsilon from membership scores (privacy auditing).

    eps = epsilon_lower_bound(scores_in, scores_out, delta=1e-5, method="gdp")

`scores_in` are an attack's scores of canaries that were in the training data, `scores_out` of
canaries that were not; higher means "in". Each method returns an epsilon such that, with
probability >= `confidence` over the randomness of the runs, the mechanism is NOT
(epsilon', delta)-DP for any epsilon' below it. An audited bound above the accountant's claim is
a privacy bug (or a broken accountant); a bound far below it says only that this attack is weak.

Methods (all wrap jax_privacy.auditing.CanaryScoreAuditor, jax-privacy 2.0.0):
  clopper_pearson  Jagielski et al. 2020 / Nasr et al. 2021: at each threshold a Clopper-Pearson
                   upper bound on FPR and lower bound on TPR, eps >= log((TPR - delta) / FPR);
                   the confidence is Bonferroni-corrected over every threshold tried (the
                   Pareto frontier of (FN, TN) counts), so picking the best one is honest.
                   Needs independent trials: one canary per training run, or canaries whose
                   scores are independent given in/out (e.g. the Gaussian test below).
  gdp              Nasr et al. 2023: the same Bonferroni-corrected bounds turned into the
                   largest mu of mu-Gaussian DP they rule out, then into (eps, delta) by the
                   exact GDP curve. Tighter when the mechanism IS Gaussian-like (DP-SGD),
                   an assumption about the shape of the trade-off curve, not a worst case.
  one_run          Steinke, Nasr & Jagielski 2023, "Privacy Auditing with One (1) Training Run":
                   m canaries each included independently with probability 1/2 in ONE run;
                   the attacker guesses "in" above a threshold, and the number of correct
                   guesses is compared with what (eps, delta)-DP allows. Valid for canaries
                   that share a run; needs delta * m << 1 (the delta term is 2 m delta).
  one_run_fdp      Mahloujifar et al. 2024: one-run auditing through a Gaussian f-DP curve.

Perfectly separated scores give a finite bound, limited by the number of scores (with n out
scores an FPR below ~log(thresholds / (1 - confidence)) / n cannot be certified).
"""

import os

import numpy as np

METHODS = ("clopper_pearson", "gdp", "one_run", "one_run_fdp")


def _scores(name: str, values) -> np.ndarray:
  a = np.asarray(values, dtype=np.float64)
  if a.ndim != 1 or a.size == 0:
    raise ValueError(f"{name} must be a non-empty 1-D array of scores, got shape {a.shape}")
  if not np.all(np.isfinite(a)):
    raise ValueError(f"{name} has {int(np.sum(~np.isfinite(a)))} non-finite scores (NaN/inf); "
                     "clip or drop them before auditing")
  return a


def epsilon_lower_bound(scores_in, scores_out, delta: float, confidence: float = 0.95,
                        method: str = "clopper_pearson") -> float:
  """A lower bound on epsilon at `delta`, holding with probability `confidence` (a float >= 0).

  See the module docstring for the methods and what each assumes about the scores.
  """
  if method not in METHODS:
    raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
  if not 0.5 < confidence < 1:
    raise ValueError(f"confidence must be in (0.5, 1), got {confidence}")
  if not 0 < delta < 1:
    raise ValueError(f"delta must be in (0, 1), got {delta}")
  s_in, s_out = _scores("scores_in", scores_in), _scores("scores_out", scores_out)
  from jax_privacy import auditing  # pylint: disable=g-import-not-at-top
  auditor = auditing.CanaryScoreAuditor(s_in, s_out)
  significance = 1.0 - confidence
  if method == "clopper_pearson":
    eps = auditor.epsilon_clopper_pearson(significance, delta, one_sided=True,
                                          threshold_strategy=auditing.Bonferroni())
  elif method == "gdp":
    eps = _epsilon_from_gdp(auditor, significance, delta)
  elif method == "one_run":
    eps = auditor.epsilon_one_run(significance, delta)
  else:
    eps = auditor.epsilon_one_run_fdp(significance, delta)
  return max(0.0, float(eps))


def _gdp_epsilon(mu: float, delta: float) -> float:
  """The epsilon of mu-GDP at delta (Dong, Roth & Su 2019, Cor. 2.13), in the log domain."""
  from scipy import optimize, stats  # pylint: disable=g-import-not-at-top
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
  from scipy import stats  # pylint: disable=g-import-not-at-top
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


def all_bounds(scores_in, scores_out, delta: float, confidence: float = 0.95,
               methods=METHODS) -> dict:
  """{method: epsilon_lower_bound(...)} for several methods."""
  return {m: epsilon_lower_bound(scores_in, scores_out, delta, confidence, m) for m in methods}


def canary_audit(config, num_canaries: int = 1000, seed: int = 0, workdir: str | None = None,
                 confidence: float = 0.95) -> dict:
  """One training run of the lab (Experiment.run) with gradient canaries; one-run audit.

  Canary i is an input that is zero on every real feature and 1 on its own extra feature
  64+i (real examples are 0 there), with a random label: only canary i's gradient (and the DP
  noise) ever moves the first-layer weights of feature 64+i, so it acts like a Dirac gradient
  canary of the white-box threat model, through the real data path. Each canary joins
  independently with probability 1/2: as an example at a random site (dp.level=example, or
  none) or as a site of its own (dp.level=site, partition by_column). White-box score:
  ||W1[64+i] - W1_init[64+i]||; black-box score: phi of the canary under the final model.
  Returns the claimed epsilon and every method's lower bound for both scores.
  """
  import tempfile  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from fedjax_lab.attacks import membership  # pylint: disable=g-import-not-at-top
  from fedjax_lab.data import sources  # pylint: disable=g-import-not-at-top
  from fedjax_lab.experiment import Experiment  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  train, test = sources.load_dataset(config.data)
  d, m = train.x.reshape(len(train), -1).shape[1], num_canaries
  pad = lambda a: np.concatenate([a.reshape(len(a), -1), np.zeros((len(a), m), np.float32)], 1)
  cx = np.zeros((m, d + m), np.float32)
  cx[np.arange(m), d + np.arange(m)] = 1.0
  cy = rng.integers(0, train.num_classes, m)
  included = rng.random(m) < 0.5
  x = np.concatenate([pad(train.x), cx[included]])
  y = np.concatenate([train.y, cy[included]])
  c = config.copy_and_resolve_references()
  c.data.name, c.data.standardize = "file", "none"
  extra = {}
  if c.dp.level == "site":  # the real data in num_sites sites, each canary a site of its own
    sites = rng.permutation(np.arange(len(train)) % c.data.num_sites)
    extra["site"] = np.concatenate([sites, c.data.num_sites + np.arange(included.sum())])
    extra["site_test"] = np.zeros(len(test), np.int64)
    c.data.partition, c.data.column = "by_column", "site"
  tmp = tempfile.mkdtemp()
  c.data.path = os.path.join(tmp, "canaries.npz")
  np.savez(c.data.path, x=x, y=y, x_test=pad(test.x), y_test=test.y,
           class_names=np.array(train.class_names), **extra)
  c.log.progress = False
  exp = Experiment(c)
  summary = exp.run(workdir or os.path.join(tmp, "run"))
  init, _ = exp.model.init(exp.keys["init"], exp.train.x[:2])
  final = exp.final_state.params
  w0, w1 = (np.asarray(jax.tree.leaves(p)[1]) for p in (init, final))  # Dense_0 kernel [d+m, h]
  if w1.shape[0] != d + m:
    raise ValueError(f"expected the first layer's kernel [{d + m}, hidden], got {w1.shape}")
  white = np.linalg.norm(w1[d:] - w0[d:], axis=1)
  logits = exp.model.apply(final, {}, cx, False)[0]
  black = np.asarray(membership.logit_confidence(logits, cy))
  delta = c.dp.delta
  out = {"claimed_epsilon": summary["epsilon"], "delta": delta, "canaries": m,
         "included": int(included.sum()), "test_accuracy": summary["test_accuracy"]}
  for name, s in (("white_box", white), ("black_box", black)):
    out[name] = all_bounds(s[included], s[~included], delta, confidence)
  return out


def main(argv):
  del argv
  import json  # pylint: disable=g-import-not-at-top
  from fedjax_lab import cli  # pylint: disable=g-import-not-at-top
  from fedjax_lab import config as config_lib  # pylint: disable=g-import-not-at-top
  from fedjax_lab.errors import ConfigError  # pylint: disable=g-import-not-at-top
  cli.quiet_logs()  # each of the audit's checkpoints would log at INFO
  config, _ = cli.load_config(_CONFIG)
  if not (isinstance(config.audit.num_canaries, int) and config.audit.num_canaries > 0):
    cli.fail(f"audit.num_canaries: must be a positive integer, got "
             f"{config.audit.num_canaries}")
  try:
    config_lib.validate(config.target)
  except ConfigError as e:
    cli.fail(f"target.{e}")
  try:
    result = canary_audit(config.target, config.audit.num_canaries, config.audit.seed)
  except ConfigError as e:
    cli.fail(str(e))
  print(json.dumps(result, indent=1))
  for name in ("white_box", "black_box"):
    best = max(result[name].values())
    if result["claimed_epsilon"] is not None and best > result["claimed_epsilon"]:
      print(f"PRIVACY BUG: audited epsilon {best:.3f} ({name}) > claimed "
            f"{result['claimed_epsilon']:.3f}")


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  from fedjax_lab import cli  # pylint: disable=g-import-not-at-top
  _CONFIG = cli.define_config_flag(os.path.join(cli.ROOT, "configs", "mia_audit.py"))
  app.run(main, flags_parser=cli.parse_flags)
