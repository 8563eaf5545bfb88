"""Robust aggregation: reducers and pre-aggregation on the cohort's stacked updates.

Each function here is an aggregator-chain member (aggregators.py) with a `reduce` (the
aggregate replaces the sum) or a `mix` (pre-aggregation, in front of the reducer). They see
the round's updates flattened to x [slots, d], their weights and `valid` (0.0: a padded slot,
ignored). Every robust rule treats the valid updates alike: the example-count weights are the
mean's, and a Byzantine site could inflate its own by lying about its size (ByzFL does the
same). `f` is the number of Byzantine updates the rule is configured to tolerate.

Threat model: f of the cohort's sites send arbitrary updates (attacks/byzantine.py); the
server sees every update in the clear, so none of this composes with secure aggregation, and
none of it with site-level DP's noise, whose sensitivity is the mean's (config.py refuses
both; docs/robust_aggregation.md).
"""

import jax
import jax.flatten_util
import jax.numpy as jnp

from fedjax_lab import aggregators
from fedjax_lab.errors import ConfigError
from fedjax_lab import algorithms

ROBUST = ("none", "mean", "median", "trimmed_mean", "krum", "multi_krum", "geometric_median",
          "centered_clipping")
PRE = ("none", "nnm", "bucketing")
# fold_in tag (into the run's client key, then the round) of bucketing's permutation.
BUCKETING = 0xFFFFFFE0


def _count(valid):
  return valid.sum().astype(jnp.int32)


# Columns per block of the CPU sorting network: [100, 64] int32 blocks stay in L1/L2 through
# all its layers (64 ran fastest of 32..384 for [100, 9610] on the 2-core CPU VM).
_NETWORK_COLUMNS = 64


def _sort_keys(x):
  """float32 -> int32 whose signed order is the float total order jnp.sort uses (-inf < ...
  < inf < NaN): flip the magnitude bits of negatives. NaNs first become one positive NaN, as
  jnp.sort's comparator treats every NaN alike."""
  b = jax.lax.bitcast_convert_type(jnp.where(jnp.isnan(x), jnp.nan, x), jnp.int32)
  return b ^ ((b >> 31) & 0x7FFFFFFF)


def _from_sort_keys(k):
  return jax.lax.bitcast_convert_type(k ^ ((k >> 31) & 0x7FFFFFFF), jnp.float32)


def _bitonic_layer(k, half, flip):
  """One layer of the bitonic network in standard form (the smaller value always goes to the
  lower row), on whole [rows, columns] slabs. In blocks of 2 half rows, row i meets row
  2 half-1-i (flip) or row i + half; on the first n of 2^ceil(log2 n) rows, a pair whose partner is >= n is
  left as is: that partner would be +inf padding, which a standard-form layer never moves,
  so the network sorts any n exactly without padding."""
  n, cols = k.shape
  block = 2 * half
  full = n // block * block
  pieces = []
  if full:
    b = k[:full].reshape(full // block, 2, half, cols)
    lo, hi = b[:, 0], jnp.flip(b[:, 1], 1) if flip else b[:, 1]
    lo, hi = jnp.minimum(lo, hi), jnp.maximum(lo, hi)
    pieces.append(jnp.stack([lo, jnp.flip(hi, 1) if flip else hi], 1).reshape(full, cols))
  tail, r = k[full:], n - full
  if flip and r > half:  # row i of the last block meets block-1-i when that is < r
    s = block - r
    lo, hi = tail[s:half], jnp.flip(tail[half:r], 0)
    pieces += [tail[:s], jnp.minimum(lo, hi), jnp.flip(jnp.maximum(lo, hi), 0)]
  elif not flip and r > half:
    lo, hi = tail[:r - half], tail[half:r]
    pieces += [jnp.minimum(lo, hi), tail[r - half:half], jnp.maximum(lo, hi)]
  elif r:
    pieces.append(tail)
  return jnp.concatenate(pieces) if len(pieces) > 1 else pieces[0]


def _bitonic_sort(k):
  """Batcher's bitonic sorting network along axis 0 (log2(n)(log2(n)+1)/2 layers)."""
  n, block = k.shape[0], 2
  while block < 2 * n:
    k = _bitonic_layer(k, block // 2, True)
    half = block // 4
    while half:
      k = _bitonic_layer(k, half, False)
      half //= 2
    block *= 2
  return k


def network_sort(x):
  """jnp.sort(x, axis=0) for float32 [n, d], as a min/max sorting network run over blocks of
  columns. Same values in the same order as jnp.sort, except that -0.0 and 0.0 come out
  ordered -0.0 first (jnp.sort keeps their input order) and every NaN as one positive NaN.

  Why: XLA's CPU sort costs ~170 ms on [100, 9610] (jnp.sort, axis 0; 44 ms on int32 keys;
  NumPy 4.4 ms); this network takes 3.4-4 ms there on JAX's default CPU device and 8 ms on
  one of the lab's single-threaded devices (2-core shared CPU VM, 2026), 0.5 ms on [10, 9610]
  against jnp.sort's 8 ms. In the round: robust=median/plain 3.9x at 100 sites (19.5x with
  jnp.sort), benchmarks/RESULTS.md. A whole-array network (no column blocks) took 20-30
  ms: each of its 28 layers streams 4.9 MB through memory; blocks keep it in cache."""
  n, d = x.shape
  cols = min(_NETWORK_COLUMNS, d)
  k = _sort_keys(x)
  k = jnp.pad(k, ((0, 0), (0, -d % cols)))

  def block(i, k):
    kb = jax.lax.dynamic_slice_in_dim(k, i * cols, cols, axis=1)
    return jax.lax.dynamic_update_slice_in_dim(k, _bitonic_sort(kb), i * cols, axis=1)

  k = jax.lax.fori_loop(0, k.shape[1] // cols, block, k)
  return _from_sort_keys(k[:, :d])


def _sorted_columns(x, valid):
  """Each coordinate's values over the valid rows, ascending; invalid rows sort last (inf).
  On CPU through network_sort (~20-40x faster there than jnp.sort); elsewhere jnp.sort, a fast primitive on
  accelerators (the network was not timed on GPU)."""
  x = jnp.where(valid[:, None] > 0, x, jnp.inf)
  if jax.default_backend() == "cpu" and x.dtype == jnp.float32:
    return network_sort(x)
  return jnp.sort(x, axis=0)


def coordinate_median(x, valid):
  """Yin, Chen, Ramchandran & Bartlett 2018, "Byzantine-Robust Distributed Learning: Towards
  Optimal Statistical Rates": each coordinate's median over the valid updates (the mean of
  the two middle values for an even count)."""
  s, m = _sorted_columns(x, valid), _count(valid)
  mid = 0.5 * (s[jnp.maximum((m - 1) // 2, 0)] + s[jnp.maximum(m // 2, 0)])
  return jnp.where(m > 0, mid, 0.0)


def trimmed_mean(x, valid, trim: int):
  """Yin et al. 2018: each coordinate's mean after dropping its `trim` largest and `trim`
  smallest values (trim is cut to (m - 1) // 2 when fewer than 2 trim + 1 are valid)."""
  s, m = _sorted_columns(x, valid), _count(valid)
  b = jnp.minimum(trim, jnp.maximum(m - 1, 0) // 2)
  pos = jnp.arange(x.shape[0])[:, None]
  keep = (pos >= b) & (pos < m - b)
  return jnp.where(keep, s, 0.0).sum(0) / jnp.maximum(m - 2 * b, 1)


def _square_distances(x):
  """[n, n] ||x_i - x_j||^2 from the Gram matrix (an [n, n, d] difference would not fit for
  100 sites of a 10k-parameter model)."""
  sq = jnp.sum(x * x, axis=1)
  return jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * (x @ x.T), 0.0)


def krum_scores(x, valid, f: int):
  """Blanchard et al. 2017: score_i = Σ of the squared distances from x_i to its m - f - 2
  nearest other valid updates (at least 1); invalid rows score inf."""
  n, m = x.shape[0], _count(valid)
  d2 = _square_distances(x)
  pair = (valid[:, None] > 0) & (valid[None, :] > 0) & ~jnp.eye(n, dtype=bool)
  d2 = jnp.sort(jnp.where(pair, d2, jnp.inf), axis=1)
  k = jnp.maximum(m - f - 2, 1)
  scores = jnp.where(jnp.arange(n)[None, :] < k, d2, 0.0).sum(1)
  return jnp.where(valid > 0, scores, jnp.inf)


def multi_krum(x, valid, f: int, select: int | None = None):
  """Blanchard, El Mhamdi, Guerraoui & Stainer 2017, "Machine Learning with Adversaries:
  Byzantine Tolerant Gradient Descent": the mean of the `select` updates with the lowest
  Krum scores (default m - f; select=1 is Krum). Ties go to the lower slot."""
  n, m = x.shape[0], _count(valid)
  q = jnp.maximum(m - f, 1) if select is None else jnp.minimum(select, jnp.maximum(m, 1))
  order = jnp.argsort(krum_scores(x, valid, f), stable=True)
  chosen = jnp.zeros((n,), jnp.float32).at[order].set(
      (jnp.arange(n) < q).astype(jnp.float32)) * (valid > 0)
  return aggregators.rows_mean(chosen, x)


def geometric_median(x, valid, iters: int = 10, nu: float = 1e-6):
  """Pillutla, Kakade & Harchaoui 2022, "Robust Aggregation for Federated Learning" (RFA):
  the smoothed Weiszfeld iteration z <- Σ β_i x_i / Σ β_i, β_i = 1 / max(ν, ||z - x_i||),
  from the mean, `iters` times, over the valid updates."""
  v = (valid > 0).astype(x.dtype)
  z0 = aggregators.rows_mean(v, x)

  def step(z, _):
    beta = v / jnp.maximum(nu, jnp.linalg.norm(x - z, axis=1))
    return aggregators.rows_mean(beta, x), None

  return jax.lax.scan(step, z0, None, length=iters)[0]


def centered_clipping(x, valid, center, tau: float, iters: int = 1):
  """Karimireddy, He & Jaggi 2021, "Learning from History for Byzantine Robust Optimization":
  v <- v + (1/m) Σ_valid (x_i - v) min(1, τ / ||x_i - v||), `iters` times, from `center`
  (the previous round's aggregate: the paper's momentum, kept in the chain's state)."""
  v = (valid > 0).astype(x.dtype)

  def step(c, _):
    diff = x - c
    factor = jnp.minimum(1.0, tau / jnp.maximum(jnp.linalg.norm(diff, axis=1), 1e-12))
    return c + (v * factor) @ diff / jnp.maximum(v.sum(), 1.0), None

  return jax.lax.scan(step, center, None, length=iters)[0]


def nearest_neighbor_mixing(x, valid, f: int):
  """Allouah et al. 2023, "Fixing by Mixing: A Recipe for Optimal Byzantine ML under
  Heterogeneity": each valid update becomes the mean of its m - f nearest valid updates
  (itself included). Ties go to the lower slot."""
  n, m = x.shape[0], _count(valid)
  d2 = jnp.where(valid[None, :] > 0, _square_distances(x), jnp.inf)
  d2 = d2.at[jnp.arange(n), jnp.arange(n)].set(jnp.where(valid > 0, -1.0, jnp.inf))
  order = jnp.argsort(d2, axis=1, stable=True)
  k = jnp.maximum(m - f, 1)
  near = jnp.zeros((n, n), x.dtype).at[jnp.arange(n)[:, None], order].set(
      (jnp.arange(n)[None, :] < k).astype(x.dtype))
  mixed = near @ x / k
  return jnp.where(valid[:, None] > 0, mixed, x)


def bucketing(x, weights, valid, key, size: int):
  """Karimireddy, He & Jaggi 2022, "Byzantine-Robust Learning on Heterogeneous Datasets via
  Bucketing": the valid updates in a random order, cut into buckets of `size`, each bucket
  averaged; returns ceil(n / size) rows, a bucket valid if it holds a valid update, weighted
  by how many it holds."""
  n = x.shape[0]
  buckets = -(-n // size)
  order = jnp.argsort(jnp.where(valid > 0, jax.random.uniform(key, (n,)), 2.0))
  pad = buckets * size - n
  xs = jnp.concatenate([x[order], jnp.zeros((pad, x.shape[1]), x.dtype)])
  vs = jnp.concatenate([(valid[order] > 0).astype(x.dtype), jnp.zeros((pad,), x.dtype)])
  xs, vs = xs.reshape(buckets, size, -1), vs.reshape(buckets, size)
  counts = vs.sum(1)
  means = jnp.einsum("bs,bsd->bd", vs, xs) / jnp.maximum(counts, 1.0)[:, None]
  return means, counts, (counts > 0).astype(x.dtype)


def reducer(name: str, f: int = 0, trim: int | None = None, tau: float = 1.0,
            iters: int | None = None, dim: int | None = None) -> aggregators.Aggregator:
  """The chain member that reduces the stacked updates by rule `name` (ROBUST; "mean": the
  weighted mean on the stacked path). centered_clipping keeps its center in the chain's
  state: `dim` (the flattened model's size) shapes it."""
  if name == "mean":
    return aggregators.make(reduce=aggregators.weighted_mean)
  rules = {
      "median": lambda x, v, s: coordinate_median(x, v),
      "trimmed_mean": lambda x, v, s: trimmed_mean(x, v, f if trim is None else trim),
      "krum": lambda x, v, s: multi_krum(x, v, f, select=1),
      "multi_krum": lambda x, v, s: multi_krum(x, v, f),
      "geometric_median": lambda x, v, s: geometric_median(x, v, iters or 10),
      "centered_clipping": lambda x, v, s: centered_clipping(x, v, s, tau, iters or 1),
  }
  if name not in rules:
    raise ValueError(f"robust.reducer: unknown '{name}'; allowed: {', '.join(ROBUST[1:])}")
  rule = rules[name]
  reduce = lambda x, w, v, state, rnd, shared: rule(x, v, state)
  if name != "centered_clipping":
    return aggregators.make(reduce=reduce)
  if dim is None:
    raise ValueError("robust.reducer: centered_clipping needs dim (its center's size)")
  # The server step gets the aggregate first when this member is last (chain: reverse order),
  # so it keeps exactly what reduce returned, flattened, as the next round's center.
  keep = lambda total, state, rnd, shared, stats: (
      total, jax.flatten_util.ravel_pytree(total)[0].astype(jnp.float32), {})
  return aggregators.make(init=lambda: jnp.zeros((dim,), jnp.float32), reduce=reduce,
                          server=keep)


def pre_aggregation(name: str, f: int = 0, bucket_size: int = 2) -> aggregators.Aggregator:
  """The pre-aggregation member `name` (PRE without none)."""
  if name == "nnm":
    return aggregators.make(mix=lambda x, w, v, state, rnd, shared: (
        nearest_neighbor_mixing(x, v, f), w, v))
  if name == "bucketing":
    def mix(x, w, v, state, rnd, shared):
      key = jax.random.fold_in(jax.random.fold_in(rnd.client_rng, BUCKETING), rnd.t)
      return bucketing(x, w, v, key, bucket_size)
    return aggregators.make(mix=mix)
  raise ValueError(f"robust.pre_aggregation: unknown '{name}'; allowed: nnm, bucketing")


def defense(config, dim: int | None = None) -> aggregators.Aggregator | None:
  """The chain of `aggregator.pre` and `aggregator.robust` (config.aggregator), or None for
  the default sum path (robust=none and no pre-aggregation)."""
  a = config.aggregator
  if a.robust == "none" and a.pre == "none":
    return None
  members = []
  if a.pre != "none":
    members.append(pre_aggregation(a.pre, a.f, a.bucket_size))
  members.append(reducer("mean" if a.robust == "none" else a.robust, a.f, a.trim, a.tau,
                         a.iters, dim))
  return aggregators.chain(*members)


def linear(config) -> bool:
  """Whether the configured aggregation is the plain (weighted) sum that secure aggregation
  and site-level DP's sensitivity assume."""
  return config.aggregator.robust in ("none", "mean") and config.aggregator.pre == "none"


def validate(config) -> None:
  """aggregator.* keys and what they compose with (one-line ConfigErrors)."""
  a = config.aggregator
  if a.robust not in ROBUST:
    raise ConfigError("aggregator.robust", f"unknown '{a.robust}'; allowed: {', '.join(ROBUST)}")
  if a.pre not in PRE:
    raise ConfigError("aggregator.pre", f"unknown '{a.pre}'; allowed: {', '.join(PRE)}")
  if a.f is None or a.f < 0 or int(a.f) != a.f:
    raise ConfigError("aggregator.f", f"must be an integer >= 0, got {a.f}")
  if a.trim is not None and (a.trim < 0 or int(a.trim) != a.trim):
    raise ConfigError("aggregator.trim", f"must be an integer >= 0 (unset: aggregator.f), "
                      f"got {a.trim}")
  if a.bucket_size is None or a.bucket_size < 1 or int(a.bucket_size) != a.bucket_size:
    raise ConfigError("aggregator.bucket_size", f"must be a positive integer, got "
                      f"{a.bucket_size}")
  if not a.tau > 0:
    raise ConfigError("aggregator.tau", f"must be > 0 (centered clipping's radius), got {a.tau}")
  if a.iters is not None and (a.iters < 1 or int(a.iters) != a.iters):
    raise ConfigError("aggregator.iters", f"must be a positive integer (unset: 10 for "
                      f"geometric_median, 1 for centered_clipping), got {a.iters}")
  if a.robust == "none" and a.pre == "none":
    return
  if not getattr(algorithms.module(config.algorithm.name), "ROBUST_AGGREGATION", False):
    raise ConfigError("aggregator.robust", f"algorithm '{config.algorithm.name}' does not "
                      "aggregate through the chain's reduce step; allowed with: fedavg, "
                      "fedprox, scaffold")
  if linear(config):
    return
  n = config.cohort_size
  if 2 * a.f >= n:
    raise ConfigError("aggregator.f", f"{a.f} Byzantine of cohort_size={n} is no honest "
                      f"majority; use f < {n} / 2")
  if a.robust in ("krum", "multi_krum") and n < 2 * a.f + 3:
    raise ConfigError("aggregator.f", f"Krum needs cohort_size >= 2 f + 3, got cohort_size="
                      f"{n}, f={a.f}; lower f")
  if config.secagg.enabled:
    raise ConfigError("secagg.enabled", "robust aggregators need the individual updates, "
                      "which secure aggregation hides; set it False "
                      "(docs/robust_aggregation.md: what does work under it)")
  if config.dp.level == "site":
    raise ConfigError("dp.level", "site-level DP's noise is calibrated to the mean's "
                      "sensitivity (C / cohort), not a robust reducer's; use dp.level=none or "
                      "example (DP-SGD at the sites: the reducer is post-processing)")
