"""A small pre-activation-free ResNet (He et al. 2016) for small images."""

from typing import Sequence

import flax.linen as nn

from fedjax_lab.models.cnn import image_shape
from fedjax_lab.models.norm import make_norm


class ResidualBlock(nn.Module):
  features: int
  strides: int
  norm: str

  @nn.compact
  def __call__(self, x, train):
    y = nn.Conv(self.features, (3, 3), strides=self.strides, padding="SAME", use_bias=False)(x)
    y = nn.relu(make_norm(self.norm, train)(y))
    y = nn.Conv(self.features, (3, 3), padding="SAME", use_bias=False)(y)
    y = make_norm(self.norm, train)(y)
    if x.shape != y.shape:
      x = nn.Conv(self.features, (1, 1), strides=self.strides, use_bias=False)(x)
      x = make_norm(self.norm, train)(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """Stem conv, one residual block per entry of `features` (stride 2 after the first), mean pool."""
  features: Sequence[int]
  num_classes: int
  norm: str
  shape: Sequence[int]

  @classmethod
  def from_config(cls, cfg, num_classes, input_shape):
    return cls(features=tuple(cfg.features), num_classes=num_classes, norm=cfg.norm,
               shape=image_shape(cfg, input_shape))

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape((x.shape[0], *self.shape))
    x = nn.Conv(self.features[0], (3, 3), padding="SAME", use_bias=False)(x)
    x = nn.relu(make_norm(self.norm, train)(x))
    for i, f in enumerate(self.features):
      x = ResidualBlock(f, strides=1 if i == 0 else 2, norm=self.norm)(x, train)
    x = x.mean(axis=(1, 2))
    return nn.Dense(self.num_classes)(x)
