"""Shamir secret sharing over the prime field GF(p), p = 2^256 + 297 (the least prime above
2^256), written here rather than taken from a library.

Why our own: the secrets are 32 bytes (an X25519 private key, a 256-bit self-mask seed), and a
field above 2^256 shares each in one piece; pycryptodome's Shamir works in GF(2^128) with
16-byte secrets, so every secret would be split in two halves shared separately (what Flower
does). The arithmetic is Python's exact integers: splitting is Horner's rule at x = 1, 2, ..
(`split_many` shares a round's secrets with one draw of OS entropy for all their coefficients;
a numpy object-array Vandermonde product was 4x slower than this loop), reconstruction is
Lagrange interpolation at 0 over a common denominator, so one modular inverse per secret. Share holders are identified by x = site id + 1 (never 0).
Any t shares determine the degree t - 1 polynomial and so the secret; t - 1 shares are
consistent with every secret (perfect secrecy; tests/test_secagg.py shows both).
Coefficients are uniform in [0, p), by rejection from OS entropy (`random_below`).
"""

import math
import os

PRIME = 2 ** 256 + 297
SHARE_BYTES = 33  # a field element; p < 2^264
_CANDIDATE_BYTES = 33  # 257-bit candidates (top 7 bits cleared): about half are below p


def random_below(n: int) -> list[int]:
  """n integers uniform in [0, PRIME): rejection sampling of 257-bit candidates, as
  secrets.randbelow does, from a few large reads of OS entropy instead of one per draw."""
  out = []
  while len(out) < n:
    want = 2 * (n - len(out)) + 8  # about half the candidates are kept
    raw = os.urandom(_CANDIDATE_BYTES * want)
    for i in range(want):
      c = int.from_bytes(raw[i * _CANDIDATE_BYTES:(i + 1) * _CANDIDATE_BYTES], "big") >> 7
      if c < PRIME:
        out.append(c)
  return out[:n]


def split_many(secrets_: list[bytes], threshold: int, xs: list[list[int]]):
  """Shares of several 32-byte secrets at once: secret i goes to holders xs[i] (distinct,
  1 <= x < p). Returns [secret][holder] -> (x, f_i(x)).

  f_i(x) = sum_j c_ij x^j with c_i0 the secret, by Horner's rule in exact integers, reduced
  once mod p (the same f(x) mod p).
  """
  if any(len(s) != 32 for s in secrets_):
    raise ValueError("Shamir secrets here are 32 bytes")
  for x in xs:
    if not 1 <= threshold <= len(x):
      raise ValueError(f"threshold {threshold} needs 1 <= t <= {len(x)} holders")
  rand = random_below(len(secrets_) * (threshold - 1))
  out = []
  for i, (secret, holders) in enumerate(zip(secrets_, xs)):
    coeffs = rand[i * (threshold - 1):(i + 1) * (threshold - 1)][::-1]
    coeffs.append(int.from_bytes(secret, "big"))  # highest degree first, the secret last
    shares = []
    for x in holders:
      y = 0
      for c in coeffs:
        y = y * x + c
      shares.append((x, y % PRIME))
    out.append(shares)
  return out


def split(secret: bytes, threshold: int, xs: list[int]) -> list[tuple[int, int]]:
  """Shares (x, f(x)) of a 32-byte secret for holders xs (distinct, 1 <= x < p)."""
  return split_many([secret], threshold, [list(xs)])[0]


def reconstruct(shares: list[tuple[int, int]], threshold: int) -> bytes:
  """The secret from at least `threshold` shares (the first `threshold` are used).

  Raises ValueError with fewer: t - 1 shares carry no information about the secret.
  Lagrange at 0: f(0) = sum_i y_i num_i / den_i with num_i = prod_{j != i} x_j and den_i =
  prod_{j != i} (x_j - x_i), exact integers; over their least common multiple D the sum is
  (sum_i y_i num_i (D / den_i)) / D, one inverse mod p.
  """
  shares = sorted(dict(shares).items())  # one share per holder
  if len(shares) < threshold:
    raise ValueError(f"{len(shares)} distinct shares, {threshold} needed")
  shares = shares[:threshold]
  xs = [x for x, _ in shares]
  nums, dens = [], []
  for i, xi in enumerate(xs):
    num, den = 1, 1
    for j, xj in enumerate(xs):
      if j != i:
        num *= xj
        den *= xj - xi
    nums.append(num)
    dens.append(den)
  common = math.lcm(*dens)
  total = sum(y * num * (common // den) for (_, y), num, den in zip(shares, nums, dens))
  value = total * pow(common, -1, PRIME) % PRIME
  if value >= 2 ** 256:
    raise ValueError("shares do not reconstruct a 32-byte secret (corrupted or inconsistent)")
  return value.to_bytes(32, "big")


def interpolate_at(shares: list[tuple[int, int]], x0: int) -> int:
  """f(x0) of the polynomial through `shares` (for tests: t - 1 shares plus any guess)."""
  total = 0
  for i, (xi, yi) in enumerate(shares):
    num, den = 1, 1
    for j, (xj, _) in enumerate(shares):
      if j != i:
        num = num * (x0 - xj) % PRIME
        den = den * (xi - xj) % PRIME
    total = (total + yi * num * pow(den, -1, PRIME)) % PRIME
  return total


def encode(y: int) -> bytes:
  return y.to_bytes(SHARE_BYTES, "big")


def decode(raw: bytes) -> int:
  return int.from_bytes(raw, "big")
