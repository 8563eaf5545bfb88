"""One federated round of the conditional VAE, vmapped over sites, in three seams.

  client_update(shared, site, site_idx, site_count, rng, data) -> (message, site', metrics)
      ONE site's local training (jax.vmap'ped over sites by `round`). `shared` is what the
      server broadcasts: {"decoder"} under generative.sync="decoder", {"encoder", "decoder"}
      under "all". `site` is what stays at the site between rounds: its encoder and the
      encoder's optimizer state (sync="decoder" only) and `dp_steps`, the number of noisy
      DP-SGD steps it has taken. `message` is the site's update of `shared` (new - old): the
      ONLY thing that leaves the site; under sync="decoder" it has no encoder leaves. The
      lab's client seam (client.make_local_update) does not fit it: docs/design.md says why.
  aggregate(messages, joined, counts, t, client_key) -> (update, metrics)
      the lab's aggregator chain (fedjax_lab/aggregators.py) on the released messages:
      `aggregators.weighted()` (the mean weighted by site size; dp.level none or example) or
      `aggregators.site_dp(...)` (dp.level site, DP-FedAvg: each message clipped to
      dp.clip_norm, coordinated Gaussian noise shares so the sum carries std
      noise_multiplier * clip_norm, / the expected number of participants).
  server_update(server, update) -> server'
      the server optimizer (SGD with momentum, paper: lr 1, momentum 0.5) on -update.

Keys: `round_keys(seed, secret)`, the scheme of fedjax_lab/experiment.py (Experiment.
set_secret): one root per purpose, folded from jax.random.key(seed); under
dp.randomness=secret the DP mechanism's purposes (local training: minibatches, Poisson
samples, DP-SGD noise, the reparameterisation noise; participation; the site-level noise,
which hangs off the client key as in aggregators.py) fold from the secret instead, and only
the initialisation stays seeded. The round folds in the round index (from the state) and the
site id, so a resumed run with the same keys is identical.
Example-level DP-SGD is in `_dp_gradients` (dp.encoder decides what is clipped and noised;
fedjax_lab/privacy/vae.py).
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_lab import aggregators
from fedjax_lab import keys as lab_keys
from fedjax_lab.data.federated import FederatedData
from fedjax_lab.privacy import clipping, mechanism, randomness, sampling
from fedjax_lab.privacy.shares import expected_batch

PyTree = Any
SYNCS = ("decoder", "all")
# Purposes of the keys derived from the seed (or the secret); fixed numbers, so adding one
# never shifts the others. _AGGREGATE is reserved: the site noise hangs off the client key.
_INIT, _CLIENT, _PARTICIPATION, _AGGREGATE = 0, 1, 2, 3
# The purposes of the DP mechanism's draws: from the secret under dp.randomness=secret.
_SECRET_PURPOSES = (("client", _CLIENT), ("participation", _PARTICIPATION))


def round_keys(seed: int, secret: list[int] | None = None) -> dict:
  """{"client", "participation"}: the round's roots, as experiment.Experiment.set_secret
  derives the lab's: fold_in(root, purpose) with root = jax.random.key(seed), or with a
  secret (experiment.draw_secret(), dp.randomness=secret) root = the secret's ChaCha20 key
  (privacy/randomness.secret_key, 256 bits, as in the lab). The initialisation (FederatedVAE.init) always folds from the seed: it depends on no data."""
  root = jax.random.key(seed)
  if secret is not None:
    root = randomness.secret_key(secret)
  return lab_keys.purpose_keys(root, _SECRET_PURPOSES)


class RoundMetrics(NamedTuple):
  loss: jax.Array          # mean minibatch loss (rec + beta * kl) over sites and steps
  reconstruction: jax.Array
  kl: jax.Array
  participants: jax.Array  # sites that took part this round
  # Poisson-sampled examples dropped for want of slots, at every site (joined or not): the
  # plan gives any overflow probability <= overflow_bound, so train.py stops on one.
  overflow: jax.Array
  nonfinite_updates: jax.Array  # site DP: released updates that were not finite (sent as 0)


def shared_keys(sync: str) -> tuple[str, ...]:
  if sync not in SYNCS:
    raise ValueError(f"generative.sync: unknown {sync!r}; allowed: {', '.join(SYNCS)}")
  return ("decoder",) if sync == "decoder" else ("encoder", "decoder")


def make_client_tx(client_config) -> optax.GradientTransformation:
  if client_config.optimizer == "adam":
    return optax.adam(client_config.lr)
  if client_config.optimizer == "sgd":
    return optax.sgd(client_config.lr)
  raise ValueError(f"client.optimizer: unknown {client_config.optimizer!r}; allowed: adam, sgd")


def make_server_tx(server_config) -> optax.GradientTransformation:
  return optax.sgd(server_config.lr, momentum=server_config.momentum or None)


def make_plan(config, site_counts):
  """The run's privacy plan (privacy/vae.py), built by privacy/ from the config's numbers."""
  return mechanism.make_vae_mechanism(
      config.dp, site_counts, batch_size=config.client.batch_size,
      local_steps=config.client.local_steps, rounds=config.rounds,
      participation=config.client.participation, sync=config.generative.sync,
      data_name=config.data.name)


def tree_norm(tree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


class FederatedVAE:
  """The round's pieces for one config; `round` puts them together under one jit."""

  def __init__(self, vae, config, plan=None):
    self.vae = vae
    self.config = config
    self.plan = plan  # privacy/vae.py Plan (privacy.mechanism.make_vae_mechanism) or None
    self.sync = config.generative.sync
    self.keys = shared_keys(self.sync)
    self.client_tx = make_client_tx(config.client)
    self.server_tx = make_server_tx(config.server)
    self.local_steps = int(config.client.local_steps)
    self.batch_size = int(config.client.batch_size)
    self.example_dp = plan is not None and plan.level == "example"
    self.site_dp = plan is not None and plan.level == "site"
    # Under site DP the rate the accountant composes; otherwise no guarantee rests on it.
    self.participation = (plan.sampling_prob if self.site_dp
                          else float(config.client.participation))

  # --------------------------------------------------------------------------- state

  def init(self, seed: int, num_sites: int) -> dict:
    """{"server": {"params", "opt"}, "sites": {...stacked over sites}, "round": 0}; from the
    seed under every dp.randomness (the initialisation depends on no data)."""
    base = jax.random.fold_in(jax.random.key(seed), _INIT)
    params = self.vae.init(jax.random.fold_in(base, num_sites + 1))
    shared = {k: params[k] for k in self.keys}
    sites = {"dp_steps": jnp.zeros((num_sites,), jnp.int32)}
    if self.sync == "decoder":
      # Each site draws its own encoder; it never leaves the site.
      encoders = jax.vmap(lambda s: self.vae.init(jax.random.fold_in(base, s))["encoder"])(
          jnp.arange(num_sites))
      sites["encoder"] = encoders
      sites["enc_opt"] = jax.vmap(self.client_tx.init)(encoders)
    return {"server": {"params": shared, "opt": self.server_tx.init(shared)}, "sites": sites,
            "round": jnp.zeros((), jnp.int32)}

  # --------------------------------------------------------------------------- gradients

  def _batch(self, rng, site_idx, site_count, data: FederatedData):
    """(batch dict, weights [m], normaliser, overflow) for one local step."""
    k_pos, k_eps = jax.random.split(rng)
    if self.example_dp:
      # The site's own rate, the one its slots were sized for (privacy/vae.py); the
      # accountant composes the largest, the smallest site's.
      positions, weights, overflow = sampling.site_poisson_sample(
          k_pos, site_count, self.batch_size, site_idx.shape[0], self.plan.slots)
      # DP-SGD divides by the EXPECTED batch size (a public function of the site's size),
      # never by the realised one, which would depend on who was sampled.
      norm = expected_batch(self.batch_size, site_count)
    else:
      positions = jax.random.randint(k_pos, (self.batch_size,), 0, site_count)
      weights = jnp.ones((self.batch_size,), jnp.float32)
      norm, overflow = jnp.float32(self.batch_size), jnp.zeros((), jnp.int32)
    rows = site_idx[positions]
    batch = {"x": data.x[rows].reshape((rows.shape[0], -1)), "y": data.y[rows],
             "eps": jax.random.normal(k_eps, (rows.shape[0], self.vae.latent_dim))}
    return batch, weights, norm, overflow

  def _sums(self, params, batch, weights):
    loss, rec, kl = self.vae.losses(params, batch["x"], batch["y"], batch["eps"])
    return jnp.sum(weights * loss), (jnp.sum(weights * rec), jnp.sum(weights * kl))

  def _dp_gradients(self, params, batch, weights, norm, rng):
    """DP-SGD gradients (divided by the expected batch size) under dp.level=example."""
    clip, sigma = self.plan.clip_norm, self.plan.noise_multiplier
    if self.plan.encoder == "private":
      # Sound: every parameter the example touches is clipped and noised together.
      total = clipping.clipped_grad_sum(self.vae.example_loss, params, batch, clip,
                                        weights=weights)
      noisy = clipping.privatize(total, clip, sigma, rng)
      return jax.tree.map(lambda g: g / norm, noisy)
    # The paper's DPD-fVAE: the decoder's per-example gradients clipped and noised, the
    # encoder's (never released) taken without clipping or noise.
    enc = params["encoder"]
    dec_total = clipping.clipped_grad_sum(
        lambda d, ex: self.vae.example_loss({"encoder": enc, "decoder": d}, ex),
        params["decoder"], batch, clip, weights=weights)
    dec = clipping.privatize(dec_total, clip, sigma, rng)
    enc_grad = jax.grad(lambda e: self._sums({"encoder": e, "decoder": params["decoder"]},
                                             batch, weights)[0])(enc)
    return {"encoder": jax.tree.map(lambda g: g / norm, enc_grad),
            "decoder": jax.tree.map(lambda g: g / norm, dec)}

  # --------------------------------------------------------------------------- seams

  def client_update(self, shared, site, site_idx, site_count, rng, data: FederatedData):
    """One site's round. Returns (message, new site state, (loss, rec, kl, overflow))."""
    enc = site["encoder"] if self.sync == "decoder" else shared["encoder"]
    params = {"encoder": enc, "decoder": shared["decoder"]}
    opt = {"encoder": site["enc_opt"] if self.sync == "decoder" else self.client_tx.init(enc),
           "decoder": self.client_tx.init(shared["decoder"])}

    def step(carry, t):
      params, opt = carry
      k_batch, k_noise = jax.random.split(jax.random.fold_in(rng, t))
      batch, weights, norm, overflow = self._batch(k_batch, site_idx, site_count, data)
      if self.example_dp:
        loss_sum, (rec_sum, kl_sum) = self._sums(params, batch, weights)
        grads = self._dp_gradients(params, batch, weights, norm, k_noise)
      else:
        (loss_sum, (rec_sum, kl_sum)), grads = jax.value_and_grad(self._sums, has_aux=True)(
            params, batch, weights)
        grads = jax.tree.map(lambda g: g / norm, grads)
      new_params, new_opt = {}, {}
      for part in ("encoder", "decoder"):
        updates, new_opt[part] = self.client_tx.update(grads[part], opt[part], params[part])
        new_params[part] = optax.apply_updates(params[part], updates)
      count = jnp.maximum(jnp.sum(weights), 1.0)
      return (new_params, new_opt), jnp.stack(
          [loss_sum / count, rec_sum / count, kl_sum / count, overflow.astype(jnp.float32)])

    (params, opt), stats = jax.lax.scan(step, (params, opt), jnp.arange(self.local_steps))
    message = {k: jax.tree.map(jnp.subtract, params[k], shared[k]) for k in self.keys}
    new_site = {"dp_steps": site["dp_steps"] + (self.local_steps if self.example_dp else 0)}
    if self.sync == "decoder":
      new_site["encoder"], new_site["enc_opt"] = params["encoder"], opt["encoder"]
    metrics = jnp.concatenate([stats[:, :3].mean(0), stats[:, 3:].sum(0)])
    return message, new_site, metrics

  def aggregator(self) -> aggregators.Aggregator:
    """The lab's chain on the released messages: weighted mean, or site-level DP-FedAvg."""
    if not self.site_dp:
      return aggregators.weighted()
    # Coordinated shares: the sum carries exactly N(0, (sigma C)^2), the noise the
    # accountant composes (and an empty round gets it from the server).
    return aggregators.site_dp(self.plan.clip_norm, self.plan.noise_multiplier,
                               coordinated=True, expected_cohort=self.plan.expected_cohort)

  def aggregate(self, messages, joined, counts, t, client_key):
    """(update the server applies, chain metrics) from the stacked messages ([sites, ...]
    leaves) of the sites that `joined` ([sites] bool); `counts` [sites] weight the mean
    without site DP; `t` the round; `client_key` the run's client root (round_keys)."""
    num_sites = joined.shape[0]
    chain = self.aggregator()
    present = joined.astype(jnp.float32)
    num_in = jnp.sum(present)
    weights = present * counts.astype(jnp.float32)
    total = jnp.sum(weights)
    weights = weights * jnp.where(total > 0, 1.0 / jnp.maximum(total, 1e-12), 0.0)
    sites = jnp.arange(num_sites, dtype=jnp.int32)
    rnd = aggregators.RoundInfo(t=t, client_rng=client_key, cohort=sites, in_cohort=present,
                                num_in=num_in)
    shared = chain.broadcast(chain.init(), rnd, {})
    # What each site does to its message before it leaves (clip, its noise share, / K).
    sent, stats = jax.vmap(lambda m, s, w, p: chain.site(
        m, aggregators.SiteInfo(site=s, weight=w, present=p), shared))(
            messages, sites, weights, present)
    total_update = jax.tree.map(lambda a: jnp.sum(a, axis=0), sent)
    update, _, metrics = chain.server(total_update, chain.init(), rnd, shared, stats)
    return update, metrics

  def server_update(self, server, update):
    neg = jax.tree.map(jnp.negative, update)  # the pseudo-gradient
    updates, opt = self.server_tx.update(neg, server["opt"], server["params"])
    return {"params": optax.apply_updates(server["params"], updates), "opt": opt}

  # --------------------------------------------------------------------------- the round

  def round_outputs(self, state, data: FederatedData, keys: dict):
    """The round, returning also the stacked messages and who joined (for tests).
    `keys`: round_keys(seed, secret)."""
    r = state["round"]
    num_sites = data.idx.shape[0]
    site_ids = jnp.arange(num_sites)
    client_keys = lab_keys.site_keys(keys["client"], r, site_ids)
    shared = state["server"]["params"]
    messages, sites, metrics = jax.vmap(
        self.client_update, in_axes=(None, 0, 0, 0, 0, None))(
            shared, state["sites"], data.idx, data.count, client_keys, data)
    if self.participation < 1.0:
      coins = jax.random.uniform(jax.random.fold_in(keys["participation"], r), (num_sites,))
      joined = coins < self.participation
    else:
      joined = jnp.ones((num_sites,), bool)
    # A site that sat the round out keeps its state and sends nothing.
    sites = jax.tree.map(
        lambda new, old: jnp.where(joined.reshape((-1,) + (1,) * (new.ndim - 1)), new, old),
        sites, state["sites"])
    update, chain_metrics = self.aggregate(messages, joined, data.count, r, keys["client"])
    server = self.server_update(state["server"], update)
    w = joined.astype(jnp.float32)
    mean = lambda v: jnp.sum(w * v) / jnp.maximum(jnp.sum(w), 1.0)
    round_metrics = RoundMetrics(
        loss=mean(metrics[:, 0]), reconstruction=mean(metrics[:, 1]), kl=mean(metrics[:, 2]),
        participants=jnp.sum(joined).astype(jnp.int32),
        overflow=jnp.sum(metrics[:, 3]).astype(jnp.int32),
        nonfinite_updates=jnp.asarray(chain_metrics.get("nonfinite_updates", 0), jnp.int32))
    new_state = {"server": server, "sites": sites, "round": r + 1}
    return new_state, round_metrics, messages, joined

  def round(self, state, data: FederatedData, keys: dict):
    new_state, metrics, _, _ = self.round_outputs(state, data, keys)
    return new_state, metrics

  def decoder(self, state):
    return state["server"]["params"]["decoder"]
