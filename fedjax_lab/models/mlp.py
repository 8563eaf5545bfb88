"""Multi-layer perceptrons: the reference digits model and a transcriptomics classifier."""

from typing import Sequence

import flax.linen as nn


class MLP(nn.Module):
  """x [B, ...] -> flatten -> (Dense, ReLU) * len(hidden) -> Dense(num_classes)."""
  hidden: Sequence[int]
  num_classes: int

  @classmethod
  def from_config(cls, cfg, num_classes, input_shape):
    return cls(hidden=tuple(cfg.hidden), num_classes=num_classes)

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape((x.shape[0], -1))
    for width in self.hidden:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.num_classes)(x)


class TranscriptomicsMLP(nn.Module):
  """Expression profile [B, genes] -> cell type; dropout regularises the wide gene input
  (scRNA-seq classifiers overfit a few marker genes without it)."""
  hidden: Sequence[int]
  num_classes: int
  dropout: float

  @classmethod
  def from_config(cls, cfg, num_classes, input_shape):
    return cls(hidden=tuple(cfg.hidden), num_classes=num_classes, dropout=cfg.dropout)

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape((x.shape[0], -1))
    for width in self.hidden:
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
      x = nn.relu(nn.Dense(width)(x))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.num_classes)(x)
