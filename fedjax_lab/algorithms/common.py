"""What the algorithms with per-site state share: a site's gradient at local step t, the
per-site keys, arithmetic on stacked site arrays (leaves [sites, ...]), and the round of the
methods whose every site keeps its own model (ProxSkip, RandCom, D-SGD), which differ only in
their `step`.

`site_gradient(params, site_idx, site_count, rng, step, data) -> (loss, grads)` is the ONE
place these algorithms touch data, and it draws minibatches exactly as `client.py` does for
FedAvg (`minibatch_positions` on the key split the same way, dropout keyed by the step), so a
site sees the same minibatch sequence under every algorithm. Its objective is the site's mean
cross-entropy plus the l2 term of `model.l2`:

  f_i(w) = mean_{k in site i} CE(model(w, x_k), y_k) + (l2 / 2) ||w||^2,

strongly convex for a linear model when l2 > 0 (FedAvg gets the same term through
`optax.add_decayed_weights` in front of its client optimizer, see experiment.py). The
reported loss is the cross-entropy alone, as FedAvg reports it. The round functions take
any function with this signature, so tests drive them with exact gradients of a quadratic.
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_lab import sharding
from fedjax_lab.algorithms import Algorithm, schedules
from fedjax_lab.client import minibatch_positions
from fedjax_lab.data.federated import FederatedData
from fedjax_lab.models import Model, cross_entropy

SiteGradient = Callable  # (params, site_idx [n_max], site_count, rng, step, data) -> (loss, grads)


class RoundMetrics(NamedTuple):
  train_loss: jax.Array   # mean minibatch loss over the sites and local steps of the round
  messages: jax.Array     # model-sized messages sent this round (up + down / to neighbours)
  comm_steps: jax.Array   # local steps of the round that communicated
  dp_overflow: jax.Array  # always 0: these algorithms do not run under DP (config.validate)


def round_metrics(train_loss, messages, comm_steps) -> RoundMetrics:
  return RoundMetrics(train_loss=train_loss, messages=jnp.asarray(messages, jnp.int32),
                      comm_steps=jnp.asarray(comm_steps, jnp.int32),
                      dp_overflow=jnp.zeros((), jnp.int32))


def make_site_gradient(model: Model, batch_size: int, shuffle: bool, l2: float = 0.0,
                       full_batch: bool = False) -> SiteGradient:
  """The minibatch gradient of f_i at local step `step` (or its exact gradient if full_batch).

  full_batch: the exact mean over the site's `site_count` examples (padding weighted 0);
  used by benchmarks/comm_skipping.py, where deterministic gradients isolate the effect of
  communication skipping.
  """

  def loss_on(params, x, y, weights, rng):
    logits, _ = model.apply(params, {}, x, True, rng)
    return jnp.sum(weights * cross_entropy(logits, y))

  def site_gradient(params, site_idx, site_count, rng, step, data: FederatedData):
    batch_rng, step_rng = jax.random.split(rng)  # as client.py splits the site's round key
    n_max = site_idx.shape[0]
    if full_batch:
      rows = site_idx
      dtype = data.x.dtype
      weights = (jnp.arange(n_max) < site_count).astype(dtype) / site_count.astype(dtype)
    else:
      rows = site_idx[minibatch_positions(batch_rng, step, site_count, n_max, batch_size,
                                          shuffle)]
      weights = jnp.full((batch_size,), 1.0 / batch_size, data.x.dtype)
    loss, grads = jax.value_and_grad(loss_on)(params, data.x[rows], data.y[rows], weights,
                                              jax.random.fold_in(step_rng, step))
    if l2:
      grads = jax.tree.map(lambda g, w: g + l2 * w, grads, params)
    return loss, grads

  return site_gradient


def site_keys(client_rng, round_index, num_sites: int) -> jax.Array:
  """[S] keys, site s's key for this round: fold_in(fold_in(client_rng, round), s), as FedAvg."""
  round_rng = jax.random.fold_in(client_rng, round_index)
  return jax.vmap(lambda s: jax.random.fold_in(round_rng, s))(jnp.arange(num_sites))


def all_site_gradients(site_gradient: SiteGradient, site_params, site_idx, site_count, keys,
                       step, data: FederatedData):
  """(losses [S], grads leaves [S, ...]): every site's gradient at its own model x_i.

  site_params leaves [S, ...]; site_idx [S, n_max]; site_count [S]; keys [S]; step: int.
  """
  return jax.vmap(site_gradient, in_axes=(0, 0, 0, 0, None, None))(
      site_params, site_idx, site_count, keys, step, data)


def broadcast_to_sites(tree, num_sites: int):
  """Leaves [...] -> [S, ...]: every site starts from the same model."""
  return jax.tree.map(lambda a: jnp.broadcast_to(a, (num_sites, *a.shape)), tree)


def site_mean(tree):
  """Leaves [S, ...] -> [...]: the uniform average over sites."""
  return jax.tree.map(lambda a: a.mean(0), tree)


def zeros_like_sites(tree, num_sites: int):
  return jax.tree.map(lambda a: jnp.zeros((num_sites, *a.shape), a.dtype), tree)



def place_per_site(tree, mesh):
  """Inside jit: leaves [S, ...] sharded over the mesh exactly as `sharding.put_sites` places
  them outside (replicated when the device count does not divide S), so a round returns its
  per-site state with the shardings it received and the jitted round compiles once."""
  if mesh is None:
    return tree

  def place(a):
    spec = (sharding.sites_sharding(mesh, a.ndim) if a.shape[0] % mesh.size == 0
            else sharding.replicated(mesh))
    return jax.lax.with_sharding_constraint(a, spec)

  return jax.tree.map(place, tree)


class PerSiteState(NamedTuple):
  """State of the algorithms whose every site keeps its own model (ProxSkip, RandCom, D-SGD)."""
  params: Any            # the evaluated model: (1/S) sum_i x_i
  model_state: Any       # {} (models with BatchNorm statistics are not supported)
  site_params: Any       # x_i, leaves [S, ...]
  site_controls: Any     # h_i, leaves [S, ...]; {} for D-SGD, which has none
  site_model_state: Any  # {}
  round: jax.Array       # int32 rounds completed


def init_per_site_state(params, model_state, num_sites: int, *,
                        controls: bool) -> PerSiteState:
  return PerSiteState(params=params, model_state=model_state,
                      site_params=broadcast_to_sites(params, num_sites),
                      site_controls=zeros_like_sites(params, num_sites) if controls else {},
                      site_model_state={}, round=jnp.zeros((), jnp.int32))


def make_per_site_round(site_gradient: SiteGradient, schedule, step: Callable,
                        messages_per_comm: Callable[[int], int], mesh=None):
  """A round of client.local_steps steps in which every site moves its own model.

  step(x, h, grads, coin) -> (x, h): one iteration of the algorithm on stacked site arrays;
  `coin` (one per step, shared by all sites) says whether this step communicates.
  messages_per_comm(num_sites): models sent by one communicating step.
  Returns round_fn(state, data, sampling_rng, client_rng) -> (state, RoundMetrics).
  """

  def round_fn(state: PerSiteState, data: FederatedData, sampling_rng, client_rng):
    coins = schedule.coins(sampling_rng, state.round)  # [local_steps], one coin for all sites
    keys = site_keys(client_rng, state.round, data.num_sites)
    site_idx, site_count = sharding.constrain_sites((data.idx, data.count), mesh)
    x, h = place_per_site((state.site_params, state.site_controls), mesh)

    def local_step(carry, step_and_coin):
      x, h = carry
      t, coin = step_and_coin
      losses, grads = all_site_gradients(site_gradient, x, site_idx, site_count, keys, t, data)
      return step(x, h, grads, coin), losses

    (x, h), losses = jax.lax.scan(local_step, (x, h),
                                  (jnp.arange(schedule.local_steps), coins))
    comm_steps = coins.sum()
    x, h = place_per_site((x, h), mesh)
    new_state = state._replace(params=site_mean(x), site_params=x, site_controls=h,
                               round=state.round + 1)
    return new_state, round_metrics(losses.mean(),
                                    messages_per_comm(data.num_sites) * comm_steps, comm_steps)

  return round_fn


def build_per_site(ctx, make_round, *, controls: bool, **kwargs):
  """The Algorithm of a per-site-model method from the config (shared by its build())."""
  cfg = ctx.config
  site_gradient = make_site_gradient(ctx.model, cfg.client.batch_size, cfg.client.shuffle,
                                     cfg.model.l2)
  round_fn = make_round(site_gradient, schedules.from_config(cfg), lr=cfg.client.lr,
                        mesh=ctx.mesh, **kwargs)
  return Algorithm(
      init=lambda params, model_state: init_per_site_state(params, model_state, ctx.num_sites,
                                                           controls=controls),
      round=round_fn)
