"""SecAgg (Bonawitz et al. 2017) with the SecAgg+ neighbour graph (Bell et al. 2020), simulated
for one cohort: real cryptography on the host, quantization on the device, the masks' ChaCha20
keystreams on the host (OpenSSL) on a CPU backend or on the device on a GPU/TPU (prg="auto").

Rounds (U_1 ⊇ U_2 ⊇ U_3 ⊇ U_4: the sites still in after each one):
  0 AdvertiseKeys  every site sends two X25519 public keys (c: share encryption, s: masks).
                   The server draws the neighbour graph (a ring over a random permutation,
                   k/2 neighbours on each side; the complete graph when k = K - 1).
  1 ShareKeys      site u Shamir-shares (threshold t) its self-mask seed b_u and its mask key
                   s_u^SK among N(u) ∪ {u} and sends each neighbour's shares encrypted
                   (ChaCha20-Poly1305 under an X25519+HKDF key) through the server. U_2: the
                   senders.
  2 MaskedInput    u ∈ U_2 uploads y_u = q_u + PRG(b_u) + sum_{v ∈ N(u) ∩ U_2} ±PRG(s_uv)
                   mod 2^b (masking.mask_update, all sites in one jit; or, prg "host", the
                   keystreams from OpenSSL site by site). U_3: the uploaders.
  3 Unmasking      the server sends U_3 to the sites still in; each responder v sends, for
                   every u ∈ (N(v) ∪ {v}) ∩ U_2, its share of b_u if u ∈ U_3, else its share
                   of s_u^SK (never both: an honest site refuses a U_3 outside U_2 or smaller
                   than t). The server rebuilds the survivors' self masks and the dropped
                   sites' pairwise masks with their surviving neighbours, and removes them.
(Bonawitz's ConsistencyCheck round, with signatures against a server that lies about U_3,
is not implemented: the threat model here is a semi-honest server, see docs/secure_aggregation.md.)

A round aborts, with a reason, when any U_i or the responders number fewer than t, or when a
secret needed for unmasking has fewer than t shares: it never returns a wrong sum.

The server (`Server`) holds only what it is sent: public keys, ciphertexts it routes, the
masked rows and the unmasking shares; `Server.unmask` works from exactly those.

Simulation shortcut (secure_sum only; `PairSecrets`): the two ends of a pair derive the same
values, X25519(c_u, c_v^PK) = X25519(c_v, c_u^PK), the share-encryption key of the direction
u -> v (derived by u to encrypt, by v to decrypt), and the pairwise mask key s_uv with its
ChaCha20 keystream. A deployment computes each at both ends, in separate processes; the
simulation computes each once and hands it to both Site objects, so a round makes half the
agreements, key derivations and keystreams, with bit-for-bit the same keys, ciphertexts'
plaintexts and masked rows. Every primitive is still run for real: each agreement is an
X25519 of a site's own private key, every share is encrypted by its sender and decrypted and
checked by its recipient, every masked row holds its full PRG expansions.
"""

import contextlib
import math
import os
import secrets
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab.secagg import crypto, masking, prg, shamir
from fedjax_lab.secagg.config import (SecAggConfig, levels_for, resolve_neighbours,
                                      resolve_prg, validate_secagg)
from fedjax_lab.secagg.quantization import decode_sum, modulus_mask

STAGES = {0: "stays", 1: "before key sharing", 2: "before upload", 3: "before unmasking"}
SHARE_PLAINTEXT_BYTES = 8 + 2 * shamir.SHARE_BYTES
ID_BYTES = 4


class Abort(Exception):
  """The round cannot finish correctly; secure_sum reports it as aborted."""


# ----------------------------------------------------------------------------- messages
class Advertise(NamedTuple):
  site: int
  c_public: bytes  # X25519, share encryption
  s_public: bytes  # X25519, pairwise masks


class EncryptedShare(NamedTuple):
  sender: int
  recipient: int
  message: bytes  # nonce || ChaCha20-Poly1305(sender, recipient, share of b, share of s^SK)


class UnmaskResponse(NamedTuple):
  responder: int
  seed_shares: dict  # site u ∈ U_3 -> (x, y): a share of u's self-mask seed b_u
  key_shares: dict   # site u ∈ U_2 \ U_3 -> (x, y): a share of u's mask key s_u^SK


# ----------------------------------------------------------------------------- a site
class PairSecrets:
  """SIMULATION ONLY: the values both ends of a pair derive, computed by the first end that
  needs them and read by the second (see the module docstring). Keys: ("c", lo, hi) the
  X25519 of the share-encryption keys, ("share", sender, recipient) that direction's AEAD key,
  ("mask", lo, hi) the pairwise mask key. Only secure_sum, which simulates every site in one
  process, passes one to its Sites; Sites built without one compute everything themselves."""

  def __init__(self):
    self._values = {}

  def get(self, name: tuple, compute):
    value = self._values.get(name)
    if value is None:
      value = self._values[name] = compute()
    return value


class Site:
  """One site's protocol state (its secrets never leave this object except as shares, or in
  simulation through `pairs`, a PairSecrets shared by the simulated cohort)."""

  def __init__(self, site: int, salt: bytes, threshold: int, pairs: PairSecrets | None = None):
    self.id, self.salt, self.t, self._pairs = site, salt, threshold, pairs
    self._c_sk, self.c_public = crypto.generate_keypair()
    self._s_sk, self.s_public = crypto.generate_keypair()
    self._seed = os.urandom(32)  # b_u
    self._held = {}  # sender -> (share of b_sender, share of s_sender^SK)
    self._neighbours = ()
    self._roster = {}
    self._shared = {}  # neighbour -> X25519(c) shared secret, computed once per pair

  def advertise(self) -> Advertise:
    return Advertise(self.id, self.c_public, self.s_public)

  def share_keys(self, roster: dict, neighbours) -> list[EncryptedShare]:
    """Round 1: Shamir shares of b_u and s_u^SK for N(u) ∪ {u}, encrypted per neighbour."""
    keys = [a.s_public for a in roster.values()] + [a.c_public for a in roster.values()]
    if len(set(keys)) != len(keys):
      raise Abort(f"site {self.id}: repeated public keys in the roster")
    if len(roster) < self.t:
      raise Abort(f"site {self.id}: roster of {len(roster)} < threshold {self.t}")
    if self.id not in roster or roster[self.id].s_public != self.s_public:
      raise Abort(f"site {self.id}: the roster does not hold its own keys")
    self._roster, self._neighbours = roster, tuple(neighbours)
    holders = sorted(self._neighbours + (self.id,))
    xs = [h + 1 for h in holders]
    b_shares, s_shares = shamir.split_many([self._seed, crypto.private_bytes(self._s_sk)],
                                           self.t, [xs, xs])
    nonces = os.urandom(crypto.NONCE_BYTES * len(holders))
    out = []
    for i, (holder, bs, ss) in enumerate(zip(holders, b_shares, s_shares)):
      if holder == self.id:
        self._held[self.id] = (bs, ss)
        continue
      key = self._share_key(self.id, holder)
      plain = (self.id.to_bytes(4, "big") + holder.to_bytes(4, "big")
               + shamir.encode(bs[1]) + shamir.encode(ss[1]))
      nonce = nonces[i * crypto.NONCE_BYTES:(i + 1) * crypto.NONCE_BYTES]
      out.append(EncryptedShare(self.id, holder,
                                crypto.encrypt(key, plain, self.salt, self.id, holder, nonce)))
    return out

  def _pair(self, name: tuple, compute):
    return compute() if self._pairs is None else self._pairs.get(name, compute)

  def _c_shared(self, peer: int) -> bytes:
    """X25519 of the share-encryption keys with `peer`, once per pair (both directions)."""
    if peer not in self._shared:
      self._shared[peer] = self._pair(
          ("c", min(self.id, peer), max(self.id, peer)),
          lambda: crypto.exchange(self._c_sk, self._roster[peer].c_public))
    return self._shared[peer]

  def _share_key(self, sender: int, recipient: int) -> bytes:
    """The AEAD key of the direction sender -> recipient (this site is one of the two)."""
    peer = recipient if sender == self.id else sender
    return self._pair(("share", sender, recipient), lambda: crypto.share_key(
        self._c_shared(peer), self.salt, sender, recipient))

  def receive_shares(self, messages: list[EncryptedShare]) -> None:
    """Decrypt the shares neighbours sent (AEAD: altered or re-routed messages are refused)."""
    for m in messages:
      if m.recipient != self.id or m.sender not in self._neighbours:
        raise Abort(f"site {self.id}: a share from {m.sender} it does not expect")
      key = self._share_key(m.sender, self.id)
      plain = crypto.decrypt(key, m.message, self.salt, m.sender, self.id)
      if plain[:8] != m.sender.to_bytes(4, "big") + self.id.to_bytes(4, "big"):
        raise Abort(f"site {self.id}: share message names the wrong route")
      x = self.id + 1
      self._held[m.sender] = ((x, shamir.decode(plain[8:8 + shamir.SHARE_BYTES])),
                              (x, shamir.decode(plain[8 + shamir.SHARE_BYTES:])))

  def mask_material(self, u2) -> tuple[list[bytes], list[int]]:
    """Round 2 keys: self mask (+1), then one pairwise mask per neighbour in U_2 (+1 if the
    neighbour's id is larger, -1 if smaller); neighbours outside U_2 get a zero slot."""
    u2 = set(u2)
    if len(u2) < self.t or self.id not in u2:
      raise Abort(f"site {self.id}: U_2 of {len(u2)} < threshold {self.t}")
    keys, signs = [crypto.self_mask_key(self._seed, self.salt)], [1]
    for v in self._neighbours:
      if v in u2:
        keys.append(self._pair(
            ("mask", min(self.id, v), max(self.id, v)),
            lambda: crypto.mask_key(self._s_sk, self.s_public, self._roster[v].s_public,
                                    self.salt)))
        signs.append(1 if v > self.id else -1)
      else:
        keys.append(bytes(32))
        signs.append(0)
    return keys, signs

  def unmask(self, u2, u3) -> UnmaskResponse:
    """Round 3: shares of b_u for u ∈ U_3, of s_u^SK for u ∈ U_2 \\ U_3, never both."""
    u2, u3 = set(u2), set(u3)
    if not u3 <= u2 or len(u3) < self.t:
      raise Abort(f"site {self.id}: refuses to unmask (U_3 not within U_2, or < t sites)")
    seeds, keys = {}, {}
    for u, (b_share, s_share) in self._held.items():
      if u not in u2:
        continue
      if u in u3:
        seeds[u] = b_share
      else:
        keys[u] = s_share
    return UnmaskResponse(self.id, seeds, keys)


# ----------------------------------------------------------------------------- the server
def neighbour_graph(sites: list[int], k: int, rng) -> dict:
  """k neighbours per site: k/2 on each side of a ring over a random permutation (the
  complete graph when k >= len(sites) - 1). rng: a random.Random-like shuffle source."""
  sites = list(sites)
  if k >= len(sites) - 1:
    return {u: tuple(v for v in sites if v != u) for u in sites}
  order = sites[:]
  rng.shuffle(order)
  n, half = len(order), k // 2
  graph = {}
  for i, u in enumerate(order):
    graph[u] = tuple(sorted(order[(i + j) % n] for j in range(-half, half + 1) if j))
  return graph


class Server:
  """What the server knows: public keys, the graph it drew, ciphertexts, masked rows, shares."""

  def __init__(self, cohort: int, k: int, t: int, bits: int, salt: bytes, rng=None):
    self.cohort, self.k, self.t, self.bits, self.salt = cohort, k, t, bits, salt
    self.rng = rng or secrets.SystemRandom()
    self.roster, self.graph, self.u2, self.u3 = {}, {}, (), ()

  def collect_keys(self, ads: list[Advertise]):
    self.roster = {a.site: a for a in ads}
    if len(self.roster) < self.t:
      raise Abort(f"{len(self.roster)} sites advertised keys, threshold {self.t}")
    self.graph = neighbour_graph(sorted(self.roster), self.k, self.rng)
    return self.roster, self.graph

  def route_shares(self, messages: list[EncryptedShare], senders) -> dict:
    self.u2 = tuple(sorted(senders))
    if len(self.u2) < self.t:
      raise Abort(f"{len(self.u2)} sites shared keys (U_2), threshold {self.t}")
    inbox = {}
    for m in messages:
      inbox.setdefault(m.recipient, []).append(m)
    return inbox

  def collect_uploads(self, uploaded) -> tuple:
    self.u3 = tuple(sorted(uploaded))
    if len(self.u3) < self.t:
      raise Abort(f"{len(self.u3)} sites uploaded (U_3), threshold {self.t}")
    return self.u3

  def removal_keys(self, responses: list[UnmaskResponse]):
    """The masks to remove: (keys, signs) rebuilt from at least t shares each (else Abort)."""
    if len(responses) < self.t:
      raise Abort(f"{len(responses)} sites answered the unmasking request, threshold {self.t}")
    u2, u3 = set(self.u2), set(self.u3)
    seed_shares, key_shares = {}, {}
    for r in responses:
      for u, share in r.seed_shares.items():
        seed_shares.setdefault(u, []).append(share)
      for u, share in r.key_shares.items():
        key_shares.setdefault(u, []).append(share)
    if set(seed_shares) & set(key_shares):
      raise Abort("a site's seed and key shares were both sent")
    keys, signs = [], []
    for u in self.u3:
      shares = seed_shares.get(u, [])
      if len(shares) < self.t:
        raise Abort(f"site {u}'s self-mask seed: {len(shares)} shares, threshold {self.t}")
      keys.append(crypto.self_mask_key(shamir.reconstruct(shares, self.t), self.salt))
      signs.append(1)
    for u in sorted(u2 - u3):
      partners = [v for v in self.graph[u] if v in u3]
      if not partners:
        continue
      shares = key_shares.get(u, [])
      if len(shares) < self.t:
        raise Abort(f"dropped site {u}'s mask key: {len(shares)} shares, threshold {self.t}")
      sk = crypto.private_from_bytes(shamir.reconstruct(shares, self.t))
      if crypto.public_bytes(sk) != self.roster[u].s_public:
        raise Abort(f"dropped site {u}'s mask key does not match its public key")
      for v in partners:  # v added sign(v, u) * PRG(s_uv): +1 if u > v
        keys.append(crypto.mask_key(sk, self.roster[u].s_public, self.roster[v].s_public,
                                    self.salt))
        signs.append(1 if u > v else -1)
    return keys, signs

  def unmask(self, masked, responses: list[UnmaskResponse], prg_path: str = "auto"):
    """The integer sum [d] uint32 of the U_3 rows' quantized values mod 2^bits.

    masked: [len(U_3), d] uint32, the uploaded rows in U_3's order (sorted ids)."""
    if masked.shape[0] != len(self.u3):
      raise Abort(f"{masked.shape[0]} masked rows for {len(self.u3)} uploaders")
    keys, signs = self.removal_keys(responses)
    return masking.unmask_sum(masked, keys, signs, self.bits, prg_path)


# ----------------------------------------------------------------------------- one round
class SecAggResult(NamedTuple):
  sum: jax.Array | None      # [d] float32: decoded sum of the survivors' (clipped) updates
  sum_int: jax.Array | None  # [d] uint32: that sum in Z_{2^bits} (the plain quantized sum)
  survivors: np.ndarray      # [K] bool: sites whose update is in the sum (uploaded, U_3)
  dropped_at: np.ndarray     # [K] int: 0 stayed, 1 before key sharing, 2 before upload,
                             #   3 before unmasking (in the sum, but sent no shares)
  clipped_count: int         # coordinates clipped to [-c, c] (or non-finite) in the sum's rows
  aborted: bool
  abort_reason: str
  bytes_per_site: dict       # sent/received by one site that takes part in every round
  timings: dict              # seconds: host_sites (all K sites' crypto, simulated in turn),
                             #   host_server, host_crypto (their sum), device_mask (every
                             #   site's quantize + mask: one jit, or with prg "host" the
                             #   wait for the quantization dispatched at the start and the
                             #   OpenSSL keystreams), device_unmask (mask removal + decoding),
                             #   total (the whole call; a warm round: compiles excluded only
                             #   by calling once first, as the benchmarks do)
  levels: int                # grid steps per site; step = 2 clip_range / levels
  masked: jax.Array | None = None  # [n, d] uint32: the rows the server received (U_3 order),
                                   #   only with secure_sum(..., keep_masked=True)

  @property
  def n_survivors(self) -> int:
    return int(self.survivors.sum())

  @property
  def mean(self):
    return None if self.sum is None else self.sum / self.n_survivors


class _Clock:
  """Adds the seconds spent in `with clock(name):` blocks to timings[name]."""

  def __init__(self, timings):
    self.timings = timings

  @contextlib.contextmanager
  def __call__(self, name):
    start = time.perf_counter()
    try:
      yield
    finally:
      self.timings[name] += time.perf_counter() - start


def split_key(key: jax.Array):
  """secure_sum's key -> (stochastic-rounding key, dropout-simulation key)."""
  rounding, dropout = jax.random.split(key)
  return rounding, dropout


def draw_dropouts(key: jax.Array, cohort: int, rate: float) -> np.ndarray:
  """Stage of each site's dropout (0: none): each site drops out during the round with
  probability `rate`, at one of the 3 stages chosen uniformly. So `rate` is the expected
  fraction of the cohort that drops over a round, as Bonawitz et al. 2017 and Bell et al.
  2020 count dropouts (not a per-stage chance, which would compound to 1 - (1 - rate)^3)."""
  u = np.asarray(jax.random.uniform(key, (2, cohort)))
  return np.where(u[0] < rate, 1 + np.minimum((u[1] * 3).astype(np.int64), 2), 0)


def bytes_per_site(d: int, bits: int, k: int) -> dict:
  """Bytes one site sends and receives in a round where it and its k neighbours stay."""
  share = crypto.NONCE_BYTES + SHARE_PLAINTEXT_BYTES + crypto.TAG_BYTES
  sent = {"advertise": 64, "shares": k * share, "masked_vector": math.ceil(d * bits / 8),
          "unmask": (k + 1) * (ID_BYTES + shamir.SHARE_BYTES)}
  received = {"public_keys": k * (ID_BYTES + 64), "shares": k * share,
              "survivor_lists": 2 * k * ID_BYTES}
  total = sum(sent.values())
  return {"sent": sent, "sent_total": total, "received": received,
          "received_total": sum(received.values()), "plain_float32": 4 * d,
          "expansion_vs_float32": total / (4 * d)}


def secure_sum(updates, key, config: SecAggConfig = SecAggConfig(), *, dropouts=None,
               salt: bytes | None = None, keep_masked: bool = False, present=None,
               grid_cohort: int | None = None) -> SecAggResult:
  """Securely sum the rows of `updates` ([K, d] float32 device array) for one round.

  key: a jax PRNG key: stochastic rounding (first half of jax.random.split) and, when
  `dropouts` is None, the simulated dropouts (second half). All cryptographic secrets (X25519
  keys, self-mask seeds, Shamir coefficients, nonces) come from OS entropy, never from `key`.
  dropouts: optional [K] ints, the stage each site drops out at (see STAGES), overriding
  config.dropout_rate. keep_masked: also return the masked rows the server received (to look
  at, e.g. notebooks/secure_aggregation.ipynb). Returns SecAggResult; an aborted round has
  sum None.

  present: optional [P] bool over the rows of a padded `updates` ([P, d]): only those rows'
  sites take part (the protocol runs among them); the device work runs on all P rows (absent
  ones are quantized and never sent), so its shapes, and compiles, do not depend on how many
  are present. grid_cohort: size the grid for this many sites (levels_for(grid_cohort)), not
  for the sites present: under site-level DP the slots, so the levels, like the shapes,
  reveal nothing of the realised cohort. With `present`, fewer than 2 present sites run no
  protocol (the one row is its own sum) but are still quantized on the same grid.
  """
  t0 = time.perf_counter()
  updates = jnp.asarray(updates, jnp.float32)
  P, d = updates.shape
  present = np.ones(P, bool) if present is None else np.asarray(present, bool)
  rows_of = np.flatnonzero(present)  # protocol id u is row rows_of[u]
  K = len(rows_of)
  grid = K if grid_cohort is None else int(grid_cohort)
  if grid < K:
    raise ValueError(f"grid_cohort={grid} < {K} sites present: their sum would wrap around")
  if K >= 2 or grid_cohort is None:
    k, t, _ = validate_secagg(K, config.neighbours, config.threshold, config.bits,
                              config.clip_range, config.dropout_rate, config.prg)
  else:
    k, t = 0, 1
  _, _, levels = validate_secagg(max(grid, 2), config.neighbours, config.threshold,
                                 config.bits, config.clip_range, config.dropout_rate,
                                 config.prg)
  if grid_cohort is not None:
    levels = levels_for(grid, config.bits)
  rounding_key, dropout_key = split_key(key)
  stage = (draw_dropouts(dropout_key, P, config.dropout_rate)[rows_of] if dropouts is None
           else np.asarray(dropouts, np.int64))
  salt = salt or os.urandom(16)
  path = resolve_prg(config.prg)
  if path == "host" or K < 2:  # asynchronous: the device rounds while the host does the keys
    quantized, clipped = masking.quantize_sites(updates, rounding_key, config.clip_range,
                                                levels=levels)
  timings = {"host_sites": 0.0, "host_server": 0.0}
  survivors = np.zeros(K, bool)

  def result(total=None, total_int=None, clipped=0, reason="", rows=None):
    timings["host_crypto"] = timings["host_sites"] + timings["host_server"]
    timings.setdefault("device_mask", 0.0)
    timings.setdefault("device_unmask", 0.0)
    timings["total"] = time.perf_counter() - t0
    return SecAggResult(total, total_int, survivors, stage, int(clipped), bool(reason), reason,
                        bytes_per_site(d, config.bits, k), timings, levels,
                        rows if keep_masked else None)

  if K < 2:  # nothing to hide: the server sees the one row (or nothing) anyway
    survivors[:] = True
    keep = jnp.asarray(present)
    total_int = _kept_sum(quantized, keep)
    total = decode_sum(total_int, K, config.clip_range, levels, config.bits)
    return result(total, total_int, int(np.asarray(clipped)[rows_of].sum()))

  try:
    clock = _Clock(timings)
    with clock("host_server"):
      server = Server(K, k, t, config.bits, salt)
    with clock("host_sites"):
      pairs = PairSecrets()  # simulation only: see the module docstring
      sites = [Site(u, salt, t, pairs) for u in range(K)]
      ads = [s.advertise() for s in sites]
    with clock("host_server"):
      roster, graph = server.collect_keys(ads)
    in_round = [u for u in range(K) if stage[u] != 1]
    with clock("host_sites"):
      messages = [m for u in in_round for m in sites[u].share_keys(roster, graph[u])]
    with clock("host_server"):
      inbox = server.route_shares(messages, in_round)
    u2 = server.u2
    with clock("host_sites"):
      for u in u2:
        sites[u].receive_shares(inbox.get(u, []))
      material = [sites[u].mask_material(u2) for u in u2]

    # Round 2: every site of U_2 quantizes and masks. Device path: all P rows at once in one
    # jit, for fixed shapes (rows outside U_2 get zero masks and are never uploaded; the mask
    # slots are sized for the grid's cohort). Host path: the quantization was dispatched to
    # the device before the host crypto (it needs no key), each site's masks are OpenSSL
    # ChaCha20 keystreams summed row by row (prg.expand_masks_host), added to its quantized
    # row mod 2^b.
    m = time.perf_counter()
    if path == "device":
      S = resolve_neighbours(grid, config.neighbours) + 1
      mask_keys = np.zeros((P, S, 8), np.uint32)
      mask_signs = np.zeros((P, S), np.int32)
      for u, (keys, signs) in zip(u2, material):
        mask_keys[rows_of[u], :len(keys)] = [prg.key_words(kk) for kk in keys]
        mask_signs[rows_of[u], :len(signs)] = signs
      masked, clipped = masking.mask_update(
          updates, rounding_key, jnp.asarray(mask_keys), jnp.asarray(mask_signs),
          config.clip_range, levels=levels, bits=config.bits)
      masked.block_until_ready()
    else:
      host_keys = [[] for _ in range(P)]
      host_signs = [[] for _ in range(P)]
      for u, (keys, signs) in zip(u2, material):
        host_keys[rows_of[u]], host_signs[rows_of[u]] = keys, signs
      masks = prg.expand_masks_host(host_keys, host_signs, d)
      masks += np.asarray(quantized)
      masks &= np.uint32(int(modulus_mask(config.bits)))
      masked, clipped = masks, np.asarray(clipped)
    timings["device_mask"] = time.perf_counter() - m
    uploaded = [u for u in u2 if stage[u] != 2]
    survivors[uploaded] = True
    with clock("host_server"):
      server.collect_uploads(uploaded)
    u3_rows = rows_of[np.asarray(server.u3)]
    keep = np.zeros(P, bool)
    keep[u3_rows] = True  # exactly what the server received: the rows of U_3
    responders = [u for u in server.u3 if stage[u] != 3]
    with clock("host_sites"):
      responses = [sites[u].unmask(u2, server.u3) for u in responders]
    with clock("host_server"):
      keys, signs = server.removal_keys(responses)
    m = time.perf_counter()
    total_int = masking.unmask_sum(masked, keys, signs, config.bits, path, keep=keep,
                                   min_keys=0 if grid_cohort is None else grid)
    total = decode_sum(total_int, len(server.u3), config.clip_range, levels, config.bits)
    total.block_until_ready()
    timings["device_unmask"] = time.perf_counter() - m
    clipped_total = int(np.asarray(clipped)[u3_rows].sum())
    return result(total, total_int, clipped_total,
                  rows=jnp.asarray(np.asarray(masked)[u3_rows]) if keep_masked else None)
  except Abort as e:
    survivors[:] = False
    return result(reason=str(e))


@jax.jit
def _kept_sum(q, keep):
  return jnp.where(keep[:, None], q, jnp.uint32(0)).sum(axis=0, dtype=jnp.uint32)
