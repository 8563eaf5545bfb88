"""Builds everything from a config and runs the rounds: the one loop.

    exp = Experiment(config)          # validates, loads data, partitions, builds the round
    summary = exp.run(workdir)        # metrics.jsonl, summary.json, checkpoints, resume

Every random choice comes from one root key, split by purpose and folded in with the round
and site index (docs/design.md), so a resumed run ends with the same parameters.
"""

import hashlib
import json
import logging
import math
import os
import signal
import time
from typing import NamedTuple

import jax
import numpy as np

from fedjax_lab import config as config_lib
from fedjax_lab import algorithms, evaluation, optim, runs, sharding
from fedjax_lab.checkpoint import Checkpointer
from fedjax_lab.algorithms import fedavg
from fedjax_lab.client import (ClientConfig, ExampleDP, example_dp_divisor, make_client_update,
                               make_public_objective)
from fedjax_lab.data import federated, partition, public, sources, standardize
from fedjax_lab.errors import ConfigError
from fedjax_lab.logging import MetricsLogger
from fedjax_lab.models import make_model
from fedjax_lab.privacy import accounting, adaptive_clipping, clipping, guarantees, sampling

log = logging.getLogger("fedjax_lab")

# Purposes folded into the root key; fixed numbers so adding a purpose never shifts the others.
_INIT, _SAMPLING, _CLIENT, _NOISE = 0, 1, 2, 3


def params_sha256(params) -> str:
  """SHA-256 of the leaves in jax.tree order as little-endian float32 bytes (docs/design.md)."""
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(params):
    h.update(np.asarray(leaf, dtype="<f4").tobytes())
  return h.hexdigest()


def tree_bytes(tree) -> int:
  return sum(int(np.prod(l.shape)) * 4 for l in jax.tree.leaves(tree))  # sent as float32


class PrivacyPlan(NamedTuple):
  noise_multiplier: float      # sigma of the aggregate (per-site shares derive from it)
  sampling_prob: float         # Poisson rate the accountant uses
  steps_per_round: int         # DP-SGD steps (example) or 1 (site) per round
  accountant: accounting.Accountant
  budget: float | None         # stop before epsilon would exceed this
  description: str             # the one log line stating what is protected and how
  # Adaptive clipping (site DP) splits noise_multiplier over two releases: the update's
  # multiplier z_update > noise_multiplier and the count's std sigma_b. Otherwise the update
  # gets noise_multiplier itself and count_noise_multiplier is None.
  update_noise_multiplier: float | None = None
  count_noise_multiplier: float | None = None
  # Poisson samples are truncated to `slots` (sampling.py): the batch of a site (example
  # level) or the cohort (site level). P(a draw of the unit's overflows during the run) <=
  # overflow_bound, paid for by the delta the accountant does not get (_TRUNCATION_SHARE).
  slots: int = 0
  overflow_bound: float = 0.0
  # "secret": the DP noise and sampling come from OS entropy kept in the checkpoint; "seeded":
  # from config.seed (reproducible, and no guarantee against anyone who knows the seed).
  randomness: str = "seeded"

  def mechanism(self, config, steps: int) -> guarantees.Mechanism:
    return guarantees.Mechanism(
        level=config.dp.level, noise=config.dp.noise,
        noise_multiplier=self.noise_multiplier, sampling_prob=self.sampling_prob,
        steps=steps, accountant_delta=self.accountant.delta, delta=config.dp.delta,
        overflow_bound=self.overflow_bound, accountant=config.dp.accountant,
        cohort_size=config.cohort_size, max_cohort=max(self.slots, 1),
        randomness=self.randomness)


# The share of dp.delta set aside for truncated Poisson samples (sampling.py): the accountant
# composes at delta (1 - share), and the slots are sized so (1 + e^eps) P(overflow) <= share
# delta, so (eps, dp.delta) holds for the run as it is really sampled.
_TRUNCATION_SHARE = 1e-3


def privacy_plan(config, site_counts: np.ndarray) -> PrivacyPlan | None:
  """What the accountant composes, from the config; sigma calibrated if asked."""
  dp = config.dp
  if dp.level == "none":
    return None
  if dp.level == "example":
    # Every site runs DP-SGD on its own examples; the smallest site samples at the highest
    # rate, so its epsilon bounds every site's. No amplification by cohort sampling is
    # claimed: a site is accounted as if it took part in every round.
    q = min(1.0, config.client.batch_size / int(site_counts.min()))
    steps_per_round, units = config.client.local_steps, int(site_counts.sum())
    unit = "one example"
    scheme = (f"Poisson minibatches at rate batch_size/site_size (q={q:.4g} at the smallest "
              f"site), {steps_per_round} DP-SGD step(s) a round, no cohort amplification")
  else:
    q, steps_per_round, units = config.cohort_size / config.data.num_sites, 1, config.data.num_sites
    unit = "one site (all its examples)"
    scheme = f"Poisson cohorts at rate cohort_size/num_sites (q={q:.4g}), updates clipped"
  total_steps = config.rounds * steps_per_round
  accountant_delta = dp.delta * (1 - _TRUNCATION_SHARE)
  sigma, budget, how = dp.noise_multiplier, dp.target_epsilon, "given"
  if sigma == 0:
    sigma = accounting.noise_multiplier_for(dp.target_epsilon, q, total_steps,
                                            accountant_delta, dp.accountant)
    budget, how = None, f"calibrated to epsilon<={dp.target_epsilon} after {config.rounds} rounds"
  accountant = accounting.Accountant(sigma, q, accountant_delta, dp.accountant)
  # Every draw that can hold the unit: its site's batch at every step (sizes n and n +- 1 for
  # the neighbours, each at rate batch_size / its size), or the cohort at every round.
  eps = accountant.epsilon_after(total_steps)
  overflow_bound = _TRUNCATION_SHARE * dp.delta / (1 + math.exp(min(eps, 700.0)))
  tail = overflow_bound / total_steps
  if dp.level == "example":
    sizes = np.unique(site_counts)
    slots = sampling.max_sample_size_over(
        np.concatenate([sizes - 1, sizes, sizes + 1]),
        lambda n: config.client.batch_size / n, tail)
    slots = min(slots, int(site_counts.max()))  # a site never has more to sample
  else:
    n = config.data.num_sites
    slots = min(n, sampling.max_sample_size_over([n - 1, n, n + 1],
                                                 lambda _: q, tail))
  if dp.delta > 1.0 / units:
    log.warning("dp.delta=%g > 1/%d (1/number of protected units): a mechanism that "
                "publishes one unit's data outright meets this delta", dp.delta, units)
  noise = ("coordinated: each of the K sites adds sigma/sqrt(K), so the sum carries sigma "
           "(secure aggregation, which would hide the single updates from the server, is "
           "assumed, not implemented: the guarantees below say what holds against whom)"
           if dp.noise == "coordinated" else "parallel: every site adds the full sigma")
  if dp.level == "site":
    noise += "; a round with an empty cohort gets the noise from the server"
  randomness = guarantees.resolve_randomness(dp.randomness, config.data.name)
  update_sigma, count_stddev, clip = float(sigma), None, f"clip_norm={dp.clip_norm:g}"
  if dp.adaptive_clip:  # the accountant still composes sigma (Andrew et al. 2021, Thm 1)
    update_sigma, count_stddev = config_lib.adaptive_clip_noise(config, sigma)
    clip = adaptive_clipping.describe(sigma, count_stddev, dp.target_quantile, dp.clip_lr,
                                      dp.clip_norm)
  truncation = (f"samples truncated to {slots} slots, P(any overflow of the unit's draws) <= "
                f"{overflow_bound:.3g}, covered by delta: the accountant composes at "
                f"delta={accountant_delta:g}")
  description = (f"privacy: unit={unit}; neighbouring relation=add/remove one; sampling="
                 f"{scheme}; {truncation}; accountant={dp.accountant}; delta={dp.delta:g}; "
                 f"noise_multiplier={sigma:.4f} ({how}); {clip}; noise {noise}; "
                 f"randomness={randomness} (dp.randomness={dp.randomness})")
  return PrivacyPlan(noise_multiplier=float(sigma), sampling_prob=q,
                     steps_per_round=steps_per_round, accountant=accountant,
                     budget=budget, description=description,
                     update_noise_multiplier=update_sigma, count_noise_multiplier=count_stddev,
                     slots=slots, overflow_bound=overflow_bound, randomness=randomness)


def noise_coverage(site_counts, batch_size: int, example_dp: ExampleDP, cohort_size: int,
                   noise_multiplier: float) -> np.ndarray:
  """[sites]: for each site j, the std of the noise in a round's uniform average over the
  cohort, over noise_multiplier x the sensitivity of one of site j's examples in it, at the
  cohort holding j that carries the least noise. >= 1 means the accountant's sigma covers
  every example of j, whoever else is in the cohort.

  From the client's own divisors (client.example_dp_divisor) and noise share: site k sends
  (S_k + N(0, (share C)^2)) / d_k and the server averages with weight 1/K, so one example of
  j moves the average by C / (K d_j) while the noise has std share C sqrt(sum_k d_k^-2) / K.
  """
  d = np.asarray(example_dp_divisor(example_dp, batch_size, np.asarray(site_counts, np.float64)),
                 np.float64)
  share = example_dp.noise_multiplier
  ratios = np.empty(len(d))
  for j, dj in enumerate(d):
    least = np.sort(np.delete(d, j) ** -2.0)[:cohort_size - 1].sum()  # the quietest others
    ratios[j] = share * np.sqrt(dj ** -2.0 + least) / (noise_multiplier / dj)
  return ratios


def _any_process_signalled(signalled_here: bool) -> bool:
  """Whether any process of a multi-process run was signalled to stop this round.

  Saving a checkpoint is collective: a process that stops alone would wait for the others,
  which wait in the next round for it. So all processes learn of a signal any one received
  and stop after the same round. A single process has nothing to ask.
  """
  if jax.process_count() == 1:
    return signalled_here
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.int32(signalled_here))))


def _round_devices(config, privacy: PrivacyPlan | None) -> list:
  """Every device, or one CPU device for a round too small to split (see
  sharding.round_devices); algorithms with per-site state always shard it."""
  if algorithms.per_site_state(config.algorithm.name):
    return jax.devices()
  per_round = privacy.slots if config.dp.level == "site" else config.cohort_size
  return sharding.round_devices(per_round, config.min_sites_per_device)


def place_state(state, mesh):
  """The state replicated, except its per-site fields (named site_*, leaves [sites, ...]),
  sharded over the mesh as the rounds keep them: the jitted round then sees the same input
  shardings at every call and compiles once."""
  state = sharding.put_replicated(state, mesh)
  return state._replace(**{f: sharding.put_sites(getattr(state, f), mesh)
                           for f in state._fields if f.startswith("site_")})


def centralized_config(config):
  """The config with the federation removed: one site holds all the training examples."""
  c = config.copy_and_resolve_references()
  c.client.local_steps = config.client.local_steps * config.cohort_size
  c.data.num_sites, c.cohort_size, c.data.partition = 1, 1, "iid"
  c.eval.centralized_baseline = False
  return c


def draw_secret() -> list[int]:
  """64 bits of OS entropy (threefry key data), the same on every process of a run."""
  words = np.frombuffer(os.urandom(8), np.uint32).copy()
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    words = np.asarray(multihost_utils.broadcast_one_to_all(words))
  return [int(w) for w in words]


class Experiment:
  """Everything one config describes, built once; `run` trains and writes the workdir."""

  def __init__(self, config, mesh=None):
    config_lib.validate(config)
    self.config = config
    train, test = sources.load_dataset(config.data)
    # holdout:F takes the public calibration set out of `train` before it is partitioned.
    train, self.public = public.load(config.optim.public_data, config.data, train)
    sites_note = partition.resolve_num_sites(train, config)  # by_column: the column's count
    if config.data.num_sites > len(train.y):
      raise ConfigError("data.num_sites", f"{config.data.num_sites} sites > {len(train.y)} "
                        "training examples; use fewer sites")
    self.sites = partition.partition(train, config.data, config.seed)
    # data.standardize: fitted on training data only (or per site, or public); one log line.
    train, test, self.public, note = standardize.apply(config, train, test, self.sites,
                                                       self.public)
    self.data_notes = [n for n in (sites_note, note) if n]  # run() logs them at start
    self.train, self.test = train, test
    self.data = federated.from_partition(
        train.x, train.y, self.sites, train.num_classes,
        *((self.public.x, self.public.y) if self.public is not None else ()))
    self.site_hist = federated.site_label_histogram(self.data)
    self.privacy = privacy_plan(config, np.asarray(self.data.count))
    self.mesh = mesh if mesh is not None else sharding.make_mesh(
        _round_devices(config, self.privacy))
    self.data = sharding.put_replicated(self.data, self.mesh)

    self.model = make_model(config.model, train.num_classes, train.x[:2])
    # Under dp.randomness=secret a fresh secret per run (run() keeps the checkpoint's on resume).
    secret = self.privacy is not None and self.privacy.randomness == "secret"
    self.set_secret(draw_secret() if secret else None)
    # The objective's (l2/2)||w||^2 is in the client's gradient (client.make_site_gradient).
    self.client_tx = optim.make_optimizer(config.client.optimizer, config.client.lr,
                                          key_prefix="client", **config.client.optimizer_args)
    self.server_tx = optim.make_optimizer(config.server.optimizer, config.server.lr,
                                          key_prefix="server", **config.server.optimizer_args)
    self.example_dp = example_dp = self._example_dp()
    if example_dp is not None:
      self._check_noise_coverage(example_dp)
    client_config = ClientConfig(
        local_steps=config.client.local_steps, batch_size=config.client.batch_size,
        shuffle=config.client.shuffle, prox_mu=0.0,
        public_batch_size=config.optim.public_batch_size)

    def client_update_with(correction=None, local_epochs=config.client.local_epochs):
      return make_client_update(self.model, self.client_tx, client_config, dp=example_dp,
                                correction=correction, l2=config.model.l2,
                                local_epochs=local_epochs)

    self.client_update = client_update_with()
    self.fedbn = config.algorithm.batch_stats == "local"
    self.algorithm = algorithms.make_algorithm(algorithms.AlgorithmContext(
        config=config, model=self.model, client_update=self.client_update,
        client_tx=self.client_tx, server_tx=self.server_tx, num_sites=self.data.num_sites,
        mesh=self.mesh, site_dp=self._site_dp(),
        server_objective=(make_public_objective(self.model, config.optim.public_batch_size)
                          if config.server.optimizer in optim.CURVATURE_OPTIMIZERS else None),
        sites_per_chunk=(sharding.default_sites_per_chunk() if config.sites_per_chunk is None
                         else config.sites_per_chunk),
        example_dp=example_dp, make_client_update=client_update_with))
    self.round_fn = self.algorithm.round
    self.rounds_per_step = config.rounds_per_step
    step = (self.round_fn if self.rounds_per_step == 1
            else algorithms.fuse_rounds(self.round_fn, self.rounds_per_step))
    self.step = jax.jit(step, donate_argnums=0)
    class_eval = evaluation.make_class_evaluator(
        self.model, test.x, test.y, train.num_classes, config.eval.batch_size)
    self.evaluate_global = jax.jit(class_eval)
    # Gathered whole: the host reads every site's counts (on every process of a multi-host run).
    self.evaluate_sites = jax.jit(jax.vmap(class_eval, in_axes=(None, 0)),
                                  out_shardings=sharding.replicated(self.mesh))
    state = self.init_state()
    # One message: the model, plus the BatchNorm statistics when they are averaged.
    self.message_bytes = tree_bytes((state.params, {} if self.fedbn else state.model_state))

  def _example_dp(self):
    if self.privacy is None or self.config.dp.level != "example":
      return None
    dp, cfg = self.config.dp, self.config
    share = self.privacy.noise_multiplier
    if dp.noise == "coordinated":
      share /= math.sqrt(cfg.cohort_size)
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
    clipped = clipping.make_clipped_grad_sum(
        self.model.module, lambda out, y: -jax.nn.log_softmax(out)[y], method=dp.clipping,
        microbatch_size=dp.microbatch_size or None, apply_kwargs={"train": False},
        return_losses=True)
    return ExampleDP(clip_norm=dp.clip_norm, noise_multiplier=share,
                     max_batch=self.privacy.slots,
                     clipped_grad_sum=clipped,
                     fixed_divisor=(float(cfg.client.batch_size) if dp.noise == "coordinated"
                                    else None))

  def _check_noise_coverage(self, example_dp: ExampleDP) -> None:
    """Refuses a plan in which some site's examples see less noise than the accountant's sigma
    (a guard: the divisors chosen in _example_dp make every ratio >= 1)."""
    ratios = noise_coverage(np.asarray(self.data.count), self.config.client.batch_size,
                            example_dp, self.config.cohort_size, self.privacy.noise_multiplier)
    worst = int(np.argmin(ratios))
    if ratios[worst] < 1 - 1e-9:
      raise ConfigError("dp.noise", f"site {worst}'s examples would see noise "
                        f"{ratios[worst]:.3f} x sigma, less than the accountant composes; "
                        "use dp.noise=parallel")

  def set_secret(self, secret: list[int] | None) -> None:
    """The per-purpose keys: from config.seed, except that with a secret (dp.randomness=secret)
    every draw of the DP mechanism (cohorts, minibatches, noise) comes from the secret; the
    model's initialisation stays seeded (it depends on no private data)."""
    self.secret = secret
    root = jax.random.key(self.config.seed)
    self.keys = {name: jax.random.fold_in(root, i) for name, i in
                 (("init", _INIT), ("sampling", _SAMPLING), ("client", _CLIENT), ("noise", _NOISE))}
    if secret is not None:
      secret_root = jax.random.wrap_key_data(np.asarray(secret, np.uint32))
      for name, i in (("sampling", _SAMPLING), ("client", _CLIENT), ("noise", _NOISE)):
        self.keys[name] = jax.random.fold_in(secret_root, i)

  def _site_dp(self):
    if self.privacy is None or self.config.dp.level != "site":
      return None
    cfg = self.config
    adaptive = None
    if cfg.dp.adaptive_clip:
      adaptive = fedavg.AdaptiveClip(target_quantile=cfg.dp.target_quantile,
                                     clip_lr=cfg.dp.clip_lr,
                                     count_stddev=self.privacy.count_noise_multiplier)
    return fedavg.SiteDP(clip_norm=cfg.dp.clip_norm,
                         noise_multiplier=self.privacy.update_noise_multiplier,
                         coordinated=cfg.dp.noise == "coordinated",
                         max_cohort=self.privacy.slots,
                         adaptive=adaptive)

  def epsilon(self, rounds: int) -> float | None:
    if self.privacy is None:
      return None
    return self.privacy.accountant.epsilon_after(rounds * self.privacy.steps_per_round)

  def init_state(self):
    params, model_state = self.model.init(self.keys["init"], self.train.x[:2])
    return place_state(self.algorithm.init(params, model_state), self.mesh)

  def evaluate(self, state) -> evaluation.EvalResult:
    if self.fedbn and state.model_state:
      correct, loss = self.evaluate_sites(state.params, state.site_model_state)
    else:
      correct, loss = self.evaluate_global(state.params, state.model_state)
    return evaluation.summarize(correct, loss, self.test.y, self.site_hist)

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
    return exp.evaluate(exp.run_rounds(exp.init_state(), c.rounds)).accuracy

  def _over_budget(self, rounds: int) -> bool:
    return (self.privacy is not None and self.privacy.budget is not None
            and self.epsilon(rounds) > self.privacy.budget)

  def run(self, workdir: str) -> dict:
    """Trains to `config.rounds`, resuming from the last checkpoint in `workdir`."""
    os.makedirs(workdir, exist_ok=True)
    cfg = self.config
    # One run, one workdir: resume only the config that made it (runs.RESUMABLE_KEYS may differ).
    runs.check_resume(workdir, cfg)
    if jax.process_index() == 0:
      runs.write_run(workdir, cfg)
    ckpt = Checkpointer(workdir, keep=cfg.checkpoint.keep)
    state = self.init_state()
    start, meta = 0, {"bytes_total": 0, "seconds_total": 0.0}
    if self.privacy is not None:  # what the accountant composes; checked again on resume
      meta.update(noise_multiplier=self.privacy.noise_multiplier,
                  sampling_prob=self.privacy.sampling_prob,
                  steps_per_round=self.privacy.steps_per_round)
    adaptive = self.privacy is not None and cfg.dp.adaptive_clip
    site_dp = self.privacy is not None and cfg.dp.level == "site"
    if adaptive:  # the split of noise_multiplier; C_t itself is in the checkpointed state
      meta.update(update_noise_multiplier=self.privacy.update_noise_multiplier,
                  count_noise_multiplier=self.privacy.count_noise_multiplier)
    if self.secret is not None:  # the checkpoint is the one place the secret is written
      meta["dp_secret"] = self.secret
    if ckpt.latest_round() is not None:
      start = ckpt.latest_round()
      planned = dict(meta)
      state, meta = ckpt.restore(start, state)
      for key in ("noise_multiplier", "sampling_prob", "steps_per_round",
                  "update_noise_multiplier", "count_noise_multiplier"):
        if key in planned and not math.isclose(meta.get(key, -1), planned[key], rel_tol=1e-9):
          raise ConfigError("dp", f"the checkpoint in {workdir} was trained with {key}="
                            f"{meta.get(key)}, this config gives {planned[key]}; use a new workdir")
      if (self.secret is None) != (meta.get("dp_secret") is None):
        raise ConfigError("dp.randomness", f"the checkpoint in {workdir} was trained with "
                          f"{'seeded' if self.secret is not None else 'secret'} DP randomness; "
                          "use the same dp.randomness or a new workdir")
      if self.secret is not None:
        self.set_secret(meta["dp_secret"])
      state = place_state(state, self.mesh)
      log.info("resumed from %s at round %d", workdir, start)
    # A multi-process run trains as one program; process 0 alone writes what it reports.
    primary = jax.process_index() == 0
    logger = MetricsLogger(workdir, cfg.rounds, start, progress=cfg.log.progress,
                           tensorboard=cfg.log.tensorboard, primary=primary)
    for note in self.data_notes:
      log.info(note)
    if self.privacy is not None:
      log.info(self.privacy.description)
      log.info(guarantees.describe(guarantees.all_guarantees(self.privacy.mechanism(
          cfg, cfg.rounds * self.privacy.steps_per_round))) + f"\n  (after the planned "
          f"{cfg.rounds} rounds; summary.json lists them after the rounds completed)")
    if self.public is not None:
      log.info("curvature objective: %d public examples of optim.public_data=%s, %d per "
               "estimate (public by assumption: no epsilon covers them)", len(self.public),
               cfg.optim.public_data, min(cfg.optim.public_batch_size, len(self.public)))
    completed, result = start, None
    # Ctrl-C (SIGINT) or a scheduler's SIGTERM: finish the round in flight, save, then stop.
    stop = {"signal": None}
    handlers = {s: signal.signal(s, lambda num, _: stop.update(signal=num))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
      while completed < cfg.rounds and stop["signal"] is None:
        if self._over_budget(completed + self.rounds_per_step):
          log.warning("privacy budget dp.target_epsilon=%g reached: stopping after round %d "
                      "(epsilon %.4f)", self.privacy.budget, completed, self.epsilon(completed))
          break
        t0 = time.perf_counter()
        state, metrics = self.step(state, self.data, self.keys["sampling"], self.keys["client"])
        losses = np.atleast_1d(np.asarray(metrics.train_loss))
        messages = np.atleast_1d(np.asarray(metrics.messages))
        overflow = np.atleast_1d(np.asarray(metrics.dp_overflow))
        nonfinite = (np.atleast_1d(np.asarray(metrics.nonfinite_updates)) if site_dp else None)
        clip_norms = np.atleast_1d(np.asarray(metrics.clip_norm)) if adaptive else None
        for i, loss in enumerate(losses):
          completed += 1
          evaluate = completed % cfg.eval.every == 0 or completed == cfg.rounds
          result = self.evaluate(state) if evaluate and i == len(losses) - 1 else None
          seconds = (time.perf_counter() - t0) / len(losses)
          # Under site DP the realised cohort size is private (who took part): log the
          # expected 2 x cohort_size messages instead.
          round_bytes = (2 * cfg.cohort_size if site_dp else int(messages[i])) * self.message_bytes
          meta["bytes_total"] += round_bytes
          meta["seconds_total"] += seconds
          logger.write({
              "round": completed, "train_loss": float(loss),
              "test_accuracy": result.accuracy if result else None,
              "test_loss": result.loss if result else None,
              "site_accuracy_mean": result.site_accuracy_mean if result else None,
              "site_accuracy_worst10": result.site_accuracy_worst10 if result else None,
              "epsilon": self.epsilon(completed), "seconds": seconds,
              "bytes_communicated": round_bytes, "bytes_total": meta["bytes_total"],
              **({"dp_overflow": int(overflow[i])} if self.privacy else {}),
              **({"nonfinite_updates": int(nonfinite[i])} if site_dp else {}),
              # The norm this round's site updates were clipped to (C_t, before its update).
              **({"clip_norm": float(clip_norms[i])} if adaptive else {})})
        if _any_process_signalled(stop["signal"] is not None) and stop["signal"] is None:
          stop["signal"] = signal.SIGTERM  # another process was: stop after the same round
        if (completed % cfg.checkpoint.every == 0 or completed == cfg.rounds or stop["signal"]
            or self._over_budget(completed + self.rounds_per_step)):
          ckpt.save(completed, state, meta)
    finally:
      for s, h in handlers.items():
        signal.signal(s, h)
      logger.close()
      ckpt.close()
    if stop["signal"] is not None:
      raise KeyboardInterrupt(f"stopped at round {completed}; checkpoint saved in {workdir}")
    result = result or self.evaluate(state)
    summary = {
        "test_accuracy": result.accuracy, "test_loss": result.loss,
        "site_accuracy_mean": result.site_accuracy_mean,
        "site_accuracy_worst10": result.site_accuracy_worst10,
        "epsilon": self.epsilon(completed), "rounds_completed": completed,
        "total_seconds": meta["seconds_total"], "bytes_total": meta["bytes_total"],
        "params_sha256": params_sha256(state.params),
        "config": json.loads(self.config.to_json_best_effort()),
        "lab_commit": runs.lab_commit(), "versions": runs.versions(),
    }
    if self.privacy is not None:
      # What the accountant composed, so anyone can recompute epsilon with dp-accounting.
      summary["privacy"] = {
          "noise_multiplier": self.privacy.noise_multiplier,
          "sampling_prob": self.privacy.sampling_prob,
          "steps": completed * self.privacy.steps_per_round,
          "accountant": cfg.dp.accountant, "delta": cfg.dp.delta,
          # epsilon is dp-accounting's at accountant_delta; the rest of delta covers the
          # truncation of Poisson samples to `slots` (privacy/sampling.py).
          "accountant_delta": self.privacy.accountant.delta, "slots": self.privacy.slots,
          "overflow_bound": self.privacy.overflow_bound,
          "randomness": self.privacy.randomness,
          "guarantees": guarantees.all_guarantees(self.privacy.mechanism(
              cfg, completed * self.privacy.steps_per_round))}
      if adaptive:  # how noise_multiplier was split, and the clip norm the next round would use
        summary["privacy"].update(
            update_noise_multiplier=self.privacy.update_noise_multiplier,
            count_noise_multiplier=self.privacy.count_noise_multiplier,
            final_clip_norm=float(state.clip_norm))
    if cfg.eval.centralized_baseline:
      summary["centralized_test_accuracy"] = self.centralized_accuracy()
    if primary:
      with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    self.final_state = state
    return summary
