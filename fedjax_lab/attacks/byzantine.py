"""Byzantine sites: poisoned updates inside the vmapped round (attack.name, attack.num_sites).

Who is Byzantine: the first `attack.num_sites` slots of every round's cohort. With full
participation (cohort_size = data.num_sites) the cohort is the sites in order, so these are
the fixed sites 0 .. f-1, ByzFL's setting (f of n sites Byzantine in every round); with
sampled cohorts, every round has exactly f Byzantine sites among its cohort.

Threat model (as ByzFL's, LPD-EPFL): the Byzantine sites collude and are omniscient: they see
the honest sites' updates of the round (and, for the optimised attacks, the server's
aggregation rule) before sending their own. The label-flipping sites train like any site,
inside the vmap, on labels y -> num_classes - 1 - y (round.make_round's flip_labels); the
others replace their rows of the cohort's stacked updates after the vmap, in the same jit,
in front of the pre-aggregation and the reducer (`attacked` wraps the chain's reduce).
Updates are the lab's deltas (new - old parameters, minus the learning rate times a
gradient); ByzFL's attacks are written on gradients, so their signs are flipped here.

Attacks (x_h: the honest updates of the round, μ and σ their coordinate-wise mean and
population standard deviation, s: attack.scale or the default below):
  sign_flip   -μ  (ByzFL's SignFlipping)
  scaled      s x_k, x_k the site's own update trained on flipped labels (model replacement,
              Bagdasaryan et al. 2020, "How To Backdoor Federated Learning"; default
              s = cohort / f, so the mean takes the poisoned model)
  label_flip  the site's own update trained on flipped labels
  ipm         -s μ  (inner product manipulation, Xie, Koyejo & Gupta 2020, "Fall of Empires";
              default s = 0.1, the paper's small ε)
  alie        μ - s σ  (A Little Is Enough, Baruch, Baruch & Goldberg 2019; default s = 1.5,
              ByzFL's)
  opt_ipm / opt_alie  ipm / alie with s chosen each round from GRID as the one whose aggregate
              (by the configured pre-aggregation and reducer) lies furthest from μ (ByzFL's
              Optimal_IPM / Optimal_ALIE, on a grid instead of a line search)
"""

import jax
import jax.numpy as jnp

from fedjax_lab import aggregators
from fedjax_lab.errors import ConfigError
from fedjax_lab.data import sources

ATTACKS = ("none", "sign_flip", "scaled", "label_flip", "ipm", "alie", "opt_ipm", "opt_alie")
GRID = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)


def flips_labels(name: str) -> bool:
  return name in ("label_flip", "scaled")


def default_scale(name: str, cohort: int, num_sites: int) -> float:
  return {"scaled": cohort / max(num_sites, 1), "ipm": 0.1, "alie": 1.5}.get(name, 1.0)


def honest_stats(x, honest):
  """(μ, σ): the honest rows' coordinate-wise mean and population standard deviation."""
  h = honest.astype(x.dtype)
  k = jnp.maximum(h.sum(), 1.0)
  mu = h @ x / k
  var = h @ jnp.square(x - mu) / k
  return mu, jnp.sqrt(var)


def poisoned(name: str, x, honest, scale):
  """The Byzantine row(s) of attack `name` at scale `scale` (one row, or x's rows)."""
  mu, sigma = honest_stats(x, honest)
  if name == "sign_flip":
    return -mu
  if name in ("ipm", "opt_ipm"):
    return -scale * mu
  if name in ("alie", "opt_alie"):
    return mu - scale * sigma
  if name == "scaled":
    return scale * x
  if name == "label_flip":
    return x
  raise ValueError(f"byzantine.poisoned: unknown attack '{name}'")


def attacked(name: str, num_sites: int, target: aggregators.Aggregator | None = None,
             scale: float | None = None) -> aggregators.Aggregator:
  """`target` (a chain with a reduce step; default: the weighted mean on the stacked path)
  whose reduce first lets the Byzantine sites (the first `num_sites` valid slots) write their
  rows. Wrapping the target, rather than a member in front of it, hands the optimised
  attacks the target's own state (centered clipping's center) when they try their scales."""
  if name not in ATTACKS[1:]:
    raise ValueError(f"byzantine.attacked: unknown '{name}'; allowed: {', '.join(ATTACKS[1:])}")
  if target is None or target.reduce is None:
    target = aggregators.chain(*(() if target is None else (target,)),
                               aggregators.make(reduce=aggregators.weighted_mean))

  def poison(x, weights, valid, state, rnd, shared):
    byz = (jnp.arange(x.shape[0]) < num_sites) & (valid > 0)
    honest = ~byz & (valid > 0)
    place = lambda rows: jnp.where(byz[:, None], rows, x)
    if not name.startswith("opt_"):
      s = default_scale(name, x.shape[0], num_sites) if scale is None else scale
      return place(poisoned(name, x, honest, s))
    mu, _ = honest_stats(x, honest)

    def damage(s):
      agg = target.reduce(place(poisoned(name, x, honest, s)), weights, valid, state, rnd,
                          shared)
      return jnp.linalg.norm(agg - mu)

    grid = jnp.asarray(GRID, x.dtype)
    best = grid[jnp.argmax(jax.vmap(damage)(grid))]
    return place(poisoned(name, x, honest, best))

  def reduce(x, weights, valid, state, rnd, shared):
    return target.reduce(poison(x, weights, valid, state, rnd, shared), weights, valid, state,
                         rnd, shared)

  return target._replace(reduce=reduce)


def validate(config) -> None:
  """attack.name / attack.num_sites / attack.scale (one-line ConfigErrors)."""
  a = config.attack
  if a.name not in ATTACKS:
    raise ConfigError("attack.name", f"unknown '{a.name}'; allowed: {', '.join(ATTACKS)}")
  if a.num_sites is None or a.num_sites < 0 or int(a.num_sites) != a.num_sites:
    raise ConfigError("attack.num_sites", f"must be an integer >= 0, got {a.num_sites}")
  if a.scale is not None and not a.scale > 0:
    raise ConfigError("attack.scale", f"must be > 0 (unset: the attack's default), got "
                      f"{a.scale}")
  if a.name == "none":
    if a.num_sites:
      raise ConfigError("attack.num_sites", f"{a.num_sites} Byzantine sites but attack.name="
                        "none; set attack.name or attack.num_sites=0")
    return
  if not 0 < a.num_sites < config.cohort_size:
    raise ConfigError("attack.num_sites", f"must be in 1 .. cohort_size - 1 = "
                      f"{config.cohort_size - 1} with attack.name={a.name}, got {a.num_sites}")
  if config.algorithm.name not in ("fedavg", "fedprox"):
    raise ConfigError("attack.name", "Byzantine sites are sites of FedAvg's round; use "
                      "algorithm.name fedavg or fedprox")
  if config.secagg.enabled:
    raise ConfigError("attack.name", "the lab's Byzantine sites write the stacked updates "
                      "that secure aggregation hides; set secagg.enabled=False")
  if config.dp.level == "site":
    raise ConfigError("attack.name", "a Byzantine site would skip site-level DP's clipping "
                      "and noise, which the accountant assumes every site applies; use "
                      "dp.level=none or example")
  if config.attack.record_sites:
    raise ConfigError("attack.record_sites", "recording recomputes honest updates; a "
                      "Byzantine site's is not one; leave it empty with attack.name")
  if config.data.name in _regression_sources() and flips_labels(a.name):
    raise ConfigError("attack.name", f"'{a.name}' flips class labels and data.name="
                      f"{config.data.name} is a regression task; use another attack")


def _regression_sources():
  return getattr(sources, "REGRESSION_SOURCES", ())
