"""Curvature optimizers under DP: the preconditioner comes from public data only.

References: a NumPy per-example loop (hand backprop of the test MLP, from test_dp_round) for
gradients, central finite differences of that NumPy gradient for Hessian-vector products, and
dp-accounting's epsilon through the experiment for "public data costs no privacy".
"""

import json
import os
import subprocess
import sys

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lab import client as client_lib
from fedjax_lab import optim
from fedjax_lab.client import ClientConfig, ExampleDP, make_client_update
from fedjax_lab.config import validate
from fedjax_lab.data import public as public_lib
from fedjax_lab.data.federated import from_partition
from fedjax_lab.errors import ConfigError
from fedjax_lab.experiment import Experiment
from fedjax_lab.optim import hessian
from fedjax_lab.optim.adahessian import adahessian
from fedjax_lab.optim.esgd import esgd
from fedjax_lab.privacy import clipping
from fedjax_lab.privacy.sampling import max_sample_size
from test_dp_round import _numpy_example_grads
from test_experiment import ROOT, tiny_config
from test_round import _mlp, _to_numpy

CURVATURE = sorted(optim.CURVATURE_OPTIMIZERS)


# --- The rule: which curvature each DP level covers (config errors, exit 2). ---


@pytest.mark.parametrize("name", CURVATURE)
def test_example_dp_curvature_without_public_data_is_refused(name):
  with pytest.raises(ConfigError) as e:
    validate(tiny_config(**{"dp.level": "example", "dp.noise_multiplier": 1.0,
                            "client.optimizer": name}))
  assert e.value.key == "client.optimizer" and "\n" not in str(e.value)
  assert "optim.public_data" in str(e.value)


def test_train_py_exits_2_with_one_line_for_dp_curvature_without_public_data(tmp_path):
  proc = subprocess.run(
      [sys.executable, "train.py", "--workdir", str(tmp_path), "--config",
       "configs/digits_dp.py", "--config.client.optimizer=esgd"],
      cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "XLA_FLAGS": ""})
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode == 2, proc.stderr
  assert len(lines) == 1 and "client.optimizer" in lines[0], proc.stderr
  assert "optim.public_data" in lines[0]


@pytest.mark.parametrize("overrides", [
    # With public data, example-level DP covers the curvature (it never sees private rows).
    {"dp.level": "example", "dp.noise_multiplier": 1.0, "client.optimizer": "esgd",
     "optim.public_data": "holdout:0.2"},
    # Site-level DP clips and noises the whole site update: the site's own curvature is in it.
    {"dp.level": "site", "dp.noise_multiplier": 1.0, "client.optimizer": "adahessian"},
    {"dp.level": "none", "client.optimizer": "sophia"},
])
def test_covered_curvature_passes_validation(overrides):
  validate(tiny_config(**overrides))


@pytest.mark.parametrize("dp", [{}, {"dp.level": "site", "dp.noise_multiplier": 1.0},
                                {"dp.level": "example", "dp.noise_multiplier": 1.0}])
def test_server_curvature_optimizer_needs_public_data_at_every_dp_level(dp):
  with pytest.raises(ConfigError) as e:
    validate(tiny_config(**{"server.optimizer": "esgd", **dp}))
  assert e.value.key == "server.optimizer" and "optim.public_data" in e.value.problem
  validate(tiny_config(**{"server.optimizer": "esgd", "optim.public_data": "holdout:0.2", **dp}))


def _write_npz(path, n, dim=64, classes=10, seed=0, **extra):
  rng = np.random.default_rng(seed)
  np.savez(path, x=rng.uniform(0, 1, (n, dim)).astype(np.float32),
           y=rng.integers(0, classes, n), **extra)
  return str(path)


@pytest.mark.parametrize("make_spec,words", [
    (lambda d: "holdout:1.5", "(0, 1)"),
    (lambda d: "holdout:x", "(0, 1)"),
    (lambda d: "digits", "data.name"),                  # the private data set itself
    (lambda d: "mnist_typo", "allowed"),
    (lambda d: str(d / "missing.npz"), "not found"),
    (lambda d: _write_npz(d / "narrow.npz", 20, dim=10), "same features"),
    (lambda d: _write_npz(d / "labels.npz", 20, classes=12), "label space"),
    (lambda d: _write_npz(d / "names.npz", 20, class_names=np.array(list("abcdefghij"))),
     "label space"),
])
def test_bad_public_data_is_one_line_naming_the_key(tmp_path, make_spec, words):
  with pytest.raises(ConfigError) as e:
    Experiment(tiny_config(**{"optim.public_data": make_spec(tmp_path),
                              "client.optimizer": "esgd"}))
  assert e.value.key == "optim.public_data", str(e.value)
  assert words in e.value.problem and "\n" not in str(e.value)


def test_public_batch_size_must_be_positive():
  with pytest.raises(ConfigError) as e:
    validate(tiny_config(**{"optim.public_batch_size": 0}))
  assert e.value.key == "optim.public_batch_size"


def test_holdout_is_disjoint_from_sites_and_test_and_stratified():
  from fedjax_lab.data import sources  # pylint: disable=g-import-not-at-top
  c = tiny_config(**{"optim.public_data": "holdout:0.2"})
  full_train, test = sources.load_dataset(c.data)
  train, public = public_lib.load("holdout:0.2", c.data, full_train)
  assert (len(train), len(public)) == (1200, 300)
  key = lambda x: {row.tobytes() for row in x}
  assert key(full_train.x) == key(train.x) | key(public.x)  # a split of the training split
  # Digits has a few exact duplicate images, so compare by index: the two sides partition
  # the 1500 training rows, and the test split is a different block of the file.
  keep, held = sources.stratified_split(full_train.y, 0.2, c.data.split_seed)
  assert not set(keep) & set(held) and len(keep) + len(held) == 1500
  np.testing.assert_array_equal(public.y, full_train.y[held])
  shares = np.bincount(public.y, minlength=10) / np.bincount(full_train.y, minlength=10)
  assert np.all(np.abs(shares - 0.2) < 0.02)
  # The sites hold exactly the remaining 1200 examples.
  exp = Experiment(c)
  assert int(exp.data.count.sum()) == 1200 and exp.data.public_x.shape == (300, 64)


def test_public_file_labels_are_mapped_by_class_name(tmp_path):
  from fedjax_lab.data import sources  # pylint: disable=g-import-not-at-top
  c = tiny_config()
  train, _ = sources.load_dataset(c.data)  # digits: classes named "0".."9"
  path = tmp_path / "public.npz"
  # Labels stored as names in another order: "7" is code 0 of the file, 7 of the training.
  np.savez(path, x=np.zeros((3, 64), np.float32), y=np.array(["7", "3", "7"]))
  _, public = public_lib.load(str(path), c.data, train)
  np.testing.assert_array_equal(np.sort(public.y), [3, 7, 7])


# --- The curvature is computed on public rows only. ---


def _dp_problem(private_seed, public_rows=12):
  rng = np.random.RandomState(private_seed)
  x = (rng.randn(30, 6) * 3).astype(np.float32)
  y = rng.randint(0, 3, 30).astype(np.int32)
  pub = np.random.RandomState(100)
  public_x = pub.randn(public_rows, 6).astype(np.float32)
  public_y = pub.randint(0, 3, public_rows).astype(np.int32)
  return from_partition(x, y, [np.arange(30)], 3, public_x, public_y)


def _example_dp(model, noise_multiplier=1.0, batch=6):
  return ExampleDP(clip_norm=0.3, noise_multiplier=noise_multiplier,
                   max_batch=max_sample_size(batch, 30),
                   clipped_grad_sum=clipping.make_clipped_grad_sum(
                       model.module, lambda o, t: -jax.nn.log_softmax(o)[t],
                       apply_kwargs={"train": False}, return_losses=True))


def _numpy_mean_grad(p, x, y):
  grads = _numpy_example_grads(p, x.astype(np.float64), y)
  return [sum(g[i] for g in grads) / len(grads) for i in range(4)]


def _numpy_hvp(p, x, y, v, h=1e-6):
  """H v of the mean loss on (x, y): central differences of the NumPy gradient, float64."""
  plus = _numpy_mean_grad([a + h * b for a, b in zip(p, v)], x, y)
  minus = _numpy_mean_grad([a - h * b for a, b in zip(p, v)], x, y)
  return [(a - b) / (2 * h) for a, b in zip(plus, minus)]


def _spy(lr):
  """A client optimizer whose step is -lr * grad(obj_fn): it shows what obj_fn is."""

  def update(updates, state, params=None, obj_fn=None, **extra):
    del updates, extra
    return jax.tree.map(lambda g: -lr * g, jax.grad(obj_fn)(params)), state

  return optax.GradientTransformationExtraArgs(optax.init_empty_state, update)


def test_objective_is_the_loss_of_public_rows_drawn_per_site_and_step():
  """Two local steps of the spy under example DP: the delta is the NumPy gradient descent on
  the public minibatches alone, the same for two different private data sets, and the rows
  are drawn from the site's key folded with the step."""
  model = _mlp()
  lr, steps, public_batch = 0.5, 2, 5
  update = make_client_update(model, _spy(lr), ClientConfig(steps, 6, True, 0.0, public_batch),
                              dp=_example_dp(model))
  data_a, data_b = _dp_problem(0), _dp_problem(1)
  params, ms = model.init(jax.random.key(0), np.zeros((2, 6), np.float32))
  key = jax.random.key(4)
  got_a = update(params, ms, data_a.idx[0], data_a.count[0], key, data_a).delta
  got_b = update(params, ms, data_b.idx[0], data_b.count[0], key, data_b).delta
  jax.tree.map(np.testing.assert_array_equal, got_a, got_b)
  public_x, public_y = np.asarray(data_a.public_x), np.asarray(data_a.public_y)
  p = p0 = _to_numpy(params)
  step_rows = []
  for t in range(steps):
    rng = jax.random.fold_in(jax.random.fold_in(key, client_lib._PUBLIC_STREAM), t)
    rows = np.asarray(client_lib.public_minibatch_rows(rng, len(public_x), public_batch))
    assert len(set(rows)) == public_batch and rows.max() < len(public_x)
    step_rows.append(set(rows))
    g = _numpy_mean_grad(p, public_x[rows], public_y[rows])
    p = [a - lr * b for a, b in zip(p, g)]
  assert step_rows[0] != step_rows[1]
  for a, b, c in zip(_to_numpy(got_a), p, p0):
    np.testing.assert_allclose(a, b - c, rtol=1e-5, atol=1e-7)
  # Another site's key draws other public rows.
  other = update(params, ms, data_a.idx[0], data_a.count[0], jax.random.key(5), data_a).delta
  assert max(jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()),
                                          other, got_a))) > 1e-4


def _fixed_probes(key, params):
  del key
  return hessian.rademacher_like(jax.random.key(123), params)


@pytest.mark.parametrize("name", ["esgd", "adahessian"])
def test_preconditioner_equals_numpy_curvature_of_the_public_batch(name):
  """One DP-SGD step with ESGD / AdaHessian against the same step with SGD (same key: same
  Poisson batch, same noise, so the same privatized gradient g): the preconditioned step is
  -lr g / (D + eps) with D = |H v| (ESGD) or |v * H v| (AdaHessian), H the Hessian of the
  PUBLIC batch's loss from NumPy, for two different private data sets."""
  model = _mlp()
  lr, eps = 0.5, 1e-4
  # b1 = b2 = 0.5 are exact in float32, so the bias corrections cancel exactly.
  build = {"esgd": esgd, "adahessian": adahessian}[name]
  tx = build(lr, b1=0.5, b2=0.5, eps=eps, probe_fn=_fixed_probes)
  sgd = optax.with_extra_args_support(optax.sgd(lr))
  params, ms = model.init(jax.random.key(0), np.zeros((2, 6), np.float32))
  v_tree = _fixed_probes(None, params)
  v = _to_numpy(v_tree)
  key = jax.random.key(4)

  def curvature(data):
    public_x, public_y = np.asarray(data.public_x), np.asarray(data.public_y)
    hv = _numpy_hvp(_to_numpy(params), public_x, public_y, v)  # all 12 rows: batch = set
    return [np.abs(a) if name == "esgd" else np.abs(a * b) for a, b in zip(hv, v)]

  def make_run(config, dp=None):
    updates = {"pre": jax.jit(make_client_update(model, tx, config, dp=dp)),
               "sgd": jax.jit(make_client_update(model, sgd, config, dp=dp))}
    return lambda which, data: _to_numpy(updates[which](
        params, ms, data.idx[0], data.count[0], key, data).delta)

  run = make_run(ClientConfig(1, 6, True, 0.0, public_batch_size=12), _example_dp(model))
  for private_seed in (0, 1):
    data = _dp_problem(private_seed)
    pre, plain = run("pre", data), run("sgd", data)
    assert max(np.abs(a).max() for a in plain) > 1e-3
    for a, b, d in zip(pre, plain, curvature(data)):
      np.testing.assert_allclose(a * (d + eps), b, rtol=2e-5, atol=1e-7)

  # Control: without a public set (no DP) the curvature is the private batch's, and differs.
  data = _dp_problem(0)
  no_public = data.replace(public_x=None, public_y=None)
  run = make_run(ClientConfig(1, 30, False, 0.0))
  pre, plain = run("pre", no_public), run("sgd", no_public)
  worst = max(np.abs(a * (d + eps) - b).max() for a, b, d in zip(pre, plain, curvature(data)))
  assert worst > 1e-3


@pytest.mark.parametrize("algorithm", ["fedavg", "scaffold"])
def test_server_esgd_preconditions_the_mean_update_with_the_public_curvature(algorithm):
  """One round with ESGD as the server optimizer against the same round with SGD (same sites,
  same keys: the same mean update m): the server step is m / (D + eps) with D = |H v|, H the
  Hessian of the PUBLIC set's loss at the global model, from NumPy."""
  from fedjax_lab.algorithms import fedavg, scaffold  # pylint: disable=g-import-not-at-top
  from fedjax_lab.algorithms import common  # pylint: disable=g-import-not-at-top
  model = _mlp()
  eps = 1e-4
  data = _dp_problem(0)
  data = from_partition(np.asarray(data.x), np.asarray(data.y),
                        [np.arange(15), np.arange(15, 30)], 3,
                        np.asarray(data.public_x), np.asarray(data.public_y))
  params, ms = model.init(jax.random.key(0), np.zeros((2, 6), np.float32))
  objective = client_lib.make_public_objective(model, 12)  # all 12 rows: the batch is the set

  def run(server_tx):
    if algorithm == "fedavg":
      update = make_client_update(model, optax.with_extra_args_support(optax.sgd(0.5)),
                                  ClientConfig(2, 5, False, 0.0))
      round_fn = fedavg.make_round(update, server_tx, cohort_size=2, server_objective=objective)
      state = fedavg.init_server_state(params, ms, server_tx, 2, False)
    else:
      gradient = common.make_site_gradient(model, 5, False, 0.0)
      round_fn = scaffold.make_round(gradient, server_tx, cohort_size=2, local_steps=2, lr=0.5,
                                     server_objective=objective)
      state = scaffold.init_state(params, ms, server_tx, 2)
    new, _ = jax.jit(round_fn)(state, data, jax.random.key(1), jax.random.key(2))
    return [a - b for a, b in zip(_to_numpy(new.params), _to_numpy(params))]

  pre = run(esgd(1.0, b1=0.5, b2=0.5, eps=eps, probe_fn=_fixed_probes))
  plain = run(optax.with_extra_args_support(optax.sgd(1.0)))
  assert max(np.abs(a).max() for a in plain) > 1e-3
  hv = _numpy_hvp(_to_numpy(params), np.asarray(data.public_x), np.asarray(data.public_y),
                  _to_numpy(_fixed_probes(None, params)))
  for a, b, d in zip(pre, plain, hv):
    np.testing.assert_allclose(a * (np.abs(d) + eps), b, rtol=2e-5, atol=1e-7)


def test_train_py_runs_server_adahessian_on_public_data(tmp_path):
  """Two rounds of a server AdaHessian step on public curvature: the test loss falls below
  log(10), the cross-entropy of the near-uniform prediction a fresh model starts from (closed
  form), and the parameters differ from the same run with a plain SGD server step, so the
  curvature really entered the update."""
  def run(optimizer, workdir):
    proc = subprocess.run(
        [sys.executable, "train.py", "--workdir", str(workdir), "--config",
         "configs/digits_fedavg.py", "--config.rounds=2", "--config.log.progress=False",
         "--config.log.tensorboard=False", f"--config.server.optimizer={optimizer}",
         "--config.server.lr=0.1", "--config.optim.public_data=holdout:0.1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads((workdir / "summary.json").read_text())
  summary = run("adahessian", tmp_path / "adahessian")
  assert summary["test_loss"] < np.log(10) - 0.1
  assert summary["params_sha256"] != run("sgd", tmp_path / "sgd")["params_sha256"]


# --- End to end: public data costs no privacy. ---


def test_dp_esgd_with_public_data_reports_the_epsilon_of_dp_sgd(tmp_path):
  """train.py with dp.level=example, esgd and a public file prints the same finite epsilon
  as the same run with sgd: the accountant composes the privatized gradients only."""
  public_file = _write_npz(tmp_path / "public.npz", 40)
  overrides = ["--config.rounds=2", "--config.data.num_sites=20", "--config.cohort_size=5",
               "--config.client.batch_size=8", "--config.dp.level=example",
               "--config.dp.noise_multiplier=1.3", "--config.log.progress=False",
               "--config.log.tensorboard=False", "--config.client.lr=0.05"]
  proc = subprocess.run(
      [sys.executable, "train.py", "--workdir", str(tmp_path / "esgd"), "--config",
       "configs/digits_fedavg.py", *overrides, "--config.client.optimizer=esgd",
       f"--config.optim.public_data={public_file}", "--config.optim.public_batch_size=16"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  esgd_summary = json.loads((tmp_path / "esgd" / "summary.json").read_text())
  assert "public examples of optim.public_data" in proc.stderr
  c = tiny_config(**{"rounds": 2, "cohort_size": 5, "client.batch_size": 8,
                     "dp.level": "example", "dp.noise_multiplier": 1.3, "client.lr": 0.05})
  sgd_summary = Experiment(c).run(str(tmp_path / "sgd"))
  eps = esgd_summary["epsilon"]
  p = esgd_summary["privacy"]  # recomputed with dp_accounting directly from its own fields
  event = dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
      p["sampling_prob"], dp_accounting.GaussianDpEvent(1.3)), p["steps"])
  assert p["noise_multiplier"] == 1.3 and p["steps"] == 2 * c.client.local_steps
  assert p["sampling_prob"] == pytest.approx(8 / 75)  # batch / site size: 1500 digits, 20 sites
  assert eps == pytest.approx(
      dp_accounting.rdp.RdpAccountant().compose(event).get_epsilon(p["accountant_delta"]),
      rel=1e-9)
  assert eps == sgd_summary["epsilon"]
  assert f"epsilon={eps:.3f}" in proc.stdout
  assert esgd_summary["privacy"] == sgd_summary["privacy"]
  # Same privacy, other steps: the public curvature preconditioned the private gradients.
  assert esgd_summary["params_sha256"] != sgd_summary["params_sha256"]
