"""Per-site parameters (algorithm.local_params): what each site keeps never leaves it.

Reference: one round replayed by hand with the lab's client update (the round's own keys),
and the FedAvg weighted mean of the shared leaves computed in NumPy."""

import json

import jax
import numpy as np
import pytest
from test_experiment import tiny_config

from fedjax_lab.algorithms import fedavg
from fedjax_lab.errors import ConfigError
from fedjax_lab.experiment import Experiment


def _flat(tree):
  return {fedavg.param_path(p): np.asarray(l)
          for p, l in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_one_round_keeps_the_head_at_the_sites_and_averages_the_rest():
  exp = Experiment(tiny_config(**{"algorithm.local_params": ("Dense_1",), "rounds": 1}))
  state = exp.init_state()
  # Give every site a different head, as after earlier rounds.
  rng = np.random.default_rng(0)
  state = state._replace(site_params={
      k: jax.device_put(v + rng.normal(0, 0.1, v.shape).astype(np.float32), v.sharding)
      for k, v in state.site_params.items()})
  before_local = {k: np.asarray(v) for k, v in state.site_params.items()}
  before = _flat(state.params)
  after = exp.run_rounds(jax.tree.map(lambda a: a.copy(), state), 1)
  cfg, data = exp.config, exp.data
  cohort = np.asarray(fedavg.sample_cohort(jax.random.fold_in(exp.keys["sampling"], 0),
                                           data.num_sites, cfg.cohort_size))
  counts = np.asarray(data.count)[cohort].astype(np.float64)
  weights = counts / counts.sum()
  mean = {k: np.zeros_like(v, np.float64) for k, v in before.items()}
  for site, w in zip(cohort, weights):
    local = {k: v[site] for k, v in before_local.items()}
    params = fedavg.merge_local(state.params, local)
    rng_k = jax.random.fold_in(jax.random.fold_in(exp.keys["client"], 0), int(site))
    out = jax.jit(exp.client_update)(params, state.model_state, data.idx[site],
                                     data.count[site], rng_k, data)
    delta = _flat(out.delta)
    for k in before_local:  # the site keeps its head's new values
      np.testing.assert_allclose(np.asarray(after.site_params[k])[site],
                                 before_local[k][site] + delta[k], atol=1e-6)
    for k in mean:
      if k not in before_local:
        mean[k] += w * delta[k]
  got = _flat(after.params)
  for k in mean:
    if k in before_local:  # the server's copy of a kept leaf never moves (zero updates)
      np.testing.assert_array_equal(got[k], before[k])
    else:  # server SGD lr 1: the weighted mean of the shared leaves' updates
      np.testing.assert_allclose(got[k], before[k] + mean[k], atol=1e-5)
  others = np.setdiff1d(np.arange(data.num_sites), cohort)
  for k, v in before_local.items():  # sites outside the cohort keep theirs untouched
    np.testing.assert_array_equal(np.asarray(after.site_params[k])[others], v[others])


def test_fedbn_with_its_batchnorm_parameters_local_runs_and_reports_per_site_models(tmp_path):
  """FedBN as Li et al. 2021 define it: BatchNorm's scale/bias and statistics stay local;
  the message holds only the shared parameters."""
  c = tiny_config(**{"rounds": 2, "model.name": "cnn", "model.features": (4,),
                     "model.hidden": (), "model.norm": "batch",
                     "algorithm.batch_stats": "local", "algorithm.local_params": ("BatchNorm",)})
  exp = Experiment(c)
  state = exp.init_state()
  assert set(state.site_params) == {"BatchNorm_0/bias", "BatchNorm_0/scale"}
  shared = sum(v.size for k, v in _flat(state.params).items() if "BatchNorm" not in k)
  assert exp.message_bytes == 4 * shared
  summary = exp.run(str(tmp_path))
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert rows[-1]["train_loss"] < rows[0]["train_loss"]
  # Per-site models: each site's BatchNorm scale/bias moved only if the site took part.
  scale = np.asarray(exp.final_state.site_params["BatchNorm_0/scale"])
  moved = np.abs(scale - 1.0).sum(-1) > 0
  cohorts = [np.asarray(jax.random.choice(jax.random.fold_in(exp.keys["sampling"], t),
                                          c.data.num_sites, (c.cohort_size,), replace=False))
             for t in range(2)]
  assert set(np.flatnonzero(moved)) == set(np.concatenate(cohorts))
  assert summary["test_accuracy"] > 0.1  # above chance after 2 rounds


@pytest.mark.parametrize("overrides, key", [
    ({"algorithm.local_params": ("Conv_9",)}, "algorithm.local_params"),
    ({"algorithm.local_params": ("Dense",)}, "algorithm.local_params"),  # everything
    ({"algorithm.local_params": ("Dense_1",), "algorithm.name": "scaffold"},
     "algorithm.local_params"),
    ({"algorithm.local_params": ("Dense_1",), "dp.level": "example",
      "dp.noise_multiplier": 1.0}, "algorithm.local_params"),
])
def test_local_params_errors_name_the_key(overrides, key):
  with pytest.raises(ConfigError) as e:
    Experiment(tiny_config(**overrides))
  assert e.value.key == key
