"""Tests for fedjax_lab.optim: numbers against NumPy references and closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from fedjax_lab import optim
from fedjax_lab.errors import ArgumentError, ConfigError, config_keys
from fedjax_lab.optim import hessian
from fedjax_lab.optim.adahessian import adahessian
from fedjax_lab.optim.esgd import esgd
from fedjax_lab.optim.esgd import scale_by_esgd
from fedjax_lab.privacy import randomness

# --- Problems with a known Hessian. ---


def _diagonally_dominant_spd(n, seed):
  """Dense symmetric A, |off-diagonal| <= 0.1, diagonal in [2, 4]: SPD."""
  rng = np.random.default_rng(seed)
  off = rng.uniform(-0.1, 0.1, size=(n, n))
  a = np.triu(off, 1)
  a = a + a.T + np.diag(rng.uniform(2.0, 4.0, size=n))
  assert np.all(np.linalg.eigvalsh(a) > 0)
  return a


def _tree_quadratic(a):
  """0.5 x^T A x over a two-leaf pytree whose ravel is x (len 10)."""
  template = {"a": jnp.zeros(4), "b": jnp.zeros((2, 3))}
  _, unravel = ravel_pytree(template)
  a = jnp.asarray(a, jnp.float32)

  def obj_fn(params):
    x = ravel_pytree(params)[0]
    return 0.5 * x @ a @ x

  return obj_fn, unravel


def test_hutchinson_diagonal_of_quadratic_within_2_percent():
  a = _diagonally_dominant_spd(10, seed=0)
  obj_fn, unravel = _tree_quadratic(a)
  params = unravel(jnp.asarray(np.random.default_rng(1).normal(size=10),
                               jnp.float32))
  estimate = hessian.hutchinson_diagonal(
      obj_fn, params, jax.random.key(0), num_probes=1000)
  estimate = np.asarray(ravel_pytree(estimate)[0])
  np.testing.assert_allclose(estimate, np.diag(a), rtol=0.02)


def test_hvp_is_matrix_vector_product():
  a = _diagonally_dominant_spd(10, seed=2)
  obj_fn, unravel = _tree_quadratic(a)
  v = np.random.default_rng(3).normal(size=10)
  hv = hessian.hvp(obj_fn, unravel(jnp.zeros(10)),
                   unravel(jnp.asarray(v, jnp.float32)))
  np.testing.assert_allclose(ravel_pytree(hv)[0], a @ v, rtol=1e-5)


def test_rademacher_probes_are_signs_shaped_like_params():
  tree = {"k": jnp.zeros((3, 3, 2, 4)), "b": jnp.zeros(4, jnp.bfloat16)}
  probes = hessian.rademacher_like(jax.random.key(0), tree)
  assert probes["k"].shape == (3, 3, 2, 4)
  assert probes["b"].dtype == jnp.bfloat16
  values = np.asarray(probes["k"]).ravel()
  assert set(np.unique(values)) == {-1.0, 1.0}
  assert abs(values.mean()) < 0.3


def test_esgd_running_statistic_matches_sqrt_diag_h_squared():
  # Not diagonally dominant, so sqrt(diag(H^2)) differs from |diag(H)| and the
  # test can tell the equilibration statistic from the Hutchinson one.
  rng = np.random.default_rng(4)
  b = rng.normal(size=(10, 10))
  a = b @ b.T / 10 + 0.5 * np.eye(10)
  expected = np.sqrt(np.diag(a @ a))
  assert np.max(np.abs(expected / np.abs(np.diag(a)) - 1)) > 0.1
  obj_fn, unravel = _tree_quadratic(a)
  params = unravel(jnp.asarray(rng.normal(size=10), jnp.float32))
  # b2=None: the running (arithmetic) average over every probe so far.
  tx = scale_by_esgd(b1=0.0, b2=None, update_interval=1, warmup_steps=0)
  grads = jax.tree.map(jnp.zeros_like, params)

  def step(state, _):
    _, state = tx.update(grads, state, params, obj_fn=obj_fn)
    return state, None

  state, _ = jax.lax.scan(step, tx.init(params), None, length=4000)
  assert int(state.curvature_count) == 4000
  got = np.sqrt(np.asarray(ravel_pytree(state.nu)[0]))
  np.testing.assert_allclose(got, expected, rtol=0.03)


# --- One-update equality with NumPy references, on a non-quadratic objective.
# f(x) = 0.5 x^T A x + sum(cos x) + c.x over params {kernel [3,3,2,4], bias [4]};
# H = A - diag(cos x) is dense and varies with x.


def _nonquadratic_problem(seed):
  rng = np.random.default_rng(seed)
  template = {"kernel": np.zeros((3, 3, 2, 4)), "bias": np.zeros(4)}
  x0, unravel = ravel_pytree(jax.tree.map(jnp.asarray, template))
  n = x0.size
  b = rng.normal(size=(n, n)) / np.sqrt(n)
  a = b @ b.T + np.diag(rng.uniform(0.5, 2.0, size=n))
  c = rng.normal(size=n)
  x = rng.normal(size=n)
  v = rng.choice([-1.0, 1.0], size=n)

  def obj_fn(params):
    y = ravel_pytree(params)[0]
    return 0.5 * y @ jnp.asarray(a) @ y + jnp.sum(jnp.cos(y)) + jnp.asarray(
        c) @ y

  numpy_grad = lambda y: a @ y - np.sin(y) + c
  numpy_hessian = lambda y: a - np.diag(np.cos(y))
  return obj_fn, unravel, a, c, x, v, numpy_grad, numpy_hessian


def _run_jax(tx, obj_fn, unravel, x, steps):
  params = unravel(jnp.asarray(x))
  state = tx.init(params)
  for _ in range(steps):
    grads = jax.grad(obj_fn)(params)
    updates, state = tx.update(grads, state, params, obj_fn=obj_fn)
    params = optax.apply_updates(params, updates)
  return np.asarray(ravel_pytree(params)[0])


@pytest.mark.parametrize(
    "hp",
    [
        # INR-paper variant: momentum, EMA of (Hv)^2, refresh every 2nd step.
        dict(b1=0.9, b2=0.999, eps=1e-4, weight_decay=0.01, update_interval=2,
             warmup_steps=0),
        # Dauphin et al.: no momentum, arithmetic mean, warmup then interval 3.
        dict(b1=0.0, b2=None, eps=1e-3, weight_decay=0.0, update_interval=3,
             warmup_steps=2),
    ],
)
def test_esgd_updates_match_numpy_reference(hp):
  lr, steps = 0.1, 4
  with jax.enable_x64(True):
    obj_fn, unravel, _, _, x, v, grad, hess = _nonquadratic_problem(5)
    probes = unravel(jnp.asarray(v))
    tx = esgd(lr, probe_fn=lambda key, params: probes, **hp)
    got = _run_jax(tx, obj_fn, unravel, x, steps)

  m = np.zeros_like(x)
  nu = np.zeros_like(x)
  n = 0
  for t in range(steps):
    g = grad(x)
    if t < hp["warmup_steps"] or t % hp["update_interval"] == 0:
      hv2 = (hess(x) @ v) ** 2
      n += 1
      if hp["b2"] is None:
        nu = nu + (hv2 - nu) / n
      else:
        nu = hp["b2"] * nu + (1 - hp["b2"]) * hv2
    m = hp["b1"] * m + (1 - hp["b1"]) * g
    m_hat = m / (1 - hp["b1"] ** (t + 1))
    nu_hat = nu if hp["b2"] is None else nu / (1 - hp["b2"] ** n)
    x = x - lr * (m_hat / (np.sqrt(nu_hat) + hp["eps"])
                  + hp["weight_decay"] * x)
  np.testing.assert_allclose(got, x, rtol=0, atol=1e-6)


@pytest.mark.parametrize("spatial_averaging", [True, False])
@pytest.mark.parametrize("update_interval", [1, 2])
def test_adahessian_updates_match_numpy_reference(spatial_averaging,
                                                  update_interval):
  lr, b1, b2, eps, wd, k, steps = 0.15, 0.9, 0.999, 1e-4, 0.01, 0.8, 3
  with jax.enable_x64(True):
    obj_fn, unravel, _, _, x, v, grad, hess = _nonquadratic_problem(6)
    probes = unravel(jnp.asarray(v))
    tx = adahessian(lr, b1=b1, b2=b2, eps=eps, weight_decay=wd,
                    hessian_power=k, update_interval=update_interval,
                    spatial_averaging=spatial_averaging,
                    probe_fn=lambda key, params: probes)
    got = _run_jax(tx, obj_fn, unravel, x, steps)

  def magnitude(diag):
    # ravel_pytree orders leaves by key: bias [4], then kernel [3, 3, 2, 4].
    bias, kernel = np.abs(diag[:4]), np.abs(diag[4:]).reshape(3, 3, 2, 4)
    if spatial_averaging:
      kernel = np.broadcast_to(kernel.mean(axis=(0, 1)), kernel.shape)
    return np.concatenate([bias, kernel.ravel()])

  m = np.zeros_like(x)
  nu = np.zeros_like(x)
  n = 0
  for t in range(steps):
    g = grad(x)
    if t % update_interval == 0:
      d = magnitude(v * (hess(x) @ v))
      nu = b2 * nu + (1 - b2) * d**2
      n += 1
    m = b1 * m + (1 - b1) * g
    denom = np.sqrt(nu / (1 - b2**n)) ** k + eps
    x = x - lr * (m / (1 - b1 ** (t + 1)) / denom + wd * x)
  np.testing.assert_allclose(got, x, rtol=0, atol=1e-6)


def test_one_probe_adahessian_equals_every_step_esgd():
  # With one Rademacher probe, (v * Hv)^2 = (Hv)^2 because v^2 = 1: AdaHessian's
  # EMA of the squared Hutchinson estimate IS ESGD's equilibration statistic.
  # Without spatial averaging and with the same refresh schedule and probes,
  # the two optimizers must take identical steps (a sharp edge worth pinning).
  obj_fn, unravel, _, _, x, _, _, _ = _nonquadratic_problem(10)
  common = dict(b1=0.9, b2=0.999, eps=1e-4, update_interval=1, seed=3)
  got_esgd = _run_jax(esgd(0.1, warmup_steps=0, **common), obj_fn, unravel,
                      x.astype(np.float32), 3)
  got_ada = _run_jax(adahessian(0.1, spatial_averaging=False, **common),
                     obj_fn, unravel, x.astype(np.float32), 3)
  np.testing.assert_allclose(got_esgd, got_ada, rtol=1e-6, atol=1e-6)


def test_spatial_average_conv_kernel_over_kh_kw():
  rng = np.random.default_rng(7)
  kernel = rng.normal(size=(3, 3, 5, 2))
  got = np.asarray(hessian.spatial_average(jnp.asarray(kernel)))
  # Reference in the PyTorch layout [cout, cin, kh, kw], dims (2, 3).
  torch_layout = np.transpose(kernel, (3, 2, 0, 1))
  mean = np.abs(torch_layout).mean(axis=(2, 3))  # [cout, cin]
  expected = np.broadcast_to(mean.T[None, None], kernel.shape)
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  dense = rng.normal(size=(4, 3))
  np.testing.assert_allclose(hessian.spatial_average(jnp.asarray(dense)),
                             np.abs(dense), rtol=1e-6)


# --- Registry. ---


def _site_problem(num_sites=3):
  rng = np.random.default_rng(8)
  x = jnp.asarray(rng.normal(size=(num_sites, 16, 3)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(num_sites, 16, 2)), jnp.float32)
  params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}

  def loss(params, x, y):
    return jnp.mean((jnp.tanh(x @ params["w"] + params["b"]) - y) ** 2)

  return params, x, y, loss


def _local_steps(tx, loss, steps=3):
  """One site's local update: lax.scan over steps, as client.py does."""

  def run(params, x, y):
    def step(carry, _):
      params, state = carry
      obj_fn = lambda p: loss(p, x, y)
      grads = jax.grad(obj_fn)(params)
      updates, state = tx.update(grads, state, params, obj_fn=obj_fn)
      return (optax.apply_updates(params, updates), state), obj_fn(params)

    (params, _), losses = jax.lax.scan(
        step, (params, tx.init(params)), None, length=steps)
    return params, losses

  return run


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_every_optimizer_runs_in_jit_vmap_and_scan(name):
  params, x, y, loss = _site_problem()
  tx = optim.make_optimizer(name, 0.05)
  assert isinstance(tx, optax.GradientTransformationExtraArgs)
  run = _local_steps(tx, loss)
  out, losses = jax.jit(jax.vmap(run, in_axes=(None, 0, 0)))(params, x, y)
  assert losses.shape == (3, 3)
  for leaf in jax.tree.leaves(out):
    assert np.all(np.isfinite(leaf))
  # The vmapped sites equal separate runs (no cross-site leakage).
  for site in range(3):
    alone, _ = jax.jit(run)(params, x[site], y[site])
    for a, b in zip(jax.tree.leaves(alone), jax.tree.leaves(out)):
      np.testing.assert_allclose(b[site], a, rtol=1e-5, atol=1e-6)
  moved = sum(float(jnp.sum(jnp.abs(leaf))) for leaf in jax.tree.leaves(out))
  assert moved > 0


@pytest.mark.parametrize("name", ["esgd", "adahessian", "sophia"])
@pytest.mark.parametrize("impl", ["threefry2x32", "chacha20"])
def test_reseed_probes_gives_each_site_its_own_probes(name, impl):
  """chacha20: a site key under dp.randomness=secret; the state keeps its threefry shape."""
  params, _, _, _ = _site_problem()
  tx = optim.make_optimizer(name, 0.1)
  root = randomness.secret_key(range(8)) if impl == "chacha20" else jax.random.key(0)
  keys = jax.random.split(root, 3)
  states = jax.vmap(lambda k: optim.reseed_probes(tx.init(params), k))(keys)
  probe_keys = [leaf for leaf in jax.tree.leaves(states)
                if leaf.dtype == jnp.uint32]
  assert len(probe_keys) == 1 and probe_keys[0].shape == (3, 2)
  assert len({tuple(np.asarray(k)) for k in probe_keys[0]}) == 3
  # The states still step (split_probe_key reads the data as threefry).
  updates, _ = jax.vmap(lambda st: tx.update(jax.tree.map(jnp.ones_like, params), st, params,
                                             obj_fn=lambda p: sum(jnp.sum(l ** 2) for l in
                                                                  jax.tree.leaves(p))))(states)
  assert all(np.all(np.isfinite(l)) for l in jax.tree.leaves(updates))


def test_curvature_optimizers_descend_on_a_quadratic():
  a = _diagonally_dominant_spd(10, seed=9)
  obj_fn, unravel = _tree_quadratic(a)
  params0 = unravel(jnp.ones(10))
  for name, lr in [("esgd", 0.1), ("adahessian", 0.1), ("sophia", 0.1)]:
    tx = optim.make_optimizer(name, lr)

    def step(carry, _, tx=tx):
      params, state = carry
      updates, state = tx.update(jax.grad(obj_fn)(params), state, params,
                                 obj_fn=obj_fn)
      return (optax.apply_updates(params, updates), state), None

    (params, _), _ = jax.jit(lambda c, step=step: jax.lax.scan(
        step, c, None, length=50))((params0, tx.init(params0)))
    assert float(obj_fn(params)) < 0.05 * float(obj_fn(params0)), name


def test_sam_alternates_ascent_and_descent():
  # Documented meaning of one update call for sam: odd calls ascend.
  obj_fn = lambda p: 0.5 * jnp.sum(p["w"] ** 2)
  params = {"w": jnp.array([3.0, 4.0])}
  tx = optim.make_optimizer("sam", 0.1, rho=0.5)
  state = tx.init(params)
  up, state = tx.update(jax.grad(obj_fn)(params), state, params, obj_fn=obj_fn)
  ascended = optax.apply_updates(params, up)
  np.testing.assert_allclose(ascended["w"], [3.3, 4.4], rtol=1e-6)
  up, state = tx.update(jax.grad(obj_fn)(ascended), state, ascended,
                        obj_fn=obj_fn)
  descended = optax.apply_updates(ascended, up)
  np.testing.assert_allclose(descended["w"], [3.0 - 0.33, 4.0 - 0.44],
                             rtol=1e-6)
  assert optim.local_steps_multiple("sam") == 2
  assert optim.local_steps_multiple("adam") == 1


def test_sam_zero_gradient_stays_finite():
  params = {"w": jnp.ones(3)}
  tx = optim.make_optimizer("sam", 0.1)
  up, _ = tx.update({"w": jnp.zeros(3)}, tx.init(params), params, obj_fn=None)
  assert np.all(np.isfinite(up["w"]))


def test_registry_defaults_and_alias():
  tx_alias = optim.make_optimizer("esgd", 0.1, hessian_update_every=3)
  tx_plain = optim.make_optimizer("esgd", 0.1, update_interval=3)
  params = {"w": jnp.ones(2)}
  obj_fn = lambda p: jnp.sum(p["w"] ** 4)
  g = jax.grad(obj_fn)(params)
  u1, _ = tx_alias.update(g, tx_alias.init(params), params, obj_fn=obj_fn)
  u2, _ = tx_plain.update(g, tx_plain.init(params), params, obj_fn=obj_fn)
  np.testing.assert_array_equal(u1["w"], u2["w"])
  assert set(optim.CURVATURE_OPTIMIZERS) == {"sophia", "esgd", "adahessian"}
  assert set(optim.HYPERPARAMETERS) == set(optim.OPTIMIZERS)


@pytest.mark.parametrize(
    "call, argument",
    [
        (lambda: optim.make_optimizer("adamax", 0.1), "optimizer"),
        (lambda: optim.make_optimizer("adam", 0.0), "lr"),
        (lambda: optim.make_optimizer("adam", -1.0), "lr"),
        (lambda: optim.make_optimizer("adam", 0.1, rho=0.1), "optimizer_args.rho"),
        (lambda: optim.make_optimizer("esgd", 0.1, b1=1.5), "optimizer_args.b1"),
        (lambda: optim.make_optimizer("esgd", 0.1, update_interval=0),
         "optimizer_args.update_interval"),
        (lambda: optim.make_optimizer("adahessian", 0.1, hessian_power=2.0),
         "optimizer_args.hessian_power"),
        (lambda: optim.make_optimizer("sam", 0.1, sync_period=1), "optimizer_args.sync_period"),
        (lambda: optim.make_optimizer("esgd", 0.1, update_interval=2,
                                      hessian_update_every=3),
         "optimizer_args.hessian_update_every"),
    ],
)
def test_bad_arguments_name_the_argument_and_the_config_layer_names_the_key(call, argument):
  """The library names its argument (a ValueError); under errors.config_keys the config
  layer names the key it came from, e.g. server.optimizer_args.rho."""
  with pytest.raises(ArgumentError) as info:
    call()
  assert isinstance(info.value, ValueError) and info.value.argument == argument
  assert "\n" not in str(info.value)
  with pytest.raises(ConfigError) as info:
    with config_keys("server"):
      call()
  assert info.value.key == f"server.{argument}"


def test_unknown_name_lists_allowed():
  with pytest.raises(ArgumentError, match="allowed: sgd, momentum, adam"):
    optim.make_optimizer("adamax", 0.1)


@pytest.mark.parametrize("name", ["esgd", "adahessian", "sophia"])
def test_example_dp_with_curvature_and_no_public_data_is_a_config_error(name):
  for public_data in (None, ""):
    with pytest.raises(ConfigError) as info:
      optim.check_dp_compatible(name, "example", public_data,
                                "client.optimizer")
    message = str(info.value)
    assert info.value.key == "client.optimizer"
    assert "\n" not in message
    assert "Hessian-vector product on private data" in message
    assert "optim.public_data" in message and "adam" in message


def test_dp_compatible_cases_pass():
  optim.check_dp_compatible("esgd", "example", "public_digits", "client.opt")
  optim.check_dp_compatible("adahessian", "none", None, "client.optimizer")
  # Site-level DP clips and noises the whole site update: client curvature is inside it.
  for name in optim.CURVATURE_OPTIMIZERS:
    optim.check_dp_compatible(name, "site", None, "client.optimizer")
  for name in set(optim.OPTIMIZERS) - optim.CURVATURE_OPTIMIZERS:
    optim.check_dp_compatible(name, "example", None, "client.optimizer")
    optim.check_server_optimizer(name, None)


@pytest.mark.parametrize("name", ["esgd", "adahessian", "sophia"])
def test_server_curvature_optimizer_without_public_data_is_a_config_error(name):
  with pytest.raises(ConfigError) as info:
    optim.check_server_optimizer(name, None)
  assert info.value.key == "server.optimizer"
  assert "\n" not in str(info.value) and "adam" in str(info.value)
  optim.check_server_optimizer(name, "holdout:0.2")
