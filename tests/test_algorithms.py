"""SCAFFOLD, ProxSkip, RandCom and D-SGD against closed forms, hand computations and NumPy.

The least-squares problem is heterogeneous (every site has its own feature distribution and
its own true weights) and small, with the exact minimizer of (1/S) sum_i f_i in closed form.
Its features and targets live in FederatedData.x ([N, D + 1], target last) so that the
algorithms' own round functions run on it through the `site_gradient` interface.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lab import algorithms, sharding
from fedjax_lab.algorithms import gossip, proxskip, randcom, scaffold, schedules, topology
from fedjax_lab.config import default_config, validate
from fedjax_lab.data.federated import FederatedData
from fedjax_lab.errors import ConfigError
from fedjax_lab.experiment import Experiment
from test_experiment import crash_during_step, numpy_accuracy

S, D, LOCAL_STEPS = 8, 4, 10
SIZES = (12, 9, 20, 14, 10, 25, 16, 11)


def _least_squares(dtype=np.float32, seed=0):
  """(data, sites' [n_i, D + 1] arrays, exact minimizer w* of (1/S) sum_i f_i, step size)."""
  rng = np.random.RandomState(seed)
  per_site = []
  for i, n in enumerate(SIZES):
    a = rng.randn(n, D) * (0.6 + 0.1 * i) + rng.randn(D)
    b = a @ (2.0 * rng.randn(D)) + 0.1 * rng.randn(n)  # every site its own true weights
    per_site.append(np.concatenate([a, b[:, None]], 1))
  x = np.concatenate(per_site)
  starts = np.cumsum((0,) + SIZES[:-1])
  idx = np.zeros((S, max(SIZES)), np.int32)
  for s, (start, n) in enumerate(zip(starts, SIZES)):
    idx[s, :n] = np.arange(start, start + n)
  data = FederatedData(x=jnp.asarray(x, dtype), y=jnp.zeros(len(x), jnp.int32),
                       idx=jnp.asarray(idx), count=jnp.asarray(SIZES, jnp.int32), num_classes=1)
  hessian = sum(z[:, :D].T @ z[:, :D] / len(z) for z in per_site) / S
  w_star = np.linalg.solve(hessian, sum(z[:, :D].T @ z[:, D] / len(z) for z in per_site) / S)
  lr = 0.5 / max(np.linalg.eigvalsh(z[:, :D].T @ z[:, :D] / len(z))[-1] for z in per_site)
  return data, per_site, w_star, lr


def _ls_site_gradient(params, site_idx, site_count, rng, step, data):
  """Exact gradient of f_i(w) = (1 / 2n_i) sum_k (a_k.w - b_k)^2 over the site's rows."""
  del rng, step
  z = data.x[site_idx]
  dtype = data.x.dtype  # (bool / int32 is float32 even under x64)
  weight = (jnp.arange(site_idx.shape[0]) < site_count).astype(dtype) / site_count.astype(dtype)
  residual = z[:, :D] @ params["w"] - z[:, D]
  return 0.5 * jnp.sum(weight * residual**2), {"w": z[:, :D].T @ (weight * residual)}


def _relative_error(params, w_star):
  return np.linalg.norm(np.asarray(params["w"], np.float64) - w_star) / np.linalg.norm(w_star)


def _run(round_fn, state, data, rounds, key=jax.random.key(0)):
  fused = jax.jit(algorithms.fuse_rounds(round_fn, rounds))
  return fused(state, data, key, key)


# ------------------------------------------------------------------ exact optimum vs drift


def test_proxskip_and_randcom_converge_to_the_exact_optimum_fedavg_drifts():
  with jax.enable_x64(True):
    data, per_site, w_star, lr = _least_squares(np.float64)
    params = {"w": jnp.zeros(D, jnp.float64)}
    schedule = schedules.CommSchedule("bernoulli", LOCAL_STEPS, prob=0.2)
    runs = {
        "proxskip": (proxskip.make_round(_ls_site_gradient, schedule, lr=lr),
                     proxskip.init_state(params, {}, S)),
        "randcom_ring": (randcom.make_round(_ls_site_gradient, schedule,
                                            topology.build("ring", S), lr=lr),
                         randcom.init_state(params, {}, S)),
    }
    for name, (round_fn, state) in runs.items():
      state, metrics = _run(round_fn, state, data, 150)  # 1500 local steps, ~300 communications
      assert _relative_error(state.params, w_star) < 1e-10, name  # 1e-6 asked; float64
      for x_i in np.asarray(state.site_params["w"]):  # every site holds the optimum
        assert np.linalg.norm(x_i - w_star) / np.linalg.norm(w_star) < 1e-10, name
      # sum_i h_i = 0 and h_i = grad f_i(w*).
      h = np.asarray(state.site_controls["w"])
      np.testing.assert_allclose(h.sum(0), 0.0, atol=1e-9)
      grads = [z[:, :D].T @ (z[:, :D] @ w_star - z[:, D]) / len(z) for z in per_site]
      np.testing.assert_allclose(h, np.stack(grads), rtol=1e-8, atol=1e-10)

  # FedAvg with the same step size and local steps, exact gradients, full participation:
  # its fixed point is biased by client drift (NumPy, float64).
  w = np.zeros(D)
  for _ in range(1500):
    local = []
    for z in per_site:
      y = w.copy()
      for _ in range(LOCAL_STEPS):
        y -= lr * z[:, :D].T @ (z[:, :D] @ y - z[:, D]) / len(z)
      local.append(y)
    w_next = np.mean(local, 0)
    converged = np.linalg.norm(w_next - w) < 1e-13
    w = w_next
  assert converged
  assert np.linalg.norm(w - w_star) / np.linalg.norm(w_star) > 1e-3


def test_float32_reaches_the_optimum_to_float32_accuracy_dsgd_does_not():
  data, _, w_star, lr = _least_squares(np.float32)
  params = {"w": jnp.zeros(D)}
  ring = topology.build("ring", S)
  schedule = schedules.CommSchedule("bernoulli", LOCAL_STEPS, prob=0.5)
  state, _ = _run(randcom.make_round(_ls_site_gradient, schedule, ring, lr=lr),
                  randcom.init_state(params, {}, S), data, 100)
  assert _relative_error(state.params, w_star) < 1e-4
  every_step = schedules.CommSchedule("every_k", LOCAL_STEPS, every=1)
  state, _ = _run(gossip.make_round(_ls_site_gradient, every_step, ring, lr=lr),
                  gossip.init_state(params, {}, S), data, 100)
  assert _relative_error(state.params, w_star) > 1e-2  # no correction: heterogeneity bias


# ------------------------------------------------------------------ update equations vs NumPy


def _numpy_gradients(per_site, x):
  """[S, D] exact gradients of every f_i at its own x_i."""
  return np.stack([z[:, :D].T @ (z[:, :D] @ x_i - z[:, D]) / len(z)
                   for z, x_i in zip(per_site, x)])


@pytest.mark.parametrize("algorithm", ["proxskip", "randcom", "dsgd"])
def test_rounds_follow_the_update_equations(algorithm):
  """Three rounds of the library against the papers' updates in NumPy with a dense W."""
  data, per_site, _, lr = _least_squares(np.float32, seed=1)
  per_site = [z.astype(np.float32).astype(np.float64) for z in per_site]
  p, rounds, key = 0.3, 3, jax.random.key(4)
  schedule = schedules.CommSchedule("bernoulli", LOCAL_STEPS, prob=p)
  torus = topology.build("torus", S)  # 2 x 4
  w = torus.mixing_matrix()
  params = {"w": jnp.asarray(np.linspace(-1, 1, D), jnp.float32)}
  if algorithm == "proxskip":
    round_fn = proxskip.make_round(_ls_site_gradient, schedule, lr=lr)
    state = proxskip.init_state(params, {}, S)
  elif algorithm == "randcom":
    round_fn = randcom.make_round(_ls_site_gradient, schedule, torus, lr=lr)
    state = randcom.init_state(params, {}, S)
  else:
    round_fn = gossip.make_round(_ls_site_gradient, schedule, torus, lr=lr)
    state = gossip.init_state(params, {}, S)
  round_fn = jax.jit(round_fn)
  x = np.tile(np.linspace(-1, 1, D), (S, 1))
  h = np.zeros((S, D))
  for r in range(rounds):
    coins = np.asarray(schedule.coins(key, r))
    state, metrics = round_fn(state, data, key, key)
    for coin in coins:
      g = _numpy_gradients(per_site, x)
      if algorithm == "dsgd":
        x = w @ (x - lr * g) if coin else x - lr * g
        continue
      x_hat = x - lr * (g - h)
      if coin:
        if algorithm == "proxskip":
          x = np.tile((x_hat - lr / p * h).mean(0), (S, 1))
        else:
          x = (np.eye(S) + w) / 2 @ x_hat
        h = h + p / lr * (x - x_hat)
      else:
        x = x_hat
    per_gossip = 2 * S if algorithm == "proxskip" else torus.messages_per_gossip
    assert int(metrics.messages) == per_gossip * coins.sum()
    assert int(metrics.comm_steps) == coins.sum()
  np.testing.assert_allclose(np.asarray(state.site_params["w"]), x, rtol=2e-4, atol=2e-5)
  np.testing.assert_allclose(np.asarray(state.params["w"]), x.mean(0), rtol=2e-4, atol=2e-5)


def test_proxskip_on_the_complete_graph_is_randcom_with_the_average():
  """Scaffnew's prox mean(x_hat - (gamma/p) h) vs RandCom's update with the average
  11^T/S (the complete graph's W) as the gossip: the same iterates, since sum_i h_i = 0."""
  data, _, _, lr = _least_squares(np.float32, seed=2)
  p, rounds, key = 0.3, 3, jax.random.key(0)
  schedule = schedules.CommSchedule("bernoulli", LOCAL_STEPS, prob=p)
  ps, _ = _run(proxskip.make_round(_ls_site_gradient, schedule, lr=lr),
               proxskip.init_state({"w": jnp.zeros(D)}, {}, S), data, rounds, key)
  complete = topology.build("complete", S)

  @jax.jit
  def randcom_step_with_average(x, h, t, coin):
    _, g = jax.vmap(_ls_site_gradient, in_axes=(0, 0, 0, None, None, None))(
        x, data.idx, data.count, key, t, data)
    x_hat = jax.tree.map(lambda x, g, h: x - lr * (g - h), x, g, h)
    x_new = jax.tree.map(lambda a, b: jnp.where(coin, a, b), topology.mix(complete, x_hat),
                         x_hat)
    h_new = jax.tree.map(lambda h, xn, xh: h + p / lr * (xn - xh), h, x_new, x_hat)
    return x_new, h_new

  start = proxskip.init_state({"w": jnp.zeros(D)}, {}, S)
  x, h = start.site_params, start.site_controls
  for r in range(rounds):
    for t, coin in enumerate(np.asarray(schedule.coins(key, r))):
      x, h = randcom_step_with_average(x, h, t, coin)
  np.testing.assert_allclose(np.asarray(ps.site_params["w"]), np.asarray(x["w"]),
                             rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ SCAFFOLD by hand


def _scalar_quadratics(a, b):
  """Site i: f_i(x) = a_i x^2 / 2 - b_i x; its one 'example' row is [a_i, b_i]."""
  n = len(a)
  data = FederatedData(x=jnp.asarray(np.stack([a, b], 1), jnp.float32),
                       y=jnp.zeros(n, jnp.int32), idx=jnp.arange(n, dtype=jnp.int32)[:, None],
                       count=jnp.ones(n, jnp.int32), num_classes=1)

  def site_gradient(params, site_idx, site_count, rng, step, data):
    a_i, b_i = data.x[site_idx[0], 0], data.x[site_idx[0], 1]
    w = params["w"]
    return jnp.sum(0.5 * a_i * w**2 - b_i * w), {"w": a_i * w - b_i}

  return data, site_gradient


def test_scaffold_matches_a_hand_computed_two_site_example():
  """f_1 = x^2/2 - x, f_2 = x^2; x = c = c_i = 0; 2 local steps of 0.5; server sgd(1), uniform.

  Round 1. site 1: g(0) = -1 -> y = 0.5; g = -0.5 -> y = 0.75; c_1 = (0 - 0.75)/(2*0.5) = -0.75.
           site 2: g(0) = 0 -> y = 0; c_2 = 0.      x = (0.75 + 0)/2 = 0.375;  c = -0.75/2 = -0.375.
  Round 2. site 1 (correction -c_1 + c = 0.375): g(0.375) = -0.625 -> y = 0.5; g = -0.5 ->
           y = 0.5625; c_1 = -0.75 + 0.375 + (0.375 - 0.5625)/1 = -0.5625.
           site 2 (correction -0.375): g(0.375) = 0.75 -> y = 0.1875; g = 0.375 -> y = 0.1875;
           c_2 = 0 + 0.375 + (0.375 - 0.1875) = 0.5625.
           x = 0.375 + (0.1875 - 0.1875)/2 = 0.375;  c = -0.375 + (0.1875 + 0.5625)/2 = 0.
  """
  data, site_gradient = _scalar_quadratics(np.array([1.0, 2.0]), np.array([1.0, 0.0]))
  server_tx = optax.sgd(1.0)
  round_fn = jax.jit(scaffold.make_round(site_gradient, server_tx, cohort_size=2,
                                         local_steps=2, lr=0.5, weighting="uniform"))
  state = scaffold.init_state({"w": jnp.zeros(())}, {}, server_tx, 2)
  want = [(0.375, -0.375, [-0.75, 0.0]), (0.375, 0.0, [-0.5625, 0.5625])]
  key = jax.random.key(0)
  for x, c, c_sites in want:
    state, metrics = round_fn(state, data, key, key)
    np.testing.assert_array_equal(np.asarray(state.params["w"]), np.float32(x))
    np.testing.assert_array_equal(np.asarray(state.control["w"]), np.float32(c))
    np.testing.assert_array_equal(np.asarray(state.site_controls["w"]),
                                  np.asarray(c_sites, np.float32))
    assert int(metrics.messages) == 8  # per site: x and c down, dy and dc up


def test_scaffold_converges_exactly_and_keeps_the_weighted_control_invariant():
  data, _, w_star, lr = _least_squares(np.float32, seed=3)
  server_tx = optax.sgd(1.0)
  # Full participation, uniform weights: the exact optimum of (1/S) sum_i f_i.
  round_fn = scaffold.make_round(_ls_site_gradient, server_tx, cohort_size=S,
                                 local_steps=LOCAL_STEPS, lr=lr, weighting="uniform")
  state, _ = _run(round_fn, scaffold.init_state({"w": jnp.zeros(D)}, {}, server_tx, S),
                  data, 300)
  assert _relative_error(state.params, w_star) < 1e-4
  # Partial participation with example weights: c = sum_i (n_i / N) c_i every round.
  round_fn = scaffold.make_round(_ls_site_gradient, server_tx, cohort_size=3,
                                 local_steps=LOCAL_STEPS, lr=lr, weighting="examples")
  state, _ = _run(round_fn, scaffold.init_state({"w": jnp.zeros(D)}, {}, server_tx, S),
                  data, 7)
  q = np.asarray(SIZES, np.float64) / sum(SIZES)
  np.testing.assert_allclose(np.asarray(state.control["w"]),
                             q @ np.asarray(state.site_controls["w"], np.float64), atol=1e-5)


# ------------------------------------------------------------------ communication schedules


def test_observed_communication_fraction_is_p_within_three_standard_deviations():
  data, _, _, lr = _least_squares(np.float32)
  p, rounds = 0.2, 300
  schedule = schedules.CommSchedule("bernoulli", LOCAL_STEPS, prob=p)
  round_fn = proxskip.make_round(_ls_site_gradient, schedule, lr=lr)
  _, metrics = _run(round_fn, proxskip.init_state({"w": jnp.zeros(D)}, {}, S), data, rounds)
  steps = rounds * LOCAL_STEPS
  fraction = float(np.asarray(metrics.comm_steps).sum()) / steps
  assert abs(fraction - p) <= 3 * np.sqrt(p * (1 - p) / steps), fraction
  np.testing.assert_array_equal(metrics.messages, 2 * S * metrics.comm_steps)
  for p in (0.1, 0.5):  # the schedule alone, over 3000 rounds x 10 steps
    schedule = schedules.CommSchedule("bernoulli", LOCAL_STEPS, prob=p)
    coins = jax.vmap(lambda r: schedule.coins(jax.random.key(7), r))(jnp.arange(3000))
    fraction, steps = float(coins.mean()), coins.size
    assert abs(fraction - p) <= 3 * np.sqrt(p * (1 - p) / steps), (p, fraction)


def test_deterministic_schedules():
  key = jax.random.key(0)
  every_3 = schedules.CommSchedule("every_k", 4, every=3)
  flat = np.concatenate([np.asarray(every_3.coins(key, r)) for r in range(3)])
  np.testing.assert_array_equal(np.flatnonzero(flat), [2, 5, 8, 11])  # counted over the run
  per_round = schedules.CommSchedule("per_round", 4)
  np.testing.assert_array_equal(per_round.coins(key, 7), [False, False, False, True])
  assert every_3.comm_prob == pytest.approx(1 / 3) and per_round.comm_prob == 0.25
  assert bool(jnp.all(schedules.CommSchedule("bernoulli", 50, prob=1.0).coins(key, 0)))


def test_eight_devices_equal_one_device():
  assert jax.device_count() == 8, "conftest sets 8 virtual CPU devices"
  data, _, _, lr = _least_squares(np.float32)
  schedule = schedules.CommSchedule("bernoulli", LOCAL_STEPS, prob=0.5)
  ring = topology.build("ring", S)
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = sharding.make_mesh(devices)
    round_fn = jax.jit(randcom.make_round(_ls_site_gradient, schedule, ring, lr=lr, mesh=mesh))
    state = sharding.put_replicated(randcom.init_state({"w": jnp.zeros(D)}, {}, S), mesh)
    d = sharding.put_replicated(data, mesh)
    for _ in range(3):
      state, _ = round_fn(state, d, jax.random.key(1), jax.random.key(2))
    results.append(state)
  for u, v in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ the experiment path


def _tiny(name, **overrides):
  c = default_config()
  c.rounds, c.data.num_sites, c.cohort_size = 2, 8, 8
  c.data.partition, c.data.alpha = "dirichlet", 0.5
  c.model.name, c.model.l2 = "linear", 1e-3
  c.client.local_steps, c.client.batch_size, c.client.lr = 4, 8, 0.1
  c.algorithm.name = name
  c.algorithm.comm_schedule, c.algorithm.comm_every = "every_k", 2  # 2 communications a round
  c.checkpoint.every = 1
  c.log.progress, c.log.tensorboard = False, False
  for key, value in overrides.items():
    section, leaf = key.split(".")
    c[section][leaf] = value
  return c


MODEL_BYTES = 4 * (64 * 10 + 10)  # linear 64 -> 10, float32


@pytest.mark.parametrize("name,messages", [("scaffold", 4 * 8), ("proxskip", 2 * 8 * 2),
                                           ("randcom", 16 * 2), ("dsgd", 16 * 2)])
def test_train_writes_bytes_per_round_and_total_and_resumes(name, messages, tmp_path):
  exp = Experiment(_tiny(name))
  summary = exp.run(str(tmp_path / "full"))
  rows = [json.loads(l) for l in open(tmp_path / "full" / "metrics.jsonl")]
  assert [r["bytes_communicated"] for r in rows] == [messages * MODEL_BYTES] * 2
  assert [r["bytes_total"] for r in rows] == [messages * MODEL_BYTES * k for k in (1, 2)]
  assert summary["bytes_total"] == 2 * messages * MODEL_BYTES
  # The reported accuracy is the global model's, as a NumPy forward pass scores it (the
  # methods whose every site keeps its own model are evaluated per site).
  state = exp.final_state
  if name == "scaffold":
    assert summary["test_accuracy"] == pytest.approx(
        numpy_accuracy(state.params, exp.test.x, exp.test.y), abs=1e-6)
  if name != "randcom":
    return
  # Crash in round 2 (round 1 is checkpointed), rerun: per-site models and controls restored.
  crash_during_step(exp, str(tmp_path / "crashed"), 2)
  resumed = exp.run(str(tmp_path / "crashed"))
  assert resumed["params_sha256"] == summary["params_sha256"]
  assert resumed["bytes_total"] == summary["bytes_total"]


@pytest.mark.parametrize("overrides,key", [
    ({"cohort_size": 4}, "cohort_size"),
    ({"client.optimizer": "adam"}, "client.optimizer"),
    ({"algorithm.topology": "torus", "data.num_sites": 7, "cohort_size": 7},
     "algorithm.topology"),
    ({"algorithm.comm_prob": 0.0}, "algorithm.comm_prob"),
    ({"algorithm.comm_schedule": "sometimes"}, "algorithm.comm_schedule"),
    ({"model.l2": -1.0}, "model.l2"),
    ({"model.norm": "batch"}, "model.norm"),
])
def test_bad_configs_name_the_key(overrides, key):
  c = _tiny("randcom")
  for k, v in overrides.items():
    if "." in k:
      section, leaf = k.split(".")
      c[section][leaf] = v
    else:
      c[k] = v
  with pytest.raises(ConfigError, match=key):
    validate(c)
