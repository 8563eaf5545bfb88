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


class ServerState(NamedTuple):
  params: Any            # the global model
  model_state: Any       # global BatchNorm statistics ({} if none)
  opt_state: Any         # the server optimizer's state
  site_model_state: Any  # FedBN: per-site statistics, leaves [sites, ...]; else {}
  round: jax.Array       # int32 rounds completed


class RoundMetrics(NamedTuple):
  train_loss: jax.Array  # example-weighted mean of the cohort's local training losses
  messages: jax.Array    # model-sized messages sent: K down + K up


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


def make_round(client_update: Callable, server_tx: optax.GradientTransformation, *,
               cohort_size: int, weighting: str = "examples", fedbn: bool = False,
               mesh=None) -> Callable:
  """Returns round_fn(state, data, sampling_rng, client_rng) -> (state, RoundMetrics).

  `client_update` is `client.make_client_update(...)`; the keys are the run's per-purpose
  roots: the round index and site id are folded in here, so a site's randomness never
  depends on the cohort order or the device it ran on.
  """

  def round_fn(state: ServerState, data: FederatedData, sampling_rng, client_rng):
    t = state.round
    cohort = sample_cohort(jax.random.fold_in(sampling_rng, t), data.num_sites, cohort_size)
    site_idx, site_count = sharding.constrain_sites((data.idx[cohort], data.count[cohort]), mesh)
    round_rng = jax.random.fold_in(client_rng, t)
    site_rngs = jax.vmap(lambda s: jax.random.fold_in(round_rng, s))(cohort)
    if fedbn and state.model_state:
      site_ms = jax.tree.map(lambda a: a[cohort], state.site_model_state)
      ms_axis = 0
    else:
      site_ms, ms_axis = state.model_state, None

    out = jax.vmap(client_update, in_axes=(None, ms_axis, 0, 0, 0, None))(
        state.params, site_ms, site_idx, site_count, site_rngs, data)

    if weighting == "examples":
      weights = site_count.astype(jnp.float32) / site_count.sum()
    else:
      weights = jnp.full((cohort.shape[0],), 1.0 / cohort.shape[0])
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
                           messages=jnp.int32(2 * cohort.shape[0]))
    return new_state, metrics

  return round_fn
