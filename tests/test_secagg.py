"""Secure aggregation (fedjax_lab/secagg): the crypto against `cryptography`, Shamir, exact
unmasking under dropouts at every stage, clean aborts, what the server sees, validation,
clipping counts, and Dopamine's noise through the protocol."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from scipy import stats

from fedjax_lab import secagg
from fedjax_lab.secagg import crypto, masking, prg, shamir
from fedjax_lab.secagg.protocol import Server, Site

K, D = 10, 300


def _updates(seed=0, K=K, d=D, scale=0.4):
  return jax.random.normal(jax.random.key(seed), (K, d)) * scale


def _plain_sum(updates, key, cfg, survivors):
  """The quantized sum of the survivors' rows, computed in the clear (no masks)."""
  levels = secagg.levels_for(updates.shape[0], cfg.bits)
  q, _ = secagg.quantize_sites(updates, secagg.split_key(key)[0], cfg.clip_range,
                               levels=levels)
  return np.asarray(q)[survivors].sum(axis=0, dtype=np.uint64) % (1 << cfg.bits)


# ----------------------------------------------------------------------------- primitives
def test_chacha20_on_device_is_cryptographys_chacha20_bit_for_bit():
  for n, counter in ((1, 0), (37, 0), (1000, 7)):
    key = os.urandom(32)
    device = prg.chacha20_words(jnp.asarray(prg.key_words(key)), n, counter)
    np.testing.assert_array_equal(np.asarray(device), prg.chacha20_words_host(key, n, counter))
  # RFC 8439 section 2.3.2: the block function's test vector (key 00..1f, counter 1)
  key = bytes(range(32))
  nonce = tuple(int(w) for w in np.frombuffer(bytes.fromhex("000000090000004a00000000"), "<u4"))
  block = np.asarray(prg.chacha20_words(jnp.asarray(prg.key_words(key)), 16, 1, nonce))
  assert block.astype("<u4").tobytes()[:16].hex() == "10f1e7e4d13b5915500fdd1fa32071c4"


def test_key_agreement_matches_cryptography_directly():
  salt = os.urandom(16)
  a_sk, a_pk = crypto.generate_keypair()
  b_sk, b_pk = crypto.generate_keypair()
  ours = crypto.mask_key(a_sk, a_pk, b_pk, salt)
  assert ours == crypto.mask_key(b_sk, b_pk, a_pk, salt)  # the same from either side
  raw = X25519PrivateKey.from_private_bytes(crypto.private_bytes(a_sk)).exchange(
      b_sk.public_key())
  lo, hi = sorted((a_pk, b_pk))
  direct = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt,
                info=b"fedjax_lab/secagg/pairwise-mask/v1" + lo + hi).derive(raw)
  assert ours == direct and len(ours) == 32
  # share encryption: one key per direction, bound to the route
  k_ab = crypto.share_key(raw, salt, 1, 2)
  assert k_ab != crypto.share_key(raw, salt, 2, 1)
  msg = crypto.encrypt(k_ab, b"share", salt, 1, 2)
  assert crypto.decrypt(k_ab, msg, salt, 1, 2) == b"share"
  with pytest.raises(InvalidTag):
    crypto.decrypt(k_ab, msg, salt, 1, 3)  # re-routed by the server
  with pytest.raises(InvalidTag):
    crypto.decrypt(k_ab, msg[:-1] + bytes([msg[-1] ^ 1]), salt, 1, 2)  # altered


def test_shamir_any_t_shares_reconstruct_and_t_minus_1_do_not():
  rng = np.random.default_rng(0)
  secret = os.urandom(32)
  t, xs = 4, list(range(1, 8))
  shares = shamir.split(secret, t, xs)
  for _ in range(10):
    subset = [shares[i] for i in rng.choice(len(shares), t, replace=False)]
    assert shamir.reconstruct(subset, t) == secret
  few = shares[:t - 1]
  with pytest.raises(ValueError):
    shamir.reconstruct(few, t)
  # t - 1 shares are consistent with ANY secret: the polynomial through them and (0, guess)
  # has degree t - 1, so they carry no information (perfect secrecy)
  for guess in (0, 12345, int.from_bytes(secret, "big")):
    poly = few + [(0, guess)]
    assert shamir.interpolate_at(poly, 0) == guess
    assert all(shamir.interpolate_at(poly, x) == y for x, y in few)
  # and t - 1 real shares plus one forged share reconstruct a wrong secret
  forged = few + [(xs[-1], 1)]
  assert shamir.interpolate_at(forged, 0) != int.from_bytes(secret, "big")


def test_device_and_host_masking_agree_bit_for_bit():
  # the shapes and bits of the protocol tests below, so the device path compiles once
  x, key = _updates(1), jax.random.key(3)
  rng = np.random.default_rng(0)
  keys = [[os.urandom(32) for _ in range(K)] for _ in range(K)]
  signs = rng.integers(-1, 2, size=(K, K)).tolist()
  words = jnp.asarray([[prg.key_words(k) for k in row] for row in keys])
  dev, c1 = masking.mask_update(x, key, words, jnp.asarray(signs, jnp.int32), 2.0,
                                levels=1000, bits=24)
  host, c2 = masking.mask_update_host(x, key, keys, signs, 2.0, levels=1000, bits=24)
  np.testing.assert_array_equal(np.asarray(dev), host)
  np.testing.assert_array_equal(np.asarray(c1), c2)


def test_host_masks_in_chunks_are_the_per_stream_sums(monkeypatch):
  # a buffer of 3 rows (and then 1): the +1 and -1 keys reduced a few at a time, 0 skipped
  n, keys = 1000, [os.urandom(32) for _ in range(23)]
  signs = np.random.default_rng(1).integers(-1, 2, size=len(keys)).tolist()
  expected = np.zeros(n, np.uint32)
  for key, sign in zip(keys, signs):
    if sign:
      expected += np.uint32(sign % (1 << 32)) * prg.chacha20_words_host(key, n)
  for budget in (3 * 4 * n, 1):
    monkeypatch.setattr(prg, "_BUFFER_BYTES", budget)
    np.testing.assert_array_equal(prg.signed_keystream_sum(keys, signs, n), expected)
    rows = prg.expand_masks_host([keys, keys[:5], []], [signs, signs[:5], []], n)
    np.testing.assert_array_equal(rows[0], expected)
    np.testing.assert_array_equal(rows[2], 0)


def test_prg_auto_is_host_on_cpu_and_all_paths_give_the_same_round():
  backend = jax.default_backend()
  assert secagg.config.resolve_prg("auto") == ("host" if backend == "cpu" else "device")
  assert secagg.SecAggConfig().prg == "auto"
  x, key = _updates(4), jax.random.key(4)
  dropouts = np.array([0, 2, 0, 3, 0, 0, 2, 0, 0, 0])  # pairwise and self masks removed
  sums = {}
  for path in ("auto", "device", "host"):
    cfg = secagg.SecAggConfig(threshold=6, bits=24, clip_range=2.0, prg=path)
    r = secagg.secure_sum(x, key, cfg, dropouts=dropouts, keep_masked=True)
    assert not r.aborted, r.abort_reason
    assert isinstance(r.masked, jax.Array) and r.masked.shape == (8, D)
    sums[path] = np.asarray(r.sum_int)
    np.testing.assert_array_equal(sums[path], _plain_sum(x, key, cfg, r.survivors))
  with pytest.raises(ValueError, match="prg"):
    secagg.validate_secagg(K, None, None, 32, 1.0, 0.0, prg="gpu")


# ----------------------------------------------------------------------------- the protocol
@pytest.mark.parametrize("stage,fraction", [(0, 0.0)] + [(s, f) for s in (1, 2, 3)
                                                       for f in (0.1, 0.3, 0.4)])
def test_unmasked_sum_is_the_plain_quantized_sum_bit_for_bit(stage, fraction):
  cfg = secagg.SecAggConfig(threshold=6, bits=24, clip_range=2.0)  # complete graph, k = 9
  x, key = _updates(stage), jax.random.key(10 * stage + int(10 * fraction))
  dropouts = np.zeros(K, int)
  dropouts[np.random.default_rng(stage).permutation(K)[:round(fraction * K)]] = stage
  r = secagg.secure_sum(x, key, cfg, dropouts=dropouts)
  assert not r.aborted, r.abort_reason
  expected_in = dropouts == 0 if stage in (1, 2) else np.ones(K, bool)  # stage 3: uploaded
  np.testing.assert_array_equal(r.survivors, expected_in)
  np.testing.assert_array_equal(np.asarray(r.sum_int), _plain_sum(x, key, cfg, r.survivors))
  # dequantized mean vs the float mean of the same rows: within one grid step (each site's
  # stochastic rounding errs by < 2c/L), and within the K * 2c / 2^b
  mean = np.asarray(x)[r.survivors].mean(axis=0)
  err = np.abs(np.asarray(r.mean) - mean).max()
  assert err < 2 * cfg.clip_range / r.levels * (1 + 1e-4)
  assert err < K * 2 * cfg.clip_range / 2 ** cfg.bits
  assert r.clipped_count == 0


def test_secagg_plus_random_dropouts_either_exact_or_aborted():
  cfg = secagg.SecAggConfig(neighbours=4, threshold=3, bits=16, clip_range=2.0,
                            dropout_rate=0.08, prg="host")
  K2 = 16
  x = _updates(5, K=K2, d=64)
  outcomes = []
  for i in range(12):
    key = jax.random.key(100 + i)
    r = secagg.secure_sum(x, key, cfg)
    if r.aborted:
      assert r.sum is None and r.sum_int is None and not r.survivors.any() and r.abort_reason
    else:
      np.testing.assert_array_equal(np.asarray(r.sum_int), _plain_sum(x, key, cfg, r.survivors))
    outcomes.append(r.aborted)
  print(f"{sum(outcomes)} of {len(outcomes)} rounds aborted")
  assert not all(outcomes)  # P(all 12 abort) is ~1e-5 at these settings


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_fewer_than_threshold_survivors_abort_cleanly(stage):
  cfg = secagg.SecAggConfig(threshold=6, bits=16, prg="host")
  dropouts = np.zeros(K, int)
  dropouts[:5] = stage  # 5 of 10 left, t = 6
  r = secagg.secure_sum(_updates(), jax.random.key(0), cfg, dropouts=dropouts)
  assert r.aborted and r.sum is None and r.sum_int is None
  assert "threshold 6" in r.abort_reason
  np.testing.assert_array_equal(r.dropped_at, dropouts)


def test_server_side_unmasks_from_exactly_what_it_receives():
  """Drive the rounds by hand: the server object gets only messages, masked rows, shares."""
  cfg = secagg.SecAggConfig(neighbours=6, threshold=4, bits=20, clip_range=2.0)
  K2, salt = 12, os.urandom(16)
  k, t, levels = secagg.validate_secagg(K2, cfg.neighbours, cfg.threshold, cfg.bits,
                                        cfg.clip_range, 0.0)
  x, key = _updates(7, K=K2, d=80), jax.random.key(7)
  server = Server(K2, k, t, cfg.bits, salt)
  sites = [Site(u, salt, t) for u in range(K2)]
  roster, graph = server.collect_keys([s.advertise() for s in sites])
  gone_before_sharing, gone_before_upload, gone_before_unmask = {0}, {5}, {9}
  senders = [u for u in range(K2) if u not in gone_before_sharing]
  inbox = server.route_shares([m for u in senders for m in sites[u].share_keys(roster, graph[u])],
                              senders)
  for u in server.u2:
    sites[u].receive_shares(inbox.get(u, []))
  material = {u: sites[u].mask_material(server.u2) for u in server.u2}
  keys_b = [material.get(u, ([bytes(32)] * (k + 1), [0] * (k + 1)))[0] for u in range(K2)]
  signs_l = [material.get(u, ([bytes(32)] * (k + 1), [0] * (k + 1)))[1] for u in range(K2)]
  masked, _ = masking.mask_update_host(x, secagg.split_key(key)[0], list(map(list, keys_b)),
                                       [list(ss) for ss in signs_l], cfg.clip_range,
                                       levels=levels, bits=cfg.bits)
  uploaded = [u for u in server.u2 if u not in gone_before_upload]
  server.collect_uploads(uploaded)
  received = np.asarray(masked)[list(server.u3)]  # the bytes on the wire, nothing else
  responses = [sites[u].unmask(server.u2, server.u3) for u in server.u3
               if u not in gone_before_unmask]
  total = server.unmask(jnp.asarray(received), responses, prg_path="host")
  survivors = np.isin(np.arange(K2), server.u3)
  np.testing.assert_array_equal(np.asarray(total), _plain_sum(x, key, cfg, survivors))
  # the server never held a private key or a seed: only public keys and shares
  held = repr(vars(server))
  for s in sites:
    assert s._seed.hex() not in held and str(int.from_bytes(s._seed, "big")) not in held
  assert not any(isinstance(v, X25519PrivateKey) for v in vars(server).values())
  # an honest site refuses a U_3 outside U_2 (a server fishing for both kinds of share)
  with pytest.raises(secagg.Abort):
    sites[1].unmask(server.u2, set(server.u3) | {0})


def test_one_masked_vector_is_uniform_and_uncorrelated_with_the_update():
  cfg = secagg.SecAggConfig(bits=8, clip_range=1.0, prg="host")  # levels = 24 per site
  d = 25_600
  x = jnp.tanh(_updates(11, d=d, scale=1.0))
  levels = secagg.levels_for(K, cfg.bits)
  k, t, _ = secagg.validate_secagg(K, None, None, cfg.bits, cfg.clip_range, 0.0)
  salt = os.urandom(16)
  server = Server(K, k, t, cfg.bits, salt)
  sites = [Site(u, salt, t) for u in range(K)]
  roster, graph = server.collect_keys([s.advertise() for s in sites])
  inbox = server.route_shares([m for u in range(K) for m in sites[u].share_keys(roster, graph[u])],
                              range(K))
  for u in range(K):
    sites[u].receive_shares(inbox.get(u, []))
  keys, signs = zip(*[sites[u].mask_material(range(K)) for u in range(K)])
  masked, _ = masking.mask_update_host(x, jax.random.key(1), list(keys), list(signs),
                                       cfg.clip_range, levels=levels, bits=cfg.bits)
  row = masked[3].astype(np.int64)
  counts = np.bincount(row, minlength=256)
  assert stats.chisquare(counts).pvalue > 1e-4  # uniform over Z_{2^8}
  plain, _ = secagg.quantize_sites(x, jax.random.key(1), cfg.clip_range, levels=levels)
  plain_counts = np.bincount(np.asarray(plain)[3].astype(np.int64), minlength=256)
  assert stats.chisquare(plain_counts).pvalue < 1e-100  # the test has power: plain is not
  r = np.corrcoef(row, np.asarray(x)[3])[0, 1]
  assert abs(r) < 4 / np.sqrt(d)


# ----------------------------------------------------------------------------- settings
@pytest.mark.parametrize("kwargs,name", [
    (dict(cohort_size=1), "cohort_size"),
    (dict(neighbours=0), "secagg.neighbours"),
    (dict(neighbours=3), "secagg.neighbours"),          # odd, < K - 1
    (dict(neighbours=4, threshold=6), "secagg.threshold"),  # > k + 1
    (dict(neighbours=4, threshold=2), "secagg.threshold"),  # not a majority of 5
    (dict(bits=4), "secagg.bits"),                       # 10 sites need >= 5 bits
    (dict(bits=33), "secagg.bits"),
    (dict(clip_range=0.0), "secagg.clip_range"),
    (dict(clip_range=float("inf")), "secagg.clip_range"),
    (dict(dropout_rate=1.0), "secagg.dropout_rate"),
])
def test_validate_secagg_names_the_parameter_and_the_fix(kwargs, name):
  args = dict(cohort_size=10, neighbours=None, threshold=None, bits=16, clip_range=1.0,
              dropout_rate=0.0)
  args.update(kwargs)
  with pytest.raises(ValueError, match=name.replace(".", r"\.")) as e:
    secagg.validate_secagg(**args)
  assert "set " in str(e.value) or "raise " in str(e.value) or "must be" in str(e.value)
  assert secagg.validate_secagg(10, None, None, 5, 1.0, 0.0) == (9, 6, 2)


def test_clipped_and_nonfinite_values_are_counted_not_silent():
  x = np.zeros((K, 40), np.float32)
  x[2, :3] = 5.0      # above clip_range
  x[4, 0] = -7.0
  x[6, 1] = np.nan    # sent as 0, counted
  cfg = secagg.SecAggConfig(clip_range=1.0, bits=16, prg="host")
  r = secagg.secure_sum(jnp.asarray(x), jax.random.key(0), cfg)
  assert r.clipped_count == 5
  assert np.asarray(r.sum)[0] == pytest.approx(1.0 - 1.0, abs=2 / r.levels * K)


def test_dopamine_noise_survives_the_protocol_and_dropouts_thin_it():
  """Coordinated noise: each site adds sigma/sqrt(n) so the SUM carries sigma. Through SecAgg
  the unmasked sum's noise has std sigma; with sites dropping before upload it has only
  sigma sqrt(n_uploaded/n), which is why sites should scale by the threshold t instead."""
  sigma, d = 1.0, 20_000
  cfg = secagg.SecAggConfig(threshold=6, bits=32, clip_range=8.0, prg="host")
  noise = jax.random.normal(jax.random.key(1), (K, d))
  r = secagg.secure_sum(noise * sigma / np.sqrt(K), jax.random.key(2), cfg)
  assert np.std(np.asarray(r.sum)) == pytest.approx(sigma, rel=0.03)
  drop = np.zeros(K, int)
  drop[:4] = 2
  r = secagg.secure_sum(noise * sigma / np.sqrt(K), jax.random.key(2), cfg, dropouts=drop)
  assert np.std(np.asarray(r.sum)) == pytest.approx(sigma * np.sqrt(6 / K), rel=0.03)
  t = 6  # scaled by the threshold: any non-aborted round has >= t uploads, so >= sigma
  r = secagg.secure_sum(noise * sigma / np.sqrt(t), jax.random.key(2), cfg, dropouts=drop)
  assert np.std(np.asarray(r.sum)) >= sigma * 0.97
  assert r.clipped_count == 0


def test_bytes_per_site_and_expansion():
  b = secagg.bytes_per_site(9_610, 32, 9)
  assert b["sent"]["masked_vector"] == 4 * 9_610
  assert 1.0 < b["expansion_vs_float32"] < 1.05
  # Bonawitz et al.'s setting: 2^10 sites, 2^20 coordinates, 16-bit inputs -> 26-bit sums
  paper = secagg.bytes_per_site(2 ** 20, 26, 2 ** 10 - 1)
  assert 1.6 < paper["sent_total"] / (2 ** 20 * 2) < 1.8


def test_noise_helpers_size_the_clip_range_and_grid():
  from fedjax_lab.secagg import noise
  s = noise.noise_share_std(1.0, 4)
  assert s == 0.5
  c = noise.suggest_clip_range(1.0, s, n=100, d=10_000, target=1e-9)
  assert noise.clip_probability(c, 1.0, s, 100, 10_000) == pytest.approx(1e-9, rel=1e-3)
  assert noise.clip_probability(0.5, 1.0, s, 100, 10_000) == 1.0


def test_secure_sum_link_maps_slots_and_handles_tiny_cohorts_and_aborts():
  """The round's host step (secagg.round.SecureSum): rows of absent slots never enter, the
  sum is the plain quantized sum's float, cohorts of 0 and 1 need no protocol, an abort
  returns zeros with nobody counted."""
  link = secagg.SecureSum(secagg.SecAggConfig(threshold=6, bits=16, prg="host"))
  rng = np.random.default_rng(0)
  rows = rng.uniform(-0.5, 0.5, (K + 3, 20)).astype(np.float32)
  rows[2, 0] = 3.0  # clipped to [-1, 1], counted
  present = np.ones(K + 3, bool)
  present[[1, 5, 9]] = False
  present[2] = True
  out = link(jnp.asarray(rows), present, jax.random.key(0))
  assert not out.aborted and (out.survived == present).all()
  expect = np.clip(rows[present], -1, 1).sum(0)
  levels = secagg.levels_for(int(present.sum()), 16)
  assert np.abs(np.asarray(out.total) - expect).max() <= present.sum() * 2.0 / levels
  assert out.clipped == 1
  one = np.zeros(K + 3, bool)
  one[4] = True
  out = link(jnp.asarray(rows), one, jax.random.key(0))
  assert (np.asarray(out.total) == rows[4]).all() and out.survived.sum() == 1
  out = link(jnp.asarray(rows), np.zeros(K + 3, bool), jax.random.key(0))
  assert (np.asarray(out.total) == 0).all() and not out.survived.any()
  # Every site drops before upload: fewer than t uploads, the round aborts.
  link = secagg.SecureSum(secagg.SecAggConfig(threshold=6, bits=16, prg="host",
                                              dropout_rate=0.99))
  out = link(jnp.asarray(rows), present, jax.random.key(1))
  assert out.aborted and out.reason and not out.survived.any()
  assert (np.asarray(out.total) == 0).all()



@pytest.mark.parametrize("rate", [0.1, 0.3])
def test_dropout_rate_is_the_fraction_of_the_cohort_that_drops_over_a_round(rate):
  """Bonawitz et al. 2017 / Bell et al. 2020 meaning: a site completes the round with
  probability 1 - rate (not (1 - rate)^3) and drops at each of the 3 stages with rate / 3.
  200,000 sites: each frequency within 5 binomial standard deviations of its closed form."""
  n = 200_000
  stage = secagg.draw_dropouts(jax.random.key(7), n, rate)
  for s, p in ((0, 1 - rate), (1, rate / 3), (2, rate / 3), (3, rate / 3)):
    assert abs(np.mean(stage == s) - p) < 5 * math.sqrt(p * (1 - p) / n), (s, np.mean(stage == s))
  r = secagg.secure_sum(_updates(), jax.random.key(3), secagg.SecAggConfig(bits=16, prg="host"))
  assert r.n_survivors == K and not r.dropped_at.any()  # rate 0: nobody drops
