r"""Byzantine robustness (the ByzFL benchmark protocol): every attack against every aggregator.

  python benchmarks/robustness.py                               # f = 1,2,3 x iid, dirichlet x 3 seeds
  python benchmarks/robustness.py --f 2 --partition iid --seeds 1   # one slice

Workload: sklearn's digits (the lab's bundled split), 10 sites, all in every round (so the
Byzantine sites are the fixed sites 0 .. f-1, attacks/byzantine.py), MLP 64-128-10, 5 local
SGD steps of batch 16 at lr 0.1, server SGD lr 1, ROUNDS rounds; partitions IID and
Dirichlet(0.5) over labels. f Byzantine sites run each attack of attacks/byzantine.py (with
its default scale); each aggregator of AGGREGATORS (robust.py) is configured with the true f.
Clean = no Byzantine site (the other 10 - f sites alone are NOT the reference: clean is all
10 honest, the mean aggregator), as ByzFL reports it.

A cell is the final test accuracy, averaged over seeds (a seed draws the partition, the
initialisation and the minibatches); an aggregator's worst case is its lowest cell over the
attacks. Writes `--out`/results.json and robustness.png (heat maps, one per partition and f).
The last line is `WORST f=2 clean=... mean=... best=... best_name=...` (IID, or the partition
run).
"""

import argparse
import json
import os
import time

import fedjax_lab

fedjax_lab.setup_cpu_devices()  # before jax: one XLA device per CPU core
import jax
import numpy as np

from fedjax_lab import aggregators, algorithms, robust
from fedjax_lab.algorithms import fedavg
from fedjax_lab.attacks import byzantine
from fedjax_lab.config import default_config, validate
from fedjax_lab.experiment import Experiment

ROUNDS = 30
SITES = 10
ATTACKS = byzantine.ATTACKS[1:]
# name -> (aggregator.robust, aggregator.pre)
AGGREGATORS = {"mean": ("mean", "none"), "median": ("median", "none"),
               "trimmed_mean": ("trimmed_mean", "none"), "krum": ("krum", "none"),
               "multi_krum": ("multi_krum", "none"), "geometric_median": ("geometric_median", "none"),
               "centered_clipping": ("centered_clipping", "none"),
               "nnm+trimmed_mean": ("trimmed_mean", "nnm")}
# Centered clipping's radius: about the honest updates' spread at this workload (their norms
# are ~0.3-1 over the run), so honest updates are rarely clipped while a far one moves the
# center by at most tau / m per iteration.
TAU = 0.5


def config(partition: str, seed: int, f: int = 0, aggregator: str = "mean",
           attack: str = "none"):
  c = default_config()
  c.seed, c.rounds, c.cohort_size = seed, ROUNDS, SITES
  c.data.name, c.data.num_sites, c.data.partition, c.data.alpha = "digits", SITES, partition, 0.5
  c.model.name, c.model.hidden = "mlp", (128,)
  c.client.optimizer, c.client.lr, c.client.local_steps, c.client.batch_size = "sgd", 0.1, 5, 16
  c.server.optimizer, c.server.lr = "sgd", 1.0
  c.log.progress = c.log.tensorboard = False
  c.aggregator.robust, c.aggregator.pre = AGGREGATORS[aggregator]
  c.aggregator.f, c.aggregator.tau = f, TAU
  c.attack.name, c.attack.num_sites = attack, (f if attack != "none" else 0)
  validate(c)
  return c


def run_one(exp: Experiment, cfg) -> float:
  """Final test accuracy of `cfg`'s round (chain and attack) on `exp`'s data and keys, all
  rounds in one compiled lax.scan."""
  chain = fedavg.config_aggregator(cfg, None, exp.init_state().params)
  round_fn = fedavg.make_round(exp.client_update, exp.server_tx, cohort_size=cfg.cohort_size,
                               aggregator=chain, byzantine_sites=cfg.attack.num_sites,
                               flip_labels=byzantine.flips_labels(cfg.attack.name))
  fused = jax.jit(algorithms.fuse_rounds(round_fn, cfg.rounds))
  start = fedavg.init_server_state(*exp.model.init(exp.keys["init"], exp.train.x[:2]),
                                   exp.server_tx, SITES, False, aggregator=chain)
  state, _ = fused(start, exp.data, exp.keys["sampling"], exp.keys["client"])
  return float(exp.evaluate(state).accuracy)


def study(fs, partitions, seeds, log=print):
  cells = {}  # (partition, f, aggregator, attack) -> [acc per seed]; f=0: clean
  for partition in partitions:
    for seed in seeds:
      exp = Experiment(config(partition, seed))
      cells.setdefault((partition, 0, "mean", "none"), []).append(run_one(exp, exp.config))
      for f in fs:
        for agg in AGGREGATORS:
          for attack in ATTACKS:
            t0 = time.time()
            acc = run_one(exp, config(partition, seed, f, agg, attack))
            cells.setdefault((partition, f, agg, attack), []).append(acc)
            log(f"{partition} seed={seed} f={f} {agg:18s} {attack:10s} acc={acc:.3f} "
                f"({time.time() - t0:.1f} s)")
  return {k: float(np.mean(v)) for k, v in cells.items()}


def worst_cases(cells, partition, f):
  return {agg: min(cells[(partition, f, agg, a)] for a in ATTACKS) for agg in AGGREGATORS}


def heat_maps(cells, fs, partitions, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  panels = [(p, f) for p in partitions for f in fs]
  fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5), squeeze=False)
  for ax, (p, f) in zip(axes[0], panels):
    grid = np.array([[cells[(p, f, agg, a)] for a in ATTACKS] for agg in AGGREGATORS])
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(ATTACKS)), ATTACKS, rotation=45, ha="right")
    ax.set_yticks(range(len(AGGREGATORS)), list(AGGREGATORS))
    for i in range(grid.shape[0]):
      for j in range(grid.shape[1]):
        ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7,
                color="white" if grid[i, j] < 0.5 else "black")
    ax.set_title(f"{p}, f={f} of {SITES}, clean {cells[(p, 0, 'mean', 'none')]:.2f}")
  fig.colorbar(im, ax=axes[0].tolist(), label="test accuracy")
  fig.savefig(path, dpi=110, bbox_inches="tight")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--f", type=int, nargs="*", default=[1, 2, 3])
  parser.add_argument("--partition", nargs="*", default=["iid", "dirichlet"])
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--out", default="runs/benchmarks/robustness")
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  t0 = time.time()
  cells = study(args.f, args.partition, range(args.seeds))
  print(f"{time.time() - t0:.0f} s; {jax.device_count()} devices, {os.cpu_count()} cpus")
  print("worst-case test accuracy over the attacks (mean over seeds):")
  print(f"{'partition':10s} {'f':>2s} {'clean':>6s} " + " ".join(f"{a:>17s}" for a in AGGREGATORS))
  for p in args.partition:
    for f in args.f:
      w = worst_cases(cells, p, f)
      print(f"{p:10s} {f:2d} {cells[(p, 0, 'mean', 'none')]:6.3f} "
            + " ".join(f"{w[a]:17.3f}" for a in AGGREGATORS))
  heat_maps(cells, args.f, args.partition, os.path.join(args.out, "robustness.png"))
  with open(os.path.join(args.out, "results.json"), "w") as fh:
    json.dump({"|".join(map(str, k)): v for k, v in cells.items()}, fh, indent=1)
  p = "iid" if "iid" in args.partition else args.partition[0]
  f = 2 if 2 in args.f else args.f[0]
  w = worst_cases(cells, p, f)
  best = max(w, key=w.get)
  print(f"WORST f={f} clean={cells[(p, 0, 'mean', 'none')]:.3f} mean={w['mean']:.3f} "
        f"best={w[best]:.3f} best_name={best}")


if __name__ == "__main__":
  main()
