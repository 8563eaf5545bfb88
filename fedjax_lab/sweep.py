r"""Sweeps and ablations in one command: every grid point x seed its own run, then one table.

  python -m fedjax_lab.sweep --config configs/digits_dp.py --grid dp.target_epsilon=1,2,4,8 \
      --grid client.lr=0.05,0.1 --seeds 5 [--out DIR] [--set key=value ...]
  python -m fedjax_lab.sweep compare runs/a runs/b ... [--out DIR]

Every point (grid values x seed 0 .. seeds-1) trains in its own workdir under --out (default
runs/sweeps/<config>-<grid keys>-<hash>), named as train.py names workdirs
(fedjax_lab/runs.py). Every point's config is checked before anything trains (a bad key or
value, a workdir holding another config: one line, exit 2). A rerun skips the points whose
summary.json is there for the requested rounds and resumes the others from their
checkpoints, so an interrupted sweep finishes where it stopped. Outputs in --out:
  sweep.csv   one row per point and seed: grid values, seed, test_accuracy, epsilon, delta,
              bytes_total, total_seconds, rounds_completed, workdir (relative to --out)
  sweep.md    per grid point, mean +- std (sample, ddof=1) over seeds of the final test
              accuracy, epsilon, MB communicated and seconds
  accuracy_vs_epsilon.png (under DP), accuracy_vs_bytes.png, curves.png (test accuracy and
              train loss over rounds, mean +- std band over seeds, one line per grid point)
`compare` writes the same files for existing workdirs, one row each (label: the workdir's name).

Seeds run one after another, each a full run: vmapping them (docs/running.md, "Seeds as an axis")
would also share one partition of the data over the sites, which a seed draws, and
benchmarks/sweep_seeds.py measures what it would save (benchmarks/RESULTS.md).
"""

import argparse
import ast
import copy
import csv
import itertools
import json
import os
import sys
import time
from typing import Callable, NamedTuple

import fedjax_lab

if __name__ == "__main__":  # the command (not the library): before anything imports jax
  fedjax_lab.setup_cpu_devices()

from absl import logging as absl_logging  # noqa: E402
import numpy as np  # noqa: E402

from fedjax_lab import config as config_lib  # noqa: E402
from fedjax_lab import runs  # noqa: E402
from fedjax_lab.errors import ConfigError  # noqa: E402
from fedjax_lab.experiment import Experiment  # noqa: E402

# Grid keys that set epsilon: accuracy vs epsilon draws one line through their values.
EPSILON_KEYS = ("dp.target_epsilon", "dp.noise_multiplier")
CSV_COLUMNS = ("test_accuracy", "epsilon", "delta", "bytes_total", "total_seconds",
               "rounds_completed", "workdir")


class Point(NamedTuple):
  label: dict      # {grid key: value, ..., "seed": seed}: a row of the table
  config: object   # the resolved ml_collections.ConfigDict
  workdir: str


def parse_value(text: str):
  """A Python literal (1, 0.5, True, 'adam', (64, 32)), else the bare string."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def parse_grid(text: str) -> tuple[str, list]:
  """'client.lr=0.05,0.1' -> ('client.lr', [0.05, 0.1])."""
  key, eq, values = text.partition("=")
  if not eq or not values:
    raise ConfigError("--grid", f"'{text}' is not KEY=V1,V2,...; e.g. --grid client.lr=0.05,0.1")
  return key, [parse_value(v) for v in values.split(",")]


def set_key(config, key: str, value):
  """config[key] = value for a dotted key; an unknown key or a wrongly typed value is a
  ConfigError naming the key."""
  *parents, leaf = key.split(".")
  node = config
  try:
    for p in parents:
      node = node[p]
    node[leaf] = value
  except (KeyError, AttributeError):
    raise config_lib.unknown_key(key) from None
  except TypeError:
    raise ConfigError(key, f"cannot be {value!r} (a {type(value).__name__}); give a "
                      f"{type(node[leaf]).__name__}") from None


def make_point(label: dict, config, out: str) -> Point:
  """A point of a sweep under `out`, its workdir named by its label and its config."""
  label = {**label, "seed": config.seed}
  name = runs.run_name([f"{k}={v}" for k, v in label.items()], config)
  return Point(label, config, os.path.join(out, name))


def grid_points(base, grid: list[tuple[str, list]], seeds, out: str) -> list[Point]:
  """Every combination of the grid's values (the first key outermost) x every seed."""
  points = []
  for values in itertools.product(*(v for _, v in grid)):
    for seed in seeds:
      config = copy.deepcopy(base)
      label = dict(zip([k for k, _ in grid], values))
      for key, value in label.items():
        set_key(config, key, value)
      config.seed = seed
      points.append(make_point(label, config, out))
  return points


def check_points(points) -> None:
  """Every point's config valid and its workdir its own, before anything trains."""
  for point in points:
    config_lib.validate(point.config)
    runs.check_resume(point.workdir, point.config)


def finished(point: Point) -> dict | None:
  """The point's summary, if its run is done: summary.json written for the requested rounds
  (a run stopped early by its privacy budget counts as done)."""
  path = os.path.join(point.workdir, "summary.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    summary = json.load(f)
  return summary if summary["config"]["rounds"] == point.config.rounds else None


def row(label: dict, summary: dict, workdir: str) -> dict:
  privacy = summary.get("privacy") or {}
  return {**label, "test_accuracy": summary["test_accuracy"], "epsilon": summary["epsilon"],
          "delta": privacy.get("delta"), "bytes_total": summary["bytes_total"],
          "total_seconds": summary["total_seconds"],
          "rounds_completed": summary["rounds_completed"], "workdir": workdir}


def _label_text(label: dict) -> str:
  return " ".join(f"{k}={v}" for k, v in label.items())


def run_points(points, report: Callable[[str], None] = print) -> list[dict]:
  """Trains every point not finished yet, in order; returns one row per point."""
  check_points(points)
  rows = []
  for i, point in enumerate(points, 1):
    summary, t0 = finished(point), time.perf_counter()
    how = "done before"
    if summary is None:
      summary = Experiment(point.config).run(point.workdir)
      how = f"{time.perf_counter() - t0:.0f} s"
    eps = summary["epsilon"]
    report(f"[{i}/{len(points)}] {_label_text(point.label)}: test_accuracy="
           f"{summary['test_accuracy']:.4f} epsilon={'none' if eps is None else f'{eps:.3f}'}"
           f" ({how})")
    rows.append(row(point.label, summary, point.workdir))
  return rows


def read_runs(workdirs) -> list[dict]:
  """One row per existing workdir (its summary.json), labelled by the workdir's name."""
  rows = []
  for workdir in workdirs:
    path = os.path.join(workdir, "summary.json")
    if not os.path.exists(path):
      raise ConfigError("compare", f"{workdir} has no summary.json; give finished workdirs")
    with open(path) as f:
      summary = json.load(f)
    label = {"run": os.path.basename(os.path.normpath(workdir)),
             "seed": summary["config"]["seed"]}
    rows.append(row(label, summary, workdir))
  return rows


def _group_keys(rows) -> list[str]:
  return [k for k in rows[0] if k not in ("seed", *CSV_COLUMNS)]


def groups(rows) -> list[tuple[dict, list[dict]]]:
  """Rows grouped by their grid values (everything but the seed), in first-seen order."""
  keys, out = _group_keys(rows), {}
  for r in rows:
    out.setdefault(tuple(r[k] for k in keys), []).append(r)
  return [(dict(zip(keys, values)), members) for values, members in out.items()]


def mean_std(values) -> tuple[float | None, float | None]:
  """Mean and sample std (ddof=1; None for one value) of the non-null values."""
  values = [v for v in values if v is not None]
  if not values:
    return None, None
  return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else None


def table(rows) -> list[dict]:
  """Per grid point: its values, the number of seeds, mean and std of each reported figure."""
  out = []
  for label, members in groups(rows):
    stats = {k: mean_std([r[k] for r in members])
             for k in ("test_accuracy", "epsilon", "bytes_total", "total_seconds")}
    out.append({"label": label, "seeds": len(members), **stats})
  return out


def _cell(stat, scale=1.0, digits=4) -> str:
  mean, std = stat
  if mean is None:
    return "none"
  return f"{mean * scale:.{digits}f}" + ("" if std is None else f" ± {std * scale:.{digits}f}")


def markdown(rows) -> str:
  keys = _group_keys(rows)
  row = lambda cells: "| " + " | ".join(cells) + " |"
  lines = [row([*keys, "seeds", "test accuracy", "epsilon", "MB communicated", "seconds"]),
           row(["---"] * len(keys) + ["---:"] * 5)]
  for t in table(rows):
    lines.append(row([str(t["label"][k]) for k in keys] + [
        str(t["seeds"]), _cell(t["test_accuracy"]), _cell(t["epsilon"], digits=3),
        _cell(t["bytes_total"], 1e-6, 2), _cell(t["total_seconds"], digits=1)]))
  return "\n".join(lines) + "\n"


def metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def _band(ax, runs_rows, key, label):
  """Mean +- std over seeds of `key` at the rounds every seed has it."""
  series = [{r["round"]: r[key] for r in rows if r.get(key) is not None} for rows in runs_rows]
  rounds = sorted(set.intersection(*(set(s) for s in series)))
  values = np.array([[s[r] for r in rounds] for s in series])
  mean = values.mean(0)
  std = values.std(0, ddof=1) if len(values) > 1 else np.zeros_like(mean)
  (line,) = ax.plot(rounds, mean, lw=1.3, label=label)
  ax.fill_between(rounds, mean - std, mean + std, color=line.get_color(), alpha=0.2, lw=0)


def plot(rows, out: str) -> list[str]:
  """The PNGs of a sweep (see the module docstring); returns their paths."""
  import matplotlib  # optional: pyplot is slow to import and only the plots need it
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # optional: as matplotlib above
  stats, paths = table(rows), []
  name = lambda label: _label_text(label) or "run"

  def save(fig, filename):
    fig.tight_layout()
    path = os.path.join(out, filename)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    paths.append(path)

  if any(t["epsilon"][0] is not None for t in stats):
    fig, ax = plt.subplots(figsize=(6, 4))
    lines = {}  # one line through the epsilon keys' values, per value of the other keys
    for t in stats:
      rest = {k: v for k, v in t["label"].items() if k not in EPSILON_KEYS}
      lines.setdefault(name(rest), []).append(t)
    for label, ts in lines.items():
      ts = sorted(ts, key=lambda t: t["epsilon"][0])
      ax.errorbar([t["epsilon"][0] for t in ts], [t["test_accuracy"][0] for t in ts],
                  yerr=[t["test_accuracy"][1] or 0 for t in ts], marker="o", capsize=3,
                  label=label)
    ax.set(xscale="log", xlabel="epsilon", ylabel="test accuracy")
    ax.legend(fontsize=7)
    save(fig, "accuracy_vs_epsilon.png")
  fig, ax = plt.subplots(figsize=(6, 4))
  for t in stats:
    ax.errorbar([t["bytes_total"][0] / 1e6], [t["test_accuracy"][0]],
                yerr=[t["test_accuracy"][1] or 0], marker="o", capsize=3, label=name(t["label"]))
  ax.set(xscale="log", xlabel="MB communicated (total)", ylabel="test accuracy")
  ax.legend(fontsize=7)
  save(fig, "accuracy_vs_bytes.png")
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for label, members in groups(rows):
    curves = [metrics(r["workdir"]) for r in members]
    _band(axes[0], curves, "test_accuracy", name(label))
    _band(axes[1], curves, "train_loss", name(label))
  axes[0].set(xlabel="round", ylabel="test accuracy")
  axes[1].set(xlabel="round", ylabel="train loss", yscale="log")
  axes[0].legend(fontsize=7)
  save(fig, "curves.png")
  return paths


def write_outputs(rows, out: str) -> list[str]:
  """sweep.csv, sweep.md and the plots in `out`; returns their paths."""
  os.makedirs(out, exist_ok=True)
  path_csv = os.path.join(out, "sweep.csv")
  with open(path_csv, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    for r in rows:  # workdirs relative to `out`: the table reads the same wherever it lives
      writer.writerow({**r, "workdir": os.path.relpath(r["workdir"], out)})
  path_md = os.path.join(out, "sweep.md")
  with open(path_md, "w") as f:
    f.write(markdown(rows))
  return [path_csv, path_md, *plot(rows, out)]


def _parser(compare: bool) -> argparse.ArgumentParser:
  if compare:
    p = argparse.ArgumentParser(prog="python -m fedjax_lab.sweep compare",
                                description="The sweep's table and plots for existing workdirs.")
    p.add_argument("workdirs", nargs="+")
    p.add_argument("--out", default=os.path.join("runs", "compare"))
    return p
  p = argparse.ArgumentParser(prog="python -m fedjax_lab.sweep",
                              description=__doc__.splitlines()[0])
  p.add_argument("--config", required=True, help="configs/X.py[:arg]")
  p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...")
  p.add_argument("--seeds", type=int, default=1, help="seeds 0 .. SEEDS-1 of every point")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="override a key of the config for every point")
  p.add_argument("--out", default=None, help="default runs/sweeps/<config>-<grid keys>-<hash>")
  return p


def sweep_points(args) -> tuple[list[Point], str]:
  """The points of a sweep command line, and its output folder."""
  file_config = runs.load_config_file(args.config)
  base = runs.load_config_file(args.config)
  base.log.progress = False  # one line per point instead (log.* never changes a run)
  for text in args.set:
    key, eq, value = text.partition("=")
    if not eq:
      raise ConfigError("--set", f"'{text}' is not KEY=VALUE")
    set_key(base, key, parse_value(value))
  grid = [parse_grid(g) for g in args.grid]
  if args.seeds < 1:
    raise ConfigError("--seeds", f"must be >= 1, got {args.seeds}")
  out = args.out or os.path.join("runs", "sweeps", runs.run_name(
      runs.spec_parts(args.config) + runs.overrides(base, file_config)
      + ["+".join(k for k, _ in grid)], base))
  return grid_points(base, grid, range(args.seeds), out), out


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  compare = bool(argv) and argv[0] == "compare"
  args = _parser(compare).parse_args(argv[1:] if compare else argv)
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
  try:
    if compare:
      rows, out = read_runs(args.workdirs), args.out
    else:
      points, out = sweep_points(args)
      rows = run_points(points)
  except ConfigError as e:
    print(f"config error: {e}", file=sys.stderr)
    return 2
  for path in write_outputs(rows, out):
    print(f"wrote {path}")
  print(markdown(rows), end="")
  return 0


if __name__ == "__main__":
  sys.exit(main())
