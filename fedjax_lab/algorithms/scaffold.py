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

from fedjax_lab import aggregators, algorithms, client, sharding
from fedjax_lab import keys as lab_keys
from fedjax_lab.algorithms import Algorithm, common
from fedjax_lab.algorithms.round import config_aggregator, gather_sites, server_step
from fedjax_lab.data.federated import FederatedData

PER_SITE_STATE = True  # c_i, leaves [sites, ...]
ROBUST_AGGREGATION = True  # dy_i through the chain's reduce step (make_round)


class ScaffoldState(NamedTuple):
  params: Any            # the server model x
  model_state: Any       # {} (models with BatchNorm statistics are not supported)
  opt_state: Any         # the server optimizer's state
  control: Any           # c, shaped like params
  site_controls: Any     # c_i, leaves [sites, ...]
  site_model_state: Any  # {}
  round: jax.Array       # int32 rounds completed
  aggregator_state: Any = {}  # the chain's state (centered clipping's center), else {}


def init_state(params, model_state, server_tx, num_sites: int,
               aggregator: aggregators.Aggregator | None = None) -> ScaffoldState:
  return ScaffoldState(params=params, model_state=model_state,
                       opt_state=server_tx.init(params),
                       control=jax.tree.map(jnp.zeros_like, params),
                       site_controls=common.zeros_like_sites(params, num_sites),
                       site_model_state={}, round=jnp.zeros((), jnp.int32),
                       aggregator_state={} if aggregator is None else aggregator.init())


def correction(grads, params, global_params, extra):
  """SCAFFOLD's corrected step direction g - c_i + c; extra = (c, c_i)."""
  c, c_i = extra
  return jax.tree.map(lambda g, ci, c: g - ci + c, grads, c_i, c)


def control_delta(delta, c, c_i, local_steps: int, lr: float):
  """dc_i = c_i+ - c_i with c_i+ = c_i - c + (x - y_i) / (local_steps * eta_l), option II
  (delta = y_i - x). dc_i = -c - delta / (local_steps * eta_l): no more than the update and c."""
  c_i_new = jax.tree.map(lambda ci, c, d: ci - c + (-d) / (local_steps * lr), c_i, c, delta)
  return jax.tree.map(jnp.subtract, c_i_new, c_i)


def make_client_update(site_gradient: common.SiteGradient, local_steps: int, lr: float):
  """client.make_local_update with plain SGD steps of size eta_l and SCAFFOLD's correction.
  `site_gradient`: common.make_site_gradient (with `dp`, every step a DP-SGD step)."""
  return client.make_local_update(client.from_site_gradient(site_gradient),
                                  optax.with_extra_args_support(optax.sgd(lr)), local_steps,
                                  correction=correction, private=True)


def make_round(site_gradient: common.SiteGradient, server_tx: optax.GradientTransformation, *,
               cohort_size: int, local_steps: int, lr: float, weighting: str = "examples",
               mesh=None, server_objective=None, sites_per_chunk: int = 0,
               aggregator: aggregators.Aggregator | None = None):
  """Returns round_fn(state, data, sampling_rng, client_rng) -> (state, RoundMetrics).

  `aggregator`: the chain the model updates dy_i go through (default `weighted()`: the
  paper's Σ w_i dy_i; a robust chain reduces them, aggregators.reduce_stacked). The control
  updates dc_i are always summed: c must stay Σ_i q_i c_i, which a non-linear rule breaks.

  `site_gradient`: common.make_site_gradient (or any function with its signature; tests use
  exact gradients). `server_objective`: the public curvature objective of a curvature
  ServerOpt (round.server_step).
  """
  client_update = make_client_update(site_gradient, local_steps, lr)
  if aggregator is None:
    aggregator = aggregators.weighted()
  keep_updates = aggregators.stacked(aggregator)

  def round_fn(state: ScaffoldState, data: FederatedData, sampling_rng, client_rng):
    t = state.round
    cohort = lab_keys.round_cohort(sampling_rng, t, data.num_sites, cohort_size)
    c_i = gather_sites(state.site_controls, cohort)
    site_idx, site_count, c_i = sharding.constrain_sites(
        (data.idx[cohort], data.count[cohort], c_i), mesh)
    round_rng = jax.random.fold_in(client_rng, t)  # the server step's key
    site_rngs = lab_keys.site_keys(client_rng, t, cohort)

    if weighting == "examples":
      w = site_count.astype(jnp.float32) / site_count.sum()
      q = site_count.astype(jnp.float32) / data.count.sum()
    else:
      w = jnp.full((cohort_size,), 1.0 / cohort_size)
      q = jnp.full((cohort_size,), 1.0 / data.num_sites)

    ones = jnp.ones((cohort_size,), jnp.float32)
    rnd = aggregators.RoundInfo(t=t, client_rng=client_rng, cohort=cohort, in_cohort=ones,
                                num_in=ones.sum())
    shared = aggregator.broadcast(state.aggregator_state, rnd, {})

    def site_fn(x, c, c_i, idx, count, rng, w_i, q_i, site, data):
      out = client_update(x, {}, idx, count, rng, data, (c, c_i))
      dc = control_delta(out.delta, c, c_i, local_steps, lr)
      scale = lambda tree, k: jax.tree.map(lambda a: k * a, tree)
      dy, stats = aggregator.site(out.delta, aggregators.SiteInfo(
          site=site, weight=w_i, present=jnp.float32(1.0), steps=out.num_steps), shared)
      to_sum = {"dc": scale(dc, q_i), "loss": w_i * out.train_loss,
                "overflow": out.dp_overflow}
      per_site = {"dc": dc, "stats": stats}
      if keep_updates:
        per_site["dy"] = dy
      else:
        to_sum["dy"] = dy
      return to_sum, per_site

    sums, per_site = sharding.map_sum_sites(
        site_fn, (None, None, 0, 0, 0, 0, 0, 0, 0, None), mesh, sites_per_chunk)(
            state.params, state.control, c_i, site_idx, site_count, site_rngs, w, q, cohort,
            data)
    dc = per_site["dc"]
    if keep_updates:
      sums["dy"] = aggregators.reduce_stacked(aggregator, per_site["dy"], w, ones,
                                              state.aggregator_state, rnd, shared)
    dy, agg_state, _ = aggregator.server(sums["dy"], state.aggregator_state, rnd, shared,
                                         per_site["stats"])
    params, opt_state = server_step(server_tx, dy, state.opt_state, state.params,
                                    server_objective, state.model_state, round_rng, data)
    control = jax.tree.map(jnp.add, state.control, sums["dc"])
    site_controls = common.place_per_site(
        jax.tree.map(lambda all_, d: all_.at[cohort].add(d), state.site_controls, dc), mesh)

    new_state = state._replace(params=params, opt_state=opt_state, control=control,
                               site_controls=site_controls, round=t + 1,
                               aggregator_state=agg_state)
    return new_state, algorithms.round_metrics(sums["loss"], 4 * cohort_size, 1,
                                               dp_overflow=sums["overflow"])

  return round_fn


def validate(config):
  """SCAFFOLD's own constraints (config.validate calls it)."""
  common.validate_plain_sgd(config)
  common.validate_fixed_steps(config)
  common.refuse_dp(config, "each site also sends its control update dc_i, which the site-level "
                   "chain does not clip or noise (a site's c_i would leave it through it)")


def build(ctx):
  """Under example-level DP every local step is a DP-SGD step, so y_i, dy_i and
  dc_i = -c - dy_i / (local_steps eta_l) are functions of privatized gradients and of the
  public c: post-processing, accounted like FedAvg's DP-SGD (local_steps steps a round)."""
  cfg = ctx.config
  aggregator = config_aggregator(cfg, None, ctx.like)
  site_gradient = common.make_site_gradient(ctx.model, cfg.client.batch_size,
                                            cfg.client.shuffle, cfg.model.l2, dp=ctx.example_dp,
                                            loss=ctx.loss)
  round_fn = make_round(site_gradient, ctx.server_tx, cohort_size=cfg.cohort_size,
                        local_steps=cfg.client.local_steps, lr=cfg.client.lr,
                        weighting=cfg.server.weighting, mesh=ctx.mesh,
                        server_objective=ctx.server_objective,
                        sites_per_chunk=ctx.sites_per_chunk, aggregator=aggregator)
  return Algorithm(init=lambda params, model_state: init_state(
      params, model_state, ctx.server_tx, ctx.num_sites, aggregator), round=round_fn)
