r"""Gradient-inversion speed: 16 restarts as one vmapped program vs a loop over restarts.

  python benchmarks/inversion_speed.py [--restarts 16] [--iterations 100] [--conv matmul|xla]

One digits site (1 image, batch 1, 1 local step; CNN 16/32 channels, 64 hidden, BatchNorm),
the attack of fedjax_lab/attacks/inversion.py. "loop": the same jitted single-restart attack
(its lax.scan of Adam iterations compiled once) called once per restart; "vmapped": one call
attacking all restarts. Compilation is excluded (each is run once first); the best of 3
timings. Prints attack iterations per second (restarts x iterations / seconds) for both, and
last `RATIO vmapped/loop=<x>`. `--conv` is the attack's `conv` setting, the same for both arms
(default matmul, the attack's default; xla: XLA's convolutions, as before issue 16's rework).
"""

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from sklearn.datasets import load_digits

from fedjax_lab.attacks import inversion as inv
from fedjax_lab.client import ClientConfig, make_client_update
from fedjax_lab.data.federated import from_partition
from fedjax_lab.models import make_model


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--restarts", type=int, default=16)
  ap.add_argument("--iterations", type=int, default=100)
  ap.add_argument("--conv", default="matmul", choices=("matmul", "xla"))
  args = ap.parse_args()
  d = load_digits()
  x = (d.data[:1] / 16.0).astype(np.float32)
  y = d.target[:1].astype(np.int32)
  mc = ml_collections.ConfigDict(dict(name="cnn", features=(16, 32), hidden=(64,), norm="batch",
                                      dropout=0.0, image_shape=()))
  model = make_model(mc, 10, x)
  params, ms = model.init(jax.random.key(0), x)
  data = from_partition(x, y, [np.arange(1)], 10)
  cu = make_client_update(model, optax.sgd(0.1), ClientConfig(1, 1, True, 0.0))
  rng = jax.random.key(1)
  out = jax.jit(cu)(params, ms, data.idx[0], jnp.int32(1), rng, data)
  target = inv.make_target(params, ms, out.delta, out.model_state, rng, 1, 1, 1)
  local = inv.Local(tx=optax.sgd(0.1), lr=0.1, local_steps=1, num_images=1,
                    image_shape=(8, 8, 1), data_shape=(64,), num_classes=10)
  cfg = inv.attack_config(dict(iterations=args.iterations, conv=args.conv))
  attack = inv.make_attack(model, local, cfg)
  single = jax.jit(attack)
  batched = jax.jit(jax.vmap(attack, in_axes=(None, 0)))
  keys = jax.random.split(jax.random.key(2), args.restarts)

  def loop():
    return [single(target, k)[0] for k in keys][-1].block_until_ready()

  def vmapped():
    return batched(target, keys)[0].block_until_ready()

  def best_of(fn, repeats=3):
    fn()  # compile
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      fn()
      times.append(time.perf_counter() - t0)
    return min(times)

  work = args.restarts * args.iterations
  t_loop, t_vmap = best_of(loop), best_of(vmapped)
  print(f"devices={jax.devices()} restarts={args.restarts} iterations={args.iterations} "
        f"conv={args.conv}")
  print(f"loop:    {work / t_loop:9.1f} attack iterations/s ({t_loop:.2f} s)")
  print(f"vmapped: {work / t_vmap:9.1f} attack iterations/s ({t_vmap:.2f} s)")
  print(f"RATIO vmapped/loop={t_loop / t_vmap:.2f}")


if __name__ == "__main__":
  main()
