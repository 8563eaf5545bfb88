r"""Dopamine on real scRNA-seq: central DP-SGD vs parallel vs coordinated DP-FL on pbmc68k.

  python train.py --config configs/dopamine_pbmc.py:coordinated   # or :parallel, :central

10 sites x 56 cells (IID) of the bundled pbmc68k_reduced (765 genes, 10 cell types); each
round every site takes one DP-SGD step on a Poisson batch (rate 0.25, clip 1); sigma
calibrated for epsilon = 8 (delta 1e-3 < 1/560, RDP) after 300 rounds; the three variants
share q, sigma and steps (see configs/dopamine_digits.py for what each means).
Measured on a 2-core CPU (seed 0, ~40 s each): central 0.636, coordinated 0.650, parallel 0.429.
"""

from fedjax_lab.config import default_config

VARIANTS = ("central", "parallel", "coordinated")


def get_config(variant: str = "coordinated"):
  if variant not in VARIANTS:
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
  c = default_config()
  c.rounds = 300
  c.data.name = "pbmc68k"
  c.data.partition = "iid"
  c.data.num_sites = 1 if variant == "central" else 10
  c.cohort_size = c.data.num_sites
  c.model.name, c.model.hidden, c.model.dropout = "transcriptomics_mlp", (256,), 0.0
  c.client.optimizer, c.client.lr, c.client.local_steps = "sgd", 0.5, 1
  c.client.batch_size = 140 if variant == "central" else 14
  c.server.optimizer, c.server.lr, c.server.weighting = "sgd", 1.0, "uniform"
  c.dp.level = "example"
  c.dp.noise = "coordinated" if variant == "coordinated" else "parallel"
  c.dp.clip_norm = 1.0
  c.dp.target_epsilon = 8.0
  c.dp.delta = 1e-3
  c.eval.every = 50
  c.checkpoint.every = 100
  return c
