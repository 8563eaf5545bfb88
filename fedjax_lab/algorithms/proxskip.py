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

import jax
import jax.numpy as jnp

from fedjax_lab.algorithms import common, schedules


# Every site keeps its own model and takes part in every local step.
EVERY_SITE = PER_SITE_STATE = True

ProxSkipState = common.PerSiteState


def init_state(params, model_state, num_sites: int) -> ProxSkipState:
  return common.init_per_site_state(params, model_state, num_sites, controls=True)


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
  A communicating step sends every site's model up and the average down: 2 S messages.
  """
  p = schedule.comm_prob
  return common.make_per_site_round(
      site_gradient, schedule, lambda x, h, grads, coin: step(x, h, grads, coin, lr, p),
      messages_per_comm=lambda num_sites: 2 * num_sites, mesh=mesh)


def build(ctx):
  return common.build_per_site(ctx, make_round, controls=True)


def validate(config) -> None:
  common.validate_per_site(config)
