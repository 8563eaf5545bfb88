"""Every private trainer builds its noise numbers and DP events through privacy/ (issue 24,
items 1-2): FedAvg at example and site level, secure aggregation's coordinated shares, the
membership trainers (which build their targets with Experiment) and the DPD-fVAE at both
levels. The builders are wrapped to record the plans they return; each trainer's sigma, slots
and epsilon are then checked against the recorded plan AND against an independent reference
(closed forms, dp_accounting called directly). A source scan checks that no module outside
fedjax_lab/privacy/ calls the sigma / rate / slot helpers or splits sigma into shares itself."""

import ast
import math
import os

import dp_accounting
from dp_accounting import rdp
import numpy as np
import pytest

from fedjax_lab import experiment as experiment_lib
from fedjax_lab import runs
from fedjax_lab.attacks import membership
from fedjax_lab.errors import ConfigError
from fedjax_lab.generative import federated, models
from fedjax_lab.privacy import mechanism
from test_experiment import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def recorded(monkeypatch):
  """The plans make_mechanism / make_vae_mechanism returned during the test, in order."""
  plans = []
  for name in ("make_mechanism", "make_vae_mechanism"):
    real = getattr(mechanism, name)

    def record(*args, _real=real, **kwargs):
      plans.append(_real(*args, **kwargs))
      return plans[-1]
    monkeypatch.setattr(mechanism, name, record)
  return plans


def _rdp_epsilon(sigma, q, steps, delta):
  g = dp_accounting.GaussianDpEvent(sigma)
  event = g if q == 1.0 else dp_accounting.PoissonSampledDpEvent(q, g)
  return rdp.RdpAccountant().compose(
      dp_accounting.SelfComposedDpEvent(event, steps)).get_epsilon(delta)


def _check_accounting(exp, plan, q):
  """The experiment's epsilon and the plan's DpEvent are dp_accounting's for its own sigma at
  rate q (the test's closed form) over every step of the run."""
  c = exp.config
  steps = c.rounds * plan.steps_per_round
  want = _rdp_epsilon(plan.noise_multiplier, q, steps, c.dp.delta * (1 - 1e-3))
  assert plan.sampling_prob == pytest.approx(q, rel=1e-12)
  assert exp.epsilon(c.rounds) == pytest.approx(want, rel=1e-9)
  event = plan.event(steps)
  assert rdp.RdpAccountant().compose(event).get_epsilon(
      c.dp.delta * (1 - 1e-3)) == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("noise", ["parallel", "coordinated"])
def test_fedavg_example_level_noise_is_the_plans(recorded, noise):
  c = tiny_config(**{"rounds": 2, "dp.level": "example", "dp.noise_multiplier": 1.1,
                     "dp.noise": noise, "client.local_steps": 1, "client.optimizer": "sgd",
                     "server.weighting": "uniform"})
  exp = experiment_lib.Experiment(c)
  assert len(recorded) == 1 and exp.privacy is recorded[0]
  plan = recorded[0]
  assert plan.noise_multiplier == 1.1
  # Each site's share: sigma (parallel) or sigma / sqrt(K) over the K = 5 sites of a cohort.
  share = 1.1 / math.sqrt(5) if noise == "coordinated" else 1.1
  assert exp.example_dp.noise_multiplier == pytest.approx(share, rel=1e-15)
  assert exp.example_dp.max_batch == plan.slots
  assert exp.example_dp.fixed_divisor == (8.0 if noise == "coordinated" else None)
  counts = np.asarray(exp.data.count)
  _check_accounting(exp, plan, min(1.0, 8 / counts.min()))


def test_fedavg_site_level_noise_is_the_plans(recorded):
  c = tiny_config(**{"rounds": 2, "dp.level": "site", "dp.noise_multiplier": 0.9,
                     "dp.noise": "coordinated"})
  exp = experiment_lib.Experiment(c)
  plan = recorded[0]
  site_dp = exp._site_dp()  # pylint: disable=protected-access
  assert site_dp.noise_multiplier == plan.update_noise_multiplier == 0.9
  assert site_dp.max_cohort == plan.slots and site_dp.coordinated and site_dp.grid is None
  _check_accounting(exp, plan, 5 / 20)


def test_secure_aggregation_shares_are_the_plans(recorded):
  """Site level with secagg: the sites add the plan's z (z_eff / the grid's factor) on the
  plan's grid; example level with dropouts: each share is sigma / sqrt(t), t = floor(K/2) + 1
  survivors (the complete graph's default threshold), K = 5."""
  c = tiny_config(**{"rounds": 2, "dp.level": "site", "dp.noise_multiplier": 1.0,
                     "dp.noise": "coordinated", "secagg.enabled": True,
                     "secagg.clip_range": 20.0})
  exp = experiment_lib.Experiment(c)
  plan = recorded[-1]
  site_dp = exp._site_dp()  # pylint: disable=protected-access
  assert site_dp.noise_multiplier == plan.update_noise_multiplier == 1.0
  assert plan.noise_multiplier < 1.0  # the accountant's z_eff: the grid costs noise
  levels = 2 * ((2 ** c.secagg.bits - 1) // (2 * plan.slots))
  assert site_dp.grid == (c.secagg.clip_range, levels)
  assert exp.algorithm is not None and site_dp.max_cohort == plan.slots

  e = tiny_config(**{"dp.level": "example", "dp.noise_multiplier": 1.2,
                     "dp.noise": "coordinated", "secagg.enabled": True,
                     "client.local_steps": 1, "client.optimizer": "sgd",
                     "server.weighting": "uniform",
                     "secagg.dropout_rate": 0.1})
  counts = np.full(20, 30)
  plan = mechanism.make_mechanism(e, counts, 100)
  noise = mechanism.example_noise(plan, e)
  assert noise.noise_multiplier == pytest.approx(1.2 / math.sqrt(5 // 2 + 1), rel=1e-15)
  assert noise.max_batch == plan.slots


def test_membership_targets_are_built_through_the_seam(recorded):
  c = tiny_config(**{"rounds": 2, "dp.level": "example", "dp.noise_multiplier": 1.3})
  exp = membership._one_device_experiment(c)  # pylint: disable=protected-access
  assert exp.privacy is recorded[-1]
  assert exp.example_dp.noise_multiplier == 1.3 == recorded[-1].noise_multiplier


def _vae_config(level, participation=1.0):
  c = runs.load_module(os.path.join(ROOT, "configs", "dpd_fvae.py"), "dpd_fvae").get_config(
      "decoder")
  c.data.partition = "quantity_skew"
  c.generative.model, c.generative.hidden, c.generative.latent_dim = "mlp", (16,), 2
  c.rounds, c.client.local_steps, c.client.batch_size = 2, 3, 10
  c.client.participation = participation
  c.dp.level, c.dp.randomness, c.dp.noise_multiplier = level, "seeded", 1.3
  c.eval.at_end, c.eval.every, c.checkpoint.every = False, 1, 100
  return c


@pytest.mark.parametrize("level,participation", [("example", 1.0), ("site", 0.5)])
def test_the_vae_builds_its_plan_and_guarantees_through_the_seam(recorded, tmp_path, level,
                                                                 participation):
  from fedjax_lab.generative import train
  c = _vae_config(level, participation)
  summary = train.run(c, str(tmp_path), verbose=False)
  assert len(recorded) == 1
  plan = recorded[0]
  p = summary["privacy"]
  assert p["noise_multiplier"] == plan.noise_multiplier == 1.3
  assert p["slots"] == plan.slots and p["sampling_prob"] == plan.sampling_prob
  assert p["guarantees"] == mechanism.vae_guarantee_entries(plan, plan.steps)
  counts = np.array([121, 94, 202, 118, 63, 153, 391, 274, 53, 31])
  if level == "example":
    q, steps = 10 / counts.min(), c.rounds * c.client.local_steps
  else:
    q, steps = participation, c.rounds
  assert summary["epsilon"] == pytest.approx(_rdp_epsilon(1.3, q, steps, c.dp.delta * (1 - 1e-3)),
                                             rel=1e-9)
  # The trainer samples and divides by the plan's numbers.
  fed = federated.FederatedVAE(models.CVAE(c.generative, 10, (64,)), c,
                               federated.make_plan(c, counts))
  assert fed.plan.noise_multiplier == 1.3
  if level == "site":
    assert fed.participation == plan.sampling_prob == 0.5
    assert fed.plan.expected_cohort == 0.5 * 10


def test_the_vae_refuses_other_mechanisms_in_one_line():
  from fedjax_lab.generative import train
  c = _vae_config("site")
  c.dp.mechanism = "tree"
  with pytest.raises(ConfigError, match=r"^dp\.mechanism: 'tree'.*use dp\.mechanism=gaussian$"):
    train.validate(c)
  with pytest.raises(ConfigError, match=r"^dp\.mechanism"):
    federated.make_plan(c, np.full(10, 50))


# Helpers that compute a sigma, a sampling rate, slots or noise shares: privacy/ only.
_PRIVATE_HELPERS = {"noise_multiplier_for", "site_rate", "max_sample_size",
                    "max_sample_size_over", "site_slots", "noise_shares"}


def _offences(path):
  tree = ast.parse(open(path).read())
  for node in ast.walk(tree):
    if isinstance(node, ast.Call):
      f = node.func
      name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
      if name in _PRIVATE_HELPERS:
        yield f"calls {name}"
      # sigma / sqrt(shares): a coordinated share computed outside privacy/.
      if name == "sqrt" and any("share" in getattr(n, "id", getattr(n, "attr", ""))
                                for n in ast.walk(node)):
        yield "takes sqrt of a share count"
    if isinstance(node, ast.ImportFrom):
      for a in node.names:
        if a.name in _PRIVATE_HELPERS:
          yield f"imports {a.name}"


def test_no_module_outside_privacy_computes_sigma_rates_slots_or_shares():
  package = os.path.join(ROOT, "fedjax_lab")
  offences = []
  for d, _, files in os.walk(package):
    if os.path.relpath(d, package).split(os.sep)[0] == "privacy":
      continue
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(d, f)
        offences += [f"{os.path.relpath(path, ROOT)}: {o}" for o in _offences(path)]
  assert not offences, offences


def test_the_scan_catches_an_offence(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("import math\nfrom fedjax_lab.privacy import accounting, sampling\n"
                 "s = accounting.noise_multiplier_for(1.0, 0.1, 10, 1e-5)\n"
                 "q = sampling.site_rate(8, 100)\n"
                 "share = s / math.sqrt(noise_shares)\n")
  assert sorted(_offences(str(bad))) == ["calls noise_multiplier_for", "calls site_rate",
                                         "takes sqrt of a share count"]
