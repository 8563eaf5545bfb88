"""Per-example gradient clipping and Gaussian noise (the DP-SGD primitives).

DP-SGD (Abadi et al. 2016) needs, per step, the SUM over the batch of
per-example gradients, each clipped to L2 norm <= clip_norm over the whole
parameter pytree, plus Gaussian noise of std noise_multiplier * clip_norm:

    g_i   = grad loss_i(params)                       one example's gradient
    c_i   = min(1, clip_norm / ||g_i||)               its clipping factor
    sum   = sum_i w_i * c_i * g_i                     `clipped_grad_sum`
    noisy = sum + N(0, (noise_multiplier * clip_norm)^2 I)   `privatize`

Two ways to compute `sum`, with identical results (to float rounding):

* "vmap" (`clipped_grad_sum`): `jax.vmap(jax.grad)` materializes every
  per-example gradient ([B, num_params] floats), clips and sums. Works for any
  loss_fn; memory- and bandwidth-bound (57-240x a non-private step for an MLP
  784-256-256-10 at batch 256 on a busy 2-core CPU; ~1.7x for a small CNN).
* "ghost" (`make_clipped_grad_sum` on a Flax linen module made of `nn.Dense`
  and `nn.Conv`): never materializes per-example gradients of the whole
  model. One forward pass records each layer's input a and one backward pass
  (w.r.t. zero perturbations added to each layer's output, so it skips the
  weight gradients) gives each layer's per-example output gradient g. The
  per-example norms follow per layer (Goodfellow 2015; Li et al. 2022 "ghost
  clipping"; Bu et al. 2022 "mixed ghost clipping"):
      Dense on [B, d]:        ||a_i||^2 ||g_i||^2 (+ ||g_i||^2 for the bias)
      Dense on [B, T, d], Conv (im2col patches a_i: [T, k], g_i: [T, o]):
          ||a_i^T g_i||_F^2, computed either by materializing a_i^T g_i
          (cost T k o) or as sum_{p,q} (a_p . a_q)(g_p . g_q) (cost
          T^2 (k + o)), whichever is cheaper for that layer.
  Because examples do not interact and the cotangent is linear, the gradient
  of sum_i w_i c_i loss_i at a layer's output is just w_i c_i g_i; so the
  clipped sum is each layer's weight gradient evaluated with the rescaled
  cotangent (Bu et al. 2023, "book-keeping"): no second forward or full
  backward pass. The clipped sum then costs ~1.0-1.1x a non-private gradient
  on this CPU; drawing the noise in `privatize` is the larger overhead
  (benchmarks/dp_overhead.py).

Validity of "ghost" (checked where it can be; the rest is your contract):
every parameter belongs to exactly one `nn.Dense`/`nn.Conv` (exact types, not
subclasses) called exactly once per forward and not inside a lifted transform
(nn.remat, nn.scan, nn.vmap); each such layer sees examples on axis 0; and the
model never mixes examples (no BatchNorm in training mode, no attention or
mean across the batch axis). `make_clipped_grad_sum(method="auto")` picks
"ghost" when the checkable conditions hold and the model has no collections
besides "params", else "vmap". Parameter-free layers (activations, pooling,
reshape, dropout-free residual adds) are fine anywhere.

NaN/inf safety: an example whose gradient norm is not finite gets clipping
factor 0 and its rows are zeroed before summing, so one bad example cannot
turn the whole sum into NaN (the sensitivity bound still holds).
"""

from typing import Any, Callable, Literal, Mapping, Optional

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

from fedjax_lab.privacy.noise import check_nonnegative as _check_nonnegative
from fedjax_lab.privacy import ghost
from fedjax_lab.privacy.noise import privatize  # noqa: F401  (the API: clip, then noise)
from fedjax_lab.privacy.per_example import PyTree, clip_factors  # noqa: F401  (clip_factors: API)
from fedjax_lab.privacy.per_example import global_sq_norms, leading_size, scale_rows

Method = Literal["auto", "vmap", "ghost"]
_METHODS = ("auto", "vmap", "ghost")


# Module layout: this file is the clipping API (microbatching, the vmap path, the method
# choice); per_example.py has the clip factors both paths share; ghost.py is the ghost-norm
# engine; noise.py adds the Gaussian noise.
# ---------------------------------------------------------------------------
# Microbatching, shared by both paths.
# ---------------------------------------------------------------------------


def _microbatched(chunk_fn: Callable[..., tuple[PyTree, jax.Array, jax.Array]],
                  batch: PyTree, weights: jax.Array,
                  microbatch_size: Optional[int]):
  """Runs chunk_fn over microbatches with lax.scan, summing its gradient.

  Args:
    chunk_fn: (batch_chunk, weights_chunk) -> (grad_sum, norms [m], losses
      [m]).
    batch: pytree with leading axis B.
    weights: [B].
    microbatch_size: m, or None for one chunk. B need not be a multiple of m:
      the tail is padded with zero rows of weight 0, which contribute exactly
      nothing.

  Returns:
    (grad_sum, norms [B], losses [B]).
  """
  size = weights.shape[0]
  if microbatch_size is None or microbatch_size >= size:
    return chunk_fn(batch, weights)
  if microbatch_size < 1:
    raise ValueError(f"microbatch_size must be >= 1, got {microbatch_size}.")
  num_chunks = -(-size // microbatch_size)
  pad = num_chunks * microbatch_size - size

  def to_chunks(x):
    x = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)])
    return x.reshape((num_chunks, microbatch_size) + x.shape[1:])

  chunks = jax.tree.map(to_chunks, (batch, weights))
  grad_shape = jax.eval_shape(chunk_fn, *jax.tree.map(lambda x: x[0], chunks))
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), grad_shape[0])

  def body(total, chunk):
    grad_sum, norms, losses = chunk_fn(*chunk)
    return jax.tree.map(jnp.add, total, grad_sum), (norms, losses)

  total, (norms, losses) = lax.scan(body, zeros, chunks)
  return total, norms.reshape(-1)[:size], losses.reshape(-1)[:size]


# ---------------------------------------------------------------------------
# The generic path: vmap(grad) over examples.
# ---------------------------------------------------------------------------


def _vmap_chunk(loss_fn, params, clip_norm):
  """(batch, weights) -> (clipped grad sum, norms, losses) via vmap(grad)."""

  def chunk_fn(batch, weights):
    losses, grads = jax.vmap(jax.value_and_grad(loss_fn),
                             in_axes=(None, 0))(params, batch)
    norms = jnp.sqrt(global_sq_norms(grads))
    factors = clip_factors(norms, clip_norm, weights)
    grad_sum = jax.tree.map(
        lambda g: jnp.sum(scale_rows(g, factors), axis=0), grads)
    return grad_sum, norms, losses

  return chunk_fn


def clipped_grad_sum(loss_fn: Callable[[PyTree, PyTree], jax.Array],
                     params: PyTree,
                     batch: PyTree,
                     clip_norm: float | jax.Array,
                     *,
                     weights: Optional[jax.Array] = None,
                     microbatch_size: Optional[int] = None,
                     return_norms: bool = False):
  """Sum over the batch of per-example gradients, each clipped to clip_norm.

  Args:
    loss_fn: (params, example) -> scalar loss of ONE example; `example` is a
      pytree without the batch axis.
    params: the parameter pytree.
    batch: pytree whose leaves have a leading batch axis B.
    clip_norm: C, the L2 bound on each example's gradient over the whole
      params pytree.
    weights: [B] optional multipliers of the clipped gradients (0/1 for
      padding, or real). Default: all ones. The sum's L2 sensitivity to one
      example is clip_norm * max_i |w_i|: weights above 1 need more noise.
    microbatch_size: if set, process the batch in chunks of this many examples
      with lax.scan (peak memory ~ microbatch_size per-example gradients);
      the result is the same sum.
    return_norms: also return the [B] unclipped per-example gradient norms.

  Returns:
    grad_sum, a pytree like params: sum_i w_i min(1, C / ||g_i||) g_i; or
    (grad_sum, norms [B]) with return_norms=True.
  """
  _check_nonnegative("clip_norm", clip_norm)
  size = leading_size(batch)
  weights = jnp.ones((size,), jnp.float32) if weights is None else weights
  grad_sum, norms, _ = _microbatched(
      _vmap_chunk(loss_fn, params, clip_norm), batch, weights,
      microbatch_size)
  return (grad_sum, norms) if return_norms else grad_sum


def choose_method(module: nn.Module,
                  params: PyTree,
                  inputs: PyTree,
                  *,
                  method: Method = "auto",
                  model_state: Optional[Mapping[str, PyTree]] = None,
                  apply_kwargs: Optional[Mapping[str, Any]] = None) -> str:
  """The clipping path `make_clipped_grad_sum` takes for these arguments.

  Decided from the model's structure and shapes only (never from values), so
  it is the same under jit, vmap and scan.

  Args:
    module: the Flax linen module.
    params: its params (arrays or ShapeDtypeStructs).
    inputs: a batch of inputs [B, ...].
    method: "auto", "vmap" or "ghost".
    model_state: non-param collections (read-only), e.g. {"batch_stats": ...}.
    apply_kwargs: extra keyword arguments of module.apply (e.g. train=False).

  Returns:
    "ghost" or "vmap".

  Raises:
    ValueError: method="ghost" on a model the ghost path cannot handle (the
      message says why), or an unknown method.
  """
  return _choose(module, params, inputs, method, model_state,
                 dict(apply_kwargs or {}))[0]


def _choose(module, params, inputs, method, model_state, apply_kwargs):
  """(path, traced layers or None); see `choose_method`."""
  if method not in _METHODS:
    raise ValueError(f"method must be one of {_METHODS}, got {method!r}.")
  if method == "vmap" or (method == "auto" and model_state):
    return "vmap", None
  layers, problem = ghost.trace_layers(module, params, inputs, model_state, apply_kwargs)
  if problem is None:
    return "ghost", layers
  if method == "ghost":
    raise ValueError(f"ghost clipping does not apply to this model: {problem}."
                     " Use method='vmap' (or 'auto').")
  return "vmap", None


def make_clipped_grad_sum(module: nn.Module,
                          example_loss: Callable[[PyTree, PyTree], jax.Array],
                          *,
                          method: Method = "auto",
                          microbatch_size: Optional[int] = None,
                          apply_kwargs: Optional[Mapping[str, Any]] = None,
                          return_losses: bool = False):
  """Builds fn computing a model's clipped per-example gradient sum.

  The returned function is pure and traceable: jit it, vmap it over sites,
  scan it over local steps. The path is chosen at trace time from shapes and
  structure (see `choose_method`).

      fn(params, inputs, labels, weights, clip_norm, model_state=None)
        -> (grad_sum, norms)            # or (grad_sum, norms, losses)

  with `module.apply({"params": params, **model_state}, inputs,
  **apply_kwargs)` -> outputs [B, ...] and `example_loss(outputs[i],
  labels[i])` the scalar loss of example i.

  Args:
    module: a Flax linen module whose outputs keep examples on axis 0.
    example_loss: (output of one example, label of one example) -> scalar.
    method: "auto" (ghost when valid, else vmap), "vmap" or "ghost".
    microbatch_size: process the batch in chunks of this many examples with
      lax.scan (same result, lower peak memory).
    apply_kwargs: static keyword arguments for module.apply.
    return_losses: also return the [B] per-example losses (unweighted).

  Returns:
    fn(params, inputs, labels, weights, clip_norm, model_state=None) ->
    (grad_sum like params, norms [B]) or (..., losses [B]); `weights` [B]
    (or None for ones) multiplies each clipped gradient.
  """
  if method not in _METHODS:
    raise ValueError(f"method must be one of {_METHODS}, got {method!r}.")
  apply_kwargs = dict(apply_kwargs or {})

  def fn(params, inputs, labels, weights, clip_norm, model_state=None):
    _check_nonnegative("clip_norm", clip_norm)
    size = leading_size(inputs)
    if weights is None:
      weights = jnp.ones((size,), jnp.float32)
    path, layers = _choose(module, params, inputs, method, model_state,
                           apply_kwargs)
    if path == "ghost":
      chunk_fn = ghost.ghost_chunk(module, example_loss, params, clip_norm, layers,
                                   model_state, apply_kwargs)
    else:
      variables_state = dict(model_state) if model_state else {}

      def loss_fn(p, example):
        x_i, y_i = example
        out = module.apply({"params": p, **variables_state},
                           jax.tree.map(lambda v: v[None], x_i),
                           **apply_kwargs)
        return example_loss(jax.tree.map(lambda v: v[0], out), y_i)

      chunk_fn = _vmap_chunk(loss_fn, params, clip_norm)
    grad_sum, norms, losses = _microbatched(chunk_fn, (inputs, labels),
                                            weights, microbatch_size)
    return (grad_sum, norms, losses) if return_losses else (grad_sum, norms)

  return fn
