"""LiRA and its metrics against independent references (NumPy float64, scikit-learn, scipy),
shadows vmapped vs one by one, and LiRA on models trained with and without DP."""

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

import jax
from fedjax_lab import sharding
from fedjax_lab.attacks import audit, membership as mia
from fedjax_lab.config import default_config
from fedjax_lab.experiment import Experiment
from fedjax_lab.privacy import accounting


def test_logit_confidence_matches_float64_and_is_stable():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(50, 7)) * 3
  y = rng.integers(0, 7, 50)
  p = np.exp(z - z.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  py = p[np.arange(50), y]
  np.testing.assert_allclose(mia.logit_confidence(z, y), np.log(py) - np.log1p(-py), atol=1e-4)
  # p_y = 1 - 1e-40 in float32 would give log(0): the logsumexp form stays finite and exact.
  big = np.array([[100.0, 0.0, 0.0]])
  np.testing.assert_allclose(mia.logit_confidence(big, np.array([0])), 100 - np.log(2), rtol=1e-6)
  with pytest.raises(ValueError, match="labels must be"):
    mia.logit_confidence(z, y[:3])


def test_roc_auc_and_tpr_interval_match_references():
  rng = np.random.default_rng(1)
  labels = rng.random(3000) < 0.5
  scores = rng.normal(size=3000) + labels + np.round(rng.normal(size=3000), 1) * 0  # ties
  scores = np.round(scores, 1)
  assert mia.auc(scores, labels) == pytest.approx(skm.roc_auc_score(labels, scores), abs=1e-12)
  fpr, tpr = mia.roc_curve(scores, labels)  # sklearn's: checked by brute force over thresholds
  thresholds = np.unique(scores)[::-1]
  np.testing.assert_allclose(fpr, np.r_[0, [np.mean(scores[~labels] >= t) for t in thresholds]])
  np.testing.assert_allclose(tpr, np.r_[0, [np.mean(scores[labels] >= t) for t in thresholds]])
  r = mia.tpr_at_fpr(scores, labels, 0.01)
  s_in, s_out = scores[labels], scores[~labels]
  thr = np.sort(s_out)[::-1][int(0.01 * len(s_out))]
  k = int(np.sum(s_in > thr))
  assert r["tpr"] == k / len(s_in) and r["fpr"] <= 0.01
  n = len(s_in)  # Clopper-Pearson as beta quantiles (binomtest's is what the lab calls)
  ci = (stats.beta.ppf(0.025, k, n - k + 1), stats.beta.ppf(0.975, k + 1, n - k))
  assert (r["tpr_lo"], r["tpr_hi"]) == pytest.approx(ci, abs=1e-9)
  assert mia.clopper_pearson(0, 20) == (0.0, pytest.approx(1 - 0.025 ** (1 / 20)))


def test_lira_on_gaussian_shadows_beats_loss_at_low_fpr():
  # Per-example means differ; a member's phi is shifted by 1: LiRA calibrates per example.
  rng = np.random.default_rng(2)
  k, n = 40, 500
  base = rng.normal(0, 3, n)
  mask = mia.random_subsets(rng, n, k)
  phi = base + mask * 1.0 + rng.normal(0, 0.3, (k, n))
  res = mia.summarize(mia.run_attacks(phi, phi, mask, num_targets=10))
  assert res["lira_online"]["at_fpr_0.01"]["tpr"] > 0.5
  assert res["loss"]["at_fpr_0.01"]["tpr"] < 0.1
  with pytest.raises(ValueError, match="need target"):
    mia.lira_online(phi[0], phi[1:], mask[1:, :3])


def _experiment(dp_epsilon=None, steps=150):
  c = default_config()
  c.data.name, c.data.num_sites, c.cohort_size, c.rounds = "digits", 1, 1, 1
  c.model.name, c.model.hidden = "mlp", (64,)
  c.client.optimizer, c.client.lr = "sgd", 0.5
  c.client.local_steps, c.client.batch_size = steps, 20
  c.server.optimizer, c.server.lr = "sgd", 1.0
  c.log.progress = False
  if dp_epsilon is not None:
    c.dp.level, c.dp.clip_norm, c.dp.delta = "example", 1.0, 1e-5
    c.dp.noise_multiplier = 6.0  # epsilon 1.63 at the shadows' q = 20/100, 150 steps
  return Experiment(c, mesh=sharding.make_mesh(jax.devices()[:1]))


@pytest.fixture(scope="module")
def plain_shadows():
  """32 shadows without DP, vmapped over the 8 test devices (the sharded path): compiled once
  and shared by the equality and the LiRA tests (compilation is most of their time)."""
  return _shadows(_experiment())


def _shadows(exp, num_models=32, pool=200, mesh=None):
  rng = np.random.default_rng(4)
  x, y = exp.train.x[:pool], exp.train.y[:pool]
  mask = mia.random_subsets(rng, pool, num_models)
  idx, count = mia.site_tables(mask, pool // 2, rng)  # one site of 100 per model
  trainer = mia.ShadowTrainer(exp, rounds=1)
  params, _ = trainer.train(x, y, idx, count, np.arange(num_models), mesh=mesh)
  return dict(exp=exp, trainer=trainer, x=x, y=y, mask=mask, idx=idx, count=count,
              params=params)


def _lira(shadows):
  s = shadows
  phi, nl = mia.model_scores(s["exp"].model, s["params"], s["x"], s["y"])
  return mia.run_attacks(phi, nl, s["mask"], num_targets=16)["lira_online_fixed_var"]


def test_vmapped_shadows_equal_one_by_one(plain_shadows):
  s = plain_shadows
  assert s["trainer"]._many._cache_size() == 1  # pylint: disable=protected-access
  # The first 4 shadows again, one jitted single-model program per shadow, on one device.
  loop, _ = s["trainer"].train(s["x"], s["y"], s["idx"][:4], s["count"][:4], np.arange(4),
                               vmapped=False)
  for a, b in zip(jax.tree.leaves(s["params"]), jax.tree.leaves(loop)):
    np.testing.assert_allclose(np.asarray(a)[:4], np.asarray(b), atol=1e-5)


def test_lira_without_dp_reaches_high_tpr_at_low_fpr(plain_shadows):
  scores, labels = _lira(plain_shadows)
  r = mia.tpr_at_fpr(scores, labels, 1e-3)
  assert r["tpr_lo"] > 0.02, r  # > 20x the 0.1% of a random guess, with 95% confidence


@pytest.mark.slow
def test_lira_with_dp_stays_within_epsilon():
  exp = _experiment(dp_epsilon=True)
  sigma, steps, q = exp.privacy.noise_multiplier, exp.config.client.local_steps, 20 / 100
  eps = accounting.epsilon(sigma, q, steps, 1e-5, "pld")  # the shadows' own q (100 examples)
  assert eps < 2.0
  # One device: the sharded path is checked above, and its compile costs ~2x more here.
  scores, labels = _lira(_shadows(exp, mesh=sharding.make_mesh(jax.devices()[:1])))
  for f in (1e-3, 1e-2):
    r = mia.tpr_at_fpr(scores, labels, f)
    assert r["tpr_lo"] <= np.exp(eps) * max(r["fpr"], 1 / r["n_out"]) + 1e-5, (eps, r)
  bound = audit.epsilon_lower_bound(scores[labels], scores[~labels], 1e-5)
  assert bound < eps


def test_pca_extractor_matches_sklearn_whitened_pca():
  from sklearn.decomposition import PCA  # pylint: disable=g-import-not-at-top
  from fedjax_lab.attacks import shots  # pylint: disable=g-import-not-at-top
  from fedjax_lab.data import sources  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(5)
  x = (rng.normal(size=(120, 30)) @ rng.normal(size=(30, 30))).astype(np.float32)
  public = sources.Dataset(x=x[:80], y=np.zeros(80, np.int32), num_classes=1, columns={},
                           name="public")
  ours = shots._pca_extractor(public, 5)(x[80:])  # pylint: disable=protected-access
  ref = PCA(5, whiten=True, svd_solver="full").fit(x[:80].astype(np.float64)).transform(x[80:])
  signs = np.sign(np.sum(ours * ref, axis=0))  # components are defined up to sign
  np.testing.assert_allclose(ours * signs, ref, rtol=1e-3, atol=1e-3)
