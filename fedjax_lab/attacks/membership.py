r"""Membership inference on the lab's models: LiRA (Carlini et al. 2022) with vmapped shadows.

  python -m fedjax_lab.attacks.membership --config configs/mia_outsider.py --workdir /tmp/mia
  python -m fedjax_lab.attacks.membership --config configs/mia_outsider.py \
      --config.mia.target_workdir=runs/digits_fedavg-<hash>      # attack a train.py run
  python -m fedjax_lab.attacks.membership --config configs/mia_server.py
  python -m fedjax_lab.attacks.membership --config configs/mia_site.py
  python -m fedjax_lab.attacks.membership --config configs/mia_shots.py

Shadow models are a vmapped axis. Every shadow is trained by the lab's own round
(`Experiment.round_fn`, the FedAvg / DP-FedAvg / DP-SGD-at-sites code a target run uses),
`jax.vmap`ped over (model state, the shadow's site table, its keys) and `lax.scan`ned over the
rounds: one compiled program trains all K shadows, with the model axis sharded over the devices
as a round shards its sites. A shadow is "a federation over a random half of the pool".

Scores. phi = log p_y - log sum_{y' != y} p_y' (the logit-scaled confidence), computed from the
logits z as z_y - logsumexp_{y' != y} z_y' (the softmax normaliser cancels; no log(1 - p)).
  lira_online   per example, Gaussians fitted to phi of the shadows that trained on it (in)
                and of those that did not (out); score = log N(phi; in) - log N(phi; out).
  lira_offline  only the out Gaussian; score = log P[Z <= phi], Z ~ N(mu_out, sd_out)
                (the paper's one-sided test, as a log for resolution at low FPR).
  Either with a per-example or a fixed (global) variance; the fixed one is the pooled
  within-example standard deviation (score.py of the paper pools the raw values, which also
  counts the spread of the per-example means). Centres are medians, as in score.py.
  loss          the loss-threshold baseline (Yeom et al. 2018): score = -cross-entropy.

Evaluation is leave-one-out over the trained models (the paper's protocol): each of the first
`num_targets` models is the target in turn and the other K-1 its shadows; every (target,
example) pair is one trial. TPR at a fixed FPR uses the threshold above the floor(FPR * n_out)
highest out scores (so the realised FPR is <= the nominal one) with a Clopper-Pearson interval
on the TPR (the threshold itself is fitted on the same out scores, as in the paper's curves).
"""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fedjax_lab import cli, runs
from fedjax_lab.attacks import shots
from fedjax_lab.checkpoint import read_state
from fedjax_lab.config import default_config
from fedjax_lab.errors import ConfigError
# Re-exported: this module's public names before it was split into lira.py (scores),
# mia_metrics.py and shadows.py.
from fedjax_lab.attacks.lira import (  # noqa: F401
    ATTACKS, leave_one_out, lira_offline, lira_online, logit_confidence, neg_loss)
from fedjax_lab.attacks.mia_metrics import (  # noqa: F401
    FPRS, auc, clopper_pearson, evaluate, format_table, plot_roc, roc_curve, summarize,
    tpr_at_fpr)
from fedjax_lab.attacks.shadows import (  # noqa: F401
    ShadowTrainer, model_mesh, model_scores, one_device_experiment, random_subsets,
    run_attacks, site_tables, tables_from_sites)

# audit.py's name for it, before shadows.py
_one_device_experiment = one_device_experiment


# ----------------------------------------------------------------------------- threat models


def default_mia_config():
  return ml_collections.ConfigDict(dict(
      threat="outsider",      # outsider | server | site | shots
      num_models=64,          # trained models (shadows; the first num_targets also targets)
      num_targets=16,         # leave-one-out targets
      seed=0,
      target_workdir="",      # outsider/server: attack a train.py run instead of own targets
      server_round=-1,        # server: the round whose global model the site starts from
                              #   (-1: the workdir's latest, or target.rounds trained here)
      site_pool=30,           # server: candidate examples (test split); the site holds half
      shots=(1, 2, 4, 8, 16, 32),  # shots: examples per class
      shots_seeds=3,
      shots_steps=300,        # shots: head training steps (full batch of the model's data)
      feature_fraction=0.4,   # shots: share of the data that trains the frozen extractor
      extractor="mlp",        # shots: mlp (hidden layer, 64-feature digits) | pca (any width)
      pca_dim=32,             # shots, extractor=pca: whitened principal components kept
      min_class_count=0,      # shots: drop classes with fewer examples (2S per class needed)
  ))


def config_from_workdir(workdir: str):
  """The lab config a train.py run was started with (its run.json)."""
  run = runs.read_run(workdir)
  if run is None:
    raise FileNotFoundError(f"{workdir} has no run.json: give the workdir of a train.py run")
  c = default_config()
  for key, value in run["config"].items():
    *parents, leaf = key.split(".")
    node = c
    for p in parents:
      node = node[p]
    if leaf in node:
      old = node[leaf]
      node[leaf] = tuple(value) if isinstance(old, tuple) and isinstance(value, list) else value
  return c


def outsider(config) -> dict:
  """Example membership in the released global model: each model is a FedAvg run (the target
  config) over a random half of the training split, cut into sites of the target's size."""
  mia, target_cfg = config.mia, config.target
  rng = np.random.default_rng(mia.seed)
  target = None
  if mia.target_workdir:
    target_cfg = config_from_workdir(mia.target_workdir)
  exp = one_device_experiment(target_cfg)
  train, test = exp.train, exp.test
  site_size = -(-len(train) // target_cfg.data.num_sites)
  if mia.target_workdir:  # the run trained on all of train: pool = train + test, in at 80%
    x, y = np.concatenate([train.x, test.x]), np.concatenate([train.y, test.y])
    mask = random_subsets(rng, len(y), mia.num_models, n_in=len(train))
    labels = np.arange(len(y)) < len(train)
  else:
    x, y = train.x, train.y
    mask = random_subsets(rng, len(y), mia.num_models)
    site_size = -(-(len(y) // 2) // target_cfg.data.num_sites)
  idx, count = site_tables(mask, site_size, rng)
  params, _ = ShadowTrainer(exp, target_cfg.rounds).train(x, y, idx, count,
                                                          mia.seed * 100000 + np.arange(len(mask)))
  phi, nl = model_scores(exp.model, params, x, y)
  if mia.target_workdir:
    tparams = read_state(mia.target_workdir)["params"]
    tp, tl = model_scores(exp.model, jax.tree.map(lambda a: jnp.asarray(a)[None], tparams), x, y)
    target = (tp[0], tl[0], labels)
  return run_attacks(phi, nl, mask, mia.num_targets, target)


def server(config) -> dict:
  """Example membership in one site, for a server that sees the site's update: every model is
  one local update (target.client.*) from the same global model, on a random half of a pool
  of test-split examples (which the global model never trained on)."""
  mia, target_cfg = config.mia, config.target
  rng = np.random.default_rng(mia.seed)
  if mia.target_workdir:
    target_cfg = config_from_workdir(mia.target_workdir)
    global_params = read_state(mia.target_workdir,
                               None if mia.server_round < 0 else mia.server_round)["params"]
  else:  # train the global model here
    glob = one_device_experiment(target_cfg)
    rounds = target_cfg.rounds if mia.server_round < 0 else mia.server_round
    global_params = glob.run_rounds(glob.init_state(), rounds).params
  c = target_cfg.copy_and_resolve_references()
  c.cohort_size, c.server.optimizer, c.server.lr = 1, "sgd", 1.0  # params after = site's model
  c.server.optimizer_args = {}
  exp = one_device_experiment(c)
  pool = rng.choice(len(exp.test), size=mia.site_pool, replace=False)
  x, y = exp.test.x[pool], exp.test.y[pool]
  mask = random_subsets(rng, len(y), mia.num_models)
  idx, count = site_tables(mask, int(mask.sum(1)[0]), rng)
  params, _ = ShadowTrainer(exp, 1).train(x, y, idx, count, np.arange(len(mask)),
                                          init_params=global_params)
  phi, nl = model_scores(exp.model, params, x, y)
  return run_attacks(phi, nl, mask, mia.num_targets)


def site_level(config) -> dict:
  """Site membership (was this site's data used at all?): every model is a FedAvg run over a
  random half of the target config's sites; a site's score is the mean of its examples' phi,
  and LiRA runs on those site scores."""
  mia, target_cfg = config.mia, config.target
  rng = np.random.default_rng(mia.seed)
  exp = one_device_experiment(target_cfg)
  x, y = exp.train.x, exp.train.y
  sites = [np.asarray(s) for s in exp.sites]
  site_mask = random_subsets(rng, len(sites), mia.num_models)
  idx, count = tables_from_sites(site_mask, sites)
  params, _ = ShadowTrainer(exp, target_cfg.rounds).train(x, y, idx, count,
                                                          np.arange(len(site_mask)))
  phi, nl = model_scores(exp.model, params, x, y)
  site_phi = np.stack([phi[:, s].mean(1) for s in sites], 1)
  site_nl = np.stack([nl[:, s].mean(1) for s in sites], 1)
  return run_attacks(site_phi, site_nl, site_mask, mia.num_targets)


THREATS = {"outsider": outsider, "server": server, "site": site_level}


def default_workdir(config_path: str, threat: str) -> str:
  """runs/mia_<config file>, with the threat appended unless the name already says it:
  configs/mia_outsider.py -> runs/mia_outsider, configs/x.py (server) -> runs/mia_x_server."""
  name = os.path.splitext(os.path.basename(config_path))[0]
  name = name if name.startswith("mia_") else "mia_" + name
  parts = name.split("_")
  return os.path.join("runs", name if threat in parts else f"{name}_{threat}")


def main(argv):
  del argv
  cli.quiet_logs()
  config, path = cli.load_config(_CONFIG)
  if config.mia.threat not in (*THREATS, "shots"):
    cli.fail(f"mia.threat: unknown '{config.mia.threat}'; allowed: "
             f"{', '.join(THREATS)}, shots")
  cli.validate_target(config)
  workdir = cli.make_workdir(_WORKDIR.value or default_workdir(path, config.mia.threat))
  try:
    if config.mia.threat == "shots":
      summary = shots.study(config, workdir)
      print(shots.format_table(summary))
      return
    results = THREATS[config.mia.threat](config)
  except ConfigError as e:  # e.g. the target's data file
    cli.fail(str(e))
  summary = summarize(results)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(summary, f, indent=1)
  plot_roc(results, os.path.join(workdir, "roc.png"), f"threat: {config.mia.threat}")
  print(format_table(summary))
  print(f"wrote {workdir}/results.json and roc.png")


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  _CONFIG = cli.define_config_flag(os.path.join(cli.CONFIGS, "mia_outsider.py"))
  _WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (default runs/mia_<config>[_<threat>]).")
  app.run(main, flags_parser=cli.parse_flags)
