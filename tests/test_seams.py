"""The round's seams: the aggregator chain, FedNova (the seam's proof: one file), and DP-SGD at
the sites under SCAFFOLD. References are NumPy loops, never the code's own output."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lab import aggregators, client
from fedjax_lab.algorithms import common, fednova, scaffold
from fedjax_lab.algorithms.fedavg import init_server_state, make_round
from fedjax_lab.config import default_config, validate
from fedjax_lab.data.federated import from_partition
from fedjax_lab.errors import ConfigError
from fedjax_lab.experiment import Experiment
from fedjax_lab.models import make_model
from fedjax_lab.privacy import clipping
from fedjax_lab.privacy.sampling import max_sample_size
from test_experiment import numpy_accuracy, tiny_config


def _tiny(**overrides):
  return tiny_config(**{"rounds": 3, "checkpoint.every": 10, **overrides})


# ------------------------------------------------------------------ the aggregator chain

def test_chain_runs_site_steps_in_order_server_steps_in_reverse_and_keeps_stateful_states():
  log = []

  def member(name, state):
    return aggregators.make(
        init=lambda: state,
        site=lambda u, s, shared: (log.append(("site", name)) or u + 1.0, {name: u}),
        server=lambda total, st, rnd, shared, stats: (
            log.append(("server", name)) or total, st, {}))

  agg = aggregators.chain(member("a", {}), member("b", jnp.float32(2.0)), member("c", {}))
  assert float(agg.init()) == 2.0  # one stateful member: its state, not a tuple
  update, stats = agg.site(jnp.float32(0.0), None, {})
  assert float(update) == 3.0 and float(stats["b"]) == 1.0
  agg.server(update, agg.init(), None, {}, stats)
  assert log == [("site", "a"), ("site", "b"), ("site", "c"),
                 ("server", "c"), ("server", "b"), ("server", "a")]
  two = aggregators.chain(member("a", jnp.float32(1.0)), member("b", jnp.float32(2.0)))
  assert [float(s) for s in two.init()] == [1.0, 2.0]


def test_clip_is_nan_safe_and_counts_the_nonfinite_update():
  agg = aggregators.clip(1.0)
  shared = agg.broadcast({}, None, {})
  site = aggregators.SiteInfo(site=0, weight=1.0, present=jnp.float32(1.0))
  clipped, stats = agg.site({"w": jnp.array([3.0, 4.0])}, site, shared)
  np.testing.assert_allclose(np.asarray(clipped["w"]), [0.6, 0.8], rtol=1e-6)
  zeroed, stats = agg.site({"w": jnp.array([np.nan, 1.0])}, site, shared)
  assert np.all(np.asarray(zeroed["w"]) == 0) and int(stats["nonfinite"]) == 1


# ------------------------------------------------------------------ FedNova

def test_fednova_aggregator_is_normalized_averaging():
  rng = np.random.RandomState(0)
  deltas = rng.randn(4, 3).astype(np.float32)
  steps = np.array([1, 2, 5, 3], np.int32)
  p = np.array([0.1, 0.2, 0.3, 0.4], np.float32)
  agg = fednova.aggregator()
  outs = [agg.site({"w": jnp.asarray(deltas[i])},
                   aggregators.SiteInfo(site=i, weight=jnp.float32(p[i]), present=1.0,
                                        steps=jnp.int32(steps[i])), {}) for i in range(4)]
  total = jax.tree.map(lambda *a: sum(a), *[o[0] for o in outs])
  stats = jax.tree.map(lambda *a: jnp.stack(a), *[o[1] for o in outs])
  got, _, _ = agg.server(total, agg.init(), None, {}, stats)
  tau_eff = (p * steps).sum()
  want = tau_eff * (p[:, None] * deltas / steps[:, None]).sum(0)
  np.testing.assert_allclose(np.asarray(got["w"]), want, rtol=1e-5)


def test_fednova_round_equals_numpy_with_per_site_step_counts():
  """Quadratic sites f_i(w) = |w - b_i|^2 / 2 (b_i the mean of site i's features), full
  participation, tau_i = ceil(E n_i / B) capped at local_steps; server SGD lr 1."""
  sizes, batch, epochs, local_steps, lr = [3, 7, 12, 20], 4, 1.0, 4, 0.3
  rng = np.random.RandomState(1)
  x = rng.randn(sum(sizes), 5).astype(np.float32)
  y = np.zeros(sum(sizes), np.int32)
  bounds = np.cumsum([0] + sizes)
  data = from_partition(x, y, [np.arange(a, b) for a, b in zip(bounds[:-1], bounds[1:])], 2)

  def site_gradient(params, site_idx, site_count, rng, step, data):
    mask = (jnp.arange(site_idx.shape[0]) < site_count)[:, None]
    b = (data.x[site_idx] * mask).sum(0) / site_count
    return 0.5 * jnp.sum((params["w"] - b) ** 2), {"w": params["w"] - b}

  cu = client.make_local_update(client.from_site_gradient(site_gradient),
                                optax.with_extra_args_support(optax.sgd(lr)), local_steps,
                                batch_size=batch, local_epochs=epochs)
  agg = fednova.aggregator()
  round_fn = jax.jit(make_round(cu, optax.sgd(1.0), cohort_size=4, aggregator=agg))
  w0 = rng.randn(5).astype(np.float32)
  state = init_server_state({"w": jnp.asarray(w0)}, {}, optax.sgd(1.0), 4, False,
                            aggregator=agg)
  key = jax.random.key(0)
  for _ in range(3):
    state, metrics = round_fn(state, data, key, key)

  w = w0.astype(np.float64)
  p = np.array(sizes, np.float64) / sum(sizes)
  tau = np.minimum(np.ceil(epochs * np.array(sizes) / batch), local_steps)
  assert list(tau) == [1, 2, 3, 4]
  for _ in range(3):
    deltas = []
    for i in range(4):
      b = x[bounds[i]:bounds[i + 1]].astype(np.float64).mean(0)
      v = w.copy()
      for _ in range(int(tau[i])):
        v = v - lr * (v - b)
      deltas.append(v - w)
    w = w + (p * tau).sum() * sum(p[i] * deltas[i] / tau[i] for i in range(4))
  np.testing.assert_allclose(np.asarray(state.params["w"]), w, rtol=1e-5, atol=1e-6)


def test_fednova_with_equal_steps_is_fedavg_and_trains_through_the_experiment():
  nova = Experiment(_tiny(**{"algorithm.name": "fednova"}))
  avg = Experiment(_tiny())
  a = nova.run_rounds(nova.init_state(), 3).params
  b = avg.run_rounds(avg.init_state(), 3).params
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-5, atol=1e-6)
  skewed = Experiment(_tiny(**{"algorithm.name": "fednova", "client.local_epochs": 1.0,
                               "client.local_steps": 20, "data.partition": "quantity_skew"}))
  params = skewed.run_rounds(skewed.init_state(), 3).params
  assert all(np.isfinite(np.asarray(l)).all() for l in jax.tree.leaves(params))


@pytest.mark.parametrize("overrides,key", [
    ({"algorithm.name": "fednova", "dp.level": "site", "dp.noise_multiplier": 1.0}, "dp.level"),
    ({"algorithm.name": "fednova", "client.optimizer": "adam"}, "client.optimizer"),
    ({"algorithm.name": "scaffold", "dp.level": "site", "dp.noise_multiplier": 1.0},
     "dp.level"),
    ({"algorithm.name": "scaffold", "client.local_epochs": 1.0}, "client.local_epochs"),
    ({"algorithm.name": "proxskip", "cohort_size": 20, "dp.level": "site",
      "dp.noise_multiplier": 1.0}, "dp.level"),
    ({"client.local_epochs": -1.0}, "client.local_epochs"),
])
def test_unsound_or_unsupported_combinations_are_config_errors(overrides, key):
  with pytest.raises(ConfigError, match=key):
    validate(_tiny(**overrides))


# ------------------------------------------------------------------ DP-SGD under SCAFFOLD

def test_scaffold_with_example_level_dp_runs_and_is_accounted_like_fedavg(tmp_path):
  over = {"dp.level": "example", "dp.noise_multiplier": 1.0, "rounds": 2}
  summary = Experiment(_tiny(**{"algorithm.name": "scaffold", **over})).run(str(tmp_path / "s"))
  fedavg = Experiment(_tiny(**over))
  assert math.isfinite(summary["epsilon"]) and summary["epsilon"] == fedavg.epsilon(2)
  scaffold = Experiment(_tiny(**{"algorithm.name": "scaffold", **over}))
  state = scaffold.run_rounds(scaffold.init_state(), 2)  # the same run: keys from the seed
  assert summary["test_accuracy"] == pytest.approx(
      numpy_accuracy(state.params, scaffold.test.x, scaffold.test.y), abs=1e-6)


def test_scaffold_dp_sgd_steps_are_clipped():
  """First round (c = c_i = 0), no noise: each step moves y by lr times a clipped sum over
  at most max_batch examples / the expected batch, so |dy| <= steps lr C max_batch / E."""
  rng = np.random.RandomState(2)
  x = rng.randn(40, 6).astype(np.float32) * 50
  y = rng.randint(0, 3, 40).astype(np.int32)
  data = from_partition(x, y, np.split(np.arange(40), 4), 3)
  c = default_config()
  c.model.hidden = (8,)
  model = make_model(c.model, 3, x[:2])
  params, _ = model.init(jax.random.key(0), x[:2])
  clip, batch, steps, lr = 1e-3, 5, 3, 0.5
  dp = client.ExampleDP(clip_norm=clip, noise_multiplier=0.0,
                        max_batch=max_sample_size(batch, 10),
                        clipped_grad_sum=clipping.make_clipped_grad_sum(
                            model.module, lambda out, y: -jax.nn.log_softmax(out)[y],
                            apply_kwargs={"train": False}, return_losses=True))
  grad = common.make_site_gradient(model, batch, True, dp=dp)
  round_fn = jax.jit(scaffold.make_round(grad, optax.sgd(1.0), cohort_size=4, local_steps=steps,
                                         lr=lr))
  state = scaffold.init_state(params, {}, optax.sgd(1.0), 4)
  new, metrics = round_fn(state, data, jax.random.key(1), jax.random.key(2))
  moved = optax.global_norm(jax.tree.map(jnp.subtract, new.params, params))
  bound = steps * lr * clip * dp.max_batch / batch
  assert 0 < float(moved) <= bound * (1 + 1e-5)
  assert float(optax.global_norm(new.control)) > 0
