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

import jax

from fedjax_lab.algorithms import common, schedules, topology as topology_lib

log = logging.getLogger("fedjax_lab")

# Every site keeps its own model and takes part in every local step.
EVERY_SITE = PER_SITE_STATE = True


GossipState = common.PerSiteState


def init_state(params, model_state, num_sites: int) -> GossipState:
  return common.init_per_site_state(params, model_state, num_sites, controls=False)


def step(x, grads, coin, lr: float, topology: topology_lib.Topology):
  """One D-SGD iteration on stacked site arrays (leaves [S, ...]); returns x."""
  x_half = jax.tree.map(lambda x, g: x - lr * g, x, grads)
  return jax.lax.cond(coin, lambda: topology_lib.mix(topology, x_half), lambda: x_half)


def make_round(site_gradient: common.SiteGradient, schedule: schedules.CommSchedule,
               topology: topology_lib.Topology, *, lr: float, mesh=None):
  """Returns round_fn(state, data, sampling_rng, client_rng) -> (state, common.RoundMetrics)."""
  return common.make_per_site_round(
      site_gradient, schedule, lambda x, h, grads, coin: (step(x, grads, coin, lr, topology), h),
      messages_per_comm=lambda _: topology.messages_per_gossip, mesh=mesh)


def build(ctx):
  topology = topology_lib.from_config(ctx.config)
  log.info("dsgd: %s", topology_lib.describe(topology))
  return common.build_per_site(ctx, make_round, controls=False, topology=topology)


validate = common.validate_gossip
check_sites = common.check_gossip_sites
