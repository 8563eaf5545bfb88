"""Which epsilon holds against whom: one (epsilon, delta) per adversary of a DP run.

The headline epsilon of a run (summary.json `epsilon`) is that of anyone who sees the models
the server releases. It is not the epsilon of every party: the server chooses the cohort (so
amplification by sampling the cohort does not hold against it) and, with no secure
aggregation implemented, sees each site's update; under coordinated noise each site knows its
own share of the noise, so k colluding sites face only what the others added. Each entry here
names the adversary, what it sees and what is assumed, and its epsilon is computed with
dp-accounting for the mechanism THAT adversary faces:

  adversary                          noise multiplier it faces          sampling it cannot see
  released model                     sigma                              q (as the headline)
  server, site level                 sigma (parallel) or                none: it picks the cohort
                                     sigma / sqrt(max cohort) (coordinated, updates in the clear)
  server, example level              sigma (parallel) or sigma/sqrt(K)  q (each site's batches)
  k colluding sites, coordinated     sigma sqrt(1 - k/K) (example level, K fixed)    q
                                     sigma / sqrt(k + 1) (site level: a Poisson cohort can
                                     hold just the k sites and the target)           none

(sigma: the accountant's noise multiplier, with adaptive clipping the combined z of the
update and the count, Andrew et al. 2021 Thm 1; every party's view is a post-processing of
per-site Gaussian releases, so the same split applies.) An entry whose epsilon would need a
secret the run does not keep (noise regenerated from a published seed) has epsilon None.

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

RANDOMNESS = ("auto", "secret", "seeded")


class Guarantee(NamedTuple):
  adversary: str
  epsilon: float | None
  delta: float
  assumes: str


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


def amplified_epsilon(m: Mechanism, noise_multiplier: float) -> float | None:
  """The epsilon at dp.delta of Poisson sampling at rate q with this noise, its truncation
  paid for in delta (module docstring); None if the truncation cost cannot fit."""
  if m.steps == 0:
    return 0.0

  def at(eps):  # epsilon_dp_accounting at the delta left after paying (1 + e^eps) eta
    left = m.delta - (1 + math.exp(min(eps, 700.0))) * (m.overflow_bound + m.secagg_tv)
    if left <= 0:
      return None
    return accounting.epsilon(noise_multiplier, m.sampling_prob, m.steps, left, m.accountant)

  eps = at(0.0)
  for _ in range(60):  # increasing from below towards the least fixed point
    if eps is None:
      return None
    candidate = eps * (1 + 1e-6) + 1e-9
    after = at(candidate)
    if after is not None and after <= candidate:
      return candidate  # sound: candidate >= the epsilon at the delta its truncation leaves
    eps = after
  return None


def colluding_counts(cohort_size: int) -> list[int]:
  """k = 1 and k = K - 1 (the most a cohort can hold besides the target), when they exist."""
  return sorted({k for k in (1, cohort_size - 1) if 1 <= k < cohort_size})


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

  def add(adversary, noise_multiplier, amplified, assumes):
    eps = None
    if amplified:  # the headline's mechanism, or a noisier-sampled one paying more delta
      eps = headline if noise_multiplier == sigma else amplified_epsilon(m, noise_multiplier)
    if eps is None:
      eps = _epsilon(m, noise_multiplier, 1.0)
      if amplified:
        assumes += ("; no amplification by sampling claimed (at this epsilon the truncated "
                    "Poisson samples would not fit in delta)")
    out.append(Guarantee(adversary, eps, m.delta, assumes))

  add("anyone who sees the released models (every round's global model), not the cohort",
      sigma, True, f"unit: {unit}, add/remove; {hidden}; {secret}")
  coordinated = m.noise == "coordinated"
  shares = m.noise_shares or m.cohort_size
  secure = ("secure aggregation (secagg): it receives masked vectors and learns only their "
            "sum; it is semi-honest (follows the protocol) and fewer than t of any site's "
            "share holders collude with it; the sum of quantized noised updates is treated "
            "as the noisy sum (README, Secure aggregation (3): aliasing term checked below "
            "1e-3 delta)")
  if m.secure_aggregation:
    if m.level == "site":
      add("the server, which sees only the sum (secure aggregation)", sigma, False,
          f"it picks each round's cohort, so no amplification by sampling; {secure}; {secret}")
    else:
      add("the server, which sees only the sum (secure aggregation)", sigma, True,
          f"each site's Poisson minibatch draws stay hidden from it; {secure}; {secret}")
  elif m.level == "site":
    picks = "it picks each round's cohort, so no amplification by sampling"
    if coordinated:
      add("the server, if secure aggregation let it see only the sum (not in this "
          "run: secagg.enabled=False)", sigma, False, f"{picks}; {secret}")
      add("the server as implemented: it sees each site's update, noised by its share "
          f"sigma/sqrt(n) of the round's n <= {m.max_cohort} sites",
          sigma / math.sqrt(m.max_cohort), False, f"{picks}; {secret}")
    else:
      add("the server: it sees each site's update, each with the full noise", sigma, False,
          f"{picks}; {secret}")
  else:
    batches = "each site's Poisson minibatch draws stay hidden from it"
    if coordinated:
      add("the server, if secure aggregation let it see only the sum (not in this "
          "run: secagg.enabled=False)", sigma, True, f"{batches}; {secret}")
      add(f"the server as implemented: it sees each site's update, noised by its share "
          f"sigma/sqrt({m.cohort_size})", sigma / math.sqrt(m.cohort_size), True,
          f"{batches}; {secret}")
    else:
      add("the server: it sees each site's update, each with the full noise", sigma, True,
          f"{batches}; {secret}")
  if not coordinated:
    add("any number of colluding sites (each knows its own noise, the target's site adds "
        "the full sigma)", sigma, True, f"the target's own site is honest; {hidden}; {secret}")
    return out
  for k in colluding_counts(m.cohort_size):
    sites = "one site" if k == 1 else f"{k} colluding sites"
    if m.level == "example":
      if k >= shares:  # their shares can be all the noise a finished round holds
        out.append(Guarantee(
            f"{sites} of the cohort, knowing their own noise shares: a round can finish with "
            f"only the {shares} shares secure aggregation needs", None, m.delta,
            "no noise is left to them when only they and the target's site survive"))
        continue
      left = sigma * math.sqrt(1 - k / shares)
      add(f"{sites} of the cohort, knowing their own noise shares: sigma sqrt(1 - {k}/"
          f"{shares}) of the noise is left", left, True,
          f"the target's own site is honest; they see the released models; {hidden}; "
          f"{secret}")
    else:
      add(f"{sites} of the cohort, knowing their own noise shares: at worst sigma/sqrt({k + 1}) "
          f"is left (a Poisson cohort of just them and the target)",
          sigma / math.sqrt(k + 1), False,
          "they see the released models and the round's cohort size (their shares are "
          f"scaled by it), so no amplification by sampling is claimed; {secret}")
  return out


def seed_reader(m: Mechanism) -> Guarantee | None:
  """Under seeded noise, the guarantee against a reader of summary.json: none."""
  if m.randomness != "seeded":
    return None
  return Guarantee("anyone who knows config.seed (e.g. a reader of summary.json)", None,
                   m.delta, "dp.randomness=seeded: the noise and sampling can be regenerated "
                   "from the seed and subtracted; use dp.randomness=secret for a guarantee")


def all_guarantees(m: Mechanism) -> list[dict]:
  """The list summary.json["privacy"]["guarantees"] holds: dicts with adversary, epsilon,
  delta and assumes, headline first, the seed reader's (if any) last."""
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
