"""Federated algorithms by name, and the contract every algorithm meets (written once here).

Adding one is one file plus one entry in `_MODULES`. The module `fedjax_lab.algorithms.<m>`
provides:
  build(ctx: AlgorithmContext) -> Algorithm
  validate(config) -> None        its own config checks (raise errors.ConfigError naming the
                                  key); config.validate calls it, so no algorithm name is
                                  hard-coded in config.py or experiment.py
  EVERY_SITE = False              True: every site takes part in every local step
                                  (cohort_size must be data.num_sites)
  PER_SITE_STATE = False          True: the state holds per-site arrays [sites, ...], so the
                                  round is always sharded over every device

An `Algorithm` is
  init(params, model_state) -> state    a NamedTuple with at least `params` (the model that is
                                        evaluated), `model_state`, `round` (int32), and
                                        `site_model_state` (what each site keeps, or {})
  round(state, data, sampling_rng, client_rng) -> (state, RoundMetrics)
                                        `messages`: the number of model-sized messages sent
                                        this round (up + down), from which the experiment
                                        reports bytes_communicated. A round with a host
                                        step (secure aggregation) has `round.jittable =
                                        False`: it jits its own halves, the experiment calls
                                        it as it is
built from the three seams of docs/design.md: the client update (client.make_local_update),
the aggregator chain (aggregators.py) and the server optax step (round.server_step).
The experiment jits `round` (and fuses several with lax.scan); per-site state lives in the
state as stacked arrays [sites, ...] in fields named site_*, sharded like the data.
"""

import importlib
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_lab.errors import ConfigError


class AlgorithmContext(NamedTuple):
  config: Any                # the whole run config
  model: Any                 # fedjax_lab.models.Model
  client_update: Callable    # client.make_client_update(...) for this config (no correction)
  client_tx: optax.GradientTransformationExtraArgs
  server_tx: optax.GradientTransformationExtraArgs
  num_sites: int
  mesh: Any
  site_dp: Any = None        # round.SiteDP for dp.level="site", else None
  # client.make_public_objective(...) when server.optimizer is a curvature one, else None.
  server_objective: Callable | None = None
  sites_per_chunk: int = 0   # config.sites_per_chunk resolved (sharding.map_sum_sites)
  example_dp: Any = None     # client.ExampleDP for dp.level="example", else None
  # make_client_update(correction=None, local_epochs=0.0) -> a client update for this config
  # with the algorithm's correction (client.make_client_update's other arguments bound).
  make_client_update: Callable | None = None
  # secagg.round.SecureSum when secagg.enabled (the algorithm declares SECURE_AGGREGATION =
  # True and passes it to round.make_round), else None.
  secure_sum: Callable | None = None
  loss: Any = None           # losses.Loss of model.loss (None: cross-entropy)
  like: Any = None           # the parameters' shapes (jax.ShapeDtypeStruct leaves)
  canaries: Any = None       # attacks.canaries.Canaries (audit.canaries > 0), else None


class Algorithm(NamedTuple):
  init: Callable
  round: Callable


class RoundMetrics(NamedTuple):
  """What every algorithm's round returns beside its state (one type for all of them)."""
  train_loss: jax.Array         # mean local training loss of the round's sites and steps
  messages: jax.Array           # model-sized messages sent this round (up + down / to neighbours)
  comm_steps: jax.Array         # local steps of the round that communicated (1 for FedAvg)
  dp_overflow: jax.Array        # Poisson-sampled examples/sites that did not fit (0 without DP)
  clip_norm: Any                # site DP: the clip norm this round's updates were clipped to; else {}
  nonfinite_updates: jax.Array  # site DP: cohort sites whose update had a NaN/inf (sent as 0)
  # secagg.enabled: survivors, aborted, clipped (coordinates clipped to secagg.clip_range),
  # host_seconds (the protocol's host cryptography); else {}
  secagg: Any = {}


def round_metrics(train_loss, messages, comm_steps=1, dp_overflow=0, clip_norm=None,
                  nonfinite_updates=0, secagg=None) -> RoundMetrics:
  return RoundMetrics(train_loss=train_loss, messages=jnp.asarray(messages, jnp.int32),
                      comm_steps=jnp.asarray(comm_steps, jnp.int32),
                      dp_overflow=jnp.asarray(dp_overflow, jnp.int32),
                      clip_norm={} if clip_norm is None else clip_norm,
                      nonfinite_updates=jnp.asarray(nonfinite_updates, jnp.int32),
                      secagg={} if secagg is None else secagg)


# name -> module under fedjax_lab/algorithms/ (fedprox is fedavg whose client adds the
# proximal term client.prox_mu).
_MODULES = {"fedavg": "fedavg", "fedprox": "fedavg",
            "fednova": "fednova",    # normalized averaging, per-site step counts
            "scaffold": "scaffold",  # control variates, option II
            "proxskip": "proxskip",  # Scaffnew: communicate w.p. p
            "randcom": "randcom",    # ProxSkip-style over a graph
            "dsgd": "gossip"}        # decentralized SGD (gossip)
ALGORITHMS = tuple(_MODULES)


def module(name: str):
  """The module implementing algorithm `name` (imported when first used)."""
  if name not in _MODULES:
    raise ConfigError("algorithm.name", f"unknown '{name}'; allowed: {', '.join(ALGORITHMS)}")
  return importlib.import_module(f"fedjax_lab.algorithms.{_MODULES[name]}")


def every_site(name: str) -> bool:
  """Whether every site takes part in every local step (cohort_size = num_sites)."""
  return getattr(module(name), "EVERY_SITE", False)


def per_site_state(name: str) -> bool:
  """Whether the state holds per-site arrays, so the round always shards over every device."""
  return getattr(module(name), "PER_SITE_STATE", False)


def validate(config) -> None:
  """The algorithm's own config checks (its module's `validate`)."""
  check = getattr(module(config.algorithm.name), "validate", None)
  if check is not None:
    check(config)


def make_algorithm(ctx: AlgorithmContext) -> Algorithm:
  return module(ctx.config.algorithm.name).build(ctx)


def fuse_rounds(round_fn: Callable, num_rounds: int) -> Callable:
  """`num_rounds` rounds as ONE lax.scan (one dispatch); metrics gain a leading rounds axis."""

  def fused(state, data, sampling_rng, client_rng):
    def body(s, _):
      return round_fn(s, data, sampling_rng, client_rng)
    return jax.lax.scan(body, state, None, length=num_rounds)

  return fused
