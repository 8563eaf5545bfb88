"""FedNova: normalized averaging of sites that take different numbers of local steps.

Wang, Liu, Liang, Joshi & Poor 2020, "Tackling the Objective Inconsistency Problem in
Heterogeneous Federated Optimization". With local SGD, site i takes tau_i steps; FedAvg's
plain average of the updates then weights site i's objective by about p_i tau_i, not p_i, and
converges to the optimum of the wrong objective. FedNova normalizes (plain SGD: a_i = 1 per
step, ||a_i||_1 = tau_i):

  sample a cohort S of K sites
  for each site i in S in parallel:  Δ_i = ClientUpdate(x, data_i) after tau_i SGD steps
                                     send d_i = Δ_i / tau_i
  tau_eff = Σ_{i in S} p_i tau_i                       p_i as FedAvg's weights
  Δ = tau_eff Σ_{i in S} p_i d_i
  x = ServerOpt(x, -Δ)

In the lab it is the FedAvg round (round.make_round) with one more aggregator,
`normalized()`, in front of the weighted mean: the three seams need nothing else. tau_i comes
from the client seam: client.local_epochs = E > 0 gives tau_i = ceil(E n_i / B), at most
client.local_steps (client.site_num_steps); with E = 0 every tau_i = client.local_steps and
FedNova is FedAvg.
"""

import jax
import jax.numpy as jnp

from fedjax_lab import aggregators, algorithms
from fedjax_lab.algorithms import common
from fedjax_lab.algorithms import round as lab_round
from fedjax_lab.errors import ConfigError


def normalized() -> aggregators.Aggregator:
  """d_i = Δ_i / tau_i at each site; the total times tau_eff = Σ p_i tau_i at the server."""

  def site(update, s, shared):
    steps = s.steps.astype(jnp.float32)
    return jax.tree.map(lambda a: a / steps, update), {"weighted_steps": s.weight * steps}

  def server(total, state, rnd, shared, stats):
    tau_eff = stats["weighted_steps"].sum()
    return jax.tree.map(lambda a: tau_eff * a, total), state, {}

  return aggregators.make(site=site, server=server)


def aggregator() -> aggregators.Aggregator:
  return aggregators.chain(normalized(), aggregators.weighted())


SECURE_AGGREGATION = True  # its one summed update (d_i = Δ_i / tau_i, weighted)


def validate(config) -> None:
  """Plain SGD (momentum or Adam change a_i); example-level DP only; secure aggregation
  without dropouts (tau_eff = Σ p_i tau_i would then need the survivors' share)."""
  common.validate_plain_sgd(config)
  if config.secagg.enabled and config.secagg.dropout_rate > 0:
    raise ConfigError("secagg.dropout_rate", "fednova's tau_eff is summed over the whole "
                      "cohort, not over the survivors of dropouts; use 0")
  common.refuse_dp(config, "tau_eff = sum_i p_i tau_i is computed from the realised cohort, "
                   "which site-level DP keeps private")


def build(ctx):
  cfg = ctx.config
  client_update = ctx.make_client_update(local_epochs=cfg.client.local_epochs)
  agg = aggregator()
  round_fn = lab_round.make_round(client_update, ctx.server_tx, cohort_size=cfg.cohort_size,
                                  weighting=cfg.server.weighting, mesh=ctx.mesh,
                                  min_sites_per_device=cfg.min_sites_per_device,
                                  server_objective=ctx.server_objective,
                                  sites_per_chunk=ctx.sites_per_chunk, aggregator=agg,
                                  secure_sum=ctx.secure_sum)
  init = lambda params, model_state: lab_round.init_server_state(
      params, model_state, ctx.server_tx, ctx.num_sites, False, aggregator=agg)
  return algorithms.Algorithm(init=init, round=round_fn)
