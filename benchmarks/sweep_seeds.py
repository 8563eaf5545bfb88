r"""A sweep's seeds: one run per seed (what fedjax_lab.sweep does) vs the seeds vmapped.

  python benchmarks/sweep_seeds.py            # ~2 min on 2 CPU cores
  python benchmarks/sweep_seeds.py --quick    # smoke run

The sweep trains every seed of a grid point as its own run: build the Experiment (load and
partition the data, trace and compile the round), then Experiment.run (metrics.jsonl, an
evaluation every eval.every rounds, checkpoints, summary.json). The alternative trains all
seeds of a point in one compiled step, `jax.vmap(exp.round_fn, in_axes=(0, None, 0, 0))`,
with the evaluation vmapped too; it is timed without writing anything, so it is a lower
bound of what a vmapped sweep would cost. Workload: configs/digits_fedavg.py (100 sites,
10 a round, MLP 64-128-10, 3 local steps of batch 5) for --rounds rounds, evaluated every
round as that config does. Both arms are timed end to end, Experiment construction and
compilation included, alternately, 3 times (medians); a check that seed 0 ends at the same
parameters both ways guards the comparison. The other seeds do NOT: a seed also draws the
partition of the examples over the sites (Experiment partitions with config.seed), and the
vmapped round shares one Experiment's data, so it varies init, cohorts, batches and noise
but not the partition. The last line is `RATIO loop/vmapped=<seconds loop / seconds vmapped>`.
"""

import argparse
import os
import sys
import tempfile
import time


import fedjax_lab

fedjax_lab.setup_cpu_devices()  # before jax: one XLA device per CPU core
import jax
import numpy as np

from fedjax_lab import evaluation, runs
from fedjax_lab.experiment import Experiment

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                      "digits_fedavg.py")


def config_for(seed, rounds):
  c = runs.load_config_file(CONFIG)
  c.seed, c.rounds = seed, rounds
  c.checkpoint.every, c.log.progress, c.log.tensorboard = rounds, False, False
  return c


def loop(seeds, rounds):
  """The sweep's way: one Experiment and one run (its own workdir) per seed."""
  params = []
  with tempfile.TemporaryDirectory() as out:
    for seed in seeds:
      exp = Experiment(config_for(seed, rounds))
      exp.run(os.path.join(out, str(seed)))
      params.append(exp.final_state.params)
  return params


def vmapped(seeds, rounds):
  """All seeds in one compiled round; each seed's keys as Experiment derives them."""
  exp = Experiment(config_for(0, rounds))
  roots = jax.vmap(jax.random.key)(np.asarray(seeds))
  init_keys, sampling, client = (jax.vmap(jax.random.fold_in, in_axes=(0, None))(roots, i)
                                 for i in (0, 1, 2))  # experiment._INIT, _SAMPLING, _CLIENT

  def init(key):
    params, model_state = exp.model.init(key, exp.train.x[:2])
    return exp.algorithm.init(params, model_state)

  state = jax.vmap(init)(init_keys)
  step = jax.jit(jax.vmap(exp.round_fn, in_axes=(0, None, 0, 0)))
  evaluate = jax.jit(jax.vmap(exp.evaluate_global))
  for _ in range(rounds):  # an evaluation every round, as configs/digits_fedavg.py does
    state, metrics = step(state, exp.data, sampling, client)
    correct, loss = evaluate(state.params, state.model_state)
    losses = np.asarray(metrics.train_loss)
    results = [evaluation.summarize(c, l, exp.test.y, exp.site_hist)
               for c, l in zip(np.asarray(correct), np.asarray(loss))]
  assert len(losses) == len(results) == len(seeds)
  return [jax.tree.map(lambda x, i=i: x[i], state.params) for i in range(len(seeds))]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="fewer rounds and repeats")
  parser.add_argument("--seeds", type=int, default=4)
  parser.add_argument("--rounds", type=int, default=100)
  args = parser.parse_args()
  rounds, repeats = (10, 1) if args.quick else (args.rounds, 3)
  seeds = list(range(args.seeds))
  print(f"jax {jax.__version__}: {jax.device_count()} {jax.default_backend()} device(s); "
        f"configs/digits_fedavg.py, {len(seeds)} seeds x {rounds} rounds, {repeats} repeats "
        "(seconds end to end, build and compile included)")
  times = {"loop": [], "vmapped": []}
  for _ in range(repeats):
    for name, fn in (("loop", loop), ("vmapped", vmapped)):
      t0 = time.perf_counter()
      params = jax.block_until_ready(fn(seeds, rounds))
      times[name].append(time.perf_counter() - t0)
      if name == "loop":
        reference = params
      else:
        drift = [max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                     for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(q)))
                 for p, q in zip(params, reference)]
    print(f"  loop {times['loop'][-1]:6.2f} s   vmapped {times['vmapped'][-1]:6.2f} s   "
          f"seed 0 max |params difference| {drift[0]:.1e} (other seeds, another partition: "
          f"{max(drift[1:], default=0):.1e})")
  loop_s, vmap_s = np.median(times["loop"]), np.median(times["vmapped"])
  print(f"medians: loop {loop_s:.2f} s ({loop_s / len(seeds):.2f} s a seed), vmapped "
        f"{vmap_s:.2f} s")
  print(f"RATIO loop/vmapped={loop_s / vmap_s:.2f}")


if __name__ == "__main__":
  main()
