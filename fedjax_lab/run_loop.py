"""The run loop: train an Experiment to its rounds, with resume, signals, the privacy budget,
logging and summary.json (the contracts in docs/design.md). experiment.py builds; this runs.
"""

import dataclasses
import json
import logging
import math
import os
import signal
import time
from typing import Any

import jax
from jax.experimental import multihost_utils
import numpy as np

from fedjax_lab import divergence, evaluation, evaluation_robustness, runs
from fedjax_lab.attacks import canaries, record
from fedjax_lab.checkpoint import Checkpointer
from fedjax_lab.errors import ConfigError
from fedjax_lab.logging import MetricsLogger
from fedjax_lab.privacy import guarantees, mechanism
from fedjax_lab.state import params_sha256, place_state

log = logging.getLogger("fedjax_lab")


def _any_process_signalled(signalled_here: bool) -> bool:
  """Whether any process of a multi-process run was signalled to stop this round.

  Saving a checkpoint is collective: a process that stops alone would wait for the others,
  which wait in the next round for it. So all processes learn of a signal any one received
  and stop after the same round. A single process has nothing to ask.
  """
  if jax.process_count() == 1:
    return signalled_here
  return bool(np.any(multihost_utils.process_allgather(np.int32(signalled_here))))


def _released_without_dp(self, meta: dict) -> dict:
  """What the run publishes that no epsilon covers: the sites' sizes (public by assumption:
  the sampling rates are built from them) and the statistics of private data it logs."""
  cfg = self.config
  fields = {
      "train_loss": "metrics.jsonl: the sites' mean training loss, on private examples",
      "dp_overflow": "metrics.jsonl: Poisson draws beyond their slots",
      "site_metrics": "summary.json: each site's training label counts weight its accuracy"}
  if cfg.dp.level == "site":
    fields["nonfinite_updates"] = "metrics.jsonl: site updates that were NaN/inf"
  counts = np.asarray(self.data.count)
  if len(counts) <= cfg.eval.site_metrics_max:
    out = {"site_examples": [int(n) for n in counts]}
  else:  # a 10^6-site population: how many sites hold each size, not 10^6 lines of JSON
    sizes, sites = np.unique(counts, return_counts=True)
    out = {"site_examples_by_size": {str(int(n)): int(k) for n, k in zip(sizes, sites)}}
  if cfg.secagg.enabled:  # a function of each site's noised update, coordinate by coordinate
    fields["secagg_clipped"] = ("metrics.jsonl and summary.json secagg.clipped_values: "
                                "coordinates of the sites' noised updates outside "
                                "secagg.clip_range, which tells how large their norms are")
    out["secagg_clipped"] = meta.get("secagg_clipped", 0)
  out["fields"] = fields
  return out


@dataclasses.dataclass
class _Run:
  """What the loop's steps share: where the run writes, its state, the rounds completed and
  the running totals (`meta`) the checkpoint saves with the state."""
  workdir: str
  ckpt: Checkpointer
  state: Any
  meta: dict
  completed: int
  w0: Any             # the canary audit's initial parameters (flat), else None
  primary: bool       # process 0: writes what the run reports
  adaptive: bool      # dp.adaptive_clip
  site_dp: bool       # dp.level == "site"
  # Site-level DP with secure aggregation: a round's wall time grows with the realised cohort
  # (the protocol's host cryptography is quadratic in it), which amplification by sampling
  # hides; the device work is padded to the slots, the host's cannot be.
  hide_time: bool
  logger: Any = None
  watch: Any = None   # divergence.Watch
  scorer: Any = None  # canaries.Scorer when audit.canaries > 0
  result: Any = None  # the last round's evaluation, when it had one
  stop: dict = dataclasses.field(default_factory=lambda: {"signal": None})


def run(self, workdir: str) -> dict:
  """Trains `self` (an Experiment) to `config.rounds`, resuming from the last checkpoint in
  `workdir`; writes metrics.jsonl, summary.json, TensorBoard and checkpoints."""
  cfg = self.config
  r = _start(self, workdir)
  r.logger = MetricsLogger(workdir, cfg.rounds, r.completed, progress=cfg.log.progress,
                           tensorboard=cfg.log.tensorboard, primary=r.primary)
  _log_plan(self, r.hide_time)
  r.watch = divergence.Watch(cfg, r.state.params)
  r.scorer = (canaries.Scorer(self.canaries, r.meta, self.keys["sampling"])
              if self.canaries is not None else None)
  if r.scorer is not None:
    r.scorer.observe(r.state.params)
  # Ctrl-C (SIGINT) or a scheduler's SIGTERM: finish the round in flight, save, then stop.
  handlers = {s: signal.signal(s, lambda num, _: r.stop.update(signal=num))
              for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    while r.completed < cfg.rounds and r.stop["signal"] is None:
      if _budget_reached(self, r.completed):
        break
      _step(self, r)
      if _any_process_signalled(r.stop["signal"] is not None) and r.stop["signal"] is None:
        r.stop["signal"] = signal.SIGTERM  # another process was: stop after the same round
      if _checkpoint_due(self, r):
        if r.scorer is not None:
          r.scorer.save(r.meta)
        r.ckpt.save(r.completed, r.state, r.meta)
  finally:
    for s, h in handlers.items():
      signal.signal(s, h)
    r.logger.close()
    r.ckpt.close()
  if r.stop["signal"] is not None:
    raise KeyboardInterrupt(f"stopped at round {r.completed}; checkpoint saved in {workdir}")
  summary = _summary(self, r)
  if r.primary:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
  self.final_state = r.state
  return summary


def _start(self, workdir: str) -> _Run:
  """The initial state and totals, or those of the last checkpoint in `workdir`."""
  os.makedirs(workdir, exist_ok=True)
  cfg = self.config
  # One run, one workdir: resume only the config that made it (runs.RESUMABLE_KEYS may differ).
  runs.check_resume(workdir, cfg)
  if jax.process_index() == 0:
    runs.write_run(workdir, cfg)
  ckpt = Checkpointer(workdir, keep=cfg.checkpoint.keep)
  state = self.init_state()
  # The canary audit's adversary knows the initialisation (seeded, no private data).
  w0 = canaries.flat(state.params) if self.canaries is not None else None
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
    state, meta = _resume(self, workdir, ckpt, start, state, meta)
  # A multi-process run trains as one program; process 0 alone writes what it reports.
  return _Run(workdir=workdir, ckpt=ckpt, state=state, meta=meta, completed=start, w0=w0,
              primary=jax.process_index() == 0, adaptive=adaptive, site_dp=site_dp,
              hide_time=site_dp and cfg.secagg.enabled)


def _resume(self, workdir: str, ckpt: Checkpointer, start: int, state, planned: dict):
  """(state, meta) of the checkpoint at round `start`, refused when its privacy plan or DP
  randomness differs from this config's (`planned`)."""
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
  return state, meta


def _log_plan(self, hide_time: bool) -> None:
  """The data notes, the privacy plan and guarantees, and what the logs leave out and why."""
  cfg = self.config
  for note in self.data_notes:
    log.info(note)
  if self.privacy is not None:
    log.info(self.privacy.description)
    log.info(guarantees.describe(mechanism.guarantee_entries(
        self.privacy, cfg, cfg.rounds * self.privacy.steps_per_round)) + f"\n  (after the planned "
        f"{cfg.rounds} rounds; summary.json lists them after the rounds completed)")
  if hide_time:
    log.info("seconds are not logged (metrics.jsonl seconds: null, summary total_seconds: "
             "null): under site-level DP with secure aggregation a round's time grows with "
             "the realised cohort, which the privacy analysis treats as hidden")
  if self.public is not None:
    log.info("curvature objective: %d public examples of optim.public_data=%s, %d per "
             "estimate (public by assumption: no epsilon covers them)", len(self.public),
             cfg.optim.public_data, min(cfg.optim.public_batch_size, len(self.public)))


def _budget_reached(self, completed: int) -> bool:
  """Whether the next step would spend more than dp.target_epsilon (then says so)."""
  if not self._over_budget(completed + self.rounds_per_step):
    return False
  log.warning("privacy budget dp.target_epsilon=%g reached: stopping after round %d "
              "(epsilon %.4f)", self.privacy.budget, completed, self.epsilon(completed))
  return True


def _checkpoint_due(self, r: _Run) -> bool:
  """Every checkpoint.every rounds, at the end, and before any stop (signal or budget)."""
  return bool(r.completed % self.config.checkpoint.every == 0
              or r.completed == self.config.rounds or r.stop["signal"]
              or self._over_budget(r.completed + self.rounds_per_step))


def _step(self, r: _Run) -> None:
  """One jitted step (rounds_per_step rounds), then each of its rounds' metrics logged."""
  cfg = self.config
  t0 = time.perf_counter()
  before = jax.tree.map(np.array, r.state) if record.wants(cfg, r.completed + 1) else None
  r.state, metrics = self.step(r.state, self.data, self.keys["sampling"], self.keys["client"])
  if r.scorer is not None:  # rounds_per_step is 1 (canaries.validate); the round's index
    r.scorer.observe(r.state.params, r.completed)
  if before is not None and r.primary:  # attack.record_sites: off by default
    record.save(self, before, r.completed + 1, r.workdir)
  per_round = lambda a: np.atleast_1d(np.asarray(a))
  losses, messages = per_round(metrics.train_loss), per_round(metrics.messages)
  overflow = per_round(metrics.dp_overflow)
  nonfinite = per_round(metrics.nonfinite_updates) if r.site_dp else None
  clip_norms = per_round(metrics.clip_norm) if r.adaptive else None
  secure = ({k: per_round(v) for k, v in metrics.secagg.items()}
            if cfg.secagg.enabled else None)
  for i, loss in enumerate(losses):
    r.completed += 1
    r.result = _evaluate_if_due(self, r, last=i == len(losses) - 1)
    seconds = (time.perf_counter() - t0) / len(losses)
    _log_round(self, r, float(loss), seconds, messages[i], overflow[i],
               None if nonfinite is None else nonfinite[i],
               None if clip_norms is None else clip_norms[i],
               None if secure is None else {k: v[i] for k, v in secure.items()})


def _evaluate_if_due(self, r: _Run, last: bool):
  """The evaluation of the state every eval.every rounds and at the end, else None; only a
  step's last round has its own state to evaluate."""
  due = r.completed % self.config.eval.every == 0 or r.completed == self.config.rounds
  return self.evaluate(r.state) if due and last else None


def _log_round(self, r: _Run, loss: float, seconds: float, messages, overflow, nonfinite,
               clip_norm, secure: dict | None) -> None:
  """One round's line of metrics.jsonl (and TensorBoard), its totals in `meta`, and the
  divergence check on its loss; the metrics are this round's entries of the step's."""
  cfg = self.config
  # Under site DP the realised cohort size is private (who took part): log the
  # expected 2 x cohort_size messages instead.
  round_bytes = (2 * cfg.cohort_size if r.site_dp else int(messages)) * self.message_bytes
  if secure is not None:  # uploads are masked vectors + the protocol's messages
    sites = cfg.cohort_size if r.site_dp else int(messages) // 2
    round_bytes = sites * (self.message_bytes + self.secagg_bytes_per_site)
    r.meta["secagg_aborted"] = r.meta.get("secagg_aborted", 0) + int(secure["aborted"])
    r.meta["secagg_clipped"] = r.meta.get("secagg_clipped", 0) + int(secure["clipped"])
    if secure["aborted"]:
      log.warning("round %d: secure aggregation aborted (too few survivors): the model "
                  "is unchanged", r.completed)
  r.watch.check(r.completed, loss, r.state.params)
  r.meta["bytes_total"] += round_bytes
  r.meta["seconds_total"] += seconds
  if r.hide_time:
    seconds = None
  r.logger.write({
      "round": r.completed, "train_loss": loss,
      **evaluation.fields(r.result, self.task),  # test_accuracy ... or test_rmse, test_r2
      "epsilon": self.epsilon(r.completed), "seconds": seconds,
      "bytes_communicated": round_bytes, "bytes_total": r.meta["bytes_total"],
      **({"dp_overflow": int(overflow)} if self.privacy else {}),
      **({"nonfinite_updates": int(nonfinite)} if r.site_dp else {}),
      # The norm this round's site updates were clipped to (C_t, before its update).
      **({"clip_norm": float(clip_norm)} if r.adaptive else {}),
      # What the secure sum did: sites in it, whether it aborted, coordinates clipped to
      # secagg.clip_range (never silent) and the protocol's host cryptography time.
      # Under site DP the realised cohort is private: neither the survivor count nor the
      # host time (which grows with the cohort) is logged.
      **({f"secagg_{k}": (float(v) if k == "host_seconds" else int(v))
          for k, v in secure.items()
          if not (r.site_dp and k in ("survivors", "host_seconds"))}
         if secure is not None else {})})


def _summary(self, r: _Run) -> dict:
  """summary.json: the final evaluation, epsilon and what it composed, totals, the audit."""
  cfg = self.config
  state, completed, meta = r.state, r.completed, r.meta
  result = r.result or self.evaluate(state)
  summary = {
      **evaluation.fields(result, self.task),
      "epsilon": self.epsilon(completed), "rounds_completed": completed,
      "total_seconds": None if r.hide_time else meta["seconds_total"],
      "bytes_total": meta["bytes_total"],
      "params_sha256": params_sha256(state.params),
      "config": json.loads(self.config.to_json_best_effort()),
      "lab_commit": runs.lab_commit(), "versions": runs.versions(),
  }
  if self.privacy is not None:
    summary["privacy"] = _privacy_summary(self, r)
  if cfg.secagg.enabled:
    summary["secagg"] = {"aborted_rounds": meta.get("secagg_aborted", 0),
                         "clipped_values": meta.get("secagg_clipped", 0)}
  if cfg.eval.centralized_baseline:
    summary["centralized_test_accuracy"] = self.centralized_accuracy()
  # AUC, macro-F1, bootstrap intervals, per-site metrics, eval.robustness (new keys only).
  if self.task == "classification":
    summary.update(evaluation_robustness.final_metrics(self, state))
  if r.scorer is not None:
    summary["audit"] = canaries.report(
        self, r.scorer, r.w0,
        summary.get("privacy", {}).get("guarantees"), cfg.dp.delta, summary["epsilon"])
  return summary


def _privacy_summary(self, r: _Run) -> dict:
  """What the accountant composed, so anyone can recompute epsilon with dp-accounting."""
  cfg, steps = self.config, r.completed * self.privacy.steps_per_round
  out = {
      "noise_multiplier": self.privacy.noise_multiplier,
      "sampling_prob": self.privacy.sampling_prob,
      "steps": steps,
      "accountant": cfg.dp.accountant, "delta": cfg.dp.delta,
      # epsilon is dp-accounting's at accountant_delta; the rest of delta covers the
      # truncation of Poisson samples to `slots` (privacy/sampling.py).
      "accountant_delta": self.privacy.accountant.delta, "slots": self.privacy.slots,
      "overflow_bound": self.privacy.overflow_bound,
      "randomness": self.privacy.randomness,
      "mechanism": self.privacy.mechanism_name,
      "guarantees": mechanism.guarantee_entries(self.privacy, cfg, steps),
      "released_without_dp": _released_without_dp(self, r.meta)}
  if r.adaptive:  # how noise_multiplier was split, and the clip norm the next round would use
    out.update(update_noise_multiplier=self.privacy.update_noise_multiplier,
               count_noise_multiplier=self.privacy.count_noise_multiplier,
               final_clip_norm=float(r.state.aggregator_state))
  elif r.site_dp and cfg.secagg.enabled:  # the sites add more than the accountant composes
    out["update_noise_multiplier"] = self.privacy.update_noise_multiplier
  return out
