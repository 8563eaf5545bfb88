r"""Runs the lab's federated task on Flower's deployment engine on loopback, beside the lab.

  python -m fedjax_lab.flower.run --config configs/gse7390_prognosis.py [--set rounds=10 ...]
      [--supernodes N (default data.num_sites)] [--out runs/flower/<name>] [--no-lab]

Starts, as separate processes on 127.0.0.1 (free ports), `flower-superlink --insecure` and one
`flower-supernode --insecure --node-config partition-id=<site>` per site, submits
fedjax_lab/flower/app with `flwr run` (FLWR_HOME is a folder under --out whose config.toml
names the loopback SuperLink), waits for the ServerApp's result and stops the processes. Then
trains the same config with the lab (Experiment.run) and prints both: accuracy, AUC, seconds,
bytes. Writes OUT/flower.json, OUT/lab/ (a lab workdir) and OUT/comparison.json; the
processes' logs are OUT/logs/*.log.

Real hospitals (docs/studies.md, Flower): run `flower-superlink` (with TLS: --ssl-* files, and
--enable-supernode-auth) on the coordinator, `flower-supernode --superlink <host>:<port>
--root-certificates ca.pem --node-config "partition-id=<i>"` at each hospital with this
repository on PYTHONPATH, and `flwr run fedjax_lab/flower/app <connection>` from a machine
whose FLWR_HOME/config.toml names the SuperLink.
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time

from fedjax_lab import cli
from fedjax_lab import config as config_lib
from fedjax_lab.errors import ConfigError
from fedjax_lab.experiment import Experiment
from fedjax_lab.flower import task

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
APP_DIR = os.path.join(ROOT, "fedjax_lab", "flower", "app")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _bin(name: str) -> str:
  here = os.path.join(os.path.dirname(sys.executable), name)
  return here if os.path.exists(here) else (shutil.which(name) or name)


def _toml_str(s: str) -> str:
  return json.dumps(s)  # a TOML basic string is a JSON string for these characters


def run_on_flower(config_spec: str, overrides: str, num_supernodes: int, out: str,
                  timeout_s: float = 900.0, save_params: bool = False) -> dict:
  """Runs the task on Flower on loopback; returns the ServerApp's result plus wall seconds."""
  out = os.path.abspath(out)
  logs, home = os.path.join(out, "logs"), os.path.join(out, "flwr_home")
  os.makedirs(logs, exist_ok=True)
  os.makedirs(home, exist_ok=True)
  result_path = os.path.join(out, "flower.json")
  if os.path.exists(result_path):
    os.remove(result_path)
  port = _free_port()
  with open(os.path.join(home, "config.toml"), "w") as f:
    f.write(f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
            f'address = "127.0.0.1:{port}"\ninsecure = true\n')
  env = {**os.environ, "FLWR_HOME": home,  # Flower's own commands (flower-superexec) on PATH
         "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
         "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
  env.pop("XLA_FLAGS", None)  # each process: JAX's default devices
  procs = []

  def start(name, args):
    log = open(os.path.join(logs, f"{name}.log"), "w")
    procs.append((name, subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         cwd=out, start_new_session=True), log))

  try:
    start("superlink", [_bin("flower-superlink"), "--insecure", "--host", "127.0.0.1",
                        "--port", str(port), "--disable-runtime-dependency-installation"])
    for i in range(num_supernodes):
      start(f"supernode{i}", [_bin("flower-supernode"), "--insecure", "--superlink",
                              f"127.0.0.1:{port}", "--host", "127.0.0.1",
                              "--port", str(_free_port()),
                              "--node-config", f"partition-id={i}"])
    run_config = " ".join([f"config={_toml_str(os.path.join(ROOT, config_spec))}",
                           f"overrides={_toml_str(overrides)}",
                           f"out={_toml_str(result_path)}",
                           f"save-params={'true' if save_params else 'false'}"])
    t0 = time.perf_counter()
    submit = None
    for _ in range(60):  # the SuperLink takes a moment to listen
      submit = subprocess.run([_bin("flwr"), "run", APP_DIR, "loopback", "--run-config",
                               run_config], env=env, cwd=out, capture_output=True, text=True)
      if submit.returncode == 0:
        break
      dead = [n for n, p, _ in procs if p.poll() is not None]
      if dead:
        raise RuntimeError(f"{dead} exited before the run started; see {logs}")
      time.sleep(1.0)
    if submit.returncode != 0:
      raise RuntimeError(f"flwr run failed: {submit.stdout[-1500:]} {submit.stderr[-1500:]}")
    while not os.path.exists(result_path):
      if time.perf_counter() - t0 > timeout_s:
        raise RuntimeError(f"no result after {timeout_s:.0f} s; see {logs}")
      dead = [n for n, p, _ in procs if p.poll() is not None]
      if dead:
        raise RuntimeError(f"{dead} exited; see {logs}")
      time.sleep(0.5)
    time.sleep(0.2)  # the file is written in one json.dump; let it close
    with open(result_path) as f:
      result = json.load(f)
    result["wall_seconds"] = time.perf_counter() - t0
    result["processes"] = {"superlink": 1, "supernodes": num_supernodes}
    return result
  finally:
    for _, p, log in procs:
      if p.poll() is None:
        os.killpg(p.pid, 15)  # its own session: the SuperLink's and SuperNodes' children too
    for _, p, log in procs:
      try:
        p.wait(timeout=15)
      except subprocess.TimeoutExpired:
        os.killpg(p.pid, 9)
      log.close()


def run_lab(config_spec: str, overrides: str, workdir: str) -> dict:
  """The lab's own simulation of the same config (Experiment.run), timed end to end."""
  config = task.load_config(os.path.join(ROOT, config_spec), overrides)
  config.log.progress = config.log.tensorboard = False
  config.eval.centralized_baseline = False
  t0 = time.perf_counter()
  exp = Experiment(config)
  summary = exp.run(workdir)
  return {"test_accuracy": summary["test_accuracy"], "test_auc": summary["test_auc"],
          "test_macro_f1": summary["test_macro_f1"], "seconds_total": summary["total_seconds"],
          "wall_seconds": time.perf_counter() - t0, "bytes_total": summary["bytes_total"],
          "params_sha256": summary["params_sha256"], "final_state": exp.final_state}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="configs/gse7390_prognosis.py")
  p.add_argument("--set", action="append", default=[], help="key=value override (repeat)")
  p.add_argument("--supernodes", type=int, default=None)
  p.add_argument("--out", default=None)
  p.add_argument("--no-lab", action="store_true")
  a = p.parse_args(argv)
  overrides = " ".join(a.set)
  try:
    config = task.load_config(os.path.join(ROOT, a.config), overrides)
    config_lib.validate(config)  # as train.py, before any process starts
    task.check(config, a.supernodes)
  except ConfigError as e:
    cli.fail(str(e))
  n = a.supernodes or config.data.num_sites
  out = a.out or os.path.join("runs", "flower", os.path.basename(a.config).split(".")[0])
  flower = run_on_flower(a.config, overrides, n, out)
  rows = {"flower": {k: v for k, v in flower.items() if k != "params"}}
  if not a.no_lab:
    lab = run_lab(a.config, overrides, os.path.join(out, "lab"))
    lab.pop("final_state")
    rows["lab"] = lab
  with open(os.path.join(out, "comparison.json"), "w") as f:
    json.dump(rows, f, indent=2)
  for name, r in rows.items():
    print(f"{name:6s} test_accuracy={r['test_accuracy']:.4f} test_auc={r['test_auc']:.4f} "
          f"rounds_seconds={r['seconds_total']:.1f} wall_seconds={r['wall_seconds']:.1f} "
          f"bytes_total={r['bytes_total']}")


if __name__ == "__main__":
  main()
