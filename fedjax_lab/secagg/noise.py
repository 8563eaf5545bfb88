"""Coordinated noise (Dopamine) through SecAgg: the numbers docs/secure_aggregation.md uses.

Each site adds N(0, s^2) per coordinate to its clipped update (L2 norm <= C) BEFORE
quantization, so clipping to [-c, c] and stochastic rounding are post-processing of the noised
update (its sensitivity stays C). These helpers size s and c:

* `noise_share_std`: s = total_std / sqrt(t). A round that finishes has at least t uploads
  (fewer abort), so the unmasked sum carries at least total_std whatever drops out; with
  s = total_std / sqrt(K), sites that drop before upload take their share of noise with them.
* `clip_probability`: an upper bound on P(any noised coordinate of n sites leaves [-c, c]).
  Coordinates of a clipped update are within [-C, C], so with c >= C only noise is clipped;
  secure_sum counts clipped values (SecAggResult.clipped_count).
The delta the quantization costs (aliasing and clipping, over all rounds) is bounded and
checked in fedjax_lab/privacy/secagg_delta.py.
"""

import math

from scipy.stats import norm


def noise_share_std(total_std: float, threshold: int) -> float:
  return total_std / math.sqrt(threshold)


def grid_step(clip_range: float, levels: int) -> float:
  return 2.0 * clip_range / levels


def clip_probability(clip_range: float, l2_clip: float, share_std: float, n: int, d: int):
  """Union bound: 2 n d P(N(0, s^2) > c - C), capped at 1."""
  if clip_range <= l2_clip:
    return 1.0
  return min(1.0, 2.0 * n * d * norm.sf((clip_range - l2_clip) / share_std))


def suggest_clip_range(l2_clip: float, share_std: float, n: int, d: int,
                       target: float = 1e-9) -> float:
  """The smallest c with clip_probability <= target."""
  return l2_clip + share_std * norm.isf(target / (2.0 * n * d))

