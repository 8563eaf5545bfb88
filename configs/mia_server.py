r"""Membership inference, the server: does one site's update reveal that an example is at that
site? (fedjax_lab/attacks/membership.py)

  python -m fedjax_lab.attacks.membership --config configs/mia_server.py

The global model: configs/digits_fedavg.py after 100 rounds (trained here, or
--config.mia.target_workdir=<a train.py run>). The site holds 15 of a pool of 30 test-split
digits and runs the config's local update (3 SGD steps of batch 5, lr 0.1); the server knows
the global model, so its shadows are that same local update on other halves of the pool.
"""

import os

from fedjax_lab import runs


def get_config():
  """configs/mia_outsider.py's target (digits FedAvg) and attack, another threat."""
  c = runs.load_module(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                   "mia_outsider.py"), "mia_outsider").get_config()
  c.mia.threat = "server"
  c.mia.server_round = 100
  c.mia.site_pool = 30
  return c
