"""End-to-end: train.py outputs, exact resume after a crash, FedBN, config errors (exit 2)."""

import hashlib
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lab.config import default_config
from fedjax_lab.experiment import Experiment, params_sha256

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
  c = default_config()
  c.rounds, c.cohort_size = 6, 5
  c.data.num_sites = 20
  c.client.local_steps, c.client.batch_size = 3, 8
  c.checkpoint.every = 2
  c.log.progress, c.log.tensorboard = False, False
  return set_keys(c, overrides)


def numpy_accuracy(params, x, y) -> float:
  """Test accuracy of a stack of Dense layers (linear or MLP: relu between) by a NumPy forward
  pass: the reference the lab's jitted evaluation must reproduce."""
  layers = sorted((k for k in params if k.startswith("Dense_")), key=lambda k: int(k[6:]))
  h = np.asarray(x, np.float64).reshape(len(x), -1)
  for i, k in enumerate(layers):
    h = h @ np.asarray(params[k]["kernel"], np.float64) + np.asarray(params[k]["bias"])
    h = np.maximum(h, 0) if i < len(layers) - 1 else h
  return float(np.mean(h.argmax(-1) == np.asarray(y)))


def set_keys(config, overrides: dict):
  """config with every dotted key of `overrides` set ("dp.level": "site")."""
  for k, v in overrides.items():
    node = config
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return config


def test_outputs_follow_the_contract(tmp_path):
  c = tiny_config()
  c.log.tensorboard = True
  summary = Experiment(c).run(str(tmp_path))
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [r["round"] for r in rows] == list(range(1, 7))
  for r in rows:
    assert {"round", "train_loss", "test_accuracy", "epsilon", "seconds",
            "bytes_communicated"} <= set(r)
    assert r["epsilon"] is None
    # 5 sites each download and upload the MLP 64-128-10 as float32.
    assert r["bytes_communicated"] == 5 * 2 * 4 * (64 * 128 + 128 + 128 * 10 + 10)
  on_disk = json.load(open(tmp_path / "summary.json"))
  assert on_disk == json.loads(json.dumps(summary))
  assert {"test_accuracy", "epsilon", "rounds_completed", "total_seconds", "params_sha256",
          "config"} <= set(on_disk)
  assert on_disk["rounds_completed"] == 6 and on_disk["config"]["cohort_size"] == 5
  assert any(f.startswith("events") for f in os.listdir(tmp_path / "tensorboard"))


@pytest.mark.parametrize("overrides,devices", [
    ({}, 1),                                        # 5 sites a round < 16 x 8: not split
    ({"cohort_size": 20, "min_sites_per_device": 2}, 8),
    ({"algorithm.name": "scaffold"}, 8),            # per-site controls always sharded
])
def test_small_cpu_rounds_run_on_one_device_with_the_same_result(overrides, devices):
  """A FedAvg round too small to split runs on one of the host's CPU devices instead of
  repeating itself on all 8; it trains exactly as on the mesh of all devices."""
  import jax
  from fedjax_lab import sharding
  c = tiny_config(**overrides)
  exp = Experiment(c)
  assert exp.mesh.size == devices
  everywhere = Experiment(c, mesh=sharding.make_mesh(jax.devices()))
  got = exp.run_rounds(exp.init_state(), 2).params
  want = everywhere.run_rounds(everywhere.init_state(), 2).params
  for u, v in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("overrides", [
    {},
    {"dp.level": "site", "dp.noise_multiplier": 1.0, "cohort_size": 10},
    {"algorithm.name": "scaffold", "min_sites_per_device": 1},
])
def test_the_round_vmaps_over_seeds(overrides):
  """Seeds (init, cohorts, batches, noise) as a vmapped axis of one compiled round, the
  basis of seed sweeps and shadow models: each seed's slice equals that seed run alone."""
  import jax
  c = tiny_config(**overrides)
  exp = Experiment(c)
  seeds = np.arange(3)

  def init(seed):
    params, model_state = exp.model.init(jax.random.key(seed), exp.train.x[:2])
    return exp.algorithm.init(params, model_state)

  keys = lambda seed: (jax.random.fold_in(jax.random.key(seed), 1),
                       jax.random.fold_in(jax.random.key(seed), 2))
  batched = jax.jit(jax.vmap(exp.round_fn, in_axes=(0, None, 0, 0)))
  state = jax.vmap(init)(seeds)
  sampling, client = jax.vmap(keys)(seeds)
  alone = jax.jit(exp.round_fn)
  singles = [init(s) for s in seeds]
  for _ in range(2):
    state, _ = batched(state, exp.data, sampling, client)
    singles = [alone(st, exp.data, *keys(s))[0] for st, s in zip(singles, seeds)]
  for s in seeds:
    for u, v in zip(jax.tree.leaves(state.params), jax.tree.leaves(singles[s].params)):
      np.testing.assert_allclose(np.asarray(u)[s], np.asarray(v), rtol=1e-5, atol=1e-6)
  assert not np.allclose(*(np.asarray(jax.tree.leaves(state.params)[0])[:2]))


def test_params_sha256_matches_a_hand_computation():
  params = {"b": np.arange(3, dtype=np.float32), "a": np.ones((2, 2), np.float32)}
  want = hashlib.sha256(np.ones(4, "<f4").tobytes() + np.arange(3, dtype="<f4").tobytes())
  assert params_sha256(params) == want.hexdigest()  # jax.tree order sorts dict keys: a, b


class _Crash(Exception):
  pass


def crash_during_step(exp, workdir, call):
  """Runs `exp` into `workdir` and kills it inside its `call`-th compiled step (1-based), as
  a crash or a lost machine would; checkpoints taken before then stay on disk."""
  real_step, calls = exp.step, []

  def step(*args):
    calls.append(1)
    if len(calls) == call:
      raise _Crash()
    return real_step(*args)

  exp.step = step
  try:
    with pytest.raises(_Crash):
      exp.run(workdir)
  finally:
    exp.step = real_step


def test_crash_then_rerun_resumes_to_the_same_params(tmp_path):
  c = tiny_config()
  full = Experiment(c).run(str(tmp_path / "full"))
  # Dies during round 4; rounds 1-2 are checkpointed at round 2.
  crash_during_step(Experiment(c), str(tmp_path / "crashed"), 4)
  assert sorted(os.listdir(tmp_path / "crashed" / "checkpoints"))[-1].startswith("2")
  resumed = Experiment(c).run(str(tmp_path / "crashed"))
  assert resumed["params_sha256"] == full["params_sha256"]
  rows = [json.loads(l) for l in open(tmp_path / "crashed" / "metrics.jsonl")]
  assert [r["round"] for r in rows] == list(range(1, 7))  # replayed rounds not duplicated
  assert resumed["bytes_total"] == full["bytes_total"]


def test_fused_rounds_and_fedbn_run(tmp_path):
  fused = Experiment(tiny_config(rounds_per_step=3))
  a = fused.run(str(tmp_path / "fused"))
  b = Experiment(tiny_config()).run(str(tmp_path / "single"))
  loss = lambda d: [json.loads(l)["train_loss"] for l in open(tmp_path / d / "metrics.jsonl")]
  # Round by round the same training (a fused step that reused a round's keys or skipped the
  # round index would differ from round 2 on), and the same model at the end.
  np.testing.assert_allclose(loss("fused"), loss("single"), rtol=1e-5)
  assert len(loss("fused")) == 6 and len(set(np.round(loss("single"), 4))) == 6
  assert a["test_accuracy"] == pytest.approx(b["test_accuracy"], abs=1e-6)
  assert a["test_accuracy"] == pytest.approx(
      numpy_accuracy(fused.final_state.params, fused.test.x, fused.test.y), abs=1e-6)
  c = tiny_config(**{"model.name": "cnn", "model.norm": "batch", "model.features": (4,),
                     "model.hidden": (), "algorithm.batch_stats": "local"})
  exp = Experiment(c)
  state = exp.run_rounds(exp.init_state(), 2)
  mean = state.site_model_state["batch_stats"]["BatchNorm_0"]["mean"]
  assert mean.shape == (20, 4)
  trained = np.abs(np.asarray(mean)).sum(-1) > 0
  # Exactly the sites of rounds 1 and 2 moved their own statistics: the cohorts drawn here
  # from the sampling key as the round does (uniform, without replacement).
  cohorts = [np.asarray(jax.random.choice(jax.random.fold_in(exp.keys["sampling"], t), 20,
                                          (5,), replace=False)) for t in range(2)]
  assert set(np.flatnonzero(trained)) == set(np.concatenate(cohorts))
  # Each test example is scored with its site's statistics: the site-weighted accuracy
  # differs from the one with the global (never trained) statistics.
  site_acc = exp.evaluate(state).accuracy
  global_acc = exp.evaluate(state._replace(site_model_state=jax.tree.map(
      lambda s, g: jnp.broadcast_to(g, s.shape), state.site_model_state, state.model_state)))
  assert site_acc != global_acc.accuracy


BAD_CONFIGS = [
    ("--config.data.alpha=-1 --config.data.partition=dirichlet", "data.alpha"),
    ("--config.cohort_size=500", "cohort_size"),
    ("--config.data.num_sites=5000 --config.cohort_size=10", "data.num_sites"),
    ("--config.client.lr=0", "client.lr"),
    ("--config.server.lr=-1", "server.lr"),
    ("--config.data.name=mnist_typo", "data.name"),
    ("--config.model.name=transformer", "model.name"),
    ("--config.client.optimizer=adamm", "client.optimizer"),
    ("--config.data.name=file --config.data.path=/nonexistent/x.npz", "data.path"),
    ("--config.no_such_key=1", "no_such_key"),
    ("--config.dp.delta=1.5", "dp.delta"),
    ("--config.client.optimizer=sam --config.client.local_steps=3", "client.local_steps"),
    ("--config.client.optimizer_args.epz=0.1", "client.optimizer_args.epz"),
    ("--config.sites_per_chunk=-1", "sites_per_chunk"),
    ("--config.seed=-1", "seed"),
    ("--config.rounds=50 --config.rounds_per_step=7", "rounds_per_step"),
    ("--config.dp.level=example --config.dp.noise_multiplier=1 --config.model.name=resnet "
     "--config.model.norm=group --config.dp.clipping=ghost", "dp.clipping"),
    ("--config.clients=3", "clients"),  # ml_collections adds a "Did you mean" line
]


def test_workdir_that_is_a_file_exits_2_with_one_line(tmp_path):
  (tmp_path / "taken").write_text("")
  proc = subprocess.run([sys.executable, "train.py", "--workdir", str(tmp_path / "taken")],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr
  assert lines[0].startswith("config error: --workdir: ")


def test_optimizer_args_are_set_from_the_command_line(tmp_path):
  """The free-form optimizer_args take --config overrides (both `=` and space forms): b1=0.9,
  adam's default, gives the run without it; b1 0.5 another one."""
  def sha(name, *extra):
    proc = subprocess.run(
        [sys.executable, "train.py", "--workdir", str(tmp_path / name), "--config.rounds=1",
         "--config.log.progress=False", "--config.log.tensorboard=False",
         "--config.client.optimizer=adam", "--config.client.lr=0.01", *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads((tmp_path / name / "summary.json").read_text())["params_sha256"]
  default = sha("default")
  assert sha("b1_09", "--config.client.optimizer_args.b1=0.9") == default
  assert sha("b1_05", "--config.client.optimizer_args.b1", "0.5") != default


def assert_exits_2_with_one_line(flags, key, tmp_path):
  """train.py with these --config flags exits 2, printing one line that names `key`."""
  proc = subprocess.run([sys.executable, "train.py", "--workdir", str(tmp_path), *flags.split()],
                        cwd=ROOT, capture_output=True, text=True, timeout=120,
                        env={**os.environ, "XLA_FLAGS": ""})
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode == 2, proc.stderr
  assert len(lines) == 1 and lines[0].startswith(f"config error: {key}: "), proc.stderr
  assert not os.path.exists(tmp_path / "metrics.jsonl")


@pytest.mark.parametrize("flags,key", BAD_CONFIGS)
def test_bad_config_exits_2_with_one_line(flags, key, tmp_path):
  assert_exits_2_with_one_line(flags, key, tmp_path)


@pytest.mark.slow
def test_ctrl_c_saves_then_the_same_command_finishes_identically(tmp_path):
  import signal
  import time
  flags = ["--config.rounds=400", "--config.eval.every=50", "--config.checkpoint.every=1000",
           "--config.log.progress=False"]
  env = {**os.environ, "XLA_FLAGS": ""}
  cmd = lambda d: [sys.executable, "train.py", "--workdir", str(d), *flags]
  proc = subprocess.Popen(cmd(tmp_path / "a"), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  metrics = tmp_path / "a" / "metrics.jsonl"
  deadline = time.time() + 120
  while time.time() < deadline and not (metrics.exists() and
                                        len(metrics.read_text().splitlines()) >= 20):
    time.sleep(0.05)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 130, err
  done = len(metrics.read_text().splitlines())
  assert 20 <= done < 400  # interrupted mid-run ...
  saved = [int(d) for d in os.listdir(tmp_path / "a" / "checkpoints") if d.isdigit()]
  assert saved == [done]  # ... and saved the round it had finished, not just every 1000
  resumed = subprocess.run(cmd(tmp_path / "a"), cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=300)
  straight = subprocess.run(cmd(tmp_path / "b"), cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
  sha = lambda p: json.loads(p.stdout.strip().splitlines()[-1])["params_sha256"]
  assert resumed.returncode == 0 and straight.returncode == 0
  assert sha(resumed) == sha(straight)
