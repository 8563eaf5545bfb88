r"""Gradient inversion of a digits site's update (fedjax_lab/attacks/inversion.py).

  python -m fedjax_lab.attacks.inversion --config configs/inversion_digits.py            # fresh site
  python train.py --config configs/inversion_digits.py --workdir runs/inv \
      --config.attack.record_sites=3,7 --config.attack.record_rounds=20,        # record
  python -m fedjax_lab.attacks.inversion --config configs/inversion_digits.py --workdir runs/inv

:one_image (default)  1,500 sites of ONE digit each, 10 per round, CNN (16, 32 channels, 64
          hidden) with BatchNorm, 1 local SGD step at batch 1 (lr 0.1), 20 rounds: the
          setting the paper finds leaks most. The fresh site is site 0 at round 20.
:site15   100 sites of 15 digits, 3 local steps at batch 5: a harder target.
Recorded updates are a site's private data in the clear (docs/attacks.md).
"""

from fedjax_lab.attacks.inversion_attack import DEFAULTS
from fedjax_lab.config import default_config


def get_config(kind: str = "one_image"):
  if kind not in ("one_image", "site15"):
    raise ValueError(f"kind must be 'one_image' or 'site15', got {kind!r}")
  c = default_config()
  c.rounds = 20
  c.data.name = "digits"
  c.data.partition = "iid"
  c.model.name, c.model.features, c.model.hidden, c.model.norm = "cnn", (16, 32), (64,), "batch"
  c.client.optimizer, c.client.lr = "sgd", 0.1
  if kind == "one_image":
    c.data.num_sites, c.cohort_size = 1500, 10
    c.client.local_steps, c.client.batch_size = 1, 1
  else:
    c.data.num_sites, c.cohort_size = 100, 10
    c.client.local_steps, c.client.batch_size = 3, 5
  c.checkpoint.every = 20
  c.attack.inversion.update(dict(DEFAULTS))
  return c
