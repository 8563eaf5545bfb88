r"""Membership inference, site level: does the released FedAvg model reveal that a whole site
took part? (fedjax_lab/attacks/membership.py)

  python -m fedjax_lab.attacks.membership --config configs/mia_site.py

configs/digits_fedavg.py's 100 sites of 15; each of 64 FedAvg runs trains on a random 50 of
them (cohort 10, 300 rounds); a site's score is the mean phi of its 15 examples.
"""

import importlib.util
import os

import ml_collections

from fedjax_lab.attacks.membership import default_mia_config


def _digits_fedavg():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits_fedavg.py")
  spec = importlib.util.spec_from_file_location("digits_fedavg", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config():
  c = ml_collections.ConfigDict()
  c.target = _digits_fedavg()
  c.target.log.progress = False
  c.mia = default_mia_config()
  c.mia.threat = "site"
  return c
