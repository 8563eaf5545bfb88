"""The DPD-fVAE's privacy plan (fedjax_lab/generative/): what the accountant composes for a
run, the numbers its trainer uses, and what its epsilon covers. Built by
privacy.mechanism.make_vae_mechanism from plain numbers (site sizes, batch size, local steps,
rounds, participation) and the dp keys; only dp.mechanism=gaussian.

Levels (`dp.level`):
  example  DP-SGD at every site: each local step a site of n examples draws a Poisson batch
           at its own rate q_n = min(1, batch_size / n) (sampling.site_rate, as the lab's
           FedAvg client; site sizes are public), clips each example's gradient, adds
           Gaussian noise and divides by the expected batch size q_n n. The accountant
           composes the largest rate, the smallest site's, which bounds every site's.
           WHICH gradient is clipped and noised is `dp.encoder`:
             "private" (default, sound): the whole VAE's per-example gradient (encoder and
               decoder together) is clipped to clip_norm and noised; the site keeps its noisy
               encoder, releases only the decoder. The decoder is post-processing of a run of
               subsampled Gaussian mechanisms: epsilon holds as stated.
             "paper" (the paper's DPD-fVAE, sync=decoder only): only the decoder's gradient
               is clipped and noised; the encoder trains on the same examples without noise.
               The epsilon printed is the accountant's number for the decoder's noisy steps,
               but it is NOT a proven (epsilon, delta) bound: the hidden encoder carries every
               example's influence into the other examples' decoder gradients, so a step's
               sensitivity is not clip_norm (docs/dp.md, "what epsilon covers").
  site     DP-FedAvg on what is released: every site's update of the shared parameters is
           clipped to clip_norm, each joined site adds its coordinated share sigma/sqrt(n) of
           the round's n, the sum is divided by the expected participants
           (`expected_cohort`), sites join each round at rate client.participation. Encoders
           need no noise: a site's encoder is a function of its own data and of released
           decoders only, and it is never released.

The accountant is fedjax_lab.privacy.accounting (add/remove-one, Poisson sampling). As in
fedjax_lab/privacy/plan.py, Poisson samples are truncated to fixed slots and the truncation is
paid for in delta: the accountant composes at delta * (1 - 1e-3), and the slots
(sampling.site_slots) are sized so that P(any draw of the unit's site, or of its
neighbours' n - 1 and n + 1, overflows during the run) <= overflow_bound, with
(1 + e^epsilon) overflow_bound <= 1e-3 delta. An overflow is thus so unlikely that seeing one
means the plan does not match the sampling: generative/train.py stops the run on the first
(SlotOverflow).

`guarantee_entries` lists one (epsilon, delta) per adversary, in the lab's entry format
(privacy/guarantees.py), with the noise multiplier, sampling rate and steps that adversary faces, so
each epsilon can be recomputed with dp-accounting from its entry alone (at its
accountant_delta).

Randomness (`dp.randomness`, as in the lab, guarantees.resolve_randomness): "secret"
draws the mechanism's randomness (batches, participation, noise) from OS entropy kept only
in the checkpoints; "seeded" from config.seed, which summary.json publishes, so the epsilon
holds against no one who knows the seed; "auto" is secret for data.name=file and tfds:*,
seeded for the bundled public data sets.
"""

import dataclasses
import math

import numpy as np

from fedjax_lab.privacy import accounting, guarantees, sampling
from fedjax_lab.privacy.plan import TRUNCATION_SHARE

SEES = ("models", "sum", "updates")
LEVELS = ("none", "example", "site")
ENCODER_MODES = ("private", "paper")
RANDOMNESS = ("secret", "seeded", "auto")


@dataclasses.dataclass(frozen=True)
class Plan:
  level: str
  noise_multiplier: float
  clip_norm: float
  # The accountant's rate: the largest site's example rate (example: the smallest site's,
  # site_rate) or the per-round site rate client.participation (site).
  sampling_prob: float
  steps: int               # noisy steps composed: rounds * local_steps, or rounds
  steps_per_round: int
  delta: float             # the run's delta (dp.delta)
  accountant_delta: float  # what the accountant composes at
  accountant: str
  slots: int               # Poisson batch slots (example level); 0 for site level
  encoder: str             # "private" | "paper" | "none" (site level: never noised)
  sound: bool              # whether epsilon is a proven (epsilon, delta) guarantee
  randomness: str = "seeded"  # "secret" (OS entropy, in the checkpoint) or "seeded"
  overflow_bound: float = 0.0  # P(any overflow of the unit's draws in the run), paid in delta
  num_sites: int = 0
  released: str = "decoder"    # what the server broadcasts: "decoder" or "encoder and decoder"
  # Site level: the mean's divisor, participation x num_sites (public; never the realised n).
  expected_cohort: float = 0.0

  def epsilon_after(self, steps: int) -> float:
    return accounting.epsilon(self.noise_multiplier, self.sampling_prob, int(steps),
                              self.accountant_delta, self.accountant)

  def guarantee(self, epsilon: float) -> str:
    unit = "one example" if self.level == "example" else "one site (all its examples)"
    released = "the decoder"
    if not self.sound:
      return (f"NONE PROVEN: epsilon={epsilon:.3f} is the accountant's number for the "
              f"decoder's {self.steps} noisy DP-SGD steps alone (the paper's DPD-fVAE claim); "
              "the encoder trains on the same examples without noise and shapes every "
              "decoder gradient, so one step's sensitivity to " + unit + " is not bounded by "
              "clip_norm and no (epsilon, delta) bound is established (docs/dp.md)")
    what = ("the whole VAE's per-example gradients clipped and noised at every step; only "
            "the decoder released" if self.level == "example" else
            "every site's released update clipped and noised; encoders never released")
    if self.randomness == "secret":
      noise = ("the noise and sampling come from OS entropy kept only in the run's "
               "checkpoints (dp.randomness=secret), which the adversary cannot read")
    else:
      noise = ("the noise and sampling are derived from config.seed (dp.randomness=seeded), "
               "which summary.json publishes: none against anyone who knows it")
    return (f"({epsilon:.3f}, {self.delta:g})-DP for {unit}, add/remove-one, against anyone "
            f"who sees {released} after every round ({what}); {noise}")


def make_plan(dp, site_counts: np.ndarray, *, batch_size: int, local_steps: int, rounds: int,
              participation: float, sync: str, data_name: str) -> Plan | None:
  """The run's plan from the dp keys and the plain numbers of a VAE run (sync: the
  generative.sync, "decoder" or "all"; data_name decides dp.randomness=auto)."""
  if dp.level not in LEVELS:
    raise ValueError(f"dp.level: unknown {dp.level!r}; allowed: {', '.join(LEVELS)}")
  if dp.level == "none":
    return None
  if dp.encoder not in ENCODER_MODES:
    raise ValueError(f"dp.encoder: unknown {dp.encoder!r}; allowed: {', '.join(ENCODER_MODES)}")
  if dp.get("randomness", "auto") not in RANDOMNESS:
    raise ValueError(f"dp.randomness: unknown {dp.randomness!r}; allowed: "
                     f"{', '.join(RANDOMNESS)}")
  if dp.level == "example":
    q = float(sampling.site_rate(batch_size, int(site_counts.min())))
    steps_per_round = local_steps
    encoder = "paper" if (dp.encoder == "paper" and sync == "decoder") else "private"
  else:
    q = float(participation)
    steps_per_round = 1
    encoder = "none"
  steps = rounds * steps_per_round
  accountant_delta = dp.delta * (1 - TRUNCATION_SHARE)
  sigma = float(dp.noise_multiplier)
  if dp.target_epsilon > 0:
    sigma = accounting.noise_multiplier_for(dp.target_epsilon, q, steps, accountant_delta,
                                            dp.accountant)
  slots, overflow_bound = 0, 0.0
  if dp.level == "example":
    # A unit (one example) is in one site, whose batch is drawn once per step: steps draws,
    # each overflowing w.p. <= tail, so the run's overflow probability is <= overflow_bound.
    eps = accounting.epsilon(sigma, q, steps, accountant_delta, dp.accountant)
    overflow_bound = TRUNCATION_SHARE * dp.delta / (1 + math.exp(min(eps, 700.0)))
    slots = max(1, sampling.site_slots(site_counts, batch_size, overflow_bound / steps))
  return Plan(level=dp.level, noise_multiplier=sigma, clip_norm=float(dp.clip_norm),
              sampling_prob=q, steps=steps, steps_per_round=steps_per_round, delta=dp.delta,
              accountant_delta=accountant_delta, accountant=dp.accountant, slots=slots,
              encoder=encoder, sound=encoder != "paper",
              randomness=guarantees.resolve_randomness(dp.get("randomness", "auto"), data_name),
              overflow_bound=overflow_bound, num_sites=len(site_counts),
              released="decoder" if sync == "decoder" else "encoder and decoder",
              expected_cohort=q * len(site_counts) if dp.level == "site" else 0.0)


class SlotOverflow(RuntimeError):
  """A Poisson sample did not fit its slots: an event the plan gave probability <=
  overflow_bound for the whole run, so the slots do not match the sampling."""

  def __init__(self, plan: Plan, round_index: int, dropped: int):
    super().__init__(
        f"round {round_index}: {dropped} Poisson-sampled example(s) did not fit the "
        f"{plan.slots} batch slots, an event the privacy plan gave probability <= "
        f"{plan.overflow_bound:.3g} over the whole run (paid in dp.delta): the slots do not "
        "match the sampling, so the (epsilon, delta) does not hold; stopped without saving "
        "the round (a bug: report it with the config)")


def _entry(plan: Plan, adversary: str, sees: str, colluding: int, noise_multiplier: float,
           sampling_prob: float, steps: int, assumes: str, proven: bool = True) -> dict:
  assert sees in SEES
  eps = None
  if proven:
    eps = accounting.epsilon(noise_multiplier, sampling_prob, steps, plan.accountant_delta,
                             plan.accountant)
  return {"adversary": adversary, "epsilon": eps, "delta": plan.delta, "assumes": assumes,
          "sees": sees, "colluding_sites": int(colluding),
          "noise_multiplier": float(noise_multiplier), "sampling_prob": float(sampling_prob),
          "steps": int(steps), "accountant": plan.accountant,
          "accountant_delta": plan.accountant_delta}


def guarantee_entries(plan: Plan, steps: int) -> list[dict]:
  """One entry per adversary, headline (the released models) first, after `steps` noisy
  steps; epsilon is dp-accounting's for (noise_multiplier, sampling_prob, steps) at
  accountant_delta, and the entry holds at delta (the rest pays for truncation)."""
  sigma, n_sites = plan.noise_multiplier, plan.num_sites
  if plan.randomness == "secret":
    secret = ("the noise and sampling come from OS entropy kept only in the run's "
              "checkpoints (dp.randomness=secret), which the adversary cannot read")
  else:
    secret = ("the adversary does not know config.seed (dp.randomness=seeded: every noise "
              "and sampling draw is derived from it, and summary.json publishes it)")
  models = f"the released {plan.released} after every round"
  out = []
  if plan.level == "example":
    hidden = ("site sizes are public (a site of n examples samples at min(1, batch_size/n); "
              f"the accountant composes the largest rate, {plan.sampling_prob:.4g}); each "
              "site's Poisson minibatch draws stay hidden; no amplification by participation "
              "is claimed")
    proven = plan.sound
    unproven = ("" if proven else "NONE PROVEN (dp.encoder=paper): the encoder trains on the "
                "same examples without noise and shapes every decoder gradient, so a step's "
                "sensitivity is not clip_norm; sigma, q and steps are those of the decoder's "
                "noisy steps alone; ")
    unit = "unit: one example, add/remove"
    out.append(_entry(plan, f"anyone who sees {models}", "models", 0, sigma,
                      plan.sampling_prob, steps, f"{unproven}{unit}; {hidden}; {secret}",
                      proven))
    out.append(_entry(plan, "the server: it sees each site's update (and picks who joins), "
                      "each update carrying the site's full DP-SGD noise", "updates", 0, sigma,
                      plan.sampling_prob, steps, f"{unproven}{unit}; {hidden}; {secret}",
                      proven))
    if n_sites > 1:
      out.append(_entry(
          plan, f"the server and all {n_sites - 1} other sites colluding (each site's noise "
          "is its own; the target's site adds the full sigma)", "updates", n_sites - 1,
          sigma, plan.sampling_prob, steps,
          f"{unproven}{unit}; the target's own site is honest and keeps its noise, minibatch "
          f"draws and encoder; {hidden}; {secret}", proven))
  else:
    unit = "unit: one site (all its examples), add/remove"
    out.append(_entry(plan, f"anyone who sees {models}, not who joined", "models", 0, sigma,
                      plan.sampling_prob, steps,
                      f"{unit}; which sites joined each round stays hidden; encoders are "
                      f"never released; {secret}"))
    # Coordinated shares: each joined site adds sigma/sqrt(n) for the round's n joined
    # sites, and the server sees each update; it picks who joins, so at worst all do.
    out.append(_entry(plan, "the server: it sees each site's update, noised only by its "
                      f"share sigma/sqrt(n) of the round's n <= {n_sites} sites, and picks "
                      "who joins", "updates", 0, sigma / math.sqrt(max(n_sites, 1)), 1.0,
                      steps, f"{unit}; it picks each round's cohort, so no amplification by "
                      f"sampling; at worst all {n_sites} sites join every round; {secret}"))
    for k in sorted({k for k in (1, n_sites - 1) if 1 <= k < n_sites}):
      out.append(_entry(
          plan, f"{k} colluding site(s), knowing their own noise shares: at worst "
          f"sigma/sqrt({k + 1}) is left (a round joined by just them and the target)",
          "models", k, sigma / math.sqrt(k + 1), 1.0, steps,
          f"{unit}; they see the released models and the round's cohort size (their shares "
          f"scale with it), so no amplification by sampling; {secret}"))
  if plan.randomness == "seeded":
    out.append(_entry(plan, "anyone who knows config.seed (e.g. a reader of summary.json)",
                      "models", 0, 0.0, 1.0, steps,
                      "dp.randomness=seeded: the noise and sampling can be regenerated from "
                      "the seed and subtracted; use dp.randomness=secret for a guarantee",
                      proven=False))
  return out
