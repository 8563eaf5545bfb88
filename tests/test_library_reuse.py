"""Where a library already computes what the lab computes, the answers agree (issue 13, item 7)."""

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lab.models import cross_entropy
from fedjax_lab.optim import hessian
from fedjax_lab.privacy import accounting


@pytest.mark.parametrize("q,steps,eps", [(0.01, 1000, 2.0), (0.1, 200, 4.0), (1.0, 10, 8.0)])
def test_sigma_calibration_agrees_with_dp_accounting_calibrate_dp_mechanism(q, steps, eps):
  """The lab's RDP calibration (with its guarantee epsilon(sigma) <= target, checked) lands
  within its 1e-4 tolerance of dp_accounting's generic bisection."""
  delta = 1e-5
  ours = accounting.noise_multiplier_for(eps, q, steps, delta, "rdp")
  theirs = dp_accounting.calibrate_dp_mechanism(
      dp_accounting.rdp.RdpAccountant,
      lambda s: dp_accounting.SelfComposedDpEvent(
          dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(s)), steps),
      eps, delta, tol=1e-6)
  assert ours == pytest.approx(theirs, rel=2e-4)
  assert accounting.epsilon(ours, q, steps, delta, "rdp") <= eps


def test_cross_entropy_agrees_with_optax_losses():
  logits = jax.random.normal(jax.random.key(0), (64, 10)) * 5
  labels = jax.random.randint(jax.random.key(1), (64,), 0, 10)
  np.testing.assert_allclose(
      np.asarray(cross_entropy(logits, labels)),
      np.asarray(optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels)),
      rtol=1e-6, atol=1e-6)


def test_hutchinson_diagonal_agrees_with_optax_contrib_on_the_same_probes():
  """optax.contrib's hutchinson_estimator_diag_hessian (Sophia's) and the lab's
  hessian.hutchinson_diagonal compute v * (H v) alike: equal on the same Rademacher probe.
  The lab keeps its own for num_probes > 1, injectable probes and per-site probe keys
  (optim.reseed_probes)."""
  a = jax.random.normal(jax.random.key(2), (5, 5))
  obj = lambda p: 0.5 * p["w"] @ (a @ a.T) @ p["w"] + jnp.sum(jnp.sin(p["w"]))
  params = {"w": jax.random.normal(jax.random.key(3), (5,))}
  seed = jax.random.PRNGKey(7)
  tx = optax.contrib.hutchinson_estimator_diag_hessian(seed)
  theirs, _ = tx.update(params, tx.init(params), params, obj_fn=obj)
  _, subkey = jax.random.split(seed)  # the probe key optax draws its signs with
  probe = optax.tree.random_like(subkey, params, jax.random.rademacher, dtype=jnp.float32)
  ours = hessian.hutchinson_diagonal(obj, params, jax.random.key(5),
                                     probe_fn=lambda key, p: probe)
  np.testing.assert_allclose(np.asarray(ours["w"]), np.asarray(theirs["w"]), rtol=1e-6)
