"""One run, one workdir: default workdirs name the config; a workdir resumes only its own."""

import json
import os
import subprocess
import sys

import pytest

from fedjax_lab import runs
from fedjax_lab.config import default_config
from fedjax_lab.errors import ConfigError
from fedjax_lab.experiment import Experiment
from test_experiment import tiny_config as experiment_tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config_file(spec):
  return os.path.join(ROOT, "configs", spec)


def default_workdir(spec, **overrides):
  base = runs.load_config_file(config_file(spec))
  config = runs.load_config_file(config_file(spec))
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return runs.default_workdir(config_file(spec), config, base)


def test_default_workdirs_name_the_config():
  assert default_workdir("digits_fedavg.py").startswith("runs/digits_fedavg-")
  seeds = {default_workdir("digits_fedavg.py", seed=s) for s in (0, 1, 2)}
  assert len(seeds) == 3 and "seed=1" in default_workdir("digits_fedavg.py", seed=1)
  central = default_workdir("dopamine_digits.py:central")
  assert central != default_workdir("dopamine_digits.py:coordinated")
  assert os.path.basename(central).startswith("dopamine_digits-central-")
  p2 = default_workdir("compare_comm.py:logistic,proxskip_p0.2")
  p5 = default_workdir("compare_comm.py:logistic,proxskip_p0.5")
  assert p2 != p5 and os.path.basename(p5).startswith("compare_comm-logistic_proxskip_p0.5-")
  # A shorter run is another run; logging and checkpointing settings are the same run.
  assert default_workdir("digits_fedavg.py", rounds=100) != default_workdir("digits_fedavg.py")
  assert default_workdir("digits_fedavg.py", **{"log.progress": False,
                                                "checkpoint.every": 7}) == \
      default_workdir("digits_fedavg.py")


def test_fingerprint_is_the_hash_of_the_non_resumable_keys():
  import hashlib
  c = default_config()
  flat = json.loads(c.to_json_best_effort())
  for key in ("rounds", "log", "checkpoint", "attack"):
    flat.pop(key)
  del flat["eval"]["every"], flat["eval"]["batch_size"]
  del flat["secagg"]["allow_aborts"]  # only train.py's exit code, not the run
  flat_keys = {}

  def walk(node, prefix):
    for k, v in node.items():
      if isinstance(v, dict):
        walk(v, prefix + k + ".")
      else:
        flat_keys[prefix + k] = v
  walk(flat, "")
  want = hashlib.sha256(json.dumps(flat_keys, sort_keys=True).encode()).hexdigest()
  assert runs.fingerprint(c) == want
  name_hash = hashlib.sha256(f"{want} rounds=50".encode()).hexdigest()[:8]
  assert runs.run_name(["a b/c", ""], c) == f"a_b_c-{name_hash}"


def tiny_config(**overrides):
  """test_experiment's tiny config, 2 rounds of 2 local steps, a checkpoint every round."""
  return experiment_tiny_config(**{"rounds": 2, "client.local_steps": 2, "checkpoint.every": 1,
                                   **overrides})


def test_a_workdir_resumes_only_its_own_config(tmp_path):
  workdir = str(tmp_path / "run")
  first = Experiment(tiny_config()).run(workdir)
  with pytest.raises(ConfigError) as e:  # the first key that differs, old and new value
    Experiment(tiny_config(**{"client.lr": 0.2, "seed": 3})).run(workdir)
  assert e.value.key == "seed" and "seed=0" in str(e.value) and "seed=3" in str(e.value)
  with pytest.raises(ConfigError) as e:
    runs.check_resume(workdir, tiny_config(**{"client.lr": 0.2}))
  assert e.value.key == "client.lr" and "0.1" in e.value.problem and "0.2" in e.value.problem
  with pytest.raises(ConfigError) as e:  # seed and dp.* are in the fingerprint
    runs.check_resume(workdir, tiny_config(**{"dp.level": "site", "dp.noise_multiplier": 1.0}))
  assert e.value.key == "dp.level"
  with pytest.raises(ConfigError) as e:  # a finished 2-round run is not a 1-round run
    Experiment(tiny_config(rounds=1)).run(workdir)
  assert e.value.key == "rounds" and "completed 2 rounds" in e.value.problem
  # Keys that may differ: the same run, extended; it ends where a straight 4-round run does.
  extended = Experiment(tiny_config(**{"rounds": 4, "eval.every": 2, "checkpoint.keep": 1,
                                       "log.progress": False})).run(workdir)
  straight = Experiment(tiny_config(rounds=4)).run(str(tmp_path / "straight"))
  assert extended["params_sha256"] == straight["params_sha256"] != first["params_sha256"]
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["round"] for r in rows] == [1, 2, 3, 4]
  assert runs.read_run(workdir)["config"]["rounds"] == 4


def test_checkpoints_of_an_unknown_config_are_refused(tmp_path):
  os.makedirs(tmp_path / "checkpoints" / "10")
  with pytest.raises(ConfigError) as e:
    runs.check_resume(str(tmp_path), tiny_config())
  assert e.value.key == "--workdir" and "run.json" in e.value.problem


def test_train_py_refuses_another_config_in_its_workdir(tmp_path):
  c = runs.load_config_file(config_file("digits_fedavg.py"))  # train.py's default config
  c.rounds, c.log.progress, c.log.tensorboard = 2, False, False
  Experiment(c).run(str(tmp_path))
  proc = subprocess.run([sys.executable, "train.py", "--workdir", str(tmp_path),
                         "--config.rounds=2", "--config.client.local_steps=4"],
                        cwd=ROOT, capture_output=True, text=True, timeout=120,
                        env={**os.environ, "XLA_FLAGS": ""})
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr
  assert lines[0].startswith("config error: client.local_steps: ") and "new --workdir" in lines[0]


def test_a_loop_over_seeds_gives_one_run_per_seed(tmp_path):
  """The bug this fixes: `for s in 0 1 2; do python train.py --config.seed=$s; done` printed
  one run three times (every seed resumed the first's workdir)."""
  out = []
  for seed in (0, 1, 2):
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"),
         f"--config={config_file('dopamine_digits.py:central')}", f"--config.seed={seed}",
         "--config.rounds=2", "--config.log.progress=False", "--config.log.tensorboard=False"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "XLA_FLAGS": ""})
    assert proc.returncode == 0, proc.stderr
    *_, line, result = proc.stdout.strip().splitlines()
    assert " epsilon=2.000 delta=1e-05 " in line, line
    out.append((line.split("workdir=")[1], json.loads(result)["params_sha256"]))
  assert len({w for w, _ in out}) == 3 and len({sha for _, sha in out}) == 3
  summary = json.loads((tmp_path / out[1][0] / "summary.json").read_text())
  assert summary["config"]["seed"] == 1 and summary["params_sha256"] == out[1][1]
  head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True,
                        text=True).stdout.strip() or None
  assert summary["lab_commit"] == head
  import jax
  import numpy as np
  assert summary["versions"]["jax"] == jax.__version__
  assert summary["versions"]["numpy"] == np.__version__
  assert summary["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))


def test_by_column_num_sites_is_set_by_the_column_not_the_run(tmp_path):
  """The column sets data.num_sites when the data loads, so run.json holds the column's count;
  the user's config (another num_sites) must still resume it, while any other key refuses."""
  given = tiny_config(**{"data.partition": "by_column", "data.num_sites": 5})
  loaded = tiny_config(**{"data.partition": "by_column", "data.num_sites": 10})
  runs.write_run(str(tmp_path), loaded)
  runs.check_resume(str(tmp_path), given)
  with pytest.raises(ConfigError) as e:
    runs.check_resume(str(tmp_path), tiny_config(**{"data.partition": "iid",
                                                     "data.num_sites": 10}))
  assert e.value.key in ("data.num_sites", "data.partition")  # the first that differs
