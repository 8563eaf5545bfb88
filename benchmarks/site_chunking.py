r"""Sites trained in chunks per device (`sites_per_chunk`) vs one vmap over all of them.

  python benchmarks/site_chunking.py            # ~2 min on 2 CPU cores
  python benchmarks/site_chunking.py --quick    # smoke run

The round_throughput reference workload (digits, MLP 64-128-10, 3 local SGD steps of batch 5,
FedAvg) with every one of 1,000 or 10,000 sites in every round, split over the lab's devices as
train.py runs it. Each variant is the same jitted FedAvg round but for `sites_per_chunk`
(sharding.map_sum_sites): 0 is one vmap over a device's sites and then the weighted sum of
their updates; N trains N of them at a time (a lax.scan over chunks) and adds each chunk's
weighted updates into a running sum. Timed interleaved, so machine noise hits all alike.
Memory: the XLA temp buffer each compiled round asks for (compiled.memory_analysis()).
The last line is `RATIO sites1000=<one vmap/chunked> sites10000=<one vmap/chunked>`, the
speed-up of the CPU default (sharding.default_sites_per_chunk(), 64) over one vmap.
"""

import argparse
import os
import sys


import fedjax_lab

fedjax_lab.setup_cpu_devices()  # before jax: one XLA device per CPU core
import jax
import numpy as np

from benchmarks.round_throughput import _time_rounds, reference_config, tiled_round
from fedjax_lab import sharding
from fedjax_lab.experiment import Experiment

DEFAULT = sharding.default_sites_per_chunk()
CHUNKS = tuple(sorted({0, 16, 32, 64, 128, DEFAULT}))


def temp_mb(step, state) -> float:
  """MB of temporary buffers XLA allocates for one round (one device's view)."""
  analysis = step.lower(state).compile().memory_analysis()
  return analysis.temp_size_in_bytes / 2**20


def measure(sites: int, rounds: int, repeats: int):
  exp = Experiment(reference_config(100, rounds))
  steps = {c: tiled_round(exp, sites, c) for c in CHUNKS}
  memory = {c: temp_mb(jax.jit(steps[c]), exp.init_state()) for c in CHUNKS}
  states = {c: jax.block_until_ready(steps[c](exp.init_state())) for c in CHUNKS}  # compile
  times = {c: [] for c in CHUNKS}
  for _ in range(repeats):
    for c in CHUNKS:
      states[c], t = _time_rounds(steps[c], states[c], rounds)
      times[c] += t
  # Same math: the chunked rounds end where one vmap does (float rounding aside).
  ref = jax.tree.leaves(states[0].params)
  drift = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
              for c in CHUNKS[1:] for a, b in zip(ref, jax.tree.leaves(states[c].params)))
  return {c: float(np.median(times[c])) for c in CHUNKS}, memory, drift


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="fewer rounds and repeats")
  args = parser.parse_args()
  rounds, repeats = (3, 1) if args.quick else (5, 3)
  print(f"jax {jax.__version__}: {jax.device_count()} {jax.default_backend()} device(s); "
        f"{rounds} rounds x {repeats} repeats, medians; all sites every round")
  print(f"{'sites':>6} {'sites_per_chunk':>16} {'ms/round':>9} {'us/site':>8} "
        f"{'temp MB':>8} {'vs one vmap':>12}")
  ratio = {}
  for sites in (1000, 10000):
    times, memory, drift = measure(sites, rounds, repeats)
    for c in CHUNKS:
      print(f"{sites:>6} {c if c else 'one vmap':>16} {times[c] * 1e3:>9.1f} "
            f"{times[c] / sites * 1e6:>8.1f} {memory[c]:>8.1f} {times[0] / times[c]:>11.2f}x")
    print(f"{'':>6} max |params difference| after {rounds * repeats + 1} rounds: {drift:.1e}")
    ratio[sites] = times[0] / times[DEFAULT]
  print(f"RATIO sites1000={ratio[1000]:.2f} sites10000={ratio[10000]:.2f}")


if __name__ == "__main__":
  main()
