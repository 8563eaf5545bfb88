"""RandCom: decentralized local steps with random communication skipping over a graph.

Guo, Alghunaim, Yuan, Condat & Cao 2023, "RandCom: Random Communication Skipping Method for
Decentralized Stochastic Optimization" (arXiv 2310.07983). ProxSkip's control variates carried
to a graph: the server average is replaced by one gossip step with the neighbours. Every site
i keeps its model x_i and a correction h_i (sum_i h_i = 0 throughout, since the mixing matrix
is doubly stochastic); one coin per step is shared by all sites:

  for t = 0, 1, ...:
    x_hat_i = x_i - gamma (g_i(x_i) - h_i)                      every site, locally
    with probability p (the coin):                              gossip with the neighbours
      x_i = sum_j Wbar_ij x_hat_j,      Wbar = (I + W) / 2
      h_i = h_i + (p/gamma) (x_i - x_hat_i)
    otherwise:
      x_i = x_hat_i

W is the Metropolis-Hastings matrix of `algorithm.topology` (topology.py); the lazy Wbar has
eigenvalues in [0, 1], as exact diffusion needs. Fixed point: consensus x_i = x* with
h_i = grad f_i(x*) (the gradient step and the correction cancel and Wbar fixes consensus), and
sum_i h_i = 0 forces sum_i grad f_i(x*) = 0: the EXACT optimum of (1/S) sum_i f_i, whatever
the heterogeneity. With p = 1 the method is exact diffusion / NIDS
(x^{t+1} = Wbar (2 x^t - x^{t-1} - gamma (g^t - g^{t-1}))); with the complete graph and
Wbar replaced by the average 11^T/S it is exactly ProxSkip (sum_i h_i = 0).

In the lab: gamma = client.lr, p and the coins from the communication schedule, a round is
client.local_steps steps, all sites every step. A gossip step sends sum_i deg(i) models (each
site its model to each neighbour). The evaluated model `params` is the average of the site
models (no site holds it: it is the quantity the analysis bounds).
"""

import logging

import jax

from fedjax_lab.algorithms import common, schedules, topology as topology_lib

log = logging.getLogger("fedjax_lab")

# Every site keeps its own model and takes part in every local step.
EVERY_SITE = PER_SITE_STATE = True


RandComState = common.PerSiteState


def init_state(params, model_state, num_sites: int) -> RandComState:
  return common.init_per_site_state(params, model_state, num_sites, controls=True)


def step(x, h, grads, coin, lr: float, comm_prob: float, topology: topology_lib.Topology):
  """One RandCom iteration on stacked site arrays (leaves [S, ...]); returns (x, h).

  A pure function of (x, h, grads, coin); `coin` is a scalar bool shared by all sites.
  """
  x_hat = jax.tree.map(lambda x, g, h: x - lr * (g - h), x, grads, h)

  def gossip():
    x_new = topology_lib.mix(topology, x_hat, lazy=True)
    h_new = jax.tree.map(lambda h, xn, xh: h + (comm_prob / lr) * (xn - xh), h, x_new, x_hat)
    return x_new, h_new

  return jax.lax.cond(coin, gossip, lambda: (x_hat, h))


def make_round(site_gradient: common.SiteGradient, schedule: schedules.CommSchedule,
               topology: topology_lib.Topology, *, lr: float, mesh=None):
  """Returns round_fn(state, data, sampling_rng, client_rng) -> (state, common.RoundMetrics)."""
  p = schedule.comm_prob
  return common.make_per_site_round(
      site_gradient, schedule, lambda x, h, grads, coin: step(x, h, grads, coin, lr, p, topology),
      messages_per_comm=lambda _: topology.messages_per_gossip, mesh=mesh)


def build(ctx):
  topology = topology_lib.from_config(ctx.config)
  log.info("randcom: %s", topology_lib.describe(topology, lazy=True))
  return common.build_per_site(ctx, make_round, controls=True, topology=topology)


validate = common.validate_gossip
check_sites = common.check_gossip_sites
