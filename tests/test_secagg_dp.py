"""Secure aggregation under DP (issue 23 items 3, 6, 9): the quantization's delta term against
independent computations (a brute-force lattice sum, a Monte Carlo of the rounding, a hand
computation with dp-accounting), and that nothing observable depends on the realised cohort."""

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
                     "secagg.enabled": True})
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
