"""FedAvg and its server-optimizer family in one round function.

McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from Decentralized
Data" (FedAvg); Reddi et al. 2021, "Adaptive Federated Optimization" (the server step as an
optax optimizer on the pseudo-gradient: sgd lr 1 = FedAvg, momentum = FedAvgM, adam = FedAdam,
yogi = FedYogi); Li et al. 2020 (FedProx: the client's proximal term, see client.py);
Li et al. 2021, "FedBN" (BatchNorm statistics kept per site instead of averaged).

One round, as in the papers' algorithm box:
  sample a cohort S_t of K sites
  for each site k in S_t in parallel (jax.vmap):  Δ_k = ClientUpdate(w_t, data_k)
  Δ_t = Σ_k p_k Δ_k  with p_k ∝ n_k (or uniform)
  w_{t+1} = ServerOpt(w_t, -Δ_t)
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_lab import sharding
from fedjax_lab.data.federated import FederatedData
from fedjax_lab.privacy.sampling import poisson_sample


# Site noise keys hang off fold_in(client_rng, _SITE_NOISE), a value no round index reaches,
# so they never coincide with a round's client-training keys fold_in(client_rng, t).
_SITE_NOISE = 0xFFFFFFFF


class ServerState(NamedTuple):
  params: Any            # the global model
  model_state: Any       # global BatchNorm statistics ({} if none)
  opt_state: Any         # the server optimizer's state
  site_model_state: Any  # FedBN: per-site statistics, leaves [sites, ...]; else {}
  round: jax.Array       # int32 rounds completed


class RoundMetrics(NamedTuple):
  train_loss: jax.Array  # example-weighted mean of the cohort's local training losses
  messages: jax.Array    # model-sized messages sent: K down + K up
  dp_overflow: jax.Array  # Poisson-sampled examples/sites that did not fit (0 without DP)


class SiteDP(NamedTuple):
  """Site-level DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent
  Language Models"): Poisson cohorts at rate q = cohort_size / num_sites, each site update
  clipped to clip_norm, Gaussian noise on the sum, divided by the expected cohort size.

  noise "parallel": every site adds N(0, (sigma C)^2); "coordinated" (Dopamine): every site
  adds N(0, (sigma C)^2 / n) for the n sites of the round, so the secure sum carries exactly
  (sigma C)^2. The accountant uses sigma either way (parallel only adds more noise).
  """
  clip_norm: float
  noise_multiplier: float
  coordinated: bool
  max_cohort: int


def sample_cohort(rng, num_sites: int, cohort_size: int) -> jax.Array:
  """[cohort_size] distinct site ids, uniformly without replacement (all sites if equal)."""
  if cohort_size == num_sites:
    return jnp.arange(num_sites, dtype=jnp.int32)
  return jax.random.choice(rng, num_sites, (cohort_size,), replace=False).astype(jnp.int32)


def init_server_state(params, model_state, server_tx, num_sites: int, fedbn: bool) -> ServerState:
  site_state = {}
  if fedbn and model_state:
    site_state = jax.tree.map(lambda a: jnp.broadcast_to(a, (num_sites, *a.shape)), model_state)
  return ServerState(params=params, model_state=model_state, opt_state=server_tx.init(params),
                     site_model_state=site_state, round=jnp.zeros((), jnp.int32))


def weighted_mean(tree, weights):
  """Σ_k w_k tree_k over the leading axis; `weights` [K] sum to 1."""
  return jax.tree.map(lambda a: jnp.tensordot(weights.astype(a.dtype), a, axes=1), tree)


def clip_by_global_norm(tree, clip_norm):
  """Scales the whole pytree to L2 norm <= clip_norm; returns (clipped, norm)."""
  norm = optax.global_norm(tree)
  factor = jnp.minimum(1.0, clip_norm / jnp.maximum(norm, 1e-12))
  return jax.tree.map(lambda a: a * factor, tree), norm


def make_round(client_update: Callable, server_tx: optax.GradientTransformation, *,
               cohort_size: int, weighting: str = "examples", fedbn: bool = False,
               mesh=None, site_dp: SiteDP | None = None,
               min_sites_per_device: int = 16) -> Callable:
  """Returns round_fn(state, data, sampling_rng, client_rng) -> (state, RoundMetrics).

  `client_update` is `client.make_client_update(...)`; the keys are the run's per-purpose
  roots: the round index and site id are folded in here, so a site's randomness never
  depends on the cohort order or the device it ran on.
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
    site_idx, site_count = sharding.constrain_sites((data.idx[cohort], cohort_count), split)
    round_rng = jax.random.fold_in(client_rng, t)
    site_rngs = jax.vmap(lambda s: jax.random.fold_in(round_rng, s))(cohort)
    if fedbn and state.model_state:
      site_ms = jax.tree.map(lambda a: a[cohort], state.site_model_state)
      ms_axis = 0
    else:
      site_ms, ms_axis = state.model_state, None

    out = jax.vmap(client_update, in_axes=(None, ms_axis, 0, 0, 0, None))(
        state.params, site_ms, site_idx, site_count, site_rngs, data)

    num_in = in_cohort.sum()
    if site_dp is not None:
      noise_rng = jax.random.fold_in(jax.random.fold_in(client_rng, _SITE_NOISE), t)
      mean_delta = _private_mean(out.delta, in_cohort, num_in, cohort, noise_rng, site_dp,
                                 expected_cohort=cohort_size)
      weights = in_cohort / jnp.maximum(num_in, 1.0)
    else:
      mean_delta = weighted_mean(out.delta, weights)
    updates, opt_state = server_tx.update(jax.tree.map(jnp.negative, mean_delta),
                                          state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    model_state, site_model_state = state.model_state, state.site_model_state
    if state.model_state:
      # Under FedBN the global statistics are only used to evaluate the global model.
      model_state = weighted_mean(out.model_state, weights)
      if fedbn:
        site_model_state = jax.tree.map(lambda all_, new: all_.at[cohort].set(new),
                                        site_model_state, out.model_state)

    new_state = ServerState(params=params, model_state=model_state, opt_state=opt_state,
                            site_model_state=site_model_state, round=t + 1)
    metrics = RoundMetrics(train_loss=jnp.dot(weights, out.train_loss),
                           messages=(2 * num_in).astype(jnp.int32),
                           dp_overflow=cohort_overflow + out.dp_overflow.sum())
    return new_state, metrics

  return round_fn


def _private_mean(deltas, in_cohort, num_in, cohort, noise_rng, site_dp: SiteDP,
                  expected_cohort: int):
  """(Σ_k clip(Δ_k) + Σ_k noise_k) / expected_cohort over the sites in the cohort.

  Each site draws its own noise share from a key folded with its site id, as a real site
  would, so the noise never depends on the cohort order or the device.
  """
  clipped, _ = jax.vmap(clip_by_global_norm, in_axes=(0, None))(deltas, site_dp.clip_norm)
  share = site_dp.noise_multiplier * site_dp.clip_norm
  if site_dp.coordinated:
    share = share / jnp.sqrt(jnp.maximum(num_in, 1.0))

  def site_noise(site, like):
    keys = jax.random.split(jax.random.fold_in(noise_rng, site), len(jax.tree.leaves(like)))
    leaves = [share * jax.random.normal(k, l.shape, l.dtype)
              for k, l in zip(keys, jax.tree.leaves(like))]
    return jax.tree.unflatten(jax.tree.structure(like), leaves)

  noised = jax.vmap(lambda site, c: jax.tree.map(jnp.add, c, site_noise(site, c)))(
      cohort, clipped)
  return jax.tree.map(lambda a: jnp.tensordot(in_cohort, a, axes=1) / expected_cohort, noised)
