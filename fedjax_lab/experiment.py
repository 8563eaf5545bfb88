"""Builds everything one config describes: data, holdout, partition, the privacy plan
(privacy/plan.py), mesh, model, optimizers and the algorithm's round, jitted.

    exp = Experiment(config)          # validates, loads data, partitions, builds the round
    summary = exp.run(workdir)        # run_loop.py: metrics.jsonl, summary.json, checkpoints

Every random choice comes from one root key, split by purpose and folded in with the round
and site index (docs/design.md), so a resumed run ends with the same parameters.
"""

import logging
import os

import jax
from jax.experimental import multihost_utils
import numpy as np

from fedjax_lab import config as config_lib
from fedjax_lab import secagg
from fedjax_lab import algorithms, evaluation, evaluation_robustness, losses, optim, run_loop
from fedjax_lab import keys as lab_keys
from fedjax_lab import sharding
from fedjax_lab.algorithms import round as lab_round
from fedjax_lab.attacks import canaries
from fedjax_lab.client import (ClientConfig, ExampleDP, make_client_update,
                               make_public_objective)
from fedjax_lab.data import federated, partition, public, sources, standardize
from fedjax_lab.errors import ConfigError, config_keys
from fedjax_lab.models import make_model
from fedjax_lab.privacy import clipping, mechanism, randomness, secagg_delta
from fedjax_lab.privacy.plan import PrivacyPlan
# Re-exported: run_loop and the tests use them; they live apart so run_loop needs nothing here.
from fedjax_lab.state import params_sha256, place_state  # noqa: F401


log = logging.getLogger("fedjax_lab")

# Purposes folded into the root key; fixed numbers so adding a purpose never shifts the others.
_INIT, _SAMPLING, _CLIENT, _NOISE = 0, 1, 2, 3


def tree_bytes(tree) -> int:
  return sum(int(np.prod(l.shape)) * 4 for l in jax.tree.leaves(tree))  # sent as float32


def summed_coordinates(model, x) -> int:
  """The length of a site's row in the secure sum: the model's parameters and state (shapes
  only, so any key)."""
  params, model_state = jax.eval_shape(model.init, jax.random.key(0), x)
  return sum(int(np.prod(l.shape)) for l in jax.tree.leaves((params, model_state)))


def _round_devices(config, privacy: PrivacyPlan | None) -> list:
  """Every device, or one CPU device for a round too small to split (see
  sharding.round_devices); algorithms with per-site state always shard it."""
  if algorithms.per_site_state(config.algorithm.name):
    return jax.devices()
  per_round = privacy.slots if config.dp.level == "site" else config.cohort_size
  return sharding.round_devices(per_round, config.min_sites_per_device)


def centralized_config(config):
  """The config with the federation removed: one site holds all the training examples."""
  c = config.copy_and_resolve_references()
  c.client.local_steps = config.client.local_steps * config.cohort_size
  c.data.num_sites, c.cohort_size, c.data.partition = 1, 1, "iid"
  c.eval.centralized_baseline = False
  return c


def _flat_params(params) -> dict:
  return {lab_round.param_path(p): leaf
          for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def state_local(state) -> dict:
  """The parameters the sites keep ({path: [sites, ...]}), or {} (algorithms without them)."""
  return getattr(state, "site_params", None) or {}


def draw_secret() -> list[int]:
  """256 bits of OS entropy (8 uint32 words: a ChaCha20 key, privacy/randomness.py), the same
  on every process of a run."""
  words = np.frombuffer(os.urandom(4 * randomness.SECRET_WORDS), np.uint32).copy()
  if jax.process_count() > 1:
    words = np.asarray(multihost_utils.broadcast_one_to_all(words))
  return [int(w) for w in words]


def _check_shared_examples(config, num_examples: int) -> None:
  """data.partition=pool beyond num_sites * m > N: sites share examples, which example-level
  DP (its unit is one example at one site) and per-site standardisation do not allow."""
  d = config.data
  if d.partition != "pool" or d.num_sites * d.examples_per_site <= num_examples:
    return
  shared = (f"data.partition=pool with data.num_sites={d.num_sites} x data.examples_per_site="
            f"{d.examples_per_site} > {num_examples} training examples: sites share examples")
  if config.dp.level == "example":
    raise ConfigError("dp.level", f"{shared}, and an example held by many sites is not covered "
                      "by one site's example-level epsilon; use dp.level=site or none")
  if d.standardize == "per_site":
    raise ConfigError("data.standardize", f"{shared}, whose per-site statistics would "
                      "overwrite each other; use global or none")


# Per-site state (SCAFFOLD's controls, kept parameters, FedBN statistics) lives on every
# device for the whole run; past this it is refused before it is allocated.
PER_SITE_STATE_LIMIT = 16 * 2**30


def _check_per_site_state(config, state_shapes, num_sites: int) -> None:
  per_site = sum(l.size * l.dtype.itemsize for l in jax.tree.leaves(state_shapes)
                 if l.ndim and l.shape[0] == num_sites) if num_sites > 1 else 0
  if per_site > PER_SITE_STATE_LIMIT:
    raise ConfigError("data.num_sites", f"algorithm.name={config.algorithm.name} keeps state "
                      f"for each of {num_sites:,} sites: {per_site / 2**30:.1f} GiB on every "
                      "device, beyond the lab's 16 GiB limit (it is not moved off the device "
                      "between rounds); use fewer sites, or fedavg without local state")


class Experiment:
  """Everything one config describes, built once; `run` trains and writes the workdir."""

  def __init__(self, config, mesh=None):
    config_lib.validate(config)
    self.config = config
    train, test = sources.load_dataset(config.data)
    # eval.unknown_classes: held out of training and test; standardised with the test split.
    train, test, unknown = evaluation_robustness.hold_out_classes(config, train, test)
    # holdout:F takes the public calibration set out of `train` before it is partitioned.
    train, self.public = public.load(config.optim.public_data, config.data, train)
    sites_note = config_lib.resolve_num_sites(train, config)  # by_column: the column's count
    if config.data.num_sites > len(train.y) and config.data.partition != "pool":
      raise ConfigError("data.num_sites", f"{config.data.num_sites} sites > {len(train.y)} "
                        "training examples; use fewer sites, or data.partition=pool")
    self.sites = partition.partition(train, config.data, config.seed)
    _check_shared_examples(config, len(train.y))
    # data.standardize: fitted on training data only (or per site, or public); one log line.
    train, test, self.public, note = standardize.apply(
        config, train, evaluation_robustness.join(test, unknown), self.sites, self.public)
    test, self.unknown = evaluation_robustness.split(test, unknown)
    self.data_notes = [n for n in (sites_note, note) if n]  # run() logs them at start
    self.train, self.test = train, test
    self.data = federated.from_partition(
        train.x, train.y, self.sites, train.num_classes,
        *((self.public.x, self.public.y) if self.public is not None else ()))
    # data.name decides the task; model.loss (losses.py) is checked against it by validate.
    self.task, self.loss = sources.task_of(config.data.name), losses.from_config(config.model)
    self.site_hist = (federated.site_label_histogram(self.data)
                      if self.task == "classification" else None)
    with config_keys("model"):
      self.model = make_model(config.model, train.num_classes, train.x[:2])
    # The secure sum's row length: at site level its grid enters the accountant's sigma.
    self.summed_coordinates = summed_coordinates(self.model, train.x[:2])
    self.privacy = mechanism.make_mechanism(config, np.asarray(self.data.count),
                                            self.summed_coordinates)
    self.mesh = mesh if mesh is not None else sharding.make_mesh(
        _round_devices(config, self.privacy))
    self.data = sharding.put_replicated(self.data, self.mesh)
    # Under dp.randomness=secret a fresh secret per run (run() keeps the checkpoint's on resume).
    secret = self.privacy is not None and self.privacy.randomness == "secret"
    self.set_secret(draw_secret() if secret else None)
    # The objective's (l2/2)||w||^2 is in the client's gradient (client.make_site_gradient).
    with config_keys("client"):
      self.client_tx = optim.make_optimizer(config.client.optimizer, config.client.lr,
                                            **config.client.optimizer_args)
    with config_keys("server"):
      self.server_tx = optim.make_optimizer(config.server.optimizer, config.server.lr,
                                            **config.server.optimizer_args)
    self.example_dp = example_dp = self._example_dp()
    if example_dp is not None:
      mechanism.check_noise_coverage(self.privacy, config, np.asarray(self.data.count),
                                     example_dp)
    client_config = ClientConfig(
        local_steps=config.client.local_steps, batch_size=config.client.batch_size,
        shuffle=config.client.shuffle, prox_mu=0.0,
        public_batch_size=config.optim.public_batch_size)

    def client_update_with(correction=None, local_epochs=config.client.local_epochs):
      return make_client_update(self.model, self.client_tx, client_config, dp=example_dp,
                                correction=correction, l2=config.model.l2,
                                local_epochs=local_epochs, loss=self.loss)

    self.client_update = client_update_with()
    self.fedbn = config.algorithm.batch_stats == "local"
    self.canaries = canaries.make(config, self.privacy, self.data.num_sites, jax.eval_shape(
        self.model.init, self.keys["init"], self.train.x[:2])[0])
    if self.canaries is not None:  # an input of the jitted round (data/federated.py)
      self.data = self.data.replace(canary_directions=sharding.put_replicated(
          self.canaries.directions, self.mesh))
    if config.audit.break_noise_divisor != 1.0:
      log.warning("audit.break_noise_divisor=%g: a DELIBERATELY BROKEN run (the noise is "
                  "divided by it, the claimed epsilon is not): it only audits the auditor",
                  config.audit.break_noise_divisor)
    self.algorithm = algorithms.make_algorithm(algorithms.AlgorithmContext(
        config=config, model=self.model, client_update=self.client_update,
        client_tx=self.client_tx, server_tx=self.server_tx, num_sites=self.data.num_sites,
        mesh=self.mesh, site_dp=self._site_dp(),
        server_objective=(make_public_objective(self.model, config.optim.public_batch_size,
                                                self.loss)
                          if config.server.optimizer in optim.CURVATURE_OPTIMIZERS else None),
        sites_per_chunk=(sharding.default_sites_per_chunk() if config.sites_per_chunk is None
                         else config.sites_per_chunk),
        example_dp=example_dp, make_client_update=client_update_with, loss=self.loss,
        secure_sum=self._secure_sum(),
        like=jax.eval_shape(self.model.init, self.keys["init"], self.train.x[:2])[0],
        canaries=self.canaries))
    self.round_fn = self.algorithm.round
    self.rounds_per_step = config.rounds_per_step
    step = (self.round_fn if self.rounds_per_step == 1
            else algorithms.fuse_rounds(self.round_fn, self.rounds_per_step))
    # A round with a host step (secure aggregation) jits its own halves.
    self.step = (jax.jit(step, donate_argnums=0) if getattr(step, "jittable", True)
                 else step)
    class_eval = (evaluation.make_class_evaluator(
        self.model, test.x, test.y, train.num_classes, config.eval.batch_size)
        if self.task == "classification" else evaluation.make_regression_evaluator(
            self.model, test.x, test.y, config.eval.batch_size))
    self.evaluate_global = jax.jit(class_eval)
    # Gathered whole: the host reads every site's counts (on every process of a multi-host run).
    self.evaluate_sites = jax.jit(jax.vmap(class_eval, in_axes=(None, 0)),
                                  out_shardings=sharding.replicated(self.mesh))
    # Each site's own model: the global parameters with its kept ones (algorithm.local_params).
    self.evaluate_personal = jax.jit(
        jax.vmap(lambda p, local, ms: class_eval(lab_round.merge_local(p, local), ms),
                 in_axes=(None, 0, 0 if self.fedbn else None)),
        out_shardings=sharding.replicated(self.mesh))
    _check_per_site_state(config, jax.eval_shape(
        lambda: self.algorithm.init(*self.model.init(self.keys["init"], self.train.x[:2]))),
        self.data.num_sites)
    state = self.init_state()
    self._check_local_params(state.params)
    # One message: the model (without the parameters sites keep), plus the BatchNorm
    # statistics when they are averaged.
    self.message_bytes = tree_bytes(({k: v for k, v in _flat_params(state.params).items()
                                      if k not in state_local(state)},
                                     {} if self.fedbn else state.model_state))

  def _example_dp(self):
    if self.privacy is None or self.config.dp.level != "example":
      return None
    dp, cfg = self.config.dp, self.config
    noise = mechanism.example_noise(self.privacy, cfg)
    # Decided from shapes now, so that dp.clipping=ghost on a model it cannot handle is a
    # config error rather than a failure inside the first round's trace.
    params, model_state = jax.eval_shape(self.model.init, self.keys["init"], self.train.x[:2])
    try:
      path = clipping.choose_method(self.model.module, params, self.train.x[:2],
                                    method=dp.clipping, model_state=model_state or None,
                                    apply_kwargs={"train": False})
    except ValueError as e:
      problem = str(e).split(" Use method=")[0]
      raise ConfigError("dp.clipping", f"{problem} (model.name={cfg.model.name}, model.norm="
                        f"{cfg.model.norm}); use dp.clipping=auto or vmap") from None
    log.info("per-example clipping: %s path (dp.clipping=%s)", path, dp.clipping)
    # The per-example form of model.loss (losses.py); FAR has none and validate refuses it here.
    clipped = clipping.make_clipped_grad_sum(
        self.model.module, self.loss.example, method=dp.clipping,
        microbatch_size=dp.microbatch_size or None, apply_kwargs={"train": False},
        return_losses=True)
    return ExampleDP(clip_norm=dp.clip_norm, noise_multiplier=noise.noise_multiplier,
                     max_batch=noise.max_batch, clipped_grad_sum=clipped,
                     fixed_divisor=noise.fixed_divisor, correlated=noise.correlated)

  def _secure_sum(self):
    """secagg.round.SecureSum for secagg.enabled (checked against this run's largest cohort
    and, under DP, against the quantization's delta share: privacy/secagg_delta.py), else
    None. Under site-level DP the grid is fixed by the slots, a public quantity, so nothing
    the protocol does reveals the realised cohort's size through its shapes or levels."""
    cfg = self.config
    if not cfg.secagg.enabled:
      return None
    site_level = self.privacy is not None and cfg.dp.level == "site"
    max_cohort = mechanism.secure_sum_cohort(self.privacy, cfg)
    s = cfg.secagg
    sa = secagg.SecAggConfig(neighbours=s.neighbours, threshold=s.threshold, bits=s.bits,
                             clip_range=s.clip_range, dropout_rate=s.dropout_rate)
    d = self.summed_coordinates
    if self.privacy is not None:
      terms = secagg_delta.gate(cfg, self.privacy, d, np.asarray(self.data.count))
      self.privacy = self.privacy._replace(secagg_tv=terms.eta)
    # What one site that stays sends in a round (its masked vector, shares, unmasking), at the
    # configured cohort: under site DP the realised one is private, as for bytes_communicated.
    self.secagg_bytes_per_site = secagg.bytes_per_site(
        d, s.bits, secagg.resolve_neighbours(cfg.cohort_size, s.neighbours))["sent_total"]
    return secagg.SecureSum(sa, slots=max_cohort if site_level else None)

  def set_secret(self, secret: list[int] | None) -> None:
    """The per-purpose keys: from config.seed, except that with a secret (dp.randomness=secret)
    every draw of the DP mechanism (cohorts, minibatches, noise) comes from the secret; the
    model's initialisation stays seeded (it depends on no private data). The secret's keys
    are ChaCha20 (privacy/randomness.py): a threefry key anywhere below it would cut the
    search for the noise to 2^64."""
    self.secret = secret
    root = jax.random.key(self.config.seed)
    self.keys = lab_keys.purpose_keys(
        root, (("init", _INIT), ("sampling", _SAMPLING), ("client", _CLIENT), ("noise", _NOISE)))
    if secret is not None:
      secret_root = randomness.secret_key(secret)
      self.keys.update(lab_keys.purpose_keys(
          secret_root, (("sampling", _SAMPLING), ("client", _CLIENT), ("noise", _NOISE))))

  def _site_dp(self):
    if self.privacy is None or self.config.dp.level != "site":
      return None
    cfg = self.config
    noise = mechanism.site_noise(self.privacy, cfg)
    adaptive = None
    if cfg.dp.adaptive_clip:
      adaptive = lab_round.AdaptiveClip(target_quantile=cfg.dp.target_quantile,
                                        clip_lr=cfg.dp.clip_lr, count_stddev=noise.count_stddev)
    return lab_round.SiteDP(clip_norm=cfg.dp.clip_norm,
                            noise_multiplier=noise.noise_multiplier,
                            coordinated=noise.coordinated, max_cohort=noise.max_cohort,
                            adaptive=adaptive, grid=noise.grid, cohort_groups=noise.cohort_groups,
                            group_rate=noise.group_rate,
                            correlated=self.privacy.noise,
                            like=(None if self.privacy.mf is None else jax.eval_shape(
                                self.model.init, self.keys["init"], self.train.x[:2])[0]))

  def epsilon(self, rounds: int) -> float | None:
    if self.privacy is None:
      return None
    return self.privacy.accountant.epsilon_after(rounds * self.privacy.steps_per_round)

  def init_state(self):
    params, model_state = self.model.init(self.keys["init"], self.train.x[:2])
    return place_state(self.algorithm.init(params, model_state), self.mesh)

  def _check_local_params(self, params) -> None:
    patterns = tuple(self.config.algorithm.local_params)
    paths = list(_flat_params(params))
    for pattern in patterns:
      if not any(pattern in p for p in paths):
        raise ConfigError("algorithm.local_params", f"'{pattern}' matches no parameter of "
                          f"model.name={self.config.model.name}; its parameters: "
                          f"{', '.join(paths)}")
    if patterns and len(lab_round.local_param_paths(params, patterns)) == len(paths):
      raise ConfigError("algorithm.local_params", f"{patterns} keeps every parameter at the "
                        "sites: nothing would be federated")

  def evaluate(self, state) -> evaluation.EvalResult | evaluation.RegressionResult:
    if state_local(state):
      out = self.evaluate_personal(state.params, state.site_params,
                                   state.site_model_state if self.fedbn else state.model_state)
    elif self.fedbn and state.model_state:
      out = self.evaluate_sites(state.params, state.site_model_state)
    else:
      out = self.evaluate_global(state.params, state.model_state)
    if self.task == "regression":
      return evaluation.summarize_regression(out, self.test.y)
    return evaluation.summarize(*out, self.test.y, self.site_hist)

  def run_rounds(self, state, num_rounds: int):
    """Trains `num_rounds` rounds without logging (tests, notebooks, benchmarks)."""
    for _ in range(num_rounds // self.rounds_per_step):
      state, _ = self.step(state, self.data, self.keys["sampling"], self.keys["client"])
    return state

  def centralized_accuracy(self) -> float:
    """Test accuracy of the same model trained on one site holding all the training data.

    Same rounds and optimizers; each round takes local_steps x cohort_size steps, so it
    processes as many examples per round as the federated cohort does.
    """
    c = centralized_config(self.config)
    exp = Experiment(c, mesh=self.mesh)
    self.centralized = (exp, exp.run_rounds(exp.init_state(), c.rounds))  # for final_metrics
    return exp.evaluate(self.centralized[1]).accuracy

  def _over_budget(self, rounds: int) -> bool:
    return (self.privacy is not None and self.privacy.budget is not None
            and self.epsilon(rounds) > self.privacy.budget)

  def run(self, workdir: str) -> dict:
    """Trains to `config.rounds`, resuming from the last checkpoint in `workdir`
    (run_loop.run: logging, checkpoints, signals, budget, summary.json)."""
    return run_loop.run(self, workdir)
