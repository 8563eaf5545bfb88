r"""Regenerates the membership-inference and audit numbers of benchmarks/RESULTS.md (issue 15).

  python benchmarks/mia_study.py                        # every study, ~15-25 min on 2 CPU cores
  python benchmarks/mia_study.py --only outsider site   # some of them
  python benchmarks/mia_study.py --quick                # smoke run (tiny sizes, ~2 min)

Studies (the configs/mia_*.py files with the sizes below; seeds fixed, so reruns on the same
jax version give the same numbers):
  server       configs/mia_server.py: 64 models, 16 leave-one-out targets
  outsider     configs/mia_outsider.py with target.rounds=OUTSIDER_ROUNDS: K FedAvg runs,
               each over a random half of the digits training split
  site         configs/mia_site.py with target.rounds=SITE_ROUNDS: K FedAvg runs, each over a
               random half of the 100 sites
  shots        configs/mia_shots.py on digits (MLP extractor)
  shots_pbmc   configs/mia_shots.py on pbmc68k (PCA extractor, classes with >= 40 cells)
  audit        configs/mia_audit.py :none, :example, :site (500 canaries)
Writes <out>/<study>.json and prints each study's table.
"""

import argparse
import importlib.util
import json
import os
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import fedjax_lab  # noqa: F401,E402  (before jax: the lab's CPU device setup)

from fedjax_lab.attacks import audit, membership as mia, shots  # noqa: E402

STUDIES = ("server", "outsider", "site", "shots", "shots_pbmc", "audit")
OUTSIDER_ROUNDS = 300
SITE_ROUNDS = 300


def load(name, arg=None):
  path = os.path.join(ROOT, "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config() if arg is None else module.get_config(arg)


def threat(name, quick, **overrides):
  c = load(f"mia_{name}")
  c.mia.num_models, c.mia.num_targets = (8, 4) if quick else (64, 16)
  for key, value in overrides.items():
    node, *path = key.split(".")
    target = c[node]
    for p in path[:-1]:
      target = target[p]
    target[path[-1]] = value
  results = {"server": mia.server, "outsider": mia.outsider, "site": mia.site_level}[name](c)
  summary = mia.summarize(results)
  print(mia.format_table(summary))
  return summary


def run(study, quick, out):
  if study == "server":
    return threat("server", quick, **({"mia.server_round": 5} if quick else {}))
  if study == "outsider":
    return threat("outsider", quick, **{"target.rounds": 5 if quick else OUTSIDER_ROUNDS})
  if study == "site":
    return threat("site", quick, **{"target.rounds": 5 if quick else SITE_ROUNDS})
  if study in ("shots", "shots_pbmc"):
    c = load("mia_shots")
    c.mia.num_models, c.mia.num_targets, c.mia.shots_seeds = 32, 16, 2
    if study == "shots_pbmc":
      c.target.data.name = "pbmc68k"
      c.mia.extractor, c.mia.pca_dim, c.mia.min_class_count = "pca", 32, 40
      c.mia.feature_fraction, c.mia.shots = 0.3, (1, 2, 4, 8)
    if quick:
      c.mia.shots, c.mia.shots_seeds, c.mia.num_models, c.mia.num_targets = (1, 4), 1, 8, 4
      c.mia.shots_steps = 50
    summary = shots.study(c, out)
    os.replace(os.path.join(out, "shots.json"), os.path.join(out, f"{study}.raw.json"))
    os.replace(os.path.join(out, "shots.png"), os.path.join(out, f"{study}.png"))
    print(shots.format_table(summary))
    return summary
  if study == "audit":
    summary = {}
    for level in ("none", "example", "site"):
      c = load("mia_audit", level)
      if quick:
        c.target.rounds, c.audit.num_canaries = 5, 50
      summary[level] = audit.canary_audit(c.target, c.audit.num_canaries, c.audit.seed)
      r = summary[level]
      print(f":{level}\n  " + "\n  ".join(audit.format_result(r)))
    return summary
  raise ValueError(study)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only", nargs="+", choices=STUDIES, default=STUDIES)
  parser.add_argument("--out", default=os.path.join("runs", "mia_study"))
  parser.add_argument("--quick", action="store_true")
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  for study in args.only:
    print(f"== {study}", flush=True)
    t0 = time.perf_counter()
    summary = run(study, args.quick, args.out)
    print(f"== {study}: {time.perf_counter() - t0:.0f} s", flush=True)
    with open(os.path.join(args.out, f"{study}.json"), "w") as f:
      json.dump(summary, f, indent=1, default=float)


if __name__ == "__main__":
  main()
