"""Secure aggregation as a link of the round (secagg.enabled): accuracy, aborts, config errors,
and the guarantees it changes. The protocol itself is tested in test_secagg.py."""

import json
import math

import jax
import numpy as np
import pytest
from test_experiment import set_keys, tiny_config

from fedjax_lab.config import default_config, validate
from fedjax_lab.errors import ConfigError
from fedjax_lab.experiment import Experiment
from fedjax_lab.privacy import accounting


def _digits(rounds, **overrides):
  """The default digits job (train.py's), shortened."""
  c = default_config()
  c.rounds, c.eval.bootstrap = rounds, 0
  c.log.progress, c.log.tensorboard = False, False
  return set_keys(c, overrides)


def test_a_secure_run_matches_the_plain_run(tmp_path):
  """The default digits job with and without secagg (no dropouts): the same accuracy within
  0.5 points, parameters within the 32-bit grid's rounding (each round's sum moves by at most
  K steps of 2 clip_range / levels per coordinate), and every round's secure sum holds all
  10 sites with nothing clipped."""
  plain = Experiment(_digits(15))
  secure = Experiment(_digits(15, **{"secagg.enabled": True}))
  s_plain = plain.run(str(tmp_path / "plain"))
  s_secure = secure.run(str(tmp_path / "secure"))
  assert abs(s_plain["test_accuracy"] - s_secure["test_accuracy"]) <= 0.005
  a = np.concatenate([np.ravel(l) for l in jax.tree.leaves(plain.final_state.params)])
  b = np.concatenate([np.ravel(l) for l in jax.tree.leaves(secure.final_state.params)])
  assert 0 < np.abs(a - b).max() < 1e-4  # quantized, so not bit-identical; but close
  rows = [json.loads(l) for l in open(tmp_path / "secure" / "metrics.jsonl")]
  assert all(r["secagg_survivors"] == 10 and r["secagg_aborted"] == 0
             and r["secagg_clipped"] == 0 for r in rows)
  assert s_secure["secagg"] == {"aborted_rounds": 0, "clipped_values": 0}
  # The upload is the masked 32-bit vector plus the protocol's messages: more than float32.
  assert rows[0]["bytes_communicated"] > json.loads(
      open(tmp_path / "plain" / "metrics.jsonl").readline())["bytes_communicated"]


def test_an_aborted_round_leaves_the_model_unchanged(tmp_path):
  """Dropouts so frequent that every round has fewer than t survivors: each round aborts,
  is counted and logged, and the model stays at its initialisation."""
  exp = Experiment(tiny_config(**{"rounds": 2, "secagg.enabled": True,
                                  "secagg.dropout_rate": 0.95}))
  init = exp.init_state()
  summary = exp.run(str(tmp_path))
  assert summary["secagg"]["aborted_rounds"] == 2 and summary["rounds_completed"] == 2
  for a, b in zip(jax.tree.leaves(init.params), jax.tree.leaves(exp.final_state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [r["secagg_aborted"] for r in rows] == [1, 1]


def test_dopamine_end_to_end_the_server_sees_only_the_sum():
  """Coordinated example-level noise with secure aggregation: the server's epsilon is the
  released models' (dp-accounting directly); with dropouts each site adds sigma/sqrt(t)."""
  c = tiny_config(**{"rounds": 3, "cohort_size": 8, "client.local_steps": 1,
                     "server.weighting": "uniform", "dp.level": "example",
                     "dp.noise": "coordinated", "dp.noise_multiplier": 1.2,
                     "secagg.enabled": True})
  exp = Experiment(c)
  m = exp.privacy.mechanism(c, 30)
  from fedjax_lab.privacy import guarantees
  entries = guarantees.guarantees(m)
  server = [g for g in entries if g.adversary.startswith("the server") and not g.colluding_sites]
  assert len(server) == 1 and "secure aggregation" in server[0].adversary
  direct = accounting.epsilon(1.2, exp.privacy.sampling_prob, 30, exp.privacy.accountant.delta,
                              "rdp")
  assert server[0].epsilon == pytest.approx(direct) == entries[0].epsilon
  assert exp.example_dp.noise_multiplier == pytest.approx(1.2 / math.sqrt(8))
  c.secagg.dropout_rate = 0.1  # t = floor(8 / 2) + 1 = 5 uploads in any finished round
  exp = Experiment(c)
  assert exp.example_dp.noise_multiplier == pytest.approx(1.2 / math.sqrt(5))
  m = exp.privacy.mechanism(c, 30)
  one = guarantees.guarantees(m)[2]
  assert "sqrt(1 - 1/5)" in one.adversary
  # sigma sqrt(1 - 1/5) at the delta left after paying for the truncated Poisson batches
  left = m.delta - (1 + math.exp(one.epsilon)) * m.overflow_bound
  direct = accounting.epsilon(1.2 * math.sqrt(4 / 5), m.sampling_prob, 30, left, "rdp")
  assert direct <= one.epsilon <= direct * 1.001


@pytest.mark.parametrize("overrides, key", [
    ({"algorithm.name": "scaffold"}, "secagg.enabled"),
    ({"rounds_per_step": 2}, "rounds_per_step"),
    ({"dp.level": "site", "dp.noise_multiplier": 1.0, "dp.adaptive_clip": True,
      "dp.count_noise_multiplier": 10.0},
     "dp.adaptive_clip"),
    ({"dp.level": "site", "dp.noise_multiplier": 1.0, "secagg.dropout_rate": 0.1},
     "secagg.dropout_rate"),
    ({"dp.level": "site", "dp.noise_multiplier": 1.0, "secagg.threshold": 3},
     "secagg.threshold"),
    ({"dp.level": "site", "dp.noise_multiplier": 1.0}, "dp.noise"),  # parallel: grows with n
    ({"secagg.bits": 3}, "secagg.bits"),
    ({"secagg.threshold": 2}, "secagg.threshold"),
    ({"secagg.neighbours": 3}, "secagg.neighbours"),
])
def test_impossible_secure_settings_name_the_key(overrides, key):
  c = tiny_config(**{"secagg.enabled": True, "rounds": 2, **overrides})
  with pytest.raises(ConfigError) as e:
    validate(c)
  assert e.value.key == key


def test_a_grid_too_coarse_for_the_noise_shares_is_refused():
  """8 bits over 8 sites: grid step 2/30, far above the shares' std; the secure sum would
  no longer be (close to) a post-processing of the noisy sum."""
  c = tiny_config(**{"rounds": 2, "cohort_size": 8, "client.local_steps": 1,
                     "server.weighting": "uniform", "dp.level": "example",
                     "dp.noise": "coordinated", "dp.noise_multiplier": 1.0,
                     "secagg.enabled": True, "secagg.bits": 8})
  with pytest.raises(ConfigError) as e:
    Experiment(c)
  assert e.value.key == "secagg.bits"
