"""The checks of the dp.* keys (config.validate calls validate_dp): levels, noise, the
accountant, adaptive clipping and the matrix-factorization mechanisms' participation rules.
Like config.py it imports no jax: the checks that need a privacy module import it inside
(marked "jax-free parse")."""

from fedjax_lab.errors import ConfigError
from fedjax_lab.errors import one_of as _one_of
from fedjax_lab.errors import positive as _positive

DP_LEVELS = ("none", "example", "site")
DP_NOISE = ("parallel", "coordinated")
ACCOUNTANTS = ("rdp", "pld")


def _validate_mechanism(config):
  """dp.mechanism / dp.participation: what the matrix-factorization accounting assumes."""
  from fedjax_lab.privacy import mechanism  # jax-free parse
  dp = config.dp
  _one_of("dp.mechanism", dp.mechanism, mechanism.MECHANISMS)
  _one_of("dp.participation", dp.participation, mechanism.PARTICIPATION)
  _positive("dp.bands", dp.bands, integer=True)
  _positive("dp.max_buffers", dp.max_buffers, integer=True)
  cyclic = mechanism.participation(config) == "cyclic"
  if dp.level == "none" or not (cyclic or dp.mechanism != "gaussian"):
    return
  if not cyclic:
    raise ConfigError("dp.participation", f"poisson with dp.mechanism={dp.mechanism}: its "
                      "accounting needs min-separated participation; use cyclic (or auto)")
  if config.algorithm.name not in ("fedavg", "fedprox"):
    raise ConfigError("algorithm.name", f"'{config.algorithm.name}' with dp.participation="
                      "cyclic: the correlated noise lives in FedAvg's round (its aggregator "
                      "chain, or each site's state at example level); use fedavg or fedprox")
  if dp.level == "example":
    _validate_example_mechanism(config)
    return
  if dp.groups < 0 or int(dp.groups) != dp.groups:
    raise ConfigError("dp.groups", f"must be an integer >= 0 (0: num_sites / cohort_size), got "
                      f"{dp.groups}")
  if not dp.groups and config.data.num_sites % config.cohort_size:
    raise ConfigError("cohort_size", f"{config.cohort_size} does not divide data.num_sites="
                      f"{config.data.num_sites}: cyclic cohorts split the sites into equal "
                      "groups; pick a divisor (or set dp.groups)")
  if dp.groups and (config.data.num_sites % dp.groups
                    or config.data.num_sites // dp.groups < config.cohort_size):
    raise ConfigError("dp.groups", f"{dp.groups} must divide data.num_sites="
                      f"{config.data.num_sites} into groups of at least cohort_size="
                      f"{config.cohort_size} sites")
  if config.secagg.enabled:
    raise ConfigError("secagg.enabled", "the correlated noise is added by the server to the "
                      "sum; secure aggregation with it is not implemented; set it False")
  if dp.adaptive_clip:
    raise ConfigError("dp.adaptive_clip", "adaptive clipping's count noise is Poisson-cohort "
                      "DP-FedAvg's; set it False with dp.participation=cyclic")
  _check_dense(dp, config.rounds, f"rounds={config.rounds}")
  if dp.mechanism == "banded" and dp.bands > config.rounds:
    raise ConfigError("dp.bands", f"{dp.bands} > rounds={config.rounds}; use fewer bands")


def _check_dense(dp, horizon: int, what: str) -> None:
  if dp.mechanism == "dense" and horizon > 512:
    raise ConfigError("dp.mechanism", f"dense keeps every past draw and optimizes an n x n "
                      f"matrix: {what} > 512; use blt or banded")


def _validate_example_mechanism(config):
  """Example-level DP-SGD with matrix-factorization noise over each site's local steps:
  every site keeps its own noise state for T = rounds x local_steps steps (its horizon)."""
  dp = config.dp
  steps = config.rounds * config.client.local_steps
  if config.client.local_epochs:
    raise ConfigError("client.local_epochs", "with example-level dp.participation=cyclic every "
                      "site takes client.local_steps steps a round (the noise horizon is "
                      "rounds x local_steps); set it 0")
  if dp.noise != "parallel":
    raise ConfigError("dp.noise", "example-level matrix-factorization noise is added in full by "
                      "each site; use dp.noise=parallel")
  if config.secagg.enabled:
    raise ConfigError("secagg.enabled", "example-level matrix-factorization noise with secure "
                      "aggregation is not implemented; set it False")
  if dp.groups:
    raise ConfigError("dp.groups", "is for site-level cyclic cohorts; at example level each "
                      "site's batches cycle (k = site size // client.batch_size); set it 0")
  _check_dense(dp, steps, f"rounds x client.local_steps = {steps}")
  if dp.mechanism == "banded" and dp.bands > steps:
    raise ConfigError("dp.bands", f"{dp.bands} > rounds x client.local_steps = {steps}; use "
                      "fewer bands")


def validate_dp(config):
  """Every dp.* key, and what the other keys must be for the level and mechanism chosen."""
  dp = config.dp
  _one_of("dp.level", dp.level, DP_LEVELS)
  _one_of("dp.noise", dp.noise, DP_NOISE)
  _one_of("dp.accountant", dp.accountant, ACCOUNTANTS)
  if not 0 < dp.delta < 1:
    raise ConfigError("dp.delta", f"must be in (0, 1), got {dp.delta}")
  if dp.noise_multiplier < 0:
    raise ConfigError("dp.noise_multiplier", f"must be >= 0, got {dp.noise_multiplier}")
  if dp.clip_norm <= 0:
    raise ConfigError("dp.clip_norm", f"must be > 0, got {dp.clip_norm}")
  if dp.target_epsilon is not None and dp.target_epsilon <= 0:
    raise ConfigError("dp.target_epsilon", f"must be > 0 (or unset), got {dp.target_epsilon}")
  _one_of("dp.clipping", dp.clipping, ("auto", "vmap", "ghost"))
  _one_of("dp.randomness", dp.randomness, ("auto", "secret", "seeded"))
  _validate_adaptive_clip(config)
  _validate_mechanism(config)
  if dp.level == "none":
    return
  from fedjax_lab import optim  # jax-free parse
  if config.eval.centralized_baseline:
    raise ConfigError("eval.centralized_baseline", "trains a second model on the same private "
                      "data and publishes its accuracy, which no epsilon covers; set it False "
                      f"with dp.level={dp.level}")
  if dp.noise_multiplier == 0 and dp.target_epsilon is None:
    raise ConfigError("dp.noise_multiplier", f"must be > 0 with dp.level={dp.level}, or set "
                      "dp.target_epsilon to calibrate it")
  if config.model.norm == "batch":
    raise ConfigError("model.norm", "BatchNorm mixes examples (and its statistics are not "
                      "privatized); use group or none with dp.level != none")
  # Curvature under DP: example level needs optim.public_data, site level covers the client's
  # curvature (the rule and its reason: optim.check_dp_compatible); the server's needs public
  # data at every level (checked in validate).
  optim.check_dp_compatible(config.client.optimizer, dp.level, config.optim.public_data,
                            key="client.optimizer")
  if dp.noise == "coordinated" and dp.level == "example":
    # Only then is each site's update linear in its noise, so the K shares of sigma/sqrt(K)
    # add up to central DP-SGD's noise on the (uniform) sum the server sees.
    if config.client.local_steps != 1 or config.client.optimizer != "sgd":
      raise ConfigError("dp.noise", "coordinated example-level noise needs "
                        "client.local_steps=1 and client.optimizer=sgd (one DP-SGD step a round)")
    if config.server.weighting != "uniform":
      raise ConfigError("server.weighting", "coordinated noise needs 'uniform' (the secure sum "
                        "is unweighted; example weights would change the sensitivity)")


def _validate_adaptive_clip(config):
  dp = config.dp
  if not 0 < dp.target_quantile < 1:
    raise ConfigError("dp.target_quantile", f"must be in (0, 1), got {dp.target_quantile}")
  _positive("dp.clip_lr", dp.clip_lr)
  if dp.count_noise_multiplier is not None and not dp.count_noise_multiplier > 0:
    raise ConfigError("dp.count_noise_multiplier", f"must be > 0 (or unset for cohort_size / "
                      f"20), got {dp.count_noise_multiplier}")
  if not dp.adaptive_clip:
    return
  if dp.level != "site":
    raise ConfigError("dp.adaptive_clip", f"adaptive clipping is implemented for site-level "
                      f"DP-FedAvg only, got dp.level={dp.level}; allowed with it: site")
  if dp.noise_multiplier > 0:  # a calibrated one is checked by privacy.plan.privacy_plan
    from fedjax_lab.privacy.adaptive_clipping import adaptive_clip_noise  # jax-free parse
    adaptive_clip_noise(config, dp.noise_multiplier)
