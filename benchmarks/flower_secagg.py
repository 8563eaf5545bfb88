"""A whole secure round: Flower's SecAgg+ in Flower's simulation engine vs secagg.secure_sum.

Issue 14's benchmark goal: the lab's secure round at least 100x faster than Flower's SecAgg+
simulation at the same cohort, measured on the same machine in one process run.

Same vectors for both: K rows of d float32 (d = the parameter count of the default digits
config's model, configs/digits_fedavg.py: MLP 64-128-10), row i = 0.1 * N(0, 1) drawn by
numpy from (seed, i). Same protocol settings: k neighbours (K = 10: the complete graph, k = 9;
K = 100: SecAgg+ with k = 14 by default), Shamir threshold t = floor((k + 1) / 2) + 1 (the
lab's default; Flower's `reconstruction_threshold`), clipping range c = 1.0, the same integer
grid (Flower's `quantization_range` = the lab's `levels` = 2 floor((2^32 - 1) / 2K), so both
quantize [-c, c] to {0, .., levels}), modulus 2^32, no dropouts.

Flower (needs `flwr[simulation]`, i.e. Ray: `pip install -e .[flower-sim]`): Flower's own code
path, as its secure-aggregation example runs it: a ServerApp whose DefaultWorkflow has
`SecAggPlusWorkflow(num_shares=k + 1, reconstruction_threshold=t, clipping_range=c,
quantization_range=levels, modulus_range=2^32, max_weight=1)` as its fit workflow (FedAvg,
every node sampled, no evaluation), a ClientApp (a NumPyClient whose fit returns its row with
weight 1, no training) with `secaggplus_mod`, and `flwr.simulation.run_simulation` with K
SuperNodes on the Ray backend with Flower's default client resources (2 CPUs per client, so
one Ray actor here). A round's time is the SecAggPlusWorkflow call (its 4 stages: setup,
share keys, collect masked vectors, unmask, plus FedAvg's aggregate_fit of the unmasked mean)
timed inside the ServerApp; Ray start-up and the simulation's set-up are outside it. The first
round is a warm-up and is not counted. Not included: gRPC (the simulation engine passes
Messages in memory and to the Ray actor by pickling; no network serialisation).

Lab: `secagg.secure_sum(updates, key, SecAggConfig(neighbours=k, threshold=t, bits=32,
clip_range=1.0))` on the same rows, after one compile round, median of several rounds.

Prints ms per secure round for each, a correctness check (both means against the float
mean: max abs error, one grid step is 2c / levels), and as the LAST line
`RATIO flower/lab_S100=<x> flower/lab_S10=<y>` (Flower's median round over the lab's, same
run). Skips with one line if flwr (or Ray) is not installed.

  python benchmarks/flower_secagg.py [--flower-rounds 3] [--lab-repeats 5] [--k100 14]
"""

import argparse
import importlib.util
import logging
import os
import time
import warnings

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = 14
BITS = 32
CLIP = 1.0


def digits_model_size() -> int:
  """Parameter count of the default digits config's model (configs/digits_fedavg.py)."""
  import jax

  from fedjax_lab.models import make_model
  spec = importlib.util.spec_from_file_location(
      "digits_fedavg", os.path.join(ROOT, "configs", "digits_fedavg.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config()
  model = make_model(cfg.model, 10, np.zeros((1, 64), np.float32))  # digits: 8x8, 10 classes
  params, _ = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 64), np.float32))
  return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))


def site_row(seed: int, site: int, d: int) -> np.ndarray:
  """Site `site`'s update: what its ClientApp returns and row `site` of the lab's matrix."""
  return (0.1 * np.random.default_rng([seed, site]).standard_normal(d)).astype(np.float32)


def settings(K: int, k: int):
  from fedjax_lab import secagg
  k, t, levels = secagg.validate_secagg(K, k, None, BITS, CLIP, 0.0)
  return k, t, levels


# ----------------------------------------------------------------------------- Flower
def flower_rounds(K: int, d: int, k: int, rounds: int, seed: int = SEED):
  """Seconds of each SecAgg+ round in Flower's simulation engine, and the last round's mean."""
  from flwr.client import ClientApp, NumPyClient
  from flwr.client.mod import secaggplus_mod
  from flwr.common import parameters_to_ndarrays
  from flwr.common import ndarrays_to_parameters
  from flwr.compat.common import recorddict_compat as compat
  from flwr.server import LegacyContext, ServerApp, ServerConfig
  from flwr.server.strategy import FedAvg
  from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
  from flwr.server.workflow.constant import MAIN_PARAMS_RECORD
  from flwr.simulation import run_simulation

  k, t, levels = settings(K, k)

  # The ClientApp is pickled to the Ray actor with every message: keep it small (a row is
  # drawn from (seed, partition-id) in fit, not captured).
  class Site(NumPyClient):

    def __init__(self, site):
      self.site = site

    def fit(self, parameters, config):
      return [site_row(seed, self.site, d)], 1, {}

  def client_fn(context):
    return Site(int(context.node_config["partition-id"])).to_client()

  client_app = ClientApp(client_fn=client_fn, mods=[secaggplus_mod])
  server_app = ServerApp()
  times, means = [], []

  @server_app.main()
  def main(grid, context):
    strategy = FedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=K,
                      min_evaluate_clients=0, min_available_clients=K,
                      initial_parameters=ndarrays_to_parameters([np.zeros(d, np.float32)]))
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=rounds),
                           strategy=strategy)
    secagg_plus = SecAggPlusWorkflow(num_shares=k + 1, reconstruction_threshold=t,
                                     max_weight=1.0, clipping_range=CLIP,
                                     quantization_range=levels, modulus_range=1 << BITS)

    def timed(grid, context):
      start = time.perf_counter()
      secagg_plus(grid, context)
      times.append(time.perf_counter() - start)
      params = compat.arrayrecord_to_parameters(
          context.state.array_records[MAIN_PARAMS_RECORD], keep_input=True)
      means.append(parameters_to_ndarrays(params)[0])

    DefaultWorkflow(fit_workflow=timed)(grid, legacy)

  run_simulation(server_app=server_app, client_app=client_app, num_supernodes=K,
                 backend_config={"init_args": {"logging_level": "ERROR",
                                               "log_to_driver": False}})
  if len(times) != rounds:
    raise RuntimeError(f"Flower ran {len(times)} of {rounds} SecAgg+ rounds")
  return times, means[-1]


# ----------------------------------------------------------------------------- the lab
def lab_rounds(updates, k: int, repeats: int):
  """Seconds of each secure_sum round after a compile round, and the last round's mean."""
  import jax
  import jax.numpy as jnp

  from fedjax_lab import secagg
  K = updates.shape[0]
  _, t, _ = settings(K, k)
  cfg = secagg.SecAggConfig(neighbours=k, threshold=t, bits=BITS, clip_range=CLIP)
  x = jnp.asarray(updates)
  secagg.secure_sum(x, jax.random.key(0), cfg)  # compile
  times = []
  for i in range(repeats):
    start = time.perf_counter()
    r = secagg.secure_sum(x, jax.random.key(i + 1), cfg)
    times.append(time.perf_counter() - start)
    assert not r.aborted, r.abort_reason
  return times, np.asarray(r.mean)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--flower-rounds", type=int, default=3,
                      help="timed Flower rounds per cohort (plus one warm-up round)")
  parser.add_argument("--lab-repeats", type=int, default=5)
  parser.add_argument("--k100", type=int, default=14,
                      help="neighbours at K = 100 (99: the complete graph)")
  args = parser.parse_args()
  try:
    import flwr
    import ray  # noqa: F401  (flwr[simulation])
  except ImportError as e:
    print(f"skipped: Flower's simulation engine is not installed ({e.name}): "
          "pip install -e .[flower-sim]")
    return
  os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
  import jax
  # Flower logs each stage at INFO and, at WARNING, that run_simulation is deprecated in favour
  # of `flwr run` (the same simulation engine behind a SuperLink process); Ray starts its
  # processes with subprocess (fork + exec), which JAX warns about once it is initialised.
  logging.getLogger("flwr").setLevel(logging.ERROR)
  warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called")
  warnings.filterwarnings("ignore", message=r"Tip: In future versions of Ray")

  d = digits_model_size()
  print(f"flwr {flwr.__version__}, jax {jax.__version__} ({jax.default_backend()}), "
        f"{os.cpu_count()} CPUs; d = {d} (configs/digits_fedavg.py's model), bits = {BITS}, "
        f"clip = {CLIP}, no dropouts")
  print(f"{'K':>4s} {'k':>3s} {'t':>3s} {'levels':>10s} {'flower ms':>10s} {'(rounds ms)':>28s} "
        f"{'lab ms':>8s} {'flower/lab':>10s} {'err flower':>10s} {'err lab':>9s}")
  ratio = {}
  for K, k in ((100, args.k100), (10, None)):
    kk, t, levels = settings(K, k)
    updates = np.stack([site_row(SEED, i, d) for i in range(K)])
    true_mean = np.clip(updates, -CLIP, CLIP).mean(axis=0)
    lab_t, lab_mean = lab_rounds(updates, k, args.lab_repeats)
    fl_t, fl_mean = flower_rounds(K, d, k, args.flower_rounds + 1)
    fl_t = fl_t[1:]  # the first round is the warm-up
    fl_ms, lab_ms = 1e3 * np.median(fl_t), 1e3 * np.median(lab_t)
    ratio[K] = fl_ms / lab_ms
    err_f = float(np.abs(fl_mean - true_mean).max())
    err_l = float(np.abs(lab_mean - true_mean).max())
    rounds = " ".join(f"{1e3 * s:.0f}" for s in fl_t)
    print(f"{K:4d} {kk:3d} {t:3d} {levels:10d} {fl_ms:10.1f} {rounds:>28s} {lab_ms:8.1f} "
          f"{ratio[K]:10.1f} {err_f:10.2e} {err_l:9.2e}", flush=True)
  print(f"RATIO flower/lab_S100={ratio[100]:.1f} flower/lab_S10={ratio[10]:.1f}")


if __name__ == "__main__":
  main()
