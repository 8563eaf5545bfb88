"""Shamir secret sharing over the prime field GF(p), p = 2^256 + 297 (the least prime above
2^256), written here rather than taken from a library.

Why our own: the secrets are 32 bytes (an X25519 private key, a 256-bit self-mask seed), and a
field above 2^256 shares each in one piece; pycryptodome's Shamir works in GF(2^128) with
16-byte secrets, so every secret would be split in two halves shared separately (what Flower
does). The arithmetic is Python's exact integers: splitting is Horner's rule at x = 1, 2, ..,
reconstruction is Lagrange interpolation at 0. Share holders are identified by x = site id + 1
(never 0). Any t shares determine the degree t - 1 polynomial and so the secret; t - 1 shares
are consistent with every secret (perfect secrecy; tests/test_secagg.py shows both).
Coefficients come from `secrets` (OS entropy).
"""

import functools
import secrets

PRIME = 2 ** 256 + 297
SHARE_BYTES = 33  # a field element; p < 2^264


def split(secret: bytes, threshold: int, xs: list[int]) -> list[tuple[int, int]]:
  """Shares (x, f(x)) of a 32-byte secret for holders xs (distinct, 1 <= x < p)."""
  if len(secret) != 32:
    raise ValueError("Shamir secrets here are 32 bytes")
  if not 1 <= threshold <= len(xs):
    raise ValueError(f"threshold {threshold} needs 1 <= t <= {len(xs)} holders")
  coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME)
                                              for _ in range(threshold - 1)]
  out = []
  for x in xs:  # Horner's rule in exact integers, reduced once: the same f(x) mod p
    y = 0
    for c in reversed(coeffs):
      y = y * x + c
    out.append((x, y % PRIME))
  return out


@functools.lru_cache(maxsize=4096)
def _lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
  out = []
  for i, xi in enumerate(xs):
    num, den = 1, 1
    for j, xj in enumerate(xs):
      if j != i:
        num = num * xj % PRIME
        den = den * (xj - xi) % PRIME
    out.append(num * pow(den, -1, PRIME) % PRIME)
  return tuple(out)


def reconstruct(shares: list[tuple[int, int]], threshold: int) -> bytes:
  """The secret from at least `threshold` shares (the first `threshold` are used).

  Raises ValueError with fewer: t - 1 shares carry no information about the secret.
  """
  shares = sorted(dict(shares).items())  # one share per holder
  if len(shares) < threshold:
    raise ValueError(f"{len(shares)} distinct shares, {threshold} needed")
  shares = shares[:threshold]
  lam = _lagrange_at_zero(tuple(x for x, _ in shares))
  value = sum(l * y for l, (_, y) in zip(lam, shares)) % PRIME
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
