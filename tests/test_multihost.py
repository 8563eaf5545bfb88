"""A multi-process run (jax.distributed, one process per host) trains as one program.

Two processes of two CPU devices each, joined over localhost with gloo collectives, stand in
for two hosts: the sites and their SCAFFOLD controls are sharded over all four devices, so
every round sums across the processes. They must end where one process with four devices
ends, write each output once, and resume from a checkpoint both processes wrote.
"""

import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from fedjax_lab import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["--config", "configs/compare_comm.py:digits,scaffold", "--config.min_sites_per_device=1",
         "--config.checkpoint.every=3", "--config.log.progress=False",
         "--config.log.tensorboard=False"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _train(workdir, rounds, processes, devices_per_process):
  env = {**os.environ, "XLA_FLAGS": "", "FEDJAX_LAB_CPU_DEVICES": str(devices_per_process)}
  if processes > 1:
    env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{_free_port()}",
               JAX_NUM_PROCESSES=str(processes))
  cmd = [sys.executable, "train.py", *FLAGS, f"--config.rounds={rounds}", "--workdir",
         str(workdir)]
  logs = [(open(workdir.parent / f"{workdir.name}.{i}.out", "w+"),
           open(workdir.parent / f"{workdir.name}.{i}.err", "w+")) for i in range(processes)]
  procs = [subprocess.Popen(cmd, cwd=ROOT, env={**env, "JAX_PROCESS_ID": str(i)},
                            stdout=out, stderr=err, text=True)
           for i, (out, err) in enumerate(logs)]
  deadline = time.monotonic() + 300
  # A process that fails leaves the others waiting in a collective: stop them all at once.
  while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
    if any(p.poll() not in (None, 0) for p in procs):
      break
    time.sleep(0.2)
  for p in procs:
    if p.poll() is None:
      p.kill()
      p.wait()
  outs = []
  for out, err in logs:
    out.seek(0), err.seek(0)
    outs.append((out.read(), err.read()))
    out.close(), err.close()
  assert all(p.returncode == 0 for p in procs), "\n".join(
      f"process {i}, exit {p.returncode}:\n{err[-3000:]}" for i, (p, (_, err))
      in enumerate(zip(procs, outs)))
  return outs


@pytest.mark.slow
def test_two_processes_train_and_resume_as_one_process(tmp_path):
  first = _train(tmp_path / "two", 3, processes=2, devices_per_process=2)
  resumed = _train(tmp_path / "two", 6, processes=2, devices_per_process=2)
  _train(tmp_path / "one", 6, processes=1, devices_per_process=4)

  # Process 0 reports; process 1 prints no result and writes nothing of its own (gloo's
  # own connection lines go to both stdouts).
  for outs in (first, resumed):
    assert "params_sha256" in outs[0][0] and "test_accuracy" not in outs[1][0]
  assert "resumed from" in resumed[0][1] and "at round 3" in resumed[0][1]
  rows = [json.loads(l) for l in open(tmp_path / "two" / "metrics.jsonl")]
  assert [r["round"] for r in rows] == list(range(1, 7))
  single = [json.loads(l) for l in open(tmp_path / "one" / "metrics.jsonl")]
  np.testing.assert_allclose([r["train_loss"] for r in rows],
                             [r["train_loss"] for r in single], rtol=1e-5)

  # Same model and per-site controls as one process (sums taken in another order: rounding).
  two, one = checkpoint.read_state(tmp_path / "two"), checkpoint.read_state(tmp_path / "one")
  assert int(two["round"]) == int(one["round"]) == 6
  for key in ("params", "site_controls"):
    for u, v in zip(jax.tree.leaves(two[key]), jax.tree.leaves(one[key])):
      np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)


def test_coordinator_without_process_count_is_one_line_exit_2(tmp_path):
  env = {**os.environ, "XLA_FLAGS": "", "JAX_COORDINATOR_ADDRESS": "localhost:1"}
  env.pop("JAX_NUM_PROCESSES", None)
  proc = subprocess.run([sys.executable, "train.py", "--workdir", str(tmp_path)], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=120)
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr
  assert "JAX_NUM_PROCESSES" in lines[0]
