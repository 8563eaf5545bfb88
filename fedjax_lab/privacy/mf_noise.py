"""Matrix-factorization (DP-FTRL) noise: correlated Gaussian noise across rounds.

The mechanism (Denisov et al. 2022, "Improved Differential Privacy for SGD via Optimal
Private Linear Operators on Adaptive Streams"; Choquette-Choo et al. 2023, "Multi-Epoch
Matrix Factorization Mechanisms for Private Machine Learning"): the rounds' clipped sums
x_1..x_n (a stream; each record's contribution to one round has L2 norm <= clip_norm) are
released as x_r + z_r, where z = C^{-1} w and w_1..w_n are i.i.d. N(0, noise_std^2) per
coordinate. Any prefix sum of the releases is A x + A C^{-1} w, i.e. the post-processing
B (C x + w) of ONE Gaussian mechanism x -> C x + w with B = A C^{-1}. Its L2 sensitivity is
clip_norm * sensitivity(strategy, ...) (the largest ||C u|| over the rounds u a record may
join), so the whole run is one Gaussian mechanism with noise multiplier
(noise_std / clip_norm) / sensitivity: `dp_event`. Because C is lower-triangular this holds
for adaptively chosen x_r too (Denisov et al. 2022).

Adversary and assumptions of the unamplified guarantee (`dp_event`): it sees every release
x_r + z_r of the run and may pick which records join which round (the server picking cohorts
is allowed), as long as each record joins at most `max_participations` rounds, any two at least
`min_separation` rounds apart. The fresh noise w (the per-round keys) AND the noise state are
secret from it: the state holds past noise, so a checkpoint of it is as secret as the key.
Floating-point rounding of the float32 streaming arithmetic is ignored, as everywhere in DP.

Mechanisms (`strategy(name, ...)`); all strategies are lower-triangular n x n matrices C:
  gaussian  C = I: independent noise each round (DP-SGD / DP-FedAvg noise), for comparison.
  tree      DP-FTRL tree aggregation with the plain (non-Honaker) estimator, Kairouz et al.
            2021, "Practical and Private (Deep) Learning without Sampling or Shuffling": the
            prefix sum of round t carries the noise of the dyadic intervals of t's binary
            expansion. Round s completes one node, (s - 2^tz(s), s] (tz: trailing zeros), so
            C[s, i] = 1 iff i lies in node s; state: one node per level, O(log n).
  blt       buffered linear Toeplitz, McMahan et al. 2024, "A Hassle-free Algorithm for
            Private Learning in Practice: Don't Use Tree Aggregation, Use BLTs"
            (arXiv:2408.08868) and Dvijotham et al. 2024 (arXiv:2404.16706) (jax_privacy
            `buffered_toeplitz.optimize`, mean squared error on prefix sums): O(buffers) state.
  banded    banded Toeplitz with `bands` bands, Choquette-Choo et al. 2023, "(Amplified)
            Banded Matrix Factorization: A unified approach to private training" (jax_privacy
            `toeplitz.optimize_banded_toeplitz`, coefficients of L2 norm 1): O(bands) state.
  dense     the optimal prefix-sum factorization (jax_privacy `dense.optimize`, Denisov et al.
            2022); its state keeps every past draw, so it is for small n only.

Strategy optimization runs on the host in float64 inside a scoped `jax.enable_x64`; the
strategy keeps float32 NumPy parameters, and every derived number (sensitivity, the
materialized C) is computed in float64 from exactly those float32 values.
"""

from typing import Any, Callable, Mapping, NamedTuple

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
from jax_privacy.experimental import accounting as jp_accounting
from jax_privacy.matrix_factorization import buffered_toeplitz
from jax_privacy.matrix_factorization import dense
from jax_privacy.matrix_factorization import sensitivity as jp_sensitivity
from jax_privacy.matrix_factorization import toeplitz

from fedjax_lab.errors import ArgumentError

PyTree = Any

MECHANISMS = ("gaussian", "tree", "blt", "banded", "dense")
# dense.optimize is O(n^3) per L-BFGS step and its noise state holds all n past draws.
MAX_DENSE_ROUNDS = 512


class Strategy(NamedTuple):
  """A strategy matrix C, by its parameters (float32 NumPy arrays).

  arrays: gaussian, tree: none; blt: 'buf_decay', 'output_scale' (C's BLT parameters);
  banded: 'coefs' (C's Toeplitz coefficients, `bands` of them); dense: 'matrix' (C).
  """
  name: str
  num_rounds: int
  arrays: Mapping[str, np.ndarray]


class NoiseState(NamedTuple):
  """round: the next round's 0-based index (int32 scalar); buffers: per parameter leaf, the
  mechanism's memory of past noise (secret, like the noise key)."""
  round: jax.Array
  buffers: PyTree


class CorrelatedNoise(NamedTuple):
  """The pure functions of one mechanism (optax habit).

  init(params_like) -> NoiseState.
  step(like, state, key, noise_std) -> (noise, state): draws this round's fresh w ~ N(0,
    noise_std^2) shaped like `like` (`fresh_noise`; use a fresh, secret key each round) and
    returns z_r = (C^{-1} w)_r, shaped like `like`, to be ADDED to round r's clipped sum.
  correlate(state, fresh) -> (noise, state): the same with the fresh draw w_r given.
  Noise is float32 (at least); past `num_rounds` it is NaN, since the accounting covers
  num_rounds rounds only.
  """
  init: Callable[[PyTree], NoiseState]
  step: Callable[[PyTree, NoiseState, jax.Array, Any], tuple[PyTree, NoiseState]]
  correlate: Callable[[NoiseState, PyTree], tuple[PyTree, NoiseState]]


def _check_positive_int(argument: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ArgumentError(argument, f"must be an integer >= 1, got {value!r}.")


def strategy(name: str, num_rounds: int, *, bands: int | None = None,
             max_buffers: int = 10, min_separation: int = 1,
             max_participations: int | None = 1) -> Strategy:
  """Builds (optimizes, for blt / banded / dense) the strategy C of `name` for num_rounds.

  bands: banded only, the number of bands (<= num_rounds); for multiple participations its
    sensitivity is simplest with min_separation >= bands.
  max_buffers: blt only, the largest number of buffers tried (jax_privacy default 10).
  min_separation, max_participations: the participation pattern blt and dense are optimized
    for (None: as many as min_separation allows). They only shape the optimization; the
    pattern accounted for is the one given to `sensitivity` / `dp_event`.
  """
  if name not in MECHANISMS:
    raise ArgumentError("mechanism", f"must be one of {', '.join(MECHANISMS)}, got {name!r}.")
  _check_positive_int("num_rounds", num_rounds)
  _check_positive_int("min_separation", min_separation)
  if max_participations is not None:
    _check_positive_int("max_participations", max_participations)
  arrays = {}
  if name == "banded":
    if bands is None:
      raise ArgumentError("bands", "the banded mechanism needs the number of bands, e.g. 16.")
    _check_positive_int("bands", bands)
    if bands > num_rounds:
      raise ArgumentError("bands", f"must be <= num_rounds={num_rounds}, got {bands}.")
    with jax.enable_x64(True):
      coefs = toeplitz.optimize_banded_toeplitz(num_rounds, bands)
    arrays["coefs"] = np.asarray(coefs, np.float32)
  elif name == "blt":
    with jax.enable_x64(True):
      blt = buffered_toeplitz.optimize(
          n=num_rounds, min_sep=min_separation, max_participations=max_participations,
          error="mean", max_buffers=max_buffers)
      arrays["buf_decay"] = np.asarray(blt.buf_decay, np.float32)
      arrays["output_scale"] = np.asarray(blt.output_scale, np.float32)
  elif name == "dense":
    if num_rounds > MAX_DENSE_ROUNDS:
      raise ArgumentError("num_rounds", f"dense keeps all n past draws and optimizes in O(n^3)"
                          f"; use at most {MAX_DENSE_ROUNDS} rounds or mechanism blt, got "
                          f"{num_rounds}.")
    k = jp_sensitivity.minsep_true_max_participations(num_rounds, min_separation,
                                                      max_participations)
    with jax.enable_x64(True):
      if k == 1:
        matrix = dense.optimize(num_rounds)
      else:  # the min-sep recipe of dense.optimize's docstring
        matrix = dense.optimize(num_rounds, bands=min_separation, equal_norm=True)
    arrays["matrix"] = np.asarray(matrix, np.float32)
  return Strategy(name, num_rounds, arrays)


def _tree_levels(num_rounds: int) -> int:
  # Round t <= n completes a node at level tz(t) <= floor(log2 n).
  return int(num_rounds).bit_length()


def _toeplitz_coefs(s: Strategy) -> np.ndarray:
  n = s.num_rounds
  if s.name == "banded":
    return np.pad(s.arrays["coefs"].astype(np.float64), (0, n - len(s.arrays["coefs"])))
  decay = s.arrays["buf_decay"].astype(np.float64)
  scale = s.arrays["output_scale"].astype(np.float64)
  powers = np.arange(n - 1)[:, None]
  return np.concatenate([[1.0], (scale * decay ** powers).sum(axis=1)])


def strategy_matrix(s: Strategy) -> np.ndarray:
  """C as an n x n float64 NumPy array (host side: for sensitivity and closed-form error)."""
  n = s.num_rounds
  if s.name == "gaussian":
    return np.eye(n)
  if s.name == "dense":
    return s.arrays["matrix"].astype(np.float64)
  if s.name == "tree":
    rounds = np.arange(1, n + 1)
    sizes = rounds & -rounds  # 2^tz(s): node s covers rounds (s - size, s]
    i = rounds[None, :]
    return ((i <= rounds[:, None]) & (i > (rounds - sizes)[:, None])).astype(np.float64)
  coefs = _toeplitz_coefs(s)
  d = np.subtract.outer(np.arange(n), np.arange(n))
  return np.where(d >= 0, coefs[np.clip(d, 0, n - 1)], 0.0)


def sensitivity(s: Strategy, min_separation: int = 1,
                max_participations: int | None = 1) -> float:
  """max ||C u||_2 over participation vectors u (entries 0/1, at most max_participations
  ones, any two >= min_separation apart; None: as many as fit), for clip_norm 1.

  Exact where the structure allows (jax_privacy): columns of C that a record can share are
  orthogonal (gaussian; banded with min_separation >= bands): `get_sensitivity_banded_for_X`;
  Toeplitz with non-negative non-increasing coefficients (blt, banded): Theorem 2 of
  arXiv:2405.13763 (`toeplitz.minsep_sensitivity_squared`). Otherwise (tree, dense) the
  upper bound of Choquette-Choo et al. 2023, Algorithm 4, which never understates it. With one
  participation all of these are the largest column norm.
  """
  _check_positive_int("min_separation", min_separation)
  if max_participations is not None:
    _check_positive_int("max_participations", max_participations)
  n = s.num_rounds
  min_sep = min(min_separation, n)  # a separation beyond n allows one participation, as n does
  C = strategy_matrix(s)
  X = C.T @ C
  with jax.enable_x64(True):
    off_band = np.abs(np.subtract.outer(np.arange(n), np.arange(n))) >= min_sep
    if np.all(X[off_band] == 0):
      return float(jp_sensitivity.get_sensitivity_banded_for_X(
          jnp.asarray(X), min_sep, max_participations))
    if s.name in ("blt", "banded"):
      coefs = _toeplitz_coefs(s)
      if np.all(coefs >= 0) and np.all(np.diff(coefs) <= 0):
        return float(np.sqrt(toeplitz.minsep_sensitivity_squared(
            jnp.asarray(coefs), min_sep, max_participations, n=n)))
    return float(jp_sensitivity.get_min_sep_sensitivity_upper_bound_for_X(
        jnp.asarray(X), min_sep, max_participations))


def dp_event(s: Strategy, noise_multiplier: float, min_separation: int = 1,
             max_participations: int | None = 1) -> dp_accounting.DpEvent:
  """The unamplified event of the whole run: ONE Gaussian mechanism with noise multiplier
  noise_multiplier / sensitivity (noise_multiplier = noise_std / clip_norm), not composed
  per round. The adversary may choose the cohorts (module docstring); no sampling is assumed.
  """
  if not noise_multiplier >= 0:
    raise ArgumentError("noise_multiplier", f"must be >= 0, got {noise_multiplier}.")
  sens = sensitivity(s, min_separation, max_participations)
  return dp_accounting.GaussianDpEvent(noise_multiplier / sens)


def amplified_dp_event(s: Strategy, noise_multiplier: float,
                       sampling_prob: float) -> dp_accounting.DpEvent:
  """Banded only: the amplified event of Choquette-Choo et al. 2023 (jax_privacy
  `experimental.accounting.amplified_bandmf_event`).

  Assumptions: records are split into `bands` fixed groups; round r uses only group
  r mod bands, within which each record joins independently with probability sampling_prob;
  WHICH records join is secret from the adversary (it does not hold against a server that
  picks the cohort). C's columns have norm 1 (coefficients of norm 1), as the event needs.
  jax_privacy 2.0 has no amplified event for blt (nor tree, dense).
  """
  if s.name != "banded":
    raise ArgumentError("mechanism", f"amplification by sampling is accounted for banded only "
                        f"(jax_privacy 2.0), got {s.name!r}; use dp_event.")
  # The event assumes columns of norm <= 1; float32 rounding of the coefficients may leave
  # them a hair above, which this division pays for.
  column_norm = max(1.0, sensitivity(s))
  return jp_accounting.amplified_bandmf_event(
      noise_multiplier / column_norm, s.num_rounds, num_bands=len(s.arrays["coefs"]),
      sampling_prob=sampling_prob)


def _leaf_fns(s: Strategy):
  """(init(leaf) -> buffers, next(w, buffers, round) -> (z, buffers)) for one array leaf."""
  n = s.num_rounds
  if s.name == "gaussian":
    # One zero scalar: an empty container would not survive a checkpoint round trip.
    return (lambda leaf: jnp.zeros((), leaf.dtype)), (lambda w, buf, r: (w, buf))
  if s.name == "tree":
    levels = _tree_levels(n)

    def tree_init(leaf):
      return jnp.zeros((levels,) + leaf.shape, leaf.dtype)

    def tree_next(w, nodes, r):
      t = r + 1
      # Round t completes the node at level tz(t), which replaces the nodes below it in the
      # prefix; those slots are rewritten before they are read again (bit i of t is set only
      # after a round completing a level-i node), so they need no clearing.
      level = jnp.sum(t % (2 ** jnp.arange(levels)) == 0) - 1
      below = (jnp.arange(levels) < level).reshape((levels,) + (1,) * w.ndim)
      z = w - jnp.sum(jnp.where(below, nodes, 0), axis=0)
      return z, nodes.at[level].set(w)
    return tree_init, tree_next
  if s.name == "dense":
    inverse = np.linalg.inv(strategy_matrix(s)).astype(np.float32)

    def dense_init(leaf):
      return jnp.zeros((n,) + leaf.shape, leaf.dtype)

    def dense_next(w, history, r):
      history = history.at[jnp.minimum(r, n - 1)].set(w)
      row = jnp.asarray(inverse)[jnp.minimum(r, n - 1)].astype(w.dtype)
      return jnp.tensordot(row, history, axes=1), history
    return dense_init, dense_next
  if s.name == "blt":
    inverse = buffered_toeplitz.BufferedToeplitz(
        buf_decay=jnp.asarray(s.arrays["buf_decay"]),
        output_scale=jnp.asarray(s.arrays["output_scale"])).inverse_as_streaming_matrix()
  else:
    inverse = toeplitz.inverse_as_streaming_matrix(jnp.asarray(s.arrays["coefs"]))
  # jax_privacy's streaming C^{-1} (BLT: Alg. 3 of arXiv:2408.08868; banded: Alg. 9 of
  # arXiv:2306.08153) lifts itself over pytrees; applied here to one leaf.
  return inverse.init_multiply, lambda w, buf, r: inverse.multiply_next(w, buf)


def _noise_dtype(leaf):
  return jnp.promote_types(leaf.dtype, jnp.float32)


def fresh_noise(key: jax.Array, like: PyTree, noise_std) -> PyTree:
  """i.i.d. N(0, noise_std^2) shaped like `like` (arrays or ShapeDtypeStructs): `key` split
  once into one key per leaf in `jax.tree.leaves` order, as in `noise.privatize`."""
  leaves, treedef = jax.tree.flatten(like)
  keys = jax.random.split(key, len(leaves))
  std = jnp.asarray(noise_std, jnp.float32)
  return jax.tree.unflatten(treedef, [
      std * jax.random.normal(k, jnp.shape(leaf), _noise_dtype(leaf))
      for leaf, k in zip(leaves, keys)])


def correlated_noise(s: Strategy) -> CorrelatedNoise:
  """The streaming noise of strategy s: z = C^{-1} w, one round per call (see CorrelatedNoise).
  Memory per parameter: gaussian 1 scalar, tree log2(n)+1 copies, blt one per buffer, banded
  bands-1, dense n."""
  n = s.num_rounds
  leaf_init, leaf_next = _leaf_fns(s)

  def init(params_like):
    buffers = jax.tree.map(
        lambda p: leaf_init(jax.ShapeDtypeStruct(jnp.shape(p), _noise_dtype(p))), params_like)
    return NoiseState(jnp.zeros((), jnp.int32), buffers)

  def correlate(state, fresh):
    leaves, treedef = jax.tree.flatten(fresh)
    buffers = treedef.flatten_up_to(state.buffers)
    out = [leaf_next(w, buf, state.round) for w, buf in zip(leaves, buffers)]
    # Past num_rounds the accounting no longer holds: poison the noise rather than under-report.
    noise = [jnp.where(state.round < n, z, jnp.nan) for z, _ in out]
    return (jax.tree.unflatten(treedef, noise),
            NoiseState(state.round + 1, jax.tree.unflatten(treedef, [b for _, b in out])))

  def step(like, state, key, noise_std):
    return correlate(state, fresh_noise(key, like, noise_std))

  return CorrelatedNoise(init, step, correlate)
