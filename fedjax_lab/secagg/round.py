"""Secure aggregation as a link of the round: the host step between the sites and the server.

The round's aggregator chain (fedjax_lab/aggregators.py) runs every per-site transform on the
device (weights, clipping, DP noise shares); without secure aggregation the sites' results are
then summed on the device. With `secagg.enabled` that sum is replaced by `SecureSum`: the
round's first jitted half returns each site's transformed update as one float32 row, this
host step runs the protocol (secure_sum: key agreement and Shamir shares on the host, quantize
+ mask vmapped on the device, unmask) over the rows of the sites that took part, and the
round's second jitted half hands the unmasked sum to the server's end of the chain and the
server optimizer (algorithms/fedavg.py make_round). The server-side code sees the sum only.

Cohorts of 0 or 1 site need no protocol: nothing is sent (0), or the one row is its own sum
(1: a Poisson cohort under site-level DP, whose single update carries the whole noise).

Under site-level DP (`slots` given: the privacy plan's slots, a public number) the realised
cohort is what amplification by sampling hides, so nothing observable may depend on it: the
grid is sized for the slots (levels_for(slots)), every device array keeps the [slots, d]
shape with a validity mask (one compile whatever the cohort), and a cohort of one is rounded
onto the same grid (a raw float row would tell the server it was alone).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab.secagg.config import SecAggConfig
from fedjax_lab.secagg.protocol import secure_sum

# fold_in tag (into the run's client key, then the round) of the stochastic rounding and the
# simulated dropouts; no round index or site id reaches it.
SECAGG_KEY = 0xFFFFFFFB


def min_survivors(cohort, neighbours, threshold):
  """t for a cohort of `cohort` sites (jnp or int): a round that finishes has at least t
  uploads. 1 for cohorts below 2 (no protocol runs). Traceable: `cohort` may be traced."""
  cohort = jnp.asarray(cohort)
  k = cohort - 1 if neighbours is None else jnp.minimum(int(neighbours), cohort - 1)
  t = (k + 1) // 2 + 1 if threshold is None else jnp.full_like(k, int(threshold))
  return jnp.where(cohort < 2, 1, t)


class RoundSum(NamedTuple):
  total: np.ndarray | jax.Array  # [d] float32 sum of the survivors' rows (zeros if aborted)
  survived: np.ndarray           # [slots] bool: rows in the sum
  aborted: bool
  reason: str
  clipped: int                   # coordinates clipped to [-clip_range, clip_range]
  host_seconds: float            # the protocol's host cryptography, all sites and the server


class SecureSum:
  """Sums the rows of the sites present in a round through the SecAgg(+) protocol.

  slots: None (the grid sized for the sites present), or the most sites a round can hold,
  which then fixes the grid and the shapes (site-level DP: see the module docstring)."""

  def __init__(self, config: SecAggConfig, slots: int | None = None):
    self.config, self.slots = config, slots

  def __call__(self, rows: jax.Array, present: np.ndarray, key: jax.Array) -> RoundSum:
    slots, d = rows.shape
    idx = np.flatnonzero(present)
    survived = np.zeros(slots, bool)
    if self.slots is not None:
      result = secure_sum(rows, key, self.config, present=present, grid_cohort=self.slots)
    elif len(idx) < 2:  # nothing to hide: no site, or one whose row is the sum
      survived[idx] = True
      total = rows[idx].sum(0) if len(idx) else jnp.zeros((d,), jnp.float32)
      return RoundSum(total, survived, False, "", 0, 0.0)
    else:
      result = secure_sum(jnp.take(rows, jnp.asarray(idx), axis=0), key, self.config)
    if result.aborted:
      return RoundSum(jnp.zeros((d,), jnp.float32), survived, True, result.abort_reason, 0,
                      result.timings["host_crypto"])
    survived[idx[result.survivors]] = True
    return RoundSum(result.sum, survived, False, "", result.clipped_count,
                    result.timings["host_crypto"])
