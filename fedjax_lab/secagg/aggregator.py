"""An init/apply pair for the round's aggregator chain (to plug in after the seams refactor).

secure_sum runs host cryptography, so it is not traceable: it sits at a host boundary between
the jitted client update and the jitted server update:

    init, apply = secagg_aggregator(SecAggConfig(...))
    state = init()
    total, state, result = apply(state, updates, key)   # updates: [K, d] float32
    if total is None: skip the server update (the round aborted: nothing was released)

The state counts rounds, aborted rounds, clipped coordinates and survivors, for metrics.
"""

from typing import NamedTuple

from fedjax_lab.secagg.config import SecAggConfig
from fedjax_lab.secagg.protocol import secure_sum


class SecAggState(NamedTuple):
  rounds: int = 0
  aborted: int = 0
  clipped: int = 0
  survivors: int = 0  # summed over finished rounds


def secagg_aggregator(config: SecAggConfig):
  """(init, apply): apply(state, updates, key, dropouts=None) -> (sum or None, state, result)."""

  def init() -> SecAggState:
    return SecAggState()

  def apply(state: SecAggState, updates, key, dropouts=None):
    result = secure_sum(updates, key, config, dropouts=dropouts)
    state = SecAggState(state.rounds + 1, state.aborted + int(result.aborted),
                        state.clipped + result.clipped_count,
                        state.survivors + result.n_survivors)
    return result.sum, state, result

  return init, apply
