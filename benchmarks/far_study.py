r"""FAR (Function Aligned Regression, arXiv 2402.06104v2) vs MSE as the sites' loss, over seeds.

  python benchmarks/far_study.py              # 2 functions x 3 losses x 4 seeds, ~8 min on 2 cores
  python benchmarks/far_study.py --quick      # smoke run (1 seed, 10 rounds)

Workload: configs/far_regression.py (y = sin(x) or sin(x)^2 on x ~ U(-2 pi, 2 pi), 2,000
examples, 20 IID sites, 10 a round, MLP 1-64-64-1, 10 local Adam steps of batch 32, 100 rounds)
with model.loss = mse, far (the reference implementation's base term, MAE) and far_mse (FAR with
an MSE base term: the same per-example term as the mse arm, so the difference is the two
pairwise terms and their reconciliation alone). Every arm sees the same seeds; a seed draws the
partition, the initialisation, the cohorts and the minibatches, so arms are compared per seed
(paired). Reported: test RMSE against the true function (mean and 95% t-interval over seeds)
and the paired difference arm - mse with its 95% t-interval. Writes `--out`/results.json
(default runs/benchmarks/far_study). The last line is
`RATIO far/mse_rmse_sine=<mean RMSE far / mean RMSE mse on the sine>`.
"""

import argparse
import json
import os
import time

import fedjax_lab

fedjax_lab.setup_cpu_devices()  # before jax: one XLA device per CPU core
import numpy as np
from scipy import stats

from fedjax_lab import runs
from fedjax_lab.experiment import Experiment

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                      "far_regression.py")
ARMS = {"mse": ("mse", "mae"), "far": ("far", "mae"), "far_mse": ("far", "mse")}


def run(function, arm, seed, rounds):
  c = runs.load_config_file(CONFIG)
  c.seed, c.rounds = seed, rounds
  c.data.regression.function = function
  c.model.loss, c.model.far_base = ARMS[arm]
  c.log.progress, c.log.tensorboard = False, False
  exp = Experiment(c)
  result = exp.evaluate(exp.run_rounds(exp.init_state(), rounds))
  return result.rmse, result.r2


def interval(values):
  """(mean, half-width of the 95% t-interval); half-width nan for one value."""
  v = np.asarray(values, np.float64)
  if len(v) < 2:
    return float(v.mean()), float("nan")
  return float(v.mean()), float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seeds", type=int, default=4)
  parser.add_argument("--rounds", type=int, default=100)
  parser.add_argument("--functions", default="sine,squared_sine")
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--out", default="runs/benchmarks/far_study")
  args = parser.parse_args()
  seeds, rounds = (1, 10) if args.quick else (args.seeds, args.rounds)
  results = {}
  for function in args.functions.split(","):
    for arm in ARMS:
      for seed in range(seeds):
        t0 = time.perf_counter()
        rmse, r2 = run(function, arm, seed, rounds)
        results.setdefault(function, {}).setdefault(arm, []).append(
            {"seed": seed, "rmse": rmse, "r2": r2})
        print(f"{function} {arm} seed={seed}: test_rmse={rmse:.4f} test_r2={r2:.4f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump({"seeds": seeds, "rounds": rounds, "results": results}, f, indent=2)
  print(f"\n{seeds} seeds, {rounds} rounds; mean [95% t-interval]\n")
  print("| function | loss | test RMSE | test R^2 | RMSE - RMSE(mse), paired |")
  print("|---|---|---|---|---|")
  for function, arms in results.items():
    base = np.array([r["rmse"] for r in arms["mse"]])
    for arm, rows in arms.items():
      rmse = np.array([r["rmse"] for r in rows])
      m, h = interval(rmse)
      m2, h2 = interval([r["r2"] for r in rows])
      dm, dh = interval(rmse - base)
      diff = "" if arm == "mse" else f"{dm:+.4f} ± {dh:.4f}"
      print(f"| {function} | {arm} | {m:.4f} ± {h:.4f} | {m2:.4f} ± {h2:.4f} | {diff} |")
  if "sine" in results:
    ratio = (np.mean([r["rmse"] for r in results["sine"]["far"]])
             / np.mean([r["rmse"] for r in results["sine"]["mse"]]))
    print(f"\nRATIO far/mse_rmse_sine={ratio:.3f}")


if __name__ == "__main__":
  main()
