r"""Dopamine (Malekzadeh et al. 2021, arXiv 2101.11693) on digits: central DP-SGD vs parallel
DP-FL vs coordinated DP-FL at the same epsilon.

  python train.py --config configs/dopamine_digits.py:coordinated   # or :parallel, :central
  python train.py --config configs/dopamine_digits.py:secure        # coordinated + secagg

10 hospitals x 150 digits; every round each site takes ONE DP-SGD step on a Poisson batch
(rate 0.1, ~15 examples, clip 1) and the server averages the 10 updates. Sigma is calibrated
so that epsilon = 2 (delta 1e-5, RDP) after 600 rounds; all three variants have the same
q, sigma and steps, hence the same epsilon:
  central:     one site holds all 1500 examples (batch ~150): DP-SGD.
  parallel:    every site adds the full N(0, sigma^2 C^2): the average carries sqrt(10)x
               the noise that central DP-SGD needs.
  coordinated: every site adds N(0, sigma^2 C^2 / 10), so the summed noise is exactly
               central DP-SGD's. The headline epsilon is that of anyone who sees the released
               models; the server, which (without secure aggregation) sees each weakly
               noised update, gets a larger one, listed with the others in
               summary.json["privacy"]["guarantees"] (docs/privacy.md): released models
               2.00, one site knowing its share 2.12, the server (each update carries
               sigma/sqrt(10)) 170.7.
  secure:      coordinated, with secagg.enabled (docs/secure_aggregation.md): the server
               learns only the sum, so its epsilon is the released models' 2.00 as long as
               no site colludes with it (2.12 with one colluding site).
Measured on a 2-core CPU (~40 s each; mean of 3 seeds): central 0.921, coordinated 0.901,
parallel 0.617 (benchmarks/dopamine_comparison.py sweeps epsilon and draws the plot).
"""

from fedjax_lab.config import default_config

VARIANTS = ("central", "parallel", "coordinated", "secure")


def get_config(variant: str = "coordinated"):
  if variant not in VARIANTS:
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
  c = default_config()
  c.rounds = 600
  c.data.name = "digits"
  c.data.partition = "iid"
  c.data.num_sites = 1 if variant == "central" else 10
  c.cohort_size = c.data.num_sites
  c.model.name, c.model.hidden = "mlp", (128,)
  c.client.optimizer, c.client.lr, c.client.local_steps = "sgd", 0.5, 1
  c.client.batch_size = 150 if variant == "central" else 15
  c.server.optimizer, c.server.lr, c.server.weighting = "sgd", 1.0, "uniform"
  c.dp.level = "example"
  c.dp.noise = "coordinated" if variant in ("coordinated", "secure") else "parallel"
  # secure: Dopamine end to end, the coordinated shares summed by secure aggregation, so the
  # server sees only the sum (its guarantee is the released models' epsilon, not 170.7).
  c.secagg.enabled = variant == "secure"
  c.dp.clip_norm = 1.0
  c.dp.target_epsilon = 2.0
  c.dp.delta = 1e-5
  c.eval.every = 50
  c.checkpoint.every = 200
  return c
