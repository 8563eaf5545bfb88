"""DPD-fVAE (fedjax_lab/generative): losses against closed forms, synthetic sets, the round's
seams under sync=decoder (the lab's aggregator chain), what epsilon covers, secret randomness
and resume, and one end-to-end run on digits."""

import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import stats

from fedjax_lab import runs
from fedjax_lab.data import federated as fed_data
from fedjax_lab.generative import evaluate, federated, models
from fedjax_lab.privacy import accounting

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
dpd_fvae = runs.load_module(os.path.join(ROOT, "configs", "dpd_fvae.py"), "dpd_fvae")


def tiny_config(sync="decoder", level="none", encoder="private", kind="conv"):
  """A few rounds of a small VAE on 4 sites; kind="mlp" compiles fastest (the DP tests)."""
  c = dpd_fvae.get_config("all" if sync == "all" else "decoder")
  c.generative.model = kind
  c.generative.hidden = (16,)
  c.rounds = 3
  c.data.num_sites = 4
  c.generative.conv_features = (4, 8)
  c.generative.latent_dim = 2
  c.client.local_steps, c.client.batch_size = 2, 5
  c.dp.level, c.dp.encoder = level, encoder
  c.dp.noise_multiplier = 1.0
  c.eval.at_end = False
  c.eval.every = 1
  c.checkpoint.every = 100
  return c


def tiny_data(num_sites=4, per_site=12, seed=0):
  rng = np.random.default_rng(seed)
  n = num_sites * per_site
  x = rng.uniform(size=(n, 64)).astype(np.float32)
  y = (np.arange(n) % 10).astype(np.int32)
  sites = np.array_split(rng.permutation(n), num_sites)
  return fed_data.from_partition(x, y, sites, 10)


# ----------------------------------------------------------------------------- closed forms


def test_kl_matches_closed_form_per_dimension():
  mean = np.array([[0.3, -1.2, 0.0]], np.float32)
  logvar = np.array([[0.5, -0.7, 0.0]], np.float32)
  sigma = np.exp(0.5 * logvar)
  # KL(N(m, s^2) || N(0, 1)) = log(1/s) + (s^2 + m^2) / 2 - 1/2, summed over dimensions.
  expected = np.sum(-np.log(sigma) + (sigma ** 2 + mean ** 2) / 2 - 0.5)
  got = float(models.kl_to_standard_normal(jnp.asarray(mean), jnp.asarray(logvar))[0])
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  assert float(models.kl_to_standard_normal(jnp.zeros((1, 4)), jnp.zeros((1, 4)))[0]) == 0


def test_reconstruction_losses_match_closed_forms():
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(2, 6)).astype(np.float32)
  logits = rng.normal(size=(2, 6)).astype(np.float32) * 3
  p = 1 / (1 + np.exp(-logits.astype(np.float64)))
  bce = -np.sum(x * np.log(p) + (1 - x) * np.log(1 - p), axis=-1)
  np.testing.assert_allclose(models.reconstruction_nll(x, logits, None, "bernoulli"), bce,
                             rtol=1e-5)
  log_scale = rng.normal(size=(6,)).astype(np.float32) * 0.3
  nll = -np.sum(stats.norm.logpdf(x, loc=logits, scale=np.exp(log_scale)), axis=-1)
  np.testing.assert_allclose(models.reconstruction_nll(x, logits, log_scale, "gaussian"), nll,
                             rtol=1e-5)
  np.testing.assert_allclose(models.reconstruction_nll(x, logits, None, "mse"),
                             0.5 * np.sum((x - logits) ** 2, axis=-1), rtol=1e-5)


def test_elbo_loss_is_reconstruction_plus_beta_kl():
  c = tiny_config()
  vae = models.CVAE(c.generative, 10, (64,))
  params = vae.init(jax.random.key(0))
  x = jnp.asarray(np.random.default_rng(1).uniform(size=(3, 64)), jnp.float32)
  y, eps = jnp.array([0, 3, 9]), jnp.zeros((3, 2))
  loss, rec, kl = vae.losses(params, x, y, eps)
  np.testing.assert_allclose(loss, rec + c.generative.beta * kl, rtol=1e-6)
  # example_loss (the per-example clipping path) agrees with the batched loss.
  one = vae.example_loss(params, {"x": x[1], "y": y[1], "eps": eps[1]})
  np.testing.assert_allclose(one, loss[1], rtol=1e-5)


# ----------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("kind", ["conv", "mlp"])
def test_synthetic_set_shapes_and_label_balance(kind):
  c = tiny_config()
  c.generative.model = kind
  c.generative.likelihood = "bernoulli" if kind == "conv" else "gaussian"
  vae = models.CVAE(c.generative, 10, (64,))
  dec = vae.init(jax.random.key(0))["decoder"]
  x, y = evaluate.synthesize(vae, dec, seed=3, num=105)
  assert x.shape == (105, 64) and x.dtype == np.float32 and y.shape == (105,)
  counts = np.bincount(y, minlength=10)
  assert counts.min() == 10 and counts.max() == 11  # 105 = 10 * 10 + 5
  if kind == "conv":
    assert x.min() >= 0 and x.max() <= 1  # Bernoulli means
  x2, y2 = evaluate.synthesize(vae, dec, seed=3, num=105)
  np.testing.assert_array_equal(x, x2)


def test_frechet_distance_closed_form():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(4000, 3))
  b = rng.normal(size=(4000, 3)) * 2 + 1
  # N(0, I) vs N(1, 4I): |mu|^2 + tr(I + 4I - 2 * 2I) = 3 + 3.
  assert abs(evaluate.frechet_distance(a, b) - 6.0) < 0.3
  assert evaluate.frechet_distance(a, a) < 1e-6


# ----------------------------------------------------------------------------- the round


def make(config, data):
  vae = models.CVAE(config.generative, 10, (64,))
  plan = federated.make_plan(config, np.asarray(data.count))
  return vae, federated.FederatedVAE(vae, config, plan)


def test_sync_decoder_encoders_stay_at_sites_and_never_enter_the_aggregate():
  c, data = tiny_config("decoder", kind="mlp"), tiny_data()
  vae, fed = make(c, data)
  state = fed.init(0, data.num_sites)
  enc0 = state["sites"]["encoder"]
  keys = federated.round_keys(0)
  outputs = jax.jit(fed.round_outputs)
  for _ in range(2):
    state, metrics, messages, joined = outputs(state, data, keys)
  dec_structure = jax.tree.structure(vae.init(jax.random.key(0))["decoder"])
  # What leaves a site, what the server aggregates and keeps: the decoder only.
  assert set(messages) == {"decoder"}
  assert jax.tree.structure(messages["decoder"]) == dec_structure
  assert set(state["server"]["params"]) == {"decoder"}
  update, _ = fed.aggregate(messages, joined, data.count, 1, keys["client"])
  assert jax.tree.structure(update) == jax.tree.structure(messages)
  weights = np.asarray(data.count, np.float64)  # the mean weighted by site size
  expected = jax.tree.map(lambda m: np.tensordot(weights / weights.sum(), m, axes=1),
                          messages)
  for a, b in zip(jax.tree.leaves(update), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  # Every site trained its own encoder: sites differ from each other and from their start.
  enc = state["sites"]["encoder"]
  for leaf, leaf0 in zip(jax.tree.leaves(enc), jax.tree.leaves(enc0)):
    assert not np.allclose(leaf[0], leaf[1])
    assert not np.allclose(leaf, leaf0)
  assert np.isfinite(float(metrics.loss))


def test_sync_all_shares_encoder_and_decoder():
  c, data = tiny_config("all", kind="mlp"), tiny_data()
  _, fed = make(c, data)
  state = fed.init(0, data.num_sites)
  state, _, messages, _ = jax.jit(fed.round_outputs)(state, data, federated.round_keys(0))
  assert set(messages) == {"encoder", "decoder"}
  assert "encoder" not in state["sites"]


@pytest.mark.parametrize("encoder", ["private", "paper"])
def test_example_dp_clips_what_the_mode_says(encoder):
  """sigma = 0, one example: the private mode bounds the WHOLE gradient by clip_norm, the
  paper's mode only the decoder's (its encoder gradient is not clipped)."""
  c = tiny_config("decoder", "example", encoder, kind="mlp")
  c.dp.noise_multiplier, c.dp.clip_norm = 0.0, 1e-3
  data = tiny_data()
  vae, fed = make(c, data)
  params = vae.init(jax.random.key(0))
  batch = {"x": data.x[:1], "y": data.y[:1], "eps": jnp.ones((1, 2))}
  grads = fed._dp_gradients(params, batch, jnp.ones((1,)), 1.0, jax.random.key(0))
  total = float(federated.tree_norm(grads))
  dec = float(federated.tree_norm(grads["decoder"]))
  assert dec <= 1e-3 * (1 + 1e-4)
  if encoder == "private":
    assert total <= 1e-3 * (1 + 1e-4)
  else:
    assert float(federated.tree_norm(grads["encoder"])) > 1e-2  # unclipped


def test_site_dp_clips_each_released_update():
  c = tiny_config("decoder", "site")
  c.dp.noise_multiplier, c.dp.clip_norm = 0.0, 0.5
  data = tiny_data()
  _, fed = make(c, data)
  messages = {"decoder": {"w": jnp.stack([jnp.full((3,), 10.0), jnp.full((3,), 0.01),
                                          jnp.zeros(3), jnp.full((3,), jnp.nan)])}}
  joined = jnp.array([True, True, True, False])
  update, metrics = fed.aggregate(messages, joined, data.count, 0, jax.random.key(0))
  clipped = 0.5 / math.sqrt(3) * 1 + 0.01  # per coordinate: site 0 clipped, site 1 not
  np.testing.assert_allclose(update["decoder"]["w"], np.full(3, clipped / 4), rtol=1e-5)
  assert int(metrics["nonfinite_updates"]) == 0  # site 3 sat out: its NaN is never sent


@pytest.mark.parametrize("joined", [[True, True, True, False], [False] * 4])
def test_site_dp_noise_on_the_mean_is_sigma_clip_over_expected_sites(joined):
  """dp.level=site through aggregators.site_dp: the released mean carries N(0, (sigma C /
  (participation x sites))^2) per coordinate, whoever joined (an empty round too)."""
  c = tiny_config("decoder", "site")
  c.dp.noise_multiplier, c.dp.clip_norm = 2.0, 0.5
  c.client.participation = 0.5
  data = tiny_data()
  _, fed = make(c, data)
  messages = {"decoder": {"w": jnp.zeros((4, 20000))}}
  update, _ = fed.aggregate(messages, jnp.array(joined), data.count, 3, jax.random.key(7))
  std = float(np.std(np.asarray(update["decoder"]["w"])))
  assert std == pytest.approx(2.0 * 0.5 / (0.5 * 4), rel=0.03)


def test_secret_randomness_changes_the_noise_and_seeded_does_not():
  """Two secrets (experiment.draw_secret, OS entropy) train different decoders from the same
  config; the seed alone trains the same decoder twice. The initialisation is seeded."""
  from fedjax_lab import experiment
  c = tiny_config("decoder", "example", kind="mlp")
  data = tiny_data()
  _, fed = make(c, data)
  state = fed.init(0, data.num_sites)
  step = jax.jit(fed.round)
  decoder = lambda keys: jax.tree.leaves(step(state, data, keys)[0]["server"]["params"])
  one, two = experiment.draw_secret(), experiment.draw_secret()
  assert one != two
  a, b = decoder(federated.round_keys(0, one)), decoder(federated.round_keys(0, two))
  assert any(not np.array_equal(x, y) for x, y in zip(a, b))
  s1, s2 = decoder(federated.round_keys(0)), decoder(federated.round_keys(0))
  for x, y in zip(s1, s2):
    np.testing.assert_array_equal(x, y)
  # The secret's last word alone changes the draws: all 256 bits reach the DP mechanism.
  last = list(one[:7]) + [one[7] ^ 1]
  c = decoder(federated.round_keys(0, last))
  assert any(not np.array_equal(x, y) for x, y in zip(a, c))
  # The same secret gives the same draws (what a resume relies on).
  for x, y in zip(a, decoder(federated.round_keys(0, list(one)))):
    np.testing.assert_array_equal(x, y)


def test_randomness_resolves_as_in_the_lab():
  """dp.randomness=auto: seeded on the bundled public data, secret on the user's own, exactly
  as the lab's privacy plan resolves it for the same data."""
  from fedjax_lab import config as lab_config
  from fedjax_lab.privacy.plan import privacy_plan
  expected = {"digits": "seeded", "pbmc68k": "seeded", "file": "secret", "tfds:mnist": "secret"}
  for name, want in expected.items():
    c = tiny_config("decoder", "example")
    c.data.name = name
    lab = lab_config.default_config()
    lab.data.name, lab.dp.level, lab.dp.noise_multiplier = name, "example", 1.0
    counts = np.full(lab.data.num_sites, 50)
    assert federated.make_plan(c, np.full(4, 12)).randomness == want
    assert privacy_plan(lab, counts).randomness == want
    c.dp.randomness = "seeded"
    assert federated.make_plan(c, np.full(4, 12)).randomness == "seeded"


@pytest.mark.parametrize("encoder", ["private", "paper"])
def test_epsilon_covers_exactly_the_decoders_noisy_steps(tmp_path, encoder):
  from fedjax_lab.generative import train
  c = tiny_config("decoder", "example", encoder, kind="mlp")
  c.data.num_sites = 10
  summary = train.run(c, str(tmp_path), verbose=False)
  p = summary["privacy"]
  steps = c.rounds * c.client.local_steps  # every round, every local step is one DP step
  assert p["steps"] == p["site_dp_steps_max"] == steps
  assert p["sampling_prob"] == pytest.approx(c.client.batch_size / 150)
  assert summary["epsilon"] == pytest.approx(accounting.epsilon(
      p["noise_multiplier"], p["sampling_prob"], steps, p["accountant_delta"], "rdp"))
  assert p["sound"] == (encoder == "private")
  assert ("NONE PROVEN" in p["guarantee"]) == (encoder == "paper")
  assert summary["released_params"] == summary["decoder_params"]
  # The site-level plan composes one step a round, and never calls its encoders noisy.
  site = federated.make_plan(tiny_config("decoder", "site"), np.full(10, 150))
  assert site.steps == 3 and site.encoder == "none" and site.sound


def test_resume_continues_exactly_with_its_secret(tmp_path, monkeypatch):
  """dp.randomness=secret: the secret is written in the checkpoint meta only, and a resume
  continues with it (not with the fresh one it draws), ending bit-identical to an
  uninterrupted run with that secret; site encoders are checkpointed too."""
  from fedjax_lab import checkpoint, experiment
  from fedjax_lab.generative import train
  # 8 words (256 bits), one above 2^31: the meta's JSON must give back every uint32 as it was.
  first, fresh = [11, 22, 33, 44, 55, 66, 77, 0xFFFFFFF0], [1, 2, 3, 4, 5, 6, 7, 8]
  draws = iter([first, first, fresh])  # run a; run b; b's resume
  monkeypatch.setattr(experiment, "draw_secret", lambda: list(next(draws)))

  def config(rounds):
    c = tiny_config("decoder", "example", kind="mlp")
    c.checkpoint.every, c.data.num_sites, c.rounds = 1, 10, rounds
    c.dp.randomness = "secret"
    return c

  straight = train.run(config(2), str(tmp_path / "a"), verbose=False)
  train.run(config(1), str(tmp_path / "b"), verbose=False)
  resumed = train.run(config(2), str(tmp_path / "b"), verbose=False)
  a, b = checkpoint.read_state(str(tmp_path / "a")), checkpoint.read_state(str(tmp_path / "b"))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  assert "encoder" in a["sites"]  # site encoders are checkpointed too
  assert straight["privacy"]["randomness"] == resumed["privacy"]["randomness"] == "secret"
  ckpt = checkpoint.Checkpointer(str(tmp_path / "b"))
  _, meta = ckpt.restore(2, checkpoint.read_state(str(tmp_path / "b")))
  ckpt.close()
  assert meta["dp_secret"] == first
  for name in ("run.json", "summary.json", "metrics.jsonl"):
    with open(tmp_path / "b" / name) as f:
      assert "dp_secret" not in f.read()


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_non_private_federated_vae_on_digits_makes_useful_synthetic_data(tmp_path):
  """Stated accuracy: a classifier trained ONLY on synthetic digits from a non-private
  DPD-fVAE (40 rounds, 10 sites) reaches >= 0.80 on the real test set (measured 0.90)."""
  from fedjax_lab.generative import sample, train
  c = dpd_fvae.get_config()
  c.rounds = 40
  c.eval.at_end = False
  train.run(c, str(tmp_path), verbose=False)
  out = str(tmp_path / "synth.npz")
  sample.main(["--workdir", str(tmp_path), "--out", out, "--num", "1500"])
  with np.load(out) as f:
    x, y = f["x"], f["y"]
  assert x.shape == (1500, 64) and np.bincount(y).tolist() == [150] * 10
  from fedjax_lab.data import sources
  _, test = sources.load_dataset(c.data)
  model, params = evaluate.train_classifier(x, y, 10, (128,), 400, seed=0)
  acc = evaluate.accuracy(model, params, test.x, test.y)
  assert acc >= 0.80, acc
