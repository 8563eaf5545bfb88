"""Every command validates as train.py does (issue 28): one `config error:` line, exit 2, no
workdir left behind; the config file's own message reaches the user; attack commands print
no backend or checkpoint INFO lines; secure-aggregation runs that mostly abort exit 1."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args, cwd=ROOT, env=None, timeout=120):
  return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                        timeout=timeout, env=env)


def one_error_line(proc):
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
  return lines[0]


def test_generative_train_refuses_zero_rounds_and_leaves_no_workdir(tmp_path):
  workdir = tmp_path / "new" / "vae"
  line = one_error_line(run(["-m", "fedjax_lab.generative.train", "--config.rounds=0",
                             "--workdir", str(workdir)]))
  assert line == "config error: rounds: must be a positive integer, got 0"
  assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("flag,key", [("--config.generative.sync=some", "generative.sync"),
                                      ("--config.client.participation=0", "client.participation"),
                                      ("--config.dp.level=example", "dp.noise_multiplier"),
                                      ("--config.generative.syncc=all", "generative.syncc")])
def test_generative_train_names_the_key(flag, key, tmp_path):
  line = one_error_line(run(["-m", "fedjax_lab.generative.train", flag,
                             "--workdir", str(tmp_path / "w")]))
  assert line.startswith(f"config error: {key}: "), line
  assert not (tmp_path / "w").exists()


def test_a_bad_config_argument_prints_the_configs_own_message(tmp_path):
  line = one_error_line(run(["train.py", "--config", "configs/digits_dp.py:sitee",
                             "--workdir", str(tmp_path / "w")]))
  assert line == ("config error: --config: level must be 'example', 'site', 'site_adaptive' "
                  "or 'example_esgd_public', got 'sitee'")


def test_an_unknown_key_lists_the_keys_of_the_config_file_it_was_given():
  line = one_error_line(run(["-m", "fedjax_lab.attacks.membership",
                             "--config.mia.nonexistent=1"]))
  allowed = line.split("allowed under mia: ")[1].split(", ")
  assert {"threat", "num_models", "target_workdir"} <= set(allowed), line


@pytest.mark.parametrize("args,start", [
    (["-m", "fedjax_lab.attacks.membership", "--config.target.rounds=0"],
     "config error: target.rounds: "),
    (["-m", "fedjax_lab.attacks.membership", "--config.mia.threat=insider"],
     "config error: mia.threat: "),
    (["-m", "fedjax_lab.attacks.audit", "--config.target.cohort_size=0"],
     "config error: target.cohort_size: "),
    (["-m", "fedjax_lab.attacks.inversion", "--config.rounds=0"], "config error: rounds: "),
    (["-m", "fedjax_lab.flower.run", "--set", "rounds=0"], "config error: rounds: ")])
def test_attack_commands_validate_before_they_write(args, start, tmp_path):
  line = one_error_line(run(args, env={**os.environ, "PYTHONPATH": ROOT}, cwd=tmp_path))
  assert line.startswith(start), line
  assert not (tmp_path / "runs").exists()


def test_a_rejected_config_leaves_no_default_workdir(tmp_path):
  """train.py without --workdir in a fresh folder: runs/<name> is made before the data file
  is found missing, and removed again with runs/."""
  line = one_error_line(run([os.path.join(ROOT, "train.py"), "--config.data.name=file",
                             f"--config.data.path={tmp_path / 'missing.csv'}"], cwd=tmp_path))
  assert line.startswith("config error: data.path: file not found")
  assert os.listdir(tmp_path) == []


def test_membership_default_workdir_does_not_repeat_the_threat():
  from fedjax_lab.attacks.membership import default_workdir
  assert default_workdir("configs/mia_outsider.py", "outsider") == "runs/mia_outsider"
  assert default_workdir("configs/mia_shots.py", "shots") == "runs/mia_shots"
  assert default_workdir("configs/mine.py", "server") == "runs/mia_mine_server"


@pytest.mark.slow
def test_the_audit_prints_no_backend_or_orbax_info_lines():
  """JAX_PLATFORMS unset, as a user has it: JAX tries the TPU backend and logs the failure at
  INFO, and orbax logs every checkpoint; the audit's stderr stays empty."""
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  proc = run(["-m", "fedjax_lab.attacks.audit", "--config", "configs/mia_audit.py:example",
              "--config.target.rounds=1", "--config.audit.num_canaries=10"], env=env,
             timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "claimed epsilon 4.000" in proc.stdout
  assert proc.stderr.strip() == "", proc.stderr[-2000:]


SECAGG = ["train.py", "--config.rounds=2", "--config.secagg.enabled=True",
          "--config.secagg.dropout_rate=0.95", "--config.log.progress=False",
          "--config.log.tensorboard=False", "--config.eval.bootstrap=0"]


def test_a_run_whose_rounds_mostly_abort_exits_1_unless_allowed(tmp_path):
  """dropout_rate 0.95 on a cohort of 10 with threshold 6: a round finishes only if 6 sites
  stay (P = sum_{k>=6} C(10,k) 0.05^k 0.95^(10-k) < 1e-6), so both rounds abort."""
  proc = run([*SECAGG, "--workdir", str(tmp_path / "a")], timeout=300)
  assert proc.returncode == 1, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("secure aggregation: aborted 2 of 2 rounds"), last
  assert "secagg.allow_aborts=True" in last
  assert "test_accuracy=" in proc.stdout  # the report is still printed
  allowed = run([*SECAGG, "--workdir", str(tmp_path / "a"),
                 "--config.secagg.allow_aborts=True"], timeout=300)
  assert allowed.returncode == 0, allowed.stderr[-2000:]  # the same run: allow_aborts resumes it
  assert "aborted 2 of 2 rounds" in allowed.stderr
