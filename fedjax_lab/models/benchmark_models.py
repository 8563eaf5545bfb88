"""The models of Reddi et al. 2021 ("Adaptive Federated Optimization") for the federated
benchmarks (configs/cifar100_pachinko.py, configs/emnist62.py).

- `resnet18_gn`: ResNet-18 (He et al. 2016) in its CIFAR form (3x3 stem, no max-pool), four
  stages of two basic blocks, widths `model.features` (64, 128, 256, 512), BatchNorm
  replaced by GroupNorm as in the paper (Hsieh et al. 2020: batch statistics do not average
  across non-iid sites). GroupNorm with 2 groups, TFF's choice for this model as far as we
  know; the smoke tests shrink `model.features`.
- `emnist_cnn`: the paper's EMNIST CNN: conv 3x3 32 -> conv 3x3 64 (valid, ReLU) -> 2x2
  max-pool -> dropout 0.25 -> dense 128 (ReLU) -> dropout 0.5 -> dense 62.
"""

from typing import Sequence

import flax.linen as nn

from fedjax_lab.models.cnn import image_shape

GROUPS = 2


class BasicBlock(nn.Module):
  features: int
  strides: int

  @nn.compact
  def __call__(self, x):
    y = nn.Conv(self.features, (3, 3), strides=self.strides, padding="SAME", use_bias=False)(x)
    y = nn.relu(nn.GroupNorm(num_groups=GROUPS)(y))
    y = nn.Conv(self.features, (3, 3), padding="SAME", use_bias=False)(y)
    y = nn.GroupNorm(num_groups=GROUPS)(y)
    if x.shape != y.shape:
      x = nn.Conv(self.features, (1, 1), strides=self.strides, use_bias=False)(x)
      x = nn.GroupNorm(num_groups=GROUPS)(x)
    return nn.relu(x + y)


class ResNet18GN(nn.Module):
  features: Sequence[int]
  num_classes: int
  shape: Sequence[int]

  @classmethod
  def from_config(cls, cfg, num_classes, input_shape):
    return cls(features=tuple(cfg.features), num_classes=num_classes,
               shape=image_shape(cfg, input_shape))

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # GroupNorm has no batch statistics, no dropout here
    x = x.reshape((x.shape[0], *self.shape))
    x = nn.Conv(self.features[0], (3, 3), padding="SAME", use_bias=False)(x)
    x = nn.relu(nn.GroupNorm(num_groups=GROUPS)(x))
    for i, f in enumerate(self.features):
      for j in range(2):
        x = BasicBlock(f, strides=2 if i > 0 and j == 0 else 1)(x)
    return nn.Dense(self.num_classes)(x.mean(axis=(1, 2)))


class EmnistCNN(nn.Module):
  num_classes: int
  shape: Sequence[int]

  @classmethod
  def from_config(cls, cfg, num_classes, input_shape):
    return cls(num_classes=num_classes, shape=image_shape(cfg, input_shape))

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape((x.shape[0], *self.shape))
    x = nn.relu(nn.Conv(32, (3, 3), padding="VALID")(x))
    x = nn.relu(nn.Conv(64, (3, 3), padding="VALID")(x))
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = nn.Dropout(0.25, deterministic=not train)(x)
    x = nn.relu(nn.Dense(128)(x.reshape((x.shape[0], -1))))
    x = nn.Dropout(0.5, deterministic=not train)(x)
    return nn.Dense(self.num_classes)(x)
