r"""Seconds per federated round: fedjax_lab vs a naive per-site loop vs a bare vmapped round.

  python benchmarks/round_throughput.py            # ~1-2 min on 2 CPU cores
  python benchmarks/round_throughput.py --quick    # smoke run

The reference workload (the one the peer figures in RESULTS.md use): sklearn's
digits, x/16, rows permuted with np.random.RandomState(0).permutation, first 1500 rows train;
100 IID sites x 15 examples; MLP 64-128(ReLU)-10; one local epoch of SGD (batch 5, 3 steps,
lr 0.1, batches in stored order); FedAvg; 50 rounds. S10 samples 10 sites a round, S100 all.

* naive: a Python loop over the cohort's sites and their local steps, one jitted SGD step per
  call, then the average (the same math; tests/test_benchmarks.py checks equal params).
* bare:  one jit, vmap over sites, scan over steps, mean, nothing else, on one device.
* bare_sharded: the same with the sites axis sharded over the lab's devices (one
  sharding constraint): the like-for-like ceiling for the lab's own overhead.
* lab:   fedjax_lab's Experiment.step (cohort sampling, index-table gather, weighted
  aggregation, server optax optimizer), i.e. what train.py runs.
* robust=median: the same with aggregator.robust=median (the reduce seam: every site's update
  kept [sites, d] and reduced by the coordinate-wise median, robust.py) instead of the sum.
On a CPU host fedjax_lab runs one single-threaded XLA device per core (see
fedjax_lab/__init__.py); naive and bare run on one device. So that no baseline is handicapped
by that setup, naive and bare are also timed in a child process with JAX's defaults (one CPU
device, multi-threaded XLA) and each ratio uses the FASTER of the two baseline timings.
Then a sweep of 10 ... 10,000 sites per round (digits' sites tiled) with s/round and memory.
The last lines are `ROBUST S100 median/lab=<robust=median / lab>` and
`RATIO S10=<naive/lab> S100=<naive/lab> overhead_S100=<lab/bare_sharded>`.
"""

import argparse
import json
import os
import subprocess
import sys
import time


import fedjax_lab

fedjax_lab.setup_cpu_devices()  # before jax: one XLA device per CPU core
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab import sharding
from fedjax_lab.algorithms import fedavg
from fedjax_lab.config import default_config
from fedjax_lab.experiment import Experiment
from fedjax_lab.models import cross_entropy

LR, STEPS, BATCH = 0.1, 3, 5


def reference_config(cohort_size: int, rounds: int = 50):
  c = default_config()
  c.rounds, c.cohort_size = rounds, cohort_size
  c.data.name, c.data.num_sites, c.data.partition = "digits", 100, "iid"
  c.model.name, c.model.hidden = "mlp", (128,)
  c.client.optimizer, c.client.lr, c.client.local_steps = "sgd", LR, STEPS
  c.client.batch_size, c.client.shuffle = BATCH, False
  c.server.optimizer, c.server.lr = "sgd", 1.0
  return c


def site_arrays(exp: Experiment):
  """[sites, 15, 64] and [sites, 15]: each site's examples in stored order."""
  rows = np.stack(exp.sites)
  return jnp.asarray(exp.train.x[rows]), jnp.asarray(exp.train.y[rows])


def cohorts(exp: Experiment, rounds: int):
  """The cohort of each round, drawn exactly as the lab's round draws it."""
  cfg = exp.config
  return [np.asarray(fedavg.sample_cohort(jax.random.fold_in(exp.keys["sampling"], t),
                                          cfg.data.num_sites, cfg.cohort_size))
          for t in range(rounds)]


def _loss(model, params, x, y):
  return cross_entropy(model.apply(params, {}, x, False)[0], y).mean()


def make_naive(exp: Experiment):
  model = exp.model
  sgd_step = jax.jit(lambda p, x, y: jax.tree.map(
      lambda w, g: w - LR * g, p, jax.grad(lambda q: _loss(model, q, x, y))(p)))
  accumulate = jax.jit(lambda total, p: jax.tree.map(jnp.add, total, p))
  rows = np.stack(exp.sites)
  xs, ys = exp.train.x[rows], exp.train.y[rows]  # host NumPy: slicing costs no dispatch

  def round_(params, cohort):
    total = jax.tree.map(jnp.zeros_like, params)
    for s in np.asarray(cohort):
      p = params
      for t in range(STEPS):
        p = sgd_step(p, xs[s, t * BATCH:(t + 1) * BATCH], ys[s, t * BATCH:(t + 1) * BATCH])
      total = accumulate(total, p)
    return jax.tree.map(lambda w: w / len(cohort), total)

  return round_


def make_bare(exp: Experiment, mesh=None):
  model = exp.model
  xs, ys = site_arrays(exp)
  if mesh is None:
    xs, ys = jax.device_put((xs, ys), jax.devices()[0])
  else:
    xs, ys = sharding.put_replicated((xs, ys), mesh)

  @jax.jit
  def round_(params, cohort):
    def local(x, y):
      def step(p, t):
        xb = jax.lax.dynamic_slice_in_dim(x, t * BATCH, BATCH)
        yb = jax.lax.dynamic_slice_in_dim(y, t * BATCH, BATCH)
        g = jax.grad(lambda q: _loss(model, q, xb, yb))(p)
        return jax.tree.map(lambda w, gw: w - LR * gw, p, g), None
      return jax.lax.scan(step, params, jnp.arange(STEPS))[0]
    x, y = sharding.constrain_sites((xs[cohort], ys[cohort]), mesh)
    local_params = jax.vmap(local)(x, y)
    return jax.tree.map(lambda w: w.mean(0), local_params)

  return round_


def run_lab(exp, rounds):
  state = exp.init_state()
  for _ in range(rounds):
    state, _ = exp.step(state, exp.data, exp.keys["sampling"], exp.keys["client"])
  return state.params


def run_reference(exp, round_fn, rounds, mesh=None):
  params = single_device(exp.init_state().params) if mesh is None else exp.init_state().params
  for cohort in cohorts(exp, rounds):
    params = round_fn(params, jnp.asarray(cohort))
  return params


def single_device(tree):
  return jax.device_put(jax.device_get(tree), jax.devices()[0])


def _time_rounds(fn, state, rounds):
  times = []
  for _ in range(rounds):
    t0 = time.perf_counter()
    state = jax.block_until_ready(fn(state))
    times.append(time.perf_counter() - t0)
  return state, times


def time_variants(cohort_size, rounds, repeats,
                  variants=("naive", "bare", "bare_sharded", "lab", "robust=median")):
  exp = Experiment(reference_config(cohort_size, rounds))
  if "robust=median" in variants:
    robust_cfg = reference_config(cohort_size, rounds)
    robust_cfg.aggregator.robust = "median"
    robust_exp = Experiment(robust_cfg)
    robust_step = lambda s: robust_exp.step(s, robust_exp.data, robust_exp.keys["sampling"],
                                            robust_exp.keys["client"])[0]
  fns = {"naive": make_naive(exp), "bare": make_bare(exp),
         "bare_sharded": make_bare(exp, exp.mesh)}
  plan = [jnp.asarray(c) for c in cohorts(exp, rounds)]
  step = lambda s: exp.step(s, exp.data, exp.keys["sampling"], exp.keys["client"])[0]
  start = {"naive": single_device(exp.init_state().params),
           "bare": single_device(exp.init_state().params),
           "bare_sharded": exp.init_state().params}
  times = {v: [] for v in variants}
  # Warm-up compiles, then interleave the variants so machine noise hits all of them alike.
  for v in variants:
    if v == "lab":
      jax.block_until_ready(step(exp.init_state()))
    elif v == "robust=median":
      jax.block_until_ready(robust_step(robust_exp.init_state()))
    else:
      jax.block_until_ready(fns[v](start[v], plan[0]))
  for _ in range(repeats):
    for v in variants:
      if v == "lab":
        times[v] += _time_rounds(step, exp.init_state(), rounds)[1]
      elif v == "robust=median":
        times[v] += _time_rounds(robust_step, robust_exp.init_state(), rounds)[1]
      else:
        it = iter(plan)
        times[v] += _time_rounds(lambda p: fns[v](p, next(it)), start[v], rounds)[1]
  return {k: float(np.median(v)) for k, v in times.items()}


def baselines_with_jax_defaults(rounds, repeats):
  """naive and bare timed in a child process with JAX's default CPU setup."""
  env = {**os.environ, "FEDJAX_LAB_CPU_DEVICES": "1"}
  out = subprocess.run([sys.executable, __file__, "--baselines-only", "--rounds", str(rounds),
                        "--repeats", str(repeats)], env=env, capture_output=True, text=True,
                       check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def _rss_mb():
  with open("/proc/self/status") as f:
    fields = dict(line.split(":", 1) for line in f)
  return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def tiled_round(exp: Experiment, sites: int, sites_per_chunk: int):
  """(step(state) -> state, data): the lab's FedAvg round over `sites` sites, every one in
  every round, each holding 15 digits (the reference sites tiled)."""
  tiled = np.asarray(exp.data.idx)[np.arange(sites) % 100]
  data = exp.data.replace(idx=jnp.asarray(tiled), count=jnp.full((sites,), 15, jnp.int32))
  round_fn = jax.jit(fedavg.make_round(exp.client_update, exp.server_tx, cohort_size=sites,
                                       mesh=exp.mesh, sites_per_chunk=sites_per_chunk),
                     donate_argnums=0)
  return lambda s: round_fn(s, data, exp.keys["sampling"], exp.keys["client"])[0]


def sweep(site_counts, rounds):
  exp = Experiment(reference_config(100, rounds))
  rows = []
  for sites in site_counts:
    step = tiled_round(exp, sites, sharding.default_sites_per_chunk())  # the lab's default
    state = jax.block_until_ready(step(exp.init_state()))
    rss_start = _rss_mb()[0]
    state, times = _time_rounds(step, state, rounds)
    rss_end, peak = _rss_mb()
    rows.append((sites, float(np.median(times)), rss_start, rss_end, peak))
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="few rounds, small sweep")
  parser.add_argument("--baselines-only", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--rounds", type=int, default=None)
  parser.add_argument("--repeats", type=int, default=None)
  args = parser.parse_args()
  rounds, repeats = (10, 1) if args.quick else (50, 3)
  rounds, repeats = args.rounds or rounds, args.repeats or repeats
  if args.baselines_only:
    print(json.dumps({name: time_variants(k, rounds, repeats, ("naive", "bare"))
                      for name, k in (("S10", 10), ("S100", 100))}))
    return
  site_counts = (10, 100, 1000) if args.quick else (10, 100, 1000, 10000)
  print(f"jax {jax.__version__}: {jax.device_count()} {jax.devices()[0].platform} device(s) for "
        f"the lab, {os.cpu_count()} cpus; {rounds} rounds x {repeats} repeats, medians (ms/round)")
  defaults = baselines_with_jax_defaults(rounds, repeats)
  results = {}
  for name, k in (("S10", 10), ("S100", 100)):
    r = time_variants(k, rounds, repeats)
    d = defaults[name]
    naive, bare = min(r["naive"], d["naive"]), min(r["bare"], d["bare"])
    results[name] = (naive, bare, r)
    print(f"{name}: naive {r['naive'] * 1e3:.2f} (JAX defaults {d['naive'] * 1e3:.2f})  "
          f"bare {r['bare'] * 1e3:.2f} (JAX defaults {d['bare'] * 1e3:.2f})  "
          f"bare_sharded {r['bare_sharded'] * 1e3:.2f}  lab {r['lab'] * 1e3:.2f}  "
          f"robust=median {r['robust=median'] * 1e3:.2f}  |  "
          f"naive/lab {naive / r['lab']:.2f}x  lab/bare_sharded "
          f"{r['lab'] / r['bare_sharded']:.2f}  lab/bare(1 device) {r['lab'] / bare:.2f}")
  print("sweep (lab, all sites every round):")
  print(f"{'sites':>7} {'ms/round':>10} {'ms/site':>8} {'rss MB (round 1 -> last)':>26} {'peak MB':>8}")
  for sites, sec, rss0, rss1, peak in sweep(site_counts, rounds):
    print(f"{sites:7d} {sec * 1e3:10.2f} {sec * 1e3 / sites:8.4f} {rss0:12.0f} -> {rss1:<11.0f} "
          f"{peak:8.0f}")
  (n10, _, r10), (n100, _, r100) = results["S10"], results["S100"]
  print(f"ROBUST S100 median/lab={r100['robust=median'] / r100['lab']:.2f} "
        f"S10 median/lab={r10['robust=median'] / r10['lab']:.2f}")
  print(f"RATIO S10={n10 / r10['lab']:.2f} S100={n100 / r100['lab']:.2f} "
        f"overhead_S100={r100['lab'] / r100['bare_sharded']:.2f}")


if __name__ == "__main__":
  main()
