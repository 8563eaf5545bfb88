"""The reported epsilons are those of what the run releases, against each named adversary.

References: dp-accounting called directly, NumPy, and empirical noise standard deviations.
"""

import glob
import json
import os
import shutil
import types

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from dp_accounting import pld, rdp

from fedjax_lab.algorithms import fedavg
from fedjax_lab.client import ClientConfig, make_client_update
from fedjax_lab import config as config_lib
from fedjax_lab.config import validate
from fedjax_lab.data.federated import from_partition
from fedjax_lab.errors import ConfigError
from fedjax_lab.experiment import Experiment, draw_secret
from fedjax_lab.privacy import randomness
from fedjax_lab.privacy.sampling import max_sample_size, poisson_sample
from fedjax_lab.privacy.shares import example_dp_divisor, noise_coverage
from test_dp_round import _moved, _round_with
from test_experiment import set_keys, tiny_config


def _empty_cohort_keys(site_dp, cohort, sites, wanted):
  """Keys whose round-0 Poisson cohort is empty (the round samples with fold_in(key, 0))."""
  keys = []
  for i in range(2000):
    key = jax.random.key(i)
    _, mask, _ = poisson_sample(jax.random.fold_in(key, 0), sites, cohort / sites, sites,
                                site_dp.max_cohort)
    if float(mask.sum()) == 0:
      keys.append(key)
      if len(keys) == wanted:
        return keys
  raise AssertionError("no empty cohorts drawn")


@pytest.mark.parametrize("coordinated", [False, True])
def test_an_empty_cohort_still_releases_the_accounted_noise(coordinated):
  """With no site sampled, nothing is sent; the server adds N(0, (sigma C)^2) to the zero
  sum (divided by the expected cohort size like any sum), as the accountant assumes; under
  parallel noise it tops the sum up to max_cohort full shares (aggregators.gaussian_noise)."""
  sigma, clip, cohort, sites = 1e4, 1e-4, 1, 8
  site_dp = fedavg.SiteDP(clip_norm=clip, noise_multiplier=sigma, coordinated=coordinated,
                          max_cohort=max_sample_size(cohort, sites))
  _, _, params, state, round_fn, data = _round_with(site_dp, cohort, sites, hidden=2000)
  key, = _empty_cohort_keys(site_dp, cohort, sites, 1)
  new, metrics = round_fn(state, data, key, key)
  assert int(metrics.messages) == 0
  moved = _moved(new.params, params)  # ~20k coordinates: std within ~1%
  shares = 1 if coordinated else site_dp.max_cohort
  assert abs(moved.std() / (np.sqrt(shares) * sigma * clip / cohort) - 1) < 0.03
  assert abs(moved.mean()) < 0.05 * moved.std()


def test_an_empty_cohort_still_noises_the_adaptive_clipping_count():
  """b~ = (sum of centred bits + noise) / m + 1/2: with no site, the count is the server's
  N(0, max_cohort sigma_b^2) alone (parallel: topped up to the slots' shares), read back from
  C_{t+1} = C_t exp(-clip_lr (b~ - gamma))."""
  count_std, cohort, sites, lr, gamma = 0.05, 1, 8, 0.2, 0.5
  site_dp = fedavg.SiteDP(clip_norm=1.0, noise_multiplier=1.0, coordinated=False,
                          max_cohort=max_sample_size(cohort, sites),
                          adaptive=fedavg.AdaptiveClip(gamma, lr, count_std))
  _, _, _, state, round_fn, data = _round_with(site_dp, cohort, sites)
  noises = []
  for key in _empty_cohort_keys(site_dp, cohort, sites, 120):
    new, _ = round_fn(state, data, key, key)
    frac = gamma - np.log(float(new.aggregator_state) / 1.0) / lr
    noises.append((frac - 0.5) * cohort)
  noises = np.array(noises)  # without the server's noise every entry would be 0
  want = np.sqrt(site_dp.max_cohort) * count_std
  assert abs(noises.std() / want - 1) < 0.2  # 120 draws: std error ~6.5%
  assert abs(noises.mean()) < 4 * want / np.sqrt(len(noises))


def _dopamine(**overrides):
  return tiny_config(**{"dp.level": "example", "dp.noise": "coordinated",
                        "dp.noise_multiplier": 1.0, "client.local_steps": 1,
                        "client.batch_size": 15, "server.weighting": "uniform",
                        "data.num_sites": 10, "cohort_size": 10, **overrides})


def test_coordinated_noise_covers_every_site_even_one_smaller_than_its_batch():
  """One site of 10 examples among nine of 150, batch 15 (the site samples at rate 1): each
  site's ratio (noise in the uniform average of the K updates / (sigma x one example's
  sensitivity in it)) from the implementation's own divisors and shares is >= 1; with each
  site dividing by its expected batch (rate x size, the parallel rule) it would be 0.707."""
  exp = Experiment(_dopamine())
  counts = np.array([10] + [150] * 9)
  ratios = noise_coverage(counts, 15, exp.example_dp, 10, exp.privacy.noise_multiplier)
  np.testing.assert_allclose(ratios, 1.0, rtol=1e-9)  # every divisor is 15: exactly sigma
  # NumPy reference of the same ratio, written out for the expected-batch divisors.
  d = np.minimum(1.0, 15 / counts) * counts
  share = exp.privacy.noise_multiplier / np.sqrt(10)
  want = share * np.sqrt((d ** -2.0).sum()) / (exp.privacy.noise_multiplier / d)
  old = noise_coverage(counts, 15, exp.example_dp._replace(fixed_divisor=None), 10,
                       exp.privacy.noise_multiplier)
  np.testing.assert_allclose(old, want, rtol=1e-12)
  assert old[0] == pytest.approx(0.7071, abs=1e-4)


def test_coordinated_sites_divide_by_the_batch_size_whatever_their_size():
  """Measured: the noise in each site's update (sigma huge, clip tiny, so noise is all that
  moves it) has std share x C / 15 for the site of 10 examples and for one of 150."""
  exp = Experiment(_dopamine())
  dp = exp.example_dp._replace(noise_multiplier=1e4, clip_norm=1e-4)
  update = jax.jit(make_client_update(exp.model, optax.with_extra_args_support(optax.sgd(1.0)),
                                      ClientConfig(1, 15, True, 0.0), dp=dp))
  x, y = exp.train.x[:160], exp.train.y[:160]
  data = from_partition(x, y, [np.arange(10), np.arange(10, 160)], exp.train.num_classes)
  params, ms = exp.model.init(jax.random.key(0), x[:2])
  for site, count in ((0, 10), (1, 150)):
    out = update(params, ms, data.idx[site], data.count[site], jax.random.key(site), data)
    std = np.concatenate([np.ravel(a) for a in jax.tree.leaves(out.delta)]).std()
    divisor = float(example_dp_divisor(dp, 15, count))
    assert divisor == 15.0
    assert abs(std / (1e4 * 1e-4 / divisor) - 1) < 0.03


def test_centralized_baseline_under_dp_is_refused():
  c = tiny_config(**{"dp.level": "site", "dp.noise_multiplier": 1.0,
                     "eval.centralized_baseline": True})
  with pytest.raises(ConfigError) as e:
    validate(c)
  assert e.value.key == "eval.centralized_baseline"


def _eps(event, delta):
  return rdp.RdpAccountant().compose(event).get_epsilon(delta)


def _gauss(sigma, steps, q=None):
  g = dp_accounting.GaussianDpEvent(sigma)
  return dp_accounting.SelfComposedDpEvent(
      g if q is None else dp_accounting.PoissonSampledDpEvent(q, g), steps)


def _guarantees(tmp_path, c):
  exp = Experiment(c)
  summary = exp.run(str(tmp_path))
  return exp, summary["privacy"], {g["adversary"].split(":")[0].split(",")[0]: g
                                   for g in summary["privacy"]["guarantees"]}


def test_site_level_coordinated_guarantees_match_dp_accounting(tmp_path):
  c = tiny_config(**{"dp.level": "site", "dp.noise": "coordinated",
                     "dp.noise_multiplier": 1.5, "rounds": 4, "cohort_size": 5})
  exp, privacy, by = _guarantees(tmp_path, c)
  sigma, q, steps, acc = 1.5, 5 / 20, 4, privacy["accountant_delta"]
  head = privacy["guarantees"][0]
  assert head["epsilon"] == pytest.approx(_eps(_gauss(sigma, steps, q), acc), rel=1e-9)
  assert head["delta"] == pytest.approx(c.dp.delta, rel=1e-6)
  server = by["the server as implemented"]  # sees the updates, picks the cohort
  assert server["epsilon"] == pytest.approx(
      _eps(_gauss(sigma / np.sqrt(privacy["slots"]), steps), acc), rel=1e-9)
  secagg = by["the server"]
  assert secagg["epsilon"] == pytest.approx(_eps(_gauss(sigma, steps), acc), rel=1e-9)
  one = by["one site of the cohort"]
  assert one["epsilon"] == pytest.approx(_eps(_gauss(sigma / np.sqrt(2), steps), acc), rel=1e-9)
  four = by["4 colluding sites of the cohort"]
  assert four["epsilon"] == pytest.approx(_eps(_gauss(sigma / np.sqrt(5), steps), acc),
                                          rel=1e-9)
  assert head["epsilon"] < secagg["epsilon"] < one["epsilon"] < server["epsilon"]
  reader = privacy["guarantees"][-1]  # bundled digits: seeded noise, protected from no one
  assert privacy["randomness"] == "seeded" and reader["epsilon"] is None
  assert "config.seed" in reader["adversary"]


def test_example_level_coordinated_guarantees_match_dp_accounting(tmp_path):
  c = _dopamine(rounds=3)
  exp, privacy, by = _guarantees(tmp_path, c)
  sigma, q, steps = privacy["noise_multiplier"], privacy["sampling_prob"], 3
  acc, eta = privacy["accountant_delta"], privacy["overflow_bound"]
  claimed = []
  for name, left in (("the server as implemented", sigma / np.sqrt(10)),
                     ("one site of the cohort", sigma * np.sqrt(1 - 1 / 10)),
                     ("9 colluding sites of the cohort", sigma * np.sqrt(1 - 9 / 10))):
    got = by[name]["epsilon"]
    assert by[name]["delta"] == c.dp.delta
    # Amplified by the truncated Poisson batches only if the truncation's cost at this
    # epsilon, (1 + e^eps) eta, fits in delta beside dp-accounting's own delta.
    left_delta = c.dp.delta - (1 + np.exp(min(got, 700))) * eta
    if "no amplification" in by[name]["assumes"]:
      assert got == pytest.approx(_eps(_gauss(left, steps), acc), rel=1e-9), name
      claimed.append(False)
    else:
      assert left_delta > 0
      assert got >= _eps(_gauss(left, steps, q), left_delta)  # sound
      assert got == pytest.approx(_eps(_gauss(left, steps, q), left_delta), rel=1e-4)  # tight
      claimed.append(True)
  assert claimed == [False, True, False]  # sigma 1 over 3 steps: the one-site entry fits
  assert privacy["guarantees"][0]["epsilon"] == pytest.approx(
      _eps(_gauss(sigma, steps, q), acc), rel=1e-9)


def test_parallel_guarantees_name_the_server_and_colluders(tmp_path):
  c = tiny_config(**{"dp.level": "site", "dp.noise_multiplier": 1.5, "rounds": 3,
                     "cohort_size": 5})
  _, privacy, by = _guarantees(tmp_path, c)
  acc = privacy["accountant_delta"]
  assert by["the server"]["epsilon"] == pytest.approx(_eps(_gauss(1.5, 3), acc), rel=1e-9)
  assert by["any number of colluding sites (each knows its own noise"]["epsilon"] == (
      privacy["guarantees"][0]["epsilon"])


def _secret_config(**overrides):
  return tiny_config(**{"dp.level": "site", "dp.noise_multiplier": 1.0, "rounds": 4,
                        "cohort_size": 10, "dp.randomness": "secret", **overrides})


def test_secret_randomness_differs_per_run_and_is_written_only_in_checkpoints(tmp_path):
  a, b = tmp_path / "a", tmp_path / "b"
  exp = Experiment(_secret_config(rounds=2))
  sa_secret = list(exp.secret)
  assert len(sa_secret) == 8 and all(0 <= w < 2 ** 32 for w in sa_secret)  # 256 bits
  sa = exp.run(str(a))
  exp.set_secret(draw_secret())  # what a new Experiment draws (it reuses the compiled round)
  sb = exp.run(str(b))
  assert sa["params_sha256"] != sb["params_sha256"]  # same seed, fresh secrets
  # Only the secret's last word changed: all 256 bits reach the cohorts and the noise.
  exp.set_secret(sa_secret[:7] + [sa_secret[7] ^ 1])
  assert exp.run(str(tmp_path / "e"))["params_sha256"] != sa["params_sha256"]
  assert sa["privacy"]["randomness"] == "secret"
  assert all("config.seed" not in g["assumes"] for g in sa["privacy"]["guarantees"])
  seeded = Experiment(_secret_config(rounds=2, **{"dp.randomness": "seeded"}))
  c, d = (seeded.run(str(tmp_path / w))["params_sha256"] for w in ("c", "d"))
  assert c == d
  # The secret's words appear in the checkpoint's metadata and in no other file of the run.
  meta = json.loads(open(glob.glob(str(a / "checkpoints" / "*" / "meta" / "metadata"))[0]).read())
  words = [str(w) for w in meta["dp_secret"]]
  for path in glob.glob(str(a / "**" / "*"), recursive=True):
    if os.path.isfile(path) and "checkpoints" not in path:
      text = open(path, "rb").read().decode("latin-1")
      assert not all(w in text for w in words), path


def test_secret_randomness_resumes_exactly(tmp_path):
  """The secret is restored from the checkpoint: a run cut back to round 2 and resumed ends
  with the parameters of the uninterrupted run (whose secret no seed could reproduce)."""
  full = Experiment(_secret_config()).run(str(tmp_path))
  shutil.rmtree(tmp_path / "checkpoints" / "4")
  os.remove(tmp_path / "summary.json")
  fresh = Experiment(_secret_config())
  drawn = fresh.secret
  resumed = fresh.run(str(tmp_path))
  assert resumed["params_sha256"] == full["params_sha256"]
  # It continued with the checkpoint's 8 words (not its own draw), keyed as ChaCha20.
  meta = json.loads(open(sorted(glob.glob(str(tmp_path / "checkpoints" / "*" / "meta" / "metadata")))[0]).read())
  assert fresh.secret == meta["dp_secret"] != drawn and len(fresh.secret) == 8
  assert {randomness.impl_name(fresh.keys[k]) for k in ("sampling", "client", "noise")} == {"chacha20"}
  assert randomness.impl_name(fresh.keys["init"]) == "threefry2x32"


def test_secret_randomness_does_not_depend_on_device_layout(tmp_path):
  """The same secret trains the same model with the cohort sharded over the CPU devices or on
  one (what jax's rbg keys fail): ChaCha20 draws depend only on the key. Reference: the
  one-device run; up to float rounding (the sharded sum adds in another order), far below
  what another secret moves."""
  runs = {}
  for per_device, secret in ((1, range(8)), (1000, range(8)), (1000, range(1, 9))):
    exp = Experiment(_secret_config(rounds=2, min_sites_per_device=per_device))
    exp.set_secret(list(secret))
    exp.run(str(tmp_path / f"{per_device}_{secret[0]}"))
    runs[per_device, secret[0]] = (exp.mesh.devices.size,
                                   [np.asarray(x) for x in jax.tree.leaves(exp.final_state.params)])
  assert runs[1, 0][0] == jax.device_count() > 1 and runs[1000, 0][0] == 1
  gap = lambda a, b: max(float(np.max(np.abs(x - y))) for x, y in zip(runs[a][1], runs[b][1]))
  assert gap((1, 0), (1000, 0)) < 1e-4 < gap((1000, 1), (1000, 0))


def test_randomness_auto_is_secret_for_user_files(tmp_path):
  rng = np.random.RandomState(0)
  np.savez(tmp_path / "d.npz", x=rng.randn(200, 5).astype(np.float32), y=rng.randint(0, 2, 200))
  c = tiny_config(**{"dp.level": "site", "dp.noise_multiplier": 1.0, "data.name": "file",
                     "data.path": str(tmp_path / "d.npz")})
  assert Experiment(c).privacy.randomness == "secret"
  assert Experiment(tiny_config(**{"dp.level": "site", "dp.noise_multiplier": 1.0})
                    ).privacy.randomness == "seeded"


def test_site_level_bytes_are_the_expected_cohorts(tmp_path):
  """The realised Poisson cohort size would tell who took part; the log carries 2 x
  cohort_size model messages every round, whatever was drawn."""
  c = tiny_config(**{"dp.level": "site", "dp.noise_multiplier": 1.0, "rounds": 6})
  exp = Experiment(c)
  exp.run(str(tmp_path))
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert {r["bytes_communicated"] for r in rows} == {2 * 5 * exp.message_bytes}


def test_site_level_clipping_is_nan_safe_and_padding_trains_no_site():
  """Site 0's examples are NaN: when it takes part its update is sent as 0 and counted; a
  padded slot of the Poisson cohort (its id points at site 0) trains on nothing."""
  c = tiny_config(**{"dp.level": "site", "dp.noise_multiplier": 1.0, "cohort_size": 20})
  exp = Experiment(c)
  rows = np.asarray(exp.data.idx[0, :int(exp.data.count[0])])
  data = exp.data.replace(x=exp.data.x.at[rows].set(jnp.nan))
  state, metrics = exp.step(exp.init_state(), data, exp.keys["sampling"], exp.keys["client"])
  assert int(metrics.messages) == 40 and int(metrics.nonfinite_updates) == 1  # q = 1
  assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(state.params))
  # The client update of an empty slot (count 0) over site 0's NaN row is finite.
  params, ms = exp.model.init(jax.random.key(0), exp.train.x[:2])
  out = jax.jit(exp.client_update)(params, ms, data.idx[0], jnp.int32(0), jax.random.key(1),
                                   data)
  assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(out.delta))


# --- Every guarantee entry, recomputed from the entry alone -----------------------------------

_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def _config(name, arg=None, **overrides):
  import importlib.util
  spec = importlib.util.spec_from_file_location(name, os.path.join(_CONFIGS, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(arg) if arg is not None else module.get_config()
  if name == "mia_audit":
    c = c.target
  return set_keys(c, overrides)


def _plan(c):
  """The config's privacy plan from its real partition, built as Experiment builds it (no
  model, no training)."""
  from fedjax_lab.data import partition, public, sources
  from fedjax_lab.evaluation_robustness import hold_out_classes
  from fedjax_lab.privacy.plan import privacy_plan
  validate(c)
  train, test = sources.load_dataset(c.data)
  train, _, _ = hold_out_classes(c, train, test)
  train, _ = public.load(c.optim.public_data, c.data, train)
  config_lib.resolve_num_sites(train, c)
  sites = partition.partition(train, c.data, c.seed)
  d = None
  if c.secagg.enabled and c.dp.level == "site":  # the grid enters sigma: the row length
    from fedjax_lab.experiment import summed_coordinates
    from fedjax_lab.models import make_model
    d = summed_coordinates(make_model(c.model, train.num_classes, train.x[:2]), train.x[:2])
  return privacy_plan(c, np.array([len(s) for s in sites]), d)


_SECURE_SITE = {"secagg.enabled": True, "dp.noise": "coordinated"}
_DP_CONFIGS = [
    ("digits_dp", "example", {}), ("digits_dp", "site", {}), ("digits_dp", "site_adaptive", {}),
    ("digits_dp", "example_esgd_public", {}), ("digits_dp", "site", _SECURE_SITE),
    ("digits_dp", "example", {"dp.accountant": "pld"}),
    ("dopamine_digits", "central", {}), ("dopamine_digits", "parallel", {}),
    ("dopamine_digits", "coordinated", {}), ("dopamine_digits", "secure", {}),
    ("dopamine_digits", "secure", {"secagg.dropout_rate": 0.1}),
    ("dopamine_digits", "secure", {"secagg.dropout_rate": 0.1, "secagg.neighbours": 4}),
    ("dopamine_digits", "secure", {"dp.randomness": "secret"}),
    ("dopamine_pbmc", "central", {}), ("dopamine_pbmc", "parallel", {}),
    ("dopamine_pbmc", "coordinated", {}),
    ("mia_audit", "example", {}), ("mia_audit", "site", {}),
]


def _recompute(entry):
  g = dp_accounting.GaussianDpEvent(entry["noise_multiplier"])
  if entry["sampling_prob"] < 1:
    g = dp_accounting.PoissonSampledDpEvent(entry["sampling_prob"], g)
  acc = (rdp.RdpAccountant() if entry["accountant"] == "rdp" else
         pld.PLDAccountant())
  return acc.compose(dp_accounting.SelfComposedDpEvent(g, entry["steps"])).get_epsilon(
      entry["accountant_delta"])


@pytest.mark.parametrize("name, arg, overrides", _DP_CONFIGS)
def test_every_guarantee_of_every_dp_config_is_recomputable_from_its_entry(name, arg, overrides):
  """dp-accounting called on the entry's own noise_multiplier, sampling_prob, steps and
  accountant_delta gives its epsilon (reported >= recomputed, within 1e-4); an amplified
  entry's truncation cost fits in the delta left over."""
  from fedjax_lab.privacy import guarantees
  c = _config(name, arg, **overrides)
  plan = _plan(c)
  steps = c.rounds * plan.steps_per_round
  entries = guarantees.all_guarantees(plan.mechanism(c, steps))
  assert entries[0]["sees"] == "models" and entries[0]["colluding_sites"] == 0
  assert entries[0]["noise_multiplier"] == plan.noise_multiplier
  for e in entries:
    assert e["sees"] in ("models", "sum", "updates"), e["adversary"]
    assert isinstance(e["colluding_sites"], int) and e["steps"] == steps
    assert e["accountant"] == c.dp.accountant and e["delta"] == c.dp.delta
    if e["epsilon"] is None:  # no noise is left to it
      assert e["noise_multiplier"] == 0.0, e["adversary"]
      continue
    want = _recompute(e)
    assert want <= e["epsilon"] <= want * (1 + 1e-4), e["adversary"]
    assert e["sampling_prob"] in (1.0, plan.sampling_prob), e["adversary"]
    assert e["accountant_delta"] + (1 + np.exp(min(e["epsilon"], 700))) * (
        plan.overflow_bound if e["sampling_prob"] < 1 else 0.0) <= c.dp.delta * (1 + 1e-12)


def _sites(c):
  """The config's real site sizes, as _plan reads them."""
  from fedjax_lab.data import partition, sources
  validate(c)
  train, _ = sources.load_dataset(c.data)
  config_lib.resolve_num_sites(train, c)
  return np.array([len(s) for s in partition.partition(train, c.data, c.seed)])


# The matrix-factorization configs (privacy/mechanism.py): one Gaussian mechanism per run.
_MF_CONFIGS = [
    ("dp_ftrl", "example", {}), ("dp_ftrl", "example", {"dp.mechanism": "banded"}),
    ("dp_ftrl", "example", {"dp.mechanism": "gaussian"}),
    ("dp_ftrl", "4", {"dp.mechanism": "banded"}),
]


@pytest.mark.parametrize("name, arg, overrides", _MF_CONFIGS)
def test_every_guarantee_of_every_mf_config_is_recomputable_from_its_entry(name, arg, overrides):
  """Every entry's epsilon is dp-accounting's on its own fields (Gaussian(noise_multiplier)
  `steps` times, sampling_prob 1.0); the headline's equals Gaussian(z / sens) with sens the
  norm of C times the evenly spaced participation (steps 0, b, 2b, ...: the worst one for
  Toeplitz C with non-negative non-increasing coefficients, Theorem 2 of arXiv:2405.13763) and
  C materialized by jax_privacy; the server's row says what it sees."""
  from jax_privacy.matrix_factorization import buffered_toeplitz, toeplitz
  from fedjax_lab.privacy import mechanism
  c = _config(name, arg, **overrides)
  plan = mechanism.make_mechanism(c, _sites(c))
  mf = plan.mf
  n = mf.strategy.num_rounds
  with jax.enable_x64(True):
    if mf.strategy.name == "blt":
      C = np.asarray(buffered_toeplitz.BufferedToeplitz(
          buf_decay=jnp.asarray(mf.strategy.arrays["buf_decay"], jnp.float64),
          output_scale=jnp.asarray(mf.strategy.arrays["output_scale"], jnp.float64)
      ).materialize(n))
    elif mf.strategy.name == "banded":
      C = np.asarray(toeplitz.materialize_lower_triangular(
          jnp.asarray(mf.strategy.arrays["coefs"], jnp.float64), n))
    else:
      C = np.eye(n)
  u = np.zeros(n)
  u[::mf.groups] = 1.0
  sens = float(np.linalg.norm(C @ u))
  if c.dp.level == "example":
    k = int(_sites(c).min()) // c.client.batch_size
    assert mf.groups == k and n == c.rounds * c.client.local_steps
  assert u.sum() == mf.participations
  steps = c.rounds * plan.steps_per_round
  entries = mechanism.guarantee_entries(plan, c, steps)
  want = rdp.RdpAccountant().compose(dp_accounting.GaussianDpEvent(
      plan.noise_multiplier / sens)).get_epsilon(entries[0]["accountant_delta"])
  assert entries[0]["epsilon"] == pytest.approx(want, rel=1e-5)
  assert entries[0]["epsilon"] <= c.dp.target_epsilon * (1 + 1e-6)
  assert entries[0]["sees"] == "models" and entries[0]["colluding_sites"] == 0
  server = [e for e in entries if e["adversary"].startswith("the server")]
  assert server and server[0]["epsilon"] == entries[0]["epsilon"]
  assert server[0]["sees"] == ("updates" if c.dp.level == "example" else "models")
  for e in entries:
    assert e["sees"] in ("models", "sum", "updates"), e["adversary"]
    assert isinstance(e["colluding_sites"], int) and e["steps"] == 1
    assert e["sampling_prob"] == 1.0
    assert e["accountant"] == c.dp.accountant and e["delta"] == c.dp.delta
    if e["epsilon"] is None:
      assert e["noise_multiplier"] == 0.0, e["adversary"]
      continue
    assert e["epsilon"] == pytest.approx(_recompute(e), rel=1e-6), e["adversary"]


def _server_rows(entries):
  return {e["colluding_sites"]: e for e in entries
          if e["sees"] == "sum" and e["adversary"].startswith("the server")}


@pytest.mark.parametrize("overrides, shares, t", [
    ({}, 10, 6),                                               # complete graph: t = 10 // 2 + 1
    ({"secagg.dropout_rate": 0.1}, 6, 6),                      # shares sized for t
    ({"secagg.dropout_rate": 0.1, "secagg.neighbours": 4}, 3, 3),  # SecAgg+: t = 5 // 2 + 1
])
def test_secure_dopamine_reports_the_server_colluding_with_one_and_t_minus_1_sites(
    overrides, shares, t):
  """The server with k colluding sites faces sigma sqrt((n - k) / n), n the uploads a finished
  round is sure to hold (the cohort, or t with dropouts); its epsilon from dp-accounting on
  that noise, amplified by the minibatches it does not see; the no-collusion row stays."""
  from fedjax_lab.privacy import guarantees
  c = _config("dopamine_digits", "secure", **overrides)
  plan = _plan(c)
  entries = guarantees.all_guarantees(plan.mechanism(c, 600))
  rows = _server_rows(entries)
  assert sorted(rows) == [0, 1, t - 1]
  assert "no site colludes with the server" in rows[0]["assumes"]
  assert rows[0]["epsilon"] == entries[0]["epsilon"]
  sigma = plan.noise_multiplier
  for k in (1, t - 1):
    assert rows[k]["noise_multiplier"] == pytest.approx(sigma * np.sqrt((shares - k) / shares),
                                                        rel=1e-12)
    assert rows[k]["sampling_prob"] == 0.1
    left = c.dp.delta - (1 + np.exp(rows[k]["epsilon"])) * plan.overflow_bound
    assert rows[k]["epsilon"] >= _eps(_gauss(sigma * np.sqrt((shares - k) / shares), 600, 0.1),
                                      left)
  assert rows[1]["epsilon"] > entries[0]["epsilon"]
  if "secagg.neighbours" in overrides:  # item 5: the server's view is the components' sums
    assert "connected component" in rows[0]["adversary"] + rows[0]["assumes"]


def test_site_level_server_colluding_rows_take_the_worst_realised_cohort():
  """Site level (digits_dp:site with coordinated noise and secure aggregation): each of a
  round's n sites adds sigma/sqrt(n); against the server and k colluders the worst round is
  found by enumerating every cohort size n <= slots and every number j <= k of colluders in
  it (j >= t(n) = n // 2 + 1 of them rebuild the target's masks: only its share is left)."""
  from fedjax_lab.privacy import guarantees
  c = _config("digits_dp", "site", **_SECURE_SITE)
  plan = _plan(c)
  entries = guarantees.all_guarantees(plan.mechanism(c, 200))
  rows = _server_rows(entries)
  assert sorted(rows) == [0, 1, 25]  # t = 50 // 2 + 1 = 26 at the expected cohort
  sigma = plan.noise_multiplier
  for k in (1, 25):
    worst = min(np.sqrt(1 / n) if j >= n // 2 + 1 else np.sqrt((n - j) / n)
                for n in range(2, plan.slots + 1) for j in range(0, min(k, n - 1) + 1))
    assert rows[k]["noise_multiplier"] == pytest.approx(sigma * worst, rel=1e-12)
    assert rows[k]["sampling_prob"] == 1.0
    assert rows[k]["epsilon"] == pytest.approx(
        _eps(_gauss(sigma * worst, 200), rows[k]["accountant_delta"]), rel=1e-9)
  assert rows[1]["noise_multiplier"] == pytest.approx(sigma / np.sqrt(2), rel=1e-12)
  assert rows[25]["noise_multiplier"] == pytest.approx(sigma / 7, rel=1e-12)  # n = 49, j = 25


def _components(graph, up):
  """Connected components (sizes) of the graph restricted to `up`, by breadth-first search."""
  sizes, seen = [], set()
  for start in sorted(up):
    if start in seen:
      continue
    todo, comp = [start], set()
    while todo:
      u = todo.pop()
      if u not in comp:
        comp.add(u)
        todo += [v for v in graph[u] if v in up and v not in comp]
    seen |= comp
    sizes.append(len(comp))
  return sizes


def test_secagg_plus_components_of_a_finished_round_hold_at_least_t_sites(monkeypatch):
  """The bound the server's SecAgg+ rows rest on: the uploaders' graph may split into
  components (the server learns each one's sum), but every component of a finished round
  holds >= t sites, and a round that would leave a site alone aborts. Checked on the graph
  the server drew, by breadth-first search, with dropouts set by hand on a ring in id order
  and drawn at random on the server's own random ring."""
  from fedjax_lab.secagg import SecAggConfig, protocol, secure_sum
  graphs, in_order = [], {"on": True}
  draw = protocol.neighbour_graph

  class Keep:  # the ring in id order, so that the dropouts below cut it where intended
    shuffle = staticmethod(lambda order: None)

  monkeypatch.setattr(protocol, "neighbour_graph", lambda sites, k, rng: graphs.append(
      draw(sites, k, Keep() if in_order["on"] else rng)) or graphs[-1])
  K, t = 16, 3
  cfg = SecAggConfig(neighbours=4, threshold=t, bits=16, clip_range=1.0, prg="host")
  x = jnp.zeros((K, 3))
  cut = np.zeros(K, int)
  cut[[4, 5, 12, 13]] = 2  # two gaps of two on a ring of 2 neighbours a side: it splits
  result = secure_sum(x, jax.random.key(0), cfg, dropouts=cut)
  assert not result.aborted
  assert sorted(_components(graphs[-1], set(np.flatnonzero(result.survivors)))) == [6, 6]
  alone = np.zeros(K, int)
  alone[[1, 2, 4, 5]] = 2  # site 3 would upload with none of its neighbours
  assert secure_sum(x, jax.random.key(1), cfg, dropouts=alone).aborted
  in_order["on"] = False
  rng, finished = np.random.default_rng(0), 0
  for i in range(30):
    stages = np.where(rng.random(K) < 0.3, rng.integers(1, 4, K), 0)
    result = secure_sum(x, jax.random.key(i), cfg, dropouts=stages)
    if not result.aborted:
      finished += 1
      assert min(_components(graphs[-1], set(np.flatnonzero(result.survivors)))) >= t
  assert finished >= 10


def test_summary_lists_what_is_released_without_dp(tmp_path, monkeypatch):
  """Per-site example counts (from the partition) and the secure sum's clipped coordinates
  (summed from metrics.jsonl) are listed under released_without_dp. The secure-aggregation
  gate (privacy/secagg_delta.py) refuses a clip range that clips with more than a delta-sized
  probability, so this reporting test switches it off to make the tiny clip range clip."""
  from fedjax_lab.privacy import secagg_delta
  monkeypatch.setattr(secagg_delta, "gate", lambda *a: types.SimpleNamespace(eta=0.0))
  c = tiny_config(**{"rounds": 2, "client.local_steps": 1, "server.weighting": "uniform",
                     "dp.level": "example", "dp.noise": "coordinated",
                     "dp.noise_multiplier": 1.0, "secagg.enabled": True,
                     "secagg.clip_range": 1e-5})
  exp = Experiment(c)
  summary = exp.run(str(tmp_path))
  released = summary["privacy"]["released_without_dp"]
  assert released["site_examples"] == [len(s) for s in exp.sites]
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert released["secagg_clipped"] == sum(r["secagg_clipped"] for r in rows) > 0
  assert {"train_loss", "secagg_clipped"} <= set(released["fields"])
