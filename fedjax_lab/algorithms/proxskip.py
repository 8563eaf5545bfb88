"""ProxSkip / Scaffnew: local gradient steps, communication with probability p.

Mishchenko, Malinovsky, Stich & Richtarik 2022, "ProxSkip: Yes! Local Gradient Steps
Provably Lead to Communication Acceleration! Finally!" (Algorithm 1 with psi the indicator of
consensus, i.e. Scaffnew). Every site i keeps its model x_i and a control variate h_i
(sum_i h_i = 0, h_i -> grad f_i(x*)); one coin per step is shared by all sites:

  for t = 0, 1, ...:
    x_hat_i = x_i - gamma (g_i(x_i) - h_i)                      every site, locally
    with probability p (the coin):                              communicate via the server
      x_i = (1/S) sum_j (x_hat_j - (gamma/p) h_j)               prox of the consensus indicator
      h_i = h_i + (p/gamma) (x_i - x_hat_i)
    otherwise:
      x_i = x_hat_i

It minimizes the uniform average (1/S) sum_i f_i (server.weighting does not apply). At the
fixed point x_i = x*, h_i = grad f_i(x*) the gradient step and the correction cancel, so with
exact gradients it converges linearly to the EXACT optimum despite heterogeneous sites, with
O(sqrt(kappa) log 1/eps) communications at p = 1/sqrt(kappa).

In the lab: gamma = client.lr, p and the coins come from the communication schedule
(schedules.py; Bernoulli(algorithm.comm_prob) is the paper's), a round is client.local_steps
steps, every site takes part in every step (cohort_size = num_sites). A communicating step
sends 2 models per site (x_hat_i - (gamma/p) h_i up, the average down). The evaluated model
`params` is the average of the site models (equal to each of them right after a communication).
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_lab import sharding
from fedjax_lab.algorithms import Algorithm, common, schedules
from fedjax_lab.data.federated import FederatedData


class ProxSkipState(NamedTuple):
  params: Any            # the evaluated model: (1/S) sum_i x_i
  model_state: Any       # {} (models with BatchNorm statistics are not supported)
  site_params: Any       # x_i, leaves [S, ...]
  site_controls: Any     # h_i, leaves [S, ...]
  site_model_state: Any  # {}
  round: jax.Array       # int32 rounds completed


def init_state(params, model_state, num_sites: int) -> ProxSkipState:
  return ProxSkipState(params=params, model_state=model_state,
                       site_params=common.broadcast_to_sites(params, num_sites),
                       site_controls=common.zeros_like_sites(params, num_sites),
                       site_model_state={}, round=jnp.zeros((), jnp.int32))


def step(x, h, grads, coin, lr: float, comm_prob: float):
  """One ProxSkip iteration on stacked site arrays (leaves [S, ...]); returns (x, h).

  A pure function of (x, h, grads, coin): the round feeds it minibatch gradients, tests feed
  it exact gradients. `coin` is a scalar bool shared by all sites.
  """
  x_hat = jax.tree.map(lambda x, g, h: x - lr * (g - h), x, grads, h)

  def communicate():
    x_new = jax.tree.map(
        lambda xh, h: jnp.broadcast_to(jnp.mean(xh - (lr / comm_prob) * h, 0), xh.shape),
        x_hat, h)
    h_new = jax.tree.map(lambda h, xn, xh: h + (comm_prob / lr) * (xn - xh), h, x_new, x_hat)
    return x_new, h_new

  return jax.lax.cond(coin, communicate, lambda: (x_hat, h))


def make_round(site_gradient: common.SiteGradient, schedule: schedules.CommSchedule, *,
               lr: float, mesh=None):
  """Returns round_fn(state, data, sampling_rng, client_rng) -> (state, RoundMetrics).

  `site_gradient` is `common.make_site_gradient(...)` (or any function with its signature).
  """
  p = schedule.comm_prob

  def round_fn(state: ProxSkipState, data: FederatedData, sampling_rng, client_rng):
    num_sites = data.num_sites
    coins = schedule.coins(sampling_rng, state.round)  # [local_steps], one coin for all sites
    keys = common.site_keys(client_rng, state.round, num_sites)
    site_idx, site_count = sharding.constrain_sites((data.idx, data.count), mesh)
    x, h = common.place_per_site((state.site_params, state.site_controls), mesh)

    def local_step(carry, step_and_coin):
      x, h = carry
      t, coin = step_and_coin
      losses, grads = common.all_site_gradients(site_gradient, x, site_idx, site_count, keys,
                                                t, data)
      return step(x, h, grads, coin, lr, p), losses

    (x, h), losses = jax.lax.scan(local_step, (x, h),
                                  (jnp.arange(schedule.local_steps), coins))
    comm_steps = coins.sum()
    x, h = common.place_per_site((x, h), mesh)
    new_state = state._replace(params=common.site_mean(x), site_params=x, site_controls=h,
                               round=state.round + 1)
    return new_state, common.round_metrics(losses.mean(), 2 * num_sites * comm_steps,
                                           comm_steps)

  return round_fn


def build(ctx):
  cfg = ctx.config
  schedule = schedules.from_config(cfg)
  site_gradient = common.make_site_gradient(ctx.model, cfg.client.batch_size,
                                            cfg.client.shuffle, cfg.model.l2)
  round_fn = make_round(site_gradient, schedule, lr=cfg.client.lr, mesh=ctx.mesh)
  return Algorithm(init=lambda params, model_state: init_state(params, model_state,
                                                               ctx.num_sites),
                   round=round_fn)
