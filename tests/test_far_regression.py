"""Regression end to end (data.name=synthetic_regression) and the FAR loss (issue 18 item 6).

FAR is checked against a NumPy loop over the pairs of a batch (Zhu & Jerby, arXiv
2402.06104v2: the derivative terms as pairwise double sums, reconciled by
alpha log mean L_k^(1/alpha)), never against the O(B) form losses.py computes.
"""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
from test_experiment import set_keys

from fedjax_lab import losses
from fedjax_lab.config import default_config, validate
from fedjax_lab.errors import ConfigError


def _far_loop(f, y, alpha, base):
  """FAR of one batch, written as the paper's pairwise sums with Python loops."""
  n = len(f)
  l_c = sum(abs(f[i] - y[i]) if base == "mae" else (f[i] - y[i]) ** 2 for i in range(n)) / n
  s_f = max(np.std(f, ddof=1), 1e-7)
  s_y = max(np.std(y, ddof=1), 1e-7)
  l_diff = l_ndiff = 0.0
  for i in range(n):
    for j in range(n):
      l_diff += ((f[i] - f[j]) - (y[i] - y[j])) ** 2
      l_ndiff += ((f[i] - f[j]) / s_f - (y[i] - y[j]) / s_y) ** 2
  terms = [l_c + 1e-7, l_diff / (4 * n * n) + 1e-7, l_ndiff / (4 * n * n) + 1e-7]
  return alpha * math.log(sum(t ** (1 / alpha) for t in terms) / 3)


@pytest.mark.parametrize("alpha,base", [(1.0, "mae"), (0.5, "mae"), (2.0, "mse"), (0.1, "mse")])
def test_far_matches_a_numpy_loop_over_pairs(alpha, base):
  rng = np.random.default_rng(0)
  y = rng.normal(size=9)
  f = 0.7 * y + 0.3 * rng.normal(size=9) + 0.2
  loss = losses.make("far", alpha, base)
  got = float(loss.batch(jnp.asarray(f, jnp.float32)[:, None], jnp.asarray(y, jnp.float32)))
  assert got == pytest.approx(_far_loop(f, y, alpha, base), rel=1e-5, abs=1e-6)


def test_far_weights_zero_padding_away_and_derivative_terms_vanish_on_a_shift():
  rng = np.random.default_rng(1)
  y = rng.normal(size=6).astype(np.float32)
  f = (y + rng.normal(size=6) * 0.1).astype(np.float32)
  far = losses.make("far").batch
  pad = lambda a: jnp.asarray(np.concatenate([a, [5.0, -3.0]]), jnp.float32)
  w = jnp.asarray([1 / 6] * 6 + [0.0, 0.0], jnp.float32)
  assert float(far(pad(f)[:, None], pad(y), w)) == pytest.approx(
      float(far(jnp.asarray(f)[:, None], jnp.asarray(y))), rel=1e-5)
  # A constant offset leaves both pairwise terms at 0: only L_c sees it.
  l_c, l_diff, l_ndiff = losses.far_terms(jnp.asarray(y) + 0.5, jnp.asarray(y))
  assert float(l_c) == pytest.approx(0.5, rel=1e-6)
  assert abs(float(l_diff)) < 1e-10 and abs(float(l_ndiff)) < 1e-6


def test_mse_batch_is_the_mean_of_its_example_form():
  rng = np.random.default_rng(2)
  out, y = rng.normal(size=(7, 1)).astype(np.float32), rng.normal(size=7).astype(np.float32)
  mse = losses.make("mse")
  assert float(mse.batch(out, y)) == pytest.approx(float(np.mean((out[:, 0] - y) ** 2)), rel=1e-6)
  assert float(mse.example(out[3], y[3])) == pytest.approx(float((out[3, 0] - y[3]) ** 2))
  assert losses.make("far").example is None  # a batch loss has no per-example form


def _regression(**overrides):
  c = default_config()
  c.rounds, c.cohort_size = 20, 4
  c.data.name = "synthetic_regression"
  c.data.regression.num_examples = 400
  c.data.num_sites = 8
  c.model.hidden = (32, 32)
  c.client.optimizer, c.client.lr = "adam", 0.01
  c.client.local_steps, c.client.batch_size = 10, 32
  c.checkpoint.every = 20
  c.log.progress, c.log.tensorboard = False, False
  return set_keys(c, overrides)


def test_far_run_writes_rmse_and_r2_and_beats_the_mean(tmp_path):
  from fedjax_lab.experiment import Experiment
  summary = Experiment(_regression(**{"model.loss": "far"})).run(str(tmp_path))
  on_disk = json.loads((tmp_path / "summary.json").read_text())
  assert on_disk["test_r2"] == summary["test_r2"] and "test_accuracy" not in on_disk
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert {"test_rmse", "test_r2", "test_loss"} <= set(rows[-1])
  assert summary["test_loss"] == pytest.approx(summary["test_rmse"] ** 2, rel=1e-6)
  # R^2 > 0 is beating the mean of the test targets (sin(x): std ~0.71).
  assert summary["test_r2"] > 0.5 and summary["test_rmse"] < 0.5


def test_mse_run_beats_the_mean():
  from fedjax_lab.experiment import Experiment
  exp = Experiment(_regression(**{"model.loss": "mse"}))
  result = exp.evaluate(exp.run_rounds(exp.init_state(), exp.config.rounds))
  y = np.asarray(exp.test.y, np.float64)
  assert result.rmse < 0.7 * y.std() and result.r2 > 0.5


def test_example_dp_clips_the_per_example_squared_error():
  """dp.level=example takes its per-example loss from the registry (losses.Loss.example)."""
  from fedjax_lab.experiment import Experiment
  exp = Experiment(_regression(**{"model.loss": "mse", "dp.level": "example",
                                  "dp.noise_multiplier": 1.0}))
  params = exp.init_state().params
  x, y = jnp.asarray(exp.train.x[:4]), jnp.asarray(exp.train.y[:4])
  _, _, per_example = exp.example_dp.clipped_grad_sum(params, x, y, jnp.ones(4), 1.0)
  out, _ = exp.model.apply(params, {}, x, False)
  np.testing.assert_allclose(np.asarray(per_example), np.asarray((out[:, 0] - y) ** 2),
                             rtol=1e-5)


@pytest.mark.parametrize("overrides,key,words", [
    ({"model.loss": "far"}, "model.loss", "regression loss"),                 # on digits
    ({"model.loss": "hinge"}, "model.loss", "unknown"),
    ({"data.name": "synthetic_regression"}, "model.loss", "classification loss"),
    ({"data.name": "synthetic_regression", "model.loss": "far", "dp.level": "example",
      "dp.noise_multiplier": 1.0}, "model.loss", "batch loss"),
    ({"data.name": "synthetic_regression", "model.loss": "far", "model.far_alpha": 0.0},
     "model.far_alpha", "> 0"),
    ({"data.name": "synthetic_regression", "model.loss": "mse", "data.partition": "dirichlet"},
     "data.partition", "class label"),
    ({"data.name": "synthetic_regression", "model.loss": "mse",
      "eval.centralized_baseline": True}, "eval.centralized_baseline", "classification only"),
])
def test_config_errors_name_the_key(overrides, key, words):
  with pytest.raises(ConfigError) as e:
    validate(set_keys(default_config(), overrides))
  assert e.value.key == key and words in str(e.value)


def test_far_with_site_level_dp_is_allowed():
  validate(set_keys(default_config(), {
      "data.name": "synthetic_regression", "model.loss": "far", "dp.level": "site",
      "dp.noise_multiplier": 1.0}))


def test_far_gradient_is_finite_when_every_prediction_is_equal():
  """A batch of equal predictions (e.g. every ReLU dead) has zero variance; the std's floor
  must not turn sqrt's infinite derivative at 0 into NaN (a study run diverged on it)."""
  import jax
  y = jnp.asarray([0.1, 0.5, -0.3, 0.9], jnp.float32)
  grad = jax.grad(lambda o: losses.make("far").batch(o, y))(jnp.full((4, 1), 0.2, jnp.float32))
  assert np.all(np.isfinite(np.asarray(grad)))
