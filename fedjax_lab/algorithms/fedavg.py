"""FedAvg and its server-optimizer family: the generic round (round.py) as it is.

McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from Decentralized
Data" (FedAvg); Reddi et al. 2021, "Adaptive Federated Optimization" (the server step as an
optax optimizer on the pseudo-gradient: sgd lr 1 = FedAvg, momentum = FedAvgM, adam = FedAdam,
yogi = FedYogi); Li et al. 2020 (FedProx: the client's proximal term, see client.py);
Li et al. 2021, "FedBN" (BatchNorm statistics kept per site instead of averaged);
site-level DP (round.SiteDP), optionally with Andrew et al. 2021, "Differentially Private
Learning with Adaptive Clipping" (the clip norm follows a quantile of the update norms).
"""

from fedjax_lab import algorithms
# The round's API, imported from here before it moved to round.py (benchmarks, notebooks,
# tests and users' scripts still import it from fedavg).
from fedjax_lab.algorithms.round import (  # noqa: F401
    AdaptiveClip, ServerState, SiteDP, clip_by_global_norm, config_aggregator, count_noise,
    cyclic_cohort, gather_sites, init_server_state, local_param_paths, make_aggregator,
    make_round, merge_local, param_path, sample_cohort, scatter_sites, secure_round,
    server_step)
from fedjax_lab import client
from fedjax_lab.attacks import byzantine

# The round sends one summed update, so secure aggregation can carry it (config.py); it
# keeps algorithm.local_params at the sites (make_round); its chain may reduce (robust.py).
SECURE_AGGREGATION = True
LOCAL_PARAMS = True
ROBUST_AGGREGATION = True


def validate(config) -> None:
  """FedAvg / FedProx take any client optimizer, BatchNorm (FedBN with batch_stats=local)
  and every DP level; the generic checks in config.py cover them."""


def build(ctx):
  """FedAvg (and FedProx: algorithm.name=fedprox adds client.prox_mu's proximal term)."""
  cfg = ctx.config
  fedbn = cfg.algorithm.batch_stats == "local"
  client_update = ctx.client_update
  if cfg.algorithm.name == "fedprox" and cfg.client.prox_mu:
    client_update = ctx.make_client_update(correction=client.prox_correction(cfg.client.prox_mu))
  aggregator = config_aggregator(cfg, ctx.site_dp, ctx.like)
  round_fn = make_round(client_update, ctx.server_tx, cohort_size=cfg.cohort_size,
                        weighting=cfg.server.weighting, fedbn=fedbn, mesh=ctx.mesh,
                        site_dp=ctx.site_dp, min_sites_per_device=cfg.min_sites_per_device,
                        server_objective=ctx.server_objective,
                        sites_per_chunk=ctx.sites_per_chunk, aggregator=aggregator,
                        secure_sum=ctx.secure_sum, byzantine_sites=cfg.attack.num_sites,
                        flip_labels=byzantine.flips_labels(cfg.attack.name),
                        canaries=ctx.canaries)
  init = lambda params, model_state: init_server_state(
      params, model_state, ctx.server_tx, ctx.num_sites, fedbn, aggregator=aggregator,
      local_params=tuple(cfg.algorithm.local_params),
      site_noise=None if ctx.example_dp is None else ctx.example_dp.correlated)
  return algorithms.Algorithm(init=init, round=round_fn)
