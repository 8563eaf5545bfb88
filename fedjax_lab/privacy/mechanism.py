"""The privacy mechanism seam: one plan per `dp.mechanism`, for every private trainer.

`make_mechanism(config, site_counts, summed_coordinates)` returns the run's `PrivacyPlan`
(privacy/plan.py): the numbers the trainer uses (noise multiplier, sampling rate, slots,
randomness), the correlated-noise functions (`plan.noise`: init / step / correlate in the optax
habit, privacy/mf_noise.py), the DpEvent the run composes to (`plan.event(steps)`) and the
guarantee rows per adversary (`plan.entries(config, steps)`). Nothing outside privacy/ computes
a sigma, a sampling rate or a slot count.

Mechanisms (`dp.mechanism`):
  gaussian  DP-SGD at the sites (example level) or DP-FedAvg (site level, McMahan et al. 2018)
            with Poisson-sampled minibatches / cohorts and independent Gaussian noise each round
            (parallel or coordinated shares, drawn by the sites: aggregators.gaussian_noise);
            accounted as SelfComposed(PoissonSampled(q, Gaussian(z)), steps). Amplification by
            sampling holds against an adversary who cannot see who took part, NOT against the
            server, who picks the cohort (its row says so: privacy/guarantees.py).
  tree, blt, banded, dense
            DP-FTRL / matrix-factorization noise (Kairouz et al. 2021; McMahan et al. 2024;
            Choquette-Choo et al. 2023; Denisov et al. 2022): noise correlated across rounds,
            added to each round's sum by the server (aggregators.correlated_noise), with cyclic
            cohorts: the sites are split once (a secret or seeded permutation) into
            b = num_sites / cohort_size groups and round r trains group r mod b, so every site
            takes part at most k = ceil(rounds / b) times, any two b rounds apart. The run is ONE
            Gaussian mechanism with noise multiplier z / sensitivity(C, b, k) (mf_noise.dp_event):
            no amplification is needed, so it holds against whoever picks the cohorts.
            At example level (`_example_plan`): every site runs DP-SGD whose noise is
            correlated across ALL its local steps, over the rounds, by C (each site its own
            independent stream and state, ServerState.site_noise); its examples go through
            fixed cyclic batches (sampling.cyclic_batch: one secret/seeded permutation cut into
            k = size // batch_size batches, step t takes batch t mod k), so an example joins at
            most ceil(T / k) of a site's T = rounds x local_steps steps, any two k apart. The
            accounting takes the smallest site's k for every site (its participation patterns
            contain every larger site's). Multi-epoch MF, Choquette-Choo et al. 2023.

`dp.participation=cyclic` with `dp.mechanism=gaussian` runs independent noise through the same
cyclic schedule and unamplified accounting (C = I: sensitivity sqrt(k)), the baseline DP-FTRL
papers compare against at equal epsilon against the server.
"""

import math
from typing import Any, NamedTuple

import dp_accounting
import numpy as np

from fedjax_lab.errors import ConfigError
from fedjax_lab.privacy import (accounting, guarantees, mf_noise, sampling, secagg_delta, shares,
                                vae)
from fedjax_lab.privacy.plan import PrivacyPlan, accountant_delta, privacy_plan

MECHANISMS = mf_noise.MECHANISMS
PARTICIPATION = ("auto", "poisson", "cyclic")


def participation(config) -> str:
  """poisson or cyclic: `auto` is poisson for gaussian, cyclic for the correlated mechanisms."""
  p = config.dp.participation
  if p == "auto":
    return "poisson" if config.dp.mechanism == "gaussian" else "cyclic"
  return p


class MfInfo(NamedTuple):
  """A matrix-factorization run's participation and its accounting."""
  strategy: mf_noise.Strategy
  groups: int            # b: cohorts cycle through b fixed groups of sites (min-separation b)
  participations: int    # k = ceil(rounds / b): the most rounds one site takes part in
  sensitivity: float     # max ||C u|| over such participation patterns u (clip_norm 1)
  group_size: int = 0    # num_sites / b: the sites of one group (the round's slots)
  sampling_prob: float = 1.0  # each site of the round's group joins w.p. this (Poisson)


def cyclic_groups(config) -> tuple[int, int, float]:
  """(b groups, group size, within-group Poisson rate): dp.groups (0: num_sites /
  cohort_size, every site of the group trains) and cohort_size / group size."""
  groups = config.dp.groups or config.data.num_sites // config.cohort_size
  size = config.data.num_sites // groups
  return groups, size, min(1.0, config.cohort_size / size)


class CyclicAccountant:
  """epsilon_after for a run accounted as ONE Gaussian mechanism (mf_noise.dp_event): the
  whole planned run's epsilon from its first round on (a prefix of the run releases a prefix
  of C x + w, so this never under-states it)."""

  def __init__(self, event: dp_accounting.DpEvent, delta: float, accountant: str):
    self.event, self.delta, self.accountant = event, float(delta), accountant
    self._epsilon = None

  def epsilon_after(self, steps: int) -> float:
    if steps <= 0:
      return 0.0
    if self._epsilon is None:
      self._epsilon = accounting.event_epsilon(self.event, self.delta, self.accountant)
    return self._epsilon


def make_mechanism(config, site_counts: np.ndarray,
                   summed_coordinates: int | None = None) -> PrivacyPlan | None:
  """The run's privacy plan for `dp.mechanism` (None without DP)."""
  if config.dp.level == "none":
    return None
  if participation(config) == "poisson":
    return privacy_plan(config, site_counts, summed_coordinates)
  if config.dp.level == "example":
    return _example_plan(config, site_counts)
  return _cyclic_plan(config)


def _calibrated(config, sens: float, delta: float, what: str):
  """(z, budget, how): dp.noise_multiplier, or z / sens (the one Gaussian the run is)
  calibrated to dp.target_epsilon."""
  dp = config.dp
  z, budget, how = float(dp.noise_multiplier), dp.target_epsilon, "given"
  if z == 0:
    z = sens * accounting.noise_multiplier_for(dp.target_epsilon, 1.0, 1, delta, dp.accountant)
    budget, how = None, f"calibrated to epsilon<={dp.target_epsilon} for {what}"
  return z, budget, how


def _example_plan(config, site_counts: np.ndarray) -> PrivacyPlan:
  """Example-level DP-SGD with matrix-factorization noise over each site's local steps."""
  dp, batch = config.dp, config.client.batch_size
  smallest = int(np.min(site_counts))
  if smallest < batch:
    raise ConfigError("client.batch_size", f"{batch} > the smallest site's {smallest} examples:"
                      f" dp.mechanism={dp.mechanism} cuts each site into fixed batches of "
                      f"batch_size; use at most {smallest}")
  k = sampling.cyclic_batches(smallest, batch)
  steps = config.rounds * config.client.local_steps
  parts = math.ceil(steps / k)
  strategy, sens, delta, z, budget, how, event, randomness = _mf_calibrated(
      config, steps, k, parts, f"the {steps} local steps of a site")
  description = (
      f"privacy: unit=one example (zero-out: its gradients replaced by 0, its batch slot "
      f"kept); mechanism={dp.mechanism} (DP-SGD at every site, its Gaussian noise correlated "
      f"across all of its {steps} local steps by the strategy, an independent stream per "
      f"site); participation=cyclic batches: each site's examples permuted once and cut into "
      f"k = size // {batch} fixed batches (k >= {k}, the smallest site's, taken for all), "
      f"step t trains batch t mod k, so an example joins at most {parts} steps, {k} apart; "
      f"sensitivity {sens:.4f}; accountant={dp.accountant}, ONE Gaussian mechanism with noise "
      f"multiplier {z:.4f}/{sens:.4f} = {z / sens:.4f}, no amplification; delta={dp.delta:g} "
      f"(accountant at {delta:g}); noise_multiplier={z:.4f} ({how}); clip_norm="
      f"{dp.clip_norm:g}; randomness={randomness} (dp.randomness={dp.randomness})")
  return PrivacyPlan(
      noise_multiplier=z, sampling_prob=1.0, steps_per_round=config.client.local_steps,
      accountant=CyclicAccountant(event, delta, dp.accountant), budget=budget,
      description=description, update_noise_multiplier=z, slots=batch,
      randomness=randomness, mechanism_name=dp.mechanism,
      mf=MfInfo(strategy, k, parts, sens, batch), noise=mf_noise.correlated_noise(strategy))


def _mf_calibrated(config, horizon: int, separation: int, participations: int, what: str):
  """The strategy for `horizon` steps, its sensitivity under participations at least
  `separation` apart (at most `participations` of them), the noise multiplier calibrated on it
  and the run's DpEvent: (strategy, sensitivity, accountant delta, z, budget, how, event,
  randomness)."""
  dp = config.dp
  strategy = mf_noise.strategy(
      dp.mechanism, horizon, bands=dp.bands if dp.mechanism == "banded" else None,
      max_buffers=dp.max_buffers, min_separation=separation,
      max_participations=participations)
  sens = mf_noise.sensitivity(strategy, separation, participations)
  delta = accountant_delta(config)  # no truncation here, but the same split keeps runs alike
  z, budget, how = _calibrated(config, sens, delta, what)
  event = mf_noise.dp_event(strategy, z, separation, participations)
  randomness = guarantees.resolve_randomness(dp.randomness, config.data.name)
  return strategy, sens, delta, z, budget, how, event, randomness


def _cyclic_plan(config) -> PrivacyPlan:
  dp = config.dp
  groups, group_size, q = cyclic_groups(config)
  k = math.ceil(config.rounds / groups)
  strategy, sens, delta, z, budget, how, event, randomness = _mf_calibrated(
      config, config.rounds, groups, k, f"the {config.rounds} rounds")
  description = (
      f"privacy: unit=one site (all its examples); mechanism={dp.mechanism} "
      f"(matrix-factorization noise added to each round's sum by the server); participation="
      f"cyclic cohorts: {groups} fixed groups of {group_size} sites, round r trains group r "
      f"mod {groups}" + (f" (each of its sites joins w.p. {q:.4g}, Poisson)" if q < 1 else "")
      + f", so each site takes part in at most {k} rounds, {groups} apart; "
      f"sensitivity of the strategy under that pattern {sens:.4f}; accountant={dp.accountant}, "
      f"ONE Gaussian mechanism with noise multiplier {z:.4f}/{sens:.4f} = {z / sens:.4f}, no "
      f"amplification (it holds against whoever picks the cohorts); delta={dp.delta:g} "
      f"(accountant at {delta:g}); noise_multiplier={z:.4f} ({how}); clip_norm="
      f"{dp.clip_norm:g}; randomness={randomness} (dp.randomness={dp.randomness})")
  return PrivacyPlan(
      noise_multiplier=z, sampling_prob=1.0, steps_per_round=1,
      accountant=CyclicAccountant(event, delta, dp.accountant), budget=budget,
      description=description, update_noise_multiplier=z, slots=group_size,
      randomness=randomness, mechanism_name=dp.mechanism,
      mf=MfInfo(strategy, groups, k, sens, group_size, q),
      noise=mf_noise.correlated_noise(strategy))


def _one_mechanism_row(plan: PrivacyPlan, dp, steps: int, nm: float):
  """A guarantee row maker for a run that is ONE Gaussian mechanism (sampling_prob 1, one
  step): row(adversary, epsilon, assumes, sees, colluding, noise_multiplier=nm)."""
  return lambda adversary, e, assumes, sees, colluding, m=nm: guarantees.Guarantee(
      adversary, e, dp.delta, assumes, sees, colluding, float(m), 1.0, 1 if steps else 0,
      dp.accountant, plan.accountant.delta)._asdict()


def _seed_reader_rows(plan: PrivacyPlan, row) -> list[dict]:
  """Under seeded randomness, the row of whoever knows config.seed: no guarantee."""
  if plan.randomness != "seeded":
    return []
  return [row("anyone who knows config.seed (e.g. a reader of summary.json)", None,
              "dp.randomness=seeded: the noise can be regenerated from the seed and "
              "subtracted; use dp.randomness=secret for a guarantee", "models", 0, 0.0)]


def cyclic_entries(plan: PrivacyPlan, config, steps: int) -> list[dict]:
  """The guarantee rows of a cyclic-participation (matrix-factorization) run, in the lab's
  checkable format (privacy/guarantees.py Guarantee): each is dp-accounting's epsilon of
  Gaussian(noise_multiplier) once (sampling_prob 1.0, steps 1) at accountant_delta."""
  mf, dp = plan.mf, config.dp
  nm = plan.noise_multiplier / mf.sensitivity
  eps = plan.accountant.epsilon_after(steps)
  secret = ("the noise and the groups come from OS entropy kept only in the checkpoints"
            if plan.randomness == "secret" else
            "the adversary does not know config.seed (dp.randomness=seeded)")
  pattern = (f"each site takes part in at most {mf.participations} rounds, {mf.groups} apart "
             f"(cyclic cohorts); {dp.mechanism} noise, the whole run one Gaussian mechanism "
             f"(sensitivity {mf.sensitivity:.4f}): no amplification by sampling needed")
  row = _one_mechanism_row(plan, dp, steps, nm)
  out = [
      row("anyone who sees the released models, including whoever picks the cohorts", eps,
          f"unit: one site, add/remove; {pattern}; {secret}", "models", 0),
      row("the server, which picks the cohorts and sees every released model", eps,
          f"its noise-adding step is trusted: the correlated noise is added to the sum by the "
          f"server's aggregation code, which sees the sum before it (no secure aggregation "
          f"with correlated noise is implemented); {pattern}; {secret}", "models", 0),
      row("the server's aggregation step itself (the sum before its correlated noise)", None,
          "it adds the noise, so nothing is hidden from it", "sum", 0, 0.0),
      row("any number of colluding sites (no site holds any of the noise)", eps,
          f"they see the released models and their own updates; {pattern}; {secret}",
          "models", config.cohort_size - 1)]
  if mf.sampling_prob < 1 and mf.strategy.name == "banded" and steps:
    bands = len(mf.strategy.arrays["coefs"])
    if bands == mf.groups:  # amplified_bandmf_event's setting: b = bands groups, Poisson in each
      event = mf_noise.amplified_dp_event(mf.strategy, plan.noise_multiplier, mf.sampling_prob)
      amp = accounting.event_epsilon(event, plan.accountant.delta, dp.accountant)
      column_norm = max(1.0, mf_noise.sensitivity(mf.strategy))
      out.insert(1, guarantees.Guarantee(
          "anyone who sees the released models but not which sites of each round's group "
          "joined (amplified banded MF, Choquette-Choo et al. 2023)", amp, dp.delta,
          f"each site of the round's group joins independently w.p. {mf.sampling_prob:.4g} "
          "and WHO joined stays hidden from it (not the server, who sees the uploads); "
          f"{bands} bands = {mf.groups} groups; {secret}", "models", 0,
          plan.noise_multiplier / column_norm, mf.sampling_prob,
          math.ceil(mf.strategy.num_rounds / bands), dp.accountant,
          plan.accountant.delta)._asdict())
  return out + _seed_reader_rows(plan, row)


def example_cyclic_entries(plan: PrivacyPlan, config, steps: int) -> list[dict]:
  """The guarantee rows of example-level DP-SGD with matrix-factorization noise (each row
  dp-accounting's epsilon of Gaussian(noise_multiplier) once, as cyclic_entries')."""
  mf, dp = plan.mf, config.dp
  nm = plan.noise_multiplier / mf.sensitivity
  eps = plan.accountant.epsilon_after(steps)
  secret = ("each site's noise, its correlated-noise state and the batch permutations come "
            "from OS entropy kept only in the checkpoints" if plan.randomness == "secret" else
            "the adversary does not know config.seed (dp.randomness=seeded)")
  pattern = (f"unit: one example, zero-out (its gradients replaced by 0; the fixed batches do "
             f"not depend on the data); every site adds its own {dp.mechanism} noise"
             + (" (independent: C = I)" if dp.mechanism == "gaussian" else
                ", correlated over all of its local steps,")
             + f" to each step's clipped gradient sum "
             f"BEFORE the update leaves it; an example joins at most {mf.participations} of "
             f"its site's steps, {mf.groups} apart (fixed cyclic batches, the smallest site's "
             f"k for all): the site's whole run is one Gaussian mechanism of sensitivity "
             f"{mf.sensitivity:.4f}, no amplification by sampling needed")
  row = _one_mechanism_row(plan, dp, steps, nm)
  out = [
      row("anyone who sees the released models (every round's global model)", eps,
          f"{pattern}; {secret}", "models", 0),
      row("the server: it sees each site's update, each with its site's full correlated "
          "noise", eps, f"it may pick the cohorts; each site's noise stream is its own and "
          f"independent of the others'; {pattern}; {secret}", "updates", 0),
      row("any number of colluding sites (each knows its own noise only; the target's site "
          "adds its full noise)", eps, f"the target's own site is honest; they see every "
          f"update; {pattern}; {secret}", "updates", config.cohort_size - 1),
      row("the target example's own site (it holds the example)", None,
          "it trains on the example in the clear", "updates", 0, 0.0)]
  return out + _seed_reader_rows(plan, row)


def guarantee_entries(plan: PrivacyPlan, config, steps: int) -> list[dict]:
  """summary.json["privacy"]["guarantees"] after `steps` steps, for any mechanism."""
  if plan.mf is not None and config.dp.level == "example":
    return example_cyclic_entries(plan, config, steps)
  if plan.mf is not None:
    return cyclic_entries(plan, config, steps)
  return guarantees.all_guarantees(plan.mechanism(config, steps))


class ExampleNoise(NamedTuple):
  """What each site's DP-SGD uses at example level (client.ExampleDP's numbers)."""
  noise_multiplier: float      # this site's share: sigma, or sigma / sqrt(noise_shares)
  max_batch: int               # the plan's slots
  fixed_divisor: float | None  # batch_size under coordinated noise (shares.py)
  # Matrix-factorization noise over each site's steps (mf_noise.CorrelatedNoise; None:
  # independent noise on Poisson minibatches); its steps take fixed cyclic batches.
  correlated: Any = None


def example_noise(plan: PrivacyPlan, config) -> ExampleNoise:
  if plan.mf is not None:  # fixed batches of batch_size: divided by it, like coordinated
    return ExampleNoise(noise_multiplier=plan.noise_multiplier, max_batch=plan.slots,
                        fixed_divisor=float(config.client.batch_size), correlated=plan.noise)
  return ExampleNoise(noise_multiplier=shares.example_share(config, plan.noise_multiplier),
                      max_batch=plan.slots, fixed_divisor=shares.example_fixed_divisor(config))


class SiteNoise(NamedTuple):
  """What DP-FedAvg's aggregator uses at site level (algorithms/round.SiteDP's numbers)."""
  noise_multiplier: float            # the update's: z, or z_update under adaptive clipping
  count_stddev: float | None         # adaptive clipping's count noise (None without it)
  coordinated: bool
  max_cohort: int                    # the plan's slots
  grid: tuple[float, int] | None     # secure aggregation's (clip_range, levels) at the slots
  cohort_groups: int                 # cyclic participation's b (0: Poisson cohorts)
  group_rate: float = 1.0            # cyclic: each site of the round's group joins w.p. this


def site_noise(plan: PrivacyPlan, config) -> SiteNoise:
  # audit.break_noise_divisor: a DELIBERATE BUG that audits the auditor (attacks/canaries.py):
  # the released noise shrinks while the accountant's claim stays. 1.0 in every real run.
  broken = config.get("audit", {}).get("break_noise_divisor", 1.0)
  return SiteNoise(
      noise_multiplier=plan.update_noise_multiplier / broken,
      count_stddev=plan.count_noise_multiplier,
      coordinated=config.dp.noise == "coordinated", max_cohort=plan.slots,
      grid=secagg_delta.grid(config, plan.slots) if config.secagg.enabled else None,
      cohort_groups=0 if plan.mf is None else plan.mf.groups,
      group_rate=1.0 if plan.mf is None else plan.mf.sampling_prob)


def secure_sum_cohort(plan: PrivacyPlan | None, config) -> int:
  """The most rows the secure sum must hold: the slots under site-level DP (a public number,
  so nothing of the protocol reveals the realised cohort), else the cohort; checked against
  secagg.* (ConfigError naming the key)."""
  site_level = plan is not None and config.dp.level == "site"
  max_cohort = plan.slots if site_level else config.cohort_size
  secagg_delta.check_secagg(config, max_cohort)
  return max_cohort


def check_noise_coverage(plan: PrivacyPlan, config, site_counts, example_dp) -> None:
  """ConfigError on dp.noise unless every site's examples see at least the plan's sigma."""
  shares.check_noise_coverage(config, site_counts, example_dp, plan.noise_multiplier)


def check_vae_mechanism(dp) -> None:
  """ConfigError naming dp.mechanism unless it is gaussian (the VAE has no correlated noise:
  its site-level noise is drawn by the sites, and DP-FTRL's would be the server's)."""
  name = dp.get("mechanism", "gaussian")
  if name != "gaussian":
    raise ConfigError("dp.mechanism", f"'{name}': the DPD-fVAE adds independent Gaussian "
                      "noise only (DP-SGD at the sites or DP-FedAvg); use dp.mechanism=gaussian")


def make_vae_mechanism(dp, site_counts: np.ndarray, *, batch_size: int, local_steps: int,
                       rounds: int, participation: float, sync: str,
                       data_name: str) -> vae.Plan | None:
  """The DPD-fVAE's plan (privacy/vae.py) from its dp keys and plain numbers: per-site Poisson
  rates, slots and overflow bound, sigma (given or calibrated), dp.encoder's mode (example
  level); the participation rate and coordinated shares (site level). None without DP."""
  check_vae_mechanism(dp)
  return vae.make_plan(dp, site_counts, batch_size=batch_size, local_steps=local_steps,
                       rounds=rounds, participation=participation, sync=sync,
                       data_name=data_name)


def vae_guarantee_entries(plan: vae.Plan, steps: int) -> list[dict]:
  """summary.json["privacy"]["guarantees"] of a DPD-fVAE run after `steps` noisy steps."""
  return vae.guarantee_entries(plan, steps)
