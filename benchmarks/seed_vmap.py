r"""Seeds as a vmapped axis of one compiled round vs the same seeds run one after another.

  python benchmarks/seed_vmap.py            # ~1 min on 2 CPU cores
  python benchmarks/seed_vmap.py --quick    # smoke run

An ablation repeats a config over seeds. The round is a pure function of (state, data,
sampling key, client key), so `jax.vmap(exp.round_fn, in_axes=(0, None, 0, 0))` trains S
seeds in one step (docs/running.md, "Seeds as an axis"). Workload: the round_throughput reference
(digits, 100 sites x 15, MLP 64-128-10, 3 local SGD steps of batch 5, FedAvg) with 10 sites a
round (S10, a typical cross-device cohort) and with all 100 (S100). "sequential" runs the
lab's own jitted round once per seed, each round; "vmapped" runs all seeds in one call.
Timed interleaved, medians of per-round times. A check that seed 0 ends at the same
parameters either way guards the comparison. Each cohort runs twice: with the lab's default
`sites_per_chunk` (what a user gets) and with 64/seeds sites a chunk (so a vmapped chunk holds
the default's 64 site models); both arms of a row use the same setting.
The last line is `RATIO S10_seeds8=<sequential/vmapped> S100_seeds8=<sequential/vmapped>`
at the default setting.
"""

import argparse
import os
import sys


import fedjax_lab

fedjax_lab.setup_cpu_devices()  # before jax: one XLA device per CPU core
import jax
import numpy as np

from benchmarks.round_throughput import _time_rounds, reference_config
from fedjax_lab.experiment import Experiment


def seed_keys(seed):
  root = jax.random.key(seed)
  return jax.random.fold_in(root, 1), jax.random.fold_in(root, 2)


def measure(cohort_size: int, num_seeds: int, rounds: int, repeats: int, chunk=None):
  c = reference_config(cohort_size, rounds)
  c.sites_per_chunk = chunk
  exp = Experiment(c)
  seeds = np.arange(num_seeds)

  def init(seed):
    params, model_state = exp.model.init(jax.random.key(seed), exp.train.x[:2])
    return exp.algorithm.init(params, model_state)

  keys = [seed_keys(s) for s in seeds]
  one = jax.jit(exp.round_fn)
  sequential = lambda states: [one(st, exp.data, *k)[0] for st, k in zip(states, keys)]
  batched_keys = jax.vmap(seed_keys)(seeds)
  many = jax.jit(jax.vmap(exp.round_fn, in_axes=(0, None, 0, 0)))
  vmapped = lambda state: many(state, exp.data, *batched_keys)[0]

  start_seq = [init(s) for s in seeds]
  start_vec = jax.vmap(init)(seeds)
  states = {"sequential": jax.block_until_ready(sequential(start_seq)),  # compile
            "vmapped": jax.block_until_ready(vmapped(start_vec))}
  fns = {"sequential": sequential, "vmapped": vmapped}
  times = {k: [] for k in fns}
  for _ in range(repeats):
    for k, fn in fns.items():
      states[k], t = _time_rounds(fn, states[k], rounds)
      times[k] += t
  drift = max(float(np.abs(np.asarray(a)[0] - np.asarray(b)).max()) for a, b in zip(
      jax.tree.leaves(states["vmapped"].params), jax.tree.leaves(states["sequential"][0].params)))
  return {k: float(np.median(v)) for k, v in times.items()}, drift


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="fewer rounds and repeats")
  parser.add_argument("--seeds", type=int, default=8)
  args = parser.parse_args()
  rounds, repeats = (5, 1) if args.quick else (30, 3)
  small_chunk = max(1, 64 // args.seeds)  # the CPU default's 64 models a chunk, over the seeds
  print(f"jax {jax.__version__}: {jax.device_count()} {jax.default_backend()} device(s); "
        f"{args.seeds} seeds; {rounds} rounds x {repeats} repeats, medians (ms/round, all seeds)")
  print(" cohort  sites_per_chunk  sequential  vmapped  sequential/vmapped  seed-0 |diff|")
  ratios = {}
  for name, cohort in (("S10", 10), ("S100", 100)):
    for chunk in (None, small_chunk):
      t, drift = measure(cohort, args.seeds, rounds, repeats, chunk)
      ratio = t["sequential"] / t["vmapped"]
      ratios.setdefault(name, ratio)  # the lab's default is the RATIO
      print(f" {name:>6}  {'default' if chunk is None else chunk:>15}  "
            f"{1e3 * t['sequential']:10.2f}  {1e3 * t['vmapped']:7.2f}  {ratio:18.2f}  "
            f"{drift:.1e}")
  print(f"RATIO S10_seeds{args.seeds}={ratios['S10']:.2f} "
        f"S100_seeds{args.seeds}={ratios['S100']:.2f}")


if __name__ == "__main__":
  main()
