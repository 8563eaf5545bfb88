"""A run whose loss or parameters blow up stops with one line, instead of training on to a
chance-level model and exit 0 (issue 27: esgd at client.lr=0.1 reached parameters ~1e9).

Diverged: a non-finite training loss or parameter; a round's loss above LOSS_FACTOR times
max(1, the first round's loss); or the parameters' global L2 norm above NORM_FACTOR times
max(1, their norm at the start of the run). The factors are far outside what a training run
that converges does (the digits configs' loss falls from ~2.3, their norm grows ~2-5x), and a
run that goes there has almost always taken steps too large for its loss surface.
`log.allow_divergence=True` turns the stop into one warning.
"""

import logging
import math

import numpy as np
import optax

log = logging.getLogger("fedjax_lab")

LOSS_FACTOR = 100.0
NORM_FACTOR = 1000.0


class Diverged(RuntimeError):
  """Training diverged; the message is one line naming the round, what blew up and the fix."""


def _hint(config) -> str:
  c = config.client
  return (f"the learning rate is likely too large for client.optimizer={c.optimizer}: lower "
          f"--config.client.lr (now {c.lr:g}) or --config.server.lr (now {config.server.lr:g}), "
          "or set --config.log.allow_divergence=True to train on")


class Watch:
  """check(round, loss, params) after every round; raises Diverged (or warns once)."""

  def __init__(self, config, params):
    self.config = config
    self.allow = bool(config.log.get("allow_divergence", False))
    self.start_norm = float(optax.global_norm(params))
    self.first_loss = None
    self.warned = False

  def check(self, round_number: int, loss: float, params) -> None:
    if self.warned:
      return
    problem = None
    norm = float(optax.global_norm(params))
    if not math.isfinite(loss):
      problem = f"train_loss={loss}"
    elif not np.isfinite(norm):
      problem = "non-finite parameters"
    elif self.first_loss is not None and loss > LOSS_FACTOR * max(1.0, self.first_loss):
      problem = f"train_loss={loss:.3g} (round 1: {self.first_loss:.3g})"
    elif norm > NORM_FACTOR * max(1.0, self.start_norm):
      problem = f"parameter norm {norm:.3g} (at the start: {self.start_norm:.3g})"
    if self.first_loss is None and math.isfinite(loss):
      self.first_loss = loss
    if problem is None:
      return
    message = f"training diverged at round {round_number}: {problem}; {_hint(self.config)}"
    if not self.allow:
      raise Diverged(message)
    log.warning("%s (log.allow_divergence=True: going on)", message)
    self.warned = True
