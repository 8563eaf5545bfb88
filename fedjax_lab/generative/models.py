"""Class-conditional VAEs and their per-example losses.

Parameters are a dict {"encoder": ..., "decoder": ...}: the two halves are separate Flax
modules so that a round can share one and keep the other at the site.

Conv (images, e.g. digits 8x8 in [0, 1]):
  encoder  x -> conv(s2) -> relu -> conv(s2) -> relu -> flatten ++ one_hot(y) -> (mean, logvar)
  decoder  z ++ one_hot(y) -> dense -> relu -> conv^T(s2) -> relu -> conv^T(s2) -> logits
MLP (expression vectors):
  encoder  x -> dense -> relu ... ++ one_hot(y) -> (mean, logvar)
  decoder  z ++ one_hot(y) -> dense -> relu ... -> mean (and a per-feature log scale)

Likelihoods: "bernoulli" (BCE on logits; the decoded mean is sigmoid(logits)), "gaussian"
(learned per-feature log std, a decoder parameter) and "mse" (unit-variance Gaussian without
its constant, 0.5 ||x - mean||^2).
"""

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

LIKELIHOODS = ("bernoulli", "gaussian", "mse")
KINDS = ("conv", "mlp")


class ConvEncoder(nn.Module):
  features: Sequence[int]
  latent_dim: int
  num_classes: int
  shape: Sequence[int]  # (H, W, C)

  @nn.compact
  def __call__(self, x, y):
    h = x.reshape((x.shape[0], *self.shape))
    for f in self.features:
      h = nn.relu(nn.Conv(f, (3, 3), strides=(2, 2), padding="SAME")(h))
    h = jnp.concatenate([h.reshape((h.shape[0], -1)),
                         jax.nn.one_hot(y, self.num_classes, dtype=h.dtype)], axis=-1)
    return nn.Dense(self.latent_dim, name="mean")(h), nn.Dense(self.latent_dim,
                                                               name="logvar")(h)


class ConvDecoder(nn.Module):
  features: Sequence[int]  # the encoder's, reversed here
  num_classes: int
  shape: Sequence[int]
  likelihood: str

  @nn.compact
  def __call__(self, z, y):
    height, width, channels = self.shape
    down = 2 ** len(self.features)
    h0, w0 = -(-height // down), -(-width // down)
    h = jnp.concatenate([z, jax.nn.one_hot(y, self.num_classes, dtype=z.dtype)], axis=-1)
    h = nn.relu(nn.Dense(h0 * w0 * self.features[-1])(h))
    h = h.reshape((h.shape[0], h0, w0, self.features[-1]))
    for f in reversed(self.features[:-1]):
      h = nn.relu(nn.ConvTranspose(f, (3, 3), strides=(2, 2), padding="SAME")(h))
    h = nn.ConvTranspose(channels, (3, 3), strides=(2, 2), padding="SAME")(h)
    out = h[:, :height, :width, :].reshape((h.shape[0], -1))
    return out, _log_scale(self, out.shape[-1])


class MLPEncoder(nn.Module):
  hidden: Sequence[int]
  latent_dim: int
  num_classes: int

  @nn.compact
  def __call__(self, x, y):
    h = x.reshape((x.shape[0], -1))
    for width in self.hidden:
      h = nn.relu(nn.Dense(width)(h))
    h = jnp.concatenate([h, jax.nn.one_hot(y, self.num_classes, dtype=h.dtype)], axis=-1)
    return nn.Dense(self.latent_dim, name="mean")(h), nn.Dense(self.latent_dim,
                                                               name="logvar")(h)


class MLPDecoder(nn.Module):
  hidden: Sequence[int]
  num_classes: int
  dim: int
  likelihood: str

  @nn.compact
  def __call__(self, z, y):
    h = jnp.concatenate([z, jax.nn.one_hot(y, self.num_classes, dtype=z.dtype)], axis=-1)
    for width in reversed(self.hidden):
      h = nn.relu(nn.Dense(width)(h))
    out = nn.Dense(self.dim)(h)
    return out, _log_scale(self, self.dim)


def _log_scale(module, dim):
  """The Gaussian likelihood's per-feature log std (a decoder parameter), else None."""
  if module.likelihood != "gaussian":
    return None
  return module.param("log_scale", nn.initializers.zeros, (dim,))


# ----------------------------------------------------------------------------- closed forms


def kl_to_standard_normal(mean, logvar):
  """KL(N(mean, exp(logvar)) || N(0, I)), summed over the last axis."""
  return 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=-1)


def reconstruction_nll(x, out, log_scale, likelihood: str):
  """-log p(x | decoder output), summed over features; x and out are [..., D]."""
  if likelihood == "bernoulli":
    # BCE on logits, stable: max(l, 0) - l x + log(1 + exp(-|l|)).
    return jnp.sum(jnp.maximum(out, 0) - out * x + jnp.log1p(jnp.exp(-jnp.abs(out))), axis=-1)
  if likelihood == "gaussian":
    return jnp.sum(0.5 * jnp.square((x - out) * jnp.exp(-log_scale)) + log_scale
                   + 0.5 * math.log(2 * math.pi), axis=-1)
  if likelihood == "mse":
    return 0.5 * jnp.sum(jnp.square(x - out), axis=-1)
  raise ValueError(f"unknown likelihood {likelihood!r}; allowed: {', '.join(LIKELIHOODS)}")


def decoded_mean(out, likelihood: str):
  """The decoder's mean of p(x | z, y): sigmoid(logits) for Bernoulli, else the output."""
  return jax.nn.sigmoid(out) if likelihood == "bernoulli" else out


# ----------------------------------------------------------------------------- the VAE


class CVAE:
  """The pair (encoder, decoder) and the per-example ELBO loss of a config."""

  def __init__(self, gen_config, num_classes: int, input_shape: Sequence[int]):
    self.config = gen_config
    self.num_classes = int(num_classes)
    self.input_shape = tuple(int(d) for d in input_shape)
    self.dim = int(math.prod(self.input_shape))
    self.latent_dim = int(gen_config.latent_dim)
    self.beta = float(gen_config.beta)
    self.likelihood = gen_config.likelihood
    kind = gen_config.model
    if kind not in KINDS:
      raise ValueError(f"generative.model: unknown {kind!r}; allowed: {', '.join(KINDS)}")
    if self.likelihood not in LIKELIHOODS:
      raise ValueError(f"generative.likelihood: unknown {self.likelihood!r}; allowed: "
                       f"{', '.join(LIKELIHOODS)}")
    self.kind = kind
    if kind == "conv":
      shape = _image_shape(self.input_shape, tuple(gen_config.image_shape))
      features = tuple(gen_config.conv_features)
      self.encoder = ConvEncoder(features, self.latent_dim, self.num_classes, shape)
      self.decoder = ConvDecoder(features, self.num_classes, shape, self.likelihood)
    else:
      hidden = tuple(gen_config.hidden)
      self.encoder = MLPEncoder(hidden, self.latent_dim, self.num_classes)
      self.decoder = MLPDecoder(hidden, self.num_classes, self.dim, self.likelihood)

  def init(self, rng):
    """{"encoder": params, "decoder": params}."""
    k_enc, k_dec = jax.random.split(rng)
    x = jnp.zeros((1, self.dim), jnp.float32)
    y = jnp.zeros((1,), jnp.int32)
    z = jnp.zeros((1, self.latent_dim), jnp.float32)
    return {"encoder": self.encoder.init(k_enc, x, y)["params"],
            "decoder": self.decoder.init(k_dec, z, y)["params"]}

  def encode(self, enc_params, x, y):
    return self.encoder.apply({"params": enc_params}, x.reshape((x.shape[0], -1)), y)

  def decode(self, dec_params, z, y):
    return self.decoder.apply({"params": dec_params}, z, y)

  def losses(self, params, x, y, eps):
    """Per-example (loss, reconstruction NLL, KL), each [B]; eps [B, latent] ~ N(0, I)."""
    x = x.reshape((x.shape[0], -1))
    mean, logvar = self.encode(params["encoder"], x, y)
    z = mean + jnp.exp(0.5 * logvar) * eps
    out, log_scale = self.decode(params["decoder"], z, y)
    rec = reconstruction_nll(x, out, log_scale, self.likelihood)
    kl = kl_to_standard_normal(mean, logvar)
    return rec + self.beta * kl, rec, kl

  def example_loss(self, params, example):
    """Loss of ONE example {"x": [D], "y": [], "eps": [latent]} (for per-example clipping)."""
    loss, _, _ = self.losses(params, example["x"][None], example["y"][None],
                             example["eps"][None])
    return loss[0]

  def generate(self, dec_params, rng, labels):
    """Decoded means for z ~ N(0, I) and the given [N] labels: [N, *input_shape]."""
    z = jax.random.normal(rng, (labels.shape[0], self.latent_dim))
    out, _ = self.decode(dec_params, z, labels)
    return decoded_mean(out, self.likelihood).reshape((labels.shape[0], *self.input_shape))


def _image_shape(input_shape, configured):
  if configured:
    return configured
  if len(input_shape) == 3:
    return input_shape
  if len(input_shape) == 2:
    return (*input_shape, 1)
  side = math.isqrt(input_shape[0])
  if side * side != input_shape[0]:
    raise ValueError(f"generative.image_shape: inputs of shape {input_shape} are not square "
                     "images; set generative.image_shape (H, W, C) or use generative.model=mlp")
  return (side, side, 1)
