"""The default config (every key a run may set) and its validation.

Configs in configs/ start from `default_config()` and override; `validate()` runs before
anything is loaded or compiled and raises `ConfigError` naming the key and the allowed values.

Importing this module imports no jax, so a program may build and check the keys of a config
before it sets its CPU devices up (fedjax_lab.setup_cpu_devices does nothing once jax is
imported). The checks that need a module importing jax (algorithms, models, optim, the
privacy mechanisms, ...) import it inside the function that checks: marked "jax-free parse".
"""

import ml_collections
from ml_collections import config_dict

from fedjax_lab.data import public, standardize
from fedjax_lab.data import sources
from fedjax_lab.data.partition import column_num_sites
from fedjax_lab.config_dp import validate_dp
from fedjax_lab.errors import ConfigError
from fedjax_lab.errors import one_of as _one_of
from fedjax_lab.errors import positive as _positive

BATCH_STATS = ("average", "local")
WEIGHTINGS = ("examples", "uniform")
# Sub-configs whose keys are free-form (validated by whoever reads them).
_FREE_FORM = ("client.optimizer_args", "server.optimizer_args", "attack.inversion")


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.rounds = 50
  c.cohort_size = 10              # sites per round; = data.num_sites for full participation
  c.data = sources.default_data_config()
  c.model = ml_collections.ConfigDict(dict(
      name="mlp", hidden=(128,), features=(32, 64), norm="none", dropout=0.0, image_shape=(),
      # l2: the objective of every algorithm is the mean loss + (l2 / 2) ||w||^2.
      l2=0.0,
      # loss (fedjax_lab/losses.py): cross_entropy (classification); mse or far (regression:
      # data.name=synthetic_regression). far: Function Aligned Regression, a batch loss;
      # far_alpha its DRO temperature, far_base its per-example term (mae | mse).
      loss="cross_entropy", far_alpha=1.0, far_base="mae"))
  c.client = ml_collections.ConfigDict(dict(
      optimizer="sgd", lr=0.1, local_steps=3, batch_size=5, shuffle=True, prox_mu=0.0,
      # local_epochs > 0: each site takes ceil(local_epochs * its size / batch_size) steps,
      # at most local_steps (per-site step counts, e.g. FedNova's tau_i); 0: local_steps each.
      local_epochs=0.0, optimizer_args=ml_collections.ConfigDict()))
  c.server = ml_collections.ConfigDict(dict(
      optimizer="sgd", lr=1.0, weighting="examples", optimizer_args=ml_collections.ConfigDict()))
  # Communication schedule of proxskip / randcom / dsgd (algorithms/schedules.py): which of
  # a round's client.local_steps steps communicate. Topology of randcom / dsgd
  # (algorithms/topology.py), with Metropolis-Hastings weights.
  c.algorithm = ml_collections.ConfigDict(dict(
      name="fedavg", batch_stats="average", comm_schedule="bernoulli", comm_prob=1.0,
      comm_every=1, topology="ring", erdos_renyi_p=0.3,
      # Parameters that stay at their site (personalisation): every parameter whose path
      # ('Dense_1/kernel', 'BatchNorm_0/scale') contains one of these strings. Each site
      # trains with its own copies, which never leave it; ("BatchNorm",) with
      # batch_stats="local" is FedBN as Li et al. 2021 define it; ("Dense_1",) on the mlp
      # keeps the output layer local (FedPer, Arivazhagan et al. 2019).
      local_params=()))
  # dp.level: "example" = DP-SGD at every site (unit: one example), "site" = DP-FedAvg (unit:
  # one site). noise_multiplier 0 with target_epsilon set: calibrate sigma for the planned
  # rounds; both set: target_epsilon is a budget and training stops before exceeding it.
  c.dp = ml_collections.ConfigDict(dict(
      level="none", noise="parallel", clip_norm=1.0, noise_multiplier=0.0,
      target_epsilon=config_dict.placeholder(float), delta=1e-5, accountant="rdp",
      clipping="auto", microbatch_size=0,
      # Adaptive clipping (dp.level="site" only; Andrew et al. 2021, privacy/adaptive_clipping.py):
      # clip_norm is C_0 and follows the target_quantile of the site update norms,
      # C <- C exp(-clip_lr (noised fraction of updates with norm <= C - target_quantile)).
      # count_noise_multiplier: std sigma_b of the noise on that count (unset: expected cohort
      # size / 20); the accountant's noise_multiplier z is split, the update getting
      # (z^-2 - (2 sigma_b)^-2)^-1/2 > z, so it needs 2 sigma_b > z.
      adaptive_clip=False, target_quantile=0.5, clip_lr=0.2,
      count_noise_multiplier=config_dict.placeholder(float),
      # randomness: where the DP mechanism's draws (cohorts, minibatches, noise) come from.
      # "secret": OS entropy, kept only in the checkpoint (resume stays exact); "seeded":
      # config.seed, reproducible but no guarantee against anyone who knows the seed
      # (summary.json publishes it); "auto": secret for data.name=file or tfds:*, seeded for
      # the bundled public data sets.
      randomness="auto",
      # mechanism (privacy/mechanism.py): gaussian (DP-SGD / DP-FedAvg), or matrix-factorization
      # noise correlated across rounds (DP-FTRL): tree, blt, banded, dense (site level: the
      # server's noise on the sum; example level: each site's DP-SGD noise, correlated over
      # all its local steps, its examples in fixed cyclic batches of batch_size).
      # participation: poisson (sampled cohorts, amplified accounting), cyclic (fixed groups
      # of cohort_size sites in turn: min-separated, unamplified); auto: poisson for gaussian,
      # cyclic otherwise. bands: banded's band count; max_buffers: the most BLT buffers tried.
      # groups (cyclic): 0 = num_sites / cohort_size, every site of the round's group trains;
      # more sites per group than cohort_size: each joins w.p. cohort_size / group size
      # (Poisson), which amplified banded MF accounts for when bands = groups.
      mechanism="gaussian", participation="auto", bands=16, max_buffers=10, groups=0))
  # optim.public_data: public calibration set of the curvature optimizers (data/public.py):
  # "holdout:F", a .npz/.csv/.h5ad path or another source's name; public_batch_size examples
  # of it per curvature estimate.
  c.optim = ml_collections.ConfigDict(dict(public_data=config_dict.placeholder(str),
                                           public_batch_size=64))
  # centralized_baseline: also train the same config on ONE site holding all the training
  # data (same rounds, local_steps x cohort_size steps a round) and report both accuracies.
  c.eval = ml_collections.ConfigDict(dict(every=1, batch_size=2048, centralized_baseline=False))
  # The end-of-run report (evaluation_robustness.py): bootstrap resamples of the test set for
  # the 95% intervals (0: none); robustness=True adds accuracy/AUC under Gaussian input noise
  # (levels x each feature's std) and masking (fractions of features set to 0), and, for the
  # classes in unknown_classes (held out of training), the AUROC of max-softmax rejection.
  c.eval.update(dict(bootstrap=1000, robustness=False, robustness_noise=(0.1, 0.3, 1.0),
                     robustness_mask=(0.1, 0.3, 0.5), unknown_classes=()))
  # summary.json's per-site metrics: every site up to this many, else a seeded sample of them.
  c.eval.site_metrics_max = 10_000
  # Secure aggregation (fedjax_lab/secagg, docs/secure_aggregation.md): the server learns only
  # the sum of the round's updates. neighbours: k sites each site masks with (SecAgg+; unset:
  # the whole cohort, Bonawitz et al.); threshold: Shamir t of k + 1 (unset: a majority);
  # bits: the modulus 2^bits of the masked sum; clip_range: every coordinate of the update a
  # site sends is clipped to [-clip_range, clip_range] (counted, logged); dropout_rate: the
  # simulated fraction of the cohort that drops out over a round (each site with this
  # probability, at one of the protocol's three stages). allow_aborts: train.py exits 1 when
  # more than half the rounds aborted (too few survivors), unless this is True.
  c.secagg = ml_collections.ConfigDict(dict(
      enabled=False, neighbours=config_dict.placeholder(int),
      threshold=config_dict.placeholder(int), bits=32, clip_range=1.0, dropout_rate=0.0,
      allow_aborts=False))
  c.checkpoint = ml_collections.ConfigDict(dict(every=10, keep=2))
  c.rounds_per_step = 1           # >1 fuses that many rounds into one lax.scan dispatch
  # Split a cohort over the devices only above this many each; below it a FedAvg round on a
  # CPU host runs on one device (sharding.round_devices), elsewhere replicated on all.
  c.min_sites_per_device = 16
  # Each device trains this many of its sites at a time (sharding.map_sum_sites); 0: all at once;
  # unset: 64 on CPU, 0 on GPU/TPU. Results do not depend on it beyond float rounding.
  c.sites_per_chunk = config_dict.placeholder(int)
  # allow_divergence: train on when the loss or parameters blow up (divergence.py)
  c.log = ml_collections.ConfigDict(dict(progress=True, tensorboard=True,
                                         allow_divergence=False))
  # Attack studies (fedjax_lab/attacks): keep the update each listed site sent in each listed
  # round (1-based; site -1: the whole cohort) in WORKDIR/attack/. Off by default: what it
  # stores is private data.
  # inversion: the gradient-inversion attack's settings (attacks/inversion.py DEFAULTS).
  # name / num_sites / scale: Byzantine sites (attacks/byzantine.py): the first num_sites
  # slots of every cohort send attack `name`'s poisoned update (scale: its parameter; unset:
  # the attack's default).
  c.attack = ml_collections.ConfigDict(dict(record_sites=(), record_rounds=(),
                                            inversion=ml_collections.ConfigDict(),
                                            name="none", num_sites=0,
                                            scale=config_dict.placeholder(float)))
  # Robust aggregation (fedjax_lab/robust.py, docs/robust_aggregation.md): robust replaces the
  # weighted mean (none: the sum, as ever); pre: pre-aggregation in front of it; f: the
  # Byzantine updates the rule tolerates; trim: trimmed_mean's cut per side (unset: f); tau:
  # centered_clipping's radius; iters: geometric_median's Weiszfeld steps (unset: 10) or
  # centered_clipping's (unset: 1); bucket_size: bucketing's s.
  c.aggregator = ml_collections.ConfigDict(dict(
      robust="none", pre="none", f=0, trim=config_dict.placeholder(int), tau=1.0,
      iters=config_dict.placeholder(int), bucket_size=2))
  # In-run canary audit (fedjax_lab/attacks/canaries.py, docs/audit.md; Andrew et al. 2024):
  # canaries > 0 adds that many canary sites, each sending clip_norm * its random unit
  # direction (drawn from canary_seed, public) in the rounds it takes part in; which ones are
  # in (probability 1/2) is drawn like the DP mechanism's randomness. 0: off, nothing changes.
  # break_noise_divisor: a DELIBERATE BUG for auditing the auditor: the released noise's
  # multiplier is divided by it while the accountant's claim stays; 1.0 in any real run.
  c.audit = ml_collections.ConfigDict(dict(canaries=0, canary_seed=0, break_noise_divisor=1.0))
  return c


def _flatten(cfg, prefix=""):
  out = {}
  for k, v in cfg.items():
    key = f"{prefix}{k}"
    if isinstance(v, ml_collections.ConfigDict) and key not in _FREE_FORM:
      out.update(_flatten(v, key + "."))
    else:
      out[key] = v
  return out


def unknown_key(key: str, config=None) -> ConfigError:
  """The error for a key `config` (default: default_config()) lacks, listing the keys
  allowed beside it."""
  known = _flatten(default_config() if config is None else config)
  parent = key.rsplit(".", 1)[0] if "." in key else ""
  prefix = parent + "." if parent else ""
  siblings = sorted({k[len(prefix):].split(".")[0] for k in known if k.startswith(prefix)})
  return ConfigError(key, f"unknown key; allowed{' under ' + parent if parent else ''}: "
                     f"{', '.join(siblings)}")


def validate(config) -> None:
  """Checks every key the core reads; data-dependent checks happen when data loads."""
  from fedjax_lab import algorithms, models, optim  # jax-free parse
  known = _flatten(default_config())
  for key in _flatten(config):
    if key not in known:
      raise unknown_key(key)
  if config.seed is None or config.seed < 0 or int(config.seed) != config.seed:
    raise ConfigError("seed", f"must be an integer >= 0, got {config.seed}")
  _positive("rounds", config.rounds, integer=True)
  _positive("cohort_size", config.cohort_size, integer=True)
  _positive("data.num_sites", config.data.num_sites, integer=True)
  if config.data.partition == "dirichlet":
    _positive("data.alpha", config.data.alpha)
  _one_of("model.name", config.model.name, models.MODEL_NAMES)
  _one_of("model.norm", config.model.norm, models.NORMS)
  _validate_task(config)
  for side in ("client", "server"):
    _one_of(f"{side}.optimizer", config[side].optimizer, optim.OPTIMIZERS)
    _positive(f"{side}.lr", config[side].lr)
  optim.check_server_optimizer(config.server.optimizer, config.optim.public_data)
  public.parse(config.optim.public_data, config.data)
  _positive("optim.public_batch_size", config.optim.public_batch_size, integer=True)
  _positive("client.local_steps", config.client.local_steps, integer=True)
  _positive("client.batch_size", config.client.batch_size, integer=True)
  multiple = optim.local_steps_multiple(config.client.optimizer,
                                        **config.client.optimizer_args.to_dict())
  if config.client.local_steps % multiple:
    raise ConfigError("client.local_steps", f"{config.client.local_steps} is not a multiple of "
                      f"{multiple}: one '{config.client.optimizer}' update is 1/{multiple} of a "
                      f"step, and the site would return mid-step parameters; use a multiple")
  if config.client.prox_mu < 0:
    raise ConfigError("client.prox_mu", f"must be >= 0, got {config.client.prox_mu}")
  _one_of("server.weighting", config.server.weighting, WEIGHTINGS)
  _one_of("algorithm.name", config.algorithm.name, algorithms.ALGORITHMS)
  _one_of("algorithm.batch_stats", config.algorithm.batch_stats, BATCH_STATS)
  _validate_algorithm(config)
  if config.data.partition != "by_column":  # else once the column gives num_sites (partition.py)
    check_sites(config)
  _positive("eval.every", config.eval.every, integer=True)
  _positive("eval.site_metrics_max", config.eval.site_metrics_max, integer=True)
  # eval.bootstrap / robustness* / unknown_classes
  from fedjax_lab import evaluation_robustness  # jax-free parse
  evaluation_robustness.check_config(config)
  _positive("checkpoint.every", config.checkpoint.every, integer=True)
  _positive("rounds_per_step", config.rounds_per_step, integer=True)
  if config.rounds % config.rounds_per_step:
    raise ConfigError("rounds_per_step", f"{config.rounds_per_step} must divide "
                      f"rounds={config.rounds}")
  _positive("min_sites_per_device", config.min_sites_per_device, integer=True)
  if config.sites_per_chunk is not None and config.sites_per_chunk < 0:
    raise ConfigError("sites_per_chunk", f"must be >= 0 (0: all sites at once; unset: 64 on "
                      f"CPU, 0 on GPU/TPU), got {config.sites_per_chunk}")
  validate_dp(config)
  _validate_secagg(config)
  for key in ("record_sites", "record_rounds"):
    if not all(isinstance(v, int) for v in config.attack[key]):
      raise ConfigError(f"attack.{key}", f"must be integers, e.g. --config.attack.{key}=3,7 "
                        f"(got {tuple(config.attack[key])})")
  if config.attack.record_sites and (config.rounds_per_step != 1
                                     or config.algorithm.name not in ("fedavg", "fedprox")):
    raise ConfigError("attack.record_sites", "recording needs algorithm.name fedavg or fedprox "
                      "and rounds_per_step=1")
  if config.attack.record_sites and config.secagg.enabled:
    raise ConfigError("attack.record_sites", "with secagg.enabled the server receives masked "
                      "vectors and learns only their sum: there is no site update to record; "
                      "study attacks with secagg.enabled=False")
  from fedjax_lab import robust  # jax-free parse
  from fedjax_lab.attacks import byzantine  # jax-free parse
  robust.validate(config)
  byzantine.validate(config)
  standardize.resolve(config)  # data.standardize against dp.level and optim.public_data
  from fedjax_lab.attacks import canaries  # jax-free parse
  canaries.validate(config)


def secagg_max_cohort(config) -> int:
  """The most sites a round's secure sum can hold: cohort_size, or under site-level DP the
  slots of the Poisson cohort (privacy/sampling.py), known once the privacy plan is made;
  config validation checks cohort_size and the plan checks the slots (privacy/plan.py)."""
  return config.cohort_size


def _validate_secagg(config):
  """Settings that cannot work with secure aggregation, each with the reason."""
  from fedjax_lab import algorithms  # jax-free parse
  s = config.secagg
  if not s.enabled:
    return
  name = config.algorithm.name
  if not getattr(algorithms.module(name), "SECURE_AGGREGATION", False):
    allowed = [a for a in algorithms.ALGORITHMS
               if getattr(algorithms.module(a), "SECURE_AGGREGATION", False)]
    raise ConfigError("secagg.enabled", f"algorithm '{name}' sends more than one summed update "
                      f"(control variates, gossip or per-step messages), which the secure sum "
                      f"does not carry yet; allowed: {', '.join(allowed)}")
  if config.rounds_per_step != 1:
    raise ConfigError("rounds_per_step", "secure aggregation runs host cryptography between "
                      "the sites and the server in every round; use rounds_per_step=1")
  dp = config.dp
  if dp.adaptive_clip:
    raise ConfigError("dp.adaptive_clip", "adaptive clipping's per-site count bits would reach "
                      "the server outside the secure sum; use a fixed dp.clip_norm with "
                      "secagg.enabled")
  if dp.level == "site" and s.dropout_rate > 0:
    raise ConfigError("secagg.dropout_rate", "with site-level DP a site's presence changes "
                      "whether the round aborts (fewer than secagg.threshold survivors) and so "
                      "whether the OTHER sites' updates are released, which the accountant does "
                      "not model; use 0 (dropouts are simulated without DP or with "
                      "dp.level=example)")
  if dp.level == "site" and s.threshold is not None:
    raise ConfigError("secagg.threshold", "a Poisson cohort (site-level DP) can be smaller than "
                      "a fixed threshold, and aborting then would depend on who took part; "
                      "leave it unset (a majority of each round's cohort)")
  if dp.level == "site" and dp.noise != "coordinated":
    raise ConfigError("dp.noise", "with site-level DP and secure aggregation the grid lets the "
                      "private cohort size move the sum, which privacy/secagg_delta.py bounds "
                      "only when the sum's noise does not grow with the cohort; use "
                      "dp.noise=coordinated")
  from fedjax_lab.privacy.secagg_delta import check_secagg  # jax-free parse
  check_secagg(config, secagg_max_cohort(config))


def _validate_local_params(config):
  from fedjax_lab import algorithms  # jax-free parse
  local = config.algorithm.local_params
  if not local:
    return
  if not all(isinstance(p, str) and p for p in local):
    raise ConfigError("algorithm.local_params", f"must be non-empty strings (parts of parameter "
                      f"paths such as 'Dense_1'), got {tuple(local)}")
  name = config.algorithm.name
  if not getattr(algorithms.module(name), "LOCAL_PARAMS", False):
    raise ConfigError("algorithm.local_params", f"algorithm '{name}' keeps no per-site "
                      "parameters; allowed with: fedavg, fedprox")
  if config.dp.level != "none":
    raise ConfigError("algorithm.local_params", "per-site parameters are trained without "
                      "clipping or noise at site level, and the lab reports each site's model's "
                      "accuracy, which no epsilon covers; use dp.level=none")
  if config.attack.record_sites:
    raise ConfigError("attack.record_sites", "recording replays the global model at a site; "
                      "with algorithm.local_params the site trains its own copy")


def _validate_algorithm(config):
  """The algorithm's own keys and constraints: its module's validate (algorithms/*.py)."""
  from fedjax_lab import algorithms  # jax-free parse
  if config.model.l2 < 0:
    raise ConfigError("model.l2", f"must be >= 0, got {config.model.l2}")
  if config.client.local_epochs < 0:
    raise ConfigError("client.local_epochs", f"must be >= 0 (0: client.local_steps at every "
                      f"site), got {config.client.local_epochs}")
  algorithms.validate(config)
  _validate_local_params(config)


def check_sites(config):
  """The checks that need data.num_sites; with data.partition=by_column they run once the
  column has set it (resolve_num_sites)."""
  from fedjax_lab import algorithms  # jax-free parse
  n, name = config.data.num_sites, config.algorithm.name
  origin = (f" (data.partition=by_column: data.column '{config.data.column}' has {n} distinct "
            "values)" if config.data.partition == "by_column" else "")
  if config.cohort_size > n:
    raise ConfigError("cohort_size", f"{config.cohort_size} > data.num_sites={n}{origin}; use "
                      f"at most {n}")
  if algorithms.every_site(name) and config.cohort_size != n:
    raise ConfigError("cohort_size", f"algorithm '{name}' uses every site at every step; set "
                      f"cohort_size = data.num_sites = {n}{origin}")
  check = getattr(algorithms.module(name), "check_sites", None)
  if check is not None:
    check(config)


def _validate_task(config):
  """model.loss against the task of data.name (classification, or regression for
  data/sources.REGRESSION_SOURCES) and the keys a regression task cannot use."""
  from fedjax_lab import losses  # jax-free parse
  task = sources.task_of(config.data.name)
  losses.check(config.model.loss, task, config.model.far_alpha, config.model.far_base)
  if config.model.loss == "far" and config.dp.level == "example":
    raise ConfigError("model.loss", "'far' is a batch loss (its terms compare the examples of a "
                      "batch with each other), so one example's gradient is not defined and "
                      "DP-SGD's per-example clipping does not bound its influence; use "
                      "model.loss=mse with dp.level=example, or far with dp.level=site (the "
                      "whole site update is clipped)")
  if task != "regression":
    return
  where = f"data.name={config.data.name} is a regression task"
  if config.data.partition in ("dirichlet", "shards"):
    raise ConfigError("data.partition", f"'{config.data.partition}' splits by class label and "
                      f"{where}; allowed: iid, quantity_skew, by_column")
  for key, value, off in (("optim.public_data", config.optim.public_data, "empty"),
                          ("eval.centralized_baseline", config.eval.centralized_baseline, "False"),
                          ("eval.robustness", config.eval.robustness, "False"),
                          ("attack.record_sites", tuple(config.attack.record_sites), "()")):
    if value:
      raise ConfigError(key, f"implemented for classification only and {where}; set it {off}")


def resolve_num_sites(train, config) -> str | None:
  """data.partition=by_column: sets config.data.num_sites to the column's number of distinct
  values, then runs the checks that need it (cohort_size <= num_sites, ...:
  config.check_sites). Returns the line for the start log when that changed num_sites, else
  None. Other partitions: nothing to do."""
  data = config.data
  if data.partition != "by_column":
    return None
  num_sites, note = column_num_sites(train, data.column), None
  if num_sites != data.num_sites:
    note = (f"data.num_sites={data.num_sites} replaced by {num_sites}: data.partition="
            f"by_column makes one site per distinct value of data.column='{data.column}'")
    data.num_sites = num_sites
  check_sites(config)
  return note
