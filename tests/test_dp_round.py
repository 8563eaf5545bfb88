"""Differential privacy inside the round, against independent references.

Gradients: a NumPy per-example loop (manual MLP backprop, clipped in NumPy). Epsilon:
dp-accounting called directly. Noise: its empirical standard deviation.
"""

import json

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from dp_accounting import rdp
from scipy import stats as scipy_stats

from fedjax_lab.algorithms import fedavg
from fedjax_lab.client import ClientConfig, ExampleDP, make_client_update
from fedjax_lab.config import validate
from fedjax_lab.data.federated import from_partition
from fedjax_lab.errors import ConfigError
from fedjax_lab.experiment import Experiment
from fedjax_lab.privacy import clipping
from fedjax_lab.privacy.sampling import max_sample_size, poisson_sample
from test_experiment import tiny_config
from test_round import _mlp, _to_numpy


def _numpy_example_grads(p, x, y):
  """Per-example gradients of softmax cross-entropy for the 1-hidden-layer MLP."""
  w1, b1, w2, b2 = p
  out = []
  for xi, yi in zip(x, y):
    h_pre = xi @ w1 + b1
    h = np.maximum(h_pre, 0)
    z = h @ w2 + b2
    prob = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    d = prob.copy()
    d[yi] -= 1
    dh = (w2 @ d) * (h_pre > 0)
    out.append([np.outer(xi, dh), dh, np.outer(h, d), d])
  return out


def _clip(g, c):
  norm = np.sqrt(sum((a ** 2).sum() for a in g))
  return [a * min(1.0, c / norm) for a in g]


def test_poisson_inclusion_rate_matches_q_and_ignores_padding():
  q, count, draws = 0.2, 40, 4000
  hits = np.zeros(60)
  size = max_sample_size(q * count, 60)
  keys = jax.vmap(jax.random.key)(jnp.arange(draws))
  pos, mask, overflow = jax.jit(jax.vmap(lambda k: poisson_sample(k, count, q, 60, size)))(keys)
  assert int(overflow.max()) == 0
  np.add.at(hits, np.asarray(pos)[np.asarray(mask) > 0], 1)
  rate = hits[:count] / draws
  assert np.all(np.abs(rate - q) < 4 * np.sqrt(q * (1 - q) / draws))
  assert hits[count:].sum() == 0  # padding positions are never sampled
  # The same key selects the same examples whatever the padded width.
  a = poisson_sample(jax.random.key(7), count, q, 60, size)
  b = poisson_sample(jax.random.key(7), count, q, count, size)
  np.testing.assert_array_equal(np.asarray(a[0])[np.asarray(a[1]) > 0],
                                np.asarray(b[0])[np.asarray(b[1]) > 0])


def test_example_level_dp_step_equals_numpy_clipped_sum():
  rng = np.random.RandomState(0)
  x = rng.randn(30, 6).astype(np.float32) * 3
  y = rng.randint(0, 3, 30).astype(np.int32)
  data = from_partition(x, y, [np.arange(30)], 3)
  model = _mlp()
  params, ms = model.init(jax.random.key(0), x[:2])
  lr, clip, batch = 0.5, 0.3, 6
  dp = ExampleDP(clip_norm=clip, noise_multiplier=0.0, max_batch=max_sample_size(batch, 30),
                 clipped_grad_sum=clipping.make_clipped_grad_sum(
                     model.module, lambda o, t: -jax.nn.log_softmax(o)[t],
                     apply_kwargs={"train": False}, return_losses=True))
  update = make_client_update(model, optax.with_extra_args_support(optax.sgd(lr)),
                              ClientConfig(1, batch, True, 0.0), dp=dp)
  key = jax.random.key(4)
  out = update(params, ms, data.idx[0], data.count[0], key, data)
  # The examples this step sampled (same derivation as the client: batch key, step 0).
  batch_rng = jax.random.split(key)[0]
  pos, mask, _ = poisson_sample(jax.random.fold_in(batch_rng, 0), 30, batch / 30, 30,
                                dp.max_batch)
  chosen = np.asarray(pos)[np.asarray(mask) > 0]
  assert 0 < len(chosen) < 30
  p = _to_numpy(params)
  grads = [_clip(g, clip) for g in _numpy_example_grads(p, x[chosen].astype(np.float64),
                                                        y[chosen])]
  want = [-lr * sum(g[i] for g in grads) / batch for i in range(4)]  # / expected batch size
  assert any(np.sqrt(sum((a ** 2).sum() for a in g)) > clip for g in
             _numpy_example_grads(p, x[chosen].astype(np.float64), y[chosen]))
  got = _to_numpy(out.delta)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def _round_with(site_dp, cohort=4, sites=8, hidden=16, clip=None):
  """A jitted DP-FedAvg round over 8 sites of 5 random examples, its data and initial state;
  `clip` sets the state's clip norm C_t (adaptive clipping), else it starts at C_0."""
  rng = np.random.RandomState(1)
  x = rng.randn(sites * 5, 6).astype(np.float32)
  y = rng.randint(0, 3, sites * 5).astype(np.int32)
  data = from_partition(x, y, np.split(np.arange(sites * 5), sites), 3)
  model = _mlp(hidden)
  params, ms = model.init(jax.random.key(0), x[:2])
  cu = make_client_update(model, optax.with_extra_args_support(optax.sgd(1.0)),
                          ClientConfig(1, 5, False, 0.0))
  round_fn = jax.jit(fedavg.make_round(cu, optax.sgd(1.0), cohort_size=cohort, site_dp=site_dp))
  adaptive = site_dp.adaptive is not None
  state = fedavg.init_server_state(params, ms, optax.sgd(1.0), sites, False,
                                   clip_norm=site_dp.clip_norm if adaptive else None)
  if clip is not None:
    state = state._replace(aggregator_state=jnp.float32(clip))
  return x, y, params, state, round_fn, data


def _site_round(noise, coordinated, cohort=4, sites=8, clip=0.05, hidden=16):
  site_dp = fedavg.SiteDP(clip_norm=clip, noise_multiplier=noise, coordinated=coordinated,
                          max_cohort=max_sample_size(cohort, sites))
  return (*_round_with(site_dp, cohort, sites, hidden), site_dp)


def test_site_level_dp_fedavg_equals_numpy_clipped_mean():
  x, y, params, state, round_fn, data, site_dp = _site_round(0.0, False)
  key = jax.random.key(9)
  new, metrics = round_fn(state, data, key, key)
  cohort, mask, _ = poisson_sample(jax.random.fold_in(key, 0), 8, 4 / 8, 8, site_dp.max_cohort)
  chosen = np.asarray(cohort)[np.asarray(mask) > 0]
  assert int(metrics.messages) == 2 * len(chosen)
  p = _to_numpy(params)
  total = [np.zeros_like(a) for a in p]
  for s in chosen:
    rows = np.arange(s * 5, s * 5 + 5)
    g = _numpy_example_grads(p, x[rows].astype(np.float64), y[rows])
    delta = [-sum(gi[i] for gi in g) / 5 for i in range(4)]  # one SGD step, lr 1, batch 5
    total = [t + d for t, d in zip(total, _clip(delta, site_dp.clip_norm))]
  want = [a + t / 4 for a, t in zip(p, total)]  # divided by the EXPECTED cohort size
  for a, b in zip(_to_numpy(new.params), want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def _moved(new_params, params):
  """All coordinates of new_params - params, flat."""
  return np.concatenate([np.ravel(np.asarray(a) - np.asarray(b)) for a, b in
                         zip(jax.tree.leaves(new_params), jax.tree.leaves(params))])


@pytest.mark.parametrize("coordinated", [False, True])
def test_site_level_noise_std(coordinated):
  # Updates clipped to 1e-4 against noise of std 1 per site: what moves the params is the
  # noise; 2000 hidden units give ~20k coordinates, so the std is estimated to ~0.5%.
  sigma, clip = 1e4, 1e-4
  _, _, params, state, round_fn, data, _ = _site_round(sigma, coordinated, cohort=8, clip=clip,
                                                       hidden=2000)
  key = jax.random.key(3)
  new, metrics = round_fn(state, data, key, key)
  n = int(metrics.messages) // 2  # all 8 sites at q = 1
  moved = _moved(new.params, params)
  # Sum of n shares, divided by the expected cohort size 8.
  share = sigma * clip / (np.sqrt(n) if coordinated else 1.0)
  want = share * np.sqrt(n) / 8
  assert abs(moved.std() / want - 1) < 0.03


def test_epsilon_every_round_matches_dp_accounting(tmp_path):
  c = tiny_config(**{"dp.level": "example", "dp.noise_multiplier": 1.3, "rounds": 4})
  exp = Experiment(c)
  exp.run(str(tmp_path))
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  q = c.client.batch_size / np.asarray(exp.data.count).min()
  for r in rows:
    event = dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
        q, dp_accounting.GaussianDpEvent(1.3)), r["round"] * c.client.local_steps)
    # dp-accounting at delta (1 - 1e-3): the rest of delta pays for truncated batches.
    want = rdp.RdpAccountant().compose(event).get_epsilon(c.dp.delta * (1 - 1e-3))
    assert r["epsilon"] == pytest.approx(want, rel=1e-9)
    assert r["dp_overflow"] == 0
  summary = json.loads((tmp_path / "summary.json").read_text())
  privacy = summary["privacy"]
  assert {k: privacy[k] for k in ("noise_multiplier", "sampling_prob", "steps", "accountant",
                                  "delta", "accountant_delta")} == {
      "noise_multiplier": 1.3, "sampling_prob": pytest.approx(q),
      "steps": 4 * c.client.local_steps, "accountant": "rdp", "delta": c.dp.delta,
      "accountant_delta": pytest.approx(c.dp.delta * (1 - 1e-3))}
  assert privacy["slots"] == exp.privacy.slots and privacy["overflow_bound"] > 0


@pytest.mark.parametrize("level", ["example", "site"])
def test_truncated_poisson_samples_are_paid_for_in_delta(level):
  """Batches (cohorts) are truncated to `slots`. Checked with scipy's binomial tail, site by
  site (and for a site of one example more or less): over the run, the chance that the unit's
  draws ever overflow, times (1 + e^epsilon), fits in the 1e-3 of delta the accountant
  was not given; one slot fewer would not fit."""
  from scipy import stats
  overrides = {"dp.level": level, "dp.noise_multiplier": 1.0, "rounds": 50}
  if level == "site":
    overrides.update({"data.num_sites": 200, "cohort_size": 20})
  c = tiny_config(**overrides)
  exp = Experiment(c)
  plan = exp.privacy
  steps = c.rounds * plan.steps_per_round
  eps = exp.epsilon(c.rounds)
  if level == "example":
    n = np.unique(np.asarray(exp.data.count))
    n = np.concatenate([n - 1, n, n + 1])
    n = n[n > 0]
    rate = np.minimum(1.0, c.client.batch_size / n)
  else:
    n = np.array([199, 200, 201])
    rate = np.full(3, 20 / 200)
  worst_tail = lambda m: stats.binom.sf(m, n, rate).max()
  slack = (1 + np.exp(eps)) * steps * worst_tail(plan.slots)
  assert slack <= 1e-3 * c.dp.delta
  if plan.slots < n.max() - 1:
    assert (1 + np.exp(eps)) * steps * worst_tail(plan.slots - 1) > 1e-3 * c.dp.delta
  assert plan.accountant.delta == pytest.approx(c.dp.delta * (1 - 1e-3))


def test_budget_stops_cleanly_and_resume_reports_the_same_epsilon(tmp_path):
  c = tiny_config(**{"dp.level": "site", "dp.noise_multiplier": 0.8, "rounds": 50,
                     "cohort_size": 10, "dp.target_epsilon": 3.0})
  first = Experiment(c).run(str(tmp_path))
  assert first["rounds_completed"] < 50 and first["epsilon"] <= 3.0
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert all(r["epsilon"] <= 3.0 for r in rows)
  again = Experiment(c).run(str(tmp_path))
  assert again["epsilon"] == first["epsilon"]
  assert again["params_sha256"] == first["params_sha256"]


def test_calibrated_sigma_meets_the_target():
  c = tiny_config(**{"dp.level": "site", "dp.target_epsilon": 2.0, "rounds": 20,
                     "cohort_size": 5})
  exp = Experiment(c)
  assert exp.epsilon(20) <= 2.0
  assert exp.epsilon(20) > 2.0 * 0.97  # calibrated, not just any large sigma


@pytest.mark.parametrize("overrides,key", [
    ({"dp.level": "example", "dp.noise_multiplier": -1.0}, "dp.noise_multiplier"),
    ({"dp.level": "example", "dp.noise_multiplier": 1.0, "dp.clip_norm": 0.0}, "dp.clip_norm"),
    ({"dp.level": "site", "dp.target_epsilon": -2.0}, "dp.target_epsilon"),
    ({"dp.level": "site", "dp.noise_multiplier": 1.0, "dp.delta": 1.0}, "dp.delta"),
    ({"dp.level": "example"}, "dp.noise_multiplier"),
    ({"dp.level": "example", "dp.noise_multiplier": 1.0, "dp.noise": "coordinated"}, "dp.noise"),
    ({"dp.level": "example", "dp.noise_multiplier": 1.0, "model.norm": "batch"}, "model.norm"),
    ({"dp.level": "example", "dp.noise_multiplier": 1.0, "client.optimizer": "esgd"},
     "client.optimizer"),
])
def test_dp_config_errors(overrides, key):
  with pytest.raises(ConfigError) as e:
    validate(tiny_config(**overrides))
  assert e.value.key == key


def test_resuming_with_another_privacy_plan_is_refused(tmp_path):
  """The checkpoint's sigma/q/steps are what its epsilon composed; continuing it under
  another sigma would report an epsilon that is true of neither run. `rounds` may change on
  resume (runs.RESUMABLE_KEYS), but a sigma calibrated for 4 rounds is not the one for 8."""
  c = tiny_config(**{"dp.level": "site", "dp.target_epsilon": 4.0, "rounds": 4,
                     "cohort_size": 10})
  first = Experiment(c)
  first.run(str(tmp_path))
  rows = (tmp_path / "metrics.jsonl").read_text()
  c.rounds = 8
  with pytest.raises(ConfigError) as e:
    Experiment(c).run(str(tmp_path))
  assert e.value.key == "dp"
  assert f"noise_multiplier={first.privacy.noise_multiplier}" in str(e.value)
  assert (tmp_path / "metrics.jsonl").read_text() == rows


@pytest.mark.parametrize("num_in", [0, 1, 3, 7])
def test_parallel_site_noise_does_not_tell_the_cohort_size(num_in):
  """Site level, parallel noise: whatever the round's n (0 .. slots), the released mean's noise
  is N(0, slots (z C / K)^2) per coordinate (the server tops the n sites' full shares up to the
  slots), so its size does not reveal n. Reference: the closed form, with a chi-square
  interval on the empirical variance of zero updates over many coordinates."""
  from fedjax_lab import aggregators
  clip_norm, z, expected, slots, d = 2.0, 0.7, 4.0, 8, 20_000
  chain = aggregators.site_dp(clip_norm, z, coordinated=False, expected_cohort=expected,
                              max_cohort=slots)
  present = jnp.asarray([1.0] * num_in + [0.0] * (slots - num_in))
  rnd = aggregators.RoundInfo(t=jnp.int32(3), client_rng=jax.random.key(5),
                              cohort=jnp.arange(slots, dtype=jnp.int32), in_cohort=present,
                              num_in=jnp.sum(present))
  shared = chain.broadcast(chain.init(), rnd, {})
  zeros = {"w": jnp.zeros((slots, d))}
  sent, stats = jax.vmap(lambda m, s, p: chain.site(
      m, aggregators.SiteInfo(site=s, weight=1.0 / slots, present=p), shared))(
          zeros, jnp.arange(slots), present)
  sent = jax.tree.map(lambda a: a * present.reshape(-1, 1), sent)  # absent slots send nothing
  total = jax.tree.map(lambda a: jnp.sum(a, axis=0), sent)
  out, _, _ = chain.server(total, chain.init(), rnd, shared, stats)
  var = float(np.var(np.asarray(out["w"])))
  want = slots * (z * clip_norm / expected) ** 2
  lo, hi = (scipy_stats.chi2.ppf(q, d) / d for q in (1e-4, 1 - 1e-4))
  assert lo * want < var < hi * want, (var, want)
