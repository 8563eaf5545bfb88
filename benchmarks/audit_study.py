r"""The in-run canary audit on digits, site-level DP (configs/digits_dp.py:site with
dp.noise=coordinated, audit.canaries=1000): claimed epsilon vs Andrew et al.'s estimate vs the
one-run 95% lower bound, with all iterates observed and the final model only.

  python benchmarks/audit_study.py --repeats 3          # eps 1 2 4 8, no DP, broken runs
  python benchmarks/audit_study.py --repeats 20 --first-repeats 5 --broken-repeats 3 \
      --no-dp-repeats 3
  python benchmarks/audit_study.py --plot-only          # the plot from audit_study.json

dp.noise=coordinated: the released sum then carries exactly the accountant's sigma (parallel
noise tops it up to the slots, ~sqrt(103) times more, and the audit would measure that).
Repetition r uses config.seed = r and audit.canary_seed = r (fresh noise, cohorts, inclusion
draws and directions). The broken runs divide the noise multiplier by 4 and keep the claim
(audit.break_noise_divisor=4: a DELIBERATE bug). Writes benchmarks/audit_study.json, each
run's raw scores to $AUDIT_STUDY_SCORES (default: the temp folder's audit_study_scores), and
then, from those scores and the lab's current statistics, the RESULTS.md table (printed) and
benchmarks/audit_study.png.
"""

import argparse
import importlib.util
import json
import os
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
import fedjax_lab  # the installed lab (requirements.txt installs it editable)

fedjax_lab.setup_cpu_devices()
OUT = os.path.join(HERE, "audit_study.json")
# Each run's raw scores (npz, not committed): the statistics can be recomputed from them.
SCORES = os.environ.get("AUDIT_STUDY_SCORES", os.path.join(tempfile.gettempdir(),
                                                           "audit_study_scores"))


def config(epsilon, seed, canaries=1000, broken=1.0, level="site"):
  spec = importlib.util.spec_from_file_location(
      "digits_dp", os.path.join(HERE, "..", "configs", "digits_dp.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(level)
  c.seed, c.checkpoint.every = seed, c.rounds
  c.log.progress, c.log.tensorboard = False, False
  c.dp.noise, c.dp.randomness = "coordinated", "seeded"
  if epsilon is None:
    c.dp.level, c.dp.target_epsilon = "none", None
  else:
    c.dp.target_epsilon = float(epsilon)
  c.audit.canaries, c.audit.canary_seed, c.audit.break_noise_divisor = canaries, seed, broken
  return c


def run_one(kind, epsilon, seed, broken=1.0, canaries=1000):
  import numpy as np  # pylint: disable=g-import-not-at-top
  from fedjax_lab.attacks import canaries as canaries_lib  # pylint: disable=g-import-not-at-top
  from fedjax_lab.experiment import Experiment  # pylint: disable=g-import-not-at-top
  report, seen = canaries_lib.report, {}

  def keep(exp, scorer, w0, *args):  # the raw scores, for the other statistics below
    seen["scores"] = scorer.scores(w0)
    seen["included"] = np.asarray(canaries_lib.included(exp.keys["sampling"],
                                                        exp.config.audit.canaries))
    seen["unit_sum_norm"] = float(np.linalg.norm(np.asarray(scorer.total, np.float64)))
    seen["rounds"], seen["d"] = int(scorer.rounds), int(scorer.u.shape[1])
    return report(exp, scorer, w0, *args)

  canaries_lib.report = keep
  try:
    s = Experiment(config(epsilon, seed, canaries, broken)).run(tempfile.mkdtemp())
  finally:
    canaries_lib.report = report
  a = s["audit"]
  row = {"kind": kind, "claimed": epsilon, "seed": seed, "m": canaries,
         "test_accuracy": s["test_accuracy"]}
  for obs in ("all_iterates", "final_model"):
    row[obs] = {k: a[obs][k] for k in ("estimate", "lower_bound_95")}
  inc = seen["included"]
  os.makedirs(SCORES, exist_ok=True)
  np.savez_compressed(os.path.join(SCORES, f"{kind}_{epsilon}_{seed}_{canaries}.npz"),
                      included=inc, all_iterates=seen["scores"]["all_iterates"][0],
                      final_model=seen["scores"]["final_model"][0],
                      unit_sum_norm=seen["unit_sum_norm"], rounds=seen["rounds"], d=seen["d"])
  row["statistics"] = statistics(seen["scores"]["all_iterates"][0], inc, seen["rounds"],
                                 seen["unit_sum_norm"], seen["d"], s["privacy"]["delta"]
                                 if "privacy" in s else 1e-5)
  print(json.dumps(row), flush=True)
  return row


def statistics(scores, inc, rounds, unit_sum_norm, d, delta):
  """The all-iterates scores through each standardisation and bound (see RESULTS.md)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from fedjax_lab.attacks import bounds  # pylint: disable=g-import-not-at-top
  s_in, s_out = scores[inc], scores[~inc]
  return {
      "mean_in_over_sqrt_T_d": float(np.mean(s_in) / np.sqrt(rounds / d)),
      "mean_in_over_S_sqrt_d": float(np.mean(s_in) / (unit_sum_norm / np.sqrt(d))),
      "mean_out_over_S_sqrt_d": float(np.mean(s_out) / (unit_sum_norm / np.sqrt(d))),
      "std_out_over_S_sqrt_d": float(np.std(s_out) / (unit_sum_norm / np.sqrt(d))),
      "std_in_over_S_sqrt_d": float(np.std(s_in) / (unit_sum_norm / np.sqrt(d))),
      "S2_over_T": float(unit_sum_norm**2 / rounds),
      "estimate_exact_null": bounds.canary_estimate(s_in, unit_sum_norm / np.sqrt(d), delta),
      "estimate_empirical_out": bounds._gdp_epsilon(  # pylint: disable=protected-access
          float((np.mean(s_in) - np.mean(s_out)) / np.std(s_out)), delta),
      "lb_one_run": bounds.epsilon_lower_bound(s_in, s_out, delta, 0.95, "one_run"),
      "lb_one_run_grid": bounds.epsilon_lower_bound(s_in, s_out, delta, 0.95, "one_run_grid")}


def refresh(rows, delta=1e-5):
  """Each row's estimate and bound recomputed from its saved scores with the lab's current
  statistics (canaries.Scorer's nulls, canaries.report's estimate), so rows run before a change
  of the statistics are reported as the lab now computes them. The lower bounds here are the
  cosine scores' (the all-iterates bound before the likelihood ratio; the saved scores hold no
  likelihood ratios): benchmarks/audit_lr_study.py compares the two. Rows without saved scores
  keep the numbers stored in audit_study.json (written by the last refresh)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from fedjax_lab.attacks import bounds  # pylint: disable=g-import-not-at-top
  out = []
  for r in rows:
    path = os.path.join(SCORES, f"{r['kind']}_{r['claimed']}_{r['seed']}_{r.get('m', 1000)}.npz")
    if not os.path.exists(path):
      out.append(r)
      continue
    z = np.load(path)
    inc, d = z["included"], int(z["d"])
    nulls = {"all_iterates": float(z["unit_sum_norm"]) / np.sqrt(d),
             "final_model": 1 / np.sqrt(d)}
    r = dict(r)
    for obs, null in nulls.items():
      s = z[obs]
      r[obs] = {"estimate": bounds.canary_estimate(s[inc], null, delta),
                "lower_bound_95": bounds.epsilon_lower_bound(s[inc], s[~inc], delta, 0.95,
                                                             "one_run_grid")}
    out.append(r)
  return out


def table(rows):
  """RESULTS.md's table: per (kind, claim, m) the number of runs and mean [min, max]."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  keys = sorted({(r["kind"], r["claimed"], r.get("m", 1000)) for r in rows},
                key=lambda k: ({"dp": 0, "no_dp": 1, "broken": 2}[k[0]], k[2], k[1] or 0))
  print("| run | claimed | m | runs | est. all iterates | LB all iterates | est. final model "
        "| LB final model | test acc |")
  print("|---|---|---|---|---|---|---|---|---|")
  for kind, claimed, m in keys:
    group = [r for r in rows if (r["kind"], r["claimed"], r.get("m", 1000)) == (kind, claimed, m)]
    cell = lambda v: (f"{np.mean(v):.2f} [{np.min(v):.2f}, {np.max(v):.2f}]" if len(v) > 1
                      else f"{v[0]:.2f}")
    cols = [cell([r[obs][k] for r in group]) for obs in ("all_iterates", "final_model")
            for k in ("estimate", "lower_bound_95")]
    name = {"dp": "DP", "no_dp": "no DP", "broken": "broken (noise / 4)"}[kind]
    print(f"| {name} | {'none' if claimed is None else f'{claimed:g}'} | {m} | {len(group)} | "
          + " | ".join(cols) + f" | {cell([r['test_accuracy'] for r in group])} |")


def plot(rows):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4.5))
  dp = [r for r in rows if r["kind"] == "dp" and r.get("m", 1000) == 1000]
  eps = sorted({r["claimed"] for r in dp})
  ax.plot(eps, eps, "k--", label="claimed (accountant)")
  for obs, marker in (("all_iterates", "o"), ("final_model", "s")):
    for key, fill, name in (("estimate", None, "estimate"), ("lower_bound_95", "none",
                                                             "95% lower bound")):
      mean = [np.mean([r[obs][key] for r in dp if r["claimed"] == e]) for e in eps]
      lo = [np.min([r[obs][key] for r in dp if r["claimed"] == e]) for e in eps]
      hi = [np.max([r[obs][key] for r in dp if r["claimed"] == e]) for e in eps]
      ax.errorbar(eps, mean, yerr=[np.subtract(mean, lo), np.subtract(hi, mean)],
                  marker=marker, mfc=fill, capsize=3, label=f"{name}, {obs}")
  for m, style in ((1000, "rx"), (5000, "r^")):
    broken = [r for r in rows if r["kind"] == "broken" and r.get("m", 1000) == m]
    for r in broken:
      ax.plot(r["claimed"], r["all_iterates"]["lower_bound_95"], style, ms=8, mfc="none")
    if broken:
      ax.plot([], [], style, mfc="none", label=f"lower bound, broken run (sigma/4), m={m}")
  ax.set_xscale("log", base=2)
  ax.set_yscale("log", base=2)
  ax.set_xlabel("claimed epsilon (delta 1e-5)")
  ax.set_ylabel("epsilon")
  ax.set_title("canary audit, digits site-level DP (min/mean/max over seeds)", fontsize=9)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(HERE, "audit_study.png"), dpi=120)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--epsilons", type=float, nargs="+", default=[1, 2, 4, 8])
  p.add_argument("--broken", type=float, nargs="+", default=[1, 2, 4])
  p.add_argument("--broken-canaries", type=int, nargs="+", default=[1000, 5000])
  p.add_argument("--broken-repeats", type=int, default=1)
  p.add_argument("--no-dp-repeats", type=int, default=1)
  p.add_argument("--first-repeats", type=int, default=0,
                 help="DP repetitions run before the broken runs' repetitions")
  p.add_argument("--plot-only", action="store_true")
  args = p.parse_args()
  rows = json.load(open(OUT)) if os.path.exists(OUT) else []
  if not args.plot_only:  # resumes: a (kind, claimed, seed, m) already in the file is kept
    done = {(r["kind"], r["claimed"], r["seed"], r.get("m", 1000)) for r in rows}
    plan = ([("dp", e, 0, 1.0, 1000) for e in args.epsilons] + [("no_dp", None, 0, 1.0, 1000)]
            + [("broken", e, 0, 4.0, m) for m in args.broken_canaries for e in args.broken]
            + [("dp", e, s, 1.0, 1000) for s in range(1, args.first_repeats)
               for e in args.epsilons]
            + [("broken", e, s, 4.0, m) for s in range(1, args.broken_repeats)
               for m in args.broken_canaries for e in args.broken]
            + [("dp", e, s, 1.0, 1000) for s in range(args.first_repeats, args.repeats)
               for e in args.epsilons]
            + [("no_dp", None, s, 1.0, 1000) for s in range(1, args.no_dp_repeats)])
    for kind, eps, seed, broken, m in plan:
      if (kind, eps, seed, m) not in done:
        rows.append(run_one(kind, eps, seed, broken, m))
        json.dump(rows, open(OUT, "w"), indent=1)
  rows = refresh(rows)
  json.dump(rows, open(OUT, "w"), indent=1)
  table(rows)
  plot(rows)


if __name__ == "__main__":
  main()
