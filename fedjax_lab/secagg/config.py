"""SecAgg settings and their validation: impossible or insecure settings fail before a round.

`SecAggConfig` mirrors the config keys the lead adds to fedjax_lab/config.py (`secagg.enabled`,
`secagg.neighbours`, `secagg.threshold`, `secagg.bits`, `secagg.clip_range`,
`secagg.dropout_rate`). `validate_secagg` raises ValueError naming the parameter and the fix.

Integer encoding (quantization.py): a coordinate clipped to [-c, c] is stochastically rounded
to one of `levels + 1` grid points {0, .., levels} (grid step 2c / levels); K sites' values
sum to at most K * levels, which must stay below 2^bits so the sum modulo 2^bits IS the
integer sum (no wraparound, ever). So levels = 2 * floor((2^bits - 1) / (2 K)) (even, so the
grid holds 0 exactly); K = the cohort's size (rows of the update matrix), not the survivors.
"""

import math
from typing import NamedTuple

import jax

MAX_BITS = 32  # masked vectors are uint32 on the device; arithmetic mod 2^b by masking bits


class SecAggConfig(NamedTuple):
  """One round's secure-aggregation settings.

  neighbours: k, how many other sites each site masks with (SecAgg+, Bell et al. 2020);
    None means cohort - 1 (the complete graph: Bonawitz et al. 2017).
  threshold: t, Shamir threshold: shares of a site's secrets needed to reconstruct them, out
    of k + 1 (its k neighbours and itself). None means the smallest secure value,
    floor((k + 1) / 2) + 1. A round with fewer than t survivors aborts.
  bits: b, the modulus 2^b of the masked sum (<= 32).
  clip_range: c, every coordinate is clipped to [-c, c] before quantization (counted).
  dropout_rate: simulated probability that a site drops out during a round (the expected
    fraction of the cohort that drops), at one of its three stages chosen uniformly (before
    key sharing, before upload, before unmasking).
  prg: "device" (ChaCha20 written in jax.numpy, vmapped inside jit), "host" (ChaCha20 from
    `cryptography`/OpenSSL) or "auto" (the default: "host" when JAX's default backend is the
    CPU, "device" on a GPU/TPU; see resolve_prg). All give the same keystream, bit for bit
    (tested), so the choice changes only the speed.
  """
  neighbours: int | None = None
  threshold: int | None = None
  bits: int = 32
  clip_range: float = 1.0
  dropout_rate: float = 0.0
  prg: str = "auto"


PRG_PATHS = ("auto", "device", "host")


def resolve_prg(prg: str) -> str:
  """"auto" -> "host" on a CPU backend, "device" otherwise; "device"/"host" unchanged.

  Why: on a CPU, XLA runs the jax.numpy ChaCha20 (10 double rounds of 32-bit add/rotate/xor
  over [rows, blocks] arrays) at ~0.3 GB/s of keystream here, while OpenSSL's ChaCha20
  (SIMD-vectorised assembly) makes ~3.5 GB/s on one core of the same machine: the host path
  was ~10x faster for the masks (benchmarks/RESULTS.md, secure-aggregation sections). On a
  GPU/TPU the jax.numpy version runs across thousands of lanes next to the updates (no
  device-to-host copy of [K, d]), which is what it was written for.
  """
  if prg not in PRG_PATHS:
    raise ValueError(f"secagg prg={prg!r} must be one of {PRG_PATHS}")
  if prg != "auto":
    return prg
  return "host" if jax.default_backend() == "cpu" else "device"


def resolve_neighbours(cohort_size: int, neighbours: int | None) -> int:
  return cohort_size - 1 if neighbours is None else min(int(neighbours), cohort_size - 1)


def resolve_threshold(neighbours: int, threshold: int | None) -> int:
  return (neighbours + 1) // 2 + 1 if threshold is None else int(threshold)


def levels_for(cohort_size: int, bits: int) -> int:
  """Grid steps per site: the largest even L with cohort_size * L < 2^bits."""
  return 2 * ((2 ** bits - 1) // (2 * cohort_size))


def validate_secagg(cohort_size, neighbours, threshold, bits, clip_range, dropout_rate,
                    prg="auto"):
  """Raise ValueError (naming the parameter and the fix) for impossible or insecure settings.

  Returns (k, t, levels) resolved for this cohort size.
  """
  K = int(cohort_size)
  if K < 2:
    raise ValueError(f"secagg needs cohort_size >= 2 (got {cohort_size}): the sum of one site "
                     "is its update; raise cohort_size or set secagg.enabled=False")
  if neighbours is not None and int(neighbours) < 1:
    raise ValueError(f"secagg.neighbours={neighbours} must be >= 1 (each site masks with k "
                     f"others); use None for the complete graph (k = cohort_size - 1 = {K - 1})")
  k = resolve_neighbours(K, neighbours)
  if k < K - 1 and k % 2:
    raise ValueError(f"secagg.neighbours={k} must be even (each site masks with k/2 sites on "
                     f"either side of a ring) or cohort_size - 1 = {K - 1} (the complete graph);"
                     f" set it to {k + 1} or {k - 1 if k > 1 else K - 1}")
  t = resolve_threshold(k, threshold)
  if t > k + 1:
    raise ValueError(f"secagg.threshold={t} > secagg.neighbours + 1 = {k + 1}: a site's secrets "
                     f"are split into k + 1 shares (its k neighbours and itself), so t of them "
                     f"can never be collected; set secagg.threshold <= {k + 1}")
  if t <= (k + 1) // 2:
    raise ValueError(f"secagg.threshold={t} must be a strict majority of the k + 1 = {k + 1} "
                     f"share holders (> {(k + 1) // 2}): otherwise a server that tells half of "
                     f"them a site dropped and the other half it did not can reconstruct both "
                     f"its self-mask seed and its mask key, and unmask its update; set "
                     f"secagg.threshold >= {(k + 1) // 2 + 1}")
  if int(bits) != bits or not 1 <= bits <= MAX_BITS:
    raise ValueError(f"secagg.bits={bits} must be an integer in [1, {MAX_BITS}] (masked vectors "
                     f"are uint32 on the device)")
  levels = levels_for(K, bits)
  if levels < 2:
    need = math.ceil(math.log2(2 * K + 1))
    raise ValueError(f"secagg.bits={bits} is too few for cohort_size={K}: K sites' quantized "
                     f"values (at least 2 grid steps each) must sum below 2^bits without "
                     f"wrapping around; set secagg.bits >= {need} (or lower cohort_size)")
  if not (isinstance(clip_range, (int, float)) and math.isfinite(clip_range)
          and clip_range > 0):
    raise ValueError(f"secagg.clip_range={clip_range} must be a finite number > 0 (every "
                     f"coordinate is clipped to [-clip_range, clip_range]); set it to at least "
                     f"the DP clip norm plus a few noise standard deviations")
  if not 0.0 <= dropout_rate < 1.0:
    raise ValueError(f"secagg.dropout_rate={dropout_rate} must be in [0, 1) (the simulated "
                     f"fraction of the cohort that drops out over a round)")
  if prg not in PRG_PATHS:
    raise ValueError(f"secagg prg={prg!r} must be one of {PRG_PATHS} ('auto': host ChaCha20 "
                     f"on a CPU backend, device ChaCha20 on a GPU/TPU)")
  return k, t, levels
