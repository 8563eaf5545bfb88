r"""One DP round with seeded (threefry) keys vs secret (ChaCha20) keys, in the same process.

  python benchmarks/secret_prng.py [--rounds 20] [--repeats 5] [--config configs/digits_dp.py:example]

The config (default: digits, example-level DP-SGD, configs/digits_dp.py:example) is built
once as an Experiment; "seeded" runs its round with config.seed's threefry keys, "secret"
with the keys of a 256-bit secret (Experiment.set_secret, privacy/randomness.py's ChaCha20
impl): every Poisson minibatch, cohort and noise draw then comes from ChaCha20. Both rounds
are compiled and warmed before timing; the variants alternate repeat by repeat, and each
repeat times `rounds` rounds (block_until_ready on the state). Medians of ms/round; the last
line is `RATIO secret/seeded=<x>`; the line above it times the generators alone (269k
normals, medians of 20 jitted calls).
"""

import argparse
import os
import statistics
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import fedjax_lab

fedjax_lab.setup_cpu_devices()  # before jax: one XLA device per CPU core, as train.py
import jax  # noqa: E402


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--rounds", type=int, default=20)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--config", default=os.path.join(ROOT, "configs", "digits_dp.py:example"))
  args = p.parse_args()
  from fedjax_lab import experiment, runs
  c = runs.load_config_file(args.config)
  c.dp.randomness = "seeded"
  exp = experiment.Experiment(c)
  secret = experiment.draw_secret()

  def rounds(mode):
    exp.set_secret(secret if mode == "secret" else None)
    state = exp.init_state()  # the round donates its state: a fresh one each time
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for _ in range(args.rounds):
      state, _ = exp.step(state, exp.data, exp.keys["sampling"], exp.keys["client"])
    jax.block_until_ready(state)
    return 1e3 * (time.perf_counter() - t0) / args.rounds

  modes = ("seeded", "secret")
  for mode in modes:  # compile and warm both
    rounds(mode)
  times = {m: [] for m in modes}
  for r in range(args.repeats):
    for mode in (modes if r % 2 == 0 else modes[::-1]):
      times[mode].append(rounds(mode))
  med = {m: statistics.median(t) for m, t in times.items()}
  print(f"jax {jax.__version__}, {jax.default_backend()}, {jax.device_count()} device(s); "
        f"{args.config.replace(ROOT + os.sep, '')}: {args.rounds} rounds x {args.repeats} "
        "repeats, medians (ms/round)")
  for m in modes:
    print(f"  {m:7s} {med[m]:8.2f}   (min {min(times[m]):.2f}, max {max(times[m]):.2f})")
  # The generators alone: 269k float32 normals (a 784-256-256-10 MLP's noise) per call.
  from fedjax_lab.privacy import randomness
  keys = {"seeded": jax.random.key(0), "secret": randomness.secret_key(secret)}
  draw = jax.jit(lambda k: jax.random.normal(k, (269_322,)))
  normals = {}
  for mode in modes:
    jax.block_until_ready(draw(keys[mode]))
    ts = []
    for _ in range(20):
      t0 = time.perf_counter()
      jax.block_until_ready(draw(keys[mode]))
      ts.append(1e3 * (time.perf_counter() - t0))
    normals[mode] = statistics.median(ts)
  print(f"  269k normals: seeded {normals['seeded']:.2f} ms, secret {normals['secret']:.2f} ms "
        f"(x{normals['secret'] / normals['seeded']:.2f})")
  print(f"RATIO secret/seeded={med['secret'] / med['seeded']:.2f}")


if __name__ == "__main__":
  main()
