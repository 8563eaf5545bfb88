"""The shots study (Tobaben et al., arXiv 2402.06674): LiRA's TPR at low FPR against the number
of examples per class S, log(TPR - FPR) = -beta_S log S - beta_0 (theory: beta_S = 1/2).

A frozen feature extractor stands in for the paper's pretrained backbone, fitted on a public
share of the data (mia.feature_fraction), never on the pool the attacked heads see:
mia.extractor="mlp" is the hidden layer of an MLP trained by the lab's round (digits);
"pca" the top mia.pca_dim principal components, whitened (any input width: pbmc68k's 765
genes). Classes with fewer than mia.min_class_count examples in all are dropped first (the
offline pool needs 2S per class). Each head is a linear model (the lab's "linear" model,
trained by Experiment.round_fn: one site, full-batch SGD for mia.shots_steps steps) on S
examples per class; for each S and seed, K heads each train on a class-stratified random half
of a pool of 2S per class, and LiRA (online, fixed variance) runs leave-one-out.
"""

import json
import os
import tempfile

import jax
import numpy as np
from scipy import stats

from fedjax_lab.attacks import lira, mia_metrics, shadows
from fedjax_lab.config import default_config
from fedjax_lab.data import sources


def _pca_extractor(train, dim: int):
  """Whitened projection on the top `dim` principal components of train.x."""
  x = train.x.reshape(len(train.x), -1).astype(np.float64)
  mean = x.mean(0)
  _, sv, vt = np.linalg.svd(x - mean, full_matrices=False)
  dim = min(dim, len(sv))
  w = vt[:dim].T / (sv[:dim] / np.sqrt(max(len(x) - 1, 1)))
  return lambda z: ((z.reshape(len(z), -1) - mean) @ w).astype(np.float32)


def _extractor(train, hidden: int, seed: int):
  c = default_config()
  c.data.name, c.data.num_sites, c.cohort_size, c.rounds = "digits", 1, 1, 1
  c.model.name, c.model.hidden = "mlp", (hidden,)
  c.client.optimizer, c.client.lr, c.client.local_steps, c.client.batch_size = "sgd", 0.3, 500, 32
  c.server.optimizer, c.server.lr, c.log.progress = "sgd", 1.0, False
  exp = shadows.one_device_experiment(c)  # pylint: disable=protected-access
  idx = np.arange(len(train.y), dtype=np.int32)[None, None]
  params, _ = shadows.ShadowTrainer(exp, 1).train(train.x, train.y, idx,
                                              np.array([[len(train.y)]], np.int32), [seed])
  w, b = (np.asarray(a[0]) for a in jax.tree.leaves(params)[1::-1])  # kernel, bias
  return lambda x: np.maximum(x.reshape(len(x), -1) @ w + b, 0.0).astype(np.float32)


def _head_experiment(features, labels, num_classes, steps, batch):
  c = default_config()
  path = os.path.join(tempfile.mkdtemp(), "features.npz")
  np.savez(path, x=features, y=labels, x_test=features[:num_classes], y_test=labels[:num_classes],
           class_names=np.array([str(i) for i in range(num_classes)]))
  c.data.name, c.data.path, c.data.standardize = "file", path, "none"
  c.data.num_sites, c.cohort_size, c.rounds = 1, 1, 1
  c.model.name = "linear"
  c.client.optimizer, c.client.lr, c.client.local_steps = "sgd", 0.5, steps
  c.client.batch_size, c.client.shuffle = batch, False
  c.server.optimizer, c.server.lr, c.log.progress = "sgd", 1.0, False
  return shadows.one_device_experiment(c)  # pylint: disable=protected-access


def grad_norms(params, features, labels):
  """[K, N] per-example gradient norm of the cross-entropy wrt a linear head (W, b):
  ||p - onehot|| * sqrt(||f||^2 + 1), exact for logits = f W + b."""
  b, w = (np.asarray(a) for a in jax.tree.leaves(params))
  logits = np.einsum("nd,kdc->knc", features, w) + b[:, None]
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  p[:, np.arange(len(labels)), labels] -= 1
  return np.linalg.norm(p, axis=-1) * np.sqrt((features ** 2).sum(-1) + 1)[None]


def study(config, workdir: str) -> dict:
  m = config.mia
  train, test = sources.load_dataset(config.target.data)
  x = np.concatenate([train.x, test.x])
  y = np.concatenate([train.y, test.y])
  kept = np.flatnonzero(np.bincount(y, minlength=train.num_classes) >= m.min_class_count)
  if len(kept) < 2:
    raise ValueError(f"mia.min_class_count={m.min_class_count} leaves {len(kept)} classes")
  keep = np.isin(y, kept)
  x, y = x[keep], np.searchsorted(kept, y[keep])  # classes renumbered 0..len(kept)-1
  num_classes = len(kept)
  rng = np.random.default_rng(m.seed)
  order = rng.permutation(len(y))
  n_pub = int(m.feature_fraction * len(y))
  pub = order[:n_pub]
  private = order[n_pub:]
  public = sources.Dataset(x=x[pub], y=y[pub], num_classes=num_classes, columns={},
                           name="public")
  if m.extractor == "pca":
    extract = _pca_extractor(public, m.pca_dim)
  elif m.extractor == "mlp":
    if x[0].size != 64:
      raise ValueError(f"mia.extractor=mlp is built for digits' 64 features, got {x[0].size}; "
                       "use mia.extractor=pca")
    extract = _extractor(public, 128, m.seed)
  else:
    raise ValueError(f"mia.extractor must be 'mlp' or 'pca', got {m.extractor!r}")
  feats, labels = extract(x[private]), y[private]
  per_class = np.bincount(labels, minlength=num_classes).min()
  rows = []
  for s in m.shots:
    if 2 * s > per_class:
      print(f"S={s}: skipped, the pool needs 2S={2 * s} per class, smallest class has "
            f"{per_class}")
      continue
    for seed in range(m.shots_seeds):
      r = np.random.default_rng(1000 * s + seed)
      pool = np.concatenate([r.choice(np.flatnonzero(labels == c), 2 * s, replace=False)
                             for c in range(num_classes)])
      fx, fy = feats[pool], labels[pool]
      exp = _head_experiment(fx, fy, num_classes, m.shots_steps, s * num_classes)
      mask = shadows.random_subsets(r, len(fy), m.num_models, strata=fy)
      idx, count = shadows.site_tables(mask, int(mask.sum(1)[0]), r)
      params, _ = shadows.ShadowTrainer(exp, 1).train(fx, fy, idx, count,
                                                  seed * 10000 + np.arange(m.num_models))
      phi, _ = shadows.model_scores(exp.model, params, fx, fy)
      scores, lab = lira.leave_one_out(phi, mask, lira.ATTACKS["lira_online_fixed_var"],
                                      m.num_targets)
      g = grad_norms(params, fx, fy)[:scores.shape[0]]
      vuln = np.where(lab, scores, np.nan)  # a member's LiRA score: its vulnerability
      rho = stats.spearmanr(g[lab], vuln[lab]).statistic
      ev = mia_metrics.evaluate(scores, lab)
      rows.append({"S": s, "seed": seed, "auc": ev["auc"], "tpr_0.001": ev["at_fpr_0.001"],
                   "tpr_0.01": ev["at_fpr_0.01"], "grad_spearman": float(rho)})
      print(f"S={s:3d} seed={seed} AUC={ev['auc']:.3f} TPR@0.1%={ev['at_fpr_0.001']['tpr']:.4f}"
            f" TPR@1%={ev['at_fpr_0.01']['tpr']:.4f} spearman(grad, score)={rho:.3f}",
            flush=True)
  summary = {"rows": rows, "fit": {f: fit_power_law(rows, f) for f in ("0.001", "0.01")}}
  with open(os.path.join(workdir, "shots.json"), "w") as f:
    json.dump(summary, f, indent=1)
  plot(rows, os.path.join(workdir, "shots.png"))
  return summary


def fit_power_law(rows, fpr: str) -> dict:
  """Least squares log(TPR - FPR) = -beta_S log S - beta_0 over the (S, seed) points with
  TPR > FPR; 95% t-interval of beta_S."""
  pts = [(r["S"], r[f"tpr_{fpr}"]["tpr"] - r[f"tpr_{fpr}"]["fpr"]) for r in rows]
  pts = np.array([(s, d) for s, d in pts if d > 0], np.float64)
  if len(pts) < 3 or len(np.unique(pts[:, 0])) < 2:
    return {"beta_S": None, "ci": None, "points": len(pts)}
  res = stats.linregress(np.log(pts[:, 0]), np.log(pts[:, 1]))
  t = stats.t.ppf(0.975, len(pts) - 2)
  return {"beta_S": float(-res.slope),
          "ci": [float(-res.slope - t * res.stderr), float(-res.slope + t * res.stderr)],
          "beta_0": float(-res.intercept), "points": len(pts)}


def plot(rows, path):
  import matplotlib  # optional: pyplot is slow to import and only the plots need it
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # optional: as matplotlib above
  fig, ax = plt.subplots(figsize=(4.5, 3.5))
  for f, mk in (("0.001", "o"), ("0.01", "s")):
    s = np.array([r["S"] for r in rows])
    d = np.array([r[f"tpr_{f}"]["tpr"] - r[f"tpr_{f}"]["fpr"] for r in rows])
    ok = d > 0
    ax.scatter(s[ok], d[ok], marker=mk, label=f"FPR {float(f):.1%}")
  ax.set(xscale="log", yscale="log", xlabel="shots S (examples per class)", ylabel="TPR - FPR")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def format_table(summary) -> str:
  lines = ["  S  seed   AUC   TPR@0.1%FPR [95% CI]       TPR@1%FPR   spearman(grad,score)"]
  for r in summary["rows"]:
    a = r["tpr_0.001"]
    lines.append(f"{r['S']:3d}  {r['seed']:4d}  {r['auc']:.3f}  {a['tpr']:.4f} [{a['tpr_lo']:.4f},"
                 f" {a['tpr_hi']:.4f}]  {r['tpr_0.01']['tpr']:.4f}     {r['grad_spearman']:.3f}")
  for f, fit in summary["fit"].items():
    if fit["beta_S"] is None:
      lines.append(f"FPR {f}: no fit ({fit['points']} points with TPR > FPR)")
    else:
      lines.append(f"FPR {f}: beta_S={fit['beta_S']:.2f} 95% CI [{fit['ci'][0]:.2f}, "
                   f"{fit['ci'][1]:.2f}] ({fit['points']} points)")
  return "\n".join(lines)
