r"""Shadow models per second: K digits-MLP shadows vmapped in one program vs one at a time.

  python benchmarks/shadow_models.py            # 64 shadows, ~1 min on 2 busy CPU cores
  python benchmarks/shadow_models.py --quick

Each shadow: MLP 64-128-10 trained by the lab's round (one site holding a random half of the
digits training split, 750 examples; 200 SGD steps of batch 32, lr 0.5). Arms:
  vmapped     ShadowTrainer's one program for all K (model axis sharded over the devices), from
              a fresh Experiment: its single compile is included ("cold"), then a warm call.
  vmapped_1d  the same on one device (warm).
  loop_fresh  what a user writes without the vmapped axis: per shadow a fresh Experiment and its
              own jitted single-model program, compile included (timed on min(K, 8) shadows).
  loop_warm   one jitted single-model program reused for every shadow, compile excluded.
The last line is `RATIO vmapped/loop=<vmapped cold over loop_fresh, in shadows/s>
warm=<vmapped warm over loop_warm>`.
"""

import argparse
import os
import time


import fedjax_lab

fedjax_lab.setup_cpu_devices()  # before jax: one XLA device per CPU core
import jax
import numpy as np

from fedjax_lab import sharding
from fedjax_lab.attacks import membership as mia
from fedjax_lab.config import default_config
from fedjax_lab.experiment import Experiment


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--shadows", type=int, default=64)
  args = parser.parse_args()
  k = 8 if args.quick else args.shadows
  c = default_config()
  c.data.name, c.data.num_sites, c.cohort_size, c.rounds = "digits", 1, 1, 1
  c.model.name, c.model.hidden = "mlp", (128,)
  c.client.optimizer, c.client.lr, c.client.local_steps, c.client.batch_size = "sgd", 0.5, 200, 32
  c.server.optimizer, c.server.lr, c.log.progress = "sgd", 1.0, False
  one_dev = sharding.make_mesh(jax.devices()[:1])
  rng = np.random.default_rng(0)
  exp = Experiment(c, mesh=one_dev)
  x, y = exp.train.x, exp.train.y
  mask = mia.random_subsets(rng, len(y), k)
  idx, count = mia.site_tables(mask, int(mask.sum(1)[0]), rng)
  seeds = np.arange(k)
  rates = {}

  def timed(name, n, fn):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    rates[name] = n / (time.perf_counter() - t0)
    print(f"{name:>15}: {n} shadows in {n / rates[name]:6.2f} s = {rates[name]:6.2f} shadows/s",
          flush=True)

  trainer = mia.ShadowTrainer(Experiment(c, mesh=one_dev), rounds=1)
  timed("vmapped cold", k, lambda: trainer.train(x, y, idx, count, seeds))
  timed("vmapped warm", k, lambda: trainer.train(x, y, idx, count, seeds))
  assert trainer._many._cache_size() == 1  # pylint: disable=protected-access
  jax.block_until_ready(trainer.train(x, y, idx, count, seeds, mesh=one_dev))
  timed("vmapped_1d warm", k, lambda: trainer.train(x, y, idx, count, seeds, mesh=one_dev))
  n_fresh = min(k, 8)

  def fresh_loop():
    out = []
    for j in range(n_fresh):
      t = mia.ShadowTrainer(Experiment(c, mesh=one_dev), rounds=1)
      out.append(t.train(x, y, idx[j:j + 1], count[j:j + 1], seeds[j:j + 1], vmapped=False))
    return out

  timed("loop_fresh", n_fresh, fresh_loop)
  jax.block_until_ready(trainer.train(x, y, idx[:1], count[:1], seeds[:1], vmapped=False))
  timed("loop_warm", k, lambda: trainer.train(x, y, idx, count, seeds, vmapped=False))
  print(f"jax {jax.__version__}, {jax.device_count()} {jax.default_backend()} device(s)")
  print(f"RATIO vmapped/loop={rates['vmapped cold'] / rates['loop_fresh']:.2f} "
        f"warm={rates['vmapped warm'] / rates['loop_warm']:.2f}")


if __name__ == "__main__":
  main()
