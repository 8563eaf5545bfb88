"""Decentralized SGD (D-SGD): a local SGD step, then gossip with the neighbours.

Lian, Zhang, Zhang, Hsieh, Zhang & Liu 2017, "Can Decentralized Algorithms Outperform
Centralized Algorithms? A Case Study for Decentralized Parallel Stochastic Gradient Descent";
in the adapt-then-combine form with local steps of Koloskova, Loizou, Boreiri, Jaggi & Stich
2020, "A Unified Theory of Decentralized SGD with Changing Topology and Local Updates"
(the mixing matrix is W on communicating steps and I otherwise):

  for t = 0, 1, ...:
    x_half_i = x_i - gamma g_i(x_i)                             every site, locally
    if step t communicates (the schedule; every step for plain D-SGD):
      x_i = sum_j W_ij x_half_j                                 gossip with the neighbours
    otherwise:
      x_i = x_half_i

W is the Metropolis-Hastings matrix of `algorithm.topology` (topology.py). Without correction
terms the fixed point is NOT the optimum under heterogeneous data: with a constant step the
iterates settle in a neighbourhood that grows with the step size, the heterogeneity of the
sites' gradients at the optimum and 1 / spectral gap; RandCom's correction removes it.
Plain D-SGD: `algorithm.comm_schedule='every_k'` with `comm_every=1`.

In the lab: gamma = client.lr, a round is client.local_steps steps, all sites every step; a
gossip step sends sum_i deg(i) models. The evaluated model `params` is the site average.
"""

import logging
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_lab import sharding
from fedjax_lab.algorithms import Algorithm, common, schedules, topology as topology_lib
from fedjax_lab.data.federated import FederatedData

log = logging.getLogger("fedjax_lab")


class GossipState(NamedTuple):
  params: Any            # the evaluated model: (1/S) sum_i x_i
  model_state: Any       # {} (models with BatchNorm statistics are not supported)
  site_params: Any       # x_i, leaves [S, ...]
  site_model_state: Any  # {}
  round: jax.Array       # int32 rounds completed


def init_state(params, model_state, num_sites: int) -> GossipState:
  return GossipState(params=params, model_state=model_state,
                     site_params=common.broadcast_to_sites(params, num_sites),
                     site_model_state={}, round=jnp.zeros((), jnp.int32))


def step(x, grads, coin, lr: float, topology: topology_lib.Topology):
  """One D-SGD iteration on stacked site arrays (leaves [S, ...]); returns x."""
  x_half = jax.tree.map(lambda x, g: x - lr * g, x, grads)
  return jax.lax.cond(coin, lambda: topology_lib.mix(topology, x_half), lambda: x_half)


def make_round(site_gradient: common.SiteGradient, schedule: schedules.CommSchedule,
               topology: topology_lib.Topology, *, lr: float, mesh=None):
  """Returns round_fn(state, data, sampling_rng, client_rng) -> (state, common.RoundMetrics)."""

  def round_fn(state: GossipState, data: FederatedData, sampling_rng, client_rng):
    coins = schedule.coins(sampling_rng, state.round)
    keys = common.site_keys(client_rng, state.round, data.num_sites)
    site_idx, site_count = sharding.constrain_sites((data.idx, data.count), mesh)
    x = common.place_per_site(state.site_params, mesh)

    def local_step(x, step_and_coin):
      t, coin = step_and_coin
      losses, grads = common.all_site_gradients(site_gradient, x, site_idx, site_count, keys,
                                                t, data)
      return step(x, grads, coin, lr, topology), losses

    x, losses = jax.lax.scan(local_step, x, (jnp.arange(schedule.local_steps), coins))
    comm_steps = coins.sum()
    x = common.place_per_site(x, mesh)
    new_state = state._replace(params=common.site_mean(x), site_params=x, round=state.round + 1)
    return new_state, common.round_metrics(
        losses.mean(), topology.messages_per_gossip * comm_steps, comm_steps)

  return round_fn


def build(ctx):
  cfg = ctx.config
  topology = topology_lib.from_config(cfg)
  log.info("dsgd: %s", topology_lib.describe(topology))
  site_gradient = common.make_site_gradient(ctx.model, cfg.client.batch_size,
                                            cfg.client.shuffle, cfg.model.l2)
  round_fn = make_round(site_gradient, schedules.from_config(cfg), topology, lr=cfg.client.lr,
                        mesh=ctx.mesh)
  return Algorithm(init=lambda params, model_state: init_state(params, model_state,
                                                               ctx.num_sites),
                   round=round_fn)
