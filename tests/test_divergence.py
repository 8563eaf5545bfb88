"""A diverging run stops with one line and exit 1 (fedjax_lab/divergence.py), unless
log.allow_divergence: issue 27's esgd at client.lr=0.1 reached parameters ~1e9 with exit 0."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lab import divergence
from fedjax_lab.config import default_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ESGD = ["--config.client.optimizer=esgd", "--config.client.lr=0.1", "--config.rounds=8",
        "--config.log.progress=False", "--config.log.tensorboard=False"]


def _train(tmp_path, name, *flags):
  return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *ESGD, *flags,
                         "--workdir", str(tmp_path / name)], cwd=tmp_path, capture_output=True,
                        text=True, timeout=600)


def test_esgd_at_a_large_learning_rate_stops_with_one_line(tmp_path):
  out = _train(tmp_path, "stop")
  assert out.returncode == 1, out.stderr[-2000:]
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("training diverged at round ") and "--config.client.lr (now 0.1)" in last
  assert not (tmp_path / "stop" / "summary.json").exists()
  rows = [json.loads(l) for l in (tmp_path / "stop" / "metrics.jsonl").read_text().splitlines()]
  stopped = int(last.split("round ")[1].split(":")[0])
  # It stopped at the first round whose loss left LOSS_FACTOR x the first (the metrics of the
  # rounds before it are logged, that round's is not).
  assert len(rows) == stopped - 1 and all(r["train_loss"] < 100 * rows[0]["train_loss"]
                                          for r in rows)
  kept = _train(tmp_path, "on", "--config.log.allow_divergence=True")
  assert kept.returncode == 0, kept.stderr[-2000:]
  assert "log.allow_divergence=True: going on" in kept.stderr
  summary = json.loads((tmp_path / "on" / "summary.json").read_text())
  assert summary["rounds_completed"] == 8 and summary["test_accuracy"] < 0.3  # chance: 0.1


def _watch(allow=False, start=None):
  c = default_config()
  c.log.allow_divergence = allow
  return divergence.Watch(c, {"w": jnp.ones(4) if start is None else start})


def test_watch_thresholds():
  w = _watch()
  w.check(1, 2.3, {"w": jnp.ones(4)})  # norm 2: the start
  w.check(2, 229.0, {"w": jnp.full(4, 999.0)})  # just under both factors (norm 1998 < 2000)
  with pytest.raises(divergence.Diverged, match="round 3: train_loss=231"):
    w.check(3, 231.0, {"w": jnp.ones(4)})
  with pytest.raises(divergence.Diverged, match=r"parameter norm 2e\+03 \(at the start: 2\)"):
    _watch().check(1, 1.0, {"w": jnp.full(4, 1001.0)})
  with pytest.raises(divergence.Diverged, match="train_loss=nan"):
    _watch().check(1, float("nan"), {"w": jnp.ones(4)})
  with pytest.raises(divergence.Diverged, match="non-finite parameters"):
    _watch().check(1, 1.0, {"w": jnp.array([1.0, np.inf])})
  # A zero start (linear models start at 0) measures growth against norm 1, not 0.
  _watch(start=jnp.zeros(4)).check(1, 1.0, {"w": jnp.full(4, 499.0)})
  allowed = _watch(allow=True)
  allowed.check(1, float("nan"), {"w": jnp.ones(4)})  # warns, no raise
  assert allowed.warned
