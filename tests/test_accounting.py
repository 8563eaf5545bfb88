"""fedjax_lab.privacy.accounting against dp-accounting called directly.

References are built here by hand from dp-accounting's public classes (and two
published figures), never from the module under test.
"""

import math

import dp_accounting
from dp_accounting import pld
from dp_accounting import rdp
import pytest

from fedjax_lab.privacy import accounting

ABADI_Q = 256 / 60000
ABADI_SIGMA = 1.1
ABADI_STEPS = 14040
ABADI_DELTA = 1e-5


def reference_epsilon(sigma, q, steps, delta, name):
  """dp-accounting directly: the Poisson-sampled Gaussian, self-composed."""
  gaussian = dp_accounting.GaussianDpEvent(sigma)
  event = gaussian if q == 1 else dp_accounting.PoissonSampledDpEvent(
      q, gaussian)
  if name == "rdp":
    acc = rdp.RdpAccountant()
  else:
    acc = pld.PLDAccountant(
        dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
        value_discretization_interval=1e-4)
  return acc.compose(event, steps).get_epsilon(delta)


SETTINGS = [
    # (sigma, q, steps, delta)
    (ABADI_SIGMA, ABADI_Q, ABADI_STEPS, ABADI_DELTA),
    (0.8, 0.01, 1000, 1e-5),
    (2.0, 0.1, 200, 1e-6),
    (1.0, 1.0, 10, 1e-5),  # q = 1: plain Gaussian composition.
    (4.0, 0.5, 50, 1e-3),
    (0.6, 0.001, 5000, 1e-5),
]


@pytest.mark.parametrize("name", ["rdp", "pld"])
@pytest.mark.parametrize("sigma,q,steps,delta", SETTINGS)
def test_epsilon_equals_dp_accounting(sigma, q, steps, delta, name):
  got = accounting.epsilon(sigma, q, steps, delta, accountant=name)
  want = reference_epsilon(sigma, q, steps, delta, name)
  assert got == pytest.approx(want, rel=1e-9)


def test_abadi_mnist_published_figures():
  # Abadi et al. 2016 MNIST setting; RDP 2.594 (TF Privacy's
  # compute_dp_sgd_privacy), PLD 2.380.
  rdp_eps = accounting.epsilon(ABADI_SIGMA, ABADI_Q, ABADI_STEPS, ABADI_DELTA)
  pld_eps = accounting.epsilon(ABADI_SIGMA, ABADI_Q, ABADI_STEPS, ABADI_DELTA,
                               accountant="pld")
  assert rdp_eps == pytest.approx(2.594, abs=1e-3)
  assert pld_eps == pytest.approx(2.380, abs=1e-3)
  assert pld_eps < rdp_eps  # PLD is the tighter accountant.


def test_edge_cases():
  assert accounting.epsilon(0.0, 0.1, 10, 1e-5) == math.inf
  assert accounting.epsilon(0.0, 0.1, 10, 1e-5, accountant="pld") == math.inf
  assert accounting.epsilon(1.0, 0.1, 0, 1e-5) == 0.0
  assert accounting.epsilon(0.0, 0.1, 0, 1e-5) == 0.0


@pytest.mark.parametrize("name,target,q,steps", [
    ("rdp", 2.0, ABADI_Q, ABADI_STEPS),
    ("rdp", 8.0, 0.01, 1000),
    ("rdp", 3.0, 1.0, 10),
    ("pld", 2.0, ABADI_Q, ABADI_STEPS),
    ("pld", 1.0, 0.1, 100),
])
def test_noise_multiplier_for_is_smallest_feasible(name, target, q, steps):
  delta = 1e-5
  sigma = accounting.noise_multiplier_for(target, q, steps, delta,
                                          accountant=name)
  assert reference_epsilon(sigma, q, steps, delta, name) <= target
  assert reference_epsilon(sigma * (1 - 1e-3), q, steps, delta, name) > target
  if name == "pld":  # PLD is tighter, so it needs less noise than RDP.
    assert sigma < accounting.noise_multiplier_for(target, q, steps, delta)


def test_dp_event_structure():
  want = dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(
          0.25, dp_accounting.GaussianDpEvent(1.5)), 7)
  assert accounting.dp_event(1.5, 0.25, 7) == want
  assert accounting.dp_event(1.5, 1.0, 7) == dp_accounting.SelfComposedDpEvent(
      dp_accounting.GaussianDpEvent(1.5), 7)


def test_incremental_accountant_matches_direct():
  acc = accounting.Accountant(ABADI_SIGMA, ABADI_Q, ABADI_DELTA)
  for steps in (1, 100, ABADI_STEPS):
    assert acc.epsilon_after(steps) == pytest.approx(
        reference_epsilon(ABADI_SIGMA, ABADI_Q, steps, ABADI_DELTA, "rdp"),
        rel=1e-9)
  assert acc.epsilon_after(0) == 0.0
  assert acc.dp_event(5) == accounting.dp_event(ABADI_SIGMA, ABADI_Q, 5)
  pld_acc = accounting.Accountant(2.0, 0.1, 1e-6, accountant="pld")
  assert pld_acc.epsilon_after(200) == pytest.approx(
      reference_epsilon(2.0, 0.1, 200, 1e-6, "pld"), rel=1e-9)


def test_fixed_size_batches_use_replace_one_with_doubled_sensitivity():
  got = accounting.epsilon_fixed_size_batches(ABADI_SIGMA, 256, 60000,
                                              ABADI_STEPS, ABADI_DELTA)
  acc = rdp.RdpAccountant(
      neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
  # Noise std sigma * C against replace-one sensitivity 2 C.
  want = acc.compose(
      dp_accounting.SampledWithoutReplacementDpEvent(
          60000, 256, dp_accounting.GaussianDpEvent(ABADI_SIGMA / 2)),
      ABADI_STEPS).get_epsilon(ABADI_DELTA)
  assert got == pytest.approx(want, rel=1e-9)
  assert got == pytest.approx(24.06, abs=0.01)
  # Much worse than (never reported as) the Poisson figure.
  assert got > 5 * accounting.epsilon(ABADI_SIGMA, ABADI_Q, ABADI_STEPS,
                                      ABADI_DELTA)
  with pytest.raises(NotImplementedError, match="rdp"):
    accounting.epsilon_fixed_size_batches(ABADI_SIGMA, 256, 60000, 10,
                                          ABADI_DELTA, accountant="pld")


@pytest.mark.parametrize("kwargs,match", [
    (dict(delta=0.0), "delta"),
    (dict(delta=1.0), "delta"),
    (dict(delta=-1e-5), "delta"),
    (dict(noise_multiplier=-0.1), "noise_multiplier"),
    (dict(noise_multiplier=float("nan")), "noise_multiplier"),
    (dict(sampling_prob=0.0), "sampling_prob"),
    (dict(sampling_prob=1.5), "sampling_prob"),
    (dict(steps=-1), "steps"),
    (dict(accountant="moments"), "accountant"),
])
def test_epsilon_validation(kwargs, match):
  args = dict(noise_multiplier=1.0, sampling_prob=0.1, steps=10, delta=1e-5)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    accounting.epsilon(**args)


@pytest.mark.parametrize("kwargs,match", [
    (dict(target_epsilon=0.0), "target_epsilon"),
    (dict(target_epsilon=-1.0), "target_epsilon"),
    (dict(delta=1.0), "delta"),
    (dict(sampling_prob=0.0), "sampling_prob"),
    (dict(steps=-3), "steps"),
    (dict(steps=0), "steps"),
])
def test_noise_multiplier_for_validation(kwargs, match):
  args = dict(target_epsilon=1.0, sampling_prob=0.1, steps=10, delta=1e-5)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    accounting.noise_multiplier_for(**args)


def test_accountant_validation():
  with pytest.raises(ValueError, match="delta"):
    accounting.Accountant(1.0, 0.1, 1.5)
  with pytest.raises(ValueError, match="sampling_prob"):
    accounting.Accountant(1.0, 0.0, 1e-5)
