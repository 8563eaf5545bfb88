r"""Trains a DPD-fVAE (or a fully synchronised federated VAE) from its own config file.

  python -m fedjax_lab.generative.train --config configs/dpd_fvae.py --workdir runs/vae

Writes WORKDIR/run.json (the lab's fingerprint of the config), model.json (what sample.py
needs to rebuild the decoder), metrics.jsonl, summary.json and checkpoints/ (orbax, via
fedjax_lab.checkpoint.Checkpointer): the server's decoder (and encoder under sync=all) and
optimizer state AND every site's encoder and encoder optimizer state, which stay at the site
in a real deployment and are checkpointed here so that a run resumes exactly. Running the
same command again resumes from the last checkpoint.

Randomness as in the lab (fedjax_lab/run_loop.py): under dp.randomness=secret (resolved by
privacy/vae.py; `auto` is secret for the user's own data) the DP mechanism's randomness
comes from experiment.draw_secret(), OS entropy written ONLY in the checkpoint meta
("dp_secret") and restored on resume, so a resumed run continues with the same noise; a
checkpoint of the other mode is refused. The initialisation stays seeded.

Exit codes: 2 and one line `config error: KEY: PROBLEM` for a bad config (fedjax_lab.cli.fail);
3 and one line `privacy error: ...` when a Poisson sample overflows its slots (privacy/vae.py
SlotOverflow: the plan gave it probability <= overflow_bound, so the plan is wrong), before
that round is logged or checkpointed.
"""

import json
import logging
import math
import os
import sys
import time

from absl import app, flags
import jax
import numpy as np

# No setup_cpu_devices here: the VAE's round does not shard its sites over devices, so it
# runs on JAX's default device (its intra-op threads).
from fedjax_lab import checkpoint, cli, experiment, runs
from fedjax_lab.config_dp import ACCOUNTANTS
from fedjax_lab.data import federated as federated_data
from fedjax_lab.data import partition, sources
from fedjax_lab.errors import ConfigError
from fedjax_lab.errors import one_of as _one_of
from fedjax_lab.errors import positive as _positive
from fedjax_lab.generative import evaluate, federated, models
from fedjax_lab.privacy import mechanism, vae as vae_privacy

# configs/dpd_fvae.py[:decoder|all|pbmc]; a bad key, value or file: one line, exit 2.
_CONFIG = cli.define_config_flag(os.path.join(cli.CONFIGS, "dpd_fvae.py"))
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (required).")

log = logging.getLogger("fedjax_lab.generative")


def validate(config) -> None:
  """The checks train.py's validate makes for the lab's config, for this file's own keys:
  a ConfigError naming the key, before a workdir or data exists."""
  if config.seed is None or config.seed < 0 or int(config.seed) != config.seed:
    raise ConfigError("seed", f"must be an integer >= 0, got {config.seed}")
  for key in ("rounds", "data.num_sites", "generative.latent_dim", "client.local_steps",
              "client.batch_size", "eval.every", "eval.num_synthetic", "eval.trials",
              "eval.classifier_steps", "eval.batch_size", "checkpoint.every",
              "checkpoint.keep"):
    value = config
    for part in key.split("."):
      value = value[part]
    _positive(key, value, integer=True)
  if config.data.partition == "dirichlet":
    _positive("data.alpha", config.data.alpha)
  _one_of("generative.sync", config.generative.sync, federated.SYNCS)
  _one_of("generative.model", config.generative.model, models.KINDS)
  _one_of("generative.likelihood", config.generative.likelihood, models.LIKELIHOODS)
  if config.generative.beta < 0:
    raise ConfigError("generative.beta", f"must be >= 0, got {config.generative.beta}")
  _one_of("client.optimizer", config.client.optimizer, ("adam", "sgd"))
  _positive("client.lr", config.client.lr)
  if not 0 < config.client.participation <= 1:
    raise ConfigError("client.participation", f"must be in (0, 1], got "
                      f"{config.client.participation}")
  _positive("server.lr", config.server.lr)
  if not 0 <= config.server.momentum < 1:
    raise ConfigError("server.momentum", f"must be in [0, 1), got {config.server.momentum}")
  dp = config.dp
  mechanism.check_vae_mechanism(dp)
  _one_of("dp.level", dp.level, vae_privacy.LEVELS)
  _one_of("dp.encoder", dp.encoder, vae_privacy.ENCODER_MODES)
  _one_of("dp.randomness", dp.randomness, vae_privacy.RANDOMNESS)
  _one_of("dp.accountant", dp.accountant, ACCOUNTANTS)
  if not 0 < dp.delta < 1:
    raise ConfigError("dp.delta", f"must be in (0, 1), got {dp.delta}")
  _positive("dp.clip_norm", dp.clip_norm)
  for key in ("target_epsilon", "noise_multiplier"):
    if dp[key] < 0:
      raise ConfigError(f"dp.{key}", f"must be >= 0, got {dp[key]}")
  if dp.level != "none" and dp.target_epsilon == 0 and dp.noise_multiplier == 0:
    raise ConfigError("dp.noise_multiplier", f"must be > 0 with dp.level={dp.level}, or set "
                      "dp.target_epsilon to calibrate it")


def load_data(config):
  """(FederatedData, train Dataset, test Dataset)."""
  train, test = sources.load_dataset(config.data)
  sites = partition.partition(train, config.data, config.seed)
  data = federated_data.from_partition(train.x, train.y, sites, train.num_classes)
  return data, train, test


def param_count(tree) -> int:
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


def run(config, workdir: str, verbose: bool = True) -> dict:
  """Trains (or resumes) in workdir; returns the summary dict (also in summary.json)."""
  validate(config)
  os.makedirs(workdir, exist_ok=True)
  runs.check_resume(workdir, config)
  data, train, test = load_data(config)
  counts = np.asarray(data.count)
  plan = federated.make_plan(config, counts)
  vae = models.CVAE(config.generative, train.num_classes, train.x.shape[1:])
  fed = federated.FederatedVAE(vae, config, plan)
  state = fed.init(config.seed, data.num_sites)
  runs.write_run(workdir, config)
  with open(os.path.join(workdir, "model.json"), "w") as f:
    json.dump({"generative": json.loads(config.generative.to_json()),
               "num_classes": int(train.num_classes), "input_shape": list(train.x.shape[1:]),
               "class_names": list(train.class_names), "data": config.data.name}, f, indent=1)

  # Under dp.randomness=secret a fresh secret per run; a resume keeps the checkpoint's.
  secret = experiment.draw_secret() if plan is not None and plan.randomness == "secret" \
      else None
  ckpt = checkpoint.Checkpointer(workdir, keep=config.checkpoint.keep)
  start, meta = 0, {"seconds": 0.0}
  if secret is not None:  # the checkpoint is the one place the secret is written
    meta["dp_secret"] = secret
  latest = ckpt.latest_round()
  if latest is not None:
    state, meta = ckpt.restore(latest, state)
    start = latest
    if (secret is None) != (meta.get("dp_secret") is None):
      ckpt.close()
      raise ConfigError("dp.randomness", f"the checkpoint in {workdir} was trained with "
                        f"{'seeded' if secret is not None else 'secret'} DP randomness; "
                        "use the same dp.randomness or a new workdir")
    secret = meta.get("dp_secret")
  keys = federated.round_keys(config.seed, secret)
  step = jax.jit(fed.round)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  if start == 0 and os.path.exists(metrics_path):
    os.remove(metrics_path)
  seconds = float(meta["seconds"])
  for r in range(start, config.rounds):
    t0 = time.perf_counter()
    state, m = step(state, data, keys)
    m = jax.tree.map(float, m._asdict())
    seconds += time.perf_counter() - t0
    done = r + 1
    if m["overflow"] > 0:  # outside the plan's (epsilon, delta): nothing of it is saved
      ckpt.close()
      raise vae_privacy.SlotOverflow(plan, done, int(m["overflow"]))
    if done % config.eval.every == 0 or done == config.rounds:
      eps = plan.epsilon_after(done * plan.steps_per_round) if plan else None
      row = {"round": done, **m, "epsilon": eps, "seconds": seconds}
      with open(metrics_path, "a") as f:
        f.write(json.dumps(row) + "\n")
      if verbose:
        print(f"round {done}: loss {m['loss']:.3f} rec {m['reconstruction']:.3f} "
              f"kl {m['kl']:.3f}" + (f" epsilon {eps:.3f}" if eps is not None else ""),
              file=sys.stderr)
    if done % config.checkpoint.every == 0 or done == config.rounds:
      ckpt.save(done, state, {"seconds": seconds,
                              **({"dp_secret": secret} if secret is not None else {})})
  ckpt.close()

  summary = {"rounds_completed": config.rounds, "total_seconds": seconds,
             "sync": config.generative.sync,
             "released_params": param_count(state["server"]["params"]),
             "decoder_params": param_count(state["server"]["params"]["decoder"]),
             "site_params": param_count(jax.tree.map(lambda x: x[0], state["sites"].get(
                 "encoder", {}))),
             "epsilon": None, "privacy": None}
  if plan is not None:
    eps = plan.epsilon_after(plan.steps)
    dp_steps = np.asarray(state["sites"]["dp_steps"])
    summary["epsilon"] = eps
    summary["privacy"] = {
        "level": plan.level, "noise_multiplier": plan.noise_multiplier,
        "clip_norm": plan.clip_norm, "sampling_prob": plan.sampling_prob,
        "steps": plan.steps, "site_dp_steps_max": int(dp_steps.max()),
        "accountant": plan.accountant, "accountant_delta": plan.accountant_delta,
        "delta": plan.delta, "slots": plan.slots, "overflow_bound": plan.overflow_bound,
        "encoder": plan.encoder, "sound": plan.sound, "randomness": plan.randomness,
        "guarantee": plan.guarantee(eps),
        "guarantees": mechanism.vae_guarantee_entries(plan, plan.steps)}
  if config.eval.at_end:
    summary["eval"] = evaluate.evaluate(vae, fed.decoder(state), train, test, config.eval,
                                        config.seed)
  summary["lab_commit"] = runs.lab_commit()
  summary["config"] = json.loads(config.to_json())
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  return summary


def main(argv):
  del argv
  cli.quiet_logs()
  if not _WORKDIR.value:
    cli.fail("--workdir: required")
  config, _ = cli.load_config(_CONFIG)
  try:
    validate(config)
    cli.make_workdir(_WORKDIR.value)
    summary = run(config, _WORKDIR.value)
  except (ConfigError, ValueError) as e:
    cli.fail(str(e))
  except vae_privacy.SlotOverflow as e:  # one line, like a config error, but not the user's to fix
    print(f"privacy error: {e}", file=sys.stderr)
    sys.exit(3)
  line = f"rounds={summary['rounds_completed']} sync={summary['sync']}"
  if summary["epsilon"] is not None:
    line += (f" epsilon={summary['epsilon']:.3f} delta={summary['privacy']['delta']:g}"
             f" randomness={summary['privacy']['randomness']}")
    if not summary["privacy"]["sound"]:
      line += " (NOT a proven bound: dp.encoder=paper)"
  else:
    line += " epsilon=none"
  if "eval" in summary:
    e = summary["eval"]
    line += (f" synth_to_real_accuracy={e['accuracy_mean']:.4f}+-{e['accuracy_std']:.4f}"
             f" frechet={e['frechet']:.3f}")
  print(f"{line} workdir={_WORKDIR.value}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
