"""The model's plain convolutions as im2col + one matmul, inside the gradient-inversion attack."""

import flax.linen as nn
import jax.numpy as jnp

def _conv_matmul(conv: nn.Conv, x):
  """nn.Conv's output on x [N, H, W, C] as im2col (kh kw shifted slices, concatenated on the
  channels in the kernel's (kh, kw, c) order) and one matmul; None where the convolution is
  not a plain one (stride, dilation, groups, mask or padding other than 'SAME')."""
  def ones(v):
    return v is None or all(s == 1 for s in (v if isinstance(v, (tuple, list)) else (v,)))
  if (x.ndim != 4 or conv.padding != "SAME" or not ones(conv.strides)
      or not ones(conv.input_dilation) or not ones(conv.kernel_dilation)
      or conv.feature_group_count != 1 or conv.mask is not None):
    return None
  kernel = conv.get_variable("params", "kernel")
  kh, kw, cin, cout = kernel.shape
  h, w = x.shape[1:3]
  xp = jnp.pad(x, ((0, 0), ((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2), (0, 0)))
  cols = jnp.concatenate([xp[:, i:i + h, j:j + w] for i in range(kh) for j in range(kw)], -1)
  y = cols @ kernel.reshape(kh * kw * cin, cout)
  return y + conv.get_variable("params", "bias") if conv.use_bias else y


def _conv_interceptor(next_fun, args, kwargs, context):
  if context.method_name == "__call__" and isinstance(context.module, nn.Conv) and args:
    y = _conv_matmul(context.module, args[0])
    if y is not None:
      return y
  return next_fun(*args, **kwargs)


def conv_as_matmul():
  """A context in which the model's stride-1 'SAME' convolutions (flax nn.Conv) run as im2col
  + one matmul: the same function (up to float rounding), differentiated as slices and
  matmuls. The attack differentiates through the replay's weight gradient, so a vmapped
  restart or site axis makes both operands of those convolutions batched, which XLA lowers to
  grouped convolutions (slow on CPU); as matmuls they become batched matmuls. Also faster for
  one restart on CPU (benchmarks/RESULTS.md, issue 16)."""
  return nn.intercept_methods(_conv_interceptor)

