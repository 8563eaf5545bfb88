"""Key agreement and share encryption, from `cryptography` (OpenSSL), on the host.

* X25519 (RFC 7748) per-round key pairs: each site has one pair (c) to encrypt the Shamir
  shares it sends through the server, one pair (s) whose agreements seed the pairwise masks.
* HKDF-SHA256 (RFC 5869; extract and expand written with the standard library's HMAC-SHA256,
  which is OpenSSL's: the same bytes as `cryptography`'s HKDF class, tested, at a quarter of
  its per-call cost) turns an X25519 shared secret into 32-byte keys, with the round's
  public salt and an `info` naming the purpose (and, for masks, both public keys; for share
  encryption, the direction sender -> recipient), so no key serves two purposes.
* ChaCha20-Poly1305 (RFC 8439 AEAD) encrypts each share message; the associated data binds it
  to (round, sender, recipient), so the server can neither read nor re-route a share.
"""

import functools
import hmac
import os

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

_RAW = dict(encoding=serialization.Encoding.Raw, format=serialization.PublicFormat.Raw)
_RAW_PRIVATE = dict(encoding=serialization.Encoding.Raw, format=serialization.PrivateFormat.Raw,
                    encryption_algorithm=serialization.NoEncryption())
NONCE_BYTES = 12
TAG_BYTES = 16


def generate_keypair() -> tuple[X25519PrivateKey, bytes]:
  """A fresh X25519 key pair from OS entropy: (private key, 32-byte raw public key)."""
  sk = X25519PrivateKey.generate()
  return sk, public_bytes(sk)


def public_bytes(sk: X25519PrivateKey) -> bytes:
  return sk.public_key().public_bytes(**_RAW)


def private_bytes(sk: X25519PrivateKey) -> bytes:
  return sk.private_bytes(**_RAW_PRIVATE)


def private_from_bytes(raw: bytes) -> X25519PrivateKey:
  return X25519PrivateKey.from_private_bytes(raw)


def hkdf(secret: bytes, salt: bytes, info: bytes, length: int = 32) -> bytes:
  """HKDF-SHA256 (RFC 5869): PRK = HMAC(salt, secret), T(i) = HMAC(PRK, T(i-1) || info || i)."""
  if not 0 < length <= 255 * 32:
    raise ValueError(f"HKDF-SHA256 makes 1 to {255 * 32} bytes, asked for {length}")
  prk = hmac.digest(salt or bytes(32), secret, "sha256")
  out, block = b"", b""
  for i in range(1, -(-length // 32) + 1):
    block = hmac.digest(prk, block + info + bytes((i,)), "sha256")
    out += block
  return out[:length]


@functools.lru_cache(maxsize=4096)
def _public_key(raw: bytes) -> X25519PublicKey:
  """A peer's public key parsed once, not once per agreement with it (public data only)."""
  return X25519PublicKey.from_public_bytes(raw)


def exchange(sk: X25519PrivateKey, peer_public: bytes) -> bytes:
  """The raw X25519 shared secret (refuses the all-zero output of a small-order point)."""
  shared = sk.exchange(_public_key(peer_public))
  if shared == bytes(32):  # OpenSSL also refuses it; kept explicit
    raise ValueError("X25519 agreement with a small-order public key")
  return shared


def mask_key(sk: X25519PrivateKey, my_public: bytes, peer_public: bytes, salt: bytes) -> bytes:
  """The 32-byte ChaCha20 key of the pairwise mask of two sites (the same from either side)."""
  lo, hi = sorted((my_public, peer_public))
  return hkdf(exchange(sk, peer_public), salt, b"fedjax_lab/secagg/pairwise-mask/v1" + lo + hi)


def self_mask_key(seed: bytes, salt: bytes) -> bytes:
  """The 32-byte ChaCha20 key of a site's self mask, from its 32-byte seed b_u."""
  return hkdf(seed, salt, b"fedjax_lab/secagg/self-mask/v1")


def share_key(shared: bytes, salt: bytes, sender: int, recipient: int) -> bytes:
  """The AEAD key for shares sent from `sender` to `recipient` (one per direction)."""
  info = b"fedjax_lab/secagg/share-encryption/v1" + _ids(sender, recipient)
  return hkdf(shared, salt, info)


def _ids(sender: int, recipient: int) -> bytes:
  return int(sender).to_bytes(4, "big") + int(recipient).to_bytes(4, "big")


def encrypt(key: bytes, plaintext: bytes, salt: bytes, sender: int, recipient: int,
            nonce: bytes | None = None) -> bytes:
  """nonce || ChaCha20-Poly1305(plaintext), the associated data binding round and route.

  nonce: 12 bytes from OS entropy, drawn here unless given (a caller encrypting many messages
  passes slices of one os.urandom read; each key encrypts one message per round anyway)."""
  nonce = os.urandom(NONCE_BYTES) if nonce is None else nonce
  if len(nonce) != NONCE_BYTES:
    raise ValueError(f"ChaCha20-Poly1305 nonces are {NONCE_BYTES} bytes, got {len(nonce)}")
  return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, salt + _ids(sender, recipient))


def decrypt(key: bytes, message: bytes, salt: bytes, sender: int, recipient: int) -> bytes:
  """Raises cryptography.exceptions.InvalidTag if the message was altered or re-routed."""
  nonce, body = message[:NONCE_BYTES], message[NONCE_BYTES:]
  return ChaCha20Poly1305(key).decrypt(nonce, body, salt + _ids(sender, recipient))
