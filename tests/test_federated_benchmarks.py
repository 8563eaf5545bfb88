"""The CIFAR-100 Pachinko and EMNIST-62 benchmarks (data/tfds_federated.py, data/pachinko.py),
built offline from tfds.testing.mock_data, their split's statistics checked against closed
forms and NumPy simulations written here, the .npz cache, and train.py on both configs."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fedjax_lab.data import pachinko, tfds_federated

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _mock_data_config(name, path):
  data = _config(name).data
  data.mock, data.path = True, str(path)
  return data


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
  data = _mock_data_config("cifar100_pachinko", tmp_path_factory.mktemp("cifar"))
  return data, tfds_federated.prepare("cifar100_pachinko", data)


@pytest.fixture(scope="module")
def emnist(tmp_path_factory):
  data = _mock_data_config("emnist62", tmp_path_factory.mktemp("emnist"))
  return data, tfds_federated.prepare("emnist62", data)


def _distinct_rows(x):
  flat = np.ascontiguousarray(x.reshape(len(x), -1))
  return len(np.unique(flat.view(np.dtype((np.void, flat.shape[1]))))) == len(x)


def _hhi(counts):
  """Per-row sum of squared shares (Herfindahl index) of a [rows, labels] count table."""
  shares = counts / counts.sum(axis=1, keepdims=True)
  return (shares ** 2).sum(axis=1)


def _dirichlet_multinomial_hhi(concentration, k, n, draws, rng):
  """HHI of Multinomial(n, theta) counts, theta ~ Dir(concentration * 1_k): a NumPy
  simulation, the reference for a site's label concentration without exhaustion."""
  theta = rng.dirichlet(np.full(k, concentration), size=draws)
  return _hhi(np.stack([rng.multinomial(n, t) for t in theta]))


# ------------------------------------------------------------------ Pachinko split of CIFAR-100


def test_pachinko_sites_sizes_and_examples_used_once(cifar):
  _, a = cifar
  assert np.array_equal(np.bincount(a["site"]), np.full(500, 100))  # 500 sites x 100
  assert np.array_equal(np.bincount(a["site_test"]), np.full(100, 100))  # 100 test sites x 100
  assert a["x"].shape == (50_000, 32, 32, 3) and a["x"].dtype == np.uint8
  # Mock images are random, so two equal rows would be one example handed out twice.
  assert _distinct_rows(a["x"]) and _distinct_rows(a["x_test"])


def _parent(coarse, fine):
  """Each fine label's most frequent coarse label (computed here, not by pachinko.py)."""
  table = np.zeros((100, 20), np.int64)
  for c, f in zip(coarse, fine):
    table[f, c] += 1
  return table.argmax(axis=1)


def test_pachinko_coarse_label_skew_matches_dirichlet_alpha(cifar):
  """The first 100 sites (before labels run out) hold coarse labels as a Dirichlet(0.1)-
  multinomial of 100 draws does: mean HHI against a NumPy simulation, z within 4 standard
  errors; the same statistic rules out alpha 1."""
  _, a = cifar
  parent = _parent(a["coarse"], a["y"])
  coarse_used = np.unique(parent)  # mock data: coarse labels without fine labels drop out
  counts = np.zeros((500, 20), np.int64)
  np.add.at(counts, (a["site"], parent[a["y"]]), 1)
  observed = _hhi(counts[:100])
  rng = np.random.default_rng(0)
  sim = _dirichlet_multinomial_hhi(0.1, len(coarse_used), 100, 20_000, rng)
  se = sim.std() / np.sqrt(len(observed))
  assert abs(observed.mean() - sim.mean()) < 4 * se, (observed.mean(), sim.mean(), se)
  # Closed form as a second reference: E HHI = 1/n + (1 - 1/n) (alpha + 1) / (K alpha + 1).
  k = len(coarse_used)
  assert sim.mean() == pytest.approx(0.01 + 0.99 * 1.1 / (0.1 * k + 1), abs=0.01)
  wrong = _dirichlet_multinomial_hhi(1.0, k, 100, 20_000, rng)
  assert abs(observed.mean() - wrong.mean()) > 8 * se


def test_pachinko_fine_labels_follow_their_coarse_label_with_beta(cifar):
  """Within a site's coarse label, fine labels are the children of that coarse label only,
  spread as a Dirichlet(10)-multinomial (near uniform); beta 0.1 would concentrate them."""
  _, a = cifar
  parent = _parent(a["coarse"], a["y"])
  children = {c: np.flatnonzero(parent == c) for c in np.unique(parent)}
  observed, sims, sims_wrong = [], [], []
  rng = np.random.default_rng(1)
  for s in range(100):
    fine = a["y"][a["site"] == s]
    for c, kids in children.items():
      mine = fine[parent[fine] == c]
      assert np.isin(mine, kids).all()
      if len(mine) >= 30 and len(kids) >= 2:
        observed.append(_hhi(np.bincount(mine, minlength=100)[kids][None])[0])
        sims.append(_dirichlet_multinomial_hhi(10.0, len(kids), len(mine), 200, rng).mean())
        sims_wrong.append(_dirichlet_multinomial_hhi(0.1, len(kids), len(mine), 200, rng).mean())
  observed, sims = np.array(observed), np.array(sims)
  assert len(observed) >= 50
  se = observed.std() / np.sqrt(len(observed))
  assert abs(observed.mean() - sims.mean()) < 4 * se + 0.01, (observed.mean(), sims.mean())
  assert np.mean(sims_wrong) - observed.mean() > 10 * se


def test_pachinko_on_cifar_shaped_hierarchy_exhausts_every_example():
  """Real CIFAR-100 shape (20 coarse x 5 fine x 500 examples): all 50,000 examples are
  handed out, each once, and each site's fine labels stay within the coarse labels it drew."""
  fine = np.repeat(np.arange(100), 500)
  coarse = np.random.default_rng(2).permutation(np.repeat(np.arange(20), 5))[fine]
  site = pachinko.split(coarse, fine, 500, 100, 0.1, 10.0, np.random.default_rng(3))
  assert (site >= 0).all() and np.array_equal(np.bincount(site), np.full(500, 100))
  counts = np.zeros((500, 20), np.int64)
  np.add.at(counts, (site, coarse), 1)
  # Early sites: Dirichlet(0.1) concentration (closed form 0.373, se ~0.02 over 100 sites).
  assert _hhi(counts[:100]).mean() == pytest.approx(0.01 + 0.99 * 1.1 / 3, abs=0.08)


# ------------------------------------------------------------------ EMNIST-62 Dirichlet split


def _dirichlet_split_counts(y, num_sites, alpha, rng):
  """[sites, classes] counts of Hsu et al. 2019's split with Yurochkin et al.'s size cap,
  written here as a plain loop: the reference for the lab's partitioner."""
  counts = np.zeros((num_sites, 62), np.int64)
  for c in np.unique(y):
    n = int((y == c).sum())
    p = rng.dirichlet(np.full(num_sites, alpha)) * (counts.sum(1) < len(y) / num_sites)
    p /= p.sum()
    edges = np.concatenate([[0], (np.cumsum(p) * n).astype(np.int64)[:-1], [n]])
    counts[:, c] = np.diff(edges)
  return counts


def test_emnist_dirichlet_split_statistics(emnist):
  data, a = emnist
  n = tfds_federated.MOCK_EXAMPLES["emnist62"]["train"]
  assert a["x"].shape == (n, 28, 28, 1) and len(a["x_test"]) == 10_000
  sizes = np.bincount(a["site"], minlength=3400)
  assert len(sizes) == 3400 and sizes.min() >= 1 and sizes.sum() == n
  assert _distinct_rows(a["x"])
  counts = np.zeros((3400, 62), np.int64)
  np.add.at(counts, (a["site"], a["y"]), 1)
  ref = _dirichlet_split_counts(a["y"], 3400, data.alpha, np.random.default_rng(4))
  observed, expected = _hhi(counts).mean(), _hhi(ref[ref.sum(1) > 0]).mean()
  assert observed == pytest.approx(expected, rel=0.05)
  for q in (0.1, 0.5, 0.9):
    assert np.quantile(sizes, q) == pytest.approx(np.quantile(ref.sum(1), q), rel=0.15, abs=2)
  skewed = _dirichlet_split_counts(a["y"], 3400, 0.1, np.random.default_rng(5))
  assert _hhi(skewed[skewed.sum(1) > 0]).mean() > 1.3 * observed


# ------------------------------------------------------------------ cache


def test_cache_round_trip_reads_npz_not_tfds(cifar, monkeypatch):
  data, first = cifar
  path = tfds_federated.cache_path("cifar100_pachinko", data)
  assert path.is_file() and path.name.endswith("-mock.npz")

  def no_tfds(*args, **kwargs):
    raise AssertionError("the second build read TFDS")

  monkeypatch.setattr(tfds_federated, "_read", no_tfds)
  second = tfds_federated.prepare("cifar100_pachinko", data)
  assert sorted(second) == sorted(first)
  for key in first:
    assert np.array_equal(second[key], first[key]), key
  other = data.copy_and_resolve_references()
  other.alpha = 0.5
  assert tfds_federated.cache_path("cifar100_pachinko", other) != path
  other.alpha, other.mock = data.alpha, False
  assert tfds_federated.cache_path("cifar100_pachinko", other).name.endswith(".npz")
  assert "-mock" not in tfds_federated.cache_path("cifar100_pachinko", other).name


# ------------------------------------------------------------------ train.py, offline


@pytest.mark.slow
@pytest.mark.parametrize("name,extra", [
    ("cifar100_pachinko", ["--config.model.features=4,4,4,4", "--config.cohort_size=2",
                           "--config.client.local_steps=1"]),
    # The EMNIST CNN takes seconds a local step on 2 CPU cores, and the end-of-run per-site
    # metrics cost sites x classes x test examples: fewer of both here.
    ("emnist62", ["--config.client.local_steps=1", "--config.data.num_sites=34",
                  "--config.cohort_size=2"]),
])
def test_train_py_runs_one_round_on_mock_data(name, extra, cifar, emnist, tmp_path):
  data = (cifar if name == "cifar100_pachinko" else emnist)[0]
  proc = subprocess.run(
      [sys.executable, "train.py", "--config", f"configs/{name}.py", "--config.data.mock=True",
       "--config.rounds=1", f"--config.data.path={data.path}", "--config.eval.bootstrap=0",
       "--workdir", str(tmp_path / "run"), *extra],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  # Mock images are random: accuracy means nothing; the run must have trained its one round
  # on the cached split's sites.
  summary = json.loads((tmp_path / "run" / "summary.json").read_text())
  assert summary["rounds_completed"] == 1
  assert summary["config"]["data"]["mock"] is True
