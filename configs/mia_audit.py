r"""Privacy audit in one run (Steinke et al. 2023) of the DP configs, with gradient canaries.

  python -m fedjax_lab.attacks.audit --config configs/mia_audit.py:example   # DP-SGD at sites
  python -m fedjax_lab.attacks.audit --config configs/mia_audit.py:site      # DP-FedAvg
  python -m fedjax_lab.attacks.audit --config configs/mia_audit.py:none      # no DP (control)

The target is configs/digits_dp.py (:example or :site, claimed epsilon 4 at delta 1e-5) with
500 canaries added, each with probability 1/2 (fedjax_lab/attacks/audit.py: canary_audit).
:none is :example without DP: the audit should then find a large epsilon.
Randomness: dp.randomness=seeded (digits is public): the run, its noise and the audit's
numbers are reproducible from target.seed and audit.seed. The audit's adversary does not use
the seed; one who did could subtract the noise (summary.json's guarantees say so).
"""

import importlib.util
import os

import ml_collections


def _digits_dp(level):
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits_dp.py")
  spec = importlib.util.spec_from_file_location("digits_dp", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(level)


def get_config(level: str = "example"):
  if level not in ("example", "site", "none"):
    raise ValueError(f"level must be 'example', 'site' or 'none', got {level!r}")
  c = ml_collections.ConfigDict()
  c.target = _digits_dp("example" if level == "none" else level)
  if level == "none":
    c.target.dp.level = "none"
  c.target.dp.randomness = "seeded"
  c.target.log.progress = False
  c.target.checkpoint.every = 1000
  c.audit = ml_collections.ConfigDict(dict(num_canaries=500, seed=0))
  return c
