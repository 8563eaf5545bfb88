"""Secure aggregation overhead: ms per round of secagg.secure_sum vs a plain sum.

Vectors the size of the digits MLP (64-128-10: 9,610 parameters) at K = 10 and K = 100 sites
(complete graph, Bonawitz et al.; and SecAgg+ with k = 14 neighbours at K = 100), and ~1M
parameters at K = 10. Each secure round is split into host crypto (all K sites' key
agreements, Shamir sharing, share encryption, simulated one after the other, and the
server's reconstruction) and mask work ("dev mask": every site's quantize + ChaCha20 masks;
"dev unmask": the server's mask removal; with the default prg="auto" the keystreams come from
OpenSSL on the host on a CPU backend, from the jax.numpy ChaCha20 in one jit on a GPU/TPU;
--prg device|host forces one). Bytes sent per site, and its expansion over sending float32.

If `flwr` is importable, Flower's SecAgg+ primitives (SECP384R1 ECDH + HKDF, Fernet,
pycryptodome Shamir, numpy RandomState masks) are timed for the same per-site work at the same
K and k, as a reference (an assembly of its primitives, not its workflow).

Last line: `RATIO secagg/plain_S100=<x> device_mask/plain_S100=<y> expansion=<z>` at K = 100,
complete graph, d = 9,610, bits = 32 (expansion: bytes a site sends / 4 d), and, with flwr,
`flower/secagg_round=<r>`: Flower's SecAgg+ primitives for a round at K = 100, k = 14 (its
sites' work plus its server's self-mask removal) over the lab's whole secure round at the same
K and k (the "digits MLP, SecAgg+" row), timed in the same run (issue 29's goal: >= 100).

  python benchmarks/secagg_overhead.py [--repeats 3] [--quick] [--prg auto|device|host]
"""

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab import secagg  # noqa: E402

MLP = 64 * 128 + 128 + 128 * 10 + 10  # 9,610


def time_plain(updates, repeats):
  f = jax.jit(lambda x: x.sum(axis=0))
  f(updates).block_until_ready()
  out = []
  for _ in range(repeats):
    start = time.perf_counter()
    f(updates).block_until_ready()
    out.append(time.perf_counter() - start)
  return float(np.median(out))


def time_secagg(updates, cfg, repeats):
  secagg.secure_sum(updates, jax.random.key(0), cfg)  # compile
  runs = [secagg.secure_sum(updates, jax.random.key(i + 1), cfg) for i in range(repeats)]
  assert not any(r.aborted for r in runs)
  keys = runs[0].timings.keys()
  return {k: float(np.median([r.timings[k] for r in runs])) for k in keys}, runs[0]


def time_flower(K, k, d, bits=32):
  """Per-round work of K Flower SecAgg+ sites (k neighbours each) and its server's
  self-mask removal, from flwr's own primitives; None if flwr is not importable."""
  try:
    from flwr.common.secure_aggregation.crypto import shamir as fshamir
    from flwr.common.secure_aggregation.crypto import symmetric_encryption as fsym
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
    from flwr.supercore.primitives import asymmetric as fasym
  except ImportError:
    return None
  t = (k + 1) // 2 + 1
  start = time.perf_counter()
  keys = [(fasym.generate_key_pairs(), fasym.generate_key_pairs()) for _ in range(K)]
  seeds = [os.urandom(32) for _ in range(K)]
  ring = [[(u + j) % K for j in range(-(k // 2), k // 2 + 1) if j] if k < K - 1 else
          [v for v in range(K) if v != u] for u in range(K)]
  all_shares = []
  for u in range(K):
    (c_sk, _), (s_sk, _) = keys[u]
    b_shares = fshamir.create_shares(seeds[u], t, k + 1)
    s_shares = fshamir.create_shares(fasym.private_key_to_bytes(s_sk), t, k + 1)
    all_shares.append(b_shares)
    for i, v in enumerate(ring[u]):
      enc = fsym.generate_shared_key(c_sk, keys[v][0][1])
      fsym.encrypt(enc, b_shares[i] + s_shares[i])
    mask = pseudo_rand_gen(seeds[u], 1 << bits, [(d,)])[0]
    for v in ring[u]:
      shared = fsym.generate_shared_key(s_sk, keys[v][1][1])
      pair = pseudo_rand_gen(shared, 1 << bits, [(d,)])[0]
      mask = mask + pair if v > u else mask - pair
  sites = time.perf_counter() - start
  start = time.perf_counter()
  for u in range(K):
    seed = fshamir.combine_shares(all_shares[u][:t])
    pseudo_rand_gen(seed, 1 << bits, [(d,)])
  return sites, time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--quick", action="store_true", help="small sizes, for the tests")
  parser.add_argument("--prg", default="auto", choices=("auto", "device", "host"),
                      help="where the masks' ChaCha20 keystreams are expanded")
  args = parser.parse_args()
  settings = [("digits MLP", 10, None, MLP), ("digits MLP", 100, None, MLP),
              ("digits MLP, SecAgg+", 100, 14, MLP), ("~1M params", 10, None, 1 << 20)]
  if args.quick:
    settings = [("quick", 10, None, 500), ("quick", 100, None, 500)]
  print(f"backend {jax.default_backend()}, {os.cpu_count()} CPUs; bits=32; prg={args.prg} "
        f"({secagg.config.resolve_prg(args.prg)}); "
        f"{args.repeats} repeats, medians")
  print(f"{'setting':22s} {'K':>4s} {'k':>3s} {'d':>8s} {'plain ms':>9s} {'secagg ms':>10s} "
        f"{'host sites':>10s} {'host srv':>9s} {'dev mask':>9s} {'dev unmask':>10s} "
        f"{'per-site ms':>11s} {'B sent/site':>11s} {'expansion':>9s}")
  rows = {}
  for name, K, k, d in settings:
    cfg = secagg.SecAggConfig(neighbours=k, bits=32, clip_range=1.0, prg=args.prg)
    updates = jax.random.normal(jax.random.key(K), (K, d)) * 0.1
    plain = time_plain(updates, args.repeats)
    t, r = time_secagg(updates, cfg, args.repeats)
    kk = K - 1 if k is None else k
    per_site = (t["host_sites"] + t["device_mask"]) / K  # one site's own work, if parallel
    b = r.bytes_per_site
    rows[(K, k, d)] = (plain, t, b)
    print(f"{name:22s} {K:4d} {kk:3d} {d:8d} {1e3 * plain:9.3f} {1e3 * t['total']:10.1f} "
          f"{1e3 * t['host_sites']:10.1f} {1e3 * t['host_server']:9.1f} "
          f"{1e3 * t['device_mask']:9.1f} {1e3 * t['device_unmask']:10.1f} "
          f"{1e3 * per_site:11.2f} {b['sent_total']:11d} {b['expansion_vs_float32']:9.3f}")
  paper = secagg.bytes_per_site(1 << 20, 26, (1 << 10) - 1)
  print(f"Bonawitz et al.'s setting (2^10 sites, 2^20 coordinates, 16-bit inputs -> b = 26): "
        f"{paper['sent_total'] / ((1 << 20) * 2):.3f}x the 16-bit plaintext "
        f"(paper: 1.73x), {paper['expansion_vs_float32']:.3f}x float32")
  flower_round = None
  for K, k in ((10, 9), (100, 14)) if not args.quick else ((10, 9),):
    fl = time_flower(K, k, MLP if not args.quick else 500)
    if fl is None:
      print("flwr is not importable: Flower's SecAgg+ reference skipped")
      break
    if (K, k) == (100, 14):
      flower_round = fl[0] + fl[1]
    print(f"Flower SecAgg+ primitives, K={K} k={k} d={MLP if not args.quick else 500}: "
          f"sites {1e3 * fl[0]:.1f} ms, server self-mask removal {1e3 * fl[1]:.1f} ms "
          f"(ours: see the rows with the same K and k)")
  K100 = [key for key in rows if key[0] == 100 and key[1] is None][0]
  plain, t, b = rows[K100]
  ratio = ""
  if flower_round is not None and (100, 14, MLP) in rows:
    ratio = f" flower/secagg_round={flower_round / rows[(100, 14, MLP)][1]['total']:.1f}"
  print(f"RATIO secagg/plain_S100={t['total'] / plain:.1f} "
        f"device_mask/plain_S100={t['device_mask'] / plain:.1f} "
        f"expansion={b['expansion_vs_float32']:.3f}{ratio}")


if __name__ == "__main__":
  main()
