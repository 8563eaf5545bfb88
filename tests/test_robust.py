"""Robust reducers, pre-aggregation and Byzantine attacks against NumPy oracles, and the
reduce seam of the vmapped round against a NumPy per-site loop."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_experiment import set_keys
from test_round import _mlp, _numpy_sgd_step, _problem, _to_numpy

from fedjax_lab import aggregators, robust
from fedjax_lab.algorithms import fedavg
from fedjax_lab.attacks import byzantine
from fedjax_lab.client import ClientConfig, make_client_update
from fedjax_lab.config import default_config, validate
from fedjax_lab.data.federated import from_partition
from fedjax_lab.errors import ConfigError


def _updates(seed=0, n=9, d=7, invalid=(4,)):
  rng = np.random.RandomState(seed)
  x = rng.randn(n, d).astype(np.float32)
  x[0] += 20.0  # an outlier
  valid = np.ones(n, np.float32)
  valid[list(invalid)] = 0.0
  return x, valid


def _rows(x, valid):
  return x[valid > 0].astype(np.float64)


# --- NumPy oracles, written from the papers' definitions ---------------------------------

def np_trimmed(x, b):
  s = np.sort(x, axis=0)
  return s[b:len(x) - b].mean(0)


def np_krum_scores(x, f):
  m = len(x)
  scores = []
  for i in range(m):
    d = sorted(float(np.sum((x[i] - x[j]) ** 2)) for j in range(m) if j != i)
    scores.append(sum(d[:max(m - f - 2, 1)]))
  return np.array(scores)


def np_multi_krum(x, f, q):
  order = np.argsort(np_krum_scores(x, f), kind="stable")
  return x[order[:q]].mean(0)


def np_weiszfeld(x, iters, nu=1e-6):
  z = x.mean(0)
  for _ in range(iters):
    beta = np.array([1.0 / max(nu, np.linalg.norm(z - xi)) for xi in x])
    z = (beta[:, None] * x).sum(0) / beta.sum()
  return z


def np_centered_clip(x, center, tau, iters):
  v = center.copy()
  for _ in range(iters):
    acc = np.zeros_like(v)
    for xi in x:
      diff = xi - v
      acc += diff * min(1.0, tau / np.linalg.norm(diff))
    v = v + acc / len(x)
  return v


def np_nnm(x, f):
  out = []
  for xi in x:
    d = np.array([np.sum((xi - xj) ** 2) for xj in x])
    out.append(x[np.argsort(d, kind="stable")[:len(x) - f]].mean(0))
  return np.array(out)


def test_median_and_trimmed_mean_skip_invalid_rows():
  x, valid = _updates()
  np.testing.assert_allclose(robust.coordinate_median(jnp.asarray(x), jnp.asarray(valid)),
                             np.median(_rows(x, valid), axis=0), rtol=1e-6, atol=1e-6)
  for b in (0, 1, 2, 3):
    np.testing.assert_allclose(robust.trimmed_mean(jnp.asarray(x), jnp.asarray(valid), b),
                               np_trimmed(_rows(x, valid), b), rtol=1e-5, atol=1e-6)
  # an odd count of valid rows, and the cut limited to (m - 1) // 2 when 2 b >= m
  x3, v3 = _updates(1, n=4, invalid=(1,))
  np.testing.assert_allclose(robust.coordinate_median(jnp.asarray(x3), jnp.asarray(v3)),
                             np.median(_rows(x3, v3), axis=0), rtol=1e-6)
  np.testing.assert_allclose(robust.trimmed_mean(jnp.asarray(x3), jnp.asarray(v3), 5),
                             np.median(_rows(x3, v3), axis=0), rtol=1e-6)


def _tied_columns(rng, n, d):
  """Few distinct values (ties in every column), some +-inf, a few NaN of either sign."""
  x = rng.randint(-3, 4, size=(n, d)).astype(np.float32) * 0.5 + 0.25
  x[rng.rand(n, d) < 0.05] = np.inf
  x[rng.rand(n, d) < 0.05] = -np.inf
  x[rng.rand(n, d) < 0.02] = np.nan
  x[rng.rand(n, d) < 0.02] = -np.nan
  return x


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 10, 31, 64, 100, 129])
def test_network_sort_matches_numpy_sort(n):
  rng = np.random.RandomState(n)
  for x in (rng.randn(n, 150).astype(np.float32), _tied_columns(rng, n, 70)):
    got = np.asarray(jax.jit(robust.network_sort)(jnp.asarray(x)))
    want = np.sort(x, axis=0)  # NaNs last, as jnp.sort
    np.testing.assert_array_equal(got, want)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    # bit for bit outside NaNs (np.sort keeps each NaN's sign bit; the network makes them +NaN)
    assert np.array_equal(got.view(np.int32)[~nan], want.view(np.int32)[~nan])
    assert not np.signbit(got[nan]).any()


def test_network_sort_orders_signed_zeros():
  x = np.array([[0.0, -0.0], [-0.0, 0.0], [-1.0, 1.0]], np.float32)
  got = np.asarray(robust.network_sort(jnp.asarray(x)))
  np.testing.assert_array_equal(got, [[-1.0, -0.0], [-0.0, 0.0], [0.0, 1.0]])
  np.testing.assert_array_equal(np.signbit(got), [[True, True], [True, False], [False, False]])


@pytest.mark.parametrize("n,invalid", [(100, ()), (100, (0, 7, 99)), (10, (3,)), (11, ())])
def test_median_and_trimmed_mean_on_many_sites_with_ties(n, invalid):
  """The CPU path (network_sort) against the definition on NumPy's sort, with many tied
  values, +inf rows and invalid rows, at the round's shapes."""
  rng = np.random.RandomState(n + len(invalid))
  x = rng.randint(-4, 5, size=(n, 300)).astype(np.float32) * 0.125
  x[rng.rand(n, 300) < 0.02] = np.inf
  valid = np.ones(n, np.float32)
  valid[list(invalid)] = 0.0
  s = np.sort(x[valid > 0], axis=0)
  m = len(s)
  want = np.float32(0.5) * (s[(m - 1) // 2] + s[m // 2])
  got = robust.coordinate_median(jnp.asarray(x), jnp.asarray(valid))
  np.testing.assert_array_equal(np.asarray(got), want)
  fin = x[valid > 0]
  fin = np.sort(np.where(np.isinf(fin), np.float32(7.0), fin), axis=0)
  xf = np.where(np.isinf(x), np.float32(7.0), x)
  for b in (0, 3):
    np.testing.assert_allclose(robust.trimmed_mean(jnp.asarray(xf), jnp.asarray(valid), b),
                               fin[b:m - b].astype(np.float64).mean(0), rtol=1e-6)


@pytest.mark.parametrize("f", [1, 2])
def test_krum_and_multi_krum(f):
  x, valid = _updates(2)
  rows = _rows(x, valid)
  got_scores = np.asarray(robust.krum_scores(jnp.asarray(x), jnp.asarray(valid), f))
  np.testing.assert_allclose(got_scores[valid > 0], np_krum_scores(rows, f), rtol=1e-4)
  assert np.all(np.isinf(got_scores[valid == 0]))
  np.testing.assert_allclose(robust.multi_krum(jnp.asarray(x), jnp.asarray(valid), f, 1),
                             np_multi_krum(rows, f, 1), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(robust.multi_krum(jnp.asarray(x), jnp.asarray(valid), f),
                             np_multi_krum(rows, f, len(rows) - f), rtol=1e-5, atol=1e-6)


def test_geometric_median_and_centered_clipping():
  x, valid = _updates(3)
  rows = _rows(x, valid)
  np.testing.assert_allclose(robust.geometric_median(jnp.asarray(x), jnp.asarray(valid), 12),
                             np_weiszfeld(rows, 12), rtol=1e-4, atol=1e-5)
  center = np.random.RandomState(4).randn(x.shape[1]).astype(np.float32)
  for tau, iters in ((0.5, 1), (2.0, 3)):
    np.testing.assert_allclose(
        robust.centered_clipping(jnp.asarray(x), jnp.asarray(valid), jnp.asarray(center), tau,
                                 iters),
        np_centered_clip(rows, center.astype(np.float64), tau, iters), rtol=1e-5, atol=1e-6)


def test_nearest_neighbor_mixing():
  x, valid = _updates(5)
  got = np.asarray(robust.nearest_neighbor_mixing(jnp.asarray(x), jnp.asarray(valid), 2))
  np.testing.assert_allclose(got[valid > 0], np_nnm(_rows(x, valid), 2), rtol=1e-5, atol=1e-6)


def test_bucketing_partitions_the_valid_updates():
  """Rows e_i (i + 1): a bucket's mean names its members, so the buckets must partition the
  valid rows into groups of at most s, each bucket their plain mean."""
  n, s = 9, 2
  x = np.diag(np.arange(1, n + 1)).astype(np.float32)
  valid = np.ones(n, np.float32)
  valid[[3, 7]] = 0
  means, counts, bvalid = robust.bucketing(jnp.asarray(x), jnp.ones(n), jnp.asarray(valid),
                                           jax.random.key(0), s)
  means, counts, bvalid = map(np.asarray, (means, counts, bvalid))
  assert means.shape[0] == -(-n // s)
  seen = []
  for mean, c, v in zip(means, counts, bvalid):
    members = np.nonzero(mean)[0]
    assert len(members) == c <= s and v == (c > 0)
    for i in members:
      np.testing.assert_allclose(mean[i], (i + 1) / c, rtol=1e-6)
    seen += list(members)
  assert sorted(seen) == [i for i in range(n) if valid[i]]


def test_attacks_match_their_formulas():
  x, valid = _updates(6, invalid=())
  f = 2
  honest = x[f:].astype(np.float64)
  mu, sigma = honest.mean(0), honest.std(0)
  want = {"sign_flip": -mu, "ipm": -0.1 * mu, "alie": mu - 1.5 * sigma}
  for name, row in want.items():
    agg = byzantine.attacked(name, f)  # the weighted mean of the poisoned rows
    w = np.full(len(x), 1.0 / len(x), np.float32)
    got = agg.reduce(jnp.asarray(x), jnp.asarray(w), jnp.asarray(valid), {}, None, {})
    np.testing.assert_allclose(got, (f * row + honest.sum(0)) / len(x), rtol=1e-5, atol=1e-6)
  scaled = byzantine.attacked("scaled", f, scale=3.0)
  got = scaled.reduce(jnp.asarray(x), jnp.ones(len(x)) / len(x), jnp.asarray(valid), {}, None,
                      {})
  np.testing.assert_allclose(got, (3.0 * x[:f].sum(0) + honest.sum(0)) / len(x), rtol=1e-5)


def test_optimised_alie_picks_the_most_damaging_scale_against_the_median():
  x, valid = _updates(7, invalid=())
  f = 3
  honest = x[f:].astype(np.float64)
  mu, sigma = honest.mean(0), honest.std(0)
  best, damage = None, -1.0
  for s in byzantine.GRID:
    agg = np.median(np.vstack([np.repeat((mu - s * sigma)[None], f, 0), honest]), axis=0)
    if np.linalg.norm(agg - mu) > damage + 1e-9:
      best, damage = agg, np.linalg.norm(agg - mu)
  target = robust.reducer("median", f)
  got = byzantine.attacked("opt_alie", f, aggregators.chain(target)).reduce(
      jnp.asarray(x), jnp.ones(len(x)), jnp.asarray(valid), {}, None, {})
  np.testing.assert_allclose(got, best, rtol=1e-5, atol=1e-6)


def _site_deltas(x, y, sites, params, steps, batch, lr, flipped=(), classes=3):
  """Each site's update by the NumPy loop; sites in `flipped` train on y -> classes - 1 - y."""
  glob = _to_numpy(params)
  deltas = []
  for k, rows in enumerate(sites):
    labels = classes - 1 - y if k in flipped else y
    p = [a.copy() for a in glob]
    for t in range(steps):
      pos = [(t * batch + j) % len(rows) for j in range(batch)]
      p, _ = _numpy_sgd_step(p, x[rows[pos]].astype(np.float64), labels[rows[pos]], lr)
    deltas.append([a - g for a, g in zip(p, glob)])
  return glob, deltas


@pytest.mark.parametrize("sites_per_chunk", [0, 2])
def test_round_with_median_and_label_flip_equals_numpy(sites_per_chunk):
  x, y, sites = _problem()
  data = from_partition(x, y, sites, 3)
  model = _mlp()
  params, ms = model.init(jax.random.key(0), x[:2])
  steps, batch, lr = 3, 5, 0.3
  cu = make_client_update(model, optax.with_extra_args_support(optax.sgd(lr)),
                          ClientConfig(steps, batch, shuffle=False, prox_mu=0.0))
  agg = byzantine.attacked("label_flip", 2, aggregators.chain(robust.reducer("median", 2)))
  round_fn = jax.jit(fedavg.make_round(cu, optax.sgd(1.0), cohort_size=5, aggregator=agg,
                                       sites_per_chunk=sites_per_chunk, byzantine_sites=2,
                                       flip_labels=True))
  state = fedavg.init_server_state(params, ms, optax.sgd(1.0), 5, False, aggregator=agg)
  key = jax.random.key(1)
  state, _ = round_fn(state, data, key, key)
  glob, deltas = _site_deltas(x, y, sites, params, steps, batch, lr, flipped=(0, 1))
  for i, (got, g) in enumerate(zip(_to_numpy(state.params), glob)):
    want = g + np.median(np.stack([d[i] for d in deltas]), axis=0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_stacked_mean_matches_the_sum_path():
  x, y, sites = _problem()
  data = from_partition(x, y, sites, 3)
  model = _mlp()
  params, ms = model.init(jax.random.key(0), x[:2])
  cu = make_client_update(model, optax.with_extra_args_support(optax.sgd(0.3)),
                          ClientConfig(3, 5, shuffle=True, prox_mu=0.0))
  out = []
  for agg in (None, aggregators.chain(robust.reducer("mean"))):
    round_fn = jax.jit(fedavg.make_round(cu, optax.sgd(1.0), cohort_size=4, aggregator=agg))
    state = fedavg.init_server_state(params, ms, optax.sgd(1.0), 5, False)
    for _ in range(2):
      state, _ = round_fn(state, data, jax.random.key(2), jax.random.key(3))
    out.append(state.params)
  for a, b in zip(jax.tree.leaves(out[0]), jax.tree.leaves(out[1])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def _config(**overrides):
  c = default_config()
  c.rounds, c.cohort_size = 2, 10
  c.data.num_sites = 10
  return set_keys(c, overrides)


@pytest.mark.parametrize("overrides,key", [
    ({"aggregator.robust": "medoid"}, "aggregator.robust"),
    ({"aggregator.pre": "mix"}, "aggregator.pre"),
    ({"aggregator.robust": "median", "aggregator.f": 5}, "aggregator.f"),
    ({"aggregator.robust": "krum", "aggregator.f": 4}, "aggregator.f"),
    ({"aggregator.robust": "median", "secagg.enabled": True}, "secagg.enabled"),
    ({"aggregator.robust": "median", "dp.level": "site", "dp.noise_multiplier": 1.0},
     "dp.level"),
    ({"aggregator.robust": "median", "algorithm.name": "dsgd"}, "aggregator.robust"),
    ({"attack.name": "alie"}, "attack.num_sites"),
    ({"attack.name": "alie", "attack.num_sites": 2, "algorithm.name": "scaffold"},
     "attack.name"),
    ({"attack.name": "alie", "attack.num_sites": 2, "secagg.enabled": True}, "attack.name"),
    ({"attack.name": "hijack", "attack.num_sites": 2}, "attack.name"),
])
def test_config_refuses_what_does_not_compose(overrides, key):
  with pytest.raises(ConfigError) as e:
    validate(_config(**overrides))
  assert e.value.key == key and "\n" not in str(e.value)


def test_config_accepts_robust_with_example_dp():
  validate(_config(**{"aggregator.robust": "trimmed_mean", "aggregator.f": 2,
                      "dp.level": "example", "dp.noise_multiplier": 1.0,
                      "attack.name": "opt_ipm", "attack.num_sites": 2}))


def test_scaffold_reduces_dy_by_the_chain_and_sums_the_controls():
  """f_i = x^2/2 - b_i x, b = (1, 2, 10); x = c = 0; one local step of 0.5, uniform weights.
  dy_i = 0.5 b_i = (0.5, 1, 5): the median moves x to 1 (the mean would give 13/6);
  dc_i = -dy_i / 0.5 = -b_i, summed with q_i = 1/3: c = -13/3 (never reduced robustly)."""
  from test_algorithms import _scalar_quadratics
  from fedjax_lab.algorithms import scaffold
  data, site_gradient = _scalar_quadratics(np.ones(3), np.array([1.0, 2.0, 10.0]))
  agg = aggregators.chain(robust.reducer("median"))
  round_fn = jax.jit(scaffold.make_round(site_gradient, optax.sgd(1.0), cohort_size=3,
                                         local_steps=1, lr=0.5, weighting="uniform",
                                         aggregator=agg))
  state = scaffold.init_state({"w": jnp.zeros(())}, {}, optax.sgd(1.0), 3, agg)
  state, _ = round_fn(state, data, jax.random.key(0), jax.random.key(0))
  np.testing.assert_allclose(float(state.params["w"]), 1.0, rtol=1e-6)
  np.testing.assert_allclose(float(state.control["w"]), -13.0 / 3, rtol=1e-6)


def test_flower_server_aggregates_through_the_chain():
  """The Flower server's aggregate: the example-weighted mean by default, the coordinate-wise
  median with aggregator.robust=median (NumPy on the same deltas)."""
  pytest.importorskip("flwr")
  from fedjax_lab.experiment import Experiment
  from fedjax_lab.flower import task
  rng = np.random.RandomState(0)
  for robust_name in ("none", "median"):
    c = _config(**{"cohort_size": 3, "data.num_sites": 3, "aggregator.robust": robust_name,
                   "aggregator.f": 1})
    c.log.progress = c.log.tensorboard = False
    server = task.Server(Experiment(c))
    like = task.leaves(server.params)
    deltas = [[rng.randn(*a.shape).astype(np.float32) for a in like] for _ in range(3)]
    counts = [5, 10, 20]
    got = task.leaves(server.aggregate(deltas, counts))
    w = np.asarray(counts, np.float64) / sum(counts)
    for i, g in enumerate(got):
      stack = np.stack([d[i] for d in deltas]).astype(np.float64)
      want = (np.tensordot(w, stack, axes=1) if robust_name == "none"
              else np.median(stack, axis=0))
      np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("adaptive", [False, True])
def test_recorder_replays_the_site_dp_chain(tmp_path, adaptive):
  """Site-level DP, coordinated noise (the server adds nothing to a non-empty round): the
  recorded updates of round 2's cohort, summed and divided by cohort_size, are the change of
  the global model (server SGD lr 1), also under adaptive clipping's C_t."""
  from fedjax_lab.attacks import record
  from fedjax_lab.experiment import Experiment
  c = _config(**{"rounds": 2, "cohort_size": 6, "data.num_sites": 12, "dp.level": "site",
                 "dp.noise": "coordinated", "dp.noise_multiplier": 1.0, "dp.clip_norm": 0.05,
                 "dp.adaptive_clip": adaptive, "dp.count_noise_multiplier": 1.0,
                 "dp.randomness": "seeded", "model.hidden": (16,),
                 "attack.record_sites": (-1,), "attack.record_rounds": (2,)})
  c.log.progress = c.log.tensorboard = False
  exp = Experiment(c)
  exp.run(str(tmp_path))
  recs = [record.load(p) for p in record.list_records(str(tmp_path))]
  assert recs
  after1 = Experiment(c).run_rounds(Experiment(c).init_state(), 1)
  moved = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), exp.final_state.params,
                       after1.params)
  total = jax.tree.map(lambda *a: sum(np.asarray(x, np.float64) for x in a) / 6,
                       *[r["delta"] for r in recs])
  for a, b in zip(jax.tree.leaves(moved), jax.tree.leaves(total)):
    np.testing.assert_allclose(a, b, atol=2e-6)
