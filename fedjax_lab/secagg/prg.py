"""The masks' PRG: the ChaCha20 keystream (RFC 8439), on the device or on the host.

Why ChaCha20: it is a vetted stream cipher (IETF RFC 8439, TLS 1.3); its keystream under a
uniformly random 256-bit key is assumed indistinguishable from random (the standard PRG
assumption SecAgg's proof needs). Keys are 32-byte outputs of HKDF-SHA256 (crypto.py), one per
mask, so the nonce is fixed at zero and the block counter runs from 0: 2^32 blocks of 64 bytes
(2^36 uint32 words) per key, far above any model here.

Two implementations with the same output, bit for bit (tests/test_secagg.py):
  * `chacha20_words` (device): the block function in jax.numpy on uint32 (add, xor, rotate:
    no table look-ups, so no data-dependent memory access), vectorised over blocks and
    vmapped over keys inside jit. This is the same PRG, not a stand-in: jax.random's
    threefry2x32 would be faster to write but takes a 64-bit key and is not a vetted
    cryptographic PRG, so it is not used for masks.
  * `chacha20_words_host` (host): `cryptography`'s ChaCha20 (OpenSSL); `expand_masks_host`
    writes each site's keystreams into one reused buffer (`update_into`, a few rows at a
    time) and reduces them with numpy, so no [rows, slots, n_words] array is formed.
SecAggConfig(prg="auto") (the default) takes the host path on a CPU backend, where OpenSSL's
vectorised ChaCha20 made keystream ~10x faster than XLA CPU's jax.numpy version in
benchmarks/secagg_overhead.py (3.5 vs 0.3 GB/s on the 2-core VM), and the device path on a
GPU/TPU (config.resolve_prg).

A word w is reduced into Z_{2^b} as w mod 2^b, exactly uniform since 2^b divides 2^32.
(Flower's SecAgg+ seeds numpy's RandomState with 32 bits XOR-folded from the shared key, so a
mask can be found by trying 2^32 seeds, and draws randint(0, m - 1), which never yields m - 1.)
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

_CONSTANTS = (0x61707865, 0x3320646E, 0x79622D32, 0x6B206574)  # "expand 32-byte k"


def key_words(key: bytes) -> np.ndarray:
  """A 32-byte key as the 8 little-endian uint32 words of the ChaCha20 state."""
  if len(key) != 32:
    raise ValueError(f"ChaCha20 keys are 32 bytes, got {len(key)}")
  return np.frombuffer(key, dtype="<u4").astype(np.uint32)


def _rotl(x, n):
  return (x << np.uint32(n)) | (x >> np.uint32(32 - n))


def _quarter(s, a, b, c, d):
  s[a] = s[a] + s[b]; s[d] = _rotl(s[d] ^ s[a], 16)
  s[c] = s[c] + s[d]; s[b] = _rotl(s[b] ^ s[c], 12)
  s[a] = s[a] + s[b]; s[d] = _rotl(s[d] ^ s[a], 8)
  s[c] = s[c] + s[d]; s[b] = _rotl(s[b] ^ s[c], 7)


def _double_round(state):
  s = list(state)
  _quarter(s, 0, 4, 8, 12); _quarter(s, 1, 5, 9, 13)
  _quarter(s, 2, 6, 10, 14); _quarter(s, 3, 7, 11, 15)
  _quarter(s, 0, 5, 10, 15); _quarter(s, 1, 6, 11, 12)
  _quarter(s, 2, 7, 8, 13); _quarter(s, 3, 4, 9, 14)
  return tuple(s)


def chacha20_words(key: jax.Array, n_words: int, counter: int = 0,
                   nonce: tuple[int, int, int] = (0, 0, 0)) -> jax.Array:
  """The first n_words uint32 words of ChaCha20(key, nonce) from block `counter`.

  key: [8] uint32 (key_words); nonce: 3 uint32 words (masks use zero: one key per mask).
  Traceable: vmap over keys, call inside jit.
  """
  n_blocks = -(-n_words // 16)
  ctr = jnp.arange(n_blocks, dtype=jnp.uint32) + jnp.uint32(counter)
  zeros = jnp.zeros((n_blocks,), jnp.uint32)
  key = key.astype(jnp.uint32)
  init = tuple(jnp.full((n_blocks,), c, jnp.uint32) for c in _CONSTANTS)
  init += tuple(zeros + key[i] for i in range(8)) + (ctr,)
  init += tuple(zeros + jnp.uint32(n) for n in nonce)
  state = jax.lax.fori_loop(0, 10, lambda _, s: _double_round(s), init)
  out = jnp.stack([s + i for s, i in zip(state, init)], axis=1)  # [n_blocks, 16]
  return out.reshape(-1)[:n_words]


def chacha20_words_host(key: bytes, n_words: int, counter: int = 0) -> np.ndarray:
  """The same words from `cryptography`'s ChaCha20 (OpenSSL): nonce = counter (4 bytes LE)
  followed by 12 zero bytes, as RFC 8439 lays out the state."""
  nonce = int(counter).to_bytes(4, "little") + bytes(12)
  enc = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()
  return np.frombuffer(enc.update(bytes(4 * n_words)), dtype="<u4").astype(np.uint32)


@functools.partial(jax.jit, static_argnames=("n_words",))
def expand_masks(keys: jax.Array, signs: jax.Array, n_words: int) -> jax.Array:
  """For each row r: sum_s signs[r, s] * ChaCha20(keys[r, s]) mod 2^32, on the device.

  keys: [R, S, 8] uint32; signs: [R, S] int32 in {-1, 0, +1} (0: an unused slot, skipped in
  the sum but still expanded, so shapes stay fixed). Returns [R, n_words] uint32. A scan over
  the S slots keeps memory at two [R, n_words] arrays; the R rows are vmapped.
  """
  words = jax.vmap(chacha20_words, in_axes=(0, None))

  def step(acc, slot):
    k, s = slot
    stream = words(k, n_words)
    add = jnp.where(s[:, None] > 0, stream,
                    jnp.where(s[:, None] < 0, jnp.uint32(0) - stream, jnp.uint32(0)))
    return acc + add, None

  acc = jnp.zeros((keys.shape[0], n_words), jnp.uint32)
  acc, _ = jax.lax.scan(step, acc, (jnp.swapaxes(keys, 0, 1), jnp.swapaxes(signs, 0, 1)))
  return acc


def _keystream_into(key: bytes, zeros: bytes, row: np.ndarray) -> None:
  """Write ChaCha20(key) from block 0 (zero nonce) into the uint32 row, in place (OpenSSL)."""
  enc = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
  enc.update_into(zeros, memoryview(row).cast("B"))


_BUFFER_BYTES = 1 << 20  # keystreams expanded before each reduction: a cache-sized block


def signed_keystream_sum(keys, signs, n_words: int, out: np.ndarray | None = None,
                         buffer: np.ndarray | None = None) -> np.ndarray:
  """sum_j signs[j] * ChaCha20(keys[j]) mod 2^32 into `out` ([n_words] uint32), on the host.

  Keys with sign 0 are skipped (not expanded). The keystreams are written, a few at a time,
  into `buffer` ([rows, n_words] uint32, reused; at most ~1 MB unless one row is larger) and
  reduced with numpy: the +1 keys' streams added, the -1 keys' subtracted, never more than one
  buffer of streams in memory.
  """
  if out is None:
    out = np.zeros((n_words,), np.uint32)
  else:
    out[:] = 0
  if buffer is None:
    rows = max(1, min(16, _BUFFER_BYTES // max(4 * n_words, 1)))
    buffer = np.empty((rows, n_words), np.uint32)
  zeros = bytes(4 * n_words)
  for positive, add in ((True, np.add), (False, np.subtract)):
    picked = [k for k, s in zip(keys, signs) if (s > 0 if positive else s < 0)]
    for start in range(0, len(picked), buffer.shape[0]):
      chunk = picked[start:start + buffer.shape[0]]
      for i, key in enumerate(chunk):
        _keystream_into(key, zeros, buffer[i])
      part = buffer[0] if len(chunk) == 1 else buffer[:len(chunk)].sum(axis=0, dtype=np.uint32)
      add(out, part, out=out)
  return out


def expand_masks_host(keys: list[list[bytes]], signs, n_words: int) -> np.ndarray:
  """The same sums as expand_masks with `cryptography`'s ChaCha20 (OpenSSL) on the host.

  keys: per row, a list of 32-byte keys; signs: matching lists in {-1, 0, +1}. Returns
  [len(keys), n_words] uint32. Each distinct key is expanded once, into a reused buffer of a
  few rows, and added to (or subtracted from) every row that holds it: a pairwise mask key
  sits in both its sites' rows with opposite signs, so a simulated cohort expands each pair's
  keystream once (the same words either site would make). No [rows, slots, n_words] array is
  ever formed.
  """
  out = np.zeros((len(keys), n_words), np.uint32)
  uses = {}  # key -> [(row, sign)], in first-seen order
  for r, (row, row_signs) in enumerate(zip(keys, signs)):
    for key, sign in zip(row, row_signs):
      if sign:
        uses.setdefault(key, []).append((r, sign))
  rows = max(1, min(16, _BUFFER_BYTES // max(4 * n_words, 1)))
  buffer = np.empty((rows, n_words), np.uint32)
  zeros = bytes(4 * n_words)
  items = list(uses.items())
  for start in range(0, len(items), rows):
    chunk = items[start:start + rows]
    for i, (key, _) in enumerate(chunk):
      _keystream_into(key, zeros, buffer[i])
    for i, (_, targets) in enumerate(chunk):
      for r, sign in targets:
        (np.add if sign > 0 else np.subtract)(out[r], buffer[i], out=out[r])
  return out
