"""The secure round's host speed-ups (issue 29, part C) change no value: HKDF against
`cryptography`'s HKDF class, batched Shamir against exact Lagrange interpolation in
fractions, the simulation's once-per-pair secrets against each end's own derivation, and the
deduplicated host keystreams against a per-stream sum."""

import os
import random
from fractions import Fraction

import numpy as np
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedjax_lab.secagg import crypto, prg, shamir
from fedjax_lab.secagg.protocol import PairSecrets, Server, Site


@pytest.mark.parametrize("length", [1, 16, 32, 33, 64, 100])
@pytest.mark.parametrize("salt", [b"", b"\x01" * 16])
def test_hkdf_is_rfc5869_as_cryptography_computes_it(length, salt):
  secret, info = os.urandom(32), os.urandom(45)
  reference = HKDF(algorithm=hashes.SHA256(), length=length, salt=salt or None,
                   info=info).derive(secret)
  assert crypto.hkdf(secret, salt, info, length) == reference


def _lagrange_at_zero(shares):
  """f(0) in GF(p) from exact rational Lagrange weights (no modular shortcut)."""
  total = Fraction(0)
  for i, (xi, yi) in enumerate(shares):
    w = Fraction(1)
    for j, (xj, _) in enumerate(shares):
      if j != i:
        w *= Fraction(xj, xj - xi)
    total += yi * w
  return total.numerator * pow(total.denominator, -1, shamir.PRIME) % shamir.PRIME


def test_split_many_shares_each_secret_on_its_own_polynomial():
  t, rng = 5, random.Random(0)
  secrets = [os.urandom(32) for _ in range(6)]
  xs = [rng.sample(range(1, 40), 8) for _ in secrets]
  for secret, shares, holders in zip(secrets, shamir.split_many(secrets, t, xs), xs):
    assert [x for x, _ in shares] == holders
    assert all(0 <= y < shamir.PRIME for _, y in shares)
    for _ in range(3):
      subset = rng.sample(shares, t)
      assert _lagrange_at_zero(subset) == int.from_bytes(secret, "big")
      assert shamir.reconstruct(subset, t) == secret
    # t shares fix the polynomial: the other shares lie on it
    x0, _ = shares[t]
    others = shares[:t]
    assert shamir.interpolate_at(others, x0) == shares[t][1]
  with pytest.raises(ValueError, match="threshold"):
    shamir.split_many(secrets[:1], 9, xs[:1])


def test_random_below_stays_in_the_field_and_is_not_constant():
  draws = shamir.random_below(2000)
  assert len(draws) == 2000 and all(0 <= c < shamir.PRIME for c in draws)
  assert len(set(draws)) == 2000
  # top bit of a uniform element of [0, p) is set with probability (p - 2^256) / p ~ 0;
  # bit 255 with probability ~ 1/2: a 257-bit candidate cut wrongly would skew it
  share = np.mean([(c >> 255) & 1 for c in draws])
  assert abs(share - 0.5) < 4 * 0.5 / np.sqrt(2000)


def _run_sites(K, k, t, pairs):
  salt = os.urandom(16)
  server = Server(K, k, t, 32, salt, rng=random.Random(1))
  sites = [Site(u, salt, t, pairs) for u in range(K)]
  roster, graph = server.collect_keys([s.advertise() for s in sites])
  inbox = server.route_shares([m for u in range(K) for m in sites[u].share_keys(roster, graph[u])],
                              range(K))
  for u in range(K):
    sites[u].receive_shares(inbox.get(u, []))
  return salt, sites, graph, [sites[u].mask_material(range(K)) for u in range(K)]


def test_pair_secrets_are_what_each_end_derives_and_halve_the_agreements(monkeypatch):
  calls = []
  real = crypto.exchange
  monkeypatch.setattr(crypto, "exchange", lambda sk, pk: calls.append(1) or real(sk, pk))
  K, k, t = 12, 4, 3
  salt, sites, graph, material = _run_sites(K, k, t, PairSecrets())
  edges = sum(len(n) for n in graph.values()) // 2
  assert len(calls) == 2 * edges  # one c and one s agreement per pair, not per end
  for u, (keys, signs) in enumerate(material):
    assert keys[0] == crypto.self_mask_key(sites[u]._seed, salt) and signs[0] == 1
    for v, key, sign in zip(graph[u], keys[1:], signs[1:]):
      # u's own derivation, from u's private key: what a deployed site would compute
      assert key == crypto.mask_key(sites[u]._s_sk, sites[u].s_public, sites[v].s_public, salt)
      assert sign == (1 if v > u else -1)
    # the shares u's neighbours decrypted (under the u -> v keys) rebuild u's secrets
    held = [sites[v]._held[u] for v in graph[u][:t]]
    assert shamir.reconstruct([b for b, _ in held], t) == sites[u]._seed
    assert shamir.reconstruct([s for _, s in held], t) == crypto.private_bytes(sites[u]._s_sk)
  calls.clear()
  _run_sites(K, k, t, None)  # without the simulation's cache: every end computes its own
  assert len(calls) == 4 * edges


def test_host_masks_expand_a_shared_key_once_with_each_rows_sign(monkeypatch):
  n, keys = 700, [os.urandom(32) for _ in range(6)]
  rows = [[keys[0], keys[1], keys[2]], [keys[3], keys[1]], [keys[2], keys[4], keys[5]], []]
  signs = [[1, 1, -1], [1, -1], [1, 0, -1], []]
  expanded = []
  real = prg._keystream_into
  monkeypatch.setattr(prg, "_keystream_into",
                      lambda key, zeros, row: expanded.append(key) or real(key, zeros, row))
  out = prg.expand_masks_host(rows, signs, n)
  for r, (row, row_signs) in enumerate(zip(rows, signs)):
    expected = np.zeros(n, np.uint32)
    for key, sign in zip(row, row_signs):
      expected += np.uint32(sign % (1 << 32)) * prg.chacha20_words_host(key, n)
    np.testing.assert_array_equal(out[r], expected)
  assert sorted(expanded) == sorted({keys[i] for i in (0, 1, 2, 3, 5)})  # key 4: sign 0
