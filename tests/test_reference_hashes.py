"""What every algorithm and privacy mode computes, pinned: params_sha256 of tiny runs.

The table was measured on main before the round was cut into its three seams (client update,
aggregator chain, server update; issue 13) and must keep holding after it. A case whose
hash moved by float rounding alone carries a note in NOTES and is instead checked against the
parameters stored then (tests/reference/<case>.npz) within 1e-5.

Regenerate (only when a change is MEANT to change results, with the reason in the commit):
  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
      python tests/test_reference_hashes.py --write
"""

import os

import numpy as np
import pytest
from test_experiment import set_keys

HERE = os.path.dirname(os.path.abspath(__file__))
REFERENCE = os.path.join(HERE, "reference")


def _tiny(**overrides):
  from fedjax_lab.config import default_config
  c = default_config()
  c.rounds, c.cohort_size = 3, 5
  c.data.num_sites = 20
  c.client.local_steps, c.client.batch_size = 3, 8
  c.log.progress, c.log.tensorboard = False, False
  return set_keys(c, overrides)


def _pbmc():
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      "pbmc_celltype", os.path.join(os.path.dirname(HERE), "configs", "pbmc_celltype.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  return set_keys(c, {"rounds": 3, "eval.centralized_baseline": False, "log.progress": False,
                  "log.tensorboard": False})


_PER_SITE = {"cohort_size": 20, "model.name": "linear", "model.l2": 1e-3,
             "algorithm.comm_schedule": "every_k", "algorithm.comm_every": 2}
_SITE_DP = {"dp.level": "site", "dp.noise_multiplier": 1.0, "cohort_size": 8}

CASES = {
    "fedavg": lambda: _tiny(),
    "fedadam_skew": lambda: _tiny(**{"data.partition": "dirichlet", "data.alpha": 0.1,
                                     "server.optimizer": "adam", "server.lr": 0.01}),
    "fedprox": lambda: _tiny(**{"algorithm.name": "fedprox", "client.prox_mu": 0.1}),
    "fedbn": lambda: _tiny(**{"model.name": "cnn", "model.features": (8,), "model.hidden": (),
                              "model.norm": "batch", "algorithm.batch_stats": "local"}),
    "scaffold": lambda: _tiny(**{"algorithm.name": "scaffold"}),
    "proxskip": lambda: _tiny(**{"algorithm.name": "proxskip", **_PER_SITE}),
    "randcom": lambda: _tiny(**{"algorithm.name": "randcom", **_PER_SITE}),
    "dsgd": lambda: _tiny(**{"algorithm.name": "dsgd", **_PER_SITE}),
    "esgd_clients": lambda: _tiny(**{"client.optimizer": "esgd",
                                     "client.optimizer_args.eps": 0.1}),
    "fused_rounds": lambda: _tiny(**{"rounds": 4, "rounds_per_step": 2}),
    "pbmc_celltype": _pbmc,
    "dp_example": lambda: _tiny(**{"dp.level": "example", "dp.noise_multiplier": 1.0}),
    "dp_example_coordinated": lambda: _tiny(**{
        "dp.level": "example", "dp.noise": "coordinated", "dp.noise_multiplier": 1.0,
        "client.local_steps": 1, "server.weighting": "uniform"}),
    "dp_site_parallel": lambda: _tiny(**_SITE_DP),
    "dp_site_coordinated": lambda: _tiny(**_SITE_DP, **{"dp.noise": "coordinated"}),
    "dp_site_adaptive": lambda: _tiny(**_SITE_DP, **{"dp.adaptive_clip": True,
                                                     "dp.count_noise_multiplier": 2.0}),
}

# params_sha256 on main before issue 13 (8 CPU devices, as tests/conftest.py sets them);
# dp_site_parallel and dp_site_adaptive regenerated in issue 23 (_PARALLEL_PAD).
HASHES = {
    "dp_example": "9dfa459fef4100b6779a9bbdf91b3d73255e7fda716a48bfd3f0de4c11d9a7aa",
    "dp_example_coordinated": "6bca7b9bed201a25e1a9509d564f4b50417a15b4a03869dda973fd4c216c4fe3",
    "dp_site_adaptive": "c5dc1ebc3e87d65497105a0f2ebd19430069e9f1eac9ad808d4c66b607b7ab71",
    "dp_site_coordinated": "bf0d1644d0d03eebeb14ea1fd58b6289dc08b70cc8bcd01e5626eef774261b2b",
    "dp_site_parallel": "542468b8602f549a20a44dd19442659ddf0677d59d234ecda56875ace16edf05",
    "dsgd": "25fb3f8c55aa8e89d7cb9ad191b16d4f430b7782745fd63d4ed05a0d87dd47ad",
    "esgd_clients": "fd85943cf51b3aa770dc5765d60f0f0d853e91c9d6415cb3570e78c53686657f",
    "fedadam_skew": "506901d9d534ab249573be09757480b725e5ac3be023545d0472aff15c8b27ba",
    "fedavg": "9b0bca804ee459e9db5d752d049f4f47c63c2d28a66d8c16b8481f0643ca006c",
    "fedbn": "034f79839756663141b4a638e34186ee12237e2c662363b7be60ba1050415dec",
    "fedprox": "69bf73bf6903dd11112aa6420fe8cca11e7b416effdb180dd7e8d0ccb9d5a133",
    "fused_rounds": "f4a33c247c4540b94bb240a8a3aac4c2912d12a684b8f2f101b41e33018f955f",
    "pbmc_celltype": "18fa73d6db94cf8655a713ed901c43eb41c35a42f3d779c7bf1734501c48ff91",
    "proxskip": "0d8597c0a0b1eff1b2a009ba6a66620e2dbca2393a777ab07158307167598d4b",
    "randcom": "59568a6e4fe0e0dd76b9b0128069c392b90303c72bbf93011059cc4c67a7e9d4",
    "scaffold": "9e3a1cbdeb6d83324cc0146b6043e92650fe2bf5a55d104a5b46a8cde9c8b6ed",
}

# Cases whose hash moved by float rounding only: case -> why. They are checked against
# tests/reference/<case>.npz (the parameters measured with the hash above) within 1e-5.
_OPTAX_CE = ("cross-entropy from optax.losses (logsumexp - logit) instead of -log_softmax[y]: "
             "float rounding only, max |diff| {} (issue 13 item 7)")
_DP_CE = ("DP-SGD's per-example loss from the losses registry (optax cross-entropy) instead of "
          "-log_softmax(out)[y]: float rounding only, max |diff| {} (issue 18 item 6)")
# Cases whose results were MEANT to change, regenerated with --write: case -> why.
_PARALLEL_PAD = ("site-level parallel noise topped up by the server to the cohort's slots "
                 "(aggregators.gaussian_noise pad_to): the sum's noise no longer tells the "
                 "realised cohort size (issue 23); regenerated, not float rounding")
NOTES = {
    "dp_example": _DP_CE.format("1.5e-8"),
    "dp_example_coordinated": _DP_CE.format("1.9e-9"),
    "dp_site_adaptive": _PARALLEL_PAD,
    "dp_site_coordinated": _OPTAX_CE.format("6e-8"),
    "dp_site_parallel": _PARALLEL_PAD,
    "dsgd": _OPTAX_CE.format("3e-8"),
    "esgd_clients": _OPTAX_CE.format("3e-8"),
    "fedadam_skew": _OPTAX_CE.format("3.3e-7"),
    "fedavg": _OPTAX_CE.format("3e-8"),
    "fedbn": _OPTAX_CE.format("6e-8"),
    "fedprox": _OPTAX_CE.format("3e-8"),
    "fused_rounds": _OPTAX_CE.format("3e-8"),
    "pbmc_celltype": _OPTAX_CE.format("3e-8"),
    "proxskip": _OPTAX_CE.format("4.5e-8"),
    "randcom": _OPTAX_CE.format("3e-8"),
    "scaffold": _OPTAX_CE.format("3e-8"),
}


def _final_params(case):
  """The global parameters, then the model state and per-site model state (FedBN's
  statistics; {} without BatchNorm, so the hash is then params_sha256 itself)."""
  from fedjax_lab.experiment import Experiment
  config = CASES[case]()
  exp = Experiment(config)
  state = exp.run_rounds(exp.init_state(), config.rounds)
  return (state.params, state.model_state, state.site_model_state)


@pytest.mark.parametrize("case", sorted(CASES))
def test_parameters_are_those_measured_before_the_refactor(case):
  import jax
  from fedjax_lab.experiment import params_sha256
  params = _final_params(case)
  if case not in NOTES:
    assert params_sha256(params) == HASHES[case]
    return
  stored = np.load(os.path.join(REFERENCE, f"{case}.npz"))
  leaves = jax.tree.leaves(params)
  assert len(leaves) == len(stored.files)
  for i, leaf in enumerate(leaves):
    np.testing.assert_allclose(np.asarray(leaf), stored[f"leaf{i}"], rtol=0, atol=1e-5)


if __name__ == "__main__":
  import sys
  import jax
  from fedjax_lab.experiment import params_sha256
  assert "--write" in sys.argv, "usage: python tests/test_reference_hashes.py --write"
  os.makedirs(REFERENCE, exist_ok=True)
  for case in sorted(c for c in CASES if c in sys.argv[2:] or len(sys.argv) == 2):
    params = _final_params(case)
    leaves = [np.asarray(l, np.float32) for l in jax.tree.leaves(params)]
    np.savez_compressed(os.path.join(REFERENCE, f"{case}.npz"),
                        **{f"leaf{i}": l for i, l in enumerate(leaves)})
    print(f'    "{case}": "{params_sha256(params)}",', flush=True)
