"""Tests for fedjax_lab.data.partition and the histogram command."""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from fedjax_lab import config as config_lib
from fedjax_lab.data import partition as partition_lib
from fedjax_lab.data import sources
from fedjax_lab.errors import ConfigError

_REPO = pathlib.Path(__file__).resolve().parents[1]


def _dataset(num_examples=1000, num_classes=10, seed=0, columns=None):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, num_classes, size=num_examples).astype(np.int32)
  return sources.Dataset(x=np.zeros((num_examples, 2), np.float32), y=y,
                         num_classes=num_classes, columns=columns or {}, name="toy")


def _config(**overrides):
  c = sources.default_data_config()
  c.num_sites = 20
  for key, value in overrides.items():
    c[key] = value
  return c


def _entropy(hist):
  p = hist / hist.sum(1, keepdims=True)
  return -(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0)).sum(1)


_METHODS = [
    dict(partition="iid"),
    dict(partition="dirichlet", alpha=0.3),
    dict(partition="shards", classes_per_site=2),
    dict(partition="quantity_skew", quantity_sigma=1.0),
]


@pytest.mark.parametrize("overrides", _METHODS, ids=lambda o: o["partition"])
def test_disjoint_cover_sorted_and_deterministic(overrides):
  train = _dataset()
  sites = partition_lib.partition(train, _config(**overrides), seed=7)
  assert len(sites) == 20
  assert all(s.dtype == np.int64 and np.all(np.diff(s) > 0) for s in sites)
  np.testing.assert_array_equal(np.sort(np.concatenate(sites)), np.arange(1000))
  again = partition_lib.partition(train, _config(**overrides), seed=7)
  other = partition_lib.partition(train, _config(**overrides), seed=8)
  assert all(np.array_equal(a, b) for a, b in zip(sites, again))
  assert not all(np.array_equal(a, b) for a, b in zip(sites, other))


def test_iid_sizes_differ_by_at_most_one():
  sites = partition_lib.partition(_dataset(1003), _config(), seed=0)
  sizes = sorted(len(s) for s in sites)
  assert sizes[0] == 50 and sizes[-1] == 51 and sum(sizes) == 1003


def test_dirichlet_small_alpha_is_more_skewed():
  train = _dataset(3000)
  def mean_entropy(alpha):
    sites = partition_lib.partition(train, _config(partition="dirichlet", alpha=alpha), 0)
    return _entropy(partition_lib.label_histogram(train.y, sites, 10)).mean()
  skewed, mild, near_iid = mean_entropy(0.1), mean_entropy(1.0), mean_entropy(1000.0)
  assert skewed < mild < near_iid
  assert near_iid > 0.95 * np.log(10)  # Large alpha: every site close to uniform labels.
  assert skewed < 0.5 * np.log(10)


def test_dirichlet_impossible_min_examples_raises():
  with pytest.raises(ConfigError, match="data.min_examples") as info:
    partition_lib.partition(_dataset(1000),
                            _config(partition="dirichlet", alpha=0.01, num_sites=200,
                                    min_examples=4), seed=0)
  assert "data.num_sites" in str(info.value)


@pytest.mark.parametrize("classes_per_site", [1, 2, 3])
def test_shards_each_site_has_at_most_classes_per_site(classes_per_site):
  train = _dataset(2000)
  sites = partition_lib.partition(
      train, _config(partition="shards", classes_per_site=classes_per_site), seed=1)
  hist = partition_lib.label_histogram(train.y, sites, 10)
  assert np.all((hist > 0).sum(1) <= classes_per_site)
  # Shards are near-equal, so sites are too: about 2000 / 20 = 100 each.
  sizes = hist.sum(1)
  assert sizes.min() > 80 and sizes.max() < 120


def test_by_column_sites_are_the_column_groups():
  donor = np.array([5, 2, 9, 2, 5, 5, 9, 2, 2, 5] * 10)
  train = _dataset(100, columns={"donor": donor})
  sites = partition_lib.partition(
      train, _config(partition="by_column", column="donor", num_sites=3), seed=0)
  for site, value in zip(sites, [2, 5, 9]):  # Sorted distinct values.
    np.testing.assert_array_equal(site, np.flatnonzero(donor == value))


def test_by_column_on_synthetic_batches():
  c = sources.default_data_config()
  c.name = "synthetic_expression"
  c.synthetic.update(dict(num_cells=500, num_genes=20, num_batches=4))
  c.partition, c.column, c.num_sites = "by_column", "batch", 4
  train, _ = sources.load_dataset(c)
  sites = partition_lib.partition(train, c, seed=0)
  assert [np.unique(train.columns["batch"][s]).tolist() for s in sites] == [[0], [1], [2], [3]]


def test_by_column_errors_name_key_and_counts():
  train = _dataset(100, columns={"donor": np.arange(100) % 3, "one": np.zeros(100, int)})
  with pytest.raises(ConfigError, match=r"data.column.*available: donor"):
    partition_lib.partition(train, _config(partition="by_column", column="batch",
                                           num_sites=3), 0)
  with pytest.raises(ConfigError, match=r"data.column: 'one' holds one value \(0\)"):
    partition_lib.partition(train, _config(partition="by_column", column="one"), 0)


def test_by_column_takes_num_sites_from_the_column():
  from fedjax_lab.config import default_config
  train = _dataset(100, columns={"donor": np.arange(100) % 3})
  c = default_config()
  c.data.update(dict(partition="by_column", column="donor", num_sites=20))
  c.cohort_size = 2
  assert len(partition_lib.partition(train, c.data, 0)) == 3  # num_sites=20 is not used
  note = config_lib.resolve_num_sites(train, c)
  assert c.data.num_sites == 3
  assert note.startswith("data.num_sites=20 replaced by 3")
  assert config_lib.resolve_num_sites(train, c) is None  # nothing changes now
  c.cohort_size = 5
  with pytest.raises(ConfigError, match=r"cohort_size: 5 > data.num_sites=3 \(data.partition="
                     r"by_column: data.column 'donor' has 3 distinct values\)"):
    config_lib.resolve_num_sites(train, c)


def test_quantity_skew_sizes_vary_and_respect_min_examples():
  train = _dataset(2000)
  sites = partition_lib.partition(
      train, _config(partition="quantity_skew", quantity_sigma=1.5, min_examples=10,
                     num_sites=50), seed=0)
  sizes = np.array([len(s) for s in sites])
  assert sizes.min() >= 10 and sizes.sum() == 2000
  assert sizes.max() > 4 * sizes.min()
  # Coefficient of variation of lognormal(0, 1.5) weights is sqrt(e^2.25 - 1) ~ 2.9: big.
  assert sizes.std() / sizes.mean() > 0.8
  even = partition_lib.partition(
      train, _config(partition="quantity_skew", quantity_sigma=0.0, num_sites=50), 0)
  assert {len(s) for s in even} == {40}


def test_label_histogram_matches_a_loop():
  train = _dataset(300, num_classes=4)
  sites = partition_lib.partition(train, _config(partition="dirichlet", num_sites=5), 0)
  hist = partition_lib.label_histogram(train.y, sites, 4)
  expected = np.zeros((5, 4), np.int64)
  for s, rows in enumerate(sites):
    for r in rows:
      expected[s, train.y[r]] += 1
  np.testing.assert_array_equal(hist, expected)


@pytest.mark.parametrize("overrides,key", [
    (dict(partition="pathological"), "data.partition"),
    (dict(partition="dirichlet", alpha=0.0), "data.alpha"),
    (dict(partition="dirichlet", alpha=-1.0), "data.alpha"),
    (dict(partition="shards", classes_per_site=0), "data.classes_per_site"),
    (dict(partition="shards", classes_per_site=11), "data.classes_per_site"),
    (dict(partition="shards", classes_per_site=1, num_sites=5), "data.classes_per_site"),
    (dict(num_sites=0), "data.num_sites"),
    (dict(num_sites=1001), "data.num_sites"),
    (dict(num_sites=100, min_examples=11), "data.min_examples"),
    (dict(partition="quantity_skew", quantity_sigma=-1.0), "data.quantity_sigma"),
])
def test_errors_name_the_key(overrides, key):
  with pytest.raises(ConfigError) as info:
    partition_lib.partition(_dataset(1000), _config(**overrides), seed=0)
  assert info.value.key == key


# ----------------------------------------------------------------------------- command


_CONFIG_FILE = """
import ml_collections
from fedjax_lab.data.sources import default_data_config

def get_config():
  c = ml_collections.ConfigDict()
  c.seed = 3
  c.data = default_data_config()
  c.data.num_sites = 12
  c.data.partition = "dirichlet"
  return c
"""


def _run_histogram(tmp_path, *flags):
  config = tmp_path / "config.py"
  config.write_text(_CONFIG_FILE)
  env = dict(os.environ, PYTHONPATH=str(_REPO), MPLBACKEND="Agg")
  return subprocess.run(
      [sys.executable, "-m", "fedjax_lab.data.histogram", f"--config={config}", *flags],
      capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)


def test_histogram_command(tmp_path):
  out = tmp_path / "hist.png"
  result = _run_histogram(tmp_path, "--config.data.alpha=0.1", f"--out={out}")
  assert result.returncode == 0, result.stderr
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  lines = result.stdout.strip().splitlines()
  header, rows, total = lines[0].split(), lines[1:-1], lines[-1].split()
  assert header[0] == "site" and header[-1] == "total" and len(header) == 12
  counts = np.array([[int(v) for v in r.split()[1:-1]] for r in rows])
  assert counts.shape == (12, 10)
  assert counts.sum() == 1500 == int(total[-1])  # digits has 1500 training examples.
  np.testing.assert_array_equal(counts.sum(0), [int(v) for v in total[1:-1]])
  # Same table as calling the library directly with the config's seed and override.
  c = sources.default_data_config()
  c.num_sites, c.partition, c.alpha = 12, "dirichlet", 0.1
  train, _ = sources.load_dataset(c)
  expected = partition_lib.label_histogram(train.y, partition_lib.partition(train, c, 3), 10)
  np.testing.assert_array_equal(counts, expected)


@pytest.mark.parametrize("flag,key", [("--config.data.alpha=-1.0", "data.alpha"),
                                      ("--config.data.alpah=1", "data.alpah")])
def test_histogram_command_config_error_exits_2(tmp_path, flag, key):
  result = _run_histogram(tmp_path, flag, f"--out={tmp_path / 'h.png'}")
  lines = [l for l in result.stderr.splitlines() if l.strip()]
  assert result.returncode == 2 and len(lines) == 1, result.stderr
  assert lines[0].startswith(f"config error: {key}: ")


def test_experiment_by_column_csv_infers_sites_and_standardizes(tmp_path):
  import pandas as pd
  from fedjax_lab.config import default_config
  from fedjax_lab.experiment import Experiment
  rng = np.random.default_rng(0)
  frame = pd.DataFrame({"a": rng.normal(5, 3, 80), "b": rng.normal(-2, 0.5, 80),
                        "hospital": np.repeat([11, 12, 13, 14], 20),
                        "label": rng.integers(0, 2, 80)})
  frame.to_csv(tmp_path / "d.csv", index=False)
  c = default_config()
  c.data.update(dict(name="file", path=str(tmp_path / "d.csv"), partition="by_column",
                     column="hospital", num_sites=2))
  c.cohort_size, c.rounds = 3, 1  # 3 > the given num_sites=2, fine: the column has 4
  exp = Experiment(c)
  assert c.data.num_sites == 4 and exp.data.num_sites == 4
  assert exp.data_notes[0].startswith("data.num_sites=2 replaced by 4")
  assert exp.data_notes[1].startswith("data.standardize=global (auto: user file, no DP)")
  np.testing.assert_allclose(exp.train.x.mean(0), 0.0, atol=1e-5)
  np.testing.assert_allclose(exp.train.x.std(0), 1.0, rtol=1e-5)
  c.cohort_size, c.data.num_sites = 6, 100
  with pytest.raises(ConfigError, match=r"cohort_size: 6 > data.num_sites=4.*'hospital' has 4"):
    Experiment(c)


def test_experiment_site_dp_standardizes_each_site_with_its_own_statistics(tmp_path):
  import pandas as pd
  from fedjax_lab.config import default_config
  from fedjax_lab.experiment import Experiment
  rng = np.random.default_rng(1)
  hospital = np.repeat([0, 1, 2], 30)
  frame = pd.DataFrame({"a": rng.normal(5, 3, 90) + 10 * hospital, "b": rng.normal(0, 1, 90),
                        "hospital": hospital, "label": rng.integers(0, 2, 90)})
  frame.to_csv(tmp_path / "d.csv", index=False)
  c = default_config()
  c.data.update(dict(name="file", path=str(tmp_path / "d.csv"), partition="by_column",
                     column="hospital"))
  c.cohort_size, c.rounds = 2, 1
  c.dp.level, c.dp.noise_multiplier = "site", 1.0
  exp = Experiment(c)
  assert exp.data_notes[1].startswith("data.standardize=per_site (auto: user file, dp.level=site")
  for rows in exp.sites:
    np.testing.assert_allclose(exp.train.x[rows].mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(exp.train.x[rows].std(0), 1.0, rtol=1e-4)
  np.testing.assert_allclose(exp.test.x.mean(0), 0.0, atol=1e-5)  # its own statistics
