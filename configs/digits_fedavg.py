r"""FedAvg on scikit-learn's bundled digits: the default job.

  python train.py --config configs/digits_fedavg.py

100 IID sites x 15 examples, 10 sampled per round, MLP 64-128-10, 3 local SGD steps of batch 5.
Expected on a 2-core CPU: test accuracy ~0.96 after 300 rounds, well under a minute.
"""

from fedjax_lab.config import default_config


def get_config():
  c = default_config()
  c.rounds = 300
  c.cohort_size = 10
  c.data.name = "digits"
  c.data.num_sites = 100
  c.data.partition = "iid"
  c.model.name = "mlp"
  c.model.hidden = (128,)
  c.client.optimizer = "sgd"
  c.client.lr = 0.1
  c.client.local_steps = 3
  c.client.batch_size = 5
  c.server.optimizer = "sgd"
  c.server.lr = 1.0
  c.checkpoint.every = 50
  return c
