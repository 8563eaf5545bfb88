"""The vmapped round against an independent NumPy per-site loop (manual MLP backprop)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from fedjax_lab import algorithms, sharding
from fedjax_lab.algorithms import fedavg
from fedjax_lab.client import (ClientConfig, make_client_update, minibatch_positions,
                               minibatch_schedule)
from fedjax_lab.data.federated import from_partition
from fedjax_lab.models import make_model


def _mlp(hidden=16, in_dim=6, classes=3):
  cfg = ml_collections.ConfigDict(dict(name="mlp", hidden=(hidden,), norm="none", dropout=0.0,
                                       features=(), image_shape=()))
  return make_model(cfg, classes, np.zeros((2, in_dim), np.float32))


def _numpy_sgd_step(p, x, y, lr, prox_mu=0.0, p0=None):
  """One SGD step of a 1-hidden-layer ReLU MLP with mean softmax cross-entropy, by hand."""
  w1, b1, w2, b2 = p
  h_pre = x @ w1 + b1
  h = np.maximum(h_pre, 0)
  logits = h @ w2 + b2
  z = logits - logits.max(1, keepdims=True)
  prob = np.exp(z) / np.exp(z).sum(1, keepdims=True)
  loss = -np.log(prob[np.arange(len(y)), y]).mean()
  d_logits = prob.copy()
  d_logits[np.arange(len(y)), y] -= 1
  d_logits /= len(y)
  g_w2, g_b2 = h.T @ d_logits, d_logits.sum(0)
  d_h = d_logits @ w2.T * (h_pre > 0)
  g_w1, g_b1 = x.T @ d_h, d_h.sum(0)
  grads = [g_w1, g_b1, g_w2, g_b2]
  if prox_mu:
    grads = [g + prox_mu * (a - a0) for g, a, a0 in zip(grads, p, p0)]
  return [a - lr * g for a, g in zip(p, grads)], loss


def _to_numpy(params):
  return [np.asarray(params["Dense_0"]["kernel"], np.float64),
          np.asarray(params["Dense_0"]["bias"], np.float64),
          np.asarray(params["Dense_1"]["kernel"], np.float64),
          np.asarray(params["Dense_1"]["bias"], np.float64)]


def _problem(seed=0, sizes=(3, 17, 40, 8, 25)):
  rng = np.random.RandomState(seed)
  n = sum(sizes)
  x = rng.randn(n, 6).astype(np.float32)
  y = rng.randint(0, 3, n).astype(np.int32)
  perm = rng.permutation(n)
  sites = np.split(perm, np.cumsum(sizes)[:-1])
  return x, y, [np.sort(s) for s in sites]


@pytest.mark.parametrize("prox_mu", [0.0, 0.5])
def test_vmapped_round_equals_numpy_per_site_loop(prox_mu):
  x, y, sites = _problem()
  data = from_partition(x, y, sites, 3)
  model = _mlp()
  params, ms = model.init(jax.random.key(0), x[:2])
  steps, batch, lr = 4, 5, 0.3
  client_update = make_client_update(model, optax.with_extra_args_support(optax.sgd(lr)),
                                     ClientConfig(steps, batch, shuffle=False, prox_mu=prox_mu))
  round_fn = jax.jit(fedavg.make_round(client_update, optax.sgd(1.0), cohort_size=5))
  state = fedavg.init_server_state(params, ms, optax.sgd(1.0), 5, False)
  key = jax.random.key(1)
  for _ in range(3):
    state, metrics = round_fn(state, data, key, key)

  # Reference: Python loop over sites, NumPy math, batches in stored order (wrapping around).
  glob = _to_numpy(params)
  for _ in range(3):
    deltas, losses = [], []
    for rows in sites:
      p = [a.copy() for a in glob]
      site_losses = []
      for t in range(steps):
        pos = [(t * batch + j) % len(rows) for j in range(batch)]
        p, loss = _numpy_sgd_step(p, x[rows[pos]].astype(np.float64), y[rows[pos]], lr,
                                  prox_mu, glob)
        site_losses.append(loss)
      deltas.append([a - g for a, g in zip(p, glob)])
      losses.append(np.mean(site_losses))
    w = np.array([len(s) for s in sites], np.float64)
    w /= w.sum()
    glob = [g + sum(wk * d[i] for wk, d in zip(w, deltas)) for i, g in enumerate(glob)]
  for got, want in zip(_to_numpy(state.params), glob):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(float(metrics.train_loss), np.dot(w, losses), rtol=1e-5)


def test_small_and_large_site_train_as_if_alone():
  """Padding to n_max=300 does not change a 3-example site's training, with shuffling."""
  rng = np.random.RandomState(0)
  x = rng.randn(303, 6).astype(np.float32)
  y = rng.randint(0, 3, 303).astype(np.int32)
  small, large = np.arange(3), np.arange(3, 303)
  model = _mlp()
  params, ms = model.init(jax.random.key(0), x[:2])
  update = jax.jit(make_client_update(model, optax.with_extra_args_support(optax.sgd(0.1)),
                                      ClientConfig(7, 5, shuffle=True, prox_mu=0.0)))
  together = from_partition(x, y, [small, large], 3)
  key = jax.random.key(3)
  for s, rows in enumerate([small, large]):
    alone = from_partition(x[rows], y[rows], [np.arange(len(rows))], 3)
    a = update(params, ms, together.idx[s], together.count[s], key, together)
    b = update(params, ms, alone.idx[0], alone.count[0], key, alone)
    assert together.idx.shape[1] == 300 and alone.idx.shape[1] == len(rows)
    for u, v in zip(jax.tree.leaves(a.delta), jax.tree.leaves(b.delta)):
      np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_shuffled_positions_cover_each_epoch_once():
  key = jax.random.key(0)
  count, batch = 7, 3
  pos = np.concatenate([np.asarray(minibatch_positions(key, t, count, 20, batch, True))
                        for t in range(7)])  # 21 positions = 3 epochs
  for e in range(3):
    assert sorted(pos[e * 7:(e + 1) * 7]) == list(range(7))
  assert not np.array_equal(pos[:7], pos[7:14])  # reshuffled each epoch


@pytest.mark.parametrize("steps,n_max,batch", [(1, 1, 1), (7, 20, 3), (5, 6, 8), (20, 15, 5),
                                              (3, 40, 32)])
def test_schedule_is_the_per_step_positions_bit_for_bit(steps, n_max, batch):
  """minibatch_schedule (every epoch's order drawn once, what the client update uses) equals
  minibatch_positions at each step, for every count up to n_max, batches that span 2+ epochs
  included, vmapped over sites as the round runs it."""
  counts = jnp.arange(1, n_max + 1, dtype=jnp.int32)
  keys = jax.random.split(jax.random.key(steps * 100 + n_max), n_max)
  per_step = jax.vmap(lambda k, c: jax.vmap(
      lambda t: minibatch_positions(k, t, c, n_max, batch, True))(jnp.arange(steps)))
  at_once = jax.vmap(lambda k, c: minibatch_schedule(k, steps, c, n_max, batch, True))
  np.testing.assert_array_equal(np.asarray(at_once(keys, counts)),
                                np.asarray(per_step(keys, counts)))
  np.testing.assert_array_equal(np.asarray(minibatch_schedule(keys[0], steps, 4, n_max, batch,
                                                              False)),
                                (np.arange(steps * batch) % 4).reshape(steps, batch))


def test_cohort_sampling_is_uniform_without_replacement():
  counts = np.zeros(20)
  for r in range(2000):
    c = np.asarray(fedavg.sample_cohort(jax.random.key(r), 20, 5))
    assert len(set(c)) == 5
    counts[c] += 1
  # Each site is picked with probability 5/20; binomial std over 2000 rounds is ~19.4.
  assert np.all(np.abs(counts - 500) < 5 * np.sqrt(2000 * 0.25 * 0.75))


def test_fused_rounds_equal_single_rounds():
  x, y, sites = _problem(1)
  data = from_partition(x, y, sites, 3)
  model = _mlp()
  params, ms = model.init(jax.random.key(0), x[:2])
  cu = make_client_update(model, optax.with_extra_args_support(optax.sgd(0.1)),
                          ClientConfig(2, 4, True, 0.0))
  server = optax.adam(0.01)
  round_fn = fedavg.make_round(cu, server, cohort_size=3)
  state = fedavg.init_server_state(params, ms, server, 5, False)
  key = jax.random.key(5)
  single = state
  for _ in range(4):
    single, _ = jax.jit(round_fn)(single, data, key, key)
  fused, metrics = jax.jit(algorithms.fuse_rounds(round_fn, 4))(state, data, key, key)
  assert metrics.train_loss.shape == (4,)
  for u, v in zip(jax.tree.leaves(single.params), jax.tree.leaves(fused.params)):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-6, atol=1e-7)


def test_eight_devices_equal_one_device():
  assert jax.device_count() == 8, "conftest sets 8 virtual CPU devices"
  x, y, sites = _problem(2, sizes=(5, 9, 12, 3, 20, 7, 11, 6, 4, 10))
  data = from_partition(x, y, sites, 3)
  model = _mlp()
  params, ms = model.init(jax.random.key(0), x[:2])
  cu = make_client_update(model, optax.with_extra_args_support(optax.sgd(0.1)),
                          ClientConfig(3, 4, True, 0.0))
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = sharding.make_mesh(devices)
    round_fn = jax.jit(fedavg.make_round(cu, optax.sgd(1.0), cohort_size=8, mesh=mesh,
                                         min_sites_per_device=1))
    state = sharding.put_replicated(
        fedavg.init_server_state(params, ms, optax.sgd(1.0), 10, False), mesh)
    d = sharding.put_replicated(data, mesh)
    for _ in range(3):
      state, _ = round_fn(state, d, jax.random.key(1), jax.random.key(2))
    results.append(state.params)
  for u, v in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-5, atol=1e-6)


def test_curvature_probes_differ_across_sites_and_rounds():
  """ESGD's Rademacher probes come from the site's round key: two sites holding the same
  examples, with batches in stored order, get the same update only when their keys match."""
  from fedjax_lab import optim  # pylint: disable=g-import-not-at-top
  x, y, _ = _problem()
  data = from_partition(x, y, [np.arange(12), np.arange(12)], num_classes=3)
  model = _mlp()
  params, model_state = model.init(jax.random.key(0), x[:2])
  update = make_client_update(model, optim.make_optimizer("esgd", 0.05),
                              ClientConfig(local_steps=3, batch_size=12, shuffle=False,
                                           prox_mu=0.0))
  run = lambda site, key: update(params, model_state, data.idx[site], data.count[site],
                                 jax.random.key(key), data).delta
  jax.tree.map(np.testing.assert_array_equal, run(0, 1), run(1, 1))
  differ = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(), run(0, 1), run(1, 2)))
  assert max(differ) > 1e-4
  # The plain-SGD update of the same sites ignores the key entirely (batches in stored order).
  sgd = make_client_update(model, optim.make_optimizer("sgd", 0.05),
                           ClientConfig(local_steps=3, batch_size=12, shuffle=False, prox_mu=0.0))
  jax.tree.map(np.testing.assert_array_equal,
               sgd(params, model_state, data.idx[0], data.count[0], jax.random.key(1), data).delta,
               sgd(params, model_state, data.idx[1], data.count[1], jax.random.key(2), data).delta)


@pytest.mark.parametrize("devices,chunk", [(1, 5), (8, 3), (8, 0), (None, 4)])
def test_map_sum_sites_equals_vmap_and_sum(devices, chunk):
  """Sites chunked per device (37 sites: divisible by neither 8 devices nor the chunk), with
  shared, mapped and pytree arguments, give what one vmap gives."""
  mesh = None if devices is None else sharding.make_mesh(jax.devices()[:devices])

  def fn(shared, site, extra, tree):
    return {"a": jnp.tanh(shared @ site) * extra, "b": tree["w"].sum() + extra}, site[:2]

  rng = np.random.RandomState(0)
  shared = rng.randn(4, 6).astype(np.float32)
  site = rng.randn(37, 6).astype(np.float32)
  extra = np.arange(37, dtype=np.float32)
  tree = {"w": rng.randn(3, 2).astype(np.float32)}
  in_axes = (None, 0, 0, None)
  want = jax.vmap(fn, in_axes=in_axes)(shared, site, extra, tree)
  per_site_only = lambda *a: ({}, fn(*a))
  _, got = jax.jit(sharding.map_sum_sites(per_site_only, in_axes, mesh, chunk))(
      shared, site, extra, tree)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-6), got, want)
  # The summed part: the chunks' padding (copies of the last site) adds nothing.
  summed = lambda *a: ({"a": fn(*a)[0]["a"], "n": jnp.int32(1)}, fn(*a)[1])
  total, per_site = jax.jit(sharding.map_sum_sites(summed, in_axes, mesh, chunk))(
      shared, site, extra, tree)
  np.testing.assert_allclose(total["a"], np.asarray(want[0]["a"]).sum(0), rtol=1e-5, atol=1e-5)
  assert int(total["n"]) == 37
  np.testing.assert_allclose(per_site, want[1], rtol=1e-6)


@pytest.mark.parametrize("overrides", [
    {"min_sites_per_device": 1},                          # 4 sites a device, chunks of 3
    {"min_sites_per_device": 1, "algorithm.name": "scaffold"},
    {"dp.level": "site", "dp.noise_multiplier": 1.0, "dp.adaptive_clip": True,
     "dp.count_noise_multiplier": 5.0, "min_sites_per_device": 1},
    {"dp.level": "example", "dp.noise_multiplier": 1.0},  # replicated: 32 sites, chunks of 3
    {"model.name": "cnn", "model.norm": "batch", "model.features": (4,),
     "algorithm.batch_stats": "local", "min_sites_per_device": 1},
])
def test_chunked_sites_train_as_one_vmap(overrides):
  from test_experiment import tiny_config  # pylint: disable=g-import-not-at-top
  from fedjax_lab.experiment import Experiment  # pylint: disable=g-import-not-at-top
  params = []
  for chunk in (0, 3):
    c = tiny_config(**{"data.num_sites": 40, "cohort_size": 32, "sites_per_chunk": chunk,
                       **overrides})
    exp = Experiment(c)
    state = exp.run_rounds(exp.init_state(), 2)
    params.append(state.params)
  for u, v in zip(jax.tree.leaves(params[0]), jax.tree.leaves(params[1])):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-5, atol=1e-6)
