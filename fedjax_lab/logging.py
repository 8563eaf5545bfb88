"""Per-round metrics: metrics.jsonl (the contract), TensorBoard events, a progress bar.

metrics.jsonl is the source of truth. On resume its rows past the restored checkpoint are
dropped, and `tensorboard/` is rewritten from the rows kept, so a workdir holds exactly ONE
events file with every round once, however often the run was resumed (a tensorboardX
SummaryWriter cannot append to an existing events file).

While the progress bar is shown, console log lines (the `fedjax_lab` logger's and the root
logger's stdout/stderr handlers) go through `tqdm.write`, so bar and lines never overwrite
each other.
"""

import glob
import json
import logging
import os
import sys

import tqdm
from tqdm.contrib import logging as tqdm_logging
from tensorboardX import SummaryWriter

_EVENTS_GLOB = "events.out.tfevents.*"


class MetricsLogger:

  def __init__(self, workdir: str, total_rounds: int, start_round: int, *, progress=True,
               tensorboard=True, primary=True):
    """primary=False (the other processes of a multi-host run) writes and shows nothing."""
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._primary = primary
    self._file = self._tb = self._bar = self._redirect = None
    if not primary:
      return
    kept = self._truncate_after(start_round)
    self._file = open(self.path, "a")
    if tensorboard:
      tb_dir = os.path.join(workdir, "tensorboard")
      for old in glob.glob(os.path.join(tb_dir, _EVENTS_GLOB)):
        os.remove(old)  # rewritten below from metrics.jsonl: one events file per run
      self._tb = SummaryWriter(tb_dir)
      for row in kept:
        self._add_scalars(row)
    self._bar = tqdm.tqdm(total=total_rounds, initial=start_round, unit="round",
                          disable=not progress, file=sys.stderr, dynamic_ncols=True)
    if progress:
      self._redirect = tqdm_logging.logging_redirect_tqdm(
          loggers=[logging.getLogger("fedjax_lab"), logging.getLogger()])
      self._redirect.__enter__()

  def _truncate_after(self, start_round) -> list[dict]:
    """On resume, rows past the restored checkpoint are replayed, so drop them first;
    returns the rows kept."""
    if not os.path.exists(self.path):
      return []
    with open(self.path) as f:
      lines = [(line, json.loads(line)) for line in f if line.strip()]
    lines = [(line, row) for line, row in lines if row["round"] <= start_round]
    with open(self.path, "w") as f:
      f.writelines(line for line, _ in lines)
    return [row for _, row in lines]

  def _add_scalars(self, row: dict) -> None:
    for k, v in row.items():
      if isinstance(v, (int, float)) and k != "round" and v is not None:
        self._tb.add_scalar(k, v, row["round"])

  def write(self, row: dict) -> None:
    if not self._primary:
      return
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    if self._tb is not None:
      self._add_scalars(row)
    postfix = {"loss": f"{row['train_loss']:.4f}"}
    if row.get("seconds") is not None:  # None where the time is private (run_loop.hide_time)
      postfix["s/round"] = f"{row['seconds']:.3f}"
    if row.get("test_accuracy") is not None:
      postfix["acc"] = f"{row['test_accuracy']:.4f}"
    if row.get("test_rmse") is not None:
      postfix["rmse"] = f"{row['test_rmse']:.4f}"
    if row.get("epsilon") is not None:
      postfix["eps"] = f"{row['epsilon']:.3f}"
    self._bar.set_postfix(postfix, refresh=False)
    self._bar.update(1)

  def close(self) -> None:
    if not self._primary:
      return
    if self._redirect is not None:
      self._redirect.__exit__(None, None, None)
      self._redirect = None
    self._bar.close()
    self._file.close()
    if self._tb is not None:
      self._tb.close()
