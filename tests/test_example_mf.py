"""Example-level DP-SGD with matrix-factorization noise (dp.level=example, dp.mechanism tree /
blt / banded / dense: privacy/mechanism.py), each number against an independent reference: a
site's per-step noise against a NumPy solve of C^{-1} W with C materialized by jax_privacy (or
built in NumPy for the tree), the cyclic batches against a brute-force count of every example's
participations, the epsilon against dp_accounting on the brute-force sensitivity, bit-exact
resume, accuracy on digits, and one-line config errors."""

import itertools
import math
import types

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dp_accounting import rdp
from jax_privacy.matrix_factorization import buffered_toeplitz, toeplitz
from test_experiment import assert_exits_2_with_one_line, crash_during_step, tiny_config

from fedjax_lab import client
from fedjax_lab.experiment import Experiment
from fedjax_lab.privacy import mf_noise, sampling


def brute_force_sensitivity(C: np.ndarray, min_sep: int, max_part: int) -> float:
  """max ||C u|| over every 0/1 vector u with at most max_part ones, any two >= min_sep
  apart: the steps one example may join."""
  n, best = C.shape[0], 0.0
  for k in range(1, max_part + 1):
    for steps in itertools.combinations(range(n), k):
      if all(b - a >= min_sep for a, b in zip(steps, steps[1:])):
        u = np.zeros(n)
        u[list(steps)] = 1.0
        best = max(best, float(np.linalg.norm(C @ u)))
  return best


def reference_matrix(s: mf_noise.Strategy) -> np.ndarray:
  """C from jax_privacy's own materialization (blt, banded), the stored matrix (dense), or the
  dyadic tree built here: node s covers steps (s - 2^tz(s), s]."""
  n = s.num_rounds
  with jax.enable_x64(True):
    if s.name == "blt":
      blt = buffered_toeplitz.BufferedToeplitz(
          buf_decay=jnp.asarray(s.arrays["buf_decay"], jnp.float64),
          output_scale=jnp.asarray(s.arrays["output_scale"], jnp.float64))
      return np.asarray(blt.materialize(n), np.float64)
    if s.name == "banded":
      return np.asarray(toeplitz.materialize_lower_triangular(
          jnp.asarray(s.arrays["coefs"], jnp.float64), n), np.float64)
  if s.name == "dense":
    return s.arrays["matrix"].astype(np.float64)
  C = np.zeros((n, n))
  for row in range(n):
    t = row + 1
    size = t & -t
    C[row, t - size:t] = 1.0
  return C


# --- the cyclic batches ------------------------------------------------------------------------

@pytest.mark.parametrize("count, batch, steps", [(23, 5, 30), (10, 10, 7), (40, 3, 50)])
def test_cyclic_batches_participation_brute_force(count, batch, steps):
  """Every step's batch holds `batch` distinct real examples; each example joins at most
  ceil(T / k) of the T steps, any two at least k = count // batch apart; the same positions
  whatever the padded width."""
  k = count // batch
  rng = jax.random.key(3)
  batches = np.stack([np.asarray(sampling.cyclic_batch(rng, count, 64, batch, t))
                      for t in range(steps)])
  padded = np.stack([np.asarray(sampling.cyclic_batch(rng, count, 97, batch, t))
                     for t in range(steps)])
  np.testing.assert_array_equal(batches, padded)
  joined = {}
  for t, rows in enumerate(batches):
    assert len(set(rows.tolist())) == batch and rows.max() < count and rows.min() >= 0
    for r in rows.tolist():
      joined.setdefault(r, []).append(t)
  for r, ts in joined.items():
    assert len(ts) <= math.ceil(steps / k), r
    assert all(b - a >= k for a, b in zip(ts, ts[1:])), r
  assert len(joined) == k * batch  # every example of the k full batches is used


# --- the per-step noise of one site ----------------------------------------------------------

ROUNDS_U, LOCAL_U, BATCH_U, COUNT_U = 3, 4, 2, 7   # T = 12 steps, k = 3 batches


@pytest.mark.parametrize("name", ["blt", "banded", "tree", "dense"])
def test_site_noise_is_c_inverse_w_over_all_its_steps(name):
  """A site whose clipped gradients are zero: each step's gradient times batch_size is its
  noise z_t, threaded through the client update over 3 rounds of 4 local steps as the round
  threads it (state out of one round into the next). Z equals C^{-1} W, solved in NumPy from
  C materialized by jax_privacy, with W's rows drawn from the step keys; C Z / std is white."""
  T = ROUNDS_U * LOCAL_U
  k = COUNT_U // BATCH_U
  s = mf_noise.strategy(name, T, bands=2 if name == "banded" else None, min_separation=k,
                        max_participations=math.ceil(T / k))
  params = {"w": jnp.zeros((40, 5), jnp.float32), "b": jnp.zeros((5,), jnp.float32)}
  zero = lambda p, x, y, mask, clip: (jax.tree.map(jnp.zeros_like, p), None,
                                      jnp.zeros(mask.shape))
  z_mult, clip = 1.3, 0.7
  dp = client.ExampleDP(clip_norm=clip, noise_multiplier=z_mult, max_batch=BATCH_U,
                        clipped_grad_sum=zero, fixed_divisor=float(BATCH_U),
                        correlated=mf_noise.correlated_noise(s))
  data = types.SimpleNamespace(x=jnp.zeros((COUNT_U, 3)), y=jnp.zeros((COUNT_U,), jnp.int32))
  grad = client.make_site_gradient(None, BATCH_U, True, dp)
  import optax
  update = client.make_local_update(grad, optax.sgd(1.0), LOCAL_U, batch_size=BATCH_U,
                                    private=True)
  idx, count, perm = jnp.arange(COUNT_U), jnp.int32(COUNT_U), jax.random.key(9)
  state = dp.correlated.init(params)
  Z, W, deltas = [], [], []
  for r in range(ROUNDS_U):
    rng = jax.random.key(100 + r)
    st = state
    for t in range(LOCAL_U):
      g = grad(params, {}, idx, count, rng, t, data, noise=(perm, st))
      st = g.noise_state
      Z.append(np.concatenate([np.asarray(a, np.float64).ravel() * BATCH_U
                               for a in jax.tree.leaves(g.grads)]))
      key = jax.random.fold_in(jax.random.fold_in(client.site_step_keys(rng)[1], t), 1)
      keys = jax.random.split(key, len(jax.tree.leaves(params)))
      W.append(np.concatenate([
          np.asarray(jnp.float32(z_mult * clip) * jax.random.normal(kk, a.shape, jnp.float32),
                     np.float64).ravel() for kk, a in zip(keys, jax.tree.leaves(params))]))
    out = update(params, {}, idx, count, rng, data, noise=(perm, state))
    np.testing.assert_array_equal(np.asarray(out.noise_state.round), (r + 1) * LOCAL_U)
    for a, b in zip(jax.tree.leaves(out.noise_state), jax.tree.leaves(st)):  # scan vs eager
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    deltas.append(np.concatenate([np.asarray(a, np.float64).ravel()
                                  for a in jax.tree.leaves(out.delta)]))
    state = out.noise_state
  Z, W = np.stack(Z), np.stack(W)
  C = reference_matrix(s)
  want = np.linalg.solve(C, W)
  np.testing.assert_allclose(Z, want, rtol=0, atol=3e-5 * np.abs(want).max())
  # SGD lr 1 on zero gradients: a round's update is minus its steps' noise over batch_size.
  for r, d in enumerate(deltas):
    np.testing.assert_allclose(d, -want[r * LOCAL_U:(r + 1) * LOCAL_U].sum(0) / BATCH_U,
                               rtol=0, atol=1e-4 * np.abs(want).max())
  white = C @ Z / (z_mult * clip)
  np.testing.assert_allclose(white.std(axis=1), 1.0, atol=0.15)


# --- end to end --------------------------------------------------------------------------------

def example_config(name="blt", **overrides):
  return tiny_config(**{"dp.level": "example", "dp.mechanism": name, "data.num_sites": 10,
                        "cohort_size": 10, "rounds": 4, "client.local_steps": 3,
                        "client.batch_size": 30, **overrides})


@pytest.mark.parametrize("name", ["blt", "tree"])
def test_epsilon_from_brute_force_sensitivity_and_dp_accounting(name, tmp_path):
  """Calibrated to epsilon 3: k is the smallest site's size // batch_size (from the data's
  counts), T = rounds x local_steps; the run's epsilon and every row's is dp_accounting's
  Gaussian(z / brute-force sensitivity of C, materialized independently) at the row's
  accountant_delta, within the target; each row's own fields recompute it; every site's noise
  row says what it sees."""
  exp = Experiment(example_config(name, **{"dp.target_epsilon": 3.0}))
  summary = exp.run(str(tmp_path))
  T = 4 * 3
  k = int(np.asarray(exp.data.count).min()) // 30
  parts = math.ceil(T / k)
  sens = brute_force_sensitivity(reference_matrix(exp.privacy.mf.strategy), k, parts)
  z = summary["privacy"]["noise_multiplier"]
  rows = summary["privacy"]["guarantees"]
  acc_delta = rows[0]["accountant_delta"]
  assert 0 < acc_delta <= 1e-5
  want = rdp.RdpAccountant().compose(dp_accounting.GaussianDpEvent(z / sens)).get_epsilon(
      acc_delta)
  assert summary["epsilon"] >= want * (1 - 1e-6)
  assert summary["epsilon"] <= 3.0 * (1 + 1e-6)
  if name == "blt":
    assert summary["epsilon"] == pytest.approx(want, rel=1e-5)
  for r in rows:
    assert set(r) >= {"adversary", "sees", "colluding_sites", "noise_multiplier",
                      "sampling_prob", "steps", "accountant", "accountant_delta", "epsilon"}
    assert r["sampling_prob"] == 1.0 and r["sees"] in ("models", "updates")
    if r["epsilon"] is None:
      assert r["noise_multiplier"] == 0.0
      continue
    fields = rdp.RdpAccountant().compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.GaussianDpEvent(r["noise_multiplier"]), r["steps"])).get_epsilon(
            r["accountant_delta"])
    assert r["epsilon"] == pytest.approx(fields, rel=1e-6)
    assert r["epsilon"] >= want * (1 - 1e-6)  # tree: the lab's bound may only over-state
  assert any(r["sees"] == "updates" and r["adversary"].startswith("the server") for r in rows)


def test_every_site_counts_its_steps_and_cohorts_train_their_own(tmp_path):
  """Cohorts of 4 of 10 sites: each site's noise state advanced local_steps per round it
  trained, and the counters add up to rounds x cohort x local_steps."""
  exp = Experiment(example_config("banded", **{"cohort_size": 4, "dp.noise_multiplier": 2.0,
                                               "dp.bands": 3}))
  state = exp.init_state()
  state = exp.run_rounds(state, 4)
  steps = np.asarray(state.site_noise.round)
  assert steps.shape == (10,) and np.all(steps % 3 == 0)
  assert steps.sum() == 4 * 4 * 3


def test_blt_example_level_resumes_bit_exact_after_a_crash(tmp_path):
  """Checkpoints every 2 rounds; the run dies in round 3 and is rerun: its parameters equal
  an uninterrupted run's (every site's BLT buffers restored, not restarted from zero)."""
  c = example_config("blt", **{"dp.noise_multiplier": 1.0, "checkpoint.every": 2,
                               "rounds": 5})
  full = Experiment(c).run(str(tmp_path / "full"))
  crash_during_step(Experiment(c), str(tmp_path / "crashed"), 4)
  resumed = Experiment(c).run(str(tmp_path / "crashed"))
  assert resumed["rounds_completed"] == 5
  assert resumed["params_sha256"] == full["params_sha256"]


def test_dp_ftrl_example_preset_trains_digits_above_chance(tmp_path):
  """configs/dp_ftrl.py:example with blt at epsilon 4, 8 rounds: well above chance (0.1)."""
  import importlib.util, os
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                      "dp_ftrl.py")
  spec = importlib.util.spec_from_file_location("dp_ftrl", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("example")
  c.rounds, c.log.progress, c.log.tensorboard = 8, False, False
  summary = Experiment(c).run(str(tmp_path))
  assert summary["epsilon"] <= 4.0 * (1 + 1e-6)
  assert summary["test_accuracy"] > 0.5


BAD = [
    ("--config.dp.level=example --config.dp.mechanism=blt --config.dp.noise_multiplier=1 "
     "--config.client.local_epochs=1", "client.local_epochs"),
    ("--config.dp.level=example --config.dp.mechanism=blt --config.dp.noise_multiplier=1 "
     "--config.dp.groups=2", "dp.groups"),
    ("--config.dp.level=example --config.dp.mechanism=blt --config.dp.noise_multiplier=1 "
     "--config.secagg.enabled=True", "secagg.enabled"),
    ("--config.dp.level=example --config.dp.mechanism=blt --config.dp.noise_multiplier=1 "
     "--config.client.batch_size=100000", "client.batch_size"),
]


@pytest.mark.parametrize("flags,key", BAD)
def test_bad_example_mechanism_config_exits_2_with_one_line(flags, key, tmp_path):
  assert_exits_2_with_one_line(flags, key, tmp_path)
