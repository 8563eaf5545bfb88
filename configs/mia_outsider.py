r"""Membership inference, outsider: does the released FedAvg model reveal that an example was
in training? (fedjax_lab/attacks/membership.py)

  python -m fedjax_lab.attacks.membership --config configs/mia_outsider.py
  python -m fedjax_lab.attacks.membership --config configs/mia_outsider.py \
      --config.mia.target_workdir=runs/digits_fedavg-<hash>   # a train.py run as the target

target: configs/digits_fedavg.py on half the digits training split (750 examples in 94 sites
of 8); 64 such FedAvg runs, vmapped, each on its own random half; LiRA leave-one-out over 16.
"""

import os

import ml_collections

from fedjax_lab import runs
from fedjax_lab.attacks.membership import default_mia_config


def _digits_fedavg():
  """configs/digits_fedavg.py's config, the target the attack trains."""
  return runs.load_config_file(
      os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits_fedavg.py"))


def get_config():
  c = ml_collections.ConfigDict()
  c.target = _digits_fedavg()
  c.target.log.progress = False
  c.mia = default_mia_config()
  c.mia.threat = "outsider"
  return c
