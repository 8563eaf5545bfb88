"""In-run canary audit of site-level DP-FedAvg and example-level DP-SGD (audit.canaries=m;
docs/audit.md).

Andrew, Kairouz, Oh, Oprea, McMahan & Suriyakumar, "One-shot Empirical Privacy Estimation
for Federated Learning" (ICLR 2024), with the one-run lower bound of Steinke, Nasr &
Jagielski (NeurIPS 2023). One training run, no extra rounds:

  * m canary sites, canary j with a fixed random unit direction u_j in parameter space
    (`directions`: NumPy, from audit.canary_seed; public: the adversary knows every u_j).
  * Each canary is in the population independently with probability 1/2 (`included`), drawn
    from the run's sampling key: secret under dp.randomness=secret, from config.seed under
    seeded, exactly like the cohorts. The adversary does not know who is in.
  * An included canary takes part in each round independently with the real sites' rate q
    (Poisson, the accountant's sampling_prob; without DP cohort_size / num_sites) and sends
    clip_norm * u_j: a unit direction clipped like any update. It is added to the round's sum
    of the sites' updates before the server's step (`round_sum`), inside the jitted round:
    the canaries cost a gather of the ~q m/2 rows taking part per round, not m trainings.

Accounting (why the real sites' epsilon is unchanged): the accountant analyses each site
under add/remove adjacency with Poisson sampling at rate q, and the Poisson subsampled
Gaussian's epsilon depends on q, sigma and the steps only, not on how many others are in the
population: the other sites' contributions, canaries included, are the same in both
neighbouring data sets. The canaries are sampled at the same q independently of the real
sites, add no noise share and take no slot (the real sites' truncation, noise top-up and
expected-cohort divisor are those of the real population), so the released noise is exactly
what it is without them. So q is kept: num_sites for the accounting stays the real sites'.
Each canary itself is Poisson at q, clipped to C and covered by the same noise: it faces the
headline mechanism (the "models" guarantee row) and is never truncated, so that row's
epsilon is the claim the audit tests.

Scores (`Scorer`), from what an adversary sees (the released models, w_0 included):
  all_iterates  sum over rounds t of cos(u_j, w_{t+1} - w_t) = <u_j, S>, S the sum of the
                unit deltas. For a direction independent of the deltas (an excluded canary)
                <u_j, S> has mean 0 and variance exactly |S|^2 / d (E[u u^T] = I / d), so
                the null is N(0, |S|^2 / d), from the released models alone. N(0, T / d)
                holds only for orthogonal deltas: the real training's drift correlates
                them (|S|^2 / T: 1.0 at claim 1, 1.2 at claim 8, 31 without DP on digits),
                and T / d then inflated the estimate (174 instead of 14 without DP).
                Andrew et al. score every iterate by its cosine; with Poisson participation
                in about q T rounds the sum accumulates the canary's signal where a maximum
                keeps one round's.
  final_model   cos(u_j, w_T - w_0), null N(0, 1/d).
  likelihood_ratio (the all-iterates LOWER BOUND's score; the estimate keeps the sum above)
                LR_j = sum_t log(1 - q + q exp(a_t z_jt - a_t^2 / 2)), z_jt = sqrt(d)
                cos(u_j, Delta_t), a_t = sqrt(d) s / ||Delta_t||, s = server lr * C / K the
                displacement one canary adds to the released delta (`Canaries.signal`).
                The Neyman-Pearson score of "u_j took part in each round independently at
                q" against "never" when z_jt is N(0, 1) without the canary and N(a_t, 1)
                with it: a canary's signal is spread over ~q T rounds, and the linear sum
                weighs the rounds it missed (pure noise) like those it joined. It uses only
                public quantities (C, K, q, the server's lr) and the released deltas, never
                who is in, so the one-run bound is valid for it whatever its model's
                accuracy; a wrong model costs power, not validity. Needs server sgd without
                momentum (the canary's displacement is then known); otherwise the bound uses
                the sum of cosines.
Example level (dp.level=example: white-box gradient canaries, the same draws and scores).
Canary j is an extra EXAMPLE whose clipped gradient is -C u_j (gradient descent then moves
the model along +u_j, as a site canary's update does; -u_j is as isotropic as u_j). An included
canary takes part in each DP-SGD step at the accountant's q (privacy plan: batch_size over
the smallest site) in every round: the accountant claims no amplification by the cohort, so
neither may the canary. Exact only when a round is one DP-SGD step at every site
(client.local_steps=1, client sgd without momentum) and every site divides by batch_size
with uniform weights (dp.noise=coordinated): site k's delta is then -lr_c (clipped sum +
noise) / B, entering the sum with weight 1 / K, linear in the clipped sum, so adding
lr_c C / (B K) u_j to the round's sum (`make`'s weight; `round_sum`) is exactly one such
example at a cohort site; the canary faces sigma at q over `rounds` steps, the "models"
row. Accounting as above, per example: the canaries are not in any site's data, so they
change no site's size, rate, divisor, slots or noise share; each real example's neighbouring
data sets differ only in it, and its epsilon depends on q, sigma and the steps alone.
Everything else at example level is refused (`validate`, naming the key).

The ESTIMATE (NOT a bound; docs/audit.md): all iterates, `bounds.participation_estimate`: mu,
the shift of z_jt in the rounds canary j took part in (the auditor's own draws, the run's
sampling key) over the null's spread from the excluded canaries, is one participation's
signal-to-noise; the estimate is the epsilon of the guarantee row's mechanism (its sampling
rate and steps: Poisson-sampled Gaussian releases) at noise multiplier 1 / mu, by
dp-accounting's PLD, with a 95% interval. Final model: `bounds.canary_estimate`, Andrew et
al.'s mu-GDP fit of the cosines. The one-run LOWER BOUND at 95% (all iterates: from the
likelihood ratios; final model: from the cosines; bounds.epsilon_lower_bound, one_run_grid:
two-sided guesses with abstention over a grid of guess counts fixed in advance; each
observation at 95% on its own) uses no participation, only the public directions and the
released models. The mu-GDP fit of the sum of cosines, the all-iterates estimate before, is
diluted by the ~(1 - q) T rounds a canary misses (5.1 at claim 8 where the PLD epsilon is
7.3; docs/audit.md).

Not audited: example level outside the settings above, adaptive clipping, matrix-
factorization noise, robust aggregators, rounds_per_step > 1 and algorithms other than
fedavg / fedprox (refused with the key to change). Under secure aggregation the canaries are
added to the secure sum's output, which equals the sum with their rows in it up to their
rows' rounding onto the grid; the server sees only that sum and the released models.
"""

from typing import NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
from scipy import stats

from fedjax_lab.attacks import bounds
from fedjax_lab.errors import ConfigError
from fedjax_lab.privacy.shares import example_fixed_divisor

# fold_in tags of the canaries' draws under the run's sampling key.
_INCLUDED = 0xCA7A0001
_PARTICIPATES = 0xCA7A0002


def validate(config) -> None:
  """ConfigError naming the key unless the canary audit can run on this config."""
  a = config.audit
  if not (isinstance(a.canaries, int) and a.canaries >= 0):
    raise ConfigError("audit.canaries", f"must be an integer >= 0 (0: no audit), got "
                      f"{a.canaries}")
  if not (isinstance(a.canary_seed, int) and a.canary_seed >= 0):
    raise ConfigError("audit.canary_seed", f"must be an integer >= 0, got {a.canary_seed}")
  if not a.break_noise_divisor >= 1.0:
    raise ConfigError("audit.break_noise_divisor", f"must be >= 1 (1: no deliberate bug), "
                      f"got {a.break_noise_divisor}")
  if a.break_noise_divisor != 1.0 and config.dp.level != "site":
    raise ConfigError("audit.break_noise_divisor", "the deliberate bug shrinks site-level "
                      "DP's noise; use dp.level=site or leave it at 1.0")
  if not a.canaries:
    return
  example = config.dp.level == "example"
  client_args = config.client.optimizer_args
  refuse = [
      # Example level (module docstring): exact only where a round is one linear DP-SGD step
      # with one divisor at every site and fixed weights in the round's sum.
      ("client.local_steps", example and config.client.local_steps != 1,
       "an example-level canary's gradient enters the round's sum exactly only when a round "
       "is one DP-SGD step (later steps are taken at parameters it moved); use "
       "client.local_steps=1"),
      ("client.optimizer", example and config.client.optimizer != "sgd",
       "an example-level canary's step is client lr times its gradient only under plain sgd; "
       "use client.optimizer=sgd"),
      ("client.optimizer_args", example and bool(client_args.get("momentum", 0.0)
                                                 or client_args.get("nesterov", False)),
       "an example-level canary's one step is client lr times its gradient without "
       "momentum (nesterov scales it by 1 + momentum); leave client.optimizer_args empty"),
      ("dp.noise", example and config.dp.noise != "coordinated",
       "example-level canaries need one divisor (batch_size) at every site and uniform "
       "weights; use dp.noise=coordinated"),
      ("secagg.dropout_rate", example and config.secagg.enabled
       and config.secagg.dropout_rate > 0, "dropouts reweight the surviving sites each round; "
       "use secagg.dropout_rate=0"),
      ("algorithm.name", config.algorithm.name not in ("fedavg", "fedprox"),
       "canary sites join FedAvg's round; use fedavg or fedprox"),
      ("rounds_per_step", config.rounds_per_step != 1, "the audit scores every round's model; "
       "use rounds_per_step=1"),
      ("dp.adaptive_clip", config.dp.adaptive_clip, "canaries are clipped to a fixed norm; "
       "use dp.adaptive_clip=False"),
      ("dp.mechanism", config.dp.get("mechanism", "gaussian") != "gaussian",
       "canaries take part like Poisson-sampled sites; use dp.mechanism=gaussian"),
      ("aggregator.robust", config.aggregator.robust != "none" or config.aggregator.pre != "none"
       or config.attack.name != "none", "canaries join the plain sum; use aggregator.robust="
       "none, aggregator.pre=none and attack.name=none"),
      ("algorithm.local_params", bool(config.algorithm.local_params),
       "canary directions span every parameter; leave algorithm.local_params empty")]
  for key, bad, why in refuse:
    if bad:
      raise ConfigError(key, f"with audit.canaries > 0: {why}")


def directions(seed: int, m: int, d: int) -> np.ndarray:
  """[m, d] float32: canary j's unit direction u_j, isotropic (normalised Gaussian)."""
  g = np.random.default_rng(seed).standard_normal((m, d))
  return (g / np.linalg.norm(g, axis=1, keepdims=True)).astype(np.float32)


def included(sampling_key, m: int) -> jax.Array:
  """[m] bool: which canaries are in the population, each with probability 1/2."""
  return jax.random.bernoulli(jax.random.fold_in(sampling_key, _INCLUDED), 0.5, (m,))


def participates(sampling_key, t, m: int, rate: float) -> jax.Array:
  """[m] bool: the included canaries that take part in round t (each at `rate`)."""
  key = jax.random.fold_in(jax.random.fold_in(sampling_key, _PARTICIPATES), t)
  return included(sampling_key, m) & jax.random.bernoulli(key, rate, (m,))


class Canaries(NamedTuple):
  """What the round needs: the directions on device, the rate, the weight of one canary's
  update in the round's sum, clip_norm / cohort_size (the sites' updates enter that sum
  already divided by the expected cohort, site DP's expected_mean member, or weighted by
  their share of the cohort without DP: 1 / cohort_size on average; example level:
  client lr * clip_norm / (batch_size * cohort_size), one clipped example's step), `slots`,
  the most canaries a round gathers (P(Binomial(m, rate) > slots) < 1e-12: no round ever has
  more), and `signal`, one canary's displacement of the released model, server lr * weight
  (server sgd without momentum; None otherwise: the likelihood-ratio score is not computed)."""
  directions: jax.Array  # [m, d]
  rate: float
  weight: float
  slots: int
  signal: float | None = None


def round_sum(canaries: Canaries, directions: jax.Array, sampling_key, t) -> jax.Array:
  """[d]: the round's canary updates summed, to add to the sites' sum (ravel order). Only
  the `slots` rows of the taking-part canaries are read, not all m. `directions` is
  canaries.directions passed in as an argument of the jitted round (the data's
  canary_directions): closed over, the [m, d] array became a constant of the compiled round,
  which cost ~15% of the run at m = 1000 (benchmarks/RESULTS.md)."""
  m = directions.shape[0]
  take = participates(sampling_key, t, m, canaries.rate)
  idx = jnp.nonzero(take, size=canaries.slots, fill_value=0)[0]
  valid = (jnp.arange(canaries.slots) < take.sum()).astype(jnp.float32)
  return canaries.weight * (valid @ directions[idx])


def make(config, privacy, num_sites: int, like) -> Canaries | None:
  """The run's canaries (None with audit.canaries=0); `like`: the parameters' shapes."""
  m = config.audit.canaries
  if not m:
    return None
  d = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(like))
  if privacy is not None:  # the accountant's q (privacy/): the canaries share it
    rate = float(privacy.sampling_prob)
  else:  # no DP: the cohort is drawn without replacement; canaries at its inclusion rate
    rate = config.cohort_size / num_sites
  if config.dp.level == "example":
    # One DP-SGD step a round (validate): site k's delta is -client lr (clipped sum + noise)
    # / B (B = shares.example_fixed_divisor, coordinated noise), summed with weight 1/K
    # (uniform weighting, cohort K). A canary's clipped gradient -C u_j in that sum moves it
    # by client lr C / (B K) along u_j, as one such example at a cohort site would.
    weight = (float(config.client.lr) * float(config.dp.clip_norm)
              / (example_fixed_divisor(config) * config.cohort_size))
  else:
    weight = float(config.dp.clip_norm) / config.cohort_size
  slots = int(min(m, stats.binom.isf(1e-12, m, rate) + 1))
  # server_step: x <- x - lr (-mean_delta) under plain sgd; momentum or adaptive optimizers
  # make the canary's displacement depend on the past (secret) rounds.
  plain_sgd = (config.server.optimizer == "sgd"
               and not config.server.optimizer_args.get("momentum", 0.0))
  signal = float(config.server.lr) * weight if plain_sgd else None
  return Canaries(jnp.asarray(directions(config.audit.canary_seed, m, d)), rate, weight, slots,
                  signal)


@jax.jit
def _ravel(params):
  return jax.flatten_util.ravel_pytree(params)[0]


def flat(params) -> np.ndarray:
  """The parameters as one float64 vector, in the order of the canary directions."""
  return np.asarray(_ravel(params), np.float64)


def cosines(u: np.ndarray, delta: np.ndarray) -> np.ndarray:
  """[m]: cos(u_j, delta) for unit rows u_j (0 for a zero delta)."""
  norm = float(np.linalg.norm(delta))
  return u @ delta / norm if norm > 0 else np.zeros(len(u))


@jax.jit
def _observe(last, params, total, rounds):
  """Adds the round's delta over its norm to `total` on the device (no host sync)."""
  w = _ravel(params).astype(jnp.float32)
  delta = w - last
  norm = jnp.linalg.norm(delta)
  unit = jnp.where(norm > 0, delta / jnp.where(norm > 0, norm, 1.0), 0.0)
  return w, total + unit, rounds + (norm > 0).astype(jnp.int32), unit, norm


@jax.jit
def _observe_canaries(u, unit, norm, acc, sampling_key, t, rate, signal):
  """Adds the round's per-canary statistics to `acc` on the device: with z_jt = sqrt(d)
  cos(u_j, Delta_t), the sum of z^2 (the null's spread), the sums of z and z^2 over the rounds
  each canary took part in and their count (the estimate's signal), and the log-likelihood
  ratio (module docstring) where `signal` is known. One [m, d] x [d] product."""
  m, d = u.shape
  root_d = jnp.sqrt(jnp.float32(d))
  z = root_d * (u @ unit)
  counted = norm > 0
  joined = (participates(sampling_key, t, m, rate) & counted).astype(jnp.float32)
  out = {"z_sq": acc["z_sq"] + jnp.where(counted, z * z, 0.0),
         "part_z": acc["part_z"] + joined * z,
         "part_z_sq": acc["part_z_sq"] + joined * z * z,
         "part_n": acc["part_n"] + joined}
  if "lr_sum" in acc:
    a = root_d * signal / jnp.where(counted, norm, 1.0)
    # log(1 - q + q e^x) without overflow; q = 1 gives log(0) = -inf, which logaddexp absorbs.
    term = jnp.logaddexp(jnp.log1p(-rate), jnp.log(rate) + a * z - a * a / 2)
    out["lr_sum"] = acc["lr_sum"] + jnp.where(counted, term, 0.0)
  return out


# The per-canary running sums kept in the checkpoint's meta as "canary_<name>".
_STATISTICS = ("z_sq", "part_z", "part_z_sq", "part_n")


class Scorer:
  """The all-iterates scores. sum_t cos(u_j, Delta_t) = <u_j, sum_t Delta_t / ||Delta_t||>, so
  the round adds one [d] vector (on the device, no host sync) and the [m, d] product for the
  sum of cosines is taken once at the end; the likelihood ratio and the estimate's per-round
  statistics are not linear in the cosines, so each round adds its [m] terms (one [m, d]
  matvec on the device). `save` puts the running sums in the checkpoint's meta, from which a
  resumed run continues. `observe` takes the model after every round t (and once before the
  first, without t). A round that left the model unchanged (secure aggregation aborted it) is
  not counted. `sampling_key` is the run's: it says which canaries took part in round t, which
  only the estimate uses (the auditor's own draws), never the bound's scores."""

  def __init__(self, canaries: Canaries, meta: dict, sampling_key):
    self.u = canaries.directions
    self.rate, self.signal, self.sampling_key = canaries.rate, canaries.signal, sampling_key
    m, d = self.u.shape
    self.total = jnp.asarray(meta.get("canary_unit_sum", np.zeros(d)), jnp.float32)
    self.rounds = jnp.int32(meta.get("canary_rounds", 0))
    names = _STATISTICS + (() if self.signal is None else ("lr_sum",))
    if meta.get("canary_rounds", 0) and any(f"canary_{k}" not in meta for k in names):
      raise ValueError("the checkpoint's meta lacks the canary audit's per-round statistics "
                       "(written by an older lab): rerun the audit in a new workdir")
    self.acc = {k: jnp.asarray(meta.get(f"canary_{k}", np.zeros(m)), jnp.float32)
                for k in names}
    self.last = None

  def observe(self, params, t=None) -> None:
    if self.last is None:
      self.last = _ravel(params).astype(jnp.float32)
      return
    self.last, self.total, self.rounds, unit, norm = _observe(self.last, params, self.total,
                                                              self.rounds)
    self.acc = _observe_canaries(self.u, unit, norm, self.acc, self.sampling_key, t, self.rate,
                                 self.signal)

  def save(self, meta: dict) -> None:
    meta["canary_unit_sum"] = np.asarray(self.total, np.float64).tolist()
    meta["canary_rounds"] = int(self.rounds)
    for k, v in self.acc.items():
      meta[f"canary_{k}"] = np.asarray(v, np.float64).tolist()

  def scores(self, w0: np.ndarray) -> dict:
    """{observation: (scores, null standard deviation)}."""
    u, d = np.asarray(self.u, np.float64), self.u.shape[1]
    total = np.asarray(self.total, np.float64)
    return {"all_iterates": (u @ total, max(float(np.linalg.norm(total)), 1e-30) / np.sqrt(d)),
            "final_model": (cosines(u, np.asarray(self.last, np.float64) - w0),
                            np.sqrt(1.0 / d))}

  def likelihood_ratio(self) -> np.ndarray | None:
    """[m]: the likelihood-ratio scores (None where Canaries.signal is None)."""
    return np.asarray(self.acc["lr_sum"], np.float64) if "lr_sum" in self.acc else None

  def round_statistics(self) -> dict:
    """The estimate's per-canary sums (bounds.participation_estimate's arguments): z_sum
    (sum_t z_jt = sqrt(d) times the cosine sum), z_sq, part_z, part_z_sq, part_n, rounds."""
    u = np.asarray(self.u, np.float64)
    out = {k: np.asarray(self.acc[k], np.float64) for k in _STATISTICS}
    out["z_sum"] = np.sqrt(u.shape[1]) * (u @ np.asarray(self.total, np.float64))
    out["rounds"] = int(self.rounds)
    return out


# What each observation is, and which guarantee row (its "sees") it is compared with.
_VIEWS = {"all_iterates": ("every round's released model (w_0 ... w_T)", "models"),
          "final_model": ("the final model and its initialisation only (w_0, w_T)", "models")}


def report(exp, scorer: Scorer, w0, guarantees: list[dict] | None, delta: float,
           claimed_headline) -> dict:
  """summary.json["audit"]: per observation the claimed epsilon of that adversary's guarantee
  row, the ESTIMATE and the one-run lower bound at 95%."""
  cfg = exp.config
  m = cfg.audit.canaries
  inc = np.asarray(included(exp.keys["sampling"], m))
  rows = {}
  for g in guarantees or []:  # headline first: a seeded run's "knows the seed" row comes after
    rows.setdefault(g["sees"], g)
  canaries = {"m": m, "included": int(inc.sum()), "seed": cfg.audit.canary_seed,
              "rate": float(exp.canaries.rate), "level": "site" if cfg.dp.level == "none"
              else cfg.dp.level}
  views = dict(_VIEWS)
  if "sum" in rows and cfg.secagg.enabled:  # the server's row under secure aggregation
    views["server_sum"] = ("the server under secure aggregation: every round's sum (= the "
                           "all-iterates view; it also knows each round's cohort, which these "
                           "scores do not use)", "sum")
  out = {"estimate_is": "an ESTIMATE, NOT a bound: all iterates (and server_sum), the "
                        "epsilon of the guarantee row's mechanism (its sampling rate and "
                        "steps) at the noise multiplier measured from the canaries' shift in "
                        "the rounds they took part in (bounds.participation_estimate); final "
                        "model, Andrew et al. 2024's mu-GDP fitted to the cosines",
         "lower_bound_is": "Steinke et al. 2023 one-run lower bound with abstention (a grid "
                           "of guess counts fixed in advance, union bound over it), 95% for "
                           "each observation",
         "delta": delta}
  if cfg.audit.break_noise_divisor != 1.0:
    out["deliberately_broken"] = (f"noise multiplier divided by {cfg.audit.break_noise_divisor}"
                                  " with the claim unchanged (audit.break_noise_divisor)")
  scores, lr, sums = scorer.scores(w0), scorer.likelihood_ratio(), scorer.round_statistics()
  for name, (view, sees) in views.items():
    s, null_std = scores["all_iterates" if name == "server_sum" else name]
    # The bound holds for any score computed without knowing who is in (bounds.one_run_grid):
    # the likelihood ratio where it exists (more power), the cosine for the final model.
    b, stat = ((lr, "likelihood_ratio") if name != "final_model" and lr is not None
               else (s, "sum_of_cosines" if name != "final_model" else "cosine"))
    row = rows.get(sees)
    claimed = row["epsilon"] if row is not None else claimed_headline
    if name == "final_model":
      est = {"estimate": bounds.canary_estimate(s[inc], null_std, delta),
             "estimate_statistic": "cosine_gdp"}
    else:  # the row's mechanism; without DP the canaries' own rate over the counted rounds
      fit = bounds.participation_estimate(
          sums, inc, row["sampling_prob"] if row else exp.canaries.rate,
          row["steps"] if row else sums["rounds"], delta)
      est = {"estimate": fit.pop("estimate"), "estimate_interval_95": fit.pop("interval"),
             "estimate_statistic": "per_participation_shift", "estimate_fit": fit}
    out[name] = {
        "claimed": claimed, "observed": view,
        "adversary": row["adversary"] if row is not None else "no DP: no claim",
        **est,
        "lower_bound_95": bounds.epsilon_lower_bound(b[inc], b[~inc], delta, 0.95,
                                                     "one_run_grid"),
        "bound_statistic": stat,
        "canaries": canaries}
  return out


def _estimate_text(r: dict) -> str:
  if r["estimate"] is None:
    return r["estimate_fit"]["why"]
  at_least = ">= " if r.get("estimate_fit", {}).get("at_least") else ""
  interval = r.get("estimate_interval_95")
  return f"{at_least}{r['estimate']:.3f}" + (f" [95% interval {interval[0]:.3f}, "
                                              f"{interval[1]:.3f}]" if interval else "")


def format_lines(a: dict) -> list[str]:
  """One line per observation: the claim, the estimate (labelled) and the lower bound."""
  lines = []
  for name in ("all_iterates", "final_model", "server_sum"):
    if name not in a:
      continue
    r = a[name]
    claim = "none (no DP)" if r["claimed"] is None else f"{r['claimed']:.3f}"
    lines.append(f"canary audit ({name}; {r['canaries']['included']} of "
                 f"{r['canaries']['m']} canaries in): claimed epsilon {claim}, estimate (not a "
                 f"bound) {_estimate_text(r)}, 95% lower bound {r['lower_bound_95']:.3f}"
                 + (" [DELIBERATELY BROKEN RUN]" if "deliberately_broken" in a else ""))
  return lines
