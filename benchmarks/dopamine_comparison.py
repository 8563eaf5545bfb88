r"""Central DP-SGD vs parallel DP-FL vs coordinated DP-FL (Dopamine) at equal epsilon.

  python benchmarks/dopamine_comparison.py                                   # digits, ~3 min
  python benchmarks/dopamine_comparison.py --config configs/dopamine_pbmc.py   # runs/benchmarks/dopamine_pbmc

For each target epsilon the noise multiplier is calibrated (RDP) for the config's rounds;
the three variants then share q, sigma and steps, so they have the same epsilon, which is
recomputed with dp-accounting and printed. Test accuracy is the mean over seeds. Every
(epsilon, variant, seed) is a run of fedjax_lab.sweep in its own workdir under --out
(default runs/benchmarks/<config name>; a rerun only trains what is missing), which also
gets the sweep's sweep.csv, sweep.md and plots: accuracy_vs_epsilon.png is the accuracy vs
epsilon PNG, one line per variant. The last line reads
`RATIO coordinated-parallel=<points> central-coordinated=<points>` at the config's epsilon.
"""

import argparse
import os
import sys

import fedjax_lab

fedjax_lab.setup_cpu_devices()  # before jax: one XLA device per CPU core
from fedjax_lab import runs, sweep  # noqa: E402

VARIANTS = ("central", "parallel", "coordinated")


def points(config_path, epsilons, seeds, out):
  """(epsilon, variant, seed) points of a sweep, epsilon outermost."""
  out_points = []
  for eps in epsilons:
    for variant in VARIANTS:
      for seed in range(seeds):
        c = runs.load_config_file(f"{config_path}:{variant}")
        c.seed, c.dp.target_epsilon = seed, eps
        c.log.progress, c.log.tensorboard = False, False
        out_points.append(sweep.make_point({"dp.target_epsilon": eps, "variant": variant},
                                           c, out))
  return out_points


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/dopamine_digits.py")
  parser.add_argument("--epsilons", default="0.5,1,2,4,8")
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--out", default=None, help="default runs/benchmarks/<config name>")
  args = parser.parse_args()
  out = args.out or os.path.join("runs", "benchmarks", runs.spec_parts(args.config)[0])
  epsilons = [float(e) for e in args.epsilons.split(",")]
  headline = runs.load_config_file(f"{args.config}:central").dp.target_epsilon
  if headline not in epsilons:
    epsilons.append(headline)
  epsilons.sort()
  rows = sweep.run_points(points(args.config, epsilons, args.seeds, out))
  for r in rows:
    assert r["epsilon"] <= r["dp.target_epsilon"] + 1e-9, r
  for path in sweep.write_outputs(rows, out):
    print(f"saved {path}")
  acc = {(t["label"]["dp.target_epsilon"], t["label"]["variant"]): t["test_accuracy"]
         for t in sweep.table(rows)}
  print(f"{args.config}: mean test accuracy over {args.seeds} seeds (std)")
  print(f"{'epsilon':>8} " + " ".join(f"{v:>20}" for v in VARIANTS))
  for eps in epsilons:
    cells = [f"{acc[eps, v][0]:.4f} ({acc[eps, v][1] or 0:.4f})" for v in VARIANTS]
    print(f"{eps:8.2f} " + " ".join(f"{c:>20}" for c in cells))
  mean = lambda v: acc[headline, v][0]
  print(f"RATIO coordinated-parallel={100 * (mean('coordinated') - mean('parallel')):.2f} "
        f"central-coordinated={100 * (mean('central') - mean('coordinated')):.2f}")


if __name__ == "__main__":
  main()
