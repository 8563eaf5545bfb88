r"""A round's cost against the population: digits MLP, cohorts of 100, 10^3 ... 10^6 sites.

  python benchmarks/population.py            # ~3 min on 2 CPU cores
  python benchmarks/population.py --quick    # 10^3 and 10^6 sites, 8 rounds: smoke run

Sites come from data.partition=pool (data/partition.py): site s holds a window of 15
examples of the shuffled digits pool, so 10^6 sites exist without 10^6 copies of the data;
the index table costs 15 int32 per site. Each population is timed in its own process (its
peak RSS is then its own): the jitted round (Experiment.step, what train.py runs, without
evaluation), median of the rounds after a warm-up, for FedAvg's uniform cohort of 100 and for
site-level DP-FedAvg's Poisson cohort at rate 100 / sites. Each population is run twice and
the faster median kept (this machine is shared and noisy). Prints a line per population, writes
benchmarks/population.png (ms per round and peak RSS against the population), and ends with

  RATIO round_1M/round_1k=<ms at 10^6 / ms at 10^3> rss_1M_mb=<peak RSS at 10^6, MB>
  RATIO_DP round_1M/round_1k=<the same for site-level DP>

Below keys.LARGE_POPULATION (2,048) sites a uniform cohort is drawn by jax.random.choice, a
shuffle of every id, kept there so earlier runs keep their exact cohorts; from it on by an
O(cohort) draw (keys.sample_cohort), so at 10^3 sites the round pays a shuffle that 10^4 ...
10^6 sites do not: the ratio line is the lab at 10^6 against the lab at 10^3, as a user meets
them, and `round_1M/round_10k` beside it compares two populations drawn the same way.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

POPULATIONS = (1_000, 10_000, 100_000, 1_000_000)


def child(num_sites: int, dp: bool, rounds: int) -> dict:
  import fedjax_lab  # pylint: disable=g-import-not-at-top
  fedjax_lab.setup_cpu_devices()  # before jax: one XLA device per CPU core
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from fedjax_lab.config import default_config  # pylint: disable=g-import-not-at-top
  from fedjax_lab.experiment import Experiment  # pylint: disable=g-import-not-at-top

  c = default_config()
  c.data.partition, c.data.num_sites, c.data.examples_per_site = "pool", num_sites, 15
  c.cohort_size, c.rounds = 100, rounds
  if dp:
    c.dp.level, c.dp.noise_multiplier, c.dp.randomness = "site", 1.0, "seeded"
  t0 = time.perf_counter()
  exp = Experiment(c)
  build_s = time.perf_counter() - t0
  state = exp.init_state()
  times = []
  for _ in range(rounds):
    t = time.perf_counter()
    state, _ = exp.step(state, exp.data, exp.keys["sampling"], exp.keys["client"])
    jax.block_until_ready(state.params)
    times.append(time.perf_counter() - t)
  per_site = sum(a.nbytes for a in (exp.data.idx, exp.data.count)) / num_sites
  return {"sites": num_sites, "dp": dp, "ms": 1e3 * float(np.median(times[5:])),
          "build_s": build_s, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
          "bytes_per_site": per_site}


def run(num_sites: int, dp: bool, rounds: int) -> dict:
  out = subprocess.run([sys.executable, __file__, "--child", str(num_sites), "--rounds",
                        str(rounds)] + (["--dp"] if dp else []),
                       check=True, capture_output=True, text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def plot(rows, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
  for dp, label in ((False, "FedAvg, uniform cohort"), (True, "site-level DP, Poisson cohort")):
    r = [x for x in rows if x["dp"] == dp]
    a.plot([x["sites"] for x in r], [x["ms"] for x in r], "o-", label=label)
    b.plot([x["sites"] for x in r], [x["rss_mb"] for x in r], "o-", label=label)
  for ax, y in ((a, "ms per round (median)"), (b, "peak RSS (MB)")):
    ax.set_xscale("log")
    ax.set_xlabel("sites in the population (cohort 100)")
    ax.set_ylabel(y)
  a.set_ylim(bottom=0)
  b.set_ylim(bottom=0)
  a.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--child", type=int)
  p.add_argument("--dp", action="store_true")
  p.add_argument("--rounds", type=int, default=40)
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--quick", action="store_true")
  a = p.parse_args()
  if a.child:
    print(json.dumps(child(a.child, a.dp, a.rounds)))
    return
  populations = (1_000, 1_000_000) if a.quick else POPULATIONS
  rounds, repeats = (8, 1) if a.quick else (a.rounds, a.repeats)
  rows = []
  for dp in (False, True):
    for n in populations:
      runs = [run(n, dp, rounds) for _ in range(repeats)]
      best = min(runs, key=lambda r: r["ms"])
      best["rss_mb"] = max(r["rss_mb"] for r in runs)
      rows.append(best)
      print(f"sites={n:>9,} {'dp  ' if dp else 'none'} round_ms={best['ms']:7.2f} "
            f"rss_mb={best['rss_mb']:7.0f} bytes_per_site={best['bytes_per_site']:.0f} "
            f"build_s={best['build_s']:.1f}", flush=True)
  if not a.quick:
    plot(rows, os.path.join(os.path.dirname(os.path.abspath(__file__)), "population.png"))
  lo, hi = populations[0], populations[-1]
  by = {(r["sites"], r["dp"]): r for r in rows}
  same = (f" round_1M/round_10k={by[(hi, False)]['ms'] / by[(10_000, False)]['ms']:.2f}"
          if (10_000, False) in by else "")
  print(f"RATIO round_1M/round_1k={by[(hi, False)]['ms'] / by[(lo, False)]['ms']:.2f} "
        f"rss_1M_mb={by[(hi, False)]['rss_mb']:.0f}{same}")
  print(f"RATIO_DP round_1M/round_1k={by[(hi, True)]['ms'] / by[(lo, True)]['ms']:.2f} "
        f"rss_1M_mb={by[(hi, True)]['rss_mb']:.0f}")


if __name__ == "__main__":
  main()
