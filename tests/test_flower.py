"""The lab's task on Flower's deployment engine (flower-superlink + 2 flower-supernode
processes on loopback) ends with the lab's simulation's parameters and accuracy."""

import json
import os

import numpy as np
import pytest

flwr = pytest.importorskip("flwr")

from fedjax_lab.errors import ConfigError  # noqa: E402
from fedjax_lab.flower import run, task  # noqa: E402
from test_gse7390 import write_arff  # noqa: E402


def test_the_apps_refuse_what_they_do_not_run():
  c = task.load_config(os.path.join(run.ROOT, "configs/gse7390_prognosis.py"),
                       "data.num_sites=2 cohort_size=1")
  with pytest.raises(ConfigError) as e:
    task.check(c)
  assert e.value.key == "cohort_size"
  c = task.load_config(os.path.join(run.ROOT, "configs/gse7390_prognosis.py"),
                       "data.num_sites=2 cohort_size=2")
  with pytest.raises(ConfigError) as e:
    task.check(c, num_supernodes=3)
  assert e.value.key == "data.num_sites"


@pytest.mark.slow
def test_two_supernodes_on_loopback_match_the_lab(tmp_path):
  write_arff(tmp_path / "g.arff", n=80)
  overrides = (f"data.path='{tmp_path}/g.arff' data.num_sites=2 cohort_size=2 rounds=2 "
               "eval.bootstrap=0")
  flower = run.run_on_flower("configs/gse7390_prognosis.py", overrides, 2,
                             str(tmp_path / "flower"), timeout_s=600, save_params=True)
  lab = run.run_lab("configs/gse7390_prognosis.py", overrides, str(tmp_path / "lab"))
  assert flower["test_accuracy"] == pytest.approx(lab["test_accuracy"], abs=1e-6)
  assert flower["test_auc"] == pytest.approx(lab["test_auc"], abs=1e-6)
  lab_leaves = task.leaves(lab["final_state"].params)
  for a, b in zip(flower["params"], lab_leaves):
    np.testing.assert_allclose(np.asarray(a, np.float32), b, atol=1e-5)
  # Traffic: each round the model goes down to and back from both sites, as the lab counts
  # it, plus the serialisation's header and key name per array (~130 bytes each).
  assert len(flower["rounds"]) == 2
  arrays_sent = 2 * 2 * 2 * len(lab_leaves)  # rounds x sites x (down, up) x arrays
  overhead = (flower["bytes_total"] - lab["bytes_total"]) / arrays_sent
  assert 0 <= overhead < 200, overhead
  assert json.load(open(tmp_path / "flower" / "flower.json"))["test_accuracy"] == \
      flower["test_accuracy"]
