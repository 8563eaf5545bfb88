"""fedjax_lab.privacy.clipping against an explicit NumPy per-example loop.

The reference takes one example at a time, computes its gradient with
`jax.grad` on a batch of size 1, and clips, weights and sums it in float64
NumPy: nothing vmapped, no ghost norms, nothing from the module under test.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lab.privacy import clipping


def example_loss(logits, label):
  return optax.softmax_cross_entropy_with_integer_labels(logits, label)


class Mlp(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(16)(x))
    x = nn.tanh(nn.Dense(12, use_bias=False)(x))
    return nn.Dense(5)(x)


class Cnn(nn.Module):
  """Conv with SAME / VALID / explicit padding, stride 2, dilation, pooling."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3), strides=2, padding="SAME")(x))  # 6x6
    x = nn.relu(nn.Conv(6, (3, 3), padding="VALID")(x))  # 4x4
    # Few output positions, big patches: takes the ghost (Gram) branch.
    x = nn.relu(nn.Conv(40, (3, 3), padding="VALID")(x))  # 2x2
    x = nn.Conv(8, (2, 2), strides=(1, 2), padding=((1, 0), (0, 1)),
                kernel_dilation=(1, 2))(x)
    x = nn.avg_pool(x, (2, 1))
    return nn.Dense(5)(x.reshape(x.shape[0], -1))


class SeqModel(nn.Module):
  """Dense on [B, T, d] and a grouped conv (the per-layer fallback rule)."""

  @nn.compact
  def __call__(self, x):  # x: [B, T, 4]
    x = nn.relu(nn.Dense(24)(x))
    x = nn.relu(nn.Conv(6, (3,), feature_group_count=2, padding="CIRCULAR")(x))
    x = jnp.mean(x, axis=1)
    return nn.Dense(5)(x)


class BatchNormModel(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3), strides=2)(x)
    x = nn.BatchNorm(use_running_average=True)(x)
    return nn.Dense(5)(nn.relu(x).reshape(x.shape[0], -1))


class RematModel(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.remat(nn.Dense)(8)(x))
    return nn.Dense(5)(x)


class TiedModel(nn.Module):
  """Reuses a Dense kernel outside that Dense's call (weight tying)."""

  @nn.compact
  def __call__(self, x):
    dense = nn.Dense(4)
    h = nn.relu(dense(x))
    return nn.Dense(5)(h @ dense.variables["params"]["kernel"].T)


class SharedLayerModel(nn.Module):

  @nn.compact
  def __call__(self, x):
    dense = nn.Dense(x.shape[-1])
    return nn.Dense(5)(dense(nn.relu(dense(x))))


def per_example_grads(grad_of_example, num_examples):
  """Gradients of examples 0..B-1, one call (one example) each, as float64."""
  return [
      jax.tree.map(lambda g: np.asarray(g, np.float64), grad_of_example(i))
      for i in range(num_examples)
  ]


def numpy_clipped_sum(grads, clip_norm, weights=None):
  """sum_i w_i min(1, C / ||g_i||) g_i and the norms, in a NumPy loop.

  Args:
    grads: list of B per-example gradient pytrees (float64 NumPy).
    clip_norm: C.
    weights: [B] or None.

  Returns:
    (sum pytree, norms [B]).
  """
  total, norms = None, []
  for i, grad in enumerate(grads):
    norm = np.sqrt(sum(np.sum(g**2) for g in jax.tree.leaves(grad)))
    norms.append(norm)
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    scale *= 1.0 if weights is None else float(weights[i])
    clipped = jax.tree.map(lambda g, s=scale: s * g, grad)
    total = clipped if total is None else jax.tree.map(np.add, total, clipped)
  return total, np.array(norms)


@functools.cache
def _one_example_grad_fn(model):
  def loss_of_one(params, model_state, x, y):
    variables = {"params": params, **model_state}
    return example_loss(model.apply(variables, x)[0], y)

  return jax.jit(jax.grad(loss_of_one))


def model_grads(model, params, inputs, labels, model_state=None):
  """Per-example gradients of a model: jax.grad on a batch of size 1."""
  grad_fn = _one_example_grad_fn(model)
  return per_example_grads(
      lambda i: grad_fn(params, model_state or {}, inputs[i:i + 1],
                        labels[i]), len(labels))


def assert_tree_close(got, want, rtol=1e-5):
  """Elementwise, to rtol relative to each leaf's largest entry."""
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    w = np.asarray(w, np.float64)
    np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=rtol,
                               atol=rtol * np.max(np.abs(w)))


def median_norm_clip(norms):
  """A clip norm with some examples clipped and some not."""
  clip_norm = float(np.median(norms))
  assert np.sum(norms > clip_norm) > 0 and np.sum(norms < clip_norm) > 0
  return clip_norm


# ---------------------------------------------------------------------------
# clipped_grad_sum (the generic vmap path).
# ---------------------------------------------------------------------------


def linear_problem(batch_size=10, seed=0):
  rng = np.random.default_rng(seed)
  params = {"w": jnp.asarray(rng.normal(size=(6, 3)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(3,)), jnp.float32)}
  # Spread example scales so norms differ a lot.
  scales = np.exp(rng.normal(size=(batch_size, 1)))
  batch = {"x": jnp.asarray(rng.normal(size=(batch_size, 6)) * scales,
                            jnp.float32),
           "y": jnp.asarray(rng.integers(0, 3, batch_size))}

  def loss_fn(p, example):
    logits = example["x"] @ p["w"] + p["b"]
    return example_loss(logits, example["y"])

  return loss_fn, params, batch


def linear_reference(loss_fn, params, batch, clip_norm, weights=None):
  grad_fn = jax.grad(loss_fn)
  grads = per_example_grads(
      lambda i: grad_fn(params, jax.tree.map(lambda v: v[i], batch)),
      len(batch["y"]))
  return numpy_clipped_sum(grads, clip_norm, weights)


def test_clipped_grad_sum_matches_numpy_loop():
  loss_fn, params, batch = linear_problem()
  _, ref_norms = linear_reference(loss_fn, params, batch, np.inf)
  clip_norm = median_norm_clip(ref_norms)
  want, _ = linear_reference(loss_fn, params, batch, clip_norm)
  got, norms = jax.jit(
      lambda p, b: clipping.clipped_grad_sum(loss_fn, p, b, clip_norm,
                                             return_norms=True))(params, batch)
  assert_tree_close(got, want)
  np.testing.assert_allclose(norms, ref_norms, rtol=1e-5)
  # The default returns the sum alone.
  assert_tree_close(clipping.clipped_grad_sum(loss_fn, params, batch,
                                              clip_norm), want)


def test_clipped_grad_sum_weights_and_zero_rows():
  loss_fn, params, batch = linear_problem()
  weights = np.array([1, 0, 0.5, 1, 0, 2.0, 1, 1, 0, 1], np.float32)
  want, _ = linear_reference(loss_fn, params, batch, 1.0, weights)
  got = clipping.clipped_grad_sum(loss_fn, params, batch, 1.0,
                                  weights=jnp.asarray(weights))
  assert_tree_close(got, want)
  # Weight-0 rows holding garbage (even NaN) contribute exactly nothing.
  poisoned = dict(batch, x=batch["x"].at[1].set(jnp.nan).at[4].set(1e30))
  got = clipping.clipped_grad_sum(loss_fn, params, poisoned, 1.0,
                                  weights=jnp.asarray(weights))
  assert_tree_close(got, want)


@pytest.mark.parametrize("microbatch_size", [1, 3, 5, 10, 64])
def test_clipped_grad_sum_microbatching_is_identical(microbatch_size):
  loss_fn, params, batch = linear_problem()
  weights = jnp.asarray(np.linspace(0, 1, 10), jnp.float32)
  want, want_norms = clipping.clipped_grad_sum(
      loss_fn, params, batch, 0.7, weights=weights, return_norms=True)
  got, norms = jax.jit(lambda p, b: clipping.clipped_grad_sum(
      loss_fn, p, b, 0.7, weights=weights, microbatch_size=microbatch_size,
      return_norms=True))(params, batch)
  assert_tree_close(got, want, rtol=1e-6)
  np.testing.assert_allclose(norms, want_norms, rtol=1e-6)
  ref, _ = linear_reference(loss_fn, params, batch, 0.7, np.asarray(weights))
  assert_tree_close(got, ref)


# ---------------------------------------------------------------------------
# make_clipped_grad_sum: ghost vs vmap vs the NumPy loop.
# ---------------------------------------------------------------------------


def model_problem(model, input_shape, batch_size=9, seed=0):
  rng = np.random.default_rng(seed)
  scales = np.exp(rng.normal(size=(batch_size,) + (1,) * len(input_shape)))
  inputs = jnp.asarray(
      rng.normal(size=(batch_size,) + input_shape) * scales, jnp.float32)
  labels = jnp.asarray(rng.integers(0, 5, batch_size))
  variables = model.init(jax.random.key(seed), inputs)
  return variables, inputs, labels


MODELS = {
    "mlp": (Mlp(), (7,)),
    "cnn": (Cnn(), (12, 12, 3)),
    "seq": (SeqModel(), (5, 4)),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_ghost_and_vmap_match_numpy_loop(name):
  model, shape = MODELS[name]
  variables, inputs, labels = model_problem(model, shape)
  params = variables["params"]
  assert clipping.choose_method(model, params, inputs) == "ghost"
  grads = model_grads(model, params, inputs, labels)
  _, ref_norms = numpy_clipped_sum(grads, np.inf)
  clip_norm = median_norm_clip(ref_norms)
  weights = np.array([1, 1, 0, 1, 0.5, 1, 1, 2, 1], np.float32)
  want, _ = numpy_clipped_sum(grads, clip_norm, weights)
  results = {}
  for method in ("vmap", "ghost"):
    fn = jax.jit(clipping.make_clipped_grad_sum(model, example_loss,
                                                method=method))
    results[method] = fn(params, inputs, labels, jnp.asarray(weights),
                         clip_norm)
    grad_sum, norms = results[method]
    assert_tree_close(grad_sum, want)
    np.testing.assert_allclose(norms, ref_norms, rtol=1e-5)
  assert_tree_close(results["ghost"][0], results["vmap"][0])
  np.testing.assert_allclose(results["ghost"][1], results["vmap"][1],
                             rtol=1e-5)


@pytest.mark.parametrize("method", ["vmap", "ghost"])
def test_model_microbatching_losses_and_nan_rows(method):
  model, shape = MODELS["cnn"]
  variables, inputs, labels = model_problem(model, shape, batch_size=7)
  params = variables["params"]
  weights = jnp.asarray([1, 1, 0, 1, 1, 0, 1], jnp.float32)
  want, _ = numpy_clipped_sum(model_grads(model, params, inputs, labels),
                              0.5, np.asarray(weights))
  full = jax.jit(clipping.make_clipped_grad_sum(
      model, example_loss, method=method, return_losses=True))
  chunked = clipping.make_clipped_grad_sum(
      model, example_loss, method=method, microbatch_size=3,
      return_losses=True)
  grads, norms, losses = full(params, inputs, labels, weights, 0.5)
  grads_mb, norms_mb, losses_mb = jax.jit(chunked)(params, inputs, labels,
                                                   weights, 0.5)
  assert_tree_close(grads, want)
  assert_tree_close(grads_mb, grads, rtol=1e-6)
  np.testing.assert_allclose(norms_mb, norms, rtol=1e-6)
  want_losses = example_loss(model.apply(variables, inputs), labels)
  np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
  np.testing.assert_allclose(losses_mb, want_losses, rtol=1e-5)
  # NaN in a weight-0 row must not leak into the sum.
  poisoned = inputs.at[2].set(jnp.nan).at[5].set(jnp.inf)
  grads_nan, _, _ = full(params, poisoned, labels, weights, 0.5)
  assert_tree_close(grads_nan, want)


def test_auto_falls_back_to_vmap_for_batchnorm():
  model = BatchNormModel()
  variables, inputs, labels = model_problem(model, (8, 8, 2))
  params = variables["params"]
  state = {"batch_stats": jax.tree.map(lambda v: v + 0.3,
                                       variables["batch_stats"])}
  assert clipping.choose_method(model, params, inputs,
                                model_state=state) == "vmap"
  with pytest.raises(ValueError, match="BatchNorm_0"):
    clipping.choose_method(model, params, inputs, method="ghost",
                           model_state=state)
  grads = model_grads(model, params, inputs, labels, model_state=state)
  _, ref_norms = numpy_clipped_sum(grads, np.inf)
  clip_norm = median_norm_clip(ref_norms)
  want, _ = numpy_clipped_sum(grads, clip_norm)
  fn = jax.jit(clipping.make_clipped_grad_sum(model, example_loss))
  got, norms = fn(params, inputs, labels, None, clip_norm, state)
  assert_tree_close(got, want)
  np.testing.assert_allclose(norms, ref_norms, rtol=1e-5)


@pytest.mark.parametrize("model,problem", [
    (SharedLayerModel(), "more than once"),
    (RematModel(), "lifted transform"),
    (TiedModel(), "outside that layer"),
])
def test_auto_falls_back_to_vmap_for_unsupported_structure(model, problem):
  variables, inputs, labels = model_problem(model, (6,))
  params = variables["params"]
  assert clipping.choose_method(model, params, inputs) == "vmap"
  with pytest.raises(ValueError, match=problem):
    clipping.choose_method(model, params, inputs, method="ghost")
  want, _ = numpy_clipped_sum(model_grads(model, params, inputs, labels),
                              0.3)
  got, _ = clipping.make_clipped_grad_sum(model, example_loss)(
      params, inputs, labels, None, 0.3)
  assert_tree_close(got, want)


def test_vmapped_over_sites_and_scanned_over_steps():
  model, shape = MODELS["mlp"]
  num_sites, batch = 3, 6
  variables, inputs, labels = model_problem(model, shape,
                                            batch_size=num_sites * batch)
  params = variables["params"]
  inputs = inputs.reshape((num_sites, batch) + shape)
  labels = labels.reshape(num_sites, batch)
  weights = jnp.ones((num_sites, batch)).at[1, 4:].set(0.0)
  fn = clipping.make_clipped_grad_sum(model, example_loss)
  per_site = jax.jit(jax.vmap(fn, in_axes=(None, 0, 0, 0, None)))
  grads, norms = per_site(params, inputs, labels, weights, 0.4)
  for s in range(num_sites):
    want, want_norms = numpy_clipped_sum(
        model_grads(model, params, inputs[s], labels[s]), 0.4,
        np.asarray(weights[s]))
    assert_tree_close(jax.tree.map(lambda g, s=s: g[s], grads), want)
    np.testing.assert_allclose(norms[s], want_norms, rtol=1e-5)

  # Two local SGD steps in lax.scan, against the same steps unrolled.
  def local_steps(p, xs):
    def step(p, x):
      g, _ = fn(p, x, labels[0], None, 0.4)
      return jax.tree.map(lambda a, b: a - 0.1 * b, p, g), None
    return jax.lax.scan(step, p, xs)[0]

  scanned = jax.jit(local_steps)(params, inputs[:2])
  unrolled = params
  jitted = jax.jit(fn)
  for i in range(2):
    g, _ = jitted(unrolled, inputs[i], labels[0], None, 0.4)
    unrolled = jax.tree.map(lambda a, b: a - 0.1 * b, unrolled, g)
  assert_tree_close(scanned, unrolled, rtol=1e-6)


def test_unknown_method():
  with pytest.raises(ValueError, match="method"):
    clipping.make_clipped_grad_sum(Mlp(), example_loss, method="fast")


# ---------------------------------------------------------------------------
# privatize.
# ---------------------------------------------------------------------------


def test_privatize_noise_statistics():
  tree = {"a": jnp.zeros((400_000,)), "b": {"c": jnp.full((300, 200), 2.0)}}
  clip_norm, sigma = 0.5, 1.3
  privatize = jax.jit(clipping.privatize)
  noisy = privatize(tree, clip_norm, sigma, jax.random.key(0))
  noise = np.concatenate([np.asarray(noisy["a"]),
                          np.asarray(noisy["b"]["c"]).ravel() - 2.0])
  want_std = sigma * clip_norm
  assert abs(noise.std() / want_std - 1) < 0.03
  assert abs(noise.mean()) < 5 * want_std / np.sqrt(noise.size)
  # Leaves get different noise, and the same key gives the same noise.
  first = np.asarray(noisy["b"]["c"]).ravel()[:1000] - 2.0
  assert not np.allclose(np.asarray(noisy["a"])[:1000], first)
  again = privatize(tree, clip_norm, sigma, jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(again["a"]),
                                np.asarray(noisy["a"]))
  assert noisy["a"].dtype == jnp.float32


def test_privatize_under_vmap_over_sites():
  grad_sums = {"w": jnp.zeros((4, 50_000))}  # 4 sites.
  keys = jax.random.split(jax.random.key(1), 4)
  noisy = jax.jit(jax.vmap(clipping.privatize, in_axes=(0, None, None, 0)))(
      grad_sums, 1.0, 2.0, keys)
  for s in range(4):
    alone = clipping.privatize({"w": grad_sums["w"][s]}, 1.0, 2.0, keys[s])
    np.testing.assert_allclose(noisy["w"][s], alone["w"], rtol=1e-6)
    assert abs(np.std(np.asarray(noisy["w"][s])) / 2.0 - 1) < 0.03
  # Sites' noise is independent: no two rows alike.
  rows = np.asarray(noisy["w"])
  assert abs(np.corrcoef(rows)[0, 1]) < 0.05


def test_negative_arguments_rejected():
  loss_fn, params, batch = linear_problem()
  with pytest.raises(ValueError, match="clip_norm"):
    clipping.clipped_grad_sum(loss_fn, params, batch, -1.0)
  with pytest.raises(ValueError, match="noise_multiplier"):
    clipping.privatize(params, 1.0, -0.5, jax.random.key(0))
