"""The linear model: multinomial logistic regression when trained with cross-entropy."""

import flax.linen as nn


class Linear(nn.Module):
  """x [B, ...] -> flatten -> Dense(num_classes): logits = x W + b, no hidden layer.

  With `model.l2` > 0 the training objective (mean cross-entropy + (l2/2) ||(W, b)||^2) is
  strongly convex with a unique optimum: the lab's convex test problem.
  """
  num_classes: int

  @classmethod
  def from_config(cls, cfg, num_classes, input_shape):
    del cfg, input_shape
    return cls(num_classes=num_classes)

  @nn.compact
  def __call__(self, x, train: bool = False):
    return nn.Dense(self.num_classes)(x.reshape((x.shape[0], -1)))
