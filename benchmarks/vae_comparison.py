r"""DPD-fVAE's comparison on digits: decoder-only vs full synchronisation, without DP and at
example-level epsilon 10 and 1 (delta 1e-5), classifier-on-synthetic accuracy on the real test
set (5 trials) and Frechet distance. Writes a markdown table (stdout and --out).

  python benchmarks/vae_comparison.py --out runs/vae_comparison/table.md [--rounds 60]

Rows under DP: sync=all (the whole VAE clipped, noised, released), sync=decoder with
dp.encoder=private (the sound DPD-fVAE: whole-VAE DP-SGD, only the decoder released) and
sync=decoder with dp.encoder=paper (the paper's: only the decoder's gradient clipped and
noised; its epsilon is NOT a proven bound, docs/dp.md).
"""

import argparse
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import fedjax_lab

fedjax_lab.setup_cpu_devices()  # before jax: one XLA device per CPU core

ROWS = [  # (sync, epsilon or None, encoder mode)
    ("all", None, "-"), ("decoder", None, "-"),
    ("all", 10.0, "private"), ("decoder", 10.0, "private"), ("decoder", 10.0, "paper"),
    ("all", 1.0, "private"), ("decoder", 1.0, "private"), ("decoder", 1.0, "paper"),
]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", default=os.path.join(ROOT, "runs", "vae_comparison", "table.md"))
  parser.add_argument("--rounds", type=int, default=60)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  from fedjax_lab import runs
  dpd_fvae = runs.load_module(os.path.join(runs.ROOT, "configs", "dpd_fvae.py"), "dpd_fvae")
  from fedjax_lab.generative import train
  root = os.path.dirname(os.path.abspath(args.out))
  lines = ["| sync | DP (example level) | epsilon | noise multiplier | synthetic -> real "
           "accuracy (5 trials) | Frechet distance | released params | seconds |",
           "|---|---|---|---|---|---|---|---|"]
  for sync, eps, encoder in ROWS:
    c = dpd_fvae.get_config(sync)
    c.rounds, c.seed = args.rounds, args.seed
    c.eval.every = args.rounds
    if eps is not None:
      c.dp.level, c.dp.target_epsilon, c.dp.encoder = "example", eps, encoder
    name = f"{sync}-{'nodp' if eps is None else f'eps{eps:g}-{encoder}'}-s{args.seed}"
    s = train.run(c, os.path.join(root, name), verbose=False)
    e, p = s["eval"], s["privacy"]
    dp = ("none" if p is None else
          "whole VAE clipped+noised" + (", decoder released" if sync == "decoder" else "")
          if p["encoder"] == "private" else "decoder only clipped+noised (paper)")
    eps_text = "-" if p is None else f"{s['epsilon']:.2f}" + ("" if p["sound"] else
                                                             " (not proven)")
    sigma = "-" if p is None else f"{p['noise_multiplier']:.2f}"
    row = (f"| {sync} | {dp} | {eps_text} | {sigma} | {e['accuracy_mean']:.3f} +- "
           f"{e['accuracy_std']:.3f} | {e['frechet']:.2f} | {s['released_params']} | "
           f"{s['total_seconds']:.0f} |")
    print(row, flush=True)
    lines.append(row)
  os.makedirs(root, exist_ok=True)
  with open(args.out, "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
