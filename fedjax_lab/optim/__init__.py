"""Optax transformations the lab adds, and optimizers by name for configs.

* `esgd`, `scale_by_esgd`: equilibrated SGD (Dauphin et al. 2015).
* `adahessian`, `scale_by_adahessian`: AdaHessian (Yao et al. 2021).
* `hessian`: matrix-free Hessian-vector products and Hutchinson estimates.
* `make_optimizer(name, lr, **hparams)`: every optimizer a config
  can name (`OPTIMIZERS`), always an `optax.GradientTransformationExtraArgs`
  whose update takes `obj_fn=`; `check_dp_compatible` for curvature under DP,
  `check_server_optimizer` for curvature at the server (needs public data).
"""

from fedjax_lab.optim import hessian
from fedjax_lab.optim.adahessian import adahessian
from fedjax_lab.optim.adahessian import AdaHessianState
from fedjax_lab.optim.adahessian import scale_by_adahessian
from fedjax_lab.optim.esgd import esgd
from fedjax_lab.optim.esgd import ESGDState
from fedjax_lab.optim.esgd import scale_by_esgd
from fedjax_lab.optim.registry import check_dp_compatible
from fedjax_lab.optim.registry import check_server_optimizer
from fedjax_lab.optim.registry import CURVATURE_OPTIMIZERS
from fedjax_lab.optim.registry import HYPERPARAMETERS
from fedjax_lab.optim.registry import local_steps_multiple
from fedjax_lab.optim.registry import make_optimizer
from fedjax_lab.optim.registry import OPTIMIZERS
from fedjax_lab.optim.registry import reseed_probes

__all__ = [
    "AdaHessianState",
    "CURVATURE_OPTIMIZERS",
    "ESGDState",
    "HYPERPARAMETERS",
    "OPTIMIZERS",
    "adahessian",
    "check_dp_compatible",
    "check_server_optimizer",
    "esgd",
    "hessian",
    "local_steps_multiple",
    "make_optimizer",
    "reseed_probes",
    "scale_by_adahessian",
    "scale_by_esgd",
]
