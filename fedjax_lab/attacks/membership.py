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
import math
import os
import warnings
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from fedjax_lab import sharding
from fedjax_lab.data.federated import FederatedData

FPRS = (1e-3, 1e-2)

# ----------------------------------------------------------------------------- scores


def logit_confidence(logits, labels):
  """phi [..., N] = z_y - logsumexp_{y' != y} z_{y'} from logits [..., N, C], labels [N]."""
  z = jnp.asarray(logits, jnp.float32)
  labels = jnp.asarray(labels)
  if z.ndim < 2 or z.shape[-1] < 2:
    raise ValueError(f"logits must be [..., N, C] with C >= 2 classes, got shape {z.shape}")
  if labels.shape != z.shape[-2:-1]:
    raise ValueError(f"labels must be [{z.shape[-2]}], got shape {labels.shape}")
  return _logit_confidence(z, labels)


@jax.jit
def _logit_confidence(z, labels):  # one compiled program, not a dispatch per op
  onehot = jax.nn.one_hot(labels, z.shape[-1], dtype=bool)
  z_y = jnp.sum(jnp.where(onehot, z, 0.0), axis=-1)
  return z_y - jax.nn.logsumexp(jnp.where(onehot, -jnp.inf, z), axis=-1)


def neg_loss(logits, labels):
  """-cross-entropy = log p_y, [..., N] (the loss attack's score: higher means member)."""
  z = jnp.asarray(logits, jnp.float32)
  onehot = jax.nn.one_hot(labels, z.shape[-1], dtype=bool)
  return jnp.sum(jnp.where(onehot, z, 0.0), axis=-1) - jax.nn.logsumexp(z, axis=-1)


def _check_shadows(target, shadow, mask):
  target, shadow, mask = np.asarray(target, np.float64), np.asarray(shadow, np.float64), \
      np.asarray(mask, bool)
  if shadow.ndim != 2 or mask.shape != shadow.shape or target.shape != shadow.shape[1:]:
    raise ValueError(f"need target [N], shadow scores [K, N] and in-mask [K, N]; got "
                     f"{target.shape}, {shadow.shape}, {mask.shape}")
  return target, shadow, mask


def _fit(shadow, member, fixed_variance):
  """Per-example median and sd of shadow[member]; sd pooled over examples if fixed_variance.
  Examples with fewer than 2 such shadows get the pooled sd (and NaN centre if none)."""
  vals = np.where(member, shadow, np.nan)
  count = member.sum(0)
  with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    centre = np.nanmedian(vals, axis=0)
    resid = vals - np.nanmean(vals, axis=0)
    pooled = math.sqrt(np.nansum(resid ** 2) / max(int(np.sum(count)) - int(np.sum(count > 0)), 1))
    sd = np.full(centre.shape, pooled) if fixed_variance else np.nanstd(vals, axis=0, ddof=1)
  sd = np.where((count < 2) | ~np.isfinite(sd), pooled, sd)
  return centre, np.maximum(sd, 1e-6)


def lira_online(target, shadow, shadow_in, fixed_variance: bool = False):
  """[N] scores log N(target; mu_in, sd_in) - log N(target; mu_out, sd_out)."""
  target, shadow, shadow_in = _check_shadows(target, shadow, shadow_in)
  mu_in, sd_in = _fit(shadow, shadow_in, fixed_variance)
  mu_out, sd_out = _fit(shadow, ~shadow_in, fixed_variance)
  score = stats.norm.logpdf(target, mu_in, sd_in) - stats.norm.logpdf(target, mu_out, sd_out)
  return np.nan_to_num(score, nan=0.0)


def lira_offline(target, shadow, shadow_in, fixed_variance: bool = False):
  """[N] scores log P[Z <= target], Z ~ N(mu_out, sd_out): only models that did not train on
  the example are needed (shadow_in marks the ones to leave out)."""
  target, shadow, shadow_in = _check_shadows(target, shadow, shadow_in)
  mu_out, sd_out = _fit(shadow, ~shadow_in, fixed_variance)
  return np.nan_to_num(stats.norm.logcdf((target - mu_out) / sd_out), nan=0.0)


ATTACKS: dict[str, Callable] = {
    "lira_online": lambda t, s, m: lira_online(t, s, m, False),
    "lira_online_fixed_var": lambda t, s, m: lira_online(t, s, m, True),
    "lira_offline": lambda t, s, m: lira_offline(t, s, m, False),
    "lira_offline_fixed_var": lambda t, s, m: lira_offline(t, s, m, True),
}


def leave_one_out(phi, in_mask, attack: Callable, num_targets: int | None = None):
  """Each of the first num_targets models as the target, the others as shadows.
  phi, in_mask [K, N] -> (scores [T, N], labels [T, N] bool)."""
  phi, in_mask = np.asarray(phi, np.float64), np.asarray(in_mask, bool)
  k = phi.shape[0]
  t = k if num_targets is None else min(num_targets, k)
  if k < 3:
    raise ValueError(f"leave-one-out needs >= 3 models, got {k}")
  scores = np.stack([attack(phi[i], np.delete(phi, i, 0), np.delete(in_mask, i, 0))
                     for i in range(t)])
  return scores, in_mask[:t]


# ----------------------------------------------------------------------------- metrics


def roc_curve(scores, labels):
  """(fpr, tpr) at every distinct threshold, from (0, 0) to (1, 1); member iff score >= thr."""
  scores, labels = np.ravel(np.asarray(scores, np.float64)), np.ravel(np.asarray(labels, bool))
  if scores.shape != labels.shape:
    raise ValueError(f"scores and labels differ in size: {scores.size} vs {labels.size}")
  n_in, n_out = int(labels.sum()), int((~labels).sum())
  if n_in == 0 or n_out == 0:
    raise ValueError(f"need members and non-members, got {n_in} and {n_out}")
  order = np.argsort(-scores, kind="stable")
  s, l = scores[order], labels[order]
  last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]  # end of each tie group
  tp, fp = np.cumsum(l)[last], np.cumsum(~l)[last]
  return np.r_[0.0, fp / n_out], np.r_[0.0, tp / n_in]


def auc(scores, labels) -> float:
  fpr, tpr = roc_curve(scores, labels)
  return float(np.trapezoid(tpr, fpr))


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
  a = 1 - confidence
  lo = stats.beta.ppf(a / 2, k, n - k + 1) if k > 0 else 0.0
  hi = stats.beta.ppf(1 - a / 2, k + 1, n - k) if k < n else 1.0
  return float(lo), float(hi)


def tpr_at_fpr(scores, labels, fpr: float, confidence: float = 0.95) -> dict:
  """TPR at the threshold above the floor(fpr n_out) highest non-member scores, with its
  Clopper-Pearson interval; also the realised FPR and the counts."""
  scores, labels = np.ravel(np.asarray(scores, np.float64)), np.ravel(np.asarray(labels, bool))
  if not 0 < fpr < 1:
    raise ValueError(f"fpr must be in (0, 1), got {fpr}")
  s_in, s_out = scores[labels], np.sort(scores[~labels])[::-1]
  k = int(math.floor(fpr * len(s_out)))
  thr = s_out[k] if k < len(s_out) else -np.inf
  tp, fp = int(np.sum(s_in > thr)), int(np.sum(s_out > thr))
  lo, hi = clopper_pearson(tp, len(s_in), confidence)
  return {"tpr": tp / len(s_in), "tpr_lo": lo, "tpr_hi": hi, "fpr": fp / len(s_out),
          "n_in": len(s_in), "n_out": len(s_out)}


def evaluate(scores, labels, fprs=FPRS) -> dict:
  out = {"auc": auc(scores, labels)}
  for f in fprs:
    out[f"at_fpr_{f:g}"] = tpr_at_fpr(scores, labels, f)
  return out


def plot_roc(curves: dict, path: str, title: str = "") -> str:
  """Log-log ROC curves {name: (scores, labels)} to `path` (png)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(4.5, 4.5))
  lo = 1.0
  for name, (scores, labels) in curves.items():
    fpr, tpr = roc_curve(scores, labels)
    lo = min(lo, 1.0 / max(1, int((~np.asarray(labels, bool)).sum())))
    ax.plot(fpr, tpr, label=f"{name} (AUC {auc(scores, labels):.3f})")
  ax.plot([lo, 1], [lo, 1], "k--", lw=0.8, label="chance")
  ax.set(xscale="log", yscale="log", xlim=(lo, 1), ylim=(lo, 1), xlabel="FPR", ylabel="TPR",
         title=title)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


# ----------------------------------------------------------------------------- shadows


def random_subsets(rng: np.random.Generator, n_pool: int, num_models: int,
                   n_in: int | None = None, strata=None) -> np.ndarray:
  """[num_models, n_pool] bool: each row marks a uniformly random subset of n_in (default
  half the pool); with `strata` (e.g. labels) half of every stratum instead."""
  if strata is not None:
    strata = np.asarray(strata)
    mask = np.zeros((num_models, n_pool), bool)
    for v in np.unique(strata):
      idx = np.flatnonzero(strata == v)
      mask[:, idx] = random_subsets(rng, len(idx), num_models)
    return mask
  n_in = n_pool // 2 if n_in is None else n_in
  if not 0 < n_in < n_pool:
    raise ValueError(f"n_in must be in (0, {n_pool}), got {n_in}")
  keys = rng.random((num_models, n_pool))
  return keys < np.sort(keys, axis=1)[:, n_in:n_in + 1]


def site_tables(mask: np.ndarray, site_size: int, rng: np.random.Generator,
                pool_rows: np.ndarray | None = None):
  """Every model's included pool examples in random order, cut into sites of `site_size`.
  mask [K, N] (same count per row) -> (idx [K, S, site_size] int32 rows, count [K, S])."""
  rows = np.arange(mask.shape[1]) if pool_rows is None else np.asarray(pool_rows)
  counts = mask.sum(1)
  if np.any(counts != counts[0]):
    raise ValueError("every model must include the same number of examples")
  n = int(counts[0])
  s = -(-n // site_size)
  idx = np.zeros((mask.shape[0], s, site_size), np.int32)
  count = np.zeros((mask.shape[0], s), np.int32)
  for k in range(mask.shape[0]):
    chosen = rng.permutation(rows[mask[k]])
    for j in range(s):
      part = chosen[j * site_size:(j + 1) * site_size]
      idx[k, j, :len(part)], count[k, j] = part, len(part)
  return idx, count


def tables_from_sites(site_mask: np.ndarray, sites: list) -> tuple[np.ndarray, np.ndarray]:
  """Site-level membership: model k trains on the sites site_mask[k] marks (same count per
  row); sites[j] is the rows of pool site j. -> (idx [K, S, n_max], count [K, S])."""
  n_max = max(len(s) for s in sites)
  chosen = [np.flatnonzero(m) for m in site_mask]
  idx = np.zeros((len(chosen), len(chosen[0]), n_max), np.int32)
  count = np.zeros(idx.shape[:2], np.int32)
  for k, c in enumerate(chosen):
    for j, site in enumerate(c):
      idx[k, j, :len(sites[site])], count[k, j] = sites[site], len(sites[site])
  return idx, count


def model_mesh(num_models: int):
  """A 1-D mesh over the most devices (<= all) that divide num_models."""
  devices = jax.devices()
  n = max(d for d in range(1, len(devices) + 1) if num_models % d == 0)
  return sharding.make_mesh(devices[:n])


class ShadowTrainer:
  """Trains K models with the lab's round: `train(idx, count, seeds)` -> params stacked [K, ...].

  `experiment` supplies round_fn, model and the algorithm's state; build it with a one-device
  mesh (`sharding.make_mesh(jax.devices()[:1])`) so the round's own site sharding stays out
  of the way and the model axis is what gets sharded. Compiled once per (shapes, rounds).
  """

  def __init__(self, experiment, rounds: int):
    if experiment.model.has_state:
      raise ValueError("models with BatchNorm statistics are not supported by the attack; "
                       "use model.norm=none or group")
    self.exp, self.rounds = experiment, rounds
    num_classes = experiment.data.num_classes

    def run(state, idx, count, sampling_key, client_key, x, y):
      data = FederatedData(x=x, y=y, idx=idx, count=count, num_classes=num_classes)

      def body(s, _):
        s, metrics = experiment.round_fn(s, data, sampling_key, client_key)
        return s, metrics.train_loss

      state, losses = jax.lax.scan(body, state, None, length=rounds)
      return state.params, losses

    self._one = jax.jit(run)
    self._many = jax.jit(jax.vmap(run, in_axes=(0, 0, 0, 0, 0, None, None)))

  def init_states(self, seeds, init_params=None):
    exp = self.exp
    if init_params is None:
      def init(seed):
        params, ms = exp.model.init(jax.random.key(seed), exp.train.x[:2])
        return exp.algorithm.init(params, ms)
      return jax.vmap(init)(jnp.asarray(seeds))
    state = exp.algorithm.init(jax.tree.map(jnp.asarray, init_params), {})
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (len(seeds), *jnp.shape(a))), state)

  @staticmethod
  def keys(seeds):
    seeds = jnp.asarray(seeds)
    root = jax.vmap(lambda s: jax.random.fold_in(jax.random.key(0x5AD0), s))(seeds)
    return (jax.vmap(lambda k: jax.random.fold_in(k, 1))(root),
            jax.vmap(lambda k: jax.random.fold_in(k, 2))(root))

  def train(self, x, y, idx, count, seeds, init_params=None, vmapped: bool = True, mesh=None):
    """x [N, ...], y [N] the pool; idx [K, S, n], count [K, S] each model's sites; seeds [K]
    the models' init and training randomness (init_params: one start shared by all)."""
    seeds = np.asarray(seeds)
    if idx.shape[0] != len(seeds) or count.shape != idx.shape[:2]:
      raise ValueError(f"idx [K, S, n], count [K, S] and seeds [K] disagree: {idx.shape}, "
                       f"{count.shape}, {seeds.shape}")
    states = self.init_states(seeds, init_params)
    ks, kc = self.keys(seeds)
    x, y = np.asarray(x, np.float32), np.asarray(y, np.int32)
    if not vmapped:
      one_dev = jax.devices()[0]
      out = [self._one(*jax.device_put((jax.tree.map(lambda a: a[k], states), idx[k], count[k],
                                        ks[k], kc[k], x, y), one_dev)) for k in range(len(seeds))]
      return jax.tree.map(lambda *a: jnp.stack(a), *[o[0] for o in out]), \
          jnp.stack([o[1] for o in out])
    mesh = mesh or model_mesh(len(seeds))
    per_model = sharding.put_sites((states, jnp.asarray(idx), jnp.asarray(count), ks, kc), mesh)
    shared = sharding.put_replicated((jnp.asarray(x), jnp.asarray(y)), mesh)
    return self._many(*per_model, *shared)


def model_scores(model, params, x, y, batch_models: int = 64):
  """(phi, -loss), each [K, N], of stacked params [K, ...] on x [N, ...], y [N]."""
  @jax.jit
  def f(p, x, y):
    logits = jax.vmap(lambda q: model.apply(q, {}, x, False)[0])(p)
    return logit_confidence(logits, y), neg_loss(logits, y)
  k = jax.tree.leaves(params)[0].shape[0]
  parts = [f(jax.tree.map(lambda a: a[i:i + batch_models], params), x, y)
           for i in range(0, k, batch_models)]
  return (np.concatenate([np.asarray(p[0]) for p in parts]),
          np.concatenate([np.asarray(p[1]) for p in parts]))


def run_attacks(phi, neg_losses, in_mask, num_targets=None, target=None):
  """All attacks. Leave-one-out over the models, or with `target` = (phi [N], neg_loss [N],
  labels [N]) an external target attacked with every model as a shadow.
  -> {attack: (scores, labels)}."""
  out = {}
  for name, attack in ATTACKS.items():
    if target is None:
      out[name] = leave_one_out(phi, in_mask, attack, num_targets)
    else:
      out[name] = (attack(target[0], phi, in_mask), np.asarray(target[2], bool))
  if target is None:
    t = phi.shape[0] if num_targets is None else min(num_targets, phi.shape[0])
    out["loss"] = (np.asarray(neg_losses)[:t], np.asarray(in_mask, bool)[:t])
  else:
    out["loss"] = (np.asarray(target[1]), np.asarray(target[2], bool))
  return out


def summarize(results: dict) -> dict:
  return {name: evaluate(s, l) for name, (s, l) in results.items()}


def format_table(summary: dict) -> str:
  lines = ["attack                   AUC    TPR@0.1%FPR [95% CI]      TPR@1%FPR [95% CI]"]
  for name, r in summary.items():
    a, b = r["at_fpr_0.001"], r["at_fpr_0.01"]
    lines.append(f"{name:<22} {r['auc']:.3f}  {a['tpr']:.4f} [{a['tpr_lo']:.4f}, "
                 f"{a['tpr_hi']:.4f}]  {b['tpr']:.4f} [{b['tpr_lo']:.4f}, {b['tpr_hi']:.4f}]")
  first = next(iter(summary.values()))["at_fpr_0.001"]
  lines.append(f"(n_in={first['n_in']}, n_out={first['n_out']} trials)")
  return "\n".join(lines)


# ----------------------------------------------------------------------------- threat models


def default_mia_config():
  import ml_collections  # pylint: disable=g-import-not-at-top
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


def _one_device_experiment(config):
  from fedjax_lab.experiment import Experiment  # pylint: disable=g-import-not-at-top
  return Experiment(config, mesh=sharding.make_mesh(jax.devices()[:1]))


def config_from_workdir(workdir: str):
  """The lab config a train.py run was started with (its run.json)."""
  from fedjax_lab import runs  # pylint: disable=g-import-not-at-top
  from fedjax_lab.config import default_config  # pylint: disable=g-import-not-at-top
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
    from fedjax_lab.checkpoint import read_state  # pylint: disable=g-import-not-at-top
    target_cfg = config_from_workdir(mia.target_workdir)
  exp = _one_device_experiment(target_cfg)
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
    from fedjax_lab.checkpoint import read_state  # pylint: disable=g-import-not-at-top
    target_cfg = config_from_workdir(mia.target_workdir)
    global_params = read_state(mia.target_workdir,
                               None if mia.server_round < 0 else mia.server_round)["params"]
  else:  # train the global model here
    glob = _one_device_experiment(target_cfg)
    rounds = target_cfg.rounds if mia.server_round < 0 else mia.server_round
    global_params = glob.run_rounds(glob.init_state(), rounds).params
  c = target_cfg.copy_and_resolve_references()
  c.cohort_size, c.server.optimizer, c.server.lr = 1, "sgd", 1.0  # params after = site's model
  c.server.optimizer_args = {}
  exp = _one_device_experiment(c)
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
  exp = _one_device_experiment(target_cfg)
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
  from fedjax_lab import cli  # pylint: disable=g-import-not-at-top
  from fedjax_lab import config as config_lib  # pylint: disable=g-import-not-at-top
  from fedjax_lab.errors import ConfigError  # pylint: disable=g-import-not-at-top
  cli.quiet_logs()
  config, path = cli.load_config(_CONFIG)
  if config.mia.threat not in (*THREATS, "shots"):
    cli.fail(f"mia.threat: unknown '{config.mia.threat}'; allowed: "
             f"{', '.join(THREATS)}, shots")
  try:
    config_lib.validate(config.target)
  except ConfigError as e:
    cli.fail(f"target.{e}")
  workdir = cli.make_workdir(_WORKDIR.value or default_workdir(path, config.mia.threat))
  try:
    if config.mia.threat == "shots":
      from fedjax_lab.attacks import shots  # pylint: disable=g-import-not-at-top
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
  from fedjax_lab import cli  # pylint: disable=g-import-not-at-top
  _CONFIG = cli.define_config_flag(os.path.join(cli.ROOT, "configs", "mia_outsider.py"))
  _WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (default runs/mia_<config>[_<threat>]).")
  app.run(main, flags_parser=cli.parse_flags)
