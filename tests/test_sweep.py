"""Sweeps: one run per point and seed, resumable; the table against numpy; compare."""

import csv
import glob
import json
import os

import numpy as np
import pytest

from fedjax_lab import sweep
from fedjax_lab.config import default_config
from fedjax_lab.experiment import Experiment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config", os.path.join(ROOT, "configs", "digits_fedavg.py"), "--set", "rounds=4",
        "--set", "data.num_sites=10", "--set", "cohort_size=5", "--set", "checkpoint.every=1",
        "--set", "log.tensorboard=False", "--grid", "client.lr=0.05,0.1"]


def without(path, column):
  """The file's lines without one column (seconds differ between two runs of a point)."""
  if path.endswith(".csv"):
    with open(path) as f:
      return [{k: v for k, v in r.items() if k != column} for r in csv.DictReader(f)]
  with open(path) as f:
    return [line.rsplit("|", 2)[0] for line in f]  # drop the last (seconds) cell


@pytest.mark.slow
def test_an_interrupted_sweep_finishes_with_the_uninterrupted_table(tmp_path, capsys):
  straight, broken = str(tmp_path / "straight"), str(tmp_path / "broken")
  assert sweep.main([*TINY, "--seeds", "3", "--out", straight]) == 0
  # Interrupted: seeds 0 and 1 of both points done, seed 2 of lr=0.1 stopped after round 2.
  assert sweep.main([*TINY, "--seeds", "2", "--out", broken]) == 0
  args = sweep._parser(compare=False).parse_args([*TINY, "--seeds", "3", "--out", broken])
  points, _ = sweep.sweep_points(args)
  stopped = points[-1]
  assert stopped.label == {"client.lr": 0.1, "seed": 2}
  config = stopped.config.copy_and_resolve_references()
  config.rounds = 2  # a resumable key: the same run, stopped half way
  Experiment(config).run(stopped.workdir)
  capsys.readouterr()
  assert sweep.main([*TINY, "--seeds", "3", "--out", broken]) == 0
  lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("[")]
  assert len(lines) == 6 and sum("(done before)" in l for l in lines) == 4
  assert lines[2].startswith("[3/6] client.lr=0.05 seed=2: test_accuracy=")
  assert "done" not in lines[2] and "done" not in lines[5]
  rounds = [json.loads(l)["round"] for l in open(os.path.join(stopped.workdir, "metrics.jsonl"))]
  assert rounds == [1, 2, 3, 4]  # resumed from its round-2 checkpoint, not restarted
  for name, column in (("sweep.csv", "total_seconds"), ("sweep.md", None)):
    assert without(os.path.join(broken, name), column) == \
        without(os.path.join(straight, name), column)
  for png in ("accuracy_vs_bytes.png", "curves.png"):
    assert os.path.getsize(os.path.join(broken, png)) > 0

  # The table against numpy over the summaries the runs wrote.
  rows = list(csv.DictReader(open(os.path.join(straight, "sweep.csv"))))
  assert [(r["client.lr"], r["seed"]) for r in rows] == [
      (lr, s) for lr in ("0.05", "0.1") for s in "012"]
  workdirs = sorted(glob.glob(os.path.join(straight, "client.lr=0.1-*")))
  table = sweep.table(sweep.read_runs(workdirs))
  summaries = [json.load(open(p)) for p in
               sorted(glob.glob(os.path.join(straight, "client.lr=0.1-*", "summary.json")))]
  acc = [s["test_accuracy"] for s in summaries]
  seconds = [s["total_seconds"] for s in summaries]
  md = open(os.path.join(straight, "sweep.md")).read()
  assert f"| 0.1 | 3 | {np.mean(acc):.4f} ± {np.std(acc, ddof=1):.4f} | none |" in md
  assert f"| {np.mean(seconds):.1f} ± {np.std(seconds, ddof=1):.1f} |" in md
  assert len(table) == 3  # read_runs labels each workdir as its own point
  ours = sweep.table([sweep.row({"client.lr": 0.1, "seed": s["config"]["seed"]}, s, "")
                      for s in summaries])
  assert ours[0]["seeds"] == 3
  np.testing.assert_allclose(ours[0]["test_accuracy"], (np.mean(acc), np.std(acc, ddof=1)))
  assert ours[0]["epsilon"] == (None, None)


def test_a_bad_point_stops_the_sweep_before_anything_trains(tmp_path, capsys):
  out = tmp_path / "out"
  assert sweep.main([*TINY, "--grid", "client.local_steps=3,0", "--out", str(out)]) == 2
  err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
  assert len(err) == 1 and err[0].startswith("config error: client.local_steps: "), err
  assert not glob.glob(str(out / "*" / "metrics.jsonl"))
  assert sweep.main([*TINY, "--grid", "client.lrr=1", "--out", str(out)]) == 2
  assert capsys.readouterr().err.startswith("config error: client.lrr: unknown key")


def test_compare_makes_the_table_of_existing_workdirs(tmp_path):
  def tiny(lr):
    c = default_config()
    c.rounds, c.cohort_size, c.data.num_sites, c.client.lr = 2, 5, 10, lr
    c.log.progress, c.log.tensorboard = False, False
    return c
  summaries = {lr: Experiment(tiny(lr)).run(str(tmp_path / f"lr{lr}")) for lr in (0.05, 0.2)}
  out = str(tmp_path / "cmp")
  assert sweep.main(["compare", str(tmp_path / "lr0.05"), str(tmp_path / "lr0.2"),
                     "--out", out]) == 0
  rows = list(csv.DictReader(open(os.path.join(out, "sweep.csv"))))
  assert [r["run"] for r in rows] == ["lr0.05", "lr0.2"]
  assert [float(r["test_accuracy"]) for r in rows] == [summaries[0.05]["test_accuracy"],
                                                      summaries[0.2]["test_accuracy"]]
  md = open(os.path.join(out, "sweep.md")).read()
  assert f"| lr0.2 | 1 | {summaries[0.2]['test_accuracy']:.4f} | none |" in md
  assert os.path.getsize(os.path.join(out, "curves.png")) > 0


def test_sweep_md_without_grid_keys_has_as_many_header_as_separator_cells():
  """`sweep` without --grid: the table's only columns are the seeds and the metrics."""
  rows = [{"seed": s, "test_accuracy": 0.5 + s / 10, "epsilon": None, "delta": None,
           "bytes_total": 2e6, "total_seconds": 3.0, "rounds_completed": 2, "workdir": "w"}
          for s in range(2)]
  header, separator, body = sweep.markdown(rows).splitlines()
  cells = lambda line: line.strip().strip("|").split("|")
  assert len(cells(header)) == len(cells(separator)) == len(cells(body)) == 5
  assert body == "| 2 | 0.5500 ± 0.0707 | none | 2.00 ± 0.00 | 3.0 ± 0.0 |"
