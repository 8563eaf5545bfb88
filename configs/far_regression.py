r"""Regression across sites: FAR (Function Aligned Regression) against MSE on a sine.

  python train.py --config configs/far_regression.py          # model.loss=far
  python train.py --config configs/far_regression.py:mse      # the same run with MSE

Data (fedjax_lab/data/synthetic_regression.py): y = sin(x), x ~ U(-2 pi, 2 pi), 2,000 examples,
20% test; 20 IID sites of 80, 10 a round; MLP 1-64-64-1; 10 local Adam steps of batch 32 (FAR
compares the examples of a batch with each other: a batch of 5 would give it little to
compare). Prints test_rmse and test_r2 (1 - MSE / variance of the test targets).
Results and the FAR-vs-MSE study over seeds: benchmarks/far_study.py, benchmarks/RESULTS.md.
"""

from fedjax_lab.config import default_config


def get_config(arg: str = "far"):
  c = default_config()
  c.rounds = 100
  c.cohort_size = 10
  c.data.name = "synthetic_regression"
  c.data.regression.function = "sine"
  c.data.regression.num_examples = 2000
  c.data.num_sites = 20
  c.data.partition = "iid"
  c.model.name = "mlp"
  c.model.hidden = (64, 64)
  if arg not in ("far", "mse"):
    raise ValueError(f"configs/far_regression.py:{arg}: unknown argument; allowed: far, mse")
  c.model.loss = arg
  c.model.far_alpha = 1.0
  c.model.far_base = "mae"
  c.client.optimizer = "adam"
  c.client.lr = 0.01
  c.client.local_steps = 10
  c.client.batch_size = 32
  c.server.optimizer = "sgd"
  c.server.lr = 1.0
  c.checkpoint.every = 50
  return c
