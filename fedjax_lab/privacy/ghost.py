"""The ghost-clipping engine: per-example gradient norms and the clipped sum of a Flax linen
model made of nn.Dense / nn.Conv, without per-example gradients (clipping.py, "ghost", has the
method, its references and its validity conditions; `clipping.make_clipped_grad_sum` is the API).
"""

import dataclasses
import math
from typing import Any, Mapping, Optional, Sequence
import flax.linen as nn
from flax.linen import linear as flax_linear
import jax
from jax import lax
import jax.extend.core as jex_core
import jax.numpy as jnp

from fedjax_lab.privacy.per_example import (EXACT, PyTree, clip_factors, global_sq_norms,
                                            leading_size, scale_rows)

# ---------------------------------------------------------------------------
# The ghost path for Flax linen modules.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Layer:
  """A Dense/Conv call found by tracing the model once (static info only)."""
  key: str  # "/"-joined module path, the key of its perturbation.
  path: tuple[str, ...]  # Module path == where its params live.
  module: nn.Module  # Unbound clone, to re-apply the layer on its own.
  out_shape: tuple[int, ...]
  out_dtype: Any
  norm_rule: str  # "dense", "dense_seq", "conv_im2col" or "per_example".


def _is_supported_layer(module: nn.Module) -> bool:
  # Exact types: a subclass may override __call__ and break the formulas.
  return type(module) in (nn.Dense, nn.Conv)


def _norm_rule(module: nn.Module, in_shape: Sequence[int]) -> str:
  """Which per-example norm computation applies to this layer call."""
  if type(module) is nn.Dense:
    if module.dot_general is not None or module.dot_general_cls is not None:
      return "per_example"
    return "dense" if len(in_shape) == 2 else "dense_seq"
  kernel_size = _conv_kernel_size(module)
  num_spatial = len(kernel_size)
  padding = flax_linear.canonicalize_padding(module.padding, num_spatial)
  im2col_ok = (
      len(in_shape) == num_spatial + 2 and  # Exactly one batch axis.
      _per_dim(module.input_dilation, num_spatial) == (1,) * num_spatial and
      module.feature_group_count == 1 and module.mask is None and
      module.conv_general_dilated is None and
      module.conv_general_dilated_cls is None and
      (not isinstance(padding, str) or padding in ("SAME", "VALID")))
  return "conv_im2col" if im2col_ok else "per_example"


def _conv_kernel_size(module: nn.Conv) -> tuple[int, ...]:
  # As flax: an int kernel_size means a 1-D convolution.
  if isinstance(module.kernel_size, int):
    return (module.kernel_size,)
  return tuple(module.kernel_size)


def _per_dim(value, ndim: int) -> tuple[int, ...]:
  """Flax's broadcast of an int / None / sequence conv option to ndim dims."""
  if value is None:
    return (1,) * ndim
  if isinstance(value, int):
    return (value,) * ndim
  return tuple(value)


def _model_variables(params, model_state):
  return {"params": params, **(dict(model_state) if model_state else {})}


def trace_layers(module: nn.Module, params: PyTree, inputs: PyTree,
                  model_state: Optional[Mapping[str, PyTree]],
                  apply_kwargs: Mapping[str, Any]):
  """Traces the model abstractly; returns (layers, reason-or-None)."""
  layers: list[_Layer] = []
  problems: list[str] = []
  batch_size = leading_size(inputs)

  def interceptor(next_fun, args, kwargs, context):
    module_ = context.module
    if not _is_supported_layer(module_):
      return next_fun(*args, **kwargs)
    if context.method_name != "__call__":
      problems.append(f"{type(module_).__name__} at {module_.path} calls "
                      f"method {context.method_name!r}")
      return next_fun(*args, **kwargs)
    x = args[0] if args else kwargs["inputs"]
    y = next_fun(*args, **kwargs)
    path = tuple(module_.path)
    if x.shape[:1] != (batch_size,) or y.shape[:1] != (batch_size,):
      problems.append(
          f"layer {'/'.join(path)} sees input {x.shape} / output {y.shape}, "
          f"not examples on axis 0 (batch {batch_size})")
    layers.append(
        _Layer(key="/".join(path), path=path,
               module=module_.clone(parent=None),
               out_shape=tuple(y.shape), out_dtype=y.dtype,
               norm_rule=_norm_rule(module_, x.shape)))
    return y

  with nn.intercept_methods(interceptor):
    jax.eval_shape(
        lambda p, s, x: module.apply(_model_variables(p, s), x,
                                     **apply_kwargs), params, model_state,
        inputs)

  keys = [layer.key for layer in layers]
  repeated = sorted({k for k in keys if keys.count(k) > 1})
  if repeated:
    problems.append(f"layers called more than once (shared weights): "
                    f"{repeated}")
  covered = {layer.path for layer in layers}
  for leaf_path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = tuple(_key_name(k) for k in leaf_path)
    if not any(names[:len(p)] == p for p in covered):
      problems.append(f"parameter {'/'.join(names)} is not in an nn.Dense or "
                      "nn.Conv")
      break
  if not problems:
    problem = _structure_problem(module, params, model_state, inputs,
                                 apply_kwargs, layers)
    if problem:
      problems.append(problem)
  return layers, ("; ".join(problems) if problems else None)


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _subtree(tree: PyTree, path: tuple[str, ...]) -> PyTree:
  for name in path:
    tree = tree[name]
  return tree


def _im2col(x: jax.Array, module: nn.Conv) -> jax.Array:
  """[B, *spatial, c] -> patches [B, T, k] of a Conv (T output positions).

  Strided slices of the padded input, one per kernel offset: pure data
  movement, unlike `lax.conv_general_dilated_patches`, which runs a
  convolution with a k x k identity kernel (k times the layer's FLOPs).
  Patch features are ordered (kernel offset row-major, in-channel), the
  order of `kernel.reshape(-1, out_channels)`, so a_i^T g_i reshapes straight
  into the kernel's gradient.
  """
  kernel_size = _conv_kernel_size(module)
  ndim = len(kernel_size)
  strides = _per_dim(module.strides, ndim)
  dilation = _per_dim(module.kernel_dilation, ndim)
  padding = flax_linear.canonicalize_padding(module.padding, ndim)
  dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, dilation)]
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(x.shape[1:-1], dilated, strides, padding)
  x = jnp.pad(x, [(0, 0)] + [tuple(p) for p in padding] + [(0, 0)])
  out_spatial = [(n - dk) // s + 1
                 for n, dk, s in zip(x.shape[1:-1], dilated, strides)]
  slices = []
  for offset in _grid(kernel_size):
    start = [0] + [o * d for o, d in zip(offset, dilation)] + [0]
    limit = ([x.shape[0]] + [st + (n - 1) * s + 1 for st, n, s in zip(
        start[1:-1], out_spatial, strides)] + [x.shape[-1]])
    slices.append(
        lax.slice(x, start, limit, (1,) + tuple(strides) + (1,)))
  patches = jnp.stack(slices, axis=-2)  # [B, *out_spatial, K, c]
  return patches.reshape(x.shape[0], math.prod(out_spatial), -1)


def _grid(sizes: Sequence[int]):
  if not sizes:
    yield ()
    return
  for i in range(sizes[0]):
    for rest in _grid(sizes[1:]):
      yield (i,) + rest


def _layer_norms_and_sum(layer: _Layer, layer_params: PyTree, x: jax.Array,
                         g: jax.Array):
  """Per-example gradient norms of one layer, and its clipped-sum closure.

  Args:
    layer: the traced layer.
    layer_params: its parameter subtree ({"kernel", "bias"?}).
    x: [B, ...] the layer's input.
    g: [B, ...] d loss_i / d output_i (unscaled, one row per example).

  Returns:
    (sq_norms [B], sum_fn) where sum_fn(factors [B]) is the layer's params
    gradient of sum_i factors_i * loss_i, i.e. sum_i factors_i * grad_i,
    shaped like layer_params. Rows with factor 0 are dropped exactly (NaN-safe).
  """
  if layer.norm_rule == "per_example":
    return _per_example_norms_and_sum(layer, layer_params, x, g)
  float_x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  float_g = g.astype(jnp.promote_types(g.dtype, jnp.float32))
  use_bias = "bias" in layer_params
  kernel = layer_params["kernel"]
  batch = x.shape[0]

  def pack(kernel_grad, bias_grad):
    grads = {"kernel": kernel_grad.reshape(kernel.shape).astype(kernel.dtype)}
    if use_bias:
      grads["bias"] = bias_grad.astype(layer_params["bias"].dtype)
    return grads

  if layer.norm_rule == "dense":
    # Dense on [B, d]: the per-example kernel gradient is the outer product
    # x_i g_i^T, whose Frobenius norm is ||x_i|| ||g_i||.
    g_sq = jnp.sum(jnp.square(float_g), axis=-1)
    sq = jnp.sum(jnp.square(float_x), axis=-1) * g_sq
    if use_bias:
      sq = sq + g_sq

    def dense_sum(factors):
      keep = (factors != 0).astype(jnp.float32)
      scaled_g = scale_rows(float_g, factors)
      return pack(jnp.matmul(scale_rows(float_x, keep).T, scaled_g,
                             precision=EXACT),
                  jnp.sum(scaled_g, axis=0))

    return sq, dense_sum

  # Dense on [B, T, d] or Conv: a_i [T, k] (inputs or im2col patches, in the
  # kernel's row-major (offset, in-channel) order), g_i [T, o]; the
  # per-example kernel gradient is a_i^T g_i.
  if layer.norm_rule == "dense_seq":
    a = float_x.reshape(batch, -1, x.shape[-1])
  else:
    a = _im2col(float_x, layer.module)
  g3 = float_g.reshape(batch, -1, g.shape[-1])
  _, t, k = a.shape
  o = g3.shape[-1]
  bias_sq = (jnp.sum(jnp.square(jnp.sum(g3, axis=1)), axis=-1)
             if use_bias else 0.0)
  if t * (k + o) < k * o:
    # Ghost norm: ||a^T g||_F^2 = sum_{p,q} (a_p . a_q)(g_p . g_q), cost
    # T^2 (k + o) instead of T k o.
    gram_a = jnp.einsum("btk,bsk->bts", a, a, precision=EXACT)
    gram_g = jnp.einsum("bto,bso->bts", g3, g3, precision=EXACT)
    sq = jnp.sum(gram_a * gram_g, axis=(1, 2)) + bias_sq

    def ghost_sum(factors):
      keep = (factors != 0).astype(jnp.float32)
      scaled_g = scale_rows(g3, factors)
      return pack(
          jnp.einsum("btk,bto->ko", scale_rows(a, keep), scaled_g,
                     precision=EXACT),
          jnp.sum(scaled_g, axis=(0, 1)))

    return sq, ghost_sum

  # Materialize the per-example kernel gradients of this layer only; the
  # clipped sum is then a weighted sum of them, with no extra pass over a.
  per_example = jnp.einsum("btk,bto->bko", a, g3, precision=EXACT)
  sq = jnp.sum(jnp.square(per_example), axis=(1, 2)) + bias_sq

  def materialized_sum(factors):
    return pack(
        jnp.sum(scale_rows(per_example, factors), axis=0),
        jnp.sum(scale_rows(jnp.sum(g3, axis=1), factors), axis=0))

  return sq, materialized_sum


def _per_example_norms_and_sum(layer, layer_params, x, g):
  """Fallback for Dense/Conv configurations without a closed form.

  Materializes this layer's per-example gradients with vmap over the layer's
  own apply (exact for any configuration that treats examples independently).
  """

  def one(x_i, g_i):
    _, vjp = jax.vjp(
        lambda p: layer.module.apply({"params": p}, x_i[None]), layer_params)
    return vjp(g_i[None].astype(layer.out_dtype))[0]

  per_example = jax.vmap(one)(x, g)

  def per_example_sum(factors):
    return jax.tree.map(lambda v: jnp.sum(scale_rows(v, factors), axis=0),
                        per_example)

  return global_sq_norms(per_example), per_example_sum


def _tapped_forward(module, variables, inputs, apply_kwargs):
  """perturbations -> (outputs, activations), tapping every Dense/Conv.

  Each supported layer's input is recorded under its key and
  `perturbations[key]` (zeros) is added to its output, so a vjp w.r.t. the
  perturbations yields every layer's output gradient.
  """

  def forward(perturbations):
    activations = {}

    def interceptor(next_fun, args, kwargs, context):
      module_ = context.module
      if context.method_name != "__call__" or not _is_supported_layer(
          module_):
        return next_fun(*args, **kwargs)
      key = "/".join(module_.path)
      activations[key] = args[0] if args else kwargs["inputs"]
      return next_fun(*args, **kwargs) + perturbations[key]

    with nn.intercept_methods(interceptor):
      outputs = module.apply(variables, inputs, **apply_kwargs)
    return outputs, activations

  return forward


def _zero_perturbations(layers, batch_size):
  return {
      layer.key: jnp.zeros((batch_size,) + layer.out_shape[1:],
                           layer.out_dtype) for layer in layers
  }


def _structure_problem(module, params, model_state, inputs, apply_kwargs,
                       layers) -> Optional[str]:
  """Checks, by tracing once (no compile, no run), what ghost relies on.

  1. Every parameter reaches the outputs only through its own layer's call.
     The probe runs each tapped layer on a second copy of the parameters
     ("inside") and the rest of the model on the first ("outside"); if the
     outputs still depend on "outside", some parameter is also used elsewhere
     (e.g. a kernel read through `.variables` for weight tying), and ghost
     norms would miss that use. Dependence is propagated conservatively
     through the jaxpr (any tainted input taints all outputs of an equation),
     so this can only err towards "vmap".
  2. The tapped activations can leave the model. Inside a lifted transform
     (nn.remat, nn.scan, nn.vmap ...) they belong to that transform's trace:
     tracing succeeds with them captured as jaxpr constants, and only running
     fails, so look for tracers among the constants.

  Returns:
    None if both hold, else a description of the problem.
  """
  by_key = {layer.key: layer for layer in layers}

  def probe(outside, inside, state, x):
    substituting = []  # Non-empty while a layer runs on `inside`.

    def forward(perturbations):
      activations = {}

      def interceptor(next_fun, args, kwargs, context):
        module_ = context.module
        if (substituting or context.method_name != "__call__" or
            not _is_supported_layer(module_)):
          return next_fun(*args, **kwargs)
        layer = by_key["/".join(module_.path)]
        layer_input = args[0] if args else kwargs["inputs"]
        activations[layer.key] = layer_input
        substituting.append(layer.key)
        y = layer.module.apply({"params": _subtree(inside, layer.path)},
                               layer_input)
        substituting.pop()
        return y + perturbations[layer.key]

      with nn.intercept_methods(interceptor):
        outputs = module.apply(_model_variables(outside, state), x,
                               **apply_kwargs)
      return outputs, activations

    # As in the ghost path: activations leave the vjp as its aux output.
    outputs, vjp_fn, activations = jax.vjp(
        forward, _zero_perturbations(layers, leading_size(x)), has_aux=True)
    return outputs, vjp_fn(jax.tree.map(jnp.zeros_like, outputs)), [
        jnp.sum(a) for a in activations.values()
    ]

  try:
    closed = jax.make_jaxpr(probe)(params, params, model_state, inputs)
  except jax.errors.UnexpectedTracerError:
    return _LIFTED
  if any(isinstance(c, jax.core.Tracer) for c in closed.consts):
    return _LIFTED
  jaxpr = closed.jaxpr
  tainted = set(jaxpr.invars[:len(jax.tree.leaves(params))])
  for eqn in jaxpr.eqns:
    if any(isinstance(v, jex_core.Var) and v in tainted for v in eqn.invars):
      tainted.update(eqn.outvars)
  num_outputs = len(jax.tree.leaves(jax.eval_shape(
      lambda p, s, x: module.apply(_model_variables(p, s), x, **apply_kwargs),
      params, model_state, inputs)))
  if any(isinstance(v, jex_core.Var) and v in tainted
         for v in jaxpr.outvars[:num_outputs]):
    return ("a parameter of an nn.Dense/nn.Conv is also used outside that "
            "layer's call (e.g. weight tying through .variables)")
  return None


_LIFTED = ("an nn.Dense/nn.Conv runs inside a lifted transform (nn.remat, "
           "nn.scan, nn.vmap, ...)")


def ghost_chunk(module, example_loss, params, clip_norm, layers,
                 model_state, apply_kwargs):
  """(batch, weights) -> (clipped grad sum, norms, losses), ghost path."""
  variables = _model_variables(params, model_state)

  def chunk_fn(batch, weights):
    inputs, labels = batch

    forward = _tapped_forward(module, variables, inputs, apply_kwargs)
    zeros = _zero_perturbations(layers, leading_size(inputs))
    # Differentiating w.r.t. the perturbations only (params closed over)
    # makes this backward pass skip every weight gradient.
    outputs, vjp_fn, activations = jax.vjp(forward, zeros, has_aux=True)
    losses, output_grads = jax.vmap(jax.value_and_grad(example_loss))(
        outputs, labels)
    (layer_grads,) = vjp_fn(output_grads)

    per_layer = {
        layer.path: _layer_norms_and_sum(layer, _subtree(params, layer.path),
                                         activations[layer.key],
                                         layer_grads[layer.key])
        for layer in layers
    }
    # The Gram form can round a ~0 norm to a tiny negative; sqrt would give
    # NaN and silently drop the example.
    norms = jnp.sqrt(jnp.maximum(sum(sq for sq, _ in per_layer.values()), 0))
    factors = clip_factors(norms, clip_norm, weights)
    # Book-keeping: the clipped sum needs no second backward pass, because
    # the output cotangent of sum_i w_i c_i loss_i is w_i c_i g_i row by row.
    summed = {path: sum_fn(factors) for path, (_, sum_fn) in per_layer.items()}

    def lookup(leaf_path, _):
      names = tuple(_key_name(k) for k in leaf_path)
      for path, tree in summed.items():
        if names[:len(path)] == path:
          return _subtree(tree, names[len(path):])
      raise AssertionError(f"uncovered parameter {names}")  # Checked earlier.

    grad_sum = jax.tree_util.tree_map_with_path(lookup, params)
    return grad_sum, norms, losses

  return chunk_fn
