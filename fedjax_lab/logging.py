"""Per-round metrics: metrics.jsonl (the contract), TensorBoard events, a progress bar."""

import json
import os
import sys

import tqdm


class MetricsLogger:

  def __init__(self, workdir: str, total_rounds: int, start_round: int, *, progress=True,
               tensorboard=True, primary=True):
    """primary=False (the other processes of a multi-host run) writes and shows nothing."""
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._primary = primary
    self._file = self._tb = self._bar = None
    if not primary:
      return
    self._truncate_after(start_round)
    self._file = open(self.path, "a")
    if tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    self._bar = tqdm.tqdm(total=total_rounds, initial=start_round, unit="round",
                          disable=not progress, file=sys.stderr, dynamic_ncols=True)

  def _truncate_after(self, start_round):
    """On resume, rows past the restored checkpoint are replayed, so drop them first."""
    if not os.path.exists(self.path):
      return
    with open(self.path) as f:
      rows = [line for line in f if line.strip() and json.loads(line)["round"] <= start_round]
    with open(self.path, "w") as f:
      f.writelines(rows)

  def write(self, row: dict) -> None:
    if not self._primary:
      return
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in row.items():
        if isinstance(v, (int, float)) and k != "round" and v is not None:
          self._tb.add_scalar(k, v, row["round"])
    postfix = {"loss": f"{row['train_loss']:.4f}", "s/round": f"{row['seconds']:.3f}"}
    if row.get("test_accuracy") is not None:
      postfix["acc"] = f"{row['test_accuracy']:.4f}"
    if row.get("epsilon") is not None:
      postfix["eps"] = f"{row['epsilon']:.3f}"
    self._bar.set_postfix(postfix, refresh=False)
    self._bar.update(1)

  def close(self) -> None:
    if not self._primary:
      return
    self._bar.close()
    self._file.close()
    if self._tb is not None:
      self._tb.close()
