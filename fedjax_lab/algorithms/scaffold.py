"""SCAFFOLD: local steps corrected by control variates (option II).

Karimireddy, Kale, Mohri, Reddi, Stich & Suresh 2020, "SCAFFOLD: Stochastic Controlled
Averaging for Federated Learning", Algorithm 1 with the control update of option II. The
server keeps the model x and a control c; every site i keeps its control c_i (leaves
[sites, ...]), all zero at the start:

  sample a cohort S of K sites
  for each site i in S in parallel (jax.vmap):
    y_i = x
    for k = 1 .. local_steps:  y_i = y_i - eta_l (g_i(y_i) - c_i + c)
    c_i+ = c_i - c + (x - y_i) / (local_steps * eta_l)            option II
    send (dy_i, dc_i) = (y_i - x, c_i+ - c_i);  c_i = c_i+
  dx = sum_{i in S} w_i dy_i                   w: the cohort's weights, as FedAvg's
  x = ServerOpt(x, -dx)                        sgd with lr eta_g is the paper's x + eta_g dx
  c = c + sum_{i in S} q_i dc_i                q_i = n_i / N (examples) or 1 / num_sites

With `server.weighting='uniform'`, w_i = 1/K and q_i = 1/N: the paper's dx = mean dy_i and
c = c + (|S|/N) mean dc_i. The q_i keep c = sum_i q_i c_i at every round, the control of the
weighted objective sum_i q_i f_i that FedAvg minimizes with the same weighting.

eta_l = client.lr (plain SGD steps: option II divides by local_steps * eta_l). A site in the
cohort receives x and c and sends dy_i and dc_i: 4 model-sized messages, twice FedAvg's.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_lab import sharding
from fedjax_lab.algorithms import Algorithm, common
from fedjax_lab.algorithms.fedavg import sample_cohort, server_step
from fedjax_lab.data.federated import FederatedData


class ScaffoldState(NamedTuple):
  params: Any            # the server model x
  model_state: Any       # {} (models with BatchNorm statistics are not supported)
  opt_state: Any         # the server optimizer's state
  control: Any           # c, shaped like params
  site_controls: Any     # c_i, leaves [sites, ...]
  site_model_state: Any  # {}
  round: jax.Array       # int32 rounds completed


def init_state(params, model_state, server_tx, num_sites: int) -> ScaffoldState:
  return ScaffoldState(params=params, model_state=model_state,
                       opt_state=server_tx.init(params),
                       control=jax.tree.map(jnp.zeros_like, params),
                       site_controls=common.zeros_like_sites(params, num_sites),
                       site_model_state={}, round=jnp.zeros((), jnp.int32))


def client_update(site_gradient: common.SiteGradient, local_steps: int, lr: float,
                  x, c, c_i, site_idx, site_count, rng, data: FederatedData):
  """One site's corrected local steps; returns (dy_i, dc_i, mean local loss)."""

  def local_step(y, t):
    loss, g = site_gradient(y, site_idx, site_count, rng, t, data)
    return jax.tree.map(lambda y, g, ci, c: y - lr * (g - ci + c), y, g, c_i, c), loss

  y, losses = jax.lax.scan(local_step, x, jnp.arange(local_steps))
  c_i_new = jax.tree.map(lambda ci, c, x, y: ci - c + (x - y) / (local_steps * lr),
                         c_i, c, x, y)
  return (jax.tree.map(jnp.subtract, y, x), jax.tree.map(jnp.subtract, c_i_new, c_i),
          losses.mean())


def make_round(site_gradient: common.SiteGradient, server_tx: optax.GradientTransformation, *,
               cohort_size: int, local_steps: int, lr: float, weighting: str = "examples",
               mesh=None, server_objective=None, sites_per_chunk: int = 0):
  """Returns round_fn(state, data, sampling_rng, client_rng) -> (state, common.RoundMetrics).

  `server_objective`: the public curvature objective of a curvature ServerOpt (fedavg.server_step).
  """

  def round_fn(state: ScaffoldState, data: FederatedData, sampling_rng, client_rng):
    t = state.round
    cohort = sample_cohort(jax.random.fold_in(sampling_rng, t), data.num_sites, cohort_size)
    c_i = jax.tree.map(lambda a: a[cohort], state.site_controls)
    site_idx, site_count, c_i = sharding.constrain_sites(
        (data.idx[cohort], data.count[cohort], c_i), mesh)
    round_rng = jax.random.fold_in(client_rng, t)
    site_rngs = jax.vmap(lambda s: jax.random.fold_in(round_rng, s))(cohort)

    if weighting == "examples":
      w = site_count.astype(jnp.float32) / site_count.sum()
      q = site_count.astype(jnp.float32) / data.count.sum()
    else:
      w = jnp.full((cohort_size,), 1.0 / cohort_size)
      q = jnp.full((cohort_size,), 1.0 / data.num_sites)

    def site_fn(x, c, c_i, idx, count, rng, w_i, q_i, data):
      dy, dc, loss = client_update(site_gradient, local_steps, lr, x, c, c_i, idx, count, rng,
                                   data)
      scale = lambda tree, k: jax.tree.map(lambda a: k * a, tree)
      return {"dy": scale(dy, w_i), "dc": scale(dc, q_i), "loss": w_i * loss}, dc

    sums, dc = sharding.map_sum_sites(site_fn, (None, None, 0, 0, 0, 0, 0, 0, None), mesh,
                                      sites_per_chunk)(
        state.params, state.control, c_i, site_idx, site_count, site_rngs, w, q, data)
    params, opt_state = server_step(server_tx, sums["dy"], state.opt_state, state.params,
                                    server_objective, state.model_state, round_rng, data)
    control = jax.tree.map(jnp.add, state.control, sums["dc"])
    site_controls = common.place_per_site(
        jax.tree.map(lambda all_, d: all_.at[cohort].add(d), state.site_controls, dc), mesh)

    new_state = state._replace(params=params, opt_state=opt_state, control=control,
                               site_controls=site_controls, round=t + 1)
    return new_state, common.round_metrics(sums["loss"], 4 * cohort_size, 1)

  return round_fn


def build(ctx):
  cfg = ctx.config
  site_gradient = common.make_site_gradient(ctx.model, cfg.client.batch_size,
                                            cfg.client.shuffle, cfg.model.l2)
  round_fn = make_round(site_gradient, ctx.server_tx, cohort_size=cfg.cohort_size,
                        local_steps=cfg.client.local_steps, lr=cfg.client.lr,
                        weighting=cfg.server.weighting, mesh=ctx.mesh,
                        server_objective=ctx.server_objective,
                        sites_per_chunk=ctx.sites_per_chunk)
  return Algorithm(init=lambda params, model_state: init_state(params, model_state,
                                                               ctx.server_tx, ctx.num_sites),
                   round=round_fn)
