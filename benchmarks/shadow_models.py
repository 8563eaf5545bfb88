r"""Shadow models per second: K digits-MLP shadows vmapped in one program vs one at a time.

  python benchmarks/shadow_models.py            # 64 shadows, ~1-2 min on 2 CPU cores
  python benchmarks/shadow_models.py --quick

Each shadow: MLP 64-128-10 trained by the lab's round (one site holding a random half of the
digits training split, 750 examples; 200 SGD steps of batch 32, lr 0.5). "loop" runs the same
jitted single-model program once per shadow. Times exclude compilation (one warm-up call).
The last line is `RATIO vmapped/loop=<shadows/s vmapped over shadows/s loop>`.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fedjax_lab  # noqa: F401  (before jax: the lab's CPU device setup)
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
  exp = Experiment(c, mesh=sharding.make_mesh(jax.devices()[:1]))
  rng = np.random.default_rng(0)
  x, y = exp.train.x, exp.train.y
  mask = mia.random_subsets(rng, len(y), k)
  idx, count = mia.site_tables(mask, int(mask.sum(1)[0]), rng)
  trainer = mia.ShadowTrainer(exp, rounds=1)
  rates = {}
  for name, vmapped in (("vmapped", True), ("loop", False)):
    jax.block_until_ready(trainer.train(x, y, idx, count, np.arange(k), vmapped=vmapped))
    t0 = time.perf_counter()
    jax.block_until_ready(trainer.train(x, y, idx, count, np.arange(k), vmapped=vmapped))
    rates[name] = k / (time.perf_counter() - t0)
    print(f"{name:>8}: {k} shadows in {k / rates[name]:.2f} s = {rates[name]:.1f} shadows/s")
  print(f"jax {jax.__version__}, {jax.device_count()} {jax.default_backend()} device(s)")
  print(f"RATIO vmapped/loop={rates['vmapped'] / rates['loop']:.2f}")


if __name__ == "__main__":
  main()
