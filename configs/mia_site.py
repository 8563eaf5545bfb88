r"""Membership inference, site level: does the released FedAvg model reveal that a whole site
took part? (fedjax_lab/attacks/membership.py)

  python -m fedjax_lab.attacks.membership --config configs/mia_site.py

configs/digits_fedavg.py's 100 sites of 15; each of 64 FedAvg runs trains on a random 50 of
them (cohort 10, 300 rounds); a site's score is the mean phi of its 15 examples.
"""

import os

from fedjax_lab import runs


def get_config():
  """configs/mia_outsider.py's target (digits FedAvg) and attack, another threat."""
  c = runs.load_module(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                   "mia_outsider.py"), "mia_outsider").get_config()
  c.mia.threat = "site"
  return c
