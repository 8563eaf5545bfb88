"""FedAvg and its server-optimizer family in one round function.

McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from Decentralized
Data" (FedAvg); Reddi et al. 2021, "Adaptive Federated Optimization" (the server step as an
optax optimizer on the pseudo-gradient: sgd lr 1 = FedAvg, momentum = FedAvgM, adam = FedAdam,
yogi = FedYogi); Li et al. 2020 (FedProx: the client's proximal term, see client.py);
Li et al. 2021, "FedBN" (BatchNorm statistics kept per site instead of averaged);
site-level DP (SiteDP below), optionally with Andrew et al. 2021, "Differentially Private
Learning with Adaptive Clipping" (the clip norm follows a quantile of the update norms).

One round, as in the papers' algorithm box:
  sample a cohort S_t of K sites
  for each site k in S_t in parallel (jax.vmap):  Δ_k = ClientUpdate(w_t, data_k)
  Δ_t = Σ_k p_k Δ_k  with p_k ∝ n_k (or uniform)
  w_{t+1} = ServerOpt(w_t, -Δ_t)
Under site-level DP, Δ_t = (Σ_k clip(Δ_k, C_t) + noise) / expected cohort size; with adaptive
clipping, C_{t+1} = C_t exp(-η_C (b̃_t - γ)) from the noised fraction b̃_t of sites with
||Δ_k|| <= C_t (privacy/adaptive_clipping.py); otherwise C_t = dp.clip_norm.
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_lab import sharding
from fedjax_lab.data.federated import FederatedData
from fedjax_lab.privacy import adaptive_clipping
from fedjax_lab.privacy.sampling import poisson_sample


# Site noise keys hang off fold_in(client_rng, _SITE_NOISE), a value no round index reaches,
# so they never coincide with a round's client-training keys fold_in(client_rng, t).
_SITE_NOISE = 0xFFFFFFFF
# Adaptive clipping's count-noise keys hang off another such value.
_SITE_COUNT_NOISE = 0xFFFFFFFE
# fold_in tag (into the round's client key, beside the site ids) of the public minibatch a
# curvature server optimizer takes its obj_fn on.
_SERVER_PUBLIC = 0xFFFFFFFD
# The server's own noise (update and count) for a round in which no site was sampled.
_SERVER_NOISE = 0xFFFFFFFC


class ServerState(NamedTuple):
  params: Any            # the global model
  model_state: Any       # global BatchNorm statistics ({} if none)
  opt_state: Any         # the server optimizer's state
  site_model_state: Any  # FedBN: per-site statistics, leaves [sites, ...]; else {}
  round: jax.Array       # int32 rounds completed
  clip_norm: Any         # adaptive clipping: C_t, the next round's clip norm (float32); else {}


class RoundMetrics(NamedTuple):
  train_loss: jax.Array  # example-weighted mean of the cohort's local training losses
  messages: jax.Array    # model-sized messages sent: K down + K up
  dp_overflow: jax.Array  # Poisson-sampled examples/sites that did not fit (0 without DP)
  clip_norm: Any          # site DP: the clip norm this round's updates were clipped to; else {}
  nonfinite_updates: jax.Array  # site DP: cohort sites whose update had a NaN/inf (sent as 0)


class AdaptiveClip(NamedTuple):
  """Andrew et al. 2021, geometric update: C_{t+1} = C_t exp(-clip_lr (b̃_t - target_quantile)).

  Each site also adds its share of N(0, count_stddev^2) to the centred count Σ (b_k - 1/2),
  split over the sites like the update noise (parallel: each the full std; coordinated:
  std / sqrt(n) each).
  """
  target_quantile: float  # γ
  clip_lr: float          # η_C
  count_stddev: float     # σ_b


class SiteDP(NamedTuple):
  """Site-level DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent
  Language Models"): Poisson cohorts at rate q = cohort_size / num_sites, each site update
  clipped to clip_norm, Gaussian noise on the sum, divided by the expected cohort size.

  noise "parallel": every site adds N(0, (sigma C)^2); "coordinated" (Dopamine): every site
  adds N(0, (sigma C)^2 / n) for the n sites of the round, so the secure sum carries exactly
  (sigma C)^2. The accountant uses sigma either way (parallel only adds more noise). A round
  whose Poisson cohort is empty still releases N(0, (sigma C)^2): the server adds it (and
  the count's noise), because the accountant composes that release every round.

  With `adaptive` set, C is C_t from the server state (clip_norm is only C_0) and
  noise_multiplier is the update's share z_Δ of the accountant's sigma (adaptive_clipping.py).
  """
  clip_norm: float         # C, or C_0 with adaptive clipping
  noise_multiplier: float  # of the update: sigma, or z_Δ with adaptive clipping
  coordinated: bool
  max_cohort: int
  adaptive: AdaptiveClip | None = None


def sample_cohort(rng, num_sites: int, cohort_size: int) -> jax.Array:
  """[cohort_size] distinct site ids, uniformly without replacement (all sites if equal)."""
  if cohort_size == num_sites:
    return jnp.arange(num_sites, dtype=jnp.int32)
  return jax.random.choice(rng, num_sites, (cohort_size,), replace=False).astype(jnp.int32)


def init_server_state(params, model_state, server_tx, num_sites: int, fedbn: bool,
                      clip_norm: float | None = None) -> ServerState:
  """`clip_norm`: C_0 under adaptive clipping (kept in the state, so it is checkpointed)."""
  site_state = {}
  if fedbn and model_state:
    site_state = jax.tree.map(lambda a: jnp.broadcast_to(a, (num_sites, *a.shape)), model_state)
  return ServerState(params=params, model_state=model_state, opt_state=server_tx.init(params),
                     site_model_state=site_state, round=jnp.zeros((), jnp.int32),
                     clip_norm={} if clip_norm is None else jnp.asarray(clip_norm, jnp.float32))


def clip_by_global_norm(tree, clip_norm):
  """Scales the whole pytree to L2 norm <= clip_norm; returns (clipped, norm).

  NaN-safe: a tree whose norm is not finite becomes all zeros (a `where`, since NaN * 0 is
  NaN), which is within the sensitivity bound like any clipped update.
  """
  norm = optax.global_norm(tree)
  finite = jnp.isfinite(norm)
  factor = jnp.where(finite, jnp.minimum(1.0, clip_norm / jnp.maximum(norm, 1e-12)), 0.0)
  return jax.tree.map(lambda a: jnp.where(finite, a * factor, 0.0).astype(a.dtype), tree), norm


def server_step(server_tx: optax.GradientTransformationExtraArgs, mean_delta, opt_state,
                params, objective: Callable | None, model_state, round_rng,
                data: FederatedData):
  """x <- ServerOpt(x, -mean_delta); returns (params, opt_state).

  The mean site update is a pseudo-gradient, not the gradient of a loss the server holds, so
  a curvature server optimizer (esgd, adahessian, sophia) takes its Hessian-vector products of
  `objective` (client.make_public_objective): the loss of a minibatch of the PUBLIC
  calibration set at the global model, post-processing under any DP level. Without it
  (no curvature server optimizer) the update gets no obj_fn.
  """
  extra = {}
  if objective is not None:
    key = jax.random.fold_in(round_rng, _SERVER_PUBLIC)
    extra["obj_fn"] = objective(model_state, key, key, data)
  updates, opt_state = server_tx.update(jax.tree.map(jnp.negative, mean_delta), opt_state,
                                        params, **extra)
  return optax.apply_updates(params, updates), opt_state


def make_round(client_update: Callable, server_tx: optax.GradientTransformation, *,
               cohort_size: int, weighting: str = "examples", fedbn: bool = False,
               mesh=None, site_dp: SiteDP | None = None,
               min_sites_per_device: int = 16, sites_per_chunk: int = 0,
               server_objective: Callable | None = None) -> Callable:
  """Returns round_fn(state, data, sampling_rng, client_rng) -> (state, RoundMetrics).

  `client_update` is `client.make_client_update(...)`; the keys are the run's per-purpose
  roots: the round index and site id are folded in here, so a site's randomness never
  depends on the cohort order or the device it ran on. `server_objective`: see server_step.
  `sites_per_chunk`: see sharding.map_sum_sites.
  """

  def round_fn(state: ServerState, data: FederatedData, sampling_rng, client_rng):
    t = state.round
    round_sampling_rng = jax.random.fold_in(sampling_rng, t)
    if site_dp is None:
      cohort = sample_cohort(round_sampling_rng, data.num_sites, cohort_size)
      in_cohort, cohort_overflow = jnp.ones(cohort.shape, jnp.float32), jnp.int32(0)
    else:
      cohort, in_cohort, cohort_overflow = poisson_sample(
          round_sampling_rng, data.num_sites, cohort_size / data.num_sites, data.num_sites,
          site_dp.max_cohort)
    # Aggregation weights from the replicated counts: no cross-device sum for the normaliser.
    # Below min_sites_per_device a cross-device sum costs more than the split saves: every
    # device then runs the whole (replicated) cohort.
    split = sharding.mesh_if_worth_it(mesh, cohort.shape[0], min_sites_per_device)
    cohort_count = sharding.constrain_replicated(data.count[cohort], split)
    if weighting == "examples":
      weights = cohort_count.astype(jnp.float32) / cohort_count.sum()
    else:
      weights = jnp.full(cohort.shape, 1.0 / cohort.shape[0])
    if site_dp is not None:
      # A padded slot of the Poisson cohort trains on no examples (count 0, see client.py),
      # not on the data of site 0 its id points to: its update is dropped anyway.
      cohort_count = jnp.where(in_cohort > 0, cohort_count, 0)
    site_idx, site_count = sharding.constrain_sites((data.idx[cohort], cohort_count), split)
    round_rng = jax.random.fold_in(client_rng, t)
    site_rngs = jax.vmap(lambda s: jax.random.fold_in(round_rng, s))(cohort)
    if fedbn and state.model_state:
      site_ms = jax.tree.map(lambda a: a[cohort], state.site_model_state)
      ms_axis = 0
    else:
      site_ms, ms_axis = state.model_state, None

    num_in = in_cohort.sum()
    clip_norm, next_clip_norm, share = {}, state.clip_norm, None
    if site_dp is not None:
      clip_norm = state.clip_norm if site_dp.adaptive is not None else site_dp.clip_norm
      share = site_dp.noise_multiplier * clip_norm
      if site_dp.coordinated:
        share = share / jnp.sqrt(jnp.maximum(num_in, 1.0))
      weights = in_cohort / jnp.maximum(num_in, 1.0)
    noise_rng = jax.random.fold_in(jax.random.fold_in(client_rng, _SITE_NOISE), t)

    def site_fn(params, ms, idx, count, rng, weight, in_k, site, data):
      """One site: its update, and its terms of the round's sums (sharding.map_sum_sites)."""
      out = client_update(params, ms, idx, count, rng, data)
      scale = lambda tree, c: jax.tree.map(lambda a: c * a, tree)
      to_sum = {"loss": weight * out.train_loss, "overflow": out.dp_overflow,
                "model_state": scale(out.model_state, weight)}
      per_site = {"model_state": out.model_state if fedbn else {}}
      if site_dp is None:
        to_sum["delta"] = scale(out.delta, weight)
      else:  # clip, add this site's noise share, / the EXPECTED cohort size
        clipped, per_site["norm"] = clip_by_global_norm(out.delta, clip_norm)
        noised = jax.tree.map(jnp.add, clipped, _site_noise(noise_rng, site, clipped, share))
        # `where`, not a product: a padded slot's update must vanish even if it were NaN.
        to_sum["delta"] = jax.tree.map(lambda a: jnp.where(in_k > 0, a / cohort_size, 0.0),
                                       noised)
        to_sum["nonfinite"] = jnp.where(in_k > 0, ~jnp.isfinite(per_site["norm"]), False
                                        ).astype(jnp.int32)
      return to_sum, per_site

    sums, per_site = sharding.map_sum_sites(
        site_fn, (None, ms_axis, 0, 0, 0, 0, 0, 0, None), split, sites_per_chunk)(
            state.params, site_ms, site_idx, site_count, site_rngs, weights, in_cohort,
            cohort, data)
    mean_delta = sums["delta"]
    if site_dp is not None:
      # An empty cohort sends nothing; the server then adds the noise the accountant counts.
      empty = num_in == 0
      server_rng = jax.random.fold_in(jax.random.fold_in(client_rng, _SERVER_NOISE), t)
      server_noise = _site_noise(server_rng, 0, mean_delta,
                                 site_dp.noise_multiplier * clip_norm)
      mean_delta = jax.tree.map(lambda d, z: d + jnp.where(empty, z / cohort_size, 0.0),
                                mean_delta, server_noise)
      if site_dp.adaptive is not None:
        count_rng = jax.random.fold_in(jax.random.fold_in(client_rng, _SITE_COUNT_NOISE), t)
        server_count_noise = site_dp.adaptive.count_stddev * jax.random.normal(
            jax.random.fold_in(server_rng, 1))
        next_clip_norm = adaptive_clipping.next_clip_norm(
            clip_norm, per_site["norm"], in_cohort,
            count_noise(count_rng, cohort, in_cohort, num_in, site_dp)
            + jnp.where(empty, server_count_noise, 0.0),
            cohort_size, site_dp.adaptive.target_quantile, site_dp.adaptive.clip_lr)
      clip_norm = jnp.asarray(clip_norm, jnp.float32)
    params, opt_state = server_step(server_tx, mean_delta, state.opt_state, state.params,
                                    server_objective, state.model_state, round_rng, data)

    model_state, site_model_state = state.model_state, state.site_model_state
    if state.model_state:
      # Under FedBN the global statistics are only used to evaluate the global model.
      model_state = sums["model_state"]
      if fedbn:
        site_model_state = jax.tree.map(lambda all_, new: all_.at[cohort].set(new),
                                        site_model_state, per_site["model_state"])

    new_state = ServerState(params=params, model_state=model_state, opt_state=opt_state,
                            site_model_state=site_model_state, round=t + 1,
                            clip_norm=next_clip_norm)
    metrics = RoundMetrics(train_loss=sums["loss"],
                           messages=(2 * num_in).astype(jnp.int32),
                           dp_overflow=cohort_overflow + sums["overflow"],
                           clip_norm=clip_norm,
                           nonfinite_updates=sums.get("nonfinite", jnp.int32(0)))
    return new_state, metrics

  return round_fn


def _site_noise(noise_rng, site, like, share):
  """One site's noise share, N(0, share^2) per coordinate of `like`, from a key folded with
  its site id, as a real site would draw it: it never depends on the cohort order, the
  device or the chunk the site ran in."""
  keys = jax.random.split(jax.random.fold_in(noise_rng, site), len(jax.tree.leaves(like)))
  leaves = [share * jax.random.normal(k, l.shape, l.dtype)
            for k, l in zip(keys, jax.tree.leaves(like))]
  return jax.tree.unflatten(jax.tree.structure(like), leaves)


def count_noise(count_rng, cohort, in_cohort, num_in, site_dp: SiteDP):
  """Σ_k ξ_k over the sites in the cohort: the noise on adaptive clipping's count.

  Each site draws its share ξ_k from a key folded with its site id, N(0, σ_b^2) (parallel)
  or N(0, σ_b^2 / n) for the n sites of the round (coordinated), as the update noise.
  """
  share = site_dp.adaptive.count_stddev
  if site_dp.coordinated:
    share = share / jnp.sqrt(jnp.maximum(num_in, 1.0))
  draws = jax.vmap(lambda site: jax.random.normal(jax.random.fold_in(count_rng, site)))(cohort)
  return share * jnp.dot(in_cohort, draws)
