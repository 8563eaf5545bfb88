"""Federated algorithms by name. Adding one is one file plus one entry in `_BUILDERS`.

Each builder takes an `AlgorithmContext` and returns an `Algorithm`:
  init(params, model_state) -> state    a NamedTuple with at least `params` (the model that is
                                        evaluated), `model_state`, `round` (int32), and
                                        `site_model_state` (per-site statistics or {})
  round(state, data, sampling_rng, client_rng) -> (state, metrics)
                                        metrics: `train_loss` and `messages`, the number of
                                        model-sized messages sent this round (up + down), from
                                        which the experiment reports bytes_communicated
The experiment jits `round` (and fuses several with lax.scan); per-site state lives in the
state as stacked arrays [sites, ...], sharded like the data.
"""

import importlib
from typing import Any, Callable, NamedTuple

import jax
import optax

from fedjax_lab.errors import ConfigError


class AlgorithmContext(NamedTuple):
  config: Any                # the whole run config
  model: Any                 # fedjax_lab.models.Model
  client_update: Callable    # client.make_client_update(...) for this config
  client_tx: optax.GradientTransformationExtraArgs
  server_tx: optax.GradientTransformationExtraArgs
  num_sites: int
  mesh: Any
  site_dp: Any = None        # fedavg.SiteDP for dp.level="site", else None
  # client.make_public_objective(...) when server.optimizer is a curvature one, else None.
  server_objective: Callable | None = None
  sites_per_chunk: int = 0   # config.sites_per_chunk resolved (sharding.map_sum_sites)


class Algorithm(NamedTuple):
  init: Callable
  round: Callable


def _fedavg(ctx: AlgorithmContext) -> Algorithm:
  from fedjax_lab.algorithms import fedavg
  cfg = ctx.config
  fedbn = cfg.algorithm.batch_stats == "local"
  round_fn = fedavg.make_round(ctx.client_update, ctx.server_tx, cohort_size=cfg.cohort_size,
                               weighting=cfg.server.weighting, fedbn=fedbn, mesh=ctx.mesh,
                               site_dp=ctx.site_dp,
                               min_sites_per_device=cfg.min_sites_per_device,
                               server_objective=ctx.server_objective,
                               sites_per_chunk=ctx.sites_per_chunk)
  adaptive = ctx.site_dp is not None and ctx.site_dp.adaptive is not None
  init = lambda params, model_state: fedavg.init_server_state(
      params, model_state, ctx.server_tx, ctx.num_sites, fedbn,
      clip_norm=ctx.site_dp.clip_norm if adaptive else None)  # C_0, then C_t in the state
  return Algorithm(init=init, round=round_fn)


def _module_builder(module_name: str) -> Callable:
  """The `build(ctx)` of fedjax_lab.algorithms.<module_name>, imported when first used."""
  def build(ctx: AlgorithmContext) -> Algorithm:
    return importlib.import_module(f"fedjax_lab.algorithms.{module_name}").build(ctx)
  return build


# fedprox is fedavg whose client adds the proximal term (client.prox_mu), see client.py.
_BUILDERS = {"fedavg": _fedavg, "fedprox": _fedavg,
             "scaffold": _module_builder("scaffold"),   # control variates, option II
             "proxskip": _module_builder("proxskip"),   # Scaffnew: communicate w.p. p
             "randcom": _module_builder("randcom"),     # ProxSkip-style over a graph
             "dsgd": _module_builder("gossip")}         # decentralized SGD (gossip)
# Algorithms whose every site keeps its own model and takes part in every local step.
PER_SITE_MODELS = ("proxskip", "randcom", "dsgd")
ALGORITHMS = tuple(_BUILDERS)


def make_algorithm(ctx: AlgorithmContext) -> Algorithm:
  name = ctx.config.algorithm.name
  if name not in _BUILDERS:
    raise ConfigError("algorithm.name", f"unknown '{name}'; allowed: {', '.join(ALGORITHMS)}")
  return _BUILDERS[name](ctx)


def fuse_rounds(round_fn: Callable, num_rounds: int) -> Callable:
  """`num_rounds` rounds as ONE lax.scan (one dispatch); metrics gain a leading rounds axis."""

  def fused(state, data, sampling_rng, client_rng):
    def body(s, _):
      return round_fn(s, data, sampling_rng, client_rng)
    return jax.lax.scan(body, state, None, length=num_rounds)

  return fused
