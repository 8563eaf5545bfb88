r"""Runs every variant of configs/compare_comm.py as a sweep (fedjax_lab.sweep), then plots
loss vs rounds and loss vs bytes.

  python benchmarks/plot_comparison.py                  # 20 runs (~10-25 s each), then plots
  python benchmarks/plot_comparison.py --plot_only      # re-plot existing runs
  python benchmarks/plot_comparison.py --problems logistic --rounds 30   # a quick look

Runs go to OUT/<problem>/variant=<variant>-seed=0-<hash> (--out, default
runs/benchmarks/compare; a rerun only trains what is missing), with the sweep's sweep.csv,
sweep.md and plots per problem; this script's plots to OUT/compare_<problem>.png (the
committed benchmarks/plots/ are such figures), one figure per problem: test loss vs rounds
(= computation: every variant takes 10 local steps a round), test loss vs bytes communicated
(log scale), test accuracy vs bytes. The model
evaluated is the global model (FedAvg, SCAFFOLD) or the average of the site models
(ProxSkip, RandCom, D-SGD). A markdown table of final numbers, and of the round and bytes at
which each variant first reaches a fixed test loss, is printed at the end.
"""

import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

import importlib.util  # pylint: disable=g-import-not-at-top

import fedjax_lab  # pylint: disable=g-import-not-at-top

fedjax_lab.setup_cpu_devices()  # before jax: one XLA device per CPU core
from fedjax_lab import runs, sweep  # noqa: E402  pylint: disable=g-import-not-at-top

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "compare_comm", os.path.join(_ROOT, "configs", "compare_comm.py"))
compare_comm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare_comm)

# Test loss every variant is timed to (round and MB when first reached), per problem.
TARGET_TEST_LOSS = {"digits": 0.10, "logistic": 0.45}
STYLE = {  # variant -> (color, linestyle)
    "fedavg": ("black", "-"), "scaffold": ("tab:gray", "--"),
    "proxskip_p1": ("#08306b", "-"), "proxskip_p0.5": ("#2171b5", "-"),
    "proxskip_p0.2": ("#6baed6", "-"), "proxskip_p0.1": ("#9ecae1", "-"),
    "randcom_ring": ("tab:red", "-"), "randcom_torus": ("tab:red", "--"),
    "dsgd_ring": ("tab:green", "-"), "dsgd_torus": ("tab:green", "--"),
}


def points(problem, out, rounds=None):
  """One sweep point per variant of the problem (seed 0), under out/<problem>."""
  result = []
  for variant in compare_comm.VARIANTS:
    c = runs.load_config_file(
        f"{os.path.join(_ROOT, 'configs', 'compare_comm.py')}:{problem},{variant}")
    c.log.progress, c.log.tensorboard = False, False
    if rounds:
      c.rounds = rounds
    result.append(sweep.make_point({"variant": variant}, c, os.path.join(out, problem)))
  return result


def load(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return None
  rows = [json.loads(l) for l in open(path)]
  return [r for r in rows if r["test_loss"] is not None]


def plot(problem, problem_points, out_dir):
  fig, axes = plt.subplots(1, 3, figsize=(13.5, 3.9))
  table = []
  for point in problem_points:
    variant = point.label["variant"]
    rows = load(point.workdir)
    if not rows:
      continue
    color, ls = STYLE[variant]
    rounds = [r["round"] for r in rows]
    loss = [r["test_loss"] for r in rows]
    acc = [r["test_accuracy"] for r in rows]
    mbytes = [r["bytes_total"] / 1e6 for r in rows]
    kw = dict(color=color, ls=ls, lw=1.3, label=variant)
    axes[0].plot(rounds, loss, **kw)
    axes[1].plot(mbytes, loss, **kw)
    axes[2].plot(mbytes, acc, **kw)
    hit = next((r for r in rows if r["test_loss"] <= TARGET_TEST_LOSS[problem]), None)
    table.append((variant, rows[-1]["round"], loss[-1], acc[-1], mbytes[-1],
                  (hit["round"], hit["bytes_total"] / 1e6) if hit else None))
  title = {"digits": "MLP on digits, 16 sites Dirichlet(0.1)",
           "logistic": "l2 logistic regression on digits, 16 sites Dirichlet(0.1)"}[problem]
  axes[0].set(xlabel="round (10 local steps each)", ylabel="test loss", yscale="log")
  axes[1].set(xlabel="MB communicated (total)", ylabel="test loss", xscale="log",
              yscale="log")
  axes[2].set(xlabel="MB communicated (total)", ylabel="test accuracy", xscale="log",
              ylim=(0.0, 1.0))
  for ax in axes:
    ax.grid(alpha=0.3, which="both", lw=0.5)
  axes[2].legend(fontsize=7, loc="lower right", ncol=2)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, f"compare_{problem}.png")
  fig.savefig(path, dpi=80)
  plt.close(fig)
  return path, table


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--problems", nargs="+", default=list(compare_comm.PROBLEMS))
  parser.add_argument("--rounds", type=int, default=None, help="override config.rounds")
  parser.add_argument("--plot_only", action="store_true")
  parser.add_argument("--out", default=os.path.join("runs", "benchmarks", "compare"))
  args = parser.parse_args()
  for problem in args.problems:
    problem_points = points(problem, args.out, args.rounds)
    if not args.plot_only:
      rows = sweep.run_points(problem_points, report=lambda line: print(line, flush=True))
      sweep.write_outputs(rows, os.path.join(args.out, problem))
    path, table = plot(problem, problem_points, args.out)
    target = TARGET_TEST_LOSS[problem]
    print(f"\n{path}\n\n| {problem} variant | rounds | test loss | test accuracy | MB sent | "
          f"round, MB at test loss <= {target} |")
    print("|---|---:|---:|---:|---:|---:|")
    for variant, rounds, loss, acc, mb, hit in table:
      when = f"{hit[0]}, {hit[1]:.1f}" if hit else "not reached"
      print(f"| {variant} | {rounds} | {loss:.4f} | {acc:.4f} | {mb:.1f} | {when} |")


if __name__ == "__main__":
  main()
