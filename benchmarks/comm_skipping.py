r"""Bytes ProxSkip needs to reach a fixed loss, communicating with probability p vs always.

  python benchmarks/comm_skipping.py            # ~1-3 min on 2 CPU cores
  python benchmarks/comm_skipping.py --quick    # smoke run (fewer seeds and steps)

Problem: the `logistic` problem of configs/compare_comm.py, i.e. l2-regularized multinomial
logistic regression (model "linear", 650 parameters, model.l2 = 0.01) on sklearn's digits
over 16 sites with Dirichlet(0.1) label skew, objective
  F(w) = (1/16) sum_i [mean cross-entropy over site i] + (0.01 / 2) ||w||^2.
F* is computed in float64 by L-BFGS (NumPy gradients) to |grad F|^2 / (2 l2) < 1e-10, a
bound on its own suboptimality by strong convexity.

Method: the library's ProxSkip round (fedjax_lab/algorithms/proxskip.py) with EXACT site
gradients (common.make_site_gradient(full_batch=True): deterministic gradients, the setting
of ProxSkip's linear rate, so the comparison is not blurred by minibatch noise), step size
gamma = 1 / L, L = max_i 0.5 lambda_max(site i's second-moment matrix with bias) + l2, the
SAME gamma for every p; one local step per round; Bernoulli(p) coins shared by all sites.

Target: F(x) <= F* + 1e-4 (absolute suboptimality 1e-4, ~0.03% of F*). Only models the
sites hold after a communication count (all x_i equal there): bytes = messages sent so far
(2 per site per communication: up and down) x 2,600 bytes (650 float32). For p < 1 the coins
are random: the median over seeds is reported. Theory (Mishchenko et al. 2022): with
kappa = L / mu >> 1 / p^2 the iteration count does not depend on p, so bytes scale by p.

The last line is `RATIO bytes_p0.2/bytes_p1=<x>` (acceptance: <= 0.35).
"""

import argparse
import os
import sys
import time


import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

from fedjax_lab.algorithms import common, proxskip, schedules
from fedjax_lab.data import federated, partition, sources
from fedjax_lab.experiment import tree_bytes
from fedjax_lab.models import cross_entropy, make_model

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET_GAP = 1e-4
PROBS = (1.0, 0.5, 0.2, 0.1)


def problem_config():
  spec = importlib.util.spec_from_file_location(
      "compare_comm", os.path.join(_ROOT, "configs", "compare_comm.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config("logistic,proxskip_p0.2")


def build_problem(config):
  """(data, model, per-site (x, y) host arrays) exactly as the Experiment builds them."""
  train, _ = sources.load_dataset(config.data)
  sites = partition.partition(train, config.data, config.seed)
  data = federated.from_partition(train.x, train.y, sites, train.num_classes)
  model = make_model(config.model, train.num_classes, train.x[:2])
  return data, model, [(train.x[s].astype(np.float64), train.y[s]) for s in sites]


def numpy_objective(per_site, l2, num_classes):
  """F and its gradient in float64 over the flat vector [W (d x C), b (C)]."""
  d = per_site[0][0].shape[1]

  def f(theta):
    w, b = theta[:d * num_classes].reshape(d, num_classes), theta[d * num_classes:]
    value, gw, gb = 0.5 * l2 * theta @ theta, l2 * w, l2 * b
    for x, y in per_site:
      z = x @ w + b
      z -= z.max(1, keepdims=True)
      logp = z - np.log(np.exp(z).sum(1, keepdims=True))
      value += -logp[np.arange(len(y)), y].mean() / len(per_site)
      delta = np.exp(logp)
      delta[np.arange(len(y)), y] -= 1.0
      delta /= len(y) * len(per_site)
      gw, gb = gw + x.T @ delta, gb + delta.sum(0)
    return value, np.concatenate([gw.ravel(), gb])

  return f


def optimum(per_site, l2, num_classes):
  f = numpy_objective(per_site, l2, num_classes)
  d = per_site[0][0].shape[1]
  result = scipy.optimize.minimize(f, np.zeros((d + 1) * num_classes), jac=True,
                                   method="L-BFGS-B",
                                   options=dict(maxiter=20000, gtol=1e-11, ftol=0.0))
  grad_norm = np.linalg.norm(f(result.x)[1])
  # mu-strong convexity (mu >= l2): F(x) - F* <= |grad F(x)|^2 / (2 mu).
  assert grad_norm**2 / (2 * l2) < 1e-10, f"L-BFGS stopped at gradient norm {grad_norm}"
  return float(result.fun), grad_norm


def smoothness(per_site, l2):
  """max_i L_i with L_i = 0.5 lambda_max(E_i[x~ x~^T]) + l2, x~ = (x, 1): the softmax
  cross-entropy Hessian is at most 0.5 x~ x~^T per example."""
  def site_l(x):
    xt = np.concatenate([x, np.ones((len(x), 1))], 1)
    return 0.5 * np.linalg.eigvalsh(xt.T @ xt / len(x))[-1]
  return max(site_l(x) for x, _ in per_site) + l2


def run_proxskip(data, model, l2, lr, p, seed, steps):
  """[steps] F at the sites' average after each step, [steps] bool communicated, messages."""
  site_gradient = common.make_site_gradient(model, batch_size=1, shuffle=False, l2=l2,
                                            full_batch=True)
  schedule = schedules.CommSchedule("bernoulli", 1, prob=p)  # one local step a round
  round_fn = proxskip.make_round(site_gradient, schedule, lr=lr)
  num_sites = data.num_sites
  weights = jnp.where(jnp.arange(data.n_max)[None] < data.count[:, None],
                      1.0 / data.count[:, None], 0.0) / num_sites  # [S, n_max]

  def objective(params):
    logits, _ = model.apply(params, {}, data.x[data.idx.reshape(-1)], False)
    ce = cross_entropy(logits.reshape(-1, logits.shape[-1]), data.y[data.idx].reshape(-1))
    sq = sum(jnp.sum(a**2) for a in jax.tree.leaves(params))
    return jnp.sum(weights.reshape(-1) * ce) + 0.5 * l2 * sq

  @jax.jit
  def run(state, key):
    def body(state, _):
      state, metrics = round_fn(state, data, key, key)
      return state, (objective(state.params), metrics.comm_steps > 0, metrics.messages)
    return jax.lax.scan(body, state, None, length=steps)[1]

  params, _ = model.init(jax.random.key(0), data.x[:2])
  params = jax.tree.map(jnp.zeros_like, params)
  losses, comm, messages = run(proxskip.init_state(params, {}, num_sites),
                               jax.random.key(seed))
  return np.asarray(losses, np.float64), np.asarray(comm), np.asarray(messages)


def first_hit(losses, comm, messages, target):
  """(steps, communications, messages) until a communication leaves F <= target, or None."""
  hits = np.flatnonzero(comm & (losses <= target))
  if not len(hits):
    return None
  t = hits[0]
  return t + 1, int(comm[:t + 1].sum()), int(messages[:t + 1].sum())


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="2 seeds, fewer steps")
  args = parser.parse_args()
  seeds, steps = (2, 2000) if args.quick else (5, 3000)
  t0 = time.perf_counter()
  config = problem_config()
  data, model, per_site = build_problem(config)
  l2 = config.model.l2
  num_classes = data.num_classes
  f_star, grad_norm = optimum(per_site, l2, num_classes)
  lr = 1.0 / smoothness(per_site, l2)
  params, _ = model.init(jax.random.key(0), data.x[:2])
  model_bytes = tree_bytes(params)
  target = f_star + TARGET_GAP
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; digits, {data.num_sites} sites "
        f"Dirichlet({config.data.alpha}), sizes {sorted(np.asarray(data.count).tolist())}")
  print(f"linear model {model_bytes // 4} params ({model_bytes} bytes/message), l2={l2}; "
        f"F* = {f_star:.10f} (L-BFGS float64, |grad| = {grad_norm:.1e}, so within "
        f"{grad_norm**2 / (2 * l2):.0e}); "
        f"target F <= F* + {TARGET_GAP:g} = {target:.10f}; gamma = 1/L = {lr:.4f}")
  print(f"{'p':>5} {'seed':>4} {'steps':>6} {'comms':>6} {'messages':>9} {'bytes':>11}")
  median_bytes = {}
  for p in PROBS:
    results = []
    for seed in range(1 if p == 1.0 else seeds):  # p = 1 has no randomness
      losses, comm, messages = run_proxskip(data, model, l2, lr, p, seed, steps)
      hit = first_hit(losses, comm, messages, target)
      if hit is None:
        print(f"{p:>5} {seed:>4} did not reach the target in {steps} steps "
              f"(best F - F* = {losses.min() - f_star:.2e})")
        continue
      step, comms, msgs = hit
      results.append(msgs * model_bytes)
      print(f"{p:>5} {seed:>4} {step:>6} {comms:>6} {msgs:>9} {msgs * model_bytes:>11}")
    median_bytes[p] = float(np.median(results)) if results else float("nan")
  print("median bytes to target: " + ", ".join(
      f"p={p}: {b:.4g} ({b / median_bytes[1.0]:.3f} of p=1)" for p, b in median_bytes.items()))
  print(f"total {time.perf_counter() - t0:.1f} s")
  print(f"RATIO bytes_p0.2/bytes_p1={median_bytes[0.2] / median_bytes[1.0]:.4f}")


if __name__ == "__main__":
  main()
