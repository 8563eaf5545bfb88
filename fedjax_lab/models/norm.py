"""The normalisation layer a config asks for (BatchNorm couples examples; GroupNorm does not)."""

import math

import flax.linen as nn


def make_norm(kind: str, train: bool, groups: int = 8):
  if kind == "batch":
    # momentum 0.9: a site runs few local steps, so its statistics must move quickly.
    return nn.BatchNorm(use_running_average=not train, momentum=0.9)
  if kind == "group":
    return lambda x: nn.GroupNorm(num_groups=math.gcd(groups, x.shape[-1]))(x)
  return lambda x: x
