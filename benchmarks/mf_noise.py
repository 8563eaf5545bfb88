"""Error of matrix-factorization noise on prefix sums, relative to DP-SGD's independent noise.

    python benchmarks/mf_noise.py [--n 128] [--draws 500]

Workload: all n prefix sums of a stream x_1..x_n (A = lower-triangular ones), one
participation per round (k = 1), no amplification. Every mechanism is calibrated to the same
zCDP rho: a Gaussian mechanism of L2 sensitivity s and noise std sd has rho = s^2 / (2 sd^2),
so each gets noise_std = sensitivity(C) / sqrt(2 rho) (clip_norm 1). The error of the released
prefix sums is A C^{-1} w, and its root mean square over the n prefix sums is
||A C^{-1}||_F * sensitivity(C) / (sqrt(2 rho) sqrt(n)); dividing by DP-SGD's (C = I,
||A||_F / (sqrt(2 rho) sqrt(n))) removes rho. The first line is that closed form:
`RMSE n=128 dpsgd=1.000 tree=... blt=... banded16=... dense=...`. The second line estimates
the same ratio by Monte Carlo from the lab's streaming noise (`mf_noise.correlated_noise`,
`--draws` independent coordinates run through n rounds), with its standard error, to show the
streaming code is the mechanism the closed form describes. Extra closed-form rows: banded
with 4 bands, the sqrt-Toeplitz strategy (Fichtenberger et al. 2023, jax_privacy
`toeplitz.optimal_max_error_strategy_coefs`), banded16 with columns normalized for n.

    python benchmarks/mf_noise.py --accuracy [--rounds 100] [--seeds 3]

The accuracy study instead (issue 24): configs/dp_ftrl.py (site-level digits, 100 sites,
cyclic cohorts of 10, min-separation 10) trained with dp.mechanism gaussian / tree / blt /
banded, each calibrated to the same server epsilon (2, 4, 8: unamplified, one Gaussian
mechanism, sampling_prob 1.0 in the server's guarantee row), `--seeds` seeds each. Prints
`ACCURACY eps=E gaussian=... tree=... blt=... banded=...` (mean test accuracy over the seeds)
per epsilon and the table RESULTS.md quotes (mean [min, max] over seeds); --write also saves
benchmarks/plots/dp_ftrl_accuracy.png.
"""

import argparse
import functools
import importlib.util
import math
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax_privacy.matrix_factorization import toeplitz

from fedjax_lab.privacy import mf_noise

RHO = 0.5  # any rho gives the same ratios


def closed_form_ratio(C: np.ndarray, sens: float) -> float:
  n = C.shape[0]
  A = np.tri(n)
  B = np.linalg.solve(C.T, A.T).T  # A C^{-1}
  return np.linalg.norm(B) * sens / np.linalg.norm(A)


def monte_carlo_ratio(s: mf_noise.Strategy, sens: float, draws: int, seed: int):
  """(ratio, standard error) from `draws` independent coordinates of the streaming noise."""
  n = s.num_rounds
  mech = mf_noise.correlated_noise(s)
  like = jnp.zeros((draws,), jnp.float32)
  noise_std = sens / math.sqrt(2 * RHO)

  @jax.jit
  def run(key):
    def body(state, r):
      z, state = mech.step(like, state, jax.random.fold_in(key, r), noise_std)
      return state, z
    return jax.lax.scan(body, mech.init(like), jnp.arange(n))[1]

  z = np.asarray(run(jax.random.key(seed)), np.float64)  # (n, draws)
  per_draw = np.mean(np.cumsum(z, axis=0) ** 2, axis=0)  # each coordinate's MSE
  dpsgd_mse = (1 / (2 * RHO)) * (n + 1) / 2  # mean over t of t * sd^2, sensitivity 1
  mse, se_mse = per_draw.mean(), per_draw.std(ddof=1) / math.sqrt(draws)
  ratio = math.sqrt(mse / dpsgd_mse)
  return ratio, ratio * se_mse / (2 * mse)


HERE = os.path.dirname(os.path.abspath(__file__))
STUDY_MECHANISMS = ("gaussian", "tree", "blt", "banded")


def _study_config(epsilon: float):
  spec = importlib.util.spec_from_file_location(
      "dp_ftrl", os.path.join(HERE, os.pardir, "configs", "dp_ftrl.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(f"{epsilon:g}")


def accuracy_study(epsilons, seeds: int, rounds: int | None):
  """{(epsilon, mechanism): [(test_accuracy, epsilon, seconds) per seed]}."""
  from fedjax_lab.experiment import Experiment
  # The strategy depends on the rounds and the participation only, not on epsilon or the
  # seed: optimize each once (blt's optimization is ~20 s) instead of once per run.
  mf_noise.strategy = functools.lru_cache(maxsize=None)(mf_noise.strategy)
  out = {}
  for eps in epsilons:
    for mech in STUDY_MECHANISMS:
      for seed in range(seeds):
        c = _study_config(eps)
        c.dp.mechanism, c.seed = mech, seed
        if rounds:
          c.rounds = rounds
        c.log.progress, c.log.tensorboard = False, False
        start = time.time()
        with tempfile.TemporaryDirectory() as workdir:
          summary = Experiment(c).run(workdir)
        server = [g for g in summary["privacy"]["guarantees"]
                  if "picks the cohorts" in g["adversary"] and g["epsilon"] is not None]
        # Equal server epsilon is the comparison's premise: check it, unamplified.
        assert server and all(g["sampling_prob"] == 1.0 for g in server), server
        assert max(g["epsilon"] for g in server) <= eps + 1e-9, server
        out.setdefault((eps, mech), []).append(
            (summary["test_accuracy"], max(g["epsilon"] for g in server), time.time() - start))
        print(f"# eps={eps:g} {mech} seed={seed} test_accuracy={summary['test_accuracy']:.4f} "
              f"server_epsilon={out[(eps, mech)][-1][1]:.3f} {time.time() - start:.0f}s",
              flush=True)
  return out


def accuracy_lines(results, epsilons) -> list[str]:
  return [f"ACCURACY eps={eps:g} " + " ".join(
      f"{m}={np.mean([a for a, _, _ in results[(eps, m)]]):.3f}" for m in STUDY_MECHANISMS)
      for eps in epsilons]


def accuracy_table(results, epsilons, seeds: int) -> str:
  rows = ["| server epsilon | " + " | ".join(STUDY_MECHANISMS) + " |",
          "|---|" + "---|" * len(STUDY_MECHANISMS)]
  for eps in epsilons:
    cells = []
    for m in STUDY_MECHANISMS:
      acc = np.array([a for a, _, _ in results[(eps, m)]])
      cells.append(f"{acc.mean():.3f} [{acc.min():.3f}, {acc.max():.3f}]")
    rows.append(f"| {eps:g} | " + " | ".join(cells) + " |")
  return "\n".join(rows)


def accuracy_plot(results, epsilons, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for m in STUDY_MECHANISMS:
    acc = [np.array([a for a, _, _ in results[(eps, m)]]) for eps in epsilons]
    mean = np.array([a.mean() for a in acc])
    err = np.array([[a.mean() - a.min() for a in acc], [a.max() - a.mean() for a in acc]])
    ax.errorbar(epsilons, mean, yerr=err, marker="o", capsize=3, label=m)
  ax.set_xscale("log", base=2)
  ax.set_xticks(epsilons, [f"{e:g}" for e in epsilons])
  ax.set_xlabel("epsilon against the server (unamplified, delta 1e-5)")
  ax.set_ylabel("test accuracy (mean, min-max over seeds)")
  ax.set_title("site-level digits, 100 sites, cyclic cohorts of 10")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def accuracy_main(args) -> None:
  epsilons = (2.0, 4.0, 8.0)
  start = time.time()
  results = accuracy_study(epsilons, args.seeds, args.rounds)
  lines = accuracy_lines(results, epsilons)
  table = accuracy_table(results, epsilons, args.seeds)
  print(table)
  for line in lines:
    print(line)
  print(f"# {time.time() - start:.0f}s in all")
  if args.write:
    accuracy_plot(results, epsilons, os.path.join(HERE, "plots", "dp_ftrl_accuracy.png"))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=128)
  parser.add_argument("--draws", type=int, default=500)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--accuracy", action="store_true",
                      help="the accuracy study of configs/dp_ftrl.py instead of the RMSE")
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--rounds", type=int, default=0, help="0: the config's rounds")
  parser.add_argument("--write", action="store_true",
                      help="save benchmarks/plots/dp_ftrl_accuracy.png")
  args = parser.parse_args()
  if args.accuracy:
    accuracy_main(args)
    return
  n = args.n

  specs = {"dpsgd": ("gaussian", {}), "tree": ("tree", {}), "blt": ("blt", {}),
           "banded16": ("banded", {"bands": 16}), "dense": ("dense", {}),
           "banded4": ("banded", {"bands": 4})}
  closed, mc = {}, {}
  for label, (name, kwargs) in specs.items():
    start = time.time()
    s = mf_noise.strategy(name, n, **kwargs)
    built = time.time() - start
    sens = mf_noise.sensitivity(s)  # k = 1: the largest column norm
    closed[label] = closed_form_ratio(mf_noise.strategy_matrix(s), sens)
    # Independent draws per mechanism, so their Monte Carlo errors are independent too.
    mc[label] = monte_carlo_ratio(s, sens, args.draws, args.seed * len(specs) + len(mc))
    extra = ""
    if name == "blt":
      extra = (f" buffers={len(s.arrays['buf_decay'])}"
               f" buf_decay={np.round(s.arrays['buf_decay'], 4).tolist()}")
    print(f"# {label}: sensitivity={sens:.4f} closed={closed[label]:.4f} "
          f"mc={mc[label][0]:.4f}+-{mc[label][1]:.4f} built_in={built:.1f}s{extra}")

  with jax.enable_x64(True):
    sqrt_coefs = np.asarray(toeplitz.optimal_max_error_strategy_coefs(n), np.float64)
  sqrt_C = np.asarray(toeplitz.materialize_lower_triangular(sqrt_coefs), np.float64)
  sqrt_ratio = closed_form_ratio(sqrt_C, np.linalg.norm(sqrt_C, axis=0).max())
  banded16 = mf_noise.strategy_matrix(mf_noise.strategy("banded", n, bands=16))
  normalized = banded16 / np.linalg.norm(banded16, axis=0)
  normalized_ratio = closed_form_ratio(normalized, 1.0)

  main_keys = ("dpsgd", "tree", "blt", "banded16", "dense")
  print(f"RMSE n={n} " + " ".join(f"{k}={closed[k]:.3f}" for k in main_keys))
  print(f"RMSE_MC n={n} draws={args.draws} " +
        " ".join(f"{k}={mc[k][0]:.3f}+-{mc[k][1]:.3f}" for k in main_keys))
  print(f"RMSE_EXTRA n={n} banded4={closed['banded4']:.3f} sqrt_toeplitz={sqrt_ratio:.3f} "
        f"banded16_colnorm={normalized_ratio:.3f}")


if __name__ == "__main__":
  main()
