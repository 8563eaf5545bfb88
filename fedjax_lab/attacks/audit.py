"""Empirical privacy auditing from membership scores: lower bounds, and estimates kept apart.

    eps = epsilon_lower_bound(scores_in, scores_out, delta=1e-5, method="one_run")
    est = epsilon_estimate(scores_in, scores_out, delta=1e-5, method="gdp")

`scores_in` are an attack's scores of canaries that were in the training data, `scores_out` of
canaries that were not; higher means "in".

LOWER BOUNDS (`LOWER_BOUNDS`, `epsilon_lower_bound`): valid for EVERY (eps, delta)-DP
mechanism. With probability >= `confidence` over the mechanism's randomness (and the canaries'
inclusion), the mechanism is NOT (eps', delta)-DP for any eps' below the returned value. A
lower bound above the accountant's claim is a privacy bug (or a broken accountant); one far
below it says only that this attack is weak.
  clopper_pearson  Jagielski et al. 2020 / Nasr et al. 2021: at each threshold a Clopper-Pearson
                   upper bound on FPR and lower bound on TPR, eps >= log((TPR - delta) / FPR);
                   Bonferroni-corrected over every threshold tried (the Pareto frontier of
                   (FN, TN) counts), so picking the best one is honest. Assumes the scores are
                   INDEPENDENT trials: one canary per training run. Canaries that share a run
                   are not (they share the model), so canary_audit does not use it.
  one_run          Steinke, Nasr & Jagielski 2023, "Privacy Auditing with One (1) Training Run":
                   m canaries each included independently with probability 1/2 (in one run, or
                   in independent runs); the attacker guesses "in" above a threshold and the
                   number of correct guesses is compared with what (eps, delta)-DP allows.
                   Needs delta * m << 1 (the delta term is 2 m delta). jax-privacy's
                   Bonferroni divides by the number of Pareto-optimal thresholds, which
                   depends on the scores (docs/audit.md).
  one_run_grid     the same theorem with two-sided guesses and abstention (bounds.py): the
                   r/2 highest scores guessed in and the r/2 lowest out, r from a grid fixed
                   in advance (m, m/2, ..., 16), a union bound over the grid. The in-run
                   canary audit's bound.

ESTIMATES (`ESTIMATES`, `epsilon_estimate`): NOT lower bounds. Both assume the mechanism's
trade-off curve is Gaussian (mu-GDP) and extrapolate along it; for a mechanism that is not
Gaussian they can exceed its true epsilon by far: on (2, 0)-DP randomized response (100k in,
100k out) gdp gives 12.2 and one_run_fdp 2.69, where both lower bounds give 1.98. They say
what epsilon a Gaussian mechanism with these scores would have; no verdict uses them.
  gdp              Nasr et al. 2023: the Bonferroni-corrected Clopper-Pearson bounds turned
                   into the largest mu of mu-GDP they rule out, then into eps by the GDP curve.
                   Also assumes independent trials.
  one_run_fdp      Mahloujifar et al. 2024: one-run auditing through a Gaussian f-DP curve.
The in-run canary audit's estimates have their own functions, also NOT bounds:
  canary_estimate          Andrew et al. 2024: mu-GDP fitted to random-direction canaries'
                           cosines against their exact null (the final-model view).
  participation_estimate   the all-iterates view: the noise multiplier the canaries met,
                           measured from their shift in the rounds they took part in, put
                           through the guarantee row's mechanism (Poisson-sampled Gaussian
                           releases) by dp-accounting's PLD; with a 95% interval.

jax-privacy 2.0.0's `CanaryScoreAuditor.epsilon_from_gdp` is never used: it maximises |mu|
over thresholds, so two samples of ONE score distribution give ~4.6 (200 each) to ~2.2 (20k
each); the one-sided mu is recomputed here (`_epsilon_from_gdp`).

Perfectly separated scores give a finite bound, limited by the number of scores (with n out
scores an FPR below ~log(thresholds / (1 - confidence)) / n cannot be certified).
"""

import json
import os
import tempfile

from absl import app, flags
import jax
import numpy as np

from fedjax_lab import cli
from fedjax_lab.attacks import membership
from fedjax_lab.attacks.bounds import (  # noqa: F401  (the audit's API)
    ESTIMATES, LOWER_BOUNDS, _auditor, _epsilon_from_gdp, _gdp_epsilon, _scores,
    canary_estimate, epsilon_estimate, epsilon_lower_bound, participation_estimate, verdict)
from fedjax_lab.data import sources
from fedjax_lab.errors import ConfigError
from fedjax_lab.experiment import Experiment
from fedjax_lab.privacy import guarantees


def canary_audit(config, num_canaries: int = 1000, seed: int = 0, workdir: str | None = None,
                 confidence: float = 0.95) -> dict:
  """One training run of the lab (Experiment.run) with gradient canaries; one-run audit.

  Canary i is an input that is zero on every real feature and 1 on its own extra feature
  64+i (real examples are 0 there), with a random label: only canary i's gradient (and the DP
  noise) ever moves the first-layer weights of feature 64+i, so it acts like a Dirac gradient
  canary of the white-box threat model, through the real data path. Each canary joins
  independently with probability 1/2 (one Bernoulli draw per canary, independent of its label
  and of the training seed: what the one-run bound assumes): as an example at a random site
  (dp.level=example, or none) or as a site of its own (dp.level=site, partition by_column).
  White-box score: ||W1[64+i] - W1_init[64+i]||; black-box score: phi of the canary under the
  final model. Adversary: sees the final model (and its initialisation), not config.seed.

  The canaries share one run, so their scores are not independent trials: the verdict is the
  one-run lower bound (Steinke et al. 2023) on both scores, Bonferroni-corrected over the two;
  gdp and one_run_fdp are reported as estimates. dp.randomness=auto resolves as for the
  public set the canaries are added to (digits: seeded), so the audit is reproducible from
  config.seed and `seed`; the mode used is in the result. The result is also written to the
  run's summary.json under "audit".
  """
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
  # Resolved before the data becomes a file: `auto` would make a file's noise secret (OS
  # entropy, a different run every time), but these are the public set plus synthetic canaries.
  c.dp.randomness = guarantees.resolve_randomness(c.dp.randomness, c.data.name)
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
  workdir = workdir or os.path.join(tmp, "run")
  summary = exp.run(workdir)
  init, _ = exp.model.init(exp.keys["init"], exp.train.x[:2])
  final = exp.final_state.params
  w0, w1 = (np.asarray(jax.tree.leaves(p)[1]) for p in (init, final))  # Dense_0 kernel [d+m, h]
  if w1.shape[0] != d + m:
    raise ValueError(f"expected the first layer's kernel [{d + m}, hidden], got {w1.shape}")
  white = np.linalg.norm(w1[d:] - w0[d:], axis=1)
  logits = exp.model.apply(final, {}, cx, False)[0]
  black = np.asarray(membership.logit_confidence(logits, cy))
  delta = c.dp.delta
  scores = {name: (s[included], s[~included]) for name, s in (("white_box", white),
                                                               ("black_box", black))}
  out = {"claimed_epsilon": summary["epsilon"], "delta": delta, "canaries": m,
         "included": int(included.sum()), "test_accuracy": summary["test_accuracy"],
         "randomness": exp.privacy.randomness if exp.privacy is not None else "no DP",
         "seed": c.seed, "canary_seed": seed,
         "verdict": verdict(scores, summary["epsilon"], delta, confidence, "one_run"),
         "estimates": {"assumes": "a Gaussian trade-off curve (mu-GDP): NOT lower bounds",
                       **{name: {e: epsilon_estimate(s_in, s_out, delta, confidence, e)
                                 for e in ESTIMATES} for name, (s_in, s_out) in scores.items()}}}
  path = os.path.join(workdir, "summary.json")
  if os.path.exists(path):  # only the primary process writes it
    with open(path) as f:
      written = json.load(f)
    with open(path, "w") as f:
      json.dump({**written, "audit": out}, f, indent=2)
  out["workdir"] = workdir
  return out


def format_result(r: dict) -> list[str]:
  """The printed lines: claim and randomness, the verdict's lower bounds, the estimates."""
  v, claim = r["verdict"], r["claimed_epsilon"]
  lines = [f"claimed epsilon {'none (no DP)' if claim is None else f'{claim:.3f}'} at delta "
           f"{r['delta']:g}; randomness {r['randomness']} (seed {r['seed']}, canary seed "
           f"{r['canary_seed']}); {r['included']} of {r['canaries']} canaries in; "
           f"test accuracy {r['test_accuracy']:.3f}",
           f"lower bounds ({v['method']}, {v['confidence']:.0%} for the family, Bonferroni over "
           f"{v['bonferroni_family']}: each at {v['confidence_each']:.1%}): " +
           ", ".join(f"{k} {b:.3f}" for k, b in v["lower_bounds"].items())]
  for name in v["lower_bounds"]:
    lines.append(f"estimates, NOT bounds (assume a Gaussian trade-off curve), {name}: " +
                 ", ".join(f"{k} {e:.3f}" for k, e in r["estimates"][name].items()))
  if claim is None:
    lines.append(f"verdict: no claim to test (no DP); lower bound {v['lower_bound']:.3f}")
  elif v["privacy_bug"]:
    lines.append(f"PRIVACY BUG: lower bound {v['lower_bound']:.3f} > claimed {claim:.3f}")
  else:
    lines.append(f"verdict: consistent with the claim (lower bound {v['lower_bound']:.3f} <= "
                 f"claimed {claim:.3f}); a bound far below the claim says the attack is weak")
  return lines


def main(argv):
  del argv
  cli.quiet_logs()  # each of the audit's checkpoints would log at INFO
  config, _ = cli.load_config(_CONFIG)
  if not (isinstance(config.audit.num_canaries, int) and config.audit.num_canaries > 0):
    cli.fail(f"audit.num_canaries: must be a positive integer, got "
             f"{config.audit.num_canaries}")
  cli.validate_target(config)
  workdir = _WORKDIR.value
  if workdir and os.path.isdir(workdir) and os.listdir(workdir):
    cli.fail(f"--workdir: {workdir} is not empty (a resumed run is not the audited run); "
             "give a new folder")
  try:
    result = canary_audit(config.target, config.audit.num_canaries, config.audit.seed, workdir)
  except ConfigError as e:
    cli.fail(str(e))
  print("\n".join(format_result(result)))
  print(f"wrote {os.path.join(result['workdir'], 'summary.json')} (\"audit\")")


if __name__ == "__main__":  # the flags only for the command: importing defines none
  _CONFIG = cli.define_config_flag(os.path.join(cli.CONFIGS, "mia_audit.py"))
  _WORKDIR = flags.DEFINE_string("workdir", None, "Folder of the audited run (default: a "
                                 "new temporary folder); must be new or empty.")
  app.run(main, flags_parser=cli.parse_flags)
