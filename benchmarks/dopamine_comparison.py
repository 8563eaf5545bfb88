r"""Central DP-SGD vs parallel DP-FL vs coordinated DP-FL (Dopamine) at equal epsilon.

  python benchmarks/dopamine_comparison.py                                   # digits, ~3 min
  python benchmarks/dopamine_comparison.py --config configs/dopamine_pbmc.py --out benchmarks/dopamine_pbmc.png

For each target epsilon the noise multiplier is calibrated (RDP) for the config's rounds;
the three variants then share q, sigma and steps, so they have the same epsilon, which is
recomputed with dp-accounting and printed. Test accuracy is the mean over seeds. Writes a PNG
of accuracy vs epsilon. The last line reads
`RATIO coordinated-parallel=<points> central-coordinated=<points>` at the config's epsilon.
"""

import argparse
import importlib.util
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from fedjax_lab.experiment import Experiment

VARIANTS = ("central", "parallel", "coordinated")


def load_config_module(path):
  spec = importlib.util.spec_from_file_location("dp_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def accuracy_and_epsilon(config):
  exp = Experiment(config)
  state = exp.run_rounds(exp.init_state(), config.rounds)
  return exp.evaluate(state).accuracy, exp.epsilon(config.rounds)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/dopamine_digits.py")
  parser.add_argument("--epsilons", default="0.5,1,2,4,8")
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--out", default="benchmarks/dopamine_digits.png")
  args = parser.parse_args()
  module = load_config_module(args.config)
  epsilons = [float(e) for e in args.epsilons.split(",")]
  headline = module.get_config("central").dp.target_epsilon
  if headline not in epsilons:
    epsilons.append(headline)
  epsilons.sort()
  acc = {v: [] for v in VARIANTS}
  print(f"{args.config}: mean test accuracy over {args.seeds} seeds (std)")
  print(f"{'epsilon':>8} " + " ".join(f"{v:>20}" for v in VARIANTS))
  for eps in epsilons:
    cells = []
    for v in VARIANTS:
      runs = []
      for seed in range(args.seeds):
        c = module.get_config(v)
        c.seed, c.dp.target_epsilon, c.log.progress = seed, eps, False
        a, e = accuracy_and_epsilon(c)
        assert e <= eps + 1e-9, (e, eps)
        runs.append(a)
      acc[v].append(np.mean(runs))
      cells.append(f"{np.mean(runs):.4f} ({np.std(runs):.4f})")
    print(f"{eps:8.2f} " + " ".join(f"{c:>20}" for c in cells))
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for v in VARIANTS:
    ax.plot(epsilons, acc[v], marker="o", label=v)
  ax.set_xscale("log")
  ax.set_xticks(epsilons, [f"{e:g}" for e in epsilons])
  ax.minorticks_off()
  ax.set_xlabel("epsilon (delta 1e-5, RDP)")
  ax.set_ylabel("test accuracy")
  ax.set_title(os.path.basename(args.config))
  ax.legend()
  fig.tight_layout()
  fig.savefig(args.out, dpi=120)
  print(f"saved {args.out}")
  i = epsilons.index(headline)
  print(f"RATIO coordinated-parallel={100 * (acc['coordinated'][i] - acc['parallel'][i]):.2f} "
        f"central-coordinated={100 * (acc['central'][i] - acc['coordinated'][i]):.2f}")


if __name__ == "__main__":
  main()
