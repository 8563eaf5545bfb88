"""A small convolutional network (LeNet-like) with a configurable normalisation layer."""

import math
from typing import Sequence

import flax.linen as nn

from fedjax_lab.models.norm import make_norm
from fedjax_lab.errors import ArgumentError


def image_shape(cfg, input_shape):
  """Flat inputs (digits: [64]) are viewed as square one-channel images."""
  if cfg.image_shape:
    return tuple(cfg.image_shape)
  if len(input_shape) == 3:
    return input_shape
  if len(input_shape) == 2:
    return (*input_shape, 1)
  side = math.isqrt(int(input_shape[0]))
  if side * side != input_shape[0]:
    raise ArgumentError("image_shape", f"inputs of shape {input_shape} are not square images; "
                      "set model.image_shape, e.g. (28, 28, 1)")
  return (side, side, 1)


class CNN(nn.Module):
  """(Conv 3x3, norm, ReLU, 2x2 max-pool) per entry of `features`, then Dense layers."""
  features: Sequence[int]
  hidden: Sequence[int]
  num_classes: int
  norm: str
  shape: Sequence[int]

  @classmethod
  def from_config(cls, cfg, num_classes, input_shape):
    return cls(features=tuple(cfg.features), hidden=tuple(cfg.hidden), num_classes=num_classes,
               norm=cfg.norm, shape=image_shape(cfg, input_shape))

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape((x.shape[0], *self.shape))
    for f in self.features:
      x = nn.Conv(f, (3, 3), padding="SAME")(x)
      x = nn.relu(make_norm(self.norm, train)(x))
      if min(x.shape[1:3]) >= 2:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    for width in self.hidden:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.num_classes)(x)
