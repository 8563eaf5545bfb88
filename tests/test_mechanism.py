"""dp.mechanism runs (privacy/mechanism.py) end to end, each number against an independent
reference: epsilon and every guarantee row recomputed with dp_accounting called directly and
the sensitivity found by brute force over every participation pattern (NumPy), the cohorts a
run trains replayed against the cyclic schedule in NumPy, the noise a round adds against a
NumPy solve of C^{-1} W from the same keys, bit-exact resume, and one-line config errors."""

import itertools

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_experiment import assert_exits_2_with_one_line, crash_during_step, tiny_config

from fedjax_lab.experiment import Experiment
from fedjax_lab.privacy import mf_noise

# 9 rounds over 20 sites in cohorts of 5: b = 4 groups, so a site takes part in rounds
# g, g + 4, g + 8: at most k = 3 times, 4 apart.
ROUNDS, SITES, COHORT = 9, 20, 5
GROUPS, PARTICIPATIONS = SITES // COHORT, 3
# (dp.mechanism, dp.participation, extra keys); banded with bands below and above b.
CASES = {
    "gaussian_cyclic": ("gaussian", "cyclic", {}),
    "tree": ("tree", "auto", {}),
    "blt": ("blt", "auto", {}),
    "banded3": ("banded", "auto", {"dp.bands": 3}),
    "banded6": ("banded", "auto", {"dp.bands": 6}),
    "dense": ("dense", "auto", {}),
}
# Where mf_noise.sensitivity is exact (jax_privacy's banded / Toeplitz formulas); tree and
# dense use an upper bound, which may only over-state epsilon.
EXACT = ("gaussian_cyclic", "blt", "banded3", "banded6")


def mf_config(case: str, **overrides):
  name, participation, extra = CASES[case]
  return tiny_config(**{"dp.level": "site", "dp.mechanism": name,
                        "dp.participation": participation, "rounds": ROUNDS,
                        "data.num_sites": SITES, "cohort_size": COHORT, "dp.clip_norm": 0.5,
                        **extra, **overrides})


def brute_force_sensitivity(C: np.ndarray, min_sep: int, max_part: int) -> float:
  """max ||C u|| over every 0/1 vector u with at most max_part ones, any two >= min_sep
  apart: the patterns a site may follow (the server may choose any of them)."""
  n, best = C.shape[0], 0.0
  for k in range(1, max_part + 1):
    for rounds in itertools.combinations(range(n), k):
      if all(b - a >= min_sep for a, b in zip(rounds, rounds[1:])):
        u = np.zeros(n)
        u[list(rounds)] = 1.0
        best = max(best, float(np.linalg.norm(C @ u)))
  return best


def gaussian_epsilon(noise_multiplier: float, delta: float, steps: int = 1) -> float:
  event = dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(noise_multiplier),
                                            steps)
  return dp_accounting.rdp.RdpAccountant().compose(event).get_epsilon(delta)


@pytest.mark.parametrize("case", list(CASES))
def test_epsilon_and_every_row_from_brute_force_sensitivity(case, tmp_path):
  """A run calibrated to epsilon 4: its noise multiplier z over the brute-force sensitivity,
  as ONE Gaussian mechanism (no sampling), gives every row's epsilon (dp_accounting directly);
  that epsilon meets the target; each row's own fields recompute it too."""
  exp = Experiment(mf_config(case, **{"dp.target_epsilon": 4.0}))
  summary = exp.run(str(tmp_path))
  privacy = summary["privacy"]
  C = mf_noise.strategy_matrix(exp.privacy.mf.strategy)
  if case == "gaussian_cyclic":
    np.testing.assert_array_equal(C, np.eye(ROUNDS))
  sens = brute_force_sensitivity(C, GROUPS, PARTICIPATIONS)
  z = privacy["noise_multiplier"]
  rows = privacy["guarantees"]
  acc_delta = rows[0]["accountant_delta"]
  assert 0 < acc_delta <= privacy["delta"] == 1e-5  # a smaller delta only raises epsilon
  want = gaussian_epsilon(z / sens, acc_delta)
  assert want <= 4.0 + 1e-9  # the calibration meets the target ...
  if case in EXACT:
    assert want >= 3.99  # ... without wasting it
    assert summary["epsilon"] == pytest.approx(want, rel=1e-6)
  else:  # an upper bound on the sensitivity: never a smaller epsilon than the truth
    assert summary["epsilon"] >= want * (1 - 1e-9)
    assert summary["epsilon"] <= 4.0 + 1e-9
  assert privacy["sampling_prob"] == 1.0
  with_epsilon = [r for r in rows if r["epsilon"] is not None]
  assert len(with_epsilon) == 3 and any("picks the cohorts" in r["adversary"] for r in rows)
  for r in rows:
    assert r["sampling_prob"] == 1.0 and r["steps"] == 1 and r["delta"] == 1e-5
    assert r["accountant"] == "rdp" and r["accountant_delta"] == acc_delta
    if r["epsilon"] is None:  # nothing hidden from it: no noise claimed either
      assert r["noise_multiplier"] == 0.0
      continue
    assert r["epsilon"] == pytest.approx(gaussian_epsilon(r["noise_multiplier"], acc_delta),
                                         rel=1e-9)
    assert r["epsilon"] == summary["epsilon"]
    if case in EXACT:
      assert r["noise_multiplier"] == pytest.approx(z / sens, rel=1e-5)
    else:
      assert r["noise_multiplier"] <= z / sens * (1 + 1e-9)


@pytest.fixture
def record_cohorts(monkeypatch):
  """{round: site ids} of the cohorts the run actually trained, read out of the compiled
  round as it runs."""
  from fedjax_lab.algorithms import round as lab_round
  seen, real = {}, lab_round.cyclic_cohort

  def recording(sampling_rng, t, *args):
    cohort = real(sampling_rng, t, *args)
    jax.debug.callback(lambda t, c: seen.__setitem__(int(t), np.asarray(c)), t, cohort)
    return cohort

  monkeypatch.setattr(lab_round, "cyclic_cohort", recording)
  return seen


@pytest.mark.parametrize("case", ["gaussian_cyclic", "blt"])
def test_cyclic_cohorts_follow_fixed_groups(case, record_cohorts, tmp_path):
  Experiment(mf_config(case, **{"dp.noise_multiplier": 1.0})).run(str(tmp_path))
  cohorts = [record_cohorts[t] for t in range(ROUNDS)]
  groups = np.stack(cohorts[:GROUPS])
  # The first b cohorts split the sites into b disjoint groups of cohort_size ...
  assert groups.shape == (GROUPS, COHORT)
  np.testing.assert_array_equal(np.sort(groups.ravel()), np.arange(SITES))
  # ... and round t trains group t mod b, exactly.
  for t, cohort in enumerate(cohorts):
    np.testing.assert_array_equal(np.sort(cohort), np.sort(groups[t % GROUPS]))
  # Hence every site: at most ceil(rounds / b) rounds, any two exactly b apart.
  for site in range(SITES):
    rounds = [t for t, c in enumerate(cohorts) if site in c]
    assert 1 <= len(rounds) <= PARTICIPATIONS
    assert all(b - a == GROUPS for a, b in zip(rounds, rounds[1:]))
  # Not the identity split: the groups come from a permutation of the sites.
  assert not np.array_equal(np.sort(groups, axis=1), np.arange(SITES).reshape(GROUPS, COHORT))


def _flat(params) -> np.ndarray:
  return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(params)])


@pytest.mark.parametrize("case", ["gaussian_cyclic", "tree", "blt", "banded6", "dense"])
def test_round_noise_is_C_inverse_W(case):
  """With a client learning rate of 1e-30 the sites' updates vanish in float32, so the model
  moves by the server's noise alone: round r's parameter change must be (C^{-1} W)_r / K,
  W's rows drawn i.i.d. N(0, (z clip)^2) from the round's server-noise key, C^{-1} W solved in
  NumPy float64 from the strategy matrix (server SGD lr 1, mean over K = cohort_size)."""
  z, clip = 1.5, 0.5
  exp = Experiment(mf_config(case, **{"dp.noise_multiplier": z, "client.lr": 1e-30}))
  state = exp.init_state()
  before, deltas = _flat(state.params), []
  for _ in range(ROUNDS):
    state = exp.run_rounds(state, 1)
    after = _flat(state.params)
    deltas.append(after - before)
    before = after
  D = np.stack(deltas)  # (rounds, coordinates)

  # The server's fresh draw of round t: key fold_in(fold_in(client, SERVER_NOISE), t) then
  # fold_in 4, split into one key per leaf in jax.tree.leaves order (aggregators.py).
  like = jax.tree.leaves(state.params)
  W = []
  for t in range(ROUNDS):
    key = jax.random.fold_in(jax.random.fold_in(
        jax.random.fold_in(exp.keys["client"], 0xFFFFFFFC), t), 4)
    keys = jax.random.split(key, len(like))
    W.append(np.concatenate([
        np.asarray(jnp.float32(z * clip) * jax.random.normal(k, leaf.shape, jnp.float32),
                   np.float64).ravel() for k, leaf in zip(keys, like)]))
  W = np.stack(W)
  C = mf_noise.strategy_matrix(exp.privacy.mf.strategy)
  want = np.linalg.solve(C, W) / COHORT
  np.testing.assert_allclose(D, want, rtol=0, atol=2e-5 * np.abs(want).max())

  # Independently of the key schedule: C D K / (z clip) is white, unit-variance noise (the
  # round keys must differ; ~10^4 coordinates, so 0.06 is ~6 standard errors).
  white = C @ D * COHORT / (z * clip)
  np.testing.assert_allclose(white.std(axis=1), 1.0, atol=0.05)
  corr = np.corrcoef(white) - np.eye(ROUNDS)
  assert np.abs(corr).max() < 0.06


def test_blt_resumes_bit_exact_after_a_crash(tmp_path):
  """Checkpoints every 2 rounds; the run dies in round 5 and is rerun: its parameters equal
  an uninterrupted run's (the BLT buffers are restored, not restarted from zero)."""
  c = mf_config("blt", **{"dp.noise_multiplier": 1.0, "checkpoint.every": 2})
  full = Experiment(c).run(str(tmp_path / "full"))
  crash_during_step(Experiment(c), str(tmp_path / "crashed"), 5)
  resumed = Experiment(c).run(str(tmp_path / "crashed"))
  assert resumed["rounds_completed"] == ROUNDS
  assert resumed["params_sha256"] == full["params_sha256"]


BAD = [
    ("--config.dp.level=example --config.dp.mechanism=blt --config.algorithm.name=scaffold "
     "--config.dp.noise_multiplier=1", "algorithm.name"),
    ("--config.dp.level=site --config.dp.mechanism=blt --config.dp.participation=poisson "
     "--config.dp.noise_multiplier=1", "dp.participation"),
    ("--config.dp.level=site --config.dp.mechanism=blt --config.data.num_sites=100 "
     "--config.cohort_size=30 --config.dp.noise_multiplier=1", "cohort_size"),
    ("--config.dp.level=site --config.dp.mechanism=blt --config.secagg.enabled=True "
     "--config.dp.noise_multiplier=1", "secagg.enabled"),
]


@pytest.mark.parametrize("flags,key", BAD)
def test_bad_mechanism_config_exits_2_with_one_line(flags, key, tmp_path):
  assert_exits_2_with_one_line(flags, key, tmp_path)


def test_amplified_banded_row_with_poisson_within_groups(tmp_path):
  """dp.groups=b with more sites per group than the cohort: each site of the round's group
  joins w.p. cohort / group size; banded with bands = b adds the amplified row of
  Choquette-Choo et al. 2023, recomputed here from jax_privacy's amplified_bandmf_event called
  directly and from the row's own fields (ceil(n / b) Poisson-sampled Gaussians), below the
  unamplified headline; the cohorts a run trains hold only sites of the round's group, about
  half of them."""
  from dp_accounting import rdp
  from jax_privacy.experimental import accounting as jp_accounting
  groups, rounds = 2, 8  # 20 sites in 2 groups of 10, cohort 5: rate 0.5 within the group
  exp = Experiment(tiny_config(**{
      "dp.level": "site", "dp.mechanism": "banded", "dp.bands": groups, "dp.groups": groups,
      "rounds": rounds, "data.num_sites": SITES, "cohort_size": COHORT,
      "dp.noise_multiplier": 3.0}))
  summary = exp.run(str(tmp_path))
  rows = summary["privacy"]["guarantees"]
  amp = [r for r in rows if "not which sites" in r["adversary"]]
  assert len(amp) == 1 and amp[0]["sampling_prob"] == 0.5
  coefs = np.asarray(exp.privacy.mf.strategy.arrays["coefs"], np.float64)
  column_norm = max(1.0, float(np.linalg.norm(coefs)))  # Toeplitz: every column's norm <= this
  event = jp_accounting.amplified_bandmf_event(3.0 / column_norm, rounds, num_bands=groups,
                                               sampling_prob=0.5)
  direct = rdp.RdpAccountant().compose(event).get_epsilon(amp[0]["accountant_delta"])
  fields = rdp.RdpAccountant().compose(dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(0.5, dp_accounting.GaussianDpEvent(
          amp[0]["noise_multiplier"])), amp[0]["steps"])).get_epsilon(amp[0]["accountant_delta"])
  assert amp[0]["epsilon"] == pytest.approx(direct, rel=1e-6)
  assert amp[0]["epsilon"] == pytest.approx(fields, rel=1e-6)
  assert amp[0]["steps"] == rounds // groups
  assert amp[0]["epsilon"] < rows[0]["epsilon"]  # the headline stays the unamplified one
  assert rows[0]["sampling_prob"] == 1.0


def test_groups_must_split_the_sites(tmp_path):
  """3 groups do not split 20 sites: one line naming dp.groups, exit 2."""
  assert_exits_2_with_one_line("--config.dp.level=site --config.dp.mechanism=blt "
                               "--config.dp.groups=3 --config.data.num_sites=20 "
                               "--config.cohort_size=5 --config.rounds=4", "dp.groups", tmp_path)
