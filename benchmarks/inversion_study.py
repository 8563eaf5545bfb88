r"""Hatamizadeh et al. 2022's leakage study on the bundled digits (benchmarks/RESULTS.md).

  python benchmarks/inversion_study.py [--quick] [--out runs/inversion_study]

A. BatchNorm CNN (configs/inversion_digits.py:site15 trained 20 rounds, FedAvg): fresh sites
   of n digits train B-sized batches for T local SGD steps (lr 0.1) from the global model;
   the server attacks the update (restarts vmapped, sites vmapped), with and without the BN
   statistics in the update.
B. The same at n=1, B=1, T=1 with GroupNorm (the lab's DP refuses BatchNorm): no DP,
   DP-FedAvg (the site's update clipped to C=1 plus N(0, (sigma C)^2), the noise one site
   adds under parallel noise) and DP-SGD (the example's gradient clipped to 1 plus
   N(0, sigma^2)), each at several sigma; the test accuracy of the federation trained 20
   rounds under that same mechanism, and its epsilon (delta 1e-5) from the lab's accountant.
Per configuration: mean SSIM / PSNR / RDLV over the sites' images with a normal 95% interval
over images, the prior's SSIM. Grids (originals above reconstructions) in --out and
benchmarks/plots/inversion_grids.png.
"""

import argparse
import json
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lab.algorithms import fedavg
from fedjax_lab.attacks import inversion as inv
from fedjax_lab.client import ClientConfig, make_client_update
from fedjax_lab.data.federated import from_partition
from fedjax_lab.experiment import Experiment

from fedjax_lab import runs

# The study's config file, loaded by path (configs/ is not a package).
inversion_digits = runs.load_module(os.path.join(runs.ROOT, "configs", "inversion_digits.py"))

LR = 0.1


def train(norm: str, dp: str = "none", sigma: float = 0.0, rounds: int = 20):
  c = inversion_digits.get_config("site15")
  c.rounds, c.model.norm = rounds, norm
  c.log.progress = c.log.tensorboard = False
  if dp != "none":
    c.dp.level, c.dp.noise_multiplier, c.dp.clip_norm, c.dp.delta = dp, sigma, 1.0, 1e-5
    c.dp.randomness = "seeded"
  exp = Experiment(c)
  state = exp.run_rounds(exp.init_state(), rounds)
  return exp, state, exp.evaluate(state).accuracy, exp.epsilon(rounds)


def site_update(exp, state, rows, B, T, seed, dp="none", sigma=0.0):
  """A fresh site's update (and BN statistics) under no DP, site DP or DP-SGD."""
  n = len(rows)
  x, y = np.asarray(exp.train.x)[rows], np.asarray(exp.train.y)[rows]
  data = from_partition(x, y, [np.arange(n)], 10)
  rng = jax.random.key(seed)
  cu = make_client_update(exp.model, optax.sgd(LR), ClientConfig(
      local_steps=T, batch_size=B, shuffle=True, prox_mu=0.0))
  if dp == "example":  # DP-SGD at batch n = B (every example joins: rate 1)
    def one(p, xi, yi):
      g = jax.grad(lambda p: inv.soft_cross_entropy(
          exp.model.apply(p, state.model_state, xi[None], False)[0],
          jax.nn.one_hot(yi[None], 10)).sum())(p)
      return fedavg.clip_by_global_norm(g, 1.0)[0]
    p, delta = state.params, None
    for t in range(T):
      g = jax.tree.map(lambda a: a.sum(0), jax.vmap(one, (None, 0, 0))(p, jnp.asarray(x),
                                                                       jnp.asarray(y)))
      noise = fedavg._site_noise(jax.random.fold_in(rng, 7 + t), 0, g, sigma)
      g = jax.tree.map(lambda a, z: (a + z) / n, g, noise)
      p = jax.tree.map(lambda a, b: a - LR * b, p, g)
    delta = jax.tree.map(jnp.subtract, p, state.params)
    return delta, state.model_state, rng
  out = jax.jit(cu)(state.params, state.model_state, data.idx[0], jnp.int32(n), rng, data)
  delta = out.delta
  if dp == "site":
    clipped, _ = fedavg.clip_by_global_norm(delta, 1.0)
    delta = jax.tree.map(jnp.add, clipped,
                         fedavg._site_noise(jax.random.fold_in(rng, 9), 0, clipped, sigma))
  return delta, out.model_state, rng


def attack(exp, state, n, B, T, sites, cfg, reveal_bn=True, dp="none", sigma=0.0, seed=0):
  targets, originals = [], []
  for s in range(sites):
    rows = np.asarray(exp.sites[s][:n])
    delta, ms, rng = site_update(exp, state, rows, B, T, 1000 + s, dp, sigma)
    positions = jnp.tile(jnp.arange(n), (T, 1)) if dp == "example" else None
    targets.append(inv.make_target(state.params, state.model_state, delta, ms, rng, n, B, T,
                                   reveal_bn=reveal_bn, positions=positions))
    originals.append(np.asarray(exp.train.x)[rows])
  local = inv.Local(tx=optax.sgd(LR), lr=LR, local_steps=T, num_images=n, image_shape=(8, 8, 1),
                    data_shape=(64,), num_classes=10,
                    clip_norm=1.0 if dp == "example" else None, divisor=float(n))
  t0 = time.perf_counter()
  xs = np.asarray(inv.attack_sites(exp.model, local, cfg, inv.stack(targets),
                                   jax.random.key(seed))[0])
  secs = time.perf_counter() - t0
  prior = np.asarray(exp.test.x).mean(0)
  leaks = [inv.leakage(xs[s], originals[s], prior, (8, 8, 1)) for s in range(sites)]
  cat = {k: np.concatenate([l[k] for l in leaks]) for k in leaks[0]}
  labels_ok = float(np.mean([int(t.labels[0]) == int(exp.train.y[exp.sites[s][0]])
                             for s, t in enumerate(targets)])) if n == 1 else None
  best = [inv.matched(xs[s], originals[s], (8, 8, 1)) for s in range(sites)]
  return cat, originals, best, secs, labels_ok


def fmt(v):
  m, h = inv.mean_ci(v)
  return f"{m:.2f} ± {h:.2f}"


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--out", default="runs/inversion_study")
  ap.add_argument("--iterations", type=int, default=250)
  ap.add_argument("--restarts", type=int, default=3)
  args = ap.parse_args()
  os.makedirs(args.out, exist_ok=True)
  cfg = dict(inv.DEFAULTS, iterations=args.iterations, restarts=args.restarts)
  rows, grids = [], []
  header = ("| part | model | n images | batch | steps | BN stats | DP | sigma | epsilon | "
            "test acc | SSIM | prior SSIM | PSNR dB | RDLV | label ok |")
  print(header + "\n|" + "---|" * 15, flush=True)

  def report(part, norm, n, B, T, bn, dp, sigma, eps, acc, res):
    cat, originals, best, secs, labels_ok = res
    line = (f"| {part} | cnn-{norm} | {n} | {B} | {T} | {'yes' if bn else 'no'} | {dp} | "
            f"{sigma:g} | {'inf' if eps is None else f'{eps:.3g}'} | {acc:.3f} | "
            f"{fmt(cat['ssim'])} | {fmt(cat['prior_ssim'])} | {fmt(cat['psnr'])} | "
            f"{fmt(cat['rdlv'])} | {'-' if labels_ok is None else f'{labels_ok:.2f}'} |")
    print(line + f"  <!-- {secs:.0f}s, {len(cat['ssim'])} images -->", flush=True)
    tag = f"{part}_{norm}_n{n}_b{B}_t{T}_{'bn' if bn else 'nobn'}_{dp}{sigma:g}"
    inv.save_grid(os.path.join(args.out, tag + ".png"), np.concatenate(originals),
                  np.concatenate(best), (8, 8, 1), [f"{s:.2f}" for s in cat["ssim"]])
    rows.append(dict(part=part, norm=norm, n=n, batch=B, steps=T, bn=bn, dp=dp, sigma=sigma,
                     epsilon=eps, accuracy=acc, seconds=secs,
                     **{k: [float(x) for x in v] for k, v in cat.items()}))
    grids.append((tag, originals, best, cat["ssim"]))

  sites_small, sites_big = (2, 2) if args.quick else (8, 4)
  exp, state, acc, eps = train("batch")
  grid_a = [(1, 1, 1), (1, 1, 4), (2, 2, 1), (4, 4, 1), (8, 8, 1), (8, 1, 8)]
  if args.quick:
    grid_a = [(1, 1, 1), (2, 2, 1)]
  for n, B, T in grid_a:
    for bn in ((True, False) if (n, B, T) in ((1, 1, 1), (8, 8, 1)) else (True,)):
      res = attack(exp, state, n, B, T, sites_small if n == 1 else sites_big, cfg, bn)
      report("A", "batch", n, B, T, bn, "none", 0.0, eps, acc, res)
  settings = [("none", 0.0), ("site", 0.01), ("site", 0.1), ("example", 0.01),
              ("example", 0.1)]
  if args.quick:
    settings = [("none", 0.0), ("site", 0.03)]
  for dp, sigma in settings:
    exp, state, acc, eps = train("group", dp, sigma)
    res = attack(exp, state, 1, 1, 1, sites_small, cfg, False, dp, sigma)
    report("B", "group", 1, 1, 1, False, dp, sigma, eps, acc, res)
  with open(os.path.join(args.out, "study.json"), "w") as f:
    json.dump(rows, f, indent=1)
  # One figure: the first site's images of a few configurations.
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  pick = [g for g in grids if g[0].startswith("A_batch_n1_b1_t1_bn") or "n8" in g[0]
          or g[0].startswith("B_")]
  fig, axes = plt.subplots(2 * len(pick), 8, figsize=(8, 2.1 * len(pick)), squeeze=False)
  for i, (tag, originals, best, ssims) in enumerate(pick):
    org, rec = np.concatenate(originals)[:8], np.concatenate(best)[:8]
    for j in range(8):
      for k, img in enumerate((org, rec)):
        ax = axes[2 * i + k, j]
        ax.axis("off")
        if j < len(img):
          ax.imshow(img[j].reshape(8, 8), cmap="gray_r", vmin=0, vmax=1)
          if k == 1:
            ax.set_title(f"{ssims[j]:.2f}", fontsize=6, y=-0.28)
    axes[2 * i, 0].set_title(tag, fontsize=7, loc="left")
  fig.tight_layout()
  target = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plots",
                        "inversion_grids.png")
  fig.savefig(target if not args.quick else os.path.join(args.out, "grids.png"), dpi=90)
  print("grids:", target if not args.quick else os.path.join(args.out, "grids.png"))


if __name__ == "__main__":
  main()
