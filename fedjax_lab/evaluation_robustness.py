"""The end-of-run report beyond accuracy: AUC, macro-F1, intervals, per site, robustness.

`final_metrics(exp, state)` returns the summary.json keys below for every run (nothing here
changes training). Per-site figures reweight the shared test set to each site's training label
mix (metrics.site_weights), as evaluation.py does for per-site accuracy.

  test_macro_f1, test_auc                     on the test set (AUC: binary, or one-vs-rest macro)
  test_accuracy_ci95, test_auc_ci95, test_macro_f1_ci95
                                              percentile bootstrap over test examples
                                              (eval.bootstrap resamples; 0: none)
  site_metrics                                {accuracy, macro_f1, auc, examples}: lists, one
                                              entry per site; beyond eval.site_metrics_max
                                              sites (a 10^6 population), for a seeded uniform
                                              sample of that many, their ids in `sites`
  centralized_test_auc, centralized_test_macro_f1, centralized_test_auc_ci95
                                              with eval.centralized_baseline
  robustness                                  with eval.robustness (below)

Robustness (arXiv 2308.04137's protocol: one evaluation over perturbations and unknown
classes), for the final model:
- gaussian_noise: x + level * std_j * N(0, 1) on every feature j (std_j of the test split, so
  the level is relative to each gene's spread), levels eval.robustness_noise;
- masking: a fraction eval.robustness_mask of each example's features set to 0 (dropout of
  expression values; 0 is the mean of standardised features);
  each level: accuracy, macro_f1, auc overall and site_accuracy / site_auc per site;
- unknown_classes: the classes eval.unknown_classes are held out of training (and of the
  test metrics above); the rejection score is 1 - max softmax probability, and `auroc` is the
  AUC of telling the held-out classes' test examples (positive) from the known ones, overall
  and per site (known examples reweighted to the site's mix). 0.5 = chance.
"""

import dataclasses

import jax
import numpy as np

from fedjax_lab import metrics
from fedjax_lab.errors import ConfigError

_NOISE_SEED = 0x0B05  # fixed: every run (and model) sees the same perturbed test inputs


def check_config(config) -> None:
  """The eval.* keys of this module; ConfigError naming the key."""
  e = config.eval
  if e.bootstrap < 0 or int(e.bootstrap) != e.bootstrap:
    raise ConfigError("eval.bootstrap", f"must be an integer >= 0 (0: no intervals), got "
                      f"{e.bootstrap}")
  if any(level < 0 for level in e.robustness_noise):
    raise ConfigError("eval.robustness_noise", f"levels must be >= 0, got {e.robustness_noise}")
  if any(not 0 <= f < 1 for f in e.robustness_mask):
    raise ConfigError("eval.robustness_mask", f"fractions must be in [0, 1), got "
                      f"{e.robustness_mask}")
  if e.unknown_classes and not e.robustness:
    raise ConfigError("eval.unknown_classes", "holds classes out of training, which only "
                      "eval.robustness=True reports; set it, or eval.unknown_classes=()")
  if len(set(e.unknown_classes)) != len(e.unknown_classes) or any(
      int(k) != k or k < 0 for k in e.unknown_classes):
    raise ConfigError("eval.unknown_classes", f"must be distinct class indices >= 0, got "
                      f"{e.unknown_classes}")


def hold_out_classes(config, train, test):
  """(train, test, unknown): eval.unknown_classes removed from train and test; `unknown` is
  the test split's examples of those classes (None when none are held out)."""
  held = tuple(int(k) for k in config.eval.unknown_classes)
  if not held:
    return train, test, None
  if max(held) >= train.num_classes:
    raise ConfigError("eval.unknown_classes", f"class {max(held)} does not exist: "
                      f"{config.data.name} has classes 0..{train.num_classes - 1}")
  keep_train = ~np.isin(train.y, held)
  keep_test = ~np.isin(test.y, held)
  if keep_test.all():
    raise ConfigError("eval.unknown_classes", f"classes {held} have no test example; "
                      "choose classes present in the test split")
  if len(np.unique(train.y[keep_train])) < 2:
    raise ConfigError("eval.unknown_classes", f"holding out {held} leaves fewer than 2 "
                      "classes to train on")
  return (train.subset(np.flatnonzero(keep_train)), test.subset(np.flatnonzero(keep_test)),
          test.subset(np.flatnonzero(~keep_test)))


def join(test, unknown):
  """The test split with the held-out examples appended (standardised together)."""
  if unknown is None:
    return test
  return dataclasses.replace(test, x=np.concatenate([test.x, unknown.x]),
                             y=np.concatenate([test.y, unknown.y]), columns={})


def split(test_all, unknown):
  """Inverse of join: (test, unknown) after both were standardised."""
  if unknown is None:
    return test_all, None
  k = len(test_all) - len(unknown)
  return test_all.subset(np.arange(k)), test_all.subset(np.arange(k, len(test_all)))


def make_predictor(model, batch_size: int):
  """fn(params, model_state, x [N, ...]) -> softmax probabilities [N, C] (NumPy)."""
  probs_fn = jax.jit(lambda p, ms, xb: jax.nn.softmax(model.apply(p, ms, xb, False)[0]))

  def predict(params, model_state, x):
    n = len(x)
    b = min(batch_size, n)
    pad = (-n) % b
    xp = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)]) if pad else x
    out = [np.asarray(probs_fn(params, model_state, xp[i:i + b])) for i in range(0, n + pad, b)]
    return np.concatenate(out)[:n].astype(np.float64)

  return predict


def _scores(y, probs, site_w):
  pred = probs.argmax(-1)
  return {"accuracy": metrics.accuracy(y, pred), "macro_f1": metrics.macro_f1(y, pred),
          "auc": metrics.macro_auc(y, probs),
          "site_accuracy": [metrics.accuracy(y, pred, w) for w in site_w],
          "site_auc": [metrics.macro_auc(y, probs, w) for w in site_w]}


def _clean(value):
  """nan -> None for JSON."""
  if isinstance(value, float) and not np.isfinite(value):
    return None
  if isinstance(value, (list, tuple)):
    return [_clean(v) for v in value]
  if isinstance(value, dict):
    return {k: _clean(v) for k, v in value.items()}
  return value


def quality(y, probs, site_hist, bootstrap: int, seed: int = 0) -> dict:
  """Test metrics, their intervals and per-site metrics of one model's probabilities."""
  pred = probs.argmax(-1)
  site_w = metrics.site_weights(y, site_hist)
  out = {
      "test_macro_f1": metrics.macro_f1(y, pred), "test_auc": metrics.macro_auc(y, probs),
      "site_metrics": {
          "examples": [int(c) for c in site_hist.sum(-1)],
          "accuracy": [metrics.accuracy(y, pred, w) for w in site_w],
          "macro_f1": [metrics.macro_f1(y, pred, w) for w in site_w],
          "auc": [metrics.macro_auc(y, probs, w) for w in site_w]}}
  for key, fn in (("accuracy", lambda i: metrics.accuracy(y[i], pred[i])),
                  ("auc", lambda i: metrics.macro_auc(y[i], probs[i])),
                  ("macro_f1", lambda i: metrics.macro_f1(y[i], pred[i]))):
    out[f"test_{key}_ci95"] = metrics.bootstrap_ci(fn, len(y), bootstrap, seed)
  return out


def robustness(config, predict, params, model_state, test, unknown, site_hist) -> dict:
  """The robustness block of the module docstring."""
  x, y = np.asarray(test.x, np.float32), np.asarray(test.y)
  site_w = metrics.site_weights(y, site_hist)
  std = x.reshape(len(x), -1).std(0).reshape(x.shape[1:])
  out = {"gaussian_noise": {}, "masking": {}}
  for i, level in enumerate(config.eval.robustness_noise):
    rng = np.random.default_rng([_NOISE_SEED, 0, i])
    noisy = x + (level * std * rng.standard_normal(x.shape)).astype(np.float32)
    out["gaussian_noise"][f"{level:g}"] = _scores(y, predict(params, model_state, noisy), site_w)
  for i, frac in enumerate(config.eval.robustness_mask):
    rng = np.random.default_rng([_NOISE_SEED, 1, i])
    masked = np.where(rng.random(x.shape) < frac, 0.0, x).astype(np.float32)
    out["masking"][f"{frac:g}"] = _scores(y, predict(params, model_state, masked), site_w)
  if unknown is not None:
    known_score = 1 - predict(params, model_state, x).max(-1)
    unknown_score = 1 - predict(params, model_state, np.asarray(unknown.x, np.float32)).max(-1)
    score = np.concatenate([known_score, unknown_score])
    is_unknown = np.concatenate([np.zeros(len(y), bool), np.ones(len(unknown), bool)])
    site_auroc = [metrics.binary_auc(is_unknown, score, np.concatenate([w / max(w.sum(), 1e-300),
                                     np.full(len(unknown), 1.0 / len(unknown))]))
                  for w in site_w]
    out["unknown_classes"] = {
        "classes": [int(k) for k in config.eval.unknown_classes],
        "class_names": [test.class_names[k] for k in config.eval.unknown_classes]
                       if test.class_names else [],
        "known_test_examples": int(len(y)), "unknown_test_examples": int(len(unknown)),
        "auroc": metrics.binary_auc(is_unknown, score), "site_auroc": site_auroc}
  return out


def final_metrics(exp, state) -> dict:
  """The summary.json keys of the module docstring for Experiment `exp` at `state`."""
  cfg = exp.config
  predict = make_predictor(exp.model, cfg.eval.batch_size)
  y = np.asarray(exp.test.y)
  probs = predict(state.params, state.model_state, np.asarray(exp.test.x, np.float32))
  site_hist, sampled = exp.site_hist, None
  if len(site_hist) > cfg.eval.site_metrics_max:  # 3 metrics x 10^6 sites take hours
    sampled = np.sort(np.random.default_rng([_NOISE_SEED, 2, cfg.seed]).choice(
        len(site_hist), cfg.eval.site_metrics_max, replace=False))
    site_hist = site_hist[sampled]
  out = quality(y, probs, site_hist, cfg.eval.bootstrap, cfg.seed)
  if sampled is not None:
    out["site_metrics"]["sites"] = [int(s) for s in sampled]
  central = getattr(exp, "centralized", None)
  if central is not None:
    c_exp, c_state = central
    c_probs = predict(c_state.params, c_state.model_state, np.asarray(c_exp.test.x, np.float32))
    c = quality(np.asarray(c_exp.test.y), c_probs, c_exp.site_hist, cfg.eval.bootstrap, cfg.seed)
    out.update(centralized_test_auc=c["test_auc"], centralized_test_macro_f1=c["test_macro_f1"],
               centralized_test_auc_ci95=c["test_auc_ci95"],
               centralized_test_accuracy_ci95=c["test_accuracy_ci95"])
  if cfg.eval.robustness:
    out["robustness"] = robustness(cfg, predict, state.params, state.model_state, exp.test,
                                   getattr(exp, "unknown", None), site_hist)
  return _clean(out)
