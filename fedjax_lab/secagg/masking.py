"""The device side of a round: quantize + mask (client), remove masks + decode (server).

`mask_update` is what every site of the cohort does to its update, vmapped over the cohort
inside one jit: clip, stochastic rounding into Z_{2^b} (quantization.py), plus its self mask
and its signed pairwise masks, all ChaCha20 keystreams (prg.py) reduced mod 2^b. Row u of the
result is the only thing site u uploads.

`unmask_sum` is the server's arithmetic: the sum of the uploaded rows minus the masks it could
rebuild from reconstructed secrets (prg keys it derived itself), mod 2^b.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab.secagg import prg
from fedjax_lab.secagg.config import resolve_prg
from fedjax_lab.secagg.quantization import modulus_mask, quantize


def site_rounding_keys(rounding_key: jax.Array, cohort: int) -> jax.Array:
  """One stochastic-rounding key per site (each site rounds with its own randomness)."""
  return jax.random.split(rounding_key, cohort)


@jax.jit
def quantize_sites(updates, rounding_key, clip_range, *, levels):
  """[K, d] float -> ([K, d] uint32 values in {0..levels}, [K] clipped counts), vmapped."""
  keys = site_rounding_keys(rounding_key, updates.shape[0])
  return jax.vmap(quantize, in_axes=(0, 0, None, None))(updates, keys, clip_range, levels)


@functools.partial(jax.jit, static_argnames=("bits",))
def mask_update(updates, rounding_key, mask_keys, mask_signs, clip_range, *, levels, bits):
  """Client side, every site at once: quantize and mask.

  updates: [K, d] float32; rounding_key: a jax PRNG key (split into one per site);
  mask_keys: [K, S, 8] uint32 ChaCha20 keys (slot 0: the site's self mask, then one slot per
  neighbour); mask_signs: [K, S] int32 (+1 self and neighbours with a larger id, -1 smaller,
  0 unused). Returns (masked [K, d] uint32 in Z_{2^bits}, clipped [K] int32).
  """
  q, clipped = quantize_sites(updates, rounding_key, clip_range, levels=levels)
  masks = prg.expand_masks(mask_keys, mask_signs, n_words=updates.shape[1])
  return (q + masks) & modulus_mask(bits), clipped


def mask_update_host(updates, rounding_key, mask_keys, mask_signs, clip_range, *, levels, bits):
  """The same with the masks expanded on the host (`cryptography`'s ChaCha20).

  mask_keys: per site, a list of 32-byte keys; mask_signs: matching list of signs.
  """
  q, clipped = quantize_sites(updates, rounding_key, clip_range, levels=levels)
  masks = prg.expand_masks_host(mask_keys, mask_signs, updates.shape[1])
  return (np.asarray(q) + masks) & np.uint32(int(modulus_mask(bits))), np.asarray(clipped)


def _pad_slots(keys: np.ndarray, signs: np.ndarray, rows: int, min_total: int = 0):
  """Pad m masks to rows x (power of two) slots (sign 0), at least min_total of them, so
  shapes, and compiles, repeat."""
  m = max(len(keys), min_total, 1)
  per_row = 1 << max(0, (-(-m // rows) - 1).bit_length())
  total = rows * per_row
  k = np.zeros((total, 8), np.uint32)
  s = np.zeros((total,), np.int32)
  k[:len(keys)], s[:len(keys)] = keys, signs
  return k.reshape(rows, per_row, 8), s.reshape(rows, per_row)


@functools.partial(jax.jit, static_argnames=("bits",))
def _unmask(masked, keep, mask_sum, *, bits):
  kept = jnp.where(keep[:, None], masked, jnp.uint32(0))
  return (kept.sum(axis=0, dtype=jnp.uint32) - mask_sum.sum(axis=0, dtype=jnp.uint32)) \
      & modulus_mask(bits)


def unmask_sum(masked, remove_keys, remove_signs, bits: int, prg_path: str = "auto",
               rows: int = 8, keep=None, min_keys: int = 0):
  """Server side: (sum of uploaded rows - sum_j sign_j ChaCha20(key_j)) mod 2^bits.

  masked: [n, d] uint32 (what was uploaded), or with `keep` ([n] bool) every row of a padded
  matrix of which only the kept ones were uploaded (fixed shapes: one compile whatever the
  uploaders); remove_keys: list of 32-byte keys (self masks of the uploaders, pairwise masks
  of uploaders with sites that dropped before uploading); remove_signs: the sign each was
  added with; min_keys: pad the keys to at least this many (fixed shapes again). prg_path:
  "device", "host" or "auto" (config.resolve_prg). Returns the integer sum [d] uint32.
  """
  d = masked.shape[1]
  if keep is None:
    keep = np.ones(masked.shape[0], bool)
  if resolve_prg(prg_path) == "host":
    total = prg.signed_keystream_sum(remove_keys, remove_signs, d)
    return jnp.asarray((np.asarray(masked)[np.asarray(keep)].sum(axis=0, dtype=np.uint32)
                        - total) & np.uint32(int(modulus_mask(bits))))
  words = np.stack([prg.key_words(k) for k in remove_keys]) if remove_keys else \
      np.zeros((0, 8), np.uint32)
  keys, signs = _pad_slots(words, np.asarray(remove_signs, np.int32), rows, min_keys)
  mask_sum = prg.expand_masks(jnp.asarray(keys), jnp.asarray(signs), n_words=d)
  return _unmask(jnp.asarray(masked), jnp.asarray(keep), mask_sum, bits=bits)
