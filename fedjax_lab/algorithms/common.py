"""What the algorithms with per-site state share: a site's gradient at local step t, the
per-site keys, arithmetic on stacked site arrays (leaves [sites, ...]), and the round of the
methods whose every site keeps its own model (ProxSkip, RandCom, D-SGD), which differ only in
their `step`.

`site_gradient(params, site_idx, site_count, rng, step, data) -> (loss, grads)` wraps
client.make_site_gradient, the ONE place every algorithm touches data (minibatches, DP-SGD's
clipping and noise), so a site sees the same minibatch sequence under every algorithm. Its
objective is the site's `model.loss` (losses.py: cross-entropy for classification, mse or FAR's
batch loss for regression) plus the l2 term of `model.l2`:

  f_i(w) = mean_{k in site i} CE(model(w, x_k), y_k) + (l2 / 2) ||w||^2   (cross-entropy),

strongly convex for a linear model when l2 > 0 (FedAvg takes the same gradient: the l2 term
is added in make_site_gradient for every algorithm). The reported loss is `model.loss`
alone, without the l2 term. The round functions take any function with this signature, so
tests drive them with exact gradients of a quadratic.
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_lab import algorithms, client, sharding
from fedjax_lab import keys as lab_keys
from fedjax_lab.algorithms import Algorithm, schedules
from fedjax_lab.data.federated import FederatedData
from fedjax_lab.errors import ConfigError
from fedjax_lab.models import Model
from fedjax_lab.algorithms import topology

SiteGradient = Callable  # (params, site_idx [n_max], site_count, rng, step, data) -> (loss, grads)


def make_site_gradient(model: Model, batch_size: int, shuffle: bool, l2: float = 0.0,
                       full_batch: bool = False, dp=None, loss=None) -> SiteGradient:
  """The minibatch gradient of f_i at local step `step` (or its exact gradient if full_batch):
  client.make_site_gradient (the one place sites touch data; `dp`: DP-SGD steps) for a model
  without state, as (loss, grads), or (loss, grads, dp_overflow) with `dp`. `loss`: the
  model.loss (losses.Loss; None: cross-entropy)."""
  grad = client.make_site_gradient(model, batch_size, shuffle, dp, l2, full_batch, loss)

  def site_gradient(params, site_idx, site_count, rng, step, data: FederatedData,
                    positions=None):
    out = grad(params, {}, site_idx, site_count, rng, step, data, positions=positions)
    return (out.loss, out.grads) if dp is None else (out.loss, out.grads, out.overflow)

  if hasattr(grad, "minibatch_schedule"):  # shuffled minibatches: drawn once per round
    site_gradient.minibatch_schedule = grad.minibatch_schedule
  return site_gradient


def all_site_gradients(site_gradient: SiteGradient, site_params, site_idx, site_count, keys,
                       step, data: FederatedData, positions=None):
  """(losses [S], grads leaves [S, ...][, overflow [S]]): every site's gradient at its own
  model x_i.

  site_params leaves [S, ...]; site_idx [S, n_max]; site_count [S]; keys [S]; step: int;
  positions: None, or [S, batch] this step's rows of `site_schedules`.
  """
  if positions is None:
    return jax.vmap(site_gradient, in_axes=(0, 0, 0, 0, None, None))(
        site_params, site_idx, site_count, keys, step, data)
  return jax.vmap(lambda p, i, c, k, pos: site_gradient(p, i, c, k, step, data, positions=pos))(
      site_params, site_idx, site_count, keys, positions)


def site_schedules(site_gradient: SiteGradient, site_idx, site_count, keys, num_steps: int):
  """[num_steps, S, batch] every site's minibatch positions for the round's steps, drawn
  once (client.minibatch_schedule), or None where `site_gradient` draws its own each step
  (no shuffling, example-level DP, or a function without `minibatch_schedule`)."""
  schedule = getattr(site_gradient, "minibatch_schedule", None)
  if schedule is None:
    return None
  positions = jax.vmap(schedule, in_axes=(0, 0, 0, None))(site_idx, site_count, keys, num_steps)
  return jnp.moveaxis(positions, 1, 0)


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
    keys = lab_keys.site_keys(client_rng, state.round, jnp.arange(data.num_sites))
    site_idx, site_count = sharding.constrain_sites((data.idx, data.count), mesh)
    x, h = place_per_site((state.site_params, state.site_controls), mesh)

    positions = site_schedules(site_gradient, site_idx, site_count, keys, schedule.local_steps)

    def local_step(carry, step_and_coin):
      x, h = carry
      t, coin, pos = step_and_coin
      out = all_site_gradients(site_gradient, x, site_idx, site_count, keys, t, data, pos)
      overflow = out[2].sum() if len(out) == 3 else jnp.int32(0)  # under example-level DP
      return step(x, h, out[1], coin), (out[0], overflow)

    (x, h), (losses, overflow) = jax.lax.scan(
        local_step, (x, h), (jnp.arange(schedule.local_steps), coins, positions))
    comm_steps = coins.sum()
    x, h = place_per_site((x, h), mesh)
    new_state = state._replace(params=site_mean(x), site_params=x, site_controls=h,
                               round=state.round + 1)
    return new_state, algorithms.round_metrics(
        losses.mean(), messages_per_comm(data.num_sites) * comm_steps, comm_steps,
        dp_overflow=overflow.sum())

  return round_fn


def build_per_site(ctx, make_round, *, controls: bool, **kwargs):
  """The Algorithm of a per-site-model method from the config (shared by its build())."""
  cfg = ctx.config
  site_gradient = make_site_gradient(ctx.model, cfg.client.batch_size, cfg.client.shuffle,
                                     cfg.model.l2, dp=ctx.example_dp, loss=ctx.loss)
  round_fn = make_round(site_gradient, schedules.from_config(cfg), lr=cfg.client.lr,
                        mesh=ctx.mesh, **kwargs)
  return Algorithm(
      init=lambda params, model_state: init_per_site_state(params, model_state, ctx.num_sites,
                                                           controls=controls),
      round=round_fn)


def validate_plain_sgd(config) -> None:
  """The correction terms of SCAFFOLD, FedNova and the per-site-model methods assume plain
  gradient steps of size client.lr, and they keep no BatchNorm statistics."""
  name = config.algorithm.name
  if config.client.optimizer != "sgd" or config.client.optimizer_args.get("momentum", 0.0):
    raise ConfigError("client.optimizer", f"algorithm '{name}' takes plain SGD steps of size "
                      f"client.lr; got '{config.client.optimizer}' "
                      f"{dict(config.client.optimizer_args)}; allowed: sgd without momentum")
  if config.model.norm == "batch":
    raise ConfigError("model.norm", f"algorithm '{name}' keeps no BatchNorm statistics; "
                      "allowed: none, group")


def validate_fixed_steps(config) -> None:
  """For algorithms whose correction assumes client.local_steps steps at every site."""
  if config.client.local_epochs:
    raise ConfigError("client.local_epochs", f"algorithm '{config.algorithm.name}' takes "
                      "client.local_steps steps at every site; allowed: 0 (per-site step "
                      "counts: algorithm.name=fednova or fedavg)")


def refuse_dp(config, why_not_site_level: str) -> None:
  """Example-level DP with parallel noise only: DP-SGD steps at the sites are sound for any
  algorithm whose messages are computed from the privatized gradients and public values.
  Site-level DP is refused with the reason; coordinated noise needs each site's update to be
  linear in its noise share (one FedAvg SGD step)."""
  name = config.algorithm.name
  if config.dp.level == "site":
    raise ConfigError("dp.level", f"site-level DP is not available for algorithm '{name}': "
                      f"{why_not_site_level}; allowed: none, example")
  if config.dp.level == "example" and config.dp.noise == "coordinated":
    raise ConfigError("dp.noise", "coordinated noise needs each site's update to be linear in "
                      f"its noise share (one FedAvg SGD step); allowed with {name}: parallel")


def validate_per_site(config) -> None:
  """ProxSkip, RandCom and D-SGD: the communication schedule, and which DP is sound."""
  a = config.algorithm
  _one_of("algorithm.comm_schedule", a.comm_schedule, schedules.COMM_SCHEDULES)
  if not 0 < a.comm_prob <= 1:
    raise ConfigError("algorithm.comm_prob", f"must be in (0, 1], got {a.comm_prob}")
  if int(a.comm_every) != a.comm_every or a.comm_every <= 0:
    raise ConfigError("algorithm.comm_every", f"must be a positive integer, got {a.comm_every}")
  validate_plain_sgd(config)
  validate_fixed_steps(config)
  refuse_dp(config, "every site's own model leaves it at each communicating step, unclipped "
            "and unnoised")


def validate_gossip(config) -> None:
  """RandCom and D-SGD: validate_per_site and the graph's keys."""
  validate_per_site(config)
  topology.validate(config)


def check_gossip_sites(config) -> None:
  """Once data.num_sites is known: a torus needs a composite number of sites."""
  if config.algorithm.topology == "torus":
    topology.from_config(config)  # raises if num_sites is prime


def _one_of(key, value, allowed):
  if value not in allowed:
    raise ConfigError(key, f"unknown '{value}'; allowed: {', '.join(map(str, allowed))}")
