"""The ChaCha20 PRNG of dp.randomness=secret (fedjax_lab/privacy/randomness.py): its streams
against `cryptography`'s ChaCha20 (OpenSSL), a key's draws independent of where it sits in a
vmapped batch (what jax's rbg impl fails on CPU), normal/uniform draws against scipy's
distributions (KS), fold_in/split determinism and distinctness, and the 256-bit secret."""

import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from scipy import stats

from fedjax_lab import experiment
from fedjax_lab.privacy import randomness

WORDS = [0x03020100, 0x07060504, 0xDEADBEEF, 0, 0xFFFFFFFF, 12345, 0x80000000, 7]
KEY = randomness.secret_key(WORDS)
# The nonce tags as bytes, written out here rather than read from the module.
TAGS = {"fold": b"dlof", "split": b"tlps", "bits": b"stib", "seed": b"dees"}


def _openssl_words(key_words, tag: str, a: int, b: int, n_words: int) -> np.ndarray:
  """n_words of ChaCha20 (RFC 8439 layout: 4-byte block counter from 0, 12-byte nonce)."""
  key = np.asarray(key_words, "<u4").tobytes()
  nonce = bytes(4) + TAGS[tag] + struct.pack("<II", a, b)
  enc = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()
  return np.frombuffer(enc.update(bytes(4 * n_words)), "<u4")


def test_every_operation_is_the_chacha20_stream_of_its_nonce():
  # 100 words: several 16-word blocks, so the block counter is exercised too.
  np.testing.assert_array_equal(jax.random.bits(KEY, (100,), jnp.uint32),
                                _openssl_words(WORDS, "bits", 0, 0, 100))
  np.testing.assert_array_equal(jax.random.bits(KEY, (5, 4), jnp.uint8),
                                (_openssl_words(WORDS, "bits", 0, 0, 20) & 0xFF).reshape(5, 4))
  for d in (0, 1, 0xFFFFFFFF):
    folded = jax.random.key_data(jax.random.fold_in(KEY, jnp.uint32(d)))
    np.testing.assert_array_equal(folded, _openssl_words(WORDS, "fold", d, 0, 8))
  np.testing.assert_array_equal(jax.random.key_data(jax.random.split(KEY, 3)),
                                _openssl_words(WORDS, "split", 0, 0, 24).reshape(3, 8))
  np.testing.assert_array_equal(jax.random.key_data(jax.random.key(5, impl=randomness.CHACHA20)),
                                _openssl_words([0] * 8, "seed", 5, 0, 8))


def test_64_bit_draws_join_two_words():
  with jax.enable_x64(True):
    bits = np.asarray(jax.random.bits(KEY, (6,), jnp.uint64))
  w = _openssl_words(WORDS, "bits", 0, 0, 12).astype(np.uint64)
  np.testing.assert_array_equal(bits, (w[:6] << np.uint64(32)) | w[6:])


def _draws(key):
  return (jax.random.normal(key, (7,)), jax.random.uniform(key, (3,)),
          jax.random.bits(key, (5,), jnp.uint32), jax.random.randint(key, (4,), 0, 1000),
          jax.random.permutation(key, 9), jax.random.bernoulli(key, 0.3, (6,)),
          jax.random.key_data(jax.random.fold_in(key, 3)),
          jax.random.key_data(jax.random.split(key, 2)))


def test_a_keys_draws_do_not_depend_on_its_place_in_a_batch():
  """The property jax's rbg impl fails on CPU: a site's draws must not change with chunking,
  padding or device layout. Reference: the key drawn alone, eagerly."""
  site = jax.random.fold_in(KEY, 17)
  alone = _draws(site)
  others = jax.random.split(jax.random.fold_in(KEY, 99), 15)
  draw = jax.jit(jax.vmap(_draws))
  for width in (1, 2, 5, 16):  # batches of several widths (a padded one: 16)
    for position in sorted({0, width // 2, width - 1}):
      batch = jnp.concatenate([others[:position], site[None], others[position:width - 1]])
      for got, want in zip(draw(batch), alone):
        np.testing.assert_array_equal(got[position], want)
  # In a loop (lax.map) and under a nested vmap.
  looped = jax.lax.map(_draws, jnp.stack([others[0], site]))
  nested = jax.vmap(jax.vmap(_draws))(jnp.stack([others[:2], jnp.stack([others[2], site])]))
  for got_l, got_n, want in zip(looped, nested, alone):
    np.testing.assert_array_equal(got_l[1], want)
    np.testing.assert_array_equal(got_n[1, 1], want)
  # fold_in with traced data, as a round folds in the site id.
  fold = jax.jit(jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(KEY, i), (4,))))
  np.testing.assert_array_equal(fold(jnp.arange(20))[17], jax.random.normal(site, (4,)))


def test_normal_and_uniform_pass_ks_against_scipy():
  n = 20000
  for draw, cdf in ((jax.random.normal, stats.norm.cdf), (jax.random.uniform, stats.uniform.cdf)):
    one_key = np.asarray(draw(KEY, (n,)))
    assert stats.kstest(one_key, cdf).pvalue > 1e-3
    # The first draw of many keys: the keys split and folded from one are independent too.
    across = np.asarray(jax.vmap(lambda k: draw(k, ()))(jax.random.split(KEY, n)))
    assert stats.kstest(across, cdf).pvalue > 1e-3
    folded = np.asarray(jax.vmap(lambda i: draw(jax.random.fold_in(KEY, i), ()))(jnp.arange(n)))
    assert stats.kstest(folded, cdf).pvalue > 1e-3
  # Each bit of the 32-bit words is fair (a 5-sigma band around n/2).
  bits = np.asarray(jax.random.bits(KEY, (n,), jnp.uint32))
  ones = ((bits[:, None] >> np.arange(32, dtype=np.uint32)) & 1).sum(axis=0)
  assert np.all(np.abs(ones - n / 2) < 5 * np.sqrt(n / 4))


def test_fold_in_and_split_are_deterministic_and_distinct():
  folds = np.asarray(jax.vmap(lambda i: jax.random.key_data(jax.random.fold_in(KEY, i)))(
      jnp.arange(1000)))
  splits = np.asarray(jax.random.key_data(jax.random.split(KEY, 1000)))
  rows = {tuple(r) for r in np.concatenate([folds, splits, [WORDS]])}
  assert len(rows) == 2001  # no two children, nor the parent, share a key
  np.testing.assert_array_equal(
      folds, jax.vmap(lambda i: jax.random.key_data(jax.random.fold_in(KEY, i)))(jnp.arange(1000)))
  np.testing.assert_array_equal(splits, jax.random.key_data(jax.random.split(KEY, 1000)))
  # Another key: other children.
  other = randomness.secret_key(WORDS[:7] + [WORDS[7] ^ 1])
  assert not np.array_equal(jax.random.key_data(jax.random.fold_in(other, 0)), folds[0])


def test_the_secret_is_256_bits_of_os_entropy():
  one, two = experiment.draw_secret(), experiment.draw_secret()
  assert len(one) == 8 and all(0 <= w < 2 ** 32 for w in one) and one != two
  key = randomness.secret_key(one)
  assert randomness.impl_name(key) == "chacha20"
  np.testing.assert_array_equal(jax.random.key_data(key), np.asarray(one, np.uint32))
  with pytest.raises(ValueError, match="256 bits"):
    randomness.secret_key(one[:2])  # a 64-bit (threefry-sized) secret


def test_saved_key_data_comes_back_as_the_same_key():
  for key in (KEY, jax.random.key(3)):
    back = randomness.wrap_key_data(np.asarray(jax.random.key_data(key)),
                                    randomness.impl_name(key))
    np.testing.assert_array_equal(jax.random.normal(back, (5,)), jax.random.normal(key, (5,)))
