r"""Transcriptomics study (issue 18; after arXiv 2402.14527 and 2308.04137): GSE7390 prognosis
and pbmc68k cell types, central vs federated, sites, label skew, seeds, input noise, DP,
runtime and bytes; optionally the same federated run on Flower.

  python benchmarks/transcriptomics_study.py [--seeds 3] [--out runs/benchmarks/transcriptomics]
      [--quick] [--flower]

Every point trains with the lab's Experiment API (one workdir each under --out) from
configs/gse7390_prognosis.py (logistic regression) and configs/pbmc_celltype.py, overriding:
  sites        data.num_sites = cohort_size in {2, 3, 5, 10}, IID and label skew
               (Dirichlet alpha 0.5); "central" = one site holding all the training data
               (experiment.centralized_config of the 5-site config: same rounds, 5 x the steps)
  seeds        0 .. --seeds-1 (init, partition, minibatches); table: mean +- sample std over
               seeds, and the 95% bootstrap interval over test examples of seed 0
  noise        eval.robustness on every point: accuracy / AUC under Gaussian noise of 0.3 and
               1.0 x each gene's std (5 sites IID shown)
  DP           example-level DP-SGD, sigma calibrated to epsilon in {1, 4, 16} (delta 1e-5),
               5 sites IID, seed 0
  runtime      seconds per round (mean over the run, the first round's compile included) and
               bytes per round (model down + up, float32) from summary.json
Writes OUT/study.json, OUT/study.md (the table) and OUT/*.png; RESULTS.md quotes a run.
"""

import argparse
import json
import os
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

from fedjax_lab import runs  # noqa: E402
from fedjax_lab.experiment import Experiment, centralized_config  # noqa: E402

TASKS = {"gse7390": ("configs/gse7390_prognosis.py", "auc"),
         "pbmc68k": ("configs/pbmc_celltype.py", "accuracy")}


def base_config(task: str, quick: bool):
  c = runs.load_config_file(os.path.join(ROOT, TASKS[task][0]))
  c.log.progress = c.log.tensorboard = False
  c.eval.centralized_baseline = False
  c.eval.robustness = True
  c.eval.robustness_noise = (0.3, 1.0)
  c.eval.robustness_mask = ()
  c.eval.bootstrap = 500
  c.checkpoint.every = 1000
  if task == "pbmc68k":
    c.rounds = 20 if quick else 50
  elif quick:
    c.rounds = 10
  return c


def point(task, sites, partition, seed, quick, dp_epsilon=None):
  c = base_config(task, quick)
  c.seed = seed
  central = sites == "central"
  n = 5 if central else sites
  c.data.num_sites = c.cohort_size = n
  c.data.partition = partition
  if partition == "dirichlet":
    c.data.alpha = 0.5
  c.data.min_examples = 5 if task == "gse7390" else 10
  if dp_epsilon is not None:
    c.dp.level, c.dp.target_epsilon = "example", float(dp_epsilon)
    c.dp.clip_norm = 1.0
    c.data.standardize = "none" if task == "pbmc68k" else "none"
  if central:
    c = centralized_config(c)
  return c


def train(c, out):
  name = runs.run_name([], c)
  workdir = os.path.join(out, name)
  path = os.path.join(workdir, "summary.json")
  if os.path.exists(path):
    return json.load(open(path))
  t0 = time.perf_counter()
  summary = Experiment(c).run(workdir)
  summary["wall_seconds"] = time.perf_counter() - t0
  with open(path, "w") as f:
    json.dump(summary, f, indent=2)
  return summary


def row(summaries):
  """Mean +- std over seeds, and seed 0's bootstrap interval, of accuracy / AUC / F1."""
  def stat(key):
    v = np.array([s[key] for s in summaries if s.get(key) is not None], float)
    return (float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0) if len(v) else None
  s0 = summaries[0]
  rounds = s0["rounds_completed"]
  noise = s0.get("robustness", {}).get("gaussian_noise", {})
  return {"accuracy": stat("test_accuracy"), "auc": stat("test_auc"),
          "macro_f1": stat("test_macro_f1"), "accuracy_ci95": s0.get("test_accuracy_ci95"),
          "auc_ci95": s0.get("test_auc_ci95"), "epsilon": s0["epsilon"],
          "noise": {k: (v["accuracy"], v["auc"]) for k, v in noise.items()},
          "seconds_per_round": float(np.mean([s["total_seconds"] for s in summaries])) / rounds,
          "bytes_per_round": s0["bytes_total"] / rounds, "seeds": len(summaries)}


def fmt(m):
  return "n/a" if m is None else f"{m[0]:.3f} ± {m[1]:.3f}"


def ci(c):
  return "n/a" if not c else f"[{c[0]:.3f}, {c[1]:.3f}]"


def table(results) -> str:
  lines = ["| task | setting | seeds | accuracy | AUC | AUC 95% CI (seed 0) | macro-F1 | "
           "acc / AUC, noise 0.3 | acc / AUC, noise 1.0 | s / round | bytes / round |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for (task, setting), r in results.items():
    nz = lambda k: ("n/a" if k not in r["noise"] else
                    f"{r['noise'][k][0]:.3f} / {r['noise'][k][1]:.3f}")
    eps = "" if r["epsilon"] is None else f" (ε={r['epsilon']:.2f})"
    lines.append(f"| {task} | {setting}{eps} | {r['seeds']} | {fmt(r['accuracy'])} | "
                 f"{fmt(r['auc'])} | {ci(r['auc_ci95'])} | {fmt(r['macro_f1'])} | "
                 f"{nz('0.3')} | {nz('1')} | {r['seconds_per_round']:.3f} | "
                 f"{r['bytes_per_round']:.0f} |")
  return "\n".join(lines)


def plots(results, out):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  for ax, task in zip(axes, TASKS):
    metric = TASKS[task][1]
    for partition, style in (("iid", "o-"), ("dirichlet", "s--")):
      xs, ys, es = [], [], []
      for n in (2, 3, 5, 10):
        r = results.get((task, f"{n} sites {partition}"))
        if r and r[metric]:
          xs.append(n), ys.append(r[metric][0]), es.append(r[metric][1])
      ax.errorbar(xs, ys, es, fmt=style, capsize=3, label=f"federated, {partition}")
    c = results.get((task, "central"))
    if c and c[metric]:
      ax.axhline(c[metric][0], color="k", lw=1, label="central")
    ax.set(title=task, xlabel="sites", ylabel=f"test {metric} (mean ± std over seeds)")
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "transcriptomics_sites.png"), dpi=110)
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  for ax, task in zip(axes, TASKS):
    metric = TASKS[task][1]
    r = results.get((task, "5 sites iid"))
    if r:
      levels = [0.0] + [float(k) for k in r["noise"]]
      vals = [r[metric][0]] + [v[0 if metric == "accuracy" else 1] for v in r["noise"].values()]
      ax.plot(levels, vals, "o-", label="federated 5 sites")
    c = results.get((task, "central"))
    if c:
      levels = [0.0] + [float(k) for k in c["noise"]]
      vals = [c[metric][0]] + [v[0 if metric == "accuracy" else 1] for v in c["noise"].values()]
      ax.plot(levels, vals, "s--", label="central")
    ax.set(title=task, xlabel="Gaussian noise (x gene std)", ylabel=f"test {metric}")
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "transcriptomics_noise.png"), dpi=110)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--seeds", type=int, default=3)
  p.add_argument("--out", default=os.path.join("runs", "benchmarks", "transcriptomics"))
  p.add_argument("--quick", action="store_true", help="fewer rounds (smoke test)")
  p.add_argument("--tasks", default="gse7390,pbmc68k")
  p.add_argument("--flower", action="store_true", help="also the GSE7390 3-site run on Flower")
  a = p.parse_args(argv)
  import logging
  logging.getLogger("fedjax_lab").setLevel(logging.WARNING)
  os.makedirs(a.out, exist_ok=True)
  results = {}
  for task in a.tasks.split(","):
    settings = [("central", "central", "iid")]
    settings += [(f"{n} sites {p}", n, p) for p in ("iid", "dirichlet") for n in (2, 3, 5, 10)]
    for label, n, part in settings:
      summaries = [train(point(task, n, part, s, a.quick), a.out) for s in range(a.seeds)]
      results[(task, label)] = row(summaries)
      r = results[(task, label)]
      print(f"{task:8s} {label:16s} acc {fmt(r['accuracy'])} auc {fmt(r['auc'])}", flush=True)
    for eps in (1, 4, 16):
      label = f"5 sites iid, DP-SGD ε={eps}"
      results[(task, label)] = row([train(point(task, 5, "iid", 0, a.quick, eps), a.out)])
      r = results[(task, label)]
      print(f"{task:8s} {label:16s} acc {fmt(r['accuracy'])} auc {fmt(r['auc'])}", flush=True)
  md = table(results)
  with open(os.path.join(a.out, "study.md"), "w") as f:
    f.write(md + "\n")
  with open(os.path.join(a.out, "study.json"), "w") as f:
    json.dump({f"{t} | {s}": r for (t, s), r in results.items()}, f, indent=2)
  plots(results, a.out)
  print(md)
  if a.flower:
    from fedjax_lab.flower import run as flower_run
    flower_run.main(["--config", "configs/gse7390_prognosis.py", "--out",
                     os.path.join(a.out, "flower")])


if __name__ == "__main__":
  main()
