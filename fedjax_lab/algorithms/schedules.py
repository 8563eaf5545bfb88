"""Communication schedules: which local steps of a round communicate.

A round of the communication-skipping algorithms (ProxSkip, RandCom, D-SGD) is
`client.local_steps` local steps; the schedule (`algorithm.comm_schedule`) draws one flag per
step, SHARED by all sites (ProxSkip's single coin: every site communicates or none does):

  bernoulli   each step independently with probability `algorithm.comm_prob`
              (ProxSkip / RandCom as analysed)
  every_k     steps t = k-1, 2k-1, ... counted over the whole run (`algorithm.comm_every`)
  per_round   the last local step of each round only (FedAvg's rhythm)

`comm_prob` below is the probability p the algorithms put in their correction terms: p itself,
1/k, or 1/local_steps. The fixed point of ProxSkip and RandCom is the exact optimum whatever
the schedule (the correction vanishes there), so the deterministic schedules converge to the
same point; their rate is not covered by the papers' analysis.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

COMM_SCHEDULES = ("bernoulli", "every_k", "per_round")


class CommSchedule(NamedTuple):
  kind: str          # one of COMM_SCHEDULES
  local_steps: int   # steps per round
  prob: float = 1.0  # bernoulli: probability a step communicates
  every: int = 1     # every_k: communicate every k-th step

  @property
  def comm_prob(self) -> float:
    """Expected fraction of communicating steps (the p of the correction terms)."""
    if self.kind == "bernoulli":
      return float(self.prob)
    if self.kind == "every_k":
      return 1.0 / self.every
    return 1.0 / self.local_steps

  def coins(self, rng, round_index) -> jax.Array:
    """[local_steps] bool: True where the step communicates. `rng` is the run's sampling
    key; the round is folded in here, so a resumed run draws the same coins."""
    steps = jnp.arange(self.local_steps)
    if self.kind == "bernoulli":
      return jax.random.bernoulli(jax.random.fold_in(rng, round_index), self.prob,
                                  (self.local_steps,))
    if self.kind == "every_k":
      return (round_index * self.local_steps + steps + 1) % self.every == 0
    return steps == self.local_steps - 1


def from_config(config) -> CommSchedule:
  a = config.algorithm
  return CommSchedule(kind=a.comm_schedule, local_steps=config.client.local_steps,
                      prob=a.comm_prob, every=a.comm_every)
