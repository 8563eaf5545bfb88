"""What the accountant composes for a DPD-fVAE run, and what its epsilon covers.

Levels (`dp.level`):
  example  DP-SGD at every site: each local step draws a Poisson batch at rate
           q = batch_size / (smallest site), clips each example's gradient and adds Gaussian
           noise. WHICH gradient is clipped and noised is `dp.encoder`:
             "private" (default, sound): the whole VAE's per-example gradient (encoder and
               decoder together) is clipped to clip_norm and noised; the site keeps its noisy
               encoder, releases only the decoder. The decoder is post-processing of a run of
               subsampled Gaussian mechanisms: epsilon holds as stated.
             "paper" (the paper's DPD-fVAE, sync=decoder only): only the decoder's gradient
               is clipped and noised; the encoder trains on the same examples without noise.
               The epsilon printed is the accountant's number for the decoder's noisy steps,
               but it is NOT a proven (epsilon, delta) bound: the hidden encoder carries every
               example's influence into the other examples' decoder gradients, so a step's
               sensitivity is not clip_norm (README, "What epsilon covers").
  site     DP-FedAvg on what is released: every site's update of the shared parameters is
           clipped to clip_norm, the sum gets Gaussian noise, sites join each round at rate
           client.participation. Encoders need no noise: a site's encoder is a function of
           its own data and of released decoders only, and it is never released.

The accountant is fedjax_lab.privacy.accounting (add/remove-one, Poisson sampling). As in
fedjax_lab/experiment.py, Poisson samples are truncated to fixed slots and the truncation is
paid for in delta: the accountant composes at delta * (1 - 1e-3).

Randomness (`dp.randomness`, as in the lab, privacy/guarantees.resolve_randomness): "secret"
draws the mechanism's randomness (batches, participation, noise) from OS entropy kept only
in the checkpoints; "seeded" from config.seed, which summary.json publishes, so the epsilon
holds against no one who knows the seed; "auto" is secret for data.name=file and tfds:*,
seeded for the bundled public data sets.
"""

import dataclasses
import math

import numpy as np

from fedjax_lab.privacy import accounting, guarantees, sampling

TRUNCATION_SHARE = 1e-3
LEVELS = ("none", "example", "site")
ENCODER_MODES = ("private", "paper")
RANDOMNESS = ("secret", "seeded", "auto")


@dataclasses.dataclass(frozen=True)
class Plan:
  level: str
  noise_multiplier: float
  clip_norm: float
  sampling_prob: float     # per-step example rate (example) or per-round site rate (site)
  steps: int               # noisy steps composed: rounds * local_steps, or rounds
  steps_per_round: int
  delta: float             # the run's delta (dp.delta)
  accountant_delta: float  # what the accountant composes at
  accountant: str
  slots: int               # Poisson batch slots (example level); 0 for site level
  encoder: str             # "private" | "paper" | "none" (site level: never noised)
  sound: bool              # whether epsilon is a proven (epsilon, delta) guarantee
  randomness: str = "seeded"  # "secret" (OS entropy, in the checkpoint) or "seeded"

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
              "clip_norm and no (epsilon, delta) bound is established (README)")
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


def make_plan(config, site_counts: np.ndarray) -> Plan | None:
  dp = config.dp
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
    q = min(1.0, config.client.batch_size / int(site_counts.min()))
    steps_per_round = config.client.local_steps
    encoder = "paper" if (dp.encoder == "paper" and config.generative.sync == "decoder") \
        else "private"
  else:
    q = float(config.client.participation)
    steps_per_round = 1
    encoder = "none"
  steps = config.rounds * steps_per_round
  accountant_delta = dp.delta * (1 - TRUNCATION_SHARE)
  sigma = float(dp.noise_multiplier)
  if dp.target_epsilon > 0:
    sigma = accounting.noise_multiplier_for(dp.target_epsilon, q, steps, accountant_delta,
                                            dp.accountant)
  slots = 0
  if dp.level == "example":
    eps = accounting.epsilon(sigma, q, steps, accountant_delta, dp.accountant)
    tail = TRUNCATION_SHARE * dp.delta / (1 + math.exp(min(eps, 700.0))) / steps
    sizes = np.unique(site_counts)
    slots = sampling.max_sample_size_over(np.concatenate([sizes - 1, sizes, sizes + 1]),
                                          lambda n: config.client.batch_size / n, tail)
    slots = max(1, min(slots, int(site_counts.max())))
  return Plan(level=dp.level, noise_multiplier=sigma, clip_norm=float(dp.clip_norm),
              sampling_prob=q, steps=steps, steps_per_round=steps_per_round, delta=dp.delta,
              accountant_delta=accountant_delta, accountant=dp.accountant, slots=slots,
              encoder=encoder, sound=encoder != "paper",
              randomness=guarantees.resolve_randomness(dp.get("randomness", "auto"),
                                                       config.data.name))
