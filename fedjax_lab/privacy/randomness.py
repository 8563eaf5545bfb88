"""The DP mechanism's randomness under dp.randomness=secret: a ChaCha20 PRNG with 256-bit keys.

Why not jax's own impls: threefry2x32 keys are 64 bits, so a secret held as (or derived into)
a threefry key can be found by trying 2^64 keys against the released model; "rbg" keys are 128
bits, but on jax 0.10.2 (CPU) vmapped `normal`/`bits` on rbg keys depend on the key's position
in the vmapped batch, so a site's noise would change with chunking or device layout.

`CHACHA20` is a jax PRNG impl (jax.extend.random.define_prng_impl) whose every operation is
ChaCha20 (RFC 8439; secagg/prg.chacha20_words, checked against OpenSSL) keyed by the 8-word
(256-bit) key and used as a PRF, each operation under its own nonce so their outputs never
overlap:
  fold_in(k, d)       = words 0..7   of ChaCha20(k, nonce=(_FOLD, d, 0))
  split(k, shape)     = words 0..8n-1 of ChaCha20(k, nonce=(_SPLIT, 0, 0)), 8 per child
  random_bits(k, b, s)= the first prod(s) (b = 64: 2 prod(s)) words of ChaCha20(k, (_BITS, 0, 0))
  seed(s)             = words 0..7 of ChaCha20(0, nonce=(_SEED, lo(s), hi(s))) (only 64 bits
                        of entropy: secret keys come from `secret_key`, never from a seed)
Each operation maps one key to its output with jax.numpy only, so vmap (jax batches the impl's
functions itself) gives every key the same draws wherever it sits in a batch.
Assumption: ChaCha20 is a PRF in its key (the standard one; SecAgg's masks rest on it too).
"""

import math

import jax
from jax import lax
import jax.extend.random
import jax.numpy as jnp
import numpy as np

from fedjax_lab.secagg.prg import chacha20_words

SECRET_WORDS = 8  # uint32 words of a secret: 256 bits
# Nonce tags ("fold", "splt", "bits", "seed" in ASCII): one ChaCha20 stream per operation.
_FOLD, _SPLIT, _BITS, _SEED = 0x666F6C64, 0x73706C74, 0x62697473, 0x73656564
_UINT = {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32, 64: jnp.uint64}


def _stream(key, n_words, nonce):
  return chacha20_words(key, n_words, nonce=nonce)


def _seed(seed):
  if seed.shape or not jnp.issubdtype(seed.dtype, jnp.integer):
    raise TypeError(f"a PRNG seed must be an integer scalar; got {seed!r}")
  lo = lax.convert_element_type(seed, jnp.uint32)
  hi = (lax.convert_element_type(lax.shift_right_logical(seed, lax._const(seed, 32)), jnp.uint32)
        if jnp.iinfo(seed.dtype).bits == 64 else jnp.uint32(0))
  return _stream(jnp.zeros((8,), jnp.uint32), 8, (_SEED, lo, hi))


def _fold_in(key, data):
  return _stream(key, 8, (_FOLD, lax.convert_element_type(data, jnp.uint32), 0))


def _split(key, shape):
  n = math.prod(shape)
  return _stream(key, 8 * n, (_SPLIT, 0, 0)).reshape(*shape, 8)


def _random_bits(key, bit_width, shape):
  if bit_width not in _UINT:
    raise TypeError(f"random bits of width {bit_width}: 8, 16, 32 or 64 only")
  n = math.prod(shape)
  if n * max(bit_width // 32, 1) > 2 ** 36:  # ChaCha20's 32-bit block counter per stream
    raise NotImplementedError(f"{n} random values from one ChaCha20 key: split the key first")
  words = _stream(key, n * max(bit_width // 32, 1), (_BITS, 0, 0))
  if bit_width == 64:
    hi, lo = (lax.convert_element_type(w, jnp.uint64) for w in (words[:n], words[n:]))
    return ((hi << jnp.uint64(32)) | lo).reshape(shape)
  return lax.convert_element_type(words, _UINT[bit_width]).reshape(shape)


CHACHA20 = jax.extend.random.define_prng_impl(
    key_shape=(8,), seed=_seed, split=_split, random_bits=_random_bits, fold_in=_fold_in,
    name="chacha20", tag="cc20")


def secret_key(words) -> jax.Array:
  """The typed ChaCha20 key of a secret (experiment.draw_secret: 8 uint32 words of OS
  entropy). The one place a secret becomes a key, for the lab (Experiment.set_secret) and the
  VAE (generative/federated.round_keys) alike."""
  words = np.asarray(words, np.uint32)
  if words.shape != (SECRET_WORDS,):
    raise ValueError(f"a secret is {SECRET_WORDS} uint32 words (256 bits), got shape "
                     f"{words.shape}; a checkpoint from before 256-bit secrets cannot resume")
  return jax.random.wrap_key_data(words, impl=CHACHA20)


def impl_name(key: jax.Array) -> str:
  """"chacha20" or jax's name of the key's impl ("threefry2x32"): what wrap_key_data needs."""
  impl = jax.random.key_impl(key)
  return "chacha20" if impl == CHACHA20 else str(impl)


def wrap_key_data(data, impl: str = "threefry2x32") -> jax.Array:
  """jax.random.wrap_key_data for the lab's impls, by impl_name (a saved key's data back)."""
  data = jnp.asarray(data, jnp.uint32)
  return jax.random.wrap_key_data(data, impl=CHACHA20 if impl == "chacha20" else impl)
