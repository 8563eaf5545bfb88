"""The run loop: train an Experiment to its rounds, with resume, signals, the privacy budget,
logging and summary.json (the contracts in docs/design.md). experiment.py builds; this runs.
"""

import json
import logging
import math
import os
import signal
import time

import jax
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
  from jax.experimental import multihost_utils
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
  out = {"site_examples": [int(n) for n in np.asarray(self.data.count)]}
  if cfg.secagg.enabled:  # a function of each site's noised update, coordinate by coordinate
    fields["secagg_clipped"] = ("metrics.jsonl and summary.json secagg.clipped_values: "
                                "coordinates of the sites' noised updates outside "
                                "secagg.clip_range, which tells how large their norms are")
    out["secagg_clipped"] = meta.get("secagg_clipped", 0)
  out["fields"] = fields
  return out


def run(self, workdir: str) -> dict:
  """Trains `self` (an Experiment) to `config.rounds`, resuming from the last checkpoint in
  `workdir`; writes metrics.jsonl, summary.json, TensorBoard and checkpoints."""
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
    log.info(guarantees.describe(mechanism.guarantee_entries(
        self.privacy, cfg, cfg.rounds * self.privacy.steps_per_round)) + f"\n  (after the planned "
        f"{cfg.rounds} rounds; summary.json lists them after the rounds completed)")
  # Site-level DP with secure aggregation: a round's wall time grows with the realised cohort
  # (the protocol's host cryptography is quadratic in it), which amplification by sampling
  # hides; the device work is padded to the slots, the host's cannot be.
  hide_time = site_dp and cfg.secagg.enabled
  if hide_time:
    log.info("seconds are not logged (metrics.jsonl seconds: null, summary total_seconds: "
             "null): under site-level DP with secure aggregation a round's time grows with "
             "the realised cohort, which the privacy analysis treats as hidden")
  if self.public is not None:
    log.info("curvature objective: %d public examples of optim.public_data=%s, %d per "
             "estimate (public by assumption: no epsilon covers them)", len(self.public),
             cfg.optim.public_data, min(cfg.optim.public_batch_size, len(self.public)))
  completed, result = start, None
  watch = divergence.Watch(cfg, state.params)
  scorer = canaries.Scorer(self.canaries, meta) if self.canaries is not None else None
  if scorer is not None:
    scorer.observe(state.params)
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
      before = jax.tree.map(np.array, state) if record.wants(cfg, completed + 1) else None
      state, metrics = self.step(state, self.data, self.keys["sampling"], self.keys["client"])
      if scorer is not None:  # rounds_per_step is 1 (canaries.validate)
        scorer.observe(state.params)
      if before is not None and primary:  # attack.record_sites: off by default
        record.save(self, before, completed + 1, workdir)
      losses = np.atleast_1d(np.asarray(metrics.train_loss))
      messages = np.atleast_1d(np.asarray(metrics.messages))
      overflow = np.atleast_1d(np.asarray(metrics.dp_overflow))
      nonfinite = (np.atleast_1d(np.asarray(metrics.nonfinite_updates)) if site_dp else None)
      clip_norms = np.atleast_1d(np.asarray(metrics.clip_norm)) if adaptive else None
      secure = ({k: np.atleast_1d(np.asarray(v)) for k, v in metrics.secagg.items()}
                if cfg.secagg.enabled else None)
      for i, loss in enumerate(losses):
        completed += 1
        evaluate = completed % cfg.eval.every == 0 or completed == cfg.rounds
        result = self.evaluate(state) if evaluate and i == len(losses) - 1 else None
        seconds = (time.perf_counter() - t0) / len(losses)
        # Under site DP the realised cohort size is private (who took part): log the
        # expected 2 x cohort_size messages instead.
        round_bytes = (2 * cfg.cohort_size if site_dp else int(messages[i])) * self.message_bytes
        if secure is not None:  # uploads are masked vectors + the protocol's messages
          sites = cfg.cohort_size if site_dp else int(messages[i]) // 2
          round_bytes = sites * (self.message_bytes + self.secagg_bytes_per_site)
          meta["secagg_aborted"] = meta.get("secagg_aborted", 0) + int(secure["aborted"][i])
          meta["secagg_clipped"] = meta.get("secagg_clipped", 0) + int(secure["clipped"][i])
          if secure["aborted"][i]:
            log.warning("round %d: secure aggregation aborted (too few survivors): the model "
                        "is unchanged", completed)
        watch.check(completed, float(loss), state.params)
        meta["bytes_total"] += round_bytes
        meta["seconds_total"] += seconds
        if hide_time:
          seconds = None
        logger.write({
            "round": completed, "train_loss": float(loss),
            **evaluation.fields(result, self.task),  # test_accuracy ... or test_rmse, test_r2
            "epsilon": self.epsilon(completed), "seconds": seconds,
            "bytes_communicated": round_bytes, "bytes_total": meta["bytes_total"],
            **({"dp_overflow": int(overflow[i])} if self.privacy else {}),
            **({"nonfinite_updates": int(nonfinite[i])} if site_dp else {}),
            # The norm this round's site updates were clipped to (C_t, before its update).
            **({"clip_norm": float(clip_norms[i])} if adaptive else {}),
            # What the secure sum did: sites in it, whether it aborted, coordinates clipped to
            # secagg.clip_range (never silent) and the protocol's host cryptography time.
            # Under site DP the realised cohort is private: neither the survivor count nor the
            # host time (which grows with the cohort) is logged.
            **({f"secagg_{k}": (float(v[i]) if k == "host_seconds" else int(v[i]))
                for k, v in secure.items()
                if not (site_dp and k in ("survivors", "host_seconds"))}
               if secure is not None else {})})
      if _any_process_signalled(stop["signal"] is not None) and stop["signal"] is None:
        stop["signal"] = signal.SIGTERM  # another process was: stop after the same round
      if (completed % cfg.checkpoint.every == 0 or completed == cfg.rounds or stop["signal"]
          or self._over_budget(completed + self.rounds_per_step)):
        if scorer is not None:
          scorer.save(meta)
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
      **evaluation.fields(result, self.task),
      "epsilon": self.epsilon(completed), "rounds_completed": completed,
      "total_seconds": None if hide_time else meta["seconds_total"],
      "bytes_total": meta["bytes_total"],
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
        "mechanism": self.privacy.mechanism_name,
        "guarantees": mechanism.guarantee_entries(
            self.privacy, cfg, completed * self.privacy.steps_per_round),
        "released_without_dp": _released_without_dp(self, meta)}
    if adaptive:  # how noise_multiplier was split, and the clip norm the next round would use
      summary["privacy"].update(
          update_noise_multiplier=self.privacy.update_noise_multiplier,
          count_noise_multiplier=self.privacy.count_noise_multiplier,
          final_clip_norm=float(state.aggregator_state))
    elif site_dp and cfg.secagg.enabled:  # the sites add more than the accountant composes
      summary["privacy"]["update_noise_multiplier"] = self.privacy.update_noise_multiplier
  if cfg.secagg.enabled:
    summary["secagg"] = {"aborted_rounds": meta.get("secagg_aborted", 0),
                         "clipped_values": meta.get("secagg_clipped", 0)}
  if cfg.eval.centralized_baseline:
    summary["centralized_test_accuracy"] = self.centralized_accuracy()
  # AUC, macro-F1, bootstrap intervals, per-site metrics, eval.robustness (new keys only).
  if self.task == "classification":
    summary.update(evaluation_robustness.final_metrics(self, state))
  if scorer is not None:
    summary["audit"] = canaries.report(
        self, scorer, w0,
        summary.get("privacy", {}).get("guarantees"), cfg.dp.delta, summary["epsilon"])
  if primary:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
  self.final_state = state
  return summary
