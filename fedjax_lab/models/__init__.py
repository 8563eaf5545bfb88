"""Flax modules, used only through the pure `Model(init, apply)` pair below.

The round never touches a module: it calls `model.init(rng, sample_x)` once and
`model.apply(params, model_state, x, train, rng)` inside the vmapped client update, so a
model is one file plus one entry in `_MODELS`.
"""

from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import optax

from fedjax_lab.errors import ArgumentError
from fedjax_lab.models import benchmark_models, cnn, linear, mlp, resnet

_MODELS = {
    "mlp": mlp.MLP,
    "transcriptomics_mlp": mlp.TranscriptomicsMLP,
    "cnn": cnn.CNN,
    "resnet": resnet.ResNet,
    "linear": linear.Linear,
    "resnet18_gn": benchmark_models.ResNet18GN,
    "emnist_cnn": benchmark_models.EmnistCNN,
}
MODEL_NAMES = tuple(_MODELS)
NORMS = ("batch", "group", "none")


class Model(NamedTuple):
  """A model as two pure functions.

  init(rng, sample_x) -> (params, model_state); model_state holds the non-trained
    collections (BatchNorm statistics), `{}` when there are none.
  apply(params, model_state, x, train, rng) -> (logits [B, classes], new_model_state);
    rng feeds dropout and may be None when train is False.
  """
  init: Callable[..., Any]
  apply: Callable[..., Any]
  module: nn.Module
  has_state: bool


def make_model(model_config, num_classes: int, sample_x) -> Model:
  """Builds the configured module; `model_config` is the `model` sub-config."""
  name = model_config.name
  if name not in _MODELS:
    raise ArgumentError("name", f"unknown '{name}'; allowed: {', '.join(MODEL_NAMES)}")
  if model_config.norm not in NORMS:
    raise ArgumentError("norm", f"unknown '{model_config.norm}'; allowed: {', '.join(NORMS)}")
  module = _MODELS[name].from_config(model_config, num_classes, tuple(sample_x.shape[1:]))

  def init(rng, x):
    variables = module.init({"params": rng, "dropout": rng}, x, train=False)
    variables = dict(variables)
    params = variables.pop("params")
    return params, variables

  has_state = bool(init(jax.random.key(0), sample_x[:1])[1])

  def apply(params, model_state, x, train, rng=None):
    rngs = {"dropout": rng} if rng is not None else {}
    variables = {"params": params, **model_state}
    if train and has_state:
      logits, new_state = module.apply(variables, x, train=True, rngs=rngs, mutable=list(model_state))
      return logits, dict(new_state)
    return module.apply(variables, x, train=train, rngs=rngs), model_state

  return Model(init=init, apply=apply, module=module, has_state=has_state)


def cross_entropy(logits, labels):
  """Per-example softmax cross-entropy, [B, C] x [B] -> [B] (also [C] x [] -> []).

  optax.losses.softmax_cross_entropy_with_integer_labels: logsumexp(logits) - logits[label],
  the same function as -log_softmax(logits)[label] (and the same gradient, softmax - onehot)
  up to float rounding (tests/test_library_reuse.py).
  """
  return optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels)
