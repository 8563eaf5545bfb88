r"""A cross-device population: 10^6 sites on digits, cohorts of 100 (benchmarks/population.py).

  python train.py --config configs/population.py            # FedAvg, uniform cohorts
  python train.py --config configs/population.py:site_dp    # DP-FedAvg, Poisson cohorts

Sites come from data.partition=pool: site s holds a window of 15 examples of the shuffled
digits pool (1,437 training examples), so each example belongs to about 10^4 sites, as in
the synthetic populations of pfl and Flower simulations; only site-level DP (the site is the
unit) is allowed on it. A round's cost does not grow with the population: cohorts are drawn
in O(cohort) work (keys.sample_cohort, privacy.sampling.poisson_cohort) and only the
cohort's rows of the 64-byte-per-site index table are gathered. Measured on a 2-core CPU:
about 20 s for 100 rounds at 1.1 GB peak RSS (benchmarks/RESULTS.md).
"""

from fedjax_lab.config import default_config


def get_config(variant: str = "fedavg"):
  if variant not in ("fedavg", "site_dp"):
    raise ValueError(f"variant must be 'fedavg' or 'site_dp', got {variant!r}")
  c = default_config()
  c.rounds = 100
  c.cohort_size = 100
  c.data.name = "digits"
  c.data.partition, c.data.num_sites, c.data.examples_per_site = "pool", 1_000_000, 15
  c.model.name, c.model.hidden = "mlp", (128,)
  c.client.optimizer, c.client.lr, c.client.local_steps, c.client.batch_size = "sgd", 0.1, 3, 5
  c.server.optimizer, c.server.lr = "sgd", 1.0
  # Per-site accuracy over 10^6 label histograms costs ~0.2 s an evaluation.
  c.eval.every = 10
  c.checkpoint.every = 50
  if variant == "site_dp":
    c.dp.level, c.dp.target_epsilon, c.dp.delta = "site", 2.0, 1e-7
  return c
