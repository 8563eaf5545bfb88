"""LiRA (Carlini et al. 2022) and the loss attack's scores (membership.py's docstring has the
method): per-example confidences of the models, and the attacks on them."""

import math
from typing import Callable
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats


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
