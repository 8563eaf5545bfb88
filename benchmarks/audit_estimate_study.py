r"""Issue 25's goals, measured: the in-run canary audit on digits, site-level DP
(configs/digits_dp.py:site, dp.noise=coordinated, 200 rounds, q = 0.1, audit.canaries=1000),
all iterates observed. Per run: the claimed epsilon, the all-iterates ESTIMATE (the row's
mechanism at the noise measured from the canaries' participations,
bounds.participation_estimate) with its 95% interval, the one-run 95% LOWER BOUND (likelihood
ratio), and the final-model numbers (Andrew et al.'s mu-GDP fit of the cosines).

  python benchmarks/audit_estimate_study.py --seeds 0-19 --epsilons 1 2 4 8 \
      --broken 1 2 4 8 --broken-seeds 0-9 --no-dp-seeds 0-4 --workers 2
  python benchmarks/audit_estimate_study.py --table-only

Repetition r: config.seed = audit.canary_seed = r (benchmarks/audit_study.config). Broken runs:
audit.break_noise_divisor=4 (a DELIBERATE bug: noise / 4, claim unchanged). Each run is its
own process, pinned to one core (`taskset`, where there is one). Writes
benchmarks/audit_estimate_study.json (one row per run; resumes), prints RESULTS.md's table,
draws benchmarks/audit_estimate_study.png and prints the one-run bound's ceiling (`CEILING`
lines).
"""

import argparse
import concurrent.futures
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "audit_estimate_study.json")
KINDS = {"dp": "DP", "no_dp": "no DP", "broken": "broken (noise / 4)",
         "example": "example-level DP"}


def example_config(epsilon, seed, m):
  """configs/digits_dp.py:example as example-level canaries need it (canaries.validate): one
  DP-SGD step a round, coordinated noise, uniform weights; canaries as the site study's."""
  import audit_study  # pylint: disable=g-import-not-at-top
  c = audit_study.config(epsilon, seed, m, level="example")
  c.client.local_steps, c.server.weighting = 1, "uniform"
  return c


def run_one(kind, epsilon, seed, m):
  """In this process (the script's folder is on the import path): one audited run, its row."""
  import audit_study  # pylint: disable=g-import-not-at-top
  from fedjax_lab.experiment import Experiment  # pylint: disable=g-import-not-at-top
  broken = 4.0 if kind == "broken" else 1.0
  config = (example_config(epsilon, seed, m) if kind == "example"
            else audit_study.config(epsilon, seed, m, broken))
  workdir = tempfile.mkdtemp()
  try:
    s = Experiment(config).run(workdir)
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  a, f = s["audit"]["all_iterates"], s["audit"]["final_model"]
  return {"kind": kind, "claimed": epsilon, "seed": seed, "m": m,
          "estimate": a["estimate"], "interval": a["estimate_interval_95"],
          "fit": a["estimate_fit"], "lower_bound_95": a["lower_bound_95"],
          "bound_statistic": a["bound_statistic"],
          "final_estimate": f["estimate"], "final_lower_bound_95": f["lower_bound_95"],
          "test_accuracy": s["test_accuracy"],
          "released_sigma": (s["privacy"]["noise_multiplier"] / broken if "privacy" in s
                             else None)}


def _spawn(job, cores):
  kind, eps, seed, m = job
  core = cores.get()
  try:
    pin = ["taskset", "-c", str(core)] if shutil.which("taskset") else []
    command = [sys.executable, __file__, "--one", kind, str(eps), str(seed), str(m)]
    out = subprocess.run(pin + command, capture_output=True, text=True, check=True).stdout
  finally:
    cores.put(core)
  return json.loads(out.strip().splitlines()[-1])


def _seeds(text):
  lo, _, hi = text.partition("-")
  return list(range(int(lo), int(hi or lo) + 1))


def table(rows):
  import numpy as np  # pylint: disable=g-import-not-at-top
  cell = lambda v: f"{np.mean(v):.2f} [{np.min(v):.2f}, {np.max(v):.2f}]"
  print("| run | claimed | m | runs | estimate, all iterates | estimate within 25% | 95% "
        "interval holds the PLD epsilon at the run's sigma | LB all iterates | LB > 0 | "
        "LB > claim | estimate, final model | test acc |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|")
  group = lambda r: (r["kind"], r["claimed"], r.get("m", 1000))
  for kind, claimed, m in sorted({group(r) for r in rows},
                                 key=lambda k: (list(KINDS).index(k[0]), k[2], k[1] or 0)):
    g = [r for r in rows if group(r) == (kind, claimed, m)]
    est = [r["estimate"] for r in g]
    within = (f"{sum(abs(e - claimed) <= 0.25 * claimed for e in est)}/{len(g)}"
              if kind in ("dp", "example") else "-")
    truth = "-"
    if kind != "no_dp":  # the PLD epsilon of the noise the run released
      held = [r["interval"][0] <= r["pld_at_sigma"] <= r["interval"][1] for r in g
              if "pld_at_sigma" in r]
      truth = f"{sum(held)}/{len(held)}" if held else "-"
    lb = [r["lower_bound_95"] for r in g]
    above = "-" if claimed is None else f"{sum(b > claimed for b in lb)}/{len(g)}"
    print(f"| {KINDS[kind]} | {'none' if claimed is None else f'{claimed:g}'} | {m} | "
          f"{len(g)} | {cell(est)} | {within} | {truth} | {cell(lb)} | "
          f"{sum(b > 0 for b in lb)}/{len(g)} | {above} | "
          f"{cell([r['final_estimate'] for r in g])} | "
          f"{cell([r['test_accuracy'] for r in g])} |")


def pld_at_sigma(rows):
  """Each DP or broken row's reference: dp_accounting's PLD epsilon, called directly, of the
  noise the run released (its summary's noise multiplier, / 4 when broken) at the row's rate
  and steps (site level: q = 0.1, 200 rounds), delta 1e-5 (below sigma 0.3: at 0.3, as the
  estimate)."""
  import dp_accounting  # pylint: disable=g-import-not-at-top
  from dp_accounting import pld  # pylint: disable=g-import-not-at-top
  cache = {}
  for r in rows:
    if r["kind"] == "no_dp" or "pld_at_sigma" in r:
      continue
    key = (max(r["released_sigma"], 0.3), r["fit"]["sampling_prob"], r["fit"]["steps"])
    if key not in cache:
      event = dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
          key[1], dp_accounting.GaussianDpEvent(key[0])), key[2])
      cache[key] = pld.PLDAccountant(value_discretization_interval=1e-4).compose(
          event).get_epsilon(1e-5)
    r["pld_at_sigma"] = cache[key]


def ceiling():
  """The most one_run_grid certifies (every guess right: m perfectly separated canaries, half
  in) at delta 1e-5 and 1e-6: the bound's delta term grows with m (docs/audit.md)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from fedjax_lab.attacks import bounds  # pylint: disable=g-import-not-at-top
  for delta in (1e-5, 1e-6):
    cells = []
    for m in (1000, 2000, 5000, 10000, 20000, 40000):
      s_in, s_out = np.arange(m // 2) + 1e6, np.arange(m // 2, dtype=float)
      bound = bounds.epsilon_lower_bound(s_in, s_out, delta, 0.95, "one_run_grid")
      cells.append(f"m={m}: {bound:.2f}")
    print(f"CEILING one_run_grid delta={delta:g} " + " ".join(cells))


def plot(rows):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6.4, 4.8))
  rows = [r for r in rows if r.get("m", 1000) == 1000]
  eps = sorted({r["claimed"] for r in rows if r["kind"] == "dp"})
  ax.plot(eps, eps, "k--", label="claimed (RDP accountant)")
  for kind, key, style, name in (
      ("dp", "estimate", "o-", "estimate, all iterates"),
      ("dp", "lower_bound_95", "s-", "95% lower bound, all iterates"),
      ("broken", "estimate", "v:", "estimate, broken run (sigma / 4)"),
      ("broken", "lower_bound_95", "x:", "95% lower bound, broken run")):
    xs = [e for e in eps if any(r["kind"] == kind and r["claimed"] == e for r in rows)]
    vals = [[r[key] for r in rows if r["kind"] == kind and r["claimed"] == e] for e in xs]
    mean = np.array([np.mean(v) for v in vals])
    ax.errorbar(xs, mean, yerr=[mean - [min(v) for v in vals], [max(v) for v in vals] - mean],
                fmt=style, capsize=3, label=name)
  nodp = [r["lower_bound_95"] for r in rows if r["kind"] == "no_dp"]
  if nodp:
    ax.axhline(np.mean(nodp), color="gray", lw=0.8,
               label=f"95% lower bound, no DP ({np.mean(nodp):.2f})")
  ax.set_xscale("log", base=2)
  ax.set_yscale("log", base=2)
  ax.set_xlabel("claimed epsilon (delta 1e-5)")
  ax.set_ylabel("epsilon")
  ax.set_title("in-run canary audit, digits site-level DP, m = 1000 (min / mean / max)",
               fontsize=9)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(HERE, "audit_estimate_study.png"), dpi=120)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--one", nargs=4, help=argparse.SUPPRESS)
  p.add_argument("--m", type=int, default=1000, help="canaries of the runs planned")
  p.add_argument("--seeds", default="0-1")
  p.add_argument("--epsilons", type=float, nargs="*", default=[1, 2, 4, 8])
  p.add_argument("--broken", type=float, nargs="*", default=[])
  p.add_argument("--broken-seeds", default="0-1")
  p.add_argument("--no-dp-seeds", default="")
  p.add_argument("--example", type=float, nargs="*", default=[],
                 help="claimed epsilons of example-level runs (configs/digits_dp.py:example)")
  p.add_argument("--example-seeds", default="0-1")
  p.add_argument("--workers", type=int, default=1)
  p.add_argument("--table-only", action="store_true")
  args = p.parse_args()
  if args.one:
    kind, eps, seed, m = args.one
    print(json.dumps(run_one(kind, None if eps == "None" else float(eps), int(seed), int(m))))
    return
  rows = json.load(open(OUT)) if os.path.exists(OUT) else []
  if not args.table_only:
    done = {(r["kind"], r["claimed"], r["seed"], r.get("m", 1000)) for r in rows}
    plan = ([("dp", e, s) for s in _seeds(args.seeds) for e in args.epsilons]
            + [("broken", e, s) for s in _seeds(args.broken_seeds) for e in args.broken]
            + [("no_dp", None, s) for s in (_seeds(args.no_dp_seeds) if args.no_dp_seeds
                                            else [])]
            + [("example", e, s) for s in _seeds(args.example_seeds) for e in args.example])
    plan = [(*j, args.m) for j in plan if (*j, args.m) not in done]
    cores = queue.Queue()
    for core in range(args.workers):
      cores.put(core)
    with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
      futures = [pool.submit(_spawn, job, cores) for job in plan]
      for fut in concurrent.futures.as_completed(futures):
        rows.append(fut.result())
        print(json.dumps(rows[-1]), flush=True)
        json.dump(rows, open(OUT, "w"), indent=1)
  pld_at_sigma(rows)
  json.dump(rows, open(OUT, "w"), indent=1)
  table(rows)
  ceiling()
  plot(rows)


if __name__ == "__main__":
  main()
