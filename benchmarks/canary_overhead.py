r"""What the in-run canary audit costs: configs/digits_dp.py:site with audit.canaries=m vs 0.

  python benchmarks/canary_overhead.py                      # m = 1000, 100 rounds, 2 repeats
  python benchmarks/canary_overhead.py --canaries 1000 --rounds 200

Times Experiment.run (compilation, rounds, evaluation, checkpoints, summary: the whole run) of
the same config with and without canaries, alternating, and prints the median of each and
`RATIO canaries/plain=...` (wall time) and `cpu_canaries/plain=...` (this process's CPU time).
The canaries add a gather of the ~q m / 2 taking-part rows of the [m, d] directions (an input
of the jitted round) to each round, one [d] running sum and one [m, d] x [d] product per
round (the likelihood ratio and the estimate's per-round sums), and one more product at the
end (the sum of cosines).
"""

import argparse
import importlib.util
import os
import statistics
import tempfile
import time

import fedjax_lab  # the installed lab (requirements.txt installs it editable)

fedjax_lab.setup_cpu_devices()


def config(canaries: int, rounds: int):
  here = os.path.dirname(os.path.abspath(__file__))
  spec = importlib.util.spec_from_file_location(
      "digits_dp", os.path.join(here, "..", "configs", "digits_dp.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("site")
  c.rounds, c.checkpoint.every = rounds, rounds
  c.log.progress, c.log.tensorboard = False, False
  c.dp.noise, c.dp.randomness = "coordinated", "seeded"
  c.audit.canaries = canaries
  return c


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--canaries", type=int, default=1000)
  p.add_argument("--rounds", type=int, default=100)
  p.add_argument("--repeats", type=int, default=2)
  args = p.parse_args()
  from fedjax_lab.experiment import Experiment
  times = {0: [], args.canaries: []}
  cpu = {0: [], args.canaries: []}
  for _ in range(args.repeats):
    for m in times:
      exp = Experiment(config(m, args.rounds))
      t0, c0 = time.perf_counter(), time.process_time()
      exp.run(tempfile.mkdtemp())
      times[m].append(time.perf_counter() - t0)
      cpu[m].append(time.process_time() - c0)
      print(f"canaries={m}: {times[m][-1]:.2f} s wall, {cpu[m][-1]:.2f} s CPU", flush=True)
  plain, with_c = statistics.median(times[0]), statistics.median(times[args.canaries])
  plain_cpu, with_cpu = statistics.median(cpu[0]), statistics.median(cpu[args.canaries])
  import jax
  print(f"{jax.devices()[0].platform}, {args.rounds} rounds, m={args.canaries}: plain "
        f"{plain:.2f} s, with canaries {with_c:.2f} s (wall); {plain_cpu:.2f} s, "
        f"{with_cpu:.2f} s (CPU time of this process)")
  # On a shared machine the CPU time is the steadier of the two: other jobs stretch the wall
  # time of whichever run they overlap.
  print(f"RATIO canaries/plain={with_c / plain:.3f} cpu_canaries/plain={with_cpu / plain_cpu:.3f}")


if __name__ == "__main__":
  main()
