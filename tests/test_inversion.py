"""Gradient inversion (fedjax_lab/attacks): closed forms, the lab's own client update and round
as references, NumPy SSIM/PSNR, and the attack on a batch-1 digit with its BN ablation."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

from fedjax_lab.attacks import inversion as inv
from fedjax_lab.attacks import record
from fedjax_lab.client import ClientConfig, make_client_update
from fedjax_lab.data.federated import from_partition
from fedjax_lab.models import make_model
from fedjax_lab.privacy import randomness

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_D = load_digits()
X = (_D.data / 16.0).astype(np.float32)
Y = _D.target.astype(np.int32)


def _model(name="cnn", norm="batch", features=(4,), hidden=()):
  mc = ml_collections.ConfigDict(dict(name=name, features=features, hidden=hidden, norm=norm,
                                      dropout=0.0, image_shape=()))
  return make_model(mc, 10, X[:2])


def _site_update(model, params, ms, rows, batch_size, steps, lr=0.1, seed=0, rng=None):
  n = len(rows)
  data = from_partition(X[rows], Y[rows], [np.arange(n)], 10)
  cu = make_client_update(model, optax.sgd(lr), ClientConfig(
      local_steps=steps, batch_size=batch_size, shuffle=True, prox_mu=0.0))
  rng = jax.random.key(seed) if rng is None else rng
  return jax.jit(cu)(params, ms, data.idx[0], jnp.int32(n), rng, data), rng


def _local(n, steps, lr=0.1):
  return inv.Local(tx=optax.sgd(lr), lr=lr, local_steps=steps, num_images=n,
                   image_shape=(8, 8, 1), data_shape=(64,), num_classes=10)


def test_batch1_fully_connected_first_layer_closed_form():
  model = _model("mlp")
  params, ms = model.init(jax.random.key(1), X[:2])
  out, _ = _site_update(model, params, ms, [5], batch_size=1, steps=1, lr=0.3)
  x = inv.analytic_first_layer(out.delta["Dense_0"]["kernel"], out.delta["Dense_0"]["bias"])
  np.testing.assert_allclose(np.asarray(x), X[5], atol=1e-4)
  assert int(inv.analytic_label(out.delta)) == Y[5]


@pytest.mark.parametrize("impl", ["threefry2x32", "chacha20"])
def test_replay_is_the_lab_client_update(impl):
  """3 shuffled local steps at batch 2 over 4 images, BatchNorm: the replay on the true images
  gives the lab's update and statistics, with the site key back from its saved data (as
  target_for reads a record; chacha20: dp.randomness=secret)."""
  model = _model()
  params, ms = model.init(jax.random.key(2), X[:2])
  rows = [10, 11, 12, 13]
  key = randomness.secret_key(range(8)) if impl == "chacha20" else jax.random.key(0)
  out, key = _site_update(model, params, ms, rows, batch_size=2, steps=3, rng=key)
  rec = {"rng": np.asarray(jax.random.key_data(key)), "rng_impl": randomness.impl_name(key)}
  rng = randomness.wrap_key_data(rec["rng"], rec["rng_impl"])
  positions = inv.schedule(rng, 4, 2, 3)
  delta, new_ms = jax.jit(lambda: inv.replay(model, _local(4, 3), params, ms, jnp.asarray(X[rows]),
                                             jax.nn.one_hot(Y[rows], 10), positions, rng))()
  for a, b in zip(jax.tree.leaves(delta), jax.tree.leaves(out.delta)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)
  for a, b in zip(jax.tree.leaves(new_ms), jax.tree.leaves(out.model_state)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)
  # The revealed batch statistics: exact for one full-batch step.
  out1, _ = _site_update(model, params, ms, rows, batch_size=4, steps=1)
  star = inv.revealed_batch_stats(ms, out1.model_state, 1)
  stats = inv.batch_stats(model, params, ms, jnp.asarray(X[rows]))
  for a, b in zip(jax.tree.leaves(star), jax.tree.leaves(stats)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-3)


def test_conv_as_matmul_is_the_models_convolution():
  """The attack's im2col convolutions (conv="matmul") compute the model's nn.Conv: outputs,
  BN statistics and the second-order gradient the attack takes, to float rounding; ResNet's
  strided convolutions fall back to XLA's, its stride-1 ones (no bias) are converted."""
  model = _model(features=(4, 8), hidden=(16,))
  params, ms = model.init(jax.random.key(0), X[:2])
  x = jnp.asarray(X[:3])

  def weight_grad_norm(x):  # the shape of the attack's objective: d/dx of a weight gradient
    def loss(p):
      logits, _ = model.apply(p, ms, x, True)
      return inv.soft_cross_entropy(logits, jax.nn.one_hot(Y[:3], 10)).mean()
    return inv._flat(jax.grad(loss)(params)).sum()

  ref_out, ref_ms = model.apply(params, ms, x, True)
  ref_dx = jax.grad(weight_grad_norm)(x)
  with inv.conv_as_matmul():
    out, new_ms = model.apply(params, ms, x, True)
    dx = jax.grad(weight_grad_norm)(x)
    assert "conv_general_dilated" not in str(jax.make_jaxpr(jax.grad(weight_grad_norm))(x))
  assert "conv_general_dilated" in str(jax.make_jaxpr(jax.grad(weight_grad_norm))(x))
  np.testing.assert_allclose(out, ref_out, atol=1e-5)
  for a, b in zip(jax.tree.leaves(new_ms), jax.tree.leaves(ref_ms)):
    np.testing.assert_allclose(a, b, atol=1e-5)
  np.testing.assert_allclose(dx, ref_dx, atol=1e-4, rtol=1e-4)
  resnet = _model(name="resnet", norm="group", features=(4, 8))  # bias-free, strides 1 and 2
  rp, rms = resnet.init(jax.random.key(0), X[:2])
  ref = resnet.apply(rp, rms, x, False)[0]
  with inv.conv_as_matmul():
    np.testing.assert_allclose(resnet.apply(rp, rms, x, False)[0], ref, atol=1e-5)


def test_one_step_update_inversion_equals_gradient_inversion():
  """With local_steps=1 the unrolled-update attack is the gradient attack on -lr * grad."""
  model = _model("mlp", hidden=(16,))
  params, ms = model.init(jax.random.key(3), X[:2])
  out, rng = _site_update(model, params, ms, [20, 21], batch_size=2, steps=1)
  cfg = dict(iterations=25, restarts=2, labels="known")
  target = inv.make_target(params, ms, out.delta, out.model_state, rng, 2, 2, 1,
                           labels=Y[[20, 21]])
  x_unrolled = inv.attack_sites(model, _local(2, 1), dict(cfg, replay="unrolled"),
                                inv.stack([target]), jax.random.key(4))[0]
  x_gradient = inv.attack_sites(model, _local(2, 1), dict(cfg, replay="gradient"),
                                inv.stack([target]), jax.random.key(4))[0]
  np.testing.assert_allclose(x_unrolled, x_gradient, atol=2e-4)
  assert float(jnp.abs(x_unrolled - jax.random.uniform(jax.random.key(0), (1, 2, 2, 64))).max()
               ) > 0.05  # it moved


def _ssim_numpy(a, b, size=5, sigma=1.0, k1=0.01, k2=0.03):
  """Wang et al. 2004 SSIM, Gaussian window, valid positions, mean: an independent NumPy one."""
  g = np.exp(-0.5 * ((np.arange(size) - (size - 1) / 2) / sigma) ** 2)
  w = np.outer(g, g) / np.outer(g, g).sum()
  H, W = a.shape
  vals = []
  for i in range(H - size + 1):
    for j in range(W - size + 1):
      pa, pb = a[i:i + size, j:j + size], b[i:i + size, j:j + size]
      ma, mb = (w * pa).sum(), (w * pb).sum()
      va, vb = (w * pa ** 2).sum() - ma ** 2, (w * pb ** 2).sum() - mb ** 2
      cov = (w * pa * pb).sum() - ma * mb
      c1, c2 = k1 ** 2, k2 ** 2
      vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
  return float(np.mean(vals))


def test_ssim_psnr_rdlv_against_numpy():
  a, b = X[0].reshape(8, 8), X[1].reshape(8, 8)
  s = float(inv.ssim(a[..., None], b[..., None]))
  assert s == pytest.approx(_ssim_numpy(a, b), abs=1e-4)
  assert float(inv.ssim(a[..., None], a[..., None])) == pytest.approx(1.0, abs=1e-6)
  mse = np.mean((a - b) ** 2)
  assert float(inv.psnr(a[..., None], b[..., None])) == pytest.approx(
      10 * np.log10(1 / mse), abs=1e-3)
  prior = X[1500:].mean(0)
  leak = inv.leakage(np.stack([X[[1, 0]], X[[0, 1]]]), X[[0, 1]], prior, (8, 8, 1))
  np.testing.assert_allclose(leak["ssim"], 1.0, atol=1e-6)  # matched one to one
  ps = np.array([_ssim_numpy(prior.reshape(8, 8), X[i].reshape(8, 8)) for i in (0, 1)])
  np.testing.assert_allclose(leak["rdlv"], (1 - ps) / ps, rtol=1e-3)


@pytest.mark.slow
def test_attack_batch1_digit_leaks_and_bn_statistics_help():
  """Two sites of one digit each, one local step at batch 1, BatchNorm model at init: the
  attack's SSIM is far above the prior's, and dropping the BN-statistics term raises the
  error (ablation)."""
  model = _model(features=(16, 32), hidden=(64,))
  params, ms = model.init(jax.random.key(0), X[:2])
  rows = [1, 2]
  targets = []
  for s, r in enumerate(rows):
    out, rng = _site_update(model, params, ms, [r], batch_size=1, steps=1, seed=100 + s)
    targets.append(inv.make_target(params, ms, out.delta, out.model_state, rng, 1, 1, 1))
    assert int(targets[-1].labels[0]) == Y[r]  # analytic label
  cfg = dict(iterations=250, restarts=4)
  prior = X[1500:].mean(0)
  mse, ssim = {}, {}
  for bn in (0.01, 0.0):
    xs = inv.attack_sites(model, _local(1, 1), dict(cfg, bn_weight=bn), inv.stack(targets),
                          jax.random.key(1))[0]
    leaks = [inv.leakage(xs[i], X[[r]], prior, (8, 8, 1)) for i, r in enumerate(rows)]
    ssim[bn] = np.array([l["ssim"][0] for l in leaks])
    best = [inv.matched(xs[i], X[[r]], (8, 8, 1)) for i, r in enumerate(rows)]
    mse[bn] = np.mean([np.mean((b.reshape(-1) - X[r]) ** 2) for b, r in zip(best, rows)])
    if bn:
      prior_ssim = np.array([l["prior_ssim"][0] for l in leaks])
      assert np.all(ssim[bn] > prior_ssim + 0.4) and np.all(ssim[bn] > 0.85), (ssim, prior_ssim)
  assert mse[0.01] < mse[0.0], mse


def test_recorded_update_is_the_one_the_round_used(tmp_path):
  """train with attack.record_sites=(-1,): the recorded update of the one-site cohort is the
  change of the global model (server SGD lr 1) and its BN statistics are the new global ones."""
  from fedjax_lab.config import default_config
  from fedjax_lab.experiment import Experiment
  c = default_config()
  c.rounds, c.cohort_size = 2, 1
  c.data.name, c.data.num_sites = "digits", 30
  c.model.name, c.model.features, c.model.hidden, c.model.norm = "cnn", (4, 8), (16,), "batch"
  c.client.local_steps, c.client.batch_size = 2, 3
  c.attack.record_sites, c.attack.record_rounds = (-1,), (2,)
  c.log.progress = c.log.tensorboard = False
  exp = Experiment(c)
  exp.run(str(tmp_path))
  paths = record.list_records(str(tmp_path))
  assert len(paths) == 1 and "round2_site" in paths[0]
  rec = record.load(paths[0])
  assert rec["rng_impl"] == "threefry2x32" and len(rec["rng"]) == 2  # dp.randomness=seeded
  after1 = Experiment(c).run_rounds(Experiment(c).init_state(), 1)
  moved = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), exp.final_state.params,
                       after1.params)
  for a, b in zip(jax.tree.leaves(moved), jax.tree.leaves(rec["delta"])):
    np.testing.assert_allclose(a, b, atol=1e-6)
  for a, b in zip(jax.tree.leaves(exp.final_state.model_state),
                  jax.tree.leaves(rec["model_state"])):
    np.testing.assert_allclose(a, b, atol=1e-6)
  for a, b in zip(jax.tree.leaves(after1.params), jax.tree.leaves(rec["global_params"])):
    np.testing.assert_allclose(a, b, atol=0)


def test_cli_attacks_a_fresh_site_and_writes_leakage_and_grid(tmp_path):
  """`python -m fedjax_lab.attacks.inversion` as docs/attacks.md runs it (a fresh one-image site,
  tiny CNN, 20 Adam steps): leakage.json holds SSIM/PSNR/RDLV that agree with each other
  (RDLV = (SSIM - prior SSIM) / prior SSIM) and the PNG grid exists."""
  import json
  import subprocess
  import sys
  out = tmp_path / "inv"
  proc = subprocess.run(
      [sys.executable, "-m", "fedjax_lab.attacks.inversion", "--config",
       os.path.join(ROOT, "configs", "inversion_digits.py"), "--config.rounds=1",
       "--config.model.features=4,8", "--config.model.hidden=16,",
       "--config.attack.inversion.iterations=20", "--config.attack.inversion.restarts=2",
       "--config.eval.bootstrap=0", f"--out={out}"],
      capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "round1_site0: images=1" in proc.stdout
  result = json.load(open(out / "leakage.json"))
  assert result["attack"]["iterations"] == 20
  (row,) = result["results"]
  for s, p, r in zip(row["ssim"], row["prior_ssim"], row["rdlv"]):
    assert -1 <= s <= 1 and r == pytest.approx((s - p) / p, rel=1e-5)
  assert (out / "round1_site0.png").stat().st_size > 0
