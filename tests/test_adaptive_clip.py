"""Adaptive clipping (Andrew et al. 2021) in site-level DP-FedAvg, against independent
references: a NumPy loop of the clip update, np.quantile, a NumPy per-site loop of the round,
dp-accounting called directly with z, the closed form of z_update, empirical noise stds.
"""

import json
import math

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dp_accounting import rdp

from fedjax_lab.algorithms import fedavg
from fedjax_lab.config import validate
from fedjax_lab.errors import ConfigError
from fedjax_lab.experiment import Experiment
from fedjax_lab.privacy import adaptive_clipping
from fedjax_lab.privacy.sampling import max_sample_size, poisson_sample
from test_dp_round import _clip, _moved, _numpy_example_grads, _round_with
from test_experiment import assert_exits_2_with_one_line, crash_during_step, tiny_config
from test_round import _to_numpy


def _numpy_next_clip(clip, norms, in_cohort, noise, expected, quantile, lr):
  """Andrew et al. Alg. 1 (geometric), one site at a time, bits centred as b_k - 1/2."""
  centred = 0.0
  for norm, member in zip(norms, in_cohort):
    if member:
      centred += (1.0 if norm <= clip else 0.0) - 0.5
  frac = min(1.0, max(0.0, (centred + noise) / expected + 0.5))
  return clip * math.exp(-lr * (frac - quantile))


def _z_update(z, sigma_b):
  return 1.0 / math.sqrt(1.0 / z ** 2 - 1.0 / (2.0 * sigma_b) ** 2)


def _adaptive(**overrides):
  """tiny_config under site DP with adaptive clipping; sigma_b > z / 2 given explicitly
  (the default cohort_size / 20 = 0.25 is too small for z = 0.8)."""
  c = {"dp.level": "site", "dp.noise_multiplier": 0.8, "dp.adaptive_clip": True,
       "dp.count_noise_multiplier": 2.0, "dp.clip_norm": 0.05, "cohort_size": 10}
  c.update(overrides)
  return tiny_config(**c)


def test_next_clip_norm_equals_numpy_loop():
  rng = np.random.RandomState(0)
  step = jax.jit(adaptive_clipping.next_clip_norm)
  for trial in range(20):
    k = rng.randint(1, 12)
    norms = rng.lognormal(0.0, 1.0, k).astype(np.float32)
    in_cohort = (rng.rand(k) < 0.8).astype(np.float32)
    clip = float(np.float32(rng.lognormal()))
    if trial % 4 == 0:
      norms[0] = clip  # a norm exactly at the clip norm counts as below it
    noise = rng.randn() * (30.0 if trial % 5 == 0 else 1.0)  # large noise hits the clamp
    expected, quantile, lr = float(rng.randint(1, 10)), rng.uniform(0.05, 0.95), rng.uniform(
        0.01, 1.0)
    got = step(jnp.float32(clip), norms, in_cohort, jnp.float32(noise), expected, quantile, lr)
    want = _numpy_next_clip(clip, norms, in_cohort, np.float32(noise), expected, quantile, lr)
    np.testing.assert_allclose(float(got), want, rtol=2e-6)


@pytest.mark.parametrize("quantile,initial", [(0.2, 0.01), (0.5, 20.0), (0.8, 1.0)])
def test_clip_norm_converges_to_the_target_quantile(quantile, initial):
  # 100 sites whose update norms are fixed, count noise of the paper's std m/20.
  norms = np.linspace(0.1, 2.0, 100).astype(np.float32)
  sites, sigma_b, lr = len(norms), len(norms) / 20, 0.2
  ones = jnp.ones(sites)

  def body(clip, key):
    noise = sigma_b * jax.random.normal(key)
    clip = adaptive_clipping.next_clip_norm(clip, norms, ones, noise, sites, quantile, lr)
    return clip, clip

  _, clips = jax.jit(lambda keys: jax.lax.scan(body, jnp.float32(initial), keys))(
      jax.random.split(jax.random.key(0), 3000))
  tail = np.asarray(clips)[1000:]
  settled = np.exp(np.log(tail).mean())
  assert settled == pytest.approx(np.quantile(norms, quantile), rel=0.03)
  assert abs((norms <= settled).mean() - quantile) < 0.03


def test_round_clips_to_the_state_clip_norm_and_updates_it_from_the_site_norms():
  # No noise at all (allowed in the round function, refused by the config): exact reference.
  site_dp = fedavg.SiteDP(clip_norm=99.0, noise_multiplier=0.0, coordinated=False,
                          max_cohort=max_sample_size(4, 8),
                          adaptive=fedavg.AdaptiveClip(0.3, 0.5, 0.0))
  x, y, params, _, _, _ = _round_with(site_dp)
  p = _to_numpy(params)
  deltas = []
  for s in range(8):
    rows = np.arange(s * 5, s * 5 + 5)
    g = _numpy_example_grads(p, x[rows].astype(np.float64), y[rows])
    deltas.append([-sum(gi[i] for gi in g) / 5 for i in range(4)])  # one SGD step, lr 1
  norms = np.array([np.sqrt(sum((a ** 2).sum() for a in d)) for d in deltas])
  clip = float(np.float32(np.median(norms)))  # some sites fit, some are clipped
  *_, state, round_fn, data = _round_with(site_dp, clip=clip)
  key = jax.random.key(9)
  new, metrics = round_fn(state, data, key, key)
  cohort, mask, _ = poisson_sample(jax.random.fold_in(key, 0), 8, 4 / 8, 8, site_dp.max_cohort)
  chosen = np.asarray(cohort)[np.asarray(mask) > 0]
  assert 0 < (norms[chosen] <= clip).sum() < len(chosen)
  total = [np.zeros_like(a) for a in p]
  for s in chosen:
    total = [t + d for t, d in zip(total, _clip(deltas[s], clip))]
  for a, b in zip(_to_numpy(new.params), [a + t / 4 for a, t in zip(p, total)]):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  assert float(metrics.clip_norm) == clip
  want = _numpy_next_clip(clip, norms[chosen], np.ones(len(chosen)), 0.0, 4, 0.3, 0.5)
  np.testing.assert_allclose(float(new.aggregator_state), want, rtol=1e-5)


@pytest.mark.parametrize("calibrated", [False, True])
def test_accountant_composes_z_and_the_update_gets_z_update(calibrated):
  overrides = ({"dp.noise_multiplier": 0.0, "dp.target_epsilon": 3.0, "rounds": 20}
               if calibrated else {"dp.noise_multiplier": 2.0, "dp.count_noise_multiplier": 1.5})
  c = _adaptive(**overrides)
  exp = Experiment(c)
  z = exp.privacy.noise_multiplier
  sigma_b = c.dp.count_noise_multiplier
  q = c.cohort_size / c.data.num_sites
  for rounds in (1, 5, c.rounds):
    event = dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
        q, dp_accounting.GaussianDpEvent(z)), rounds)
    # 1e-3 of delta pays for truncating the Poisson cohort (test_dp_round.py).
    want = rdp.RdpAccountant().compose(event).get_epsilon(c.dp.delta * (1 - 1e-3))
    assert exp.epsilon(rounds) == pytest.approx(want, rel=1e-9)
  if calibrated:
    assert 3.0 * 0.97 < exp.epsilon(20) <= 3.0
  else:
    assert z == 2.0
  site_dp = exp._site_dp()
  assert site_dp.noise_multiplier == pytest.approx(_z_update(z, sigma_b), rel=1e-12)
  assert site_dp.noise_multiplier > z
  assert site_dp.adaptive.count_stddev == sigma_b and site_dp.clip_norm == c.dp.clip_norm


@pytest.mark.parametrize("coordinated", [False, True])
def test_update_noise_std_is_z_update_times_the_current_clip_norm(coordinated):
  z, sigma_b, clip = 2.0, 1.5, 0.01
  z_update = _z_update(z, sigma_b)
  site_dp = fedavg.SiteDP(clip_norm=1.0, noise_multiplier=z_update, coordinated=coordinated,
                          max_cohort=8, adaptive=fedavg.AdaptiveClip(0.5, 0.2, sigma_b))
  _, _, params, state, round_fn, data = _round_with(site_dp, cohort=8, hidden=2000, clip=clip)
  key = jax.random.key(3)
  new, metrics = round_fn(state, data, key, key)
  n = int(metrics.messages) // 2  # all 8 sites at q = 1
  moved = _moved(new.params, params)
  # n shares of z_update C_t (/ sqrt(n) each if coordinated), divided by the expected 8; the
  # clipped updates (norm <= C_t over ~20k coordinates) are ~1% of that std.
  share = z_update * clip / (np.sqrt(n) if coordinated else 1.0)
  assert abs(moved.std() / (share * np.sqrt(n) / 8) - 1) < 0.03


@pytest.mark.parametrize("coordinated", [False, True])
def test_count_noise_std(coordinated):
  sigma_b = 1.5
  site_dp = fedavg.SiteDP(clip_norm=1.0, noise_multiplier=1.0, coordinated=coordinated,
                          max_cohort=8, adaptive=fedavg.AdaptiveClip(0.5, 0.2, sigma_b))
  cohort = jnp.array([3, 7, 1, 4, 6, 0, 0, 0])
  in_cohort = jnp.array([1, 1, 1, 1, 1, 0, 0, 0], jnp.float32)
  noise = jax.jit(jax.vmap(lambda k: fedavg.count_noise(k, cohort, in_cohort, 5.0, site_dp)))(
      jax.random.split(jax.random.key(0), 20000))
  want = sigma_b * (1.0 if coordinated else np.sqrt(5))
  assert abs(np.std(np.asarray(noise)) / want - 1) < 0.03
  # A site's share depends on its id, not its slot: the same sites in another order.
  perm = jnp.array([6, 1, 3, 7, 4, 0, 0, 0])
  key = jax.random.key(5)
  np.testing.assert_allclose(float(fedavg.count_noise(key, cohort, in_cohort, 5.0, site_dp)),
                             float(fedavg.count_noise(key, perm, in_cohort, 5.0, site_dp)),
                             rtol=1e-6)


def test_crash_then_rerun_resumes_to_the_same_params_and_clip_norm(tmp_path):
  c = _adaptive(rounds=4, **{"eval.every": 100})
  # One Experiment for the three runs, so the round compiles once; every run starts from
  # init_state() and a resumed one from the checkpoint, so C_t can only come from there.
  exp = Experiment(c)
  full = exp.run(str(tmp_path / "full"))
  full_clip = float(exp.final_state.aggregator_state)
  # Dies during round 3; rounds 1-2 are checkpointed at round 2.
  crash_during_step(exp, str(tmp_path / "crashed"), 3)
  resumed = exp.run(str(tmp_path / "crashed"))
  assert resumed["params_sha256"] == full["params_sha256"]
  assert float(exp.final_state.aggregator_state) == full_clip
  assert resumed["privacy"] == full["privacy"]
  rows = {d: [json.loads(l) for l in open(tmp_path / d / "metrics.jsonl")]
          for d in ("full", "crashed")}
  clips = [r["clip_norm"] for r in rows["full"]]
  assert [r["clip_norm"] for r in rows["crashed"]] == clips
  assert clips[0] == pytest.approx(0.05) and len(set(clips)) == 4  # C_0, then it moves
  assert full["privacy"]["final_clip_norm"] == full_clip
  assert full["privacy"]["noise_multiplier"] == 0.8  # what the accountant composed: z
  assert full["privacy"]["update_noise_multiplier"] == pytest.approx(_z_update(0.8, 2.0))


@pytest.mark.parametrize("overrides,key", [
    ({"dp.adaptive_clip": True}, "dp.adaptive_clip"),  # dp.level none
    ({"dp.level": "example", "dp.noise_multiplier": 1.0, "dp.adaptive_clip": True},
     "dp.adaptive_clip"),
    ({"dp.target_quantile": 1.0}, "dp.target_quantile"),
    ({"dp.target_quantile": 0.0}, "dp.target_quantile"),
    ({"dp.clip_lr": 0.0}, "dp.clip_lr"),
    ({"dp.count_noise_multiplier": -1.0}, "dp.count_noise_multiplier"),
    ({"dp.level": "site", "dp.noise_multiplier": 1.0, "dp.adaptive_clip": True,
      "dp.count_noise_multiplier": 0.5}, "dp.count_noise_multiplier"),  # 2 sigma_b = z
    ({"dp.level": "site", "dp.noise_multiplier": 1.0, "dp.adaptive_clip": True},
     "dp.count_noise_multiplier"),  # default cohort_size / 20 = 0.25
])
def test_adaptive_clip_config_errors(overrides, key):
  with pytest.raises(ConfigError) as e:
    validate(tiny_config(**overrides))
  assert e.value.key == key
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("flags,key", [
    ("--config.dp.adaptive_clip=True", "dp.adaptive_clip"),
    # sigma calibrated to epsilon 1 (~3.2) needs sigma_b > 1.6; cohort_size / 20 = 0.5.
    ("--config.dp.level=site --config.dp.target_epsilon=1 --config.dp.adaptive_clip=True",
     "dp.count_noise_multiplier"),
])
def test_bad_adaptive_config_exits_2_with_one_line(flags, key, tmp_path):
  assert_exits_2_with_one_line(flags, key, tmp_path)
