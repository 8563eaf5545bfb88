"""INR study: curvature-aware diagonal preconditioners versus Adam.

    python benchmarks/inr_study.py            # default: 4 min idle 2-core CPU, 12 busy
    python benchmarks/inr_study.py --quick    # smoke version, ~3 min (mostly compiling)

Question (Chng, Saratchandran and Lucey, "Preconditioners for the Stochastic
Training of Implicit Neural Representations", arXiv 2402.08784): do
curvature-aware preconditioners (ESGD, AdaHessian) fit a coordinate MLP faster than
Adam when its activation is sine or Gaussian, while Adam stays ahead for ReLU with
positional encoding?

Setup. A grayscale image bundled with scikit-learn (`china.jpg`, no download):
luma, centre crop 384x384, block-mean downsampled to --size (64 by default), values
mapped to [-1, 1]. A coordinate MLP (x, y) in [-1, 1]^2 -> gray value with
--hidden-layers hidden layers of --width units and one of three activations:

* sine: SIREN (Sitzmann et al. 2020), sin(omega_0 z), omega_0 = 30, SIREN init.
* gaussian: exp(-z^2 / (2 s^2)), s = --gaussian-scale (Ramasinghe & Lucey 2022),
  PyTorch-default init U(+-1/sqrt(fan_in)), as the paper's code uses.
* relu_pe: ReLU after a positional encoding [x, sin(2^k pi x), cos(2^k pi x)],
  k < --pe-frequencies, PyTorch-default init.

Loss: mean squared error. Optimizers by name from `fedjax_lab.optim` (adam, esgd,
adahessian, sophia) with their registry defaults; each is built with learning rate
1 and its updates are multiplied by the learning rate, which is exact for all four
(the rate is their last, linear stage) and lets one compiled program serve the
whole learning-rate grid. Two batch modes: full-batch (one step per epoch) and
minibatch (shuffled coordinates, --batch-size per step, one pass per epoch). PSNR
(peak 1 on the [0, 1] image, prediction clipped) is measured on the full image
after every epoch. The learning rate is chosen per optimizer x activation x mode
by the PSNR at the epoch budget with seed 0 (init and minibatch order), then the
chosen rate is re-run with --seeds fresh seeds (1, 2, ...), and the tables report
those, so the selection does not flatter the winner.

Per-step cost: jitted scans of 10 steps on a fixed batch, the variants
interleaved scan by scan (a shared machine's slow patches hit all alike), median
seconds per step, relative to Adam; each optimizer with its defaults (curvature
refreshed every 10 steps for esgd, after its 20 warm-up refreshes, and for
sophia; every step for adahessian) and with a refresh on every step.

Outputs: tables on stdout (markdown); under --out (default runs/benchmarks/inr_study/,
untracked) the PNG of reconstructions (inr_study.png, or --png) and every PSNR curve
(psnr_curves.json, or --json). The committed benchmarks/inr_study.png that RESULTS.md shows
is only rewritten when asked: --png benchmarks/inr_study.png.
"""

import argparse
import json
import math
import pathlib
import platform
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_sample_image

# Run as a script from anywhere: the repository root holds fedjax_lab.
from fedjax_lab import optim  # pylint: disable=g-import-not-at-top

ACTIVATIONS = ("sine", "gaussian", "relu_pe")
OPTIMIZER_NAMES = ("adam", "esgd", "adahessian", "sophia")
MODES = ("full", "minibatch")
# Learning-rate grids (log-spaced by ~3x), placed after a pilot at this size and
# widened where a first full run picked an edge value.
LR_GRIDS = {
    "adam": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
    "esgd": (0.01, 0.03, 0.1, 0.3, 1.0),
    "adahessian": (0.01, 0.03, 0.1, 0.3, 1.0),
    "sophia": (3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
}


# --- Data. ---


def load_image(size: int) -> np.ndarray:
  """[size, size] float32 grayscale in [0, 1] from scikit-learn's china.jpg."""
  if 384 % size:
    raise ValueError(f"--size must divide 384, got {size}")
  rgb = load_sample_image("china.jpg").astype(np.float32) / 255.0  # [427, 640, 3]
  gray = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
  top, left = (gray.shape[0] - 384) // 2, (gray.shape[1] - 384) // 2
  crop = gray[top:top + 384, left:left + 384]
  block = 384 // size
  return crop.reshape(size, block, size, block).mean(axis=(1, 3))


def coordinate_grid(size: int) -> np.ndarray:
  """[size * size, 2] pixel centres in [-1, 1]^2, row-major like the image."""
  axis = np.linspace(-1.0, 1.0, size, dtype=np.float32)
  ys, xs = np.meshgrid(axis, axis, indexing="ij")
  return np.stack([xs.ravel(), ys.ravel()], axis=-1)


# --- Model. ---


def _uniform(bound: float):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def _torch_default_dense(features: int, fan_in: int) -> nn.Dense:
  # PyTorch nn.Linear's default: U(+-1/sqrt(fan_in)) for weights and biases.
  bound = 1.0 / math.sqrt(fan_in)
  return nn.Dense(features, kernel_init=_uniform(bound),
                  bias_init=_uniform(bound))


class CoordinateMLP(nn.Module):
  """(x, y) -> gray value. Input [n, 2], output [n]."""

  activation: str  # One of ACTIVATIONS.
  width: int = 64
  hidden_layers: int = 3
  omega_0: float = 30.0
  gaussian_scale: float = 0.1
  pe_frequencies: int = 6

  @nn.compact
  def __call__(self, coords):
    h = coords
    if self.activation == "relu_pe":
      freqs = (2.0 ** jnp.arange(self.pe_frequencies)) * jnp.pi  # [L]
      angles = (h[..., None] * freqs).reshape(h.shape[0], -1)  # [n, 2L]
      h = jnp.concatenate([h, jnp.sin(angles), jnp.cos(angles)], axis=-1)
    fan_in = h.shape[-1]
    for layer in range(self.hidden_layers + 1):
      last = layer == self.hidden_layers
      features = 1 if last else self.width
      if self.activation == "sine":
        # SIREN init: the first layer spans the input domain (U(+-1/fan_in));
        # later layers keep omega_0 * z ~ U(+-sqrt(6)) so sin stays in range.
        bound = (1.0 / fan_in if layer == 0
                 else math.sqrt(6.0 / fan_in) / self.omega_0)
        dense = nn.Dense(features, kernel_init=_uniform(bound),
                         bias_init=_uniform(1.0 / math.sqrt(fan_in)))
      else:
        dense = _torch_default_dense(features, fan_in)
      h = dense(h)
      if not last:
        if self.activation == "sine":
          h = jnp.sin(self.omega_0 * h)
        elif self.activation == "gaussian":
          h = jnp.exp(-jnp.square(h) / (2.0 * self.gaussian_scale**2))
        else:
          h = nn.relu(h)
      fan_in = features
    return h[:, 0]


def psnr(prediction: jax.Array, target: jax.Array) -> jax.Array:
  """PSNR in dB of images in [-1, 1], with peak 1 on the [0, 1] scale."""
  prediction = jnp.clip(prediction, -1.0, 1.0)
  mse_unit = jnp.mean(jnp.square(prediction - target)) / 4.0
  return -10.0 * jnp.log10(mse_unit)


# --- Training. ---


def make_trainer(model, coords, target, name, mode, epochs, batch_size,
                 **hparams):
  """Jitted train(params, lr, key) -> (params, psnr per epoch [epochs]).

  One compiled program per optimizer x activation x mode; the learning rate is
  an argument (the updates of `make_optimizer(name, 1.0)` are multiplied by it).
  """
  tx = optim.make_optimizer(name, 1.0, **hparams)
  n = coords.shape[0]
  steps_per_epoch = 1 if mode == "full" else n // batch_size

  def loss_fn(params, x, y):
    return jnp.mean(jnp.square(model.apply(params, x) - y))

  def step(lr, carry, idx):
    params, state = carry
    x, y = coords[idx], target[idx]
    obj_fn = lambda p: loss_fn(p, x, y)
    grads = jax.grad(obj_fn)(params)
    updates, state = tx.update(grads, state, params, obj_fn=obj_fn)
    updates = jax.tree.map(lambda u: lr * u, updates)
    return (optax.apply_updates(params, updates), state), None

  def train(params, lr, key):
    def epoch(carry, epoch_key):
      if mode == "full":
        idx = jnp.arange(n)[None]  # [1, n]
      else:
        perm = jax.random.permutation(epoch_key, n)
        idx = perm[:steps_per_epoch * batch_size].reshape(
            steps_per_epoch, batch_size)
      carry, _ = jax.lax.scan(lambda c, i: step(lr, c, i), carry, idx)
      return carry, psnr(model.apply(carry[0], coords), target)

    carry = (params, tx.init(params))
    (params, _), curve = jax.lax.scan(
        epoch, carry, jax.random.split(key, epochs))
    return params, curve

  return jax.jit(train)


def make_timed_chunk(model, params, coords, target, name, batch_size,
                     chunk=10, **hparams):
  """A compiled, warmed-up `run()` doing `chunk` updates on a fixed batch.

  The warm-up chunks (the first also compiles) cover esgd's 20 warm-up
  refreshes, so timed chunks see the steady-state schedule: with chunk = 10,
  exactly one refresh per chunk for the every-10 optimizers.
  """
  tx = optim.make_optimizer(name, 1.0, **hparams)
  x, y = coords[:batch_size], target[:batch_size]
  obj_fn = lambda p: jnp.mean(jnp.square(model.apply(p, x) - y))

  @jax.jit
  def scan_chunk(carry):
    def step(carry, _):
      params, state = carry
      grads = jax.grad(obj_fn)(params)
      updates, state = tx.update(grads, state, params, obj_fn=obj_fn)
      updates = jax.tree.map(lambda u: 1e-6 * u, updates)
      return (optax.apply_updates(params, updates), state), None
    return jax.lax.scan(step, carry, None, length=chunk)[0]

  carry = [(params, tx.init(params))]
  for _ in range(max(2, -(-20 // chunk))):
    carry[0] = jax.block_until_ready(scan_chunk(carry[0]))

  def run():
    carry[0] = jax.block_until_ready(scan_chunk(carry[0]))

  return run


def median_step_seconds(runners, chunk=10, repeats=15):
  """{variant: median seconds per update}, the variants interleaved.

  Interleaving chunk by chunk means a slow patch of a shared machine hits
  every variant alike instead of whichever happened to run then.
  """
  times = {k: [] for k in runners}
  for _ in range(repeats):
    for k, run in runners.items():
      start = time.perf_counter()
      run()
      times[k].append((time.perf_counter() - start) / chunk)
  return {k: statistics.median(v) for k, v in times.items()}


# --- Study. ---


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true",
                 help="32x32, width 32, 1 lr per optimizer, short budgets")
  p.add_argument("--size", type=int, default=64)
  p.add_argument("--width", type=int, default=64)
  p.add_argument("--hidden-layers", type=int, default=3)
  p.add_argument("--gaussian-scale", type=float, default=0.1)
  p.add_argument("--pe-frequencies", type=int, default=6)
  p.add_argument("--full-epochs", type=int, default=100,
                 help="full-batch budget (1 step per epoch)")
  p.add_argument("--minibatch-epochs", type=int, default=20)
  p.add_argument("--batch-size", type=int, default=256)
  p.add_argument("--seeds", type=int, default=2,
                 help="fresh seeds (1..S) re-run at the chosen learning rate; "
                 "the grid uses seed 0")
  p.add_argument("--activations", default=",".join(ACTIVATIONS))
  p.add_argument("--optimizers", default=",".join(OPTIMIZER_NAMES))
  p.add_argument("--modes", default=",".join(MODES))
  p.add_argument("--out", default="runs/benchmarks/inr_study",
                 help="folder for the PNG and the PSNR curves (created)")
  p.add_argument("--png", default=None, help="the PNG's path (default OUT/inr_study.png)")
  p.add_argument("--json", default=None,
                 help="all PSNR curves' path (default OUT/psnr_curves.json)")
  args = p.parse_args()
  out = pathlib.Path(args.out)
  args.png = pathlib.Path(args.png or out / "inr_study.png")
  args.json = pathlib.Path(args.json or out / "psnr_curves.json")
  for path in (args.png, args.json):
    path.parent.mkdir(parents=True, exist_ok=True)
  if args.quick:
    args.size, args.width, args.full_epochs, args.minibatch_epochs = 32, 32, 30, 5
    args.seeds, args.pe_frequencies = 0, 5
  return args


def main():
  args = parse_args()
  activations = args.activations.split(",")
  names = args.optimizers.split(",")
  modes = args.modes.split(",")
  grids = dict(LR_GRIDS)
  if args.quick:
    grids = dict(adam=(3e-3,), esgd=(0.1,), adahessian=(0.1,), sophia=(1e-3,))

  image = load_image(args.size)
  coords = jnp.asarray(coordinate_grid(args.size))
  target = jnp.asarray(2.0 * image.ravel() - 1.0)
  epochs = {"full": args.full_epochs, "minibatch": args.minibatch_epochs}
  n = args.size**2
  print(f"# INR study: {args.size}x{args.size} china.jpg, MLP "
        f"{args.hidden_layers}x{args.width}, full-batch {args.full_epochs} "
        f"epochs (= steps), minibatch {args.minibatch_epochs} epochs of "
        f"{n // args.batch_size} steps (batch {args.batch_size}); "
        f"{platform.processor() or platform.machine()}, "
        f"jax {jax.__version__}, {jax.device_count()} device(s)")

  t_start = time.time()
  grid_results = {}  # (act, mode, name) -> {lr: final psnr}
  best = {}  # (act, mode, name) -> dict(lr, curves [seeds, epochs], params)
  for act in activations:
    model = CoordinateMLP(act, args.width, args.hidden_layers,
                          gaussian_scale=args.gaussian_scale,
                          pe_frequencies=args.pe_frequencies)
    inits = [model.init(jax.random.key(seed), coords[:1])
             for seed in range(args.seeds + 1)]
    for mode in modes:
      for name in names:
        train = make_trainer(model, coords, target, name, mode, epochs[mode],
                             args.batch_size)
        finals, runs = {}, {}
        for lr in grids[name]:
          params, curve = train(inits[0], lr, jax.random.key(100))
          curve = np.asarray(curve)
          finals[lr] = float(curve[-1]) if np.isfinite(curve[-1]) else -np.inf
          runs[lr] = (params, curve)
        grid_results[(act, mode, name)] = finals
        lr = max(finals, key=finals.get)
        curves = [np.asarray(train(inits[seed], lr,
                                   jax.random.key(100 + seed))[1])
                  for seed in range(1, args.seeds + 1)]
        best[(act, mode, name)] = dict(
            lr=lr, curves=np.stack(curves) if curves else runs[lr][1][None],
            params=runs[lr][0], selection_curve=runs[lr][1])
        print(f"  {act:9s} {mode:9s} {name:10s} lr={lr:<7g} "
              + " ".join(f"{k:g}:{v:.2f}" for k, v in finals.items())
              + f"  [{time.time() - t_start:.0f}s]", flush=True)

  # PSNR at the epoch budget (mean over seeds; min-max in brackets).
  for mode in modes:
    early = min(10, epochs[mode])
    which = (f"mean of {args.seeds} fresh seed(s) [min, max]" if args.seeds
             else "seed 0 only (no fresh seeds)")
    print(f"\n## PSNR (dB) after {epochs[mode]} epochs, {mode}: {which} at "
          f"the learning rate chosen on seed 0; in parentheses: epoch "
          f"{early}\n")
    print("| activation | " + " | ".join(names) + " | best |")
    print("|---|" + "---|" * (len(names) + 1))
    for act in activations:
      cells, means = [], {}
      for name in names:
        c = best[(act, mode, name)]["curves"]
        last, at_early = c[:, -1], c[:, early - 1]
        means[name] = float(np.mean(last))
        spread = (f" [{last.min():.2f}, {last.max():.2f}]"
                  if len(last) > 1 else "")
        cells.append(f"{np.mean(last):.2f}{spread} ({np.mean(at_early):.2f})"
                     f" lr {best[(act, mode, name)]['lr']:g}")
      winner = max(means, key=means.get)
      print(f"| {act} | " + " | ".join(cells) + f" | {winner} |")

  print("\n## Learning-rate grid (seed 0, PSNR at the budget)\n")
  print("| activation | mode | optimizer | " + "grid: PSNR |")
  print("|---|---|---|---|")
  for (act, mode, name), finals in grid_results.items():
    print(f"| {act} | {mode} | {name} | "
          + ", ".join(f"{k:g}: {v:.2f}" for k, v in finals.items()) + " |")

  # Per-step cost relative to Adam (sine model; minibatch and full batch).
  model = CoordinateMLP("sine", args.width, args.hidden_layers)
  params = model.init(jax.random.key(0), coords[:1])
  variants = [("adam", {}), ("esgd", {}), ("esgd", dict(update_interval=1)),
              ("adahessian", {}), ("sophia", {}),
              ("sophia", dict(update_interval=1))]
  variants = [(n_, h) for n_, h in variants if n_ in names]
  print("\n## Per-step cost (sine MLP; median over interleaved 10-step jitted "
        "scans: 15 minibatch, 7 full-batch)\n")
  print("| optimizer | curvature refresh | minibatch ms | x Adam | "
        "full-batch ms | x Adam |")
  print("|---|---|---|---|---|---|")
  costs = {}
  for batch in (args.batch_size, n):
    runners = {i: make_timed_chunk(model, params, coords, target, name, batch,
                                   **hp)
               for i, (name, hp) in enumerate(variants)}
    costs[batch] = median_step_seconds(
        runners, repeats=15 if batch < n else 7)
  for i, (name, hp) in enumerate(variants):
    cells = [f"{1e3 * costs[b][i]:.2f} | {costs[b][i] / costs[b][0]:.2f}"
             for b in (args.batch_size, n)]
    interval = hp.get(
        "update_interval",
        optim.HYPERPARAMETERS[name].get("update_interval", (None,))[0])
    refresh = "-" if interval is None else f"every {interval}"
    if name == "esgd" and not hp:
      refresh += " (after 20 warm-up refreshes)"
    print(f"| {name} | {refresh} | " + " | ".join(cells) + " |")

  # Reconstructions: rows activation x mode, columns target + optimizers.
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = [(a, m) for a in activations for m in modes]
  fig, axes = plt.subplots(len(rows), len(names) + 1,
                           figsize=(1.9 * (len(names) + 1), 2.0 * len(rows)),
                           squeeze=False)
  for r, (act, mode) in enumerate(rows):
    model = CoordinateMLP(act, args.width, args.hidden_layers,
                          gaussian_scale=args.gaussian_scale,
                          pe_frequencies=args.pe_frequencies)
    axes[r, 0].imshow(image, cmap="gray", vmin=0, vmax=1)
    axes[r, 0].set_title("target" if r == 0 else "", fontsize=8)
    axes[r, 0].set_ylabel(f"{act}\n{mode}", fontsize=8)
    for c, name in enumerate(names, start=1):
      b = best[(act, mode, name)]
      pred = np.asarray(model.apply(b["params"], coords)).reshape(image.shape)
      axes[r, c].imshow(np.clip((pred + 1) / 2, 0, 1), cmap="gray", vmin=0,
                        vmax=1)
      axes[r, c].set_title(f"{name} lr {b['lr']:g}\n"
                           f"{b['selection_curve'][-1]:.2f} dB", fontsize=8)
  for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
  fig.suptitle(f"Reconstructions at the epoch budget (full-batch "
               f"{args.full_epochs}, minibatch {args.minibatch_epochs}), seed 0",
               fontsize=9)
  fig.tight_layout()
  fig.savefig(args.png, dpi=110)
  print(f"\nwrote {args.png}; total {time.time() - t_start:.0f}s")

  if args.json:
    print(f"wrote {args.json}")
    with open(args.json, "w") as f:
      json.dump({f"{a}/{m}/{n_}": dict(
          lr=b["lr"], curves=b["curves"].tolist(),
          selection_curve=b["selection_curve"].tolist())
                 for (a, m, n_), b in best.items()}
                | {"grid": {f"{a}/{m}/{n_}": {str(k): v for k, v in g.items()}
                            for (a, m, n_), g in grid_results.items()}},
                f)


if __name__ == "__main__":
  main()
