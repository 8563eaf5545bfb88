"""Secure aggregation under DP (issue 23 items 3, 6, 9): the quantization's delta term against
independent computations (a brute-force lattice sum, a Monte Carlo of the rounding, a hand
computation with dp-accounting), that nothing observable depends on the realised cohort, and
(site level) the cohort size's effect through the grid, paid with z_eff: the law K_n of the
rounded sum against an integral, its divergences against the Gaussian's, z_eff and every
guarantee against dp-accounting, an empty round on the grid."""

import itertools
import json
import logging
import math

import dp_accounting
import jax
import numpy as np
import pytest
from scipy.stats import norm
from test_experiment import tiny_config

from fedjax_lab import secagg
from fedjax_lab.errors import ConfigError
from fedjax_lab.experiment import Experiment
from fedjax_lab.privacy import guarantees, secagg_delta
from fedjax_lab.privacy.plan import privacy_plan


def _lattice_theta(n, tau, box=6):
  """sum over nonzero v in P(Z^n) of exp(-2 pi^2 tau^2 |v|^2), v = z - mean(z), enumerated."""
  seen = set()
  total = 0.0
  for z in itertools.product(range(-box, box + 1), repeat=n):
    v = np.asarray(z, float) - np.mean(z)
    key = tuple(np.round(v, 9))
    if key in seen or not np.any(np.abs(v) > 1e-12):
      continue
    seen.add(key)
    total += math.exp(-2 * math.pi ** 2 * tau ** 2 * float(v @ v))
  return total


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("tau", [0.4, 0.7, 1.0])
def test_theta_bar_bounds_the_lattice_sum(n, tau):
  exact = _lattice_theta(n, tau, box=6 if n < 4 else 4)
  series = sum(math.exp(-math.pi ** 2 * tau ** 2 * m * m) for m in range(-50, 51)) ** n - 1
  assert exact <= series <= secagg_delta.theta_bar(n, tau)
  assert secagg_delta.theta_bar(n, tau) <= 3 * series  # the closed form is not vacuous


def test_rounded_sum_of_two_is_within_theta_bar_of_the_ideal():
  """n = 2, grid step 1: the law of R(x1 + Z1) + R(x2 + Z2) vs the ideal post-processing of
  S = x1 + x2 + Z1 + Z2 (Y = S/2 (1, 1) + w (1, -1), w uniform mod 1, then rounded). At
  tau = 0.25 the difference is visible; it stays below theta_bar, and at tau = 1 vanishes."""
  rng = np.random.default_rng(0)
  N = 2_000_000
  x = np.array([0.3, -0.1])

  def rounded(y):
    return np.floor(y + rng.random(y.shape))

  def tv(tau):
    z = rng.normal(0, tau, (N, 2))
    real = rounded(x + z).sum(1)
    s = x.sum() + rng.normal(0, tau * math.sqrt(2), N)
    w = rng.random(N)
    ideal = rounded(np.stack([s / 2 + w, s / 2 - w], 1)).sum(1)
    lo = int(min(real.min(), ideal.min()))
    bins = np.arange(lo, int(max(real.max(), ideal.max())) + 2) - 0.5
    p, q = np.histogram(real, bins)[0] / N, np.histogram(ideal, bins)[0] / N
    return 0.5 * np.abs(p - q).sum(), math.sqrt(len(bins) / N)

  visible, noise = tv(0.25)
  assert 5 * noise < visible <= secagg_delta.theta_bar(2, 0.25)
  smaller, noise = tv(0.45)
  assert smaller <= secagg_delta.theta_bar(2, 0.45) + 5 * noise
  gone, noise = tv(1.0)
  assert gone < 5 * noise and secagg_delta.theta_bar(2, 1.0) < 1e-3


def _secure_digits(**overrides):
  from configs import dopamine_digits
  c = dopamine_digits.get_config("secure")
  for k, v in overrides.items():
    node, *path = k.split(".")
    target = c
    for p in [node] + path[:-1]:
      target = target[p]
    target[path[-1]] = v
  return c


def test_delta_gate_matches_a_hand_computation():
  """configs/dopamine_digits.py:secure: eta from first principles (series theta, the union
  bound for clipping, dp-accounting's epsilon), the split, and the gate's verdict at 32 and
  fewer bits."""
  counts = np.full(10, 150)
  d = 64 * 128 + 128 + 128 * 10 + 10
  for bits, refused in ((32, False), (14, False), (12, True)):
    c = _secure_digits(**{"secagg.bits": bits})
    plan = privacy_plan(c, counts)
    assert plan.accountant.delta == pytest.approx(c.dp.delta * (1 - 2e-3))
    K, B, lr, C = c.cohort_size, c.client.batch_size, c.client.lr, c.dp.clip_norm
    levels = 2 * ((2 ** bits - 1) // (2 * K))
    h = 2 * c.secagg.clip_range / levels
    s = lr * plan.noise_multiplier / math.sqrt(K) * C / B / K
    tau = s / h
    tail = sum(math.exp(-math.pi ** 2 * tau ** 2 * m * m) for m in range(1, 201))
    theta = math.expm1(K * math.log1p(2 * tail))  # (sum over Z)^K - 1 without cancellation
    bound = lr * plan.slots * C / B / K
    clip = min(1.0, 2 * K * d * norm.sf((c.secagg.clip_range - bound) / s))
    eta = min(1.0, c.rounds * (d * theta + clip))
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(
        plan.sampling_prob, dp_accounting.GaussianDpEvent(plan.noise_multiplier)), c.rounds)
    eps = acc.get_epsilon(c.dp.delta * (1 - 2e-3))
    cost = (1 + math.exp(eps)) * eta
    t = secagg_delta.terms(c, plan, d, counts)
    assert t.eta >= eta and t.eta == pytest.approx(eta, rel=1e-3, abs=1e-300)
    if refused:
      assert cost > 1e-3 * c.dp.delta
      with pytest.raises(ConfigError) as e:
        secagg_delta.gate(c, plan, d, counts)
      assert e.value.key == "secagg.bits"
    else:
      assert cost <= 1e-3 * c.dp.delta
      assert secagg_delta.gate(c, plan, d, counts).eta == t.eta


def test_secagg_tv_is_paid_in_every_guarantee():
  """amplified_epsilon with secagg_tv: the smallest eps with eps >= dp-accounting's epsilon at
  delta - (1 + e^eps) (overflow + tv)."""
  m = guarantees.Mechanism(level="site", noise="coordinated", noise_multiplier=1.0,
                           sampling_prob=0.1, steps=100, accountant_delta=1e-5 * 0.998,
                           delta=1e-5, overflow_bound=1e-10, accountant="rdp", cohort_size=10,
                           max_cohort=25, randomness="secret", secure_aggregation=True,
                           noise_shares=10, secagg_tv=2e-10)
  eps = guarantees.amplified_epsilon(m, 1.0)
  acc = dp_accounting.rdp.RdpAccountant()
  acc.compose(dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.0)), 100)
  assert eps >= acc.get_epsilon(1e-5 - (1 + math.exp(eps)) * (1e-10 + 2e-10))
  assert eps > guarantees.amplified_epsilon(m._replace(secagg_tv=0.0), 1.0)


@pytest.mark.parametrize("prg", ["host", "device"])
def test_grid_and_compiles_do_not_depend_on_the_realised_cohort(prg, caplog):
  """Padded to 6 slots: the levels are levels_for(6) for every cohort of 0..6 sites, the sum
  is exact on the grid, and after the first cohorts nothing compiles again."""
  slots, d = 6, 40
  rows = jax.random.normal(jax.random.key(0), (slots, d)) * 0.1
  sa = secagg.SecAggConfig(bits=16, clip_range=1.0, prg=prg)
  levels = secagg.levels_for(slots, 16)
  h = 2.0 / levels

  def run(n, i):
    present = np.zeros(slots, bool)
    present[:n] = True
    return secagg.secure_sum(rows, jax.random.key(i), sa, present=present, grid_cohort=slots)

  for n in (1, 2):  # the paths: no protocol (0, 1 site) and the protocol
    run(n, 0)
  jax.config.update("jax_log_compiles", True)
  try:
    with caplog.at_level(logging.WARNING):
      caplog.clear()
      for i, n in enumerate((0, 3, 4, 5, 6, 1, 2, 3)):
        r = run(n, i + 1)
        assert r.levels == levels and not r.aborted
        expected = np.asarray(rows)[:n].sum(0)
        assert np.all(np.abs(np.asarray(r.sum) - expected) <= n * h + 1e-6)
        assert np.allclose(np.asarray(r.sum) / h, np.round(np.asarray(r.sum) / h), atol=1e-3)
      compiles = [m for m in caplog.messages if "Compiling" in m or "compil" in m.lower()]
  finally:
    jax.config.update("jax_log_compiles", False)
  assert compiles == []


def test_site_dp_secure_run_logs_nothing_that_depends_on_the_cohort(tmp_path, caplog):
  """metrics.jsonl under site-level DP with secagg: seconds null (with the start-log line),
  no survivor count nor host time, bytes from the configured cohort; summary total_seconds
  null; the accountant gets dp.delta less the two 1e-3 shares."""
  c = tiny_config(**{"rounds": 3, "dp.level": "site", "dp.noise_multiplier": 1.0,
                     "dp.noise": "coordinated", "secagg.enabled": True})
  with pytest.raises(ConfigError) as e:  # clip_range 1: the noise shares get clipped
    Experiment(c)
  assert e.value.key == "secagg.clip_range"
  c.secagg.clip_range = 20.0
  exp = Experiment(c)
  with caplog.at_level(logging.INFO, logger="fedjax_lab"):
    summary = exp.run(str(tmp_path))
  assert any("seconds are not logged" in m for m in caplog.messages)
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert all(r["seconds"] is None for r in rows)
  assert not any("secagg_survivors" in r or "secagg_host_seconds" in r for r in rows)
  assert len({r["bytes_communicated"] for r in rows}) == 1
  assert summary["total_seconds"] is None
  assert exp.privacy.accountant.delta == pytest.approx(c.dp.delta * (1 - 2e-3))


# --- Site level: the rounded sum's dependence on the cohort size n, paid with z_eff ----------

def _irwin_hall_pdf(m, x):
  """Density at x of the sum of m iid U[-1/2, 1/2] (closed form)."""
  t = x + m / 2
  return sum((-1) ** j * math.comb(m, j) * max(t - j, 0.0) ** (m - 1)
             for j in range(m + 1)) / math.factorial(m - 1)


def _irwin_hall_cdf(m, x):
  t = x + m / 2
  return sum((-1) ** j * math.comb(m, j) * max(t - j, 0.0) ** m
             for j in range(m + 1)) / math.factorial(m)


def _k_n_by_integration(n, s, points):
  """P(K_n = k) for grid step 1: Y uniform on {sum y = s} mod (Z^n ∩ sum-zero), i.e. y_1 ..
  y_{n-1} uniform on [0, 1) and y_n = s - their sum, each stochastically rounded (the exact
  law of a sum of Bernoullis), integrated by the midpoint rule."""
  grid = (np.arange(points) + 0.5) / points
  pmf = {}
  for ys in itertools.product(grid, repeat=n - 1):
    law = {0: 1.0}
    for y in list(ys) + [s - sum(ys)]:
      f = math.floor(y)
      p = y - f
      nxt = {}
      for k, v in law.items():
        nxt[k + f] = nxt.get(k + f, 0.0) + v * (1 - p)
        nxt[k + f + 1] = nxt.get(k + f + 1, 0.0) + v * p
      law = nxt
    for k, v in law.items():
      pmf[k] = pmf.get(k, 0.0) + v / points ** (n - 1)
  return pmf


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("s", [0.3, -1.7, 2.45])
def test_k_n_is_the_sum_rounded_after_box_noise(n, s):
  """secagg_delta's docstring: P(K_n = k) = Lambda^{*n}(k - s) = (box^{*2n})(k - s), which is
  P(round(s + B_n) = k) with B_n ~ box^{*(2n-1)}."""
  pmf = _k_n_by_integration(n, s, {1: 1, 2: 4000, 3: 400}[n])
  assert sum(pmf.values()) == pytest.approx(1.0, abs=1e-9)
  for k in range(math.floor(s) - n - 1, math.ceil(s) + n + 2):
    formula = _irwin_hall_pdf(2 * n, k - s)
    rounded = _irwin_hall_cdf(2 * n - 1, k - s + 0.5) - _irwin_hall_cdf(2 * n - 1, k - s - 0.5)
    assert pmf.get(k, 0.0) == pytest.approx(formula, abs=2e-6), k
    assert rounded == pytest.approx(formula, abs=1e-12), k


def _k_law(mu, sigma, n, ks, dx=1e-3):
  """The pmf on the integers ks of K_n(S), S ~ N(mu, sigma^2), step 1: (N * box^{*2n})(k), by
  numerical convolution."""
  xs = np.arange(-40, 40, dx)
  f = norm.pdf(xs, mu, sigma)
  box = np.ones(int(round(1 / dx)))
  for _ in range(2 * n):
    f = np.convolve(f, box, mode="same") * dx
  return np.interp(ks, xs, f)


def _gaussian_delta(eps, shift):
  """delta(eps) of N(0, 1) vs N(shift, 1) (Balle and Wang 2018, closed form)."""
  return norm.cdf(-eps / shift + shift / 2) - math.exp(eps) * norm.cdf(-eps / shift - shift / 2)


@pytest.mark.parametrize("sigma, x, m", [(1.0, 0.8, 1), (0.6, 0.5, 2), (2.0, 1.5, 3),
                                          (0.5, 0.0, 1)])
def test_the_cohort_size_through_the_grid_is_dominated_by_sensitivity_c_plus_h(sigma, x, m):
  """One coordinate, step 1: without the target K_m(N(0, sigma^2)), with it K_{m+1}(N(x,
  sigma^2)). Their hockey-stick divergences (both directions) stay below the Gaussian's at
  shift (x + 1) / sigma, C + h sqrt(d) with d = 1; at the naive shift x / sigma they do not
  (the grid reveals n)."""
  ks = np.arange(-30, 31)
  p, q = _k_law(0.0, sigma, m, ks), _k_law(x, sigma, m + 1, ks)
  exceeded = False
  for eps in (0.1, 0.5, 1.0, 2.0):
    actual = max(np.maximum(q - math.exp(eps) * p, 0).sum(),
                 np.maximum(p - math.exp(eps) * q, 0).sum())
    assert actual <= _gaussian_delta(eps, (x + 1) / sigma)
    naive = _gaussian_delta(eps, x / sigma) if x > 0 else 0.0
    exceeded |= actual > naive + 1e-4
  assert exceeded


def _site_secure_digits(**overrides):
  from test_privacy_guarantees import _config, _plan
  c = _config("digits_dp", "site", **{"secagg.enabled": True, "dp.noise": "coordinated",
                                      **overrides})
  return c, _plan(c)


def test_z_eff_of_digits_site_matches_a_hand_computation():
  """configs/digits_dp.py:site, coordinated, secagg: the accountant composes z_eff calibrated
  to epsilon 4 (dp-accounting directly), the sites add z_eff (1 + h sqrt(d) / C), C = 0.5 /
  50 and h = 2 clip_range / levels_for(slots, 32), d the MLP's 64*128 + 128 + 128*10 + 10."""
  c, plan = _site_secure_digits()
  d = 64 * 128 + 128 + 128 * 10 + 10
  levels = 2 * ((2 ** 32 - 1) // (2 * plan.slots))
  h = 2 * c.secagg.clip_range / levels
  C = 0.5 / 50
  assert plan.update_noise_multiplier == pytest.approx(
      plan.noise_multiplier * (1 + h * math.sqrt(d) / C), rel=1e-12)
  acc = dp_accounting.rdp.RdpAccountant()
  acc.compose(dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(
      plan.noise_multiplier)), 200)
  eps = acc.get_epsilon(1e-5 * (1 - 2e-3))
  assert 3.99 <= eps <= 4.0
  assert plan.accountant.epsilon_after(200) == pytest.approx(eps, rel=1e-9)


@pytest.mark.parametrize("clip_range, bits", [(20.0, 32), (20.0, 20)])
def test_site_secure_run_reports_every_guarantee_at_z_eff(tmp_path, clip_range, bits):
  """A site-level secagg run with a given noise multiplier z = 1: the summary's noise
  multiplier is z C / (C + h sqrt(d)), by hand from the slots and the model's parameter
  count; every guarantee entry's epsilon is dp-accounting's on its own fields, the server's
  (alone) at z_eff, the others at most z_eff."""
  from test_privacy_guarantees import _recompute
  c = tiny_config(**{"rounds": 2, "dp.level": "site", "dp.noise_multiplier": 1.0,
                     "dp.noise": "coordinated", "secagg.enabled": True,
                     "secagg.clip_range": clip_range, "secagg.bits": bits})
  exp = Experiment(c)
  d = sum(int(np.prod(np.shape(a))) for a in jax.tree.leaves(exp.init_state().params))
  levels = 2 * ((2 ** bits - 1) // (2 * exp.privacy.slots))
  h = 2 * clip_range / levels
  C = c.dp.clip_norm / c.cohort_size
  z_eff = C / (C + h * math.sqrt(d))
  assert exp.privacy.update_noise_multiplier == 1.0
  assert exp.privacy.noise_multiplier == pytest.approx(z_eff, rel=1e-12)
  summary = exp.run(str(tmp_path))
  entries = summary["privacy"]["guarantees"]
  assert summary["privacy"]["noise_multiplier"] == pytest.approx(z_eff, rel=1e-12)
  assert summary["privacy"]["update_noise_multiplier"] == 1.0
  assert entries[0]["noise_multiplier"] == pytest.approx(z_eff, rel=1e-12)
  server = [e for e in entries if e["adversary"].startswith("the server")
            and e["colluding_sites"] == 0]
  assert len(server) == 1 and server[0]["noise_multiplier"] == pytest.approx(z_eff, rel=1e-12)
  for e in entries:
    if e["epsilon"] is None:
      continue
    assert e["noise_multiplier"] <= z_eff * (1 + 1e-12), e["adversary"]
    want = _recompute(e)
    assert want <= e["epsilon"] <= want * (1 + 1e-4), e["adversary"]
  acc = dp_accounting.rdp.RdpAccountant()
  acc.compose(dp_accounting.PoissonSampledDpEvent(
      c.cohort_size / c.data.num_sites, dp_accounting.GaussianDpEvent(z_eff)), 2)
  assert summary["epsilon"] == pytest.approx(acc.get_epsilon(c.dp.delta * (1 - 2e-3)), rel=1e-6)
  if bits == 20:  # a coarse grid: z_eff well below z
    assert z_eff < 0.9


@pytest.mark.parametrize("grid", [None, (4.0, 16)])
def test_an_empty_round_under_secagg_releases_a_value_on_the_grid(grid):
  """No site sampled: the server's noise N(0, (z C)^2) / K is clipped and stochastically
  rounded onto the grid (step 4 x 2 / 16 = 0.5) as one site's row would be; its std is then
  sqrt(1 + h^2 / 6) (rounding a value with a uniform fractional part adds h^2 E[f(1 - f)]).
  Without secure aggregation's grid it stays continuous."""
  from test_dp_round import _moved, _round_with
  from test_privacy_guarantees import _empty_cohort_keys
  from fedjax_lab.algorithms import fedavg
  from fedjax_lab.privacy.sampling import max_sample_size
  sigma, clip, cohort, sites = 1e4, 1e-4, 1, 8
  site_dp = fedavg.SiteDP(clip_norm=clip, noise_multiplier=sigma, coordinated=True,
                          max_cohort=max_sample_size(cohort, sites), grid=grid)
  _, _, params, state, round_fn, data = _round_with(site_dp, cohort, sites, hidden=2000)
  key, = _empty_cohort_keys(site_dp, cohort, sites, 1)
  new, metrics = round_fn(state, data, key, key)
  assert int(metrics.messages) == 0
  moved = _moved(new.params, params).astype(np.float64)
  off = np.abs(moved / 0.5 - np.round(moved / 0.5))
  if grid is None:
    assert np.mean(off > 0.01) > 0.9
    assert abs(moved.std() - 1.0) < 0.03
  else:
    assert off.max() < 1e-4 and np.abs(moved).max() <= 4.0 + 1e-6
    assert abs(moved.std() / math.sqrt(1 + 0.25 / 6) - 1) < 0.03
