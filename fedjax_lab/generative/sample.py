r"""Decodes a labelled synthetic data set from a trained DPD-fVAE workdir.

  python -m fedjax_lab.generative.sample --workdir runs/vae --out synth.npz [--num 1500]
  python train.py --config.data.name=file --config.data.path=synth.npz   # train on it

Labels are balanced over the classes (or drawn with --labels=uniform), z ~ N(0, I), x is the
decoder's mean (Bernoulli: pixel intensities in [0, 1]). The .npz holds x [N, D] float32,
y [N] int32 and class_names, the format `data.name=file` reads; only the decoder (the
released, DP part) is used, so the file is as private as the decoder.
"""

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab.generative import evaluate


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--out", required=True, help="the .npz to write")
  parser.add_argument("--num", type=int, default=1500, help="examples to draw")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--labels", choices=("balanced", "uniform"), default="balanced")
  parser.add_argument("--grids", default=None, help="also write per-class PNG grids here")
  args = parser.parse_args(argv)

  vae, dec, info = evaluate.load_decoder(args.workdir)
  if args.labels == "balanced":
    x, y = evaluate.synthesize(vae, dec, args.seed, args.num)
  else:
    y = np.random.default_rng(args.seed).integers(0, vae.num_classes, args.num).astype(np.int32)
    x = np.asarray(jax.jit(vae.generate)(dec, jax.random.key(args.seed), jnp.asarray(y)),
                   np.float32).reshape((args.num, -1))
  names = info["class_names"] or [str(k) for k in range(vae.num_classes)]
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  np.savez(args.out, x=x, y=y, class_names=np.asarray(names))
  print(f"wrote {args.out}: x {x.shape}, y {y.shape}, {vae.num_classes} classes "
        f"({np.bincount(y, minlength=vae.num_classes).min()}-"
        f"{np.bincount(y, minlength=vae.num_classes).max()} per class)")
  if args.grids:
    paths = evaluate.save_grids(vae, dec, args.grids, seed=args.seed, class_names=names)
    print(f"wrote {len(paths)} grids under {args.grids}")


if __name__ == "__main__":
  main()
