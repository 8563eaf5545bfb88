"""MetricsLogger: one TensorBoard events file per run across resumes; log lines and the
progress bar do not overwrite each other."""

import glob
import json
import logging
import os
import sys

import pytest

from fedjax_lab.config import default_config
from fedjax_lab.experiment import Experiment
from fedjax_lab.logging import MetricsLogger


def _tiny(rounds):
  c = default_config()
  c.rounds, c.cohort_size = rounds, 5
  c.data.num_sites = 20
  c.client.local_steps, c.client.batch_size = 1, 8
  c.checkpoint.every = 2
  c.log.progress, c.log.tensorboard = False, True
  return c


def _events(workdir):
  """{tag: [(step, value), ...]} of the ONE events file under workdir/tensorboard."""
  from tensorboard.backend.event_processing import event_file_loader
  files = glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
  assert len(files) == 1, files
  scalars = {}
  for event in event_file_loader.EventFileLoader(files[0]).Load():
    for value in event.summary.value:
      v = value.simple_value if value.HasField("simple_value") else None
      if v is None:  # tensorboard's loader migrates scalars to tensors
        import numpy as np
        from tensorboard.util import tensor_util
        v = float(np.asarray(tensor_util.make_ndarray(value.tensor)))
      scalars.setdefault(value.tag, []).append((event.step, v))
  return scalars


class _Crash(Exception):
  pass


def test_one_events_file_with_every_round_once_after_resumes(tmp_path):
  pytest.importorskip("tensorboard")
  workdir = str(tmp_path / "run")
  Experiment(_tiny(2)).run(workdir)  # rounds 1-2, checkpoint at 2
  exp = Experiment(_tiny(4))  # crashes during round 4: round 3 is logged, not checkpointed
  real_step, calls = exp.step, []

  def step(*args):
    calls.append(1)
    if len(calls) == 2:
      raise _Crash()
    return real_step(*args)

  exp.step = step
  with pytest.raises(_Crash):
    exp.run(workdir)
  Experiment(_tiny(4)).run(workdir)  # resumes at 2, replays 3, runs 4
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["round"] for r in rows] == [1, 2, 3, 4]
  scalars = _events(workdir)
  assert [s for s, _ in scalars["train_loss"]] == [1, 2, 3, 4]
  for (step_, value), row in zip(scalars["train_loss"], rows):
    assert value == pytest.approx(row["train_loss"], rel=1e-6)
  assert [s for s, _ in scalars["test_accuracy"]] == [1, 2, 3, 4]


def test_log_lines_go_through_tqdm_write_while_the_bar_is_shown(tmp_path, capsys):
  lab = logging.getLogger("fedjax_lab")
  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(logging.Formatter("fedjax_lab: %(message)s"))
  old_level, old_propagate = lab.level, lab.propagate
  lab.addHandler(handler)
  lab.setLevel(logging.INFO)
  lab.propagate = False
  try:
    logger = MetricsLogger(str(tmp_path), 3, 0, progress=True, tensorboard=False)
    assert handler not in lab.handlers  # replaced by tqdm's handler while the bar is shown
    assert any(type(h).__name__ == "_TqdmLoggingHandler" for h in lab.handlers)
    logger.write({"round": 1, "train_loss": 0.5, "seconds": 0.1})
    lab.info("a line between rounds")
    logger.write({"round": 2, "train_loss": 0.4, "seconds": 0.1})
    logger.close()
    assert lab.handlers == [handler]  # restored
  finally:
    lab.removeHandler(handler)
    lab.setLevel(old_level)
    lab.propagate = old_propagate
  err = capsys.readouterr().err
  # tqdm.write clears the bar, prints the line whole, then redraws the bar below it.
  assert "\nfedjax_lab: a line between rounds\n" in err.replace("\r", "\n")
