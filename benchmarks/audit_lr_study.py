r"""The all-iterates lower bound with the likelihood-ratio score (canaries.Scorer, the lab's
bound since issue 25's follow-up) against the sum of cosines (the bound before it), on the
runs of benchmarks/audit_study.py (digits :site, dp.noise=coordinated, m = 1000, the same
config and seeds: repetition r uses config.seed = audit.canary_seed = r).

  python benchmarks/audit_lr_study.py --seeds 0 1 2 3 4 --epsilons 1 2 4 8 --broken 1 2 4 \
      --no-dp
  python benchmarks/audit_lr_study.py --seeds 5 6 7 8 9 --epsilons 1 2 4 8 --broken 2 4
  python benchmarks/audit_lr_study.py --table-only

Writes benchmarks/audit_lr_study.json (one row per run; resumes) and prints RESULTS.md's
table. audit_study.json and its table are left as they are.
"""

import argparse
import json
import os
import tempfile

import audit_study  # the study's config() (same directory)

OUT = os.path.join(audit_study.HERE, "audit_lr_study.json")


def run_one(kind, epsilon, seed, broken):
  import numpy as np  # pylint: disable=g-import-not-at-top
  from fedjax_lab.attacks import bounds  # pylint: disable=g-import-not-at-top
  from fedjax_lab.attacks import canaries as canaries_lib  # pylint: disable=g-import-not-at-top
  from fedjax_lab.experiment import Experiment  # pylint: disable=g-import-not-at-top
  report, seen = canaries_lib.report, {}

  def keep(exp, scorer, w0, *args):
    seen["cos"] = scorer.scores(w0)["all_iterates"][0]
    seen["lr"] = scorer.likelihood_ratio()
    seen["inc"] = np.asarray(canaries_lib.included(exp.keys["sampling"],
                                                   exp.config.audit.canaries))
    return report(exp, scorer, w0, *args)

  canaries_lib.report = keep
  try:
    s = Experiment(audit_study.config(epsilon, seed, 1000, broken)).run(tempfile.mkdtemp())
  finally:
    canaries_lib.report = report
  a, inc, delta = s["audit"]["all_iterates"], seen["inc"], s["audit"]["delta"]
  sep = lambda v: float((v[inc].mean() - v[~inc].mean()) / v[~inc].std())
  row = {"kind": kind, "claimed": epsilon, "seed": seed, "broken": broken,
         "lb_likelihood_ratio": a["lower_bound_95"], "bound_statistic": a["bound_statistic"],
         "lb_sum_of_cosines": bounds.epsilon_lower_bound(seen["cos"][inc], seen["cos"][~inc],
                                                         delta, 0.95, "one_run_grid"),
         "estimate": a["estimate"], "separation_lr_sd": sep(seen["lr"]),
         "separation_cos_sd": sep(seen["cos"])}
  print(json.dumps(row), flush=True)
  return row


def table(rows):
  """Per (kind, claim): runs, mean [min, max] of each bound, and the runs whose bound exceeds
  the claim (a broken run caught; for a correct run, a privacy bug)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  cell = lambda v: f"{np.mean(v):.2f} [{np.min(v):.2f}, {np.max(v):.2f}]"
  print("| run | claimed | runs (seeds) | LB likelihood ratio | LB sum of cosines | LB > claim: "
        "LR / cosines |")
  print("|---|---|---|---|---|---|")
  for kind, claimed in sorted({(r["kind"], r["claimed"]) for r in rows},
                              key=lambda k: (k[0] == "broken", k[0] == "no_dp", k[1] or 0)):
    g = [r for r in rows if (r["kind"], r["claimed"]) == (kind, claimed)]
    name = {"dp": "DP", "no_dp": "no DP", "broken": "broken (noise / 4)"}[kind]
    seeds = sorted(r["seed"] for r in g)
    seeds = f"{seeds[0]}-{seeds[-1]}" if seeds == list(range(seeds[0], seeds[-1] + 1)) else seeds
    above = ("-" if claimed is None else " / ".join(
        str(sum(r[k] > claimed for r in g)) for k in ("lb_likelihood_ratio", "lb_sum_of_cosines")))
    print(f"| {name} | {'none' if claimed is None else f'{claimed:g}'} | {len(g)} ({seeds}) | "
          + " | ".join(cell([r[k] for r in g]) for k in ("lb_likelihood_ratio",
                                                          "lb_sum_of_cosines"))
          + f" | {above} |")


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
  p.add_argument("--epsilons", type=float, nargs="*", default=[1, 4, 8])
  p.add_argument("--broken", type=float, nargs="*", default=[2, 4])
  p.add_argument("--no-dp", action="store_true")
  p.add_argument("--table-only", action="store_true")
  args = p.parse_args()
  rows = json.load(open(OUT)) if os.path.exists(OUT) else []
  done = {(r["kind"], r["claimed"], r["seed"]) for r in rows}
  plan = [(k, e, s, b) for s in args.seeds for k, es, b in (
      ("broken", args.broken, 4.0), ("dp", args.epsilons, 1.0),
      ("no_dp", [None] if args.no_dp else [], 1.0)) for e in es]
  for kind, eps, seed, broken in plan:
    if (kind, eps, seed) not in done and not args.table_only:
      rows.append(run_one(kind, eps, seed, broken))
      json.dump(rows, open(OUT, "w"), indent=1)
  table(rows)


if __name__ == "__main__":
  main()
