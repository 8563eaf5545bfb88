"""The in-run canary audit (fedjax_lab/attacks/canaries.py), each number against an
independent reference: NumPy draws and recomputed cosines, the mu-GDP curve solved here with
SciPy, and tiny runs whose bound must be large (no DP) or within the claim (DP)."""

import jax
import numpy as np
import optax
import pytest
from scipy import optimize, stats
from test_experiment import set_keys

from fedjax_lab.attacks import audit, canaries
from fedjax_lab.errors import ConfigError


def _tiny(**overrides):
  from fedjax_lab.config import default_config
  c = default_config()
  c.data.name, c.data.partition = "digits", "iid"
  c.data.num_sites, c.cohort_size, c.rounds = 200, 20, 20
  c.client.local_steps, c.client.batch_size, c.client.lr = 2, 4, 0.1
  c.model.hidden = (16,)
  c.dp.clip_norm = 0.5
  c.log.progress, c.log.tensorboard = False, False
  c.checkpoint.every = 100
  c.audit.canaries = 400
  return set_keys(c, overrides)


def test_directions_are_normalised_gaussians_drawn_from_the_seed():
  u = canaries.directions(7, 50, 300)
  g = np.random.default_rng(7).standard_normal((50, 300))
  np.testing.assert_allclose(u, g / np.sqrt((g ** 2).sum(1, keepdims=True)), rtol=1e-6)
  assert not np.allclose(u, canaries.directions(8, 50, 300))
  # isotropic: a fixed coordinate of unit vectors has variance 1/d
  many = canaries.directions(0, 4000, 300)
  assert abs(np.var(many[:, 0]) * 300 - 1) < 0.1


def test_inclusion_is_one_half_and_participation_q_per_round():
  key = jax.random.key(3)
  m, q = 20000, 0.1
  inc = np.asarray(canaries.included(key, m))
  assert abs(inc.mean() - 0.5) < 5 * np.sqrt(0.25 / m)
  takes = np.stack([np.asarray(canaries.participates(key, t, m, q)) for t in range(5)])
  assert not takes[:, ~inc].any()  # only included canaries ever take part
  rate = takes[:, inc].mean()
  assert abs(rate - q) < 5 * np.sqrt(q * (1 - q) / takes[:, inc].size)
  assert not np.array_equal(takes[0], takes[1])  # fresh draws every round
  # another sampling key (another seed, or the secret) draws another inclusion
  assert (inc != np.asarray(canaries.included(jax.random.key(4), m))).mean() > 0.4


def test_scores_match_a_numpy_recomputation_from_saved_models():
  from fedjax_lab.experiment import Experiment
  exp = Experiment(_tiny(**{"dp.level": "site", "dp.noise_multiplier": 1.0,
                            "audit.canaries": 50, "rounds": 4}))
  state = exp.init_state()
  scorer = canaries.Scorer(exp.canaries, {}, exp.keys["sampling"])
  models = [np.asarray(jax.flatten_util.ravel_pytree(state.params)[0], np.float64)]
  scorer.observe(state.params)
  for t in range(4):
    state, _ = exp.step(state, exp.data, exp.keys["sampling"], exp.keys["client"])
    models.append(np.asarray(jax.flatten_util.ravel_pytree(state.params)[0], np.float64))
    scorer.observe(state.params, t)
  u = canaries.directions(0, 50, models[0].size).astype(np.float64)
  cos = lambda v: u @ v / np.linalg.norm(v)
  want_all = sum(cos(b - a) for a, b in zip(models, models[1:]))
  s = scorer.scores(models[0])
  np.testing.assert_allclose(s["all_iterates"][0], want_all, atol=2e-5)
  np.testing.assert_allclose(s["final_model"][0], cos(models[-1] - models[0]), atol=2e-5)
  unit_sum = sum((b - a) / np.linalg.norm(b - a) for a, b in zip(models, models[1:]))
  assert s["all_iterates"][1] == pytest.approx(np.linalg.norm(unit_sum) / np.sqrt(u.shape[1]),
                                               rel=1e-5)
  # The likelihood ratio, round by round in NumPy: a canary moves the model by server lr *
  # clip_norm / cohort_size (server sgd), and takes part at q = cohort / sites (Poisson).
  c = exp.config
  signal, q, d = c.server.lr * c.dp.clip_norm / c.cohort_size, 20 / 200, u.shape[1]
  want_lr = np.zeros(50)
  for a, b in zip(models, models[1:]):
    z, at = np.sqrt(d) * cos(b - a), np.sqrt(d) * signal / np.linalg.norm(b - a)
    want_lr += np.log(1 - q + q * np.exp(at * z - at**2 / 2))
  np.testing.assert_allclose(scorer.likelihood_ratio(), want_lr, rtol=1e-4, atol=1e-4)
  assert np.ptp(want_lr) > 0.1  # the rounds' signal is not negligible: the check has teeth


def test_likelihood_ratio_on_synthetic_deltas_skips_unchanged_rounds_and_separates():
  """Deltas built here: Gaussian noise plus, for each included canary in each round it joins
  (NumPy draws), `signal` u_j; one round repeats the model (an aborted round) and adds no
  term. The LR equals a NumPy loop, and separates in from out better than the cosine sum."""
  rng = np.random.default_rng(1)
  m, d, rounds, q, signal = 200, 2000, 60, 0.2, 0.15
  u = canaries.directions(5, m, d)
  inc = rng.random(m) < 0.5
  c = canaries.Canaries(jax.numpy.asarray(u), q, 0.0, m, signal)
  scorer = canaries.Scorer(c, {}, jax.random.key(0))
  w = np.zeros(d)
  models = [w]
  scorer.observe(w.astype(np.float32))
  for t in range(rounds):
    if t == 7:
      models.append(w)
      scorer.observe(w.astype(np.float32), t)
      continue
    joins = inc & (rng.random(m) < q)
    w = w + rng.normal(0, 1 / np.sqrt(d), d) + signal * u[joins].sum(0)
    models.append(w)
    scorer.observe(w.astype(np.float32), t)
  want = np.zeros(m)
  for a, b in zip(models, models[1:]):
    n = np.linalg.norm(b - a)
    if n == 0:
      continue
    z, at = np.sqrt(d) * (u.astype(np.float64) @ (b - a)) / n, np.sqrt(d) * signal / n
    want += np.log(1 - q + q * np.exp(at * z - at**2 / 2))
  got = scorer.likelihood_ratio()
  np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
  assert int(scorer.rounds) == rounds - 1
  sep = lambda s: (s[inc].mean() - s[~inc].mean()) / s[~inc].std()
  assert sep(got) > sep(scorer.scores(np.zeros(d))["all_iterates"][0])


def test_participation_estimate_recovers_the_planted_noise_against_dp_accounting():
  """Deltas built here: N(0, (sigma s)^2 I) noise each round plus s u_j for each included
  canary that takes part (the Scorer's own draws, canaries.participates): a Poisson-sampled
  Gaussian with noise multiplier sigma in each canary's direction. The Scorer's per-round sums
  equal a NumPy loop; the estimate is dp_accounting's PLD epsilon at sigma (called directly),
  which its 95% interval holds."""
  import dp_accounting
  from dp_accounting import pld
  m, d, rounds, q, s, sigma, delta = 400, 4000, 60, 0.2, 0.01, 1.5, 1e-5
  key = jax.random.key(3)
  u = canaries.directions(9, m, d)
  scorer = canaries.Scorer(canaries.Canaries(jax.numpy.asarray(u), q, 0.0, m, None), {}, key)
  rng = np.random.default_rng(2)
  w = np.zeros(d)
  scorer.observe(w.astype(np.float32))
  want = {k: np.zeros(m) for k in ("z_sum", "z_sq", "part_z", "part_z_sq", "part_n")}
  for t in range(rounds):
    joins = np.asarray(canaries.participates(key, t, m, q))
    step = rng.normal(0, sigma * s, d) + s * u[joins].sum(0)
    w32 = (w + step).astype(np.float32)
    z = np.sqrt(d) * (u.astype(np.float64) @ (w32.astype(np.float64) - w)) / np.linalg.norm(
        w32.astype(np.float64) - w)
    w = w32.astype(np.float64)
    scorer.observe(w32, t)
    for k, v in (("z_sum", z), ("z_sq", z * z), ("part_z", joins * z),
                 ("part_z_sq", joins * z * z), ("part_n", joins)):
      want[k] += v
  got = scorer.round_statistics()
  for k, v in want.items():
    np.testing.assert_allclose(got[k], v, rtol=1e-3, atol=2e-3, err_msg=k)
  inc = np.asarray(canaries.included(key, m))
  fit = audit.participation_estimate(got, inc, q, rounds, delta)
  event = dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), rounds)
  truth = pld.PLDAccountant(value_discretization_interval=1e-4).compose(event).get_epsilon(delta)
  assert fit["mu_per_participation"] == pytest.approx(1 / sigma, abs=3 * fit["mu_se"])
  assert fit["interval"][0] <= truth <= fit["interval"][1]
  assert fit["estimate"] == pytest.approx(truth, rel=0.1)
  assert fit["interval"][1] - fit["interval"][0] < 0.5 * truth  # the check has teeth
  # Nothing to measure: said, not raised (the run's summary is still written).
  assert audit.participation_estimate(dict(got, part_n=np.zeros(m)), inc, q, rounds,
                                      delta)["estimate"] is None
  # Participations that moved nothing (their z at the null's mean): no leak estimated.
  none = dict(got, part_z=np.zeros(m), part_z_sq=got["part_n"].copy())
  assert audit.participation_estimate(none, inc, q, rounds, delta)["estimate"] < 0.1 * truth


def test_no_likelihood_ratio_without_a_known_displacement():
  """Server momentum makes a canary's displacement depend on earlier rounds: no LR score,
  and the bound falls back to the sum of cosines."""
  like = {"w": jax.ShapeDtypeStruct((30,), np.float32)}
  plain = canaries.make(_tiny(), None, 200, like)
  assert plain.signal == pytest.approx(1.0 * 0.5 / 20)
  momentum = canaries.make(_tiny(**{"server.optimizer_args": {"momentum": 0.9}}), None, 200,
                           like)
  assert momentum.signal is None
  assert canaries.Scorer(momentum, {}, jax.random.key(0)).likelihood_ratio() is None


def test_resumed_run_continues_the_running_scores_exactly(tmp_path):
  """Killed in round 5 of 6 with checkpoints every 2 rounds, then rerun: the likelihood-ratio,
  cosine and per-participation sums equal an uninterrupted run's (restored from the
  checkpoint's meta)."""
  from fedjax_lab.experiment import Experiment
  from test_experiment import crash_during_step
  c = _tiny(**{"dp.level": "site", "dp.noise": "coordinated", "dp.noise_multiplier": 1.0,
               "rounds": 6, "checkpoint.every": 2, "audit.canaries": 50})
  seen, report = [], canaries.report

  def keep(exp, scorer, w0, *args):
    seen.append((scorer.likelihood_ratio(), np.asarray(scorer.total), int(scorer.rounds),
                 scorer.round_statistics()))
    return report(exp, scorer, w0, *args)

  canaries.report = keep
  try:
    Experiment(c).run(str(tmp_path / "full"))
    crash_during_step(Experiment(c), str(tmp_path / "crashed"), 5)
    Experiment(c).run(str(tmp_path / "crashed"))
  finally:
    canaries.report = report
  (lr_full, total_full, t_full, sums_full), (lr_res, total_res, t_res, sums_res) = seen
  assert t_full == t_res == 6
  np.testing.assert_array_equal(lr_res, lr_full)
  np.testing.assert_array_equal(total_res, total_full)
  for k in ("z_sq", "part_z", "part_z_sq", "part_n"):  # the estimate's per-round sums too
    np.testing.assert_array_equal(sums_res[k], sums_full[k], err_msg=k)
  assert sums_full["part_n"].sum() > 0
  assert np.abs(lr_full).max() > 0


def test_all_iterates_null_is_the_norm_of_the_unit_sum_over_sqrt_d():
  """<u, S> for uniform unit u (NumPy draws) has standard deviation |S| / sqrt(d), whatever
  the correlation of the T unit deltas in S; sqrt(T / d) is right only for orthogonal ones.
  Correlated deltas (a shared drift, as real training gives): |S|^2 / T well above 1."""
  rng = np.random.default_rng(0)
  d, t = 400, 50
  drift = rng.normal(size=d)
  deltas = rng.normal(size=(t, d)) + 0.5 * drift
  units = deltas / np.linalg.norm(deltas, axis=1, keepdims=True)
  total = units.sum(0)
  assert np.linalg.norm(total)**2 / t > 3
  u = rng.normal(size=(20000, d))
  u /= np.linalg.norm(u, axis=1, keepdims=True)
  got = np.std(u @ total)
  assert got == pytest.approx(np.linalg.norm(total) / np.sqrt(d), rel=0.02)
  assert got > 1.5 * np.sqrt(t / d)


def test_estimate_is_mu_gdp_epsilon_of_the_mean_standardised_cosine():
  d, mu, delta = 10000, 1.3, 1e-5
  rng = np.random.default_rng(0)
  cos_in = rng.normal(mu / np.sqrt(d), 1 / np.sqrt(d), 5000)
  got = audit.canary_estimate(cos_in, 1 / np.sqrt(d), delta)
  m = cos_in.mean() * np.sqrt(d)
  # Dong, Roth & Su 2019, Cor. 2.13: delta(eps) of mu-GDP, solved independently here
  gap = lambda e: stats.norm.cdf(-e / m + m / 2) - np.exp(e) * stats.norm.cdf(-e / m - m / 2) - delta
  assert got == pytest.approx(optimize.brentq(gap, 0, 50), rel=1e-6)
  true = optimize.brentq(lambda e: stats.norm.cdf(-e / mu + mu / 2)
                         - np.exp(e) * stats.norm.cdf(-e / mu - mu / 2) - delta, 0, 50)
  assert got == pytest.approx(true, rel=0.05)
  assert audit.canary_estimate(rng.normal(0, 1 / np.sqrt(d), 5000), 1 / np.sqrt(d), delta) < 0.3


def test_no_dp_run_lower_bound_is_clearly_positive(tmp_path):
  from fedjax_lab.experiment import Experiment
  s = Experiment(_tiny()).run(str(tmp_path))
  a = s["audit"]
  assert a["all_iterates"]["claimed"] is None
  assert a["all_iterates"]["lower_bound_95"] > 1.0
  assert a["final_model"]["lower_bound_95"] > 1.0
  assert 150 < a["all_iterates"]["canaries"]["included"] < 250
  # No noise: each participation moves the canary's cosine by many null deviations, and
  # the estimate is past the noise multiplier the PLD is computed for ("at least").
  assert a["all_iterates"]["estimate_fit"]["mu_per_participation"] > 3
  assert a["all_iterates"]["estimate_fit"]["at_least"]


def test_dp_run_lower_bound_stays_within_the_claim(tmp_path):
  from fedjax_lab.experiment import Experiment
  s = Experiment(_tiny(**{"dp.level": "site", "dp.noise": "coordinated",
                          "dp.target_epsilon": 2.0})).run(str(tmp_path))
  a = s["audit"]
  models_row = next(g for g in s["privacy"]["guarantees"] if g["sees"] == "models")
  for obs in ("all_iterates", "final_model"):
    assert a[obs]["claimed"] == pytest.approx(models_row["epsilon"])
    assert 0 <= a[obs]["lower_bound_95"] <= a[obs]["claimed"]
  assert a["all_iterates"]["bound_statistic"] == "likelihood_ratio"
  assert a["final_model"]["bound_statistic"] == "cosine"
  # The noise the canaries met, measured in the rounds each took part in (round index t of
  # the Scorer = the round's): the run's sigma, 1.48, within its ~7% standard error.
  fit = a["all_iterates"]["estimate_fit"]
  assert fit["noise_multiplier"] == pytest.approx(s["privacy"]["noise_multiplier"], rel=0.25)
  lo, hi = a["all_iterates"]["estimate_interval_95"]
  assert lo <= a["all_iterates"]["estimate"] <= hi
  assert "ESTIMATE" in a["estimate_is"] and "NOT a bound" in a["estimate_is"]
  assert "deliberately_broken" not in a


@pytest.mark.parametrize("key,value", [("rounds_per_step", 2), ("dp.adaptive_clip", True)])
def test_unsupported_settings_are_refused_naming_the_key(key, value):
  from fedjax_lab import config as config_lib
  c = _tiny(**{"dp.level": "site", "dp.noise_multiplier": 1.0, key: value})
  with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
    config_lib.validate(c)


def test_the_deliberate_bug_needs_site_dp():
  from fedjax_lab import config as config_lib
  with pytest.raises(ConfigError, match="audit.break_noise_divisor"):
    config_lib.validate(_tiny(**{"audit.break_noise_divisor": 4.0}))


def test_secure_aggregation_reports_the_servers_row(tmp_path):
  """Under secure aggregation the server sees each round's sum: the audit adds its view,
  compared with the server's own guarantee row ("sees": "sum"), not the headline."""
  from fedjax_lab.experiment import Experiment
  s = Experiment(_tiny(**{"dp.level": "site", "dp.noise": "coordinated",
                          "dp.noise_multiplier": 1.0, "secagg.enabled": True, "rounds": 2,
                          "audit.canaries": 50})).run(str(tmp_path))
  a, rows = s["audit"], s["privacy"]["guarantees"]
  server = next(g for g in rows if g["sees"] == "sum")
  assert a["server_sum"]["claimed"] == pytest.approx(server["epsilon"])
  assert a["server_sum"]["adversary"] == server["adversary"]
  assert a["server_sum"]["claimed"] > a["all_iterates"]["claimed"]  # no amplification
  assert a["server_sum"]["lower_bound_95"] == a["all_iterates"]["lower_bound_95"]
  # The server's estimate: its row's mechanism (no sampling) at the same measured noise.
  assert a["server_sum"]["estimate_fit"]["sampling_prob"] == 1.0 == server["sampling_prob"]
  assert (a["server_sum"]["estimate_fit"]["noise_multiplier"]
          == a["all_iterates"]["estimate_fit"]["noise_multiplier"])
  assert a["server_sum"]["estimate"] > a["all_iterates"]["estimate"]


def _example(**overrides):
  """Example-level canaries' settings: one DP-SGD step a round, coordinated noise."""
  return _tiny(**{"dp.level": "example", "dp.noise": "coordinated", "client.local_steps": 1,
                  "server.weighting": "uniform", **overrides})


def test_example_canary_moves_the_model_as_one_clipped_example_at_a_cohort_site():
  """The real path, one round, the same keys: (a) a site given one more example whose
  gradient is far above the clip norm moves the released model by -lr_s lr_c C g^ / (B K)
  (g^ its unit gradient, from jax.grad here) and (b) the canaries move it by that size along
  the sum of the taking-part u_j; Canaries.signal is that size. Sites smaller than the batch
  sample at rate 1, so the added example changes no other draw."""
  from fedjax_lab.experiment import Experiment
  kw = {"data.num_sites": 40, "cohort_size": 40, "client.batch_size": 64, "client.lr": 1.0,
        "dp.clip_norm": 1.0, "dp.noise_multiplier": 1.0, "rounds": 1}
  plain, canary = Experiment(_example(**kw, **{"audit.canaries": 0})), Experiment(
      _example(**kw, **{"audit.canaries": 30}))
  keys = plain.keys["sampling"], plain.keys["client"]
  state = plain.init_state()  # (the step donates its state: each round starts from a fresh one)
  flat = lambda st: np.asarray(jax.flatten_util.ravel_pytree(st.params)[0], np.float64)
  w1 = flat(plain.step(plain.init_state(), plain.data, *keys)[0])
  lr_s, lr_c, c_norm, b, k = 1.0, 1.0, 1.0, 64, 40
  size = lr_s * lr_c * c_norm / (b * k)
  assert canary.canaries.signal == pytest.approx(size, rel=1e-6)
  # (a) one more example at the smallest site (it still fits the site's slots)
  data = plain.data
  counts = np.array(data.count)
  s = int(np.argmin(counts))
  assert counts[s] + 1 <= min(b, plain.privacy.slots, data.n_max)
  x_c = 40.0 * data.x[0]
  logits, _ = plain.model.apply(state.params, state.model_state, x_c[None], True,
                                jax.random.key(0))
  y_c = int(np.argmin(np.asarray(logits)[0]))  # the least likely label: a large gradient
  idx = np.asarray(data.idx).copy()
  idx[s, counts[s]] = data.x.shape[0]
  counts[s] += 1
  more = data.replace(x=jax.numpy.concatenate([data.x, x_c[None]]),
                      y=jax.numpy.concatenate([data.y, jax.numpy.asarray([y_c], data.y.dtype)]),
                      idx=jax.numpy.asarray(idx), count=jax.numpy.asarray(counts))
  w1_more = flat(plain.step(plain.init_state(), more, *keys)[0])

  def loss(p):
    out, _ = plain.model.apply(p, state.model_state, x_c[None], True, jax.random.key(0))
    return optax.softmax_cross_entropy_with_integer_labels(out, jax.numpy.asarray([y_c]))[0]

  g = np.asarray(jax.flatten_util.ravel_pytree(jax.grad(loss)(state.params))[0], np.float64)
  assert np.linalg.norm(g) > 5 * c_norm  # clipped: its clipped gradient is C g / |g|
  want = -size * g / np.linalg.norm(g)
  got = w1_more - w1
  np.testing.assert_allclose(got, want, atol=2e-3 * size)
  # (b) the canaries: the included ones all take part at q = 1 (sites below the batch size)
  assert canary.canaries.rate == 1.0
  w1_can = flat(canary.step(canary.init_state(), canary.data, *keys)[0])
  u = canaries.directions(0, 30, g.size).astype(np.float64)
  take = np.asarray(canaries.participates(keys[0], 0, 30, 1.0))
  assert 5 < take.sum() < 25
  np.testing.assert_allclose(w1_can - w1, size * u[take].sum(0), atol=2e-3 * size)


def test_example_level_run_reports_the_models_row_and_a_bound_within_it(tmp_path):
  from fedjax_lab.experiment import Experiment
  exp = Experiment(_example(**{"dp.target_epsilon": 2.0}))
  # the accountant's q at example level: batch size over the smallest site (no cohort factor)
  q = min(1.0, 4 / int(np.asarray(exp.data.count).min()))
  s = exp.run(str(tmp_path))
  a = s["audit"]
  models_row = next(g for g in s["privacy"]["guarantees"] if g["sees"] == "models")
  assert models_row["sampling_prob"] == pytest.approx(q)
  assert a["all_iterates"]["canaries"]["rate"] == pytest.approx(q)
  assert models_row["steps"] == 20  # one DP-SGD step a round
  for obs in ("all_iterates", "final_model"):
    assert a[obs]["canaries"]["level"] == "example"
    assert a[obs]["claimed"] == pytest.approx(models_row["epsilon"])
    assert 0 <= a[obs]["lower_bound_95"] <= a[obs]["claimed"]
  assert a["all_iterates"]["bound_statistic"] == "likelihood_ratio"


@pytest.mark.parametrize("key,value", [("client.local_steps", 2), ("client.optimizer", "adam"),
                                       ("client.optimizer_args", {"momentum": 0.9}),
                                       ("dp.noise", "parallel"),
                                       ("secagg.dropout_rate", 0.1)])
def test_unsupported_example_level_settings_are_refused_naming_the_key(key, value):
  c = _example(**{"dp.noise_multiplier": 1.0, "secagg.enabled": key.startswith("secagg"),
                  key: value})
  with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
    canaries.validate(c)


def test_example_level_with_local_steps_above_one_is_refused_by_the_config():
  from fedjax_lab import config as config_lib
  for noise in ("coordinated", "parallel"):
    with pytest.raises(ConfigError):
      config_lib.validate(_example(**{"dp.noise_multiplier": 1.0, "dp.noise": noise,
                                      "client.local_steps": 3}))
  config_lib.validate(_example(**{"dp.noise_multiplier": 1.0}))  # the supported setting


def test_printed_lines_label_the_estimate_and_the_bound():
  """train.py's lines: the claim, the estimate marked as not a bound with its interval (">="
  past the computed range, the reason when there is nothing to measure) and the bound."""
  row = lambda est, fit, interval: {
      "claimed": 2.0, "estimate": est, "estimate_fit": fit, "estimate_interval_95": interval,
      "lower_bound_95": 0.5, "canaries": {"included": 490, "m": 1000}}
  lines = canaries.format_lines({
      "all_iterates": row(1.8, {"at_least": False}, [1.6, 1.9]),
      "server_sum": row(161.5, {"at_least": True}, [161.5, 161.5]),
      "final_model": {**row(1.5, None, None), "estimate_fit": {}}})
  assert lines[0] == ("canary audit (all_iterates; 490 of 1000 canaries in): claimed epsilon "
                      "2.000, estimate (not a bound) 1.800 [95% interval 1.600, 1.900], 95% "
                      "lower bound 0.500")
  assert "estimate (not a bound) 1.500, 95% lower bound" in lines[1]
  assert "estimate (not a bound) >= 161.500 [95% interval" in lines[2]
  why = "no estimate: 0 excluded canaries over 3 rounds and 0 participations"
  none = canaries.format_lines({"all_iterates": row(None, {"why": why}, None)})
  assert why in none[0]
