"""Which epsilon holds against whom: one (epsilon, delta) per adversary of a DP run.

The headline epsilon of a run (summary.json `epsilon`) is that of anyone who sees the models
the server releases. It is not the epsilon of every party: the server chooses the cohort (so
amplification by sampling the cohort does not hold against it) and, unless secure aggregation
(secagg.enabled) hides them, sees each site's update; under coordinated noise each site knows
its own share of the noise, so k colluding sites face only what the others added. Each entry here
names the adversary, what it sees and what is assumed, and its epsilon is computed with
dp-accounting for the mechanism THAT adversary faces:

  adversary                          noise multiplier it faces          sampling it cannot see
  released model                     sigma                              q (as the headline)
  server, site level                 sigma (parallel) or                none: it picks the cohort
                                     sigma / sqrt(max cohort) (coordinated, updates in the clear)
  server, example level              sigma (parallel) or sigma/sqrt(K)  q (each site's batches)
  server, secagg.enabled             sigma (it sees the sum only)       none (site), q (example)
  k colluding sites, coordinated     sigma sqrt(1 - k/K) (example level, K fixed)    q
                                     sigma / sqrt(k + 1) (site level: a Poisson cohort can
                                     hold just the k sites and the target)           none
  server + k sites, secagg,          example: sigma sqrt(1 - k/n), n = K, or t with  q
  coordinated (k = 1, t - 1)         dropouts; site: the least over realised cohorts none
                                     (server_colluding_noise)

(sigma: the accountant's noise multiplier, with adaptive clipping the combined z of the
update and the count, Andrew et al. 2021 Thm 1; every party's view is a post-processing of
per-site Gaussian releases, so the same split applies.) An entry whose epsilon would need a
secret the run does not keep (noise regenerated from a published seed) has epsilon None.
Secure aggregation hides the masks from fewer than t colluding sites, not the noise shares
they added: hence the server + k rows. Under SecAgg+ with dropouts the server learns the sum
of each connected component of the surviving graph; each holds >= t sites (server_colluding_noise).
Each entry carries the mechanism it was computed for (Guarantee), so a reader can recompute it.

Every entry is reported at the run's delta (dp.delta). Truncated Poisson samples
(privacy/sampling.py) are paid for in delta: a run whose Poisson mechanism is (eps, d)-DP is
(eps, d + (1 + e^eps) overflow_bound)-DP as truncated. The slots are sized so that the headline
fits in dp.delta with d = accountant_delta; an entry with a larger epsilon pays more, so its
epsilon is the smallest eps with eps >= epsilon_dp_accounting(d = dp.delta - (1 + e^eps)
overflow_bound), found by fixed-point iteration. When none exists (a large epsilon makes the
truncation cost exceed delta), the entry claims no amplification by sampling (probability 1),
which holds for any sample, truncated or not.
"""

import math
from typing import NamedTuple

from fedjax_lab.privacy import accounting
from fedjax_lab.secagg import config as secagg_config

RANDOMNESS = ("auto", "secret", "seeded")
# Site level: the server picks the cohort and sees who uploads, so no epsilon hides whether a
# site took part; its rows protect what the site's data contributes.
_PRESENCE = ("it sees which sites take part, so the guarantee is for a site's data (its "
             "update replaced by zero: the Gaussian's epsilon at sensitivity C is the same), "
             "not for whether it took part")


class Guarantee(NamedTuple):
  """One adversary's guarantee, with the mechanism it faces: epsilon is dp-accounting's for
  SelfComposed(PoissonSampled(sampling_prob, Gaussian(noise_multiplier)), steps) (without the
  PoissonSampled when sampling_prob is 1) at accountant_delta, so a reader can recompute it."""
  adversary: str
  epsilon: float | None
  delta: float
  assumes: str
  sees: str                   # "models" (the released ones), "sum" (secure aggregation), "updates"
  colluding_sites: int        # sites whose noise shares and updates it knows (0: none)
  noise_multiplier: float     # the noise it faces, in units of the sensitivity (0: none left)
  sampling_prob: float        # 1.0 where no amplification by sampling holds against it
  steps: int
  accountant: str
  accountant_delta: float     # dp-accounting's delta; delta - this pays for the truncation


class Mechanism(NamedTuple):
  """What a run releases, as experiment.PrivacyPlan states it (the numbers entries need)."""
  level: str                  # "example" or "site"
  noise: str                  # "parallel" or "coordinated"
  noise_multiplier: float     # sigma the accountant composes (combined z with adaptive clipping)
  sampling_prob: float        # q of the headline
  steps: int                  # DP steps composed so far
  accountant_delta: float     # the delta dp-accounting is asked for
  delta: float                # dp.delta, the run's reported delta
  overflow_bound: float       # P(any overflow of the unit's truncated Poisson draws)
  accountant: str             # "rdp" or "pld"
  cohort_size: int            # K: sites per round (example level), expected cohort (site level)
  max_cohort: int             # site level: slots of the Poisson cohort (its largest size)
  randomness: str             # "secret" or "seeded"
  # secagg.enabled: the server receives masked vectors and learns only their sum.
  secure_aggregation: bool = False
  # Coordinated example level: each site adds sigma/sqrt(noise_shares): the cohort K, or with
  # secure aggregation and dropouts its threshold t (experiment.noise_shares).
  noise_shares: int = 0
  # secagg.enabled: TV between the run as quantized and the Gaussian run (secagg_delta.py).
  secagg_tv: float = 0.0
  # Secure aggregation's graph and threshold (secagg.neighbours, secagg.threshold: None =
  # unset) and whether sites drop out: they bound how many sites can collude with the server
  # and how few uploads a finished round holds.
  secagg_neighbours: int | None = None
  secagg_threshold: int | None = None
  secagg_dropouts: bool = False


def resolve_randomness(randomness: str, data_name: str) -> str:
  """`auto`: secret for the user's own data (files, TFDS), seeded for the bundled public sets.

  Seeded noise keeps a run on public data bit-reproducible from config.seed; it protects no
  one, because summary.json publishes the seed. A user's file is what DP is for, so there the
  noise and sampling come from OS entropy unless the user asks for seeded noise.
  """
  if randomness != "auto":
    return randomness
  return "secret" if data_name == "file" or data_name.startswith("tfds:") else "seeded"


def _epsilon(m: Mechanism, sigma: float, q: float) -> float:
  if m.steps == 0:
    return 0.0
  return accounting.epsilon(sigma, q, m.steps, m.accountant_delta, m.accountant)


def delta_left(m: Mechanism, eps: float, amplified: bool = True) -> float:
  """What dp-accounting may be asked at for an entry of epsilon `eps`: dp.delta less
  (1 + e^eps) times the total variation the entry pays for: the truncation's overflow_bound
  (amplified entries only: an unamplified one holds for any sample) and secure aggregation's
  quantization term secagg_tv (every entry: everyone sees the quantized sum or its models)."""
  cost = (m.overflow_bound if amplified else 0.0) + m.secagg_tv
  return m.delta - (1 + math.exp(min(eps, 700.0))) * cost


def paid_epsilon(m: Mechanism, noise_multiplier: float, amplified: bool = True
                 ) -> float | None:
  """The epsilon at dp.delta of this noise (Poisson sampled at q if `amplified`, else not),
  its total-variation costs paid for in delta (module docstring, delta_left); None if they
  cannot fit."""
  if m.steps == 0:
    return 0.0
  q = m.sampling_prob if amplified else 1.0

  def at(eps):  # epsilon_dp_accounting at the delta left after paying (1 + e^eps) eta
    left = delta_left(m, eps, amplified)
    if left <= 0:
      return None
    return accounting.epsilon(noise_multiplier, q, m.steps, left, m.accountant)

  eps = at(0.0)
  for _ in range(60):  # increasing from below towards the least fixed point
    if eps is None:
      return None
    candidate = eps * (1 + 1e-6) + 1e-9
    after = at(candidate)
    if after is not None and after <= candidate:
      return candidate  # sound: candidate >= the epsilon at the delta its costs leave
    eps = after
  return None


def amplified_epsilon(m: Mechanism, noise_multiplier: float) -> float | None:
  """paid_epsilon with amplification by sampling at q."""
  return paid_epsilon(m, noise_multiplier, True)


def colluding_counts(cohort_size: int) -> list[int]:
  """k = 1 and k = K - 1 (the most a cohort can hold besides the target), when they exist."""
  return sorted({k for k in (1, cohort_size - 1) if 1 <= k < cohort_size})


def _threshold(m: Mechanism, cohort: int) -> int:
  """Secure aggregation's t for a cohort of `cohort` sites (as secagg.config resolves it)."""
  k = secagg_config.resolve_neighbours(cohort, m.secagg_neighbours)
  return secagg_config.resolve_threshold(k, m.secagg_threshold)


def server_colluding_counts(m: Mechanism) -> list[int]:
  """k = 1 and k = t - 1 (t at the cohort size): with t share holders of a site the server
  could unmask its update, so t - 1 is the most secure aggregation tolerates."""
  t = _threshold(m, m.cohort_size)
  return sorted({k for k in (1, t - 1) if 1 <= k})


def server_colluding_noise(m: Mechanism, k: int) -> float:
  """The noise multiplier left to the server and k colluding sites under coordinated noise.

  Example level: a finished round holds at least noise_shares uploads (t with dropouts, the
  cohort K without), each carrying sigma/sqrt(noise_shares); the colluders' shares are known,
  and under SecAgg+ with dropouts the server learns the sum of the target's connected
  component of the surviving graph, which holds at least t sites (a site's self-mask seed is
  rebuilt from t shares of its uploading neighbours and itself). So at least noise_shares - k
  honest shares: sigma sqrt(1 - k / noise_shares).
  Site level: each of a round's n sites adds sigma/sqrt(n), and n is a Poisson draw the
  server sees. In a round of n sites holding j = min(k, n - 1) colluders, the honest noise is
  sigma sqrt((n - j) / n), or only the target's own share sigma/sqrt(n) when j reaches that
  round's threshold t(n) (they can then rebuild its masks); the least over n <= max_cohort.
  """
  sigma = m.noise_multiplier
  if m.level == "example":
    return sigma * math.sqrt(1 - k / m.noise_shares)
  least = sigma
  for n in range(2, m.max_cohort + 1):
    j = min(k, n - 1)
    left = 1 / n if j >= _threshold(m, n) else (n - j) / n
    least = min(least, sigma * math.sqrt(left))
  return least


def guarantees(m: Mechanism) -> list[Guarantee]:
  """The run's guarantees, headline first (see the module docstring for the table)."""
  sigma, q = m.noise_multiplier, m.sampling_prob
  unit = "one example" if m.level == "example" else "one site"
  if m.randomness == "secret":
    secret = ("the noise and sampling are drawn from OS entropy kept only in the run's "
              "checkpoints, which the adversary cannot read")
  else:
    secret = ("the adversary does not know config.seed (dp.randomness=seeded: every noise "
              "and sampling draw is derived from it, and summary.json publishes it)")
  hidden = ("which sites took part in each round stays hidden (bytes_communicated logs the "
            "expected cohort)" if m.level == "site" else
            "each site's Poisson minibatch draws stay hidden")
  out = []

  # The headline is the accountant's own number: the slots were sized for it (at the planned
  # rounds), so its truncation fits in the delta the accountant was not given.
  headline = _epsilon(m, sigma, q)

  def add(adversary, noise_multiplier, amplified, assumes, sees, colluding=0):
    eps, prob, acc_delta = None, q, m.accountant_delta
    if amplified:  # the headline's mechanism, or a noisier-sampled one paying more delta
      if noise_multiplier == sigma:
        eps = headline
      else:
        eps = amplified_epsilon(m, noise_multiplier)
        if eps is not None and m.steps:
          acc_delta = delta_left(m, eps)
    if eps is None:
      prob = 1.0
      if m.secagg_tv > 0:  # the quantization's cost holds for every entry: paid by fixed point
        eps = paid_epsilon(m, noise_multiplier, amplified=False)
        acc_delta = delta_left(m, eps, amplified=False) if eps is not None and m.steps else 0.0
      else:
        eps, acc_delta = _epsilon(m, noise_multiplier, 1.0), m.accountant_delta
      if amplified:
        assumes += ("; no amplification by sampling claimed (at this epsilon the truncated "
                    "Poisson samples would not fit in delta)")
      if eps is None:
        assumes += ("; none holds: secure aggregation's quantization cost (1 + e^eps) "
                    "secagg_tv does not fit in delta at any epsilon")
    out.append(Guarantee(adversary, eps, m.delta, assumes, sees, colluding,
                         float(noise_multiplier), prob, m.steps, m.accountant, acc_delta))

  def none_left(adversary, assumes, sees, colluding):
    out.append(Guarantee(adversary, None, m.delta, assumes, sees, colluding, 0.0, 1.0,
                         m.steps, m.accountant, m.accountant_delta))

  add("anyone who sees the released models (every round's global model), not the cohort",
      sigma, True, f"unit: {unit}, add/remove; {hidden}; {secret}", "models")
  coordinated = m.noise == "coordinated"
  shares = m.noise_shares or m.cohort_size
  # SecAgg+ with dropouts: masks cancel within each connected component of the uploaders'
  # graph, so the server can unmask each component's sum, not only the total.
  components = (m.secure_aggregation and m.secagg_dropouts
                and secagg_config.resolve_neighbours(m.cohort_size, m.secagg_neighbours)
                < m.cohort_size - 1)
  t = _threshold(m, m.cohort_size) if m.secure_aggregation else 0
  sum_view = ("the sum of each connected component of the surviving SecAgg+ graph (each "
              f"holds at least t={t} sites: a site's self-mask seed is rebuilt from t shares "
              "of its uploading neighbours and itself)" if components else "only their sum")
  protocol = ("secure aggregation (secagg): it receives masked vectors and learns "
              f"{sum_view}; it is semi-honest (follows the protocol); the sum of quantized "
              "noised updates is within total variation secagg_tv of a post-processing of the "
              "noisy sum, paid for in delta (privacy/secagg_delta.py; docs/secure_aggregation.md, "
              "Composition with coordinated noise, (3))")
  if m.secure_aggregation:
    server = ("the server, which sees only the sums of the SecAgg+ graph's connected "
              "components (secure aggregation), no site colluding with it" if components else
              "the server, which sees only the sum (secure aggregation), no site colluding "
              "with it")
    alone = "no site colludes with the server (none tells it its update or noise share)"
    if m.level == "site":
      add(server, sigma, False, f"{alone}; {_PRESENCE}; it picks each round's cohort, so no amplification "
          f"by sampling; {protocol}; {secret}", "sum")
    else:
      add(server, sigma, True, f"{alone}; each site's Poisson minibatch draws stay hidden "
          f"from it; {protocol}" + ("; each component holds at least the t noise shares a "
                                     "round is sized for, so sigma" if components else "")
          + f"; {secret}", "sum")
  elif m.level == "site":
    picks = f"{_PRESENCE}; it picks each round's cohort, so no amplification by sampling"
    if coordinated:
      add("the server, if secure aggregation let it see only the sum (not in this "
          "run: secagg.enabled=False)", sigma, False, f"{picks}; {secret}", "sum")
      add("the server as implemented: it sees each site's update, noised by its share "
          f"sigma/sqrt(n) of the round's n <= {m.max_cohort} sites",
          sigma / math.sqrt(m.max_cohort), False, f"{picks}; {secret}", "updates")
    else:
      add("the server: it sees each site's update, each with the full noise", sigma, False,
          f"{picks}; {secret}", "updates")
  else:
    batches = "each site's Poisson minibatch draws stay hidden from it"
    if coordinated:
      add("the server, if secure aggregation let it see only the sum (not in this "
          "run: secagg.enabled=False)", sigma, True, f"{batches}; {secret}", "sum")
      add(f"the server as implemented: it sees each site's update, noised by its share "
          f"sigma/sqrt({m.cohort_size})", sigma / math.sqrt(m.cohort_size), True,
          f"{batches}; {secret}", "updates")
    else:
      add("the server: it sees each site's update, each with the full noise", sigma, True,
          f"{batches}; {secret}", "updates")
  most = (m.cohort_size if m.level == "example" else m.max_cohort) - 1
  if not coordinated:
    add("any number of colluding sites (each knows its own noise, the target's site adds "
        "the full sigma)", sigma, True, f"the target's own site is honest; {hidden}; {secret}",
        "models", most)
    return out
  for k in colluding_counts(m.cohort_size):
    sites = "one site" if k == 1 else f"{k} colluding sites"
    if m.level == "example":
      if k >= shares:  # their shares can be all the noise a finished round holds
        none_left(f"{sites} of the cohort, knowing their own noise shares: a round can finish "
                  f"with only the {shares} shares secure aggregation needs",
                  "no noise is left to them when only they and the target's site survive",
                  "models", k)
        continue
      left = sigma * math.sqrt(1 - k / shares)
      add(f"{sites} of the cohort, knowing their own noise shares: sigma sqrt(1 - {k}/"
          f"{shares}) of the noise is left", left, True,
          f"the target's own site is honest; they see the released models; {hidden}; "
          f"{secret}", "models", k)
    else:
      add(f"{sites} of the cohort, knowing their own noise shares: at worst sigma/sqrt({k + 1}) "
          f"is left (a Poisson cohort of just them and the target)",
          sigma / math.sqrt(k + 1), False,
          "they see the released models and the round's cohort size (their shares are "
          f"scaled by it), so no amplification by sampling is claimed; {secret}", "models", k)
  if not m.secure_aggregation:
    return out
  # A colluding site tells the server its own update and noise share: secure aggregation
  # protects the masks against fewer than t of them, not the noise they added.
  for k in server_colluding_counts(m):
    sites = "one site" if k == 1 else f"{k} sites"
    left = server_colluding_noise(m, k)
    if m.level == "example":
      least = (f"a finished round can hold only the t={shares} uploads its shares are sized "
               f"for (secagg.dropout_rate > 0)" if m.secagg_dropouts else
               f"no site drops out (secagg.dropout_rate=0): all {shares} uploads are summed")
      add(f"the server colluding with {sites} of the cohort (at most t - 1 = {t - 1} "
          f"tolerated), knowing their updates and noise shares: sigma sqrt(1 - {k}/{shares}) "
          "is left", left, True,
          f"the target's own site is honest; {least}; each site's Poisson minibatch draws "
          f"stay hidden from it; {protocol}; {secret}", "sum", k)
    else:
      add(f"the server colluding with {sites}, knowing their updates and noise shares: at "
          f"worst sigma x {left / sigma:.4g} is left (the least over realised cohorts n <= "
          f"{m.max_cohort}: the colluders and the target alone, or a cohort small enough "
          "that they reach its threshold t(n) and unmask the target's share)", left, False,
          f"the target's own site is honest; {_PRESENCE}; it picks each round's cohort and knows its size, "
          f"so no amplification by sampling; {protocol}; {secret}", "sum", k)
  return out


def seed_reader(m: Mechanism) -> Guarantee | None:
  """Under seeded noise, the guarantee against a reader of summary.json: none."""
  if m.randomness != "seeded":
    return None
  return Guarantee("anyone who knows config.seed (e.g. a reader of summary.json)", None,
                   m.delta, "dp.randomness=seeded: the noise and sampling can be regenerated "
                   "from the seed and subtracted; use dp.randomness=secret for a guarantee",
                   "models", 0, 0.0, 1.0, m.steps, m.accountant, m.accountant_delta)


def all_guarantees(m: Mechanism) -> list[dict]:
  """The list summary.json["privacy"]["guarantees"] holds: one dict per adversary (the
  fields of Guarantee), headline first, the seed reader's (if any) last."""
  entries = guarantees(m)
  reader = seed_reader(m)
  if reader is not None:
    entries.append(reader)
  return [g._asdict() for g in entries]


def describe(entries: list[dict]) -> str:
  """Lines for the start log: one per adversary."""
  lines = []
  for g in entries:
    eps = "none holds" if g["epsilon"] is None else f"epsilon={g['epsilon']:.3f}"
    lines.append(f"  {eps} delta={g['delta']:.3g} against {g['adversary']} "
                 f"(assumes: {g['assumes']})")
  return "privacy guarantees, per adversary:\n" + "\n".join(lines)
