"""Overhead of a DP-SGD step over a non-private SGD step.

    python benchmarks/dp_overhead.py [--steps 20] [--warmup 3]

A non-private step is `value_and_grad` of the mean loss plus an SGD update; a
DP step is the clipped per-example gradient sum (`make_clipped_grad_sum`),
`privatize` and the same SGD update on the noisy mean. Both are jitted and fed
the same random batch. Models: MLP 784-256-256-10 at batch 256 and a small CNN
(Conv 16 3x3 /2, Conv 32 3x3 /2, Dense 10; relu) on 28x28x1 at batch 128.

Every step is timed alone (after `block_until_ready` on its result), right
after an untimed step of the same variant, and the variants are interleaved
round by round in rotating order, so a slow patch of a shared machine hits all
of them alike; the median over steps is reported (and the minimum, for a
sense of the load). The last line is
`RATIO mlp=<dp/non-dp> cnn=<dp/non-dp>` for the path `method="auto"` picks.
The row "ghost-no-noise" (ghost clipping without `privatize`; not private) is
there to split the overhead into clipping and noise generation.
"""

import argparse
import os
import platform
import statistics
import sys
import time


import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fedjax_lab.privacy import clipping

LEARNING_RATE = 0.1
CLIP_NORM = 1.0
NOISE_MULTIPLIER = 1.1


class Mlp(nn.Module):
  """784-256-256-10 with relu."""

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(256)(x))
    x = nn.relu(nn.Dense(256)(x))
    return nn.Dense(10)(x)


class SmallCnn(nn.Module):
  """Conv 16 3x3 stride 2, Conv 32 3x3 stride 2, Dense 10; relu."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(16, (3, 3), strides=2)(x))
    x = nn.relu(nn.Conv(32, (3, 3), strides=2)(x))
    return nn.Dense(10)(x.reshape(x.shape[0], -1))


def example_loss(logits, label):
  return optax.softmax_cross_entropy_with_integer_labels(logits, label)


def make_steps(model, params, inputs):
  """Returns {variant: jitted step(params, inputs, labels, rng)}."""

  def non_private(params, inputs, labels, rng):
    del rng

    def mean_loss(p):
      logits = model.apply({"params": p}, inputs)
      return jnp.mean(jax.vmap(example_loss)(logits, labels))

    loss, grads = jax.value_and_grad(mean_loss)(params)
    params = jax.tree.map(lambda p, g: p - LEARNING_RATE * g, params, grads)
    return params, loss

  def dp(method, noise=True):
    clipped = clipping.make_clipped_grad_sum(model, example_loss,
                                             method=method)

    def step(params, inputs, labels, rng):
      grad_sum, norms = clipped(params, inputs, labels, None, CLIP_NORM)
      noisy = grad_sum
      if noise:
        noisy = clipping.privatize(grad_sum, CLIP_NORM, NOISE_MULTIPLIER, rng)
      batch = inputs.shape[0]
      params = jax.tree.map(lambda p, g: p - LEARNING_RATE * g / batch,
                            params, noisy)
      return params, jnp.mean(norms)

    return step

  steps = {"non-private": non_private}
  for method in ("vmap", "ghost"):
    steps[f"dp-{method}"] = dp(method)
  # Not a DP step: shows how much of the overhead is clipping vs noise.
  steps["ghost-no-noise"] = dp("ghost", noise=False)
  auto = clipping.choose_method(model, params, inputs)
  return {k: jax.jit(v) for k, v in steps.items()}, f"dp-{auto}"


def time_variants(steps, params, inputs, labels, num_steps, warmup):
  """Interleaved per-step wall times; returns {variant: [seconds]}.

  Each round runs every variant once untimed and once timed, in an order
  rotated every round: the untimed step refills caches after the previous
  variant (the vmap path streams hundreds of MB through them), and the
  rotation spreads any drift in machine load over all variants.
  """
  rng = jax.random.key(0)
  for step in steps.values():
    for _ in range(warmup):
      jax.block_until_ready(step(params, inputs, labels, rng))
  names = list(steps)
  times = {name: [] for name in names}
  for i in range(num_steps):
    key = jax.random.fold_in(rng, i)
    for name in names[i % len(names):] + names[:i % len(names)]:
      step = steps[name]
      jax.block_until_ready(step(params, inputs, labels, key))
      start = time.perf_counter()
      jax.block_until_ready(step(params, inputs, labels, key))
      times[name].append(time.perf_counter() - start)
  return times


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=3)
  args = parser.parse_args()

  rng = jax.random.key(42)
  configs = {
      "mlp": (Mlp(), 256, (28, 28, 1)),
      "cnn": (SmallCnn(), 128, (28, 28, 1)),
  }
  ratios = {}
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, "
        f"{jax.device_count()} device(s), {platform.machine()}; "
        f"median of {args.steps} interleaved steps after {args.warmup} "
        "warm-up steps")
  print(f"{'model':5} {'variant':14} {'median ms':>10} {'min ms':>8} "
        f"{'ratio':>7}")
  for name, (model, batch, shape) in configs.items():
    inputs = jax.random.normal(jax.random.fold_in(rng, 1), (batch,) + shape)
    labels = jax.random.randint(jax.random.fold_in(rng, 2), (batch,), 0, 10)
    params = model.init(jax.random.fold_in(rng, 3), inputs[:1])["params"]
    steps, auto = make_steps(model, params, inputs)
    times = time_variants(steps, params, inputs, labels, args.steps,
                          args.warmup)
    base = statistics.median(times["non-private"])
    for variant, ts in times.items():
      median = statistics.median(ts)
      mark = "  <- auto" if variant == auto else ""
      print(f"{name:5} {variant:14} {1e3 * median:10.2f} "
            f"{1e3 * min(ts):8.2f} {median / base:7.2f}{mark}")
    ratios[name] = statistics.median(times[auto]) / base
  print(f"RATIO mlp={ratios['mlp']:.2f} cnn={ratios['cnn']:.2f}")


if __name__ == "__main__":
  main()
