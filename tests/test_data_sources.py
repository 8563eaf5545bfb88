"""Tests for fedjax_lab.data.sources: every source against an independent expectation."""

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse
from sklearn import datasets as sk_datasets

from fedjax_lab.data import files, sources, tfds_source
from fedjax_lab.errors import ConfigError


def _config(**overrides):
  c = sources.default_data_config()
  for key, value in overrides.items():
    c[key] = value
  return c


def _small_synthetic(**overrides):
  c = _config(name="synthetic_expression")
  c.synthetic.update(dict(num_cells=3000, num_genes=200, num_cell_types=5, num_batches=4,
                          seed=3))
  c.synthetic.update(overrides)
  return c


# ----------------------------------------------------------------------------- config


def test_default_config_has_every_key():
  c = sources.default_data_config()
  expected = {"name", "path", "label_column", "feature_key", "label_key", "test_fraction",
              "split_seed", "num_sites", "partition", "alpha", "classes_per_site", "column",
              "quantity_sigma", "min_examples", "synthetic", "download", "standardize",
              "regression", "mock", "examples_per_site"}
  assert set(c.keys()) == expected
  assert set(c.synthetic.keys()) == {"num_cells", "num_genes", "num_cell_types",
                                     "num_batches", "batch_effect", "signal", "dispersion",
                                     "seed", "dtype"}
  assert (c.name, c.num_sites, c.partition, c.alpha, c.test_fraction) == (
      "digits", 100, "iid", 0.5, 0.2)


# ----------------------------------------------------------------------------- digits


def test_digits_split_is_the_fixed_contract():
  train, test = sources.load_dataset(_config())
  digits = sk_datasets.load_digits()
  order = np.random.RandomState(0).permutation(1797)
  x = digits.data[order] / 16.0  # digits.data is the flattened 8x8 image.
  y = digits.target[order]
  assert train.x.shape == (1500, 64) and test.x.shape == (297, 64)
  assert train.x.dtype == np.float32 and train.y.dtype == np.int32
  np.testing.assert_allclose(train.x, x[:1500], rtol=0, atol=1e-7)
  np.testing.assert_allclose(test.x, x[1500:], rtol=0, atol=1e-7)
  np.testing.assert_array_equal(train.y, y[:1500])
  np.testing.assert_array_equal(test.y, y[1500:])
  assert train.x.min() == 0.0 and train.x.max() == 1.0
  assert train.num_classes == 10 and dict(train.columns) == {}


# ----------------------------------------------------------------------------- pbmc68k


def test_pbmc68k_loads_from_the_bundled_file_and_is_stratified():
  train, test = sources.load_dataset(_config(name="pbmc68k"))
  assert len(train) + len(test) == 700
  assert train.x.shape[1] == test.x.shape[1] == 765
  assert train.num_classes == 10 and len(train.class_names) == 10
  assert len(test) == 140  # round(700 * 0.2)
  # Independent check of the cell-type counts quoted in STACK_NOTES (240 down to 8).
  totals = np.bincount(np.concatenate([train.y, test.y]), minlength=10)
  assert sorted(totals.tolist(), reverse=True)[0] == 240
  assert sorted(totals.tolist())[0] == 8
  test_counts = np.bincount(test.y, minlength=10)
  assert np.all(np.abs(test_counts - 0.2 * totals) < 1.0)  # Stratified to within one cell.
  assert {"phase", "louvain"} <= set(train.columns)
  assert len(np.unique(np.concatenate([train.columns["louvain"], test.columns["louvain"]]))) == 11
  # Deterministic.
  train2, _ = sources.load_dataset(_config(name="pbmc68k"))
  np.testing.assert_array_equal(train.x, train2.x)


def test_pbmc68k_missing_path_names_data_path(tmp_path):
  with pytest.raises(ConfigError, match="data.path"):
    sources.load_dataset(_config(name="pbmc68k", path=str(tmp_path / "nope.h5ad")))


def test_pbmc68k_without_bundled_file_or_scanpy_says_how_to_fix(tmp_path, monkeypatch):
  monkeypatch.setattr(files, "_BUNDLED_DIR", tmp_path)
  monkeypatch.setattr(files.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(ConfigError, match=r"data.name: pbmc68k needs scanpy.*pip install scanpy"):
    sources.load_dataset(_config(name="pbmc68k"))


# ----------------------------------------------------------------------------- stratified split


def test_stratified_split_keeps_class_shares():
  y = np.repeat(np.arange(4), [50, 31, 9, 1])
  train_idx, test_idx = sources.stratified_split(y, 0.2, seed=0)
  assert len(np.intersect1d(train_idx, test_idx)) == 0
  np.testing.assert_array_equal(np.sort(np.concatenate([train_idx, test_idx])), np.arange(91))
  assert len(test_idx) == round(91 * 0.2)
  counts = np.bincount(y[test_idx], minlength=4)
  assert np.all(np.abs(counts - 0.2 * np.array([50, 31, 9, 1])) < 1.0)
  assert counts[3] == 0  # A class of one example stays in train.
  again, _ = sources.stratified_split(y, 0.2, seed=0)
  other, _ = sources.stratified_split(y, 0.2, seed=1)
  np.testing.assert_array_equal(again, train_idx)
  assert not np.array_equal(other, train_idx)


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_shapes_columns_and_features_match_counts():
  c = _small_synthetic()
  train, test = sources.load_dataset(c)
  assert train.x.shape == (2400, 200) and test.x.shape == (600, 200)
  assert train.x.dtype == np.float32 and train.num_classes == 5
  assert set(train.columns) == {"batch"}
  # The features are log1p(counts / library * 1e4) of the raw counts, rows split stratified.
  counts, cell_type, batch = sources.synthetic_counts(c.synthetic)
  train_idx, test_idx = sources.stratified_split(cell_type, 0.2, 0)
  library = counts.sum(1, keepdims=True)
  expected = np.log1p(counts / np.maximum(library, 1) * 1e4)
  np.testing.assert_allclose(train.x, expected[train_idx], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(test.x, expected[test_idx], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(train.y, cell_type[train_idx])
  np.testing.assert_array_equal(test.columns["batch"], batch[test_idx])


def test_synthetic_float16_option():
  train, _ = sources.load_dataset(_small_synthetic(dtype="float16", num_cells=200))
  assert train.x.dtype == np.float16


def test_synthetic_counts_are_negative_binomial():
  phi = 0.5
  c = _small_synthetic(num_cells=40000, num_genes=30, batch_effect=0.0, signal=0.0,
                       dispersion=phi).synthetic
  counts, _, _ = sources.synthetic_counts(c)
  mu = sources.expression_model(c).base_mean
  mean, var = counts.mean(0), counts.var(0)
  expected_var = mu + phi * mu**2  # NB2: Var = mu + phi mu^2.
  # Standard error of a sample mean is sqrt(var / n); allow 5 of them.
  assert np.all(np.abs(mean - mu) < 5 * np.sqrt(expected_var / len(counts)))
  # Sample variance error is ~ var * sqrt(2 / n) (plus kurtosis); 10% is > 5 sigma here.
  big = mu > 0.2
  np.testing.assert_allclose(var[big], expected_var[big], rtol=0.1)
  # Overdispersion is visible: a Poisson would have var == mean.
  assert np.all(var[mu > 1] > 1.2 * mean[mu > 1])
  # P(0) of NB2: (1 + phi mu)^(-1/phi).
  p0 = (counts == 0).mean(0)
  np.testing.assert_allclose(p0, (1 + phi * mu)**(-1 / phi), atol=0.01)


def test_synthetic_batch_effect_shows_in_per_batch_means():
  def between_batch_spread(batch_effect):
    c = _small_synthetic(batch_effect=batch_effect, signal=0.0).synthetic
    counts, _, batch = sources.synthetic_counts(c)
    x = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)
    per_batch = np.stack([x[batch == b].mean(0) for b in range(4)])  # [batches, genes]
    return per_batch.std(0).mean()
  assert between_batch_spread(0.8) > 4 * between_batch_spread(0.0)


def test_synthetic_cell_types_are_predictable():
  def nearest_centroid_accuracy(signal):
    train, test = sources.load_dataset(_small_synthetic(signal=signal, batch_effect=0.5))
    centroids = np.stack([train.x[train.y == k].mean(0) for k in range(5)])
    distance = ((test.x[:, None, :] - centroids[None]) ** 2).sum(-1)
    return (distance.argmin(1) == test.y).mean()
  # Chance is 0.2 (5 types); 10 marker genes per type at e^1 = 2.7x give ~0.8.
  assert nearest_centroid_accuracy(1.0) > 0.6
  assert nearest_centroid_accuracy(0.0) < 0.3


def test_synthetic_is_deterministic_per_seed():
  a, _ = sources.load_dataset(_small_synthetic(num_cells=300))
  b, _ = sources.load_dataset(_small_synthetic(num_cells=300))
  d, _ = sources.load_dataset(_small_synthetic(num_cells=300, seed=4))
  np.testing.assert_array_equal(a.x, b.x)
  assert not np.array_equal(a.x, d.x)


def test_synthetic_bad_values_raise():
  with pytest.raises(ConfigError, match="data.synthetic.dispersion"):
    sources.load_dataset(_small_synthetic(dispersion=-1.0))
  with pytest.raises(ConfigError, match="data.synthetic.dtype"):
    sources.load_dataset(_small_synthetic(dtype="int8"))


# ----------------------------------------------------------------------------- tfds


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  """A tiny array_record TFDS data set (train 30, test 9) written without TensorFlow."""
  import PIL.Image
  import tensorflow_datasets as tfds

  class FedjaxLabTinyImages(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          features=tfds.features.FeaturesDict({
              # PNG encoding from a PIL image needs no TensorFlow.
              "image": tfds.features.Image(shape=(4, 4, 1)),
              "label": tfds.features.ClassLabel(names=["a", "b", "c"]),
          }),
          disable_shuffling=True)

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples(0, 30),
              "test": self._generate_examples(30, 39)}

    def _generate_examples(self, start, stop):
      for i in range(start, stop):
        pixels = np.full((4, 4), i * 5, np.uint8)
        pixels[0, 0] = 255
        yield i, {"image": PIL.Image.fromarray(pixels), "label": i % 3}

  data_dir = tmp_path_factory.mktemp("tfds")
  FedjaxLabTinyImages(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
  return data_dir


def test_tfds_source_reads_array_record(tfds_dir):
  train, test = sources.load_dataset(
      _config(name="tfds:fedjax_lab_tiny_images", path=str(tfds_dir)))
  assert train.x.shape == (30, 4, 4, 1) and test.x.shape == (9, 4, 4, 1)
  assert train.x.dtype == np.float32
  assert train.num_classes == 3 and train.class_names == ("a", "b", "c")
  # Records are written in order (disable_shuffling): example i has pixels i * 5 / 255.
  np.testing.assert_allclose(train.x[:, 1, 1, 0], np.arange(30) * 5 / 255.0, rtol=1e-6)
  np.testing.assert_allclose(train.x[:, 0, 0, 0], 1.0)
  np.testing.assert_array_equal(train.y, np.arange(30) % 3)
  np.testing.assert_array_equal(test.y, np.arange(30, 39) % 3)


def test_tfds_errors(tfds_dir):
  with pytest.raises(ConfigError, match="data.feature_key"):
    sources.load_dataset(_config(name="tfds:fedjax_lab_tiny_images", path=str(tfds_dir),
                                 feature_key="pixels"))
  with pytest.raises(ConfigError, match="data.name"):
    sources.load_dataset(_config(name="tfds:no_such_dataset_xyz", path=str(tfds_dir)))
  # Known builder, empty data_dir, no download allowed: says how to prepare it.
  with pytest.raises(ConfigError, match=r"data.path.*not prepared.*data.download"):
    sources.load_dataset(_config(name="tfds:fedjax_lab_tiny_images",
                                 path=str(tfds_dir / "empty")))


def test_tfds_download_without_internet_fails_fast_with_one_line(tfds_dir, monkeypatch):
  import socket
  import time

  def unreachable(address, timeout=None, **kwargs):
    raise OSError(101, "Network is unreachable")

  monkeypatch.setattr(socket, "create_connection", unreachable)
  start = time.perf_counter()
  with pytest.raises(ConfigError) as info:
    sources.load_dataset(_config(name="tfds:fedjax_lab_tiny_images", download=True,
                                 path=str(tfds_dir / "empty_download")))
  assert time.perf_counter() - start < 10
  assert info.value.key == "data.download" and "\n" not in str(info.value)
  assert "no internet" in str(info.value) and "data.path" in str(info.value)


def test_tfds_download_probe_times_out_on_an_unreachable_host(monkeypatch):
  import time
  # 192.0.2.1 is TEST-NET-1 (RFC 5737): never routed, so the connection cannot succeed.
  monkeypatch.setattr(tfds_source, "_DOWNLOAD_PROBE", ("192.0.2.1", 443))
  monkeypatch.setattr(tfds_source, "_DOWNLOAD_PROBE_TIMEOUT_S", 1.0)
  start = time.perf_counter()
  with pytest.raises(ConfigError, match="data.download: True but there is no internet"):
    tfds_source._check_internet("mnist")
  assert time.perf_counter() - start < 5


# ----------------------------------------------------------------------------- files


def test_npz_with_test_split(tmp_path):
  rng = np.random.default_rng(0)
  x, x_test = rng.normal(size=(40, 3)), rng.normal(size=(10, 3))
  y, y_test = np.arange(40) % 4, np.arange(10) % 4
  path = tmp_path / "d.npz"
  np.savez(path, x=x, y=y, x_test=x_test, y_test=y_test)
  train, test = sources.load_dataset(_config(name="file", path=str(path)))
  np.testing.assert_allclose(train.x, x.astype(np.float32))
  np.testing.assert_array_equal(test.y, y_test)
  assert train.num_classes == 4 and train.x.dtype == np.float32


def test_npz_without_test_split_is_stratified_and_keeps_columns(tmp_path):
  y = np.repeat([0, 1], [30, 20])
  site = np.arange(50) % 5
  path = tmp_path / "d.npz"
  np.savez(path, x=np.arange(100.0).reshape(50, 2), y=y, site=site)
  train, test = sources.load_dataset(_config(name="file", path=str(path)))
  assert (len(train), len(test)) == (40, 10)
  assert np.bincount(test.y).tolist() == [6, 4]
  # Rows stay attached to their labels and columns: x[:, 0] / 2 is the original row index.
  rows = (train.x[:, 0] / 2).astype(int)
  np.testing.assert_array_equal(train.y, y[rows])
  np.testing.assert_array_equal(train.columns["site"], site[rows])


def test_csv_string_labels_become_codes(tmp_path):
  frame = pd.DataFrame({
      "f1": np.arange(20.0), "f2": np.arange(20.0) * 2,
      "hospital": ["h1", "h2"] * 10,
      "diagnosis": ["sick", "well", "well", "sick", "unknown"] * 4})
  path = tmp_path / "d.csv"
  frame.to_csv(path, index=False)
  train, test = sources.load_dataset(
      _config(name="file", path=str(path), label_column="diagnosis"))
  assert train.class_names == ("sick", "unknown", "well")
  assert train.num_classes == 3 and train.x.shape[1] == 2 and len(train) + len(test) == 20
  rows = train.x[:, 0].astype(int)
  names = np.array(train.class_names)[train.y]
  np.testing.assert_array_equal(names, frame["diagnosis"].to_numpy()[rows])
  np.testing.assert_array_equal(train.columns["hospital"], rows % 2)  # h1 -> 0, h2 -> 1.


def test_csv_missing_label_column_lists_columns(tmp_path):
  path = tmp_path / "d.csv"
  pd.DataFrame({"a": [1.0, 2.0], "b": [0, 1]}).to_csv(path, index=False)
  with pytest.raises(ConfigError, match=r"data.label_column.*available: a, b"):
    sources.load_dataset(_config(name="file", path=str(path), label_column="label"))


def test_csv_numeric_site_id_is_the_by_column_column_not_a_feature(tmp_path):
  frame = pd.DataFrame({"f1": np.arange(40.0), "hospital": np.arange(40) % 4,
                        "label": np.arange(40) % 2})
  path = tmp_path / "d.csv"
  frame.to_csv(path, index=False)
  plain, _ = sources.load_dataset(_config(name="file", path=str(path)))
  assert plain.x.shape[1] == 2 and not plain.columns  # an int column is a feature by default
  train, _ = sources.load_dataset(_config(name="file", path=str(path), partition="by_column",
                                          column="hospital"))
  assert train.x.shape[1] == 1
  rows = train.x[:, 0].astype(int)
  np.testing.assert_array_equal(train.columns["hospital"], rows % 4)


def test_empty_csv_is_a_config_error(tmp_path):
  path = tmp_path / "d.csv"
  path.write_text("")
  with pytest.raises(ConfigError, match=r"data.path: .*is empty"):
    sources.load_dataset(_config(name="file", path=str(path)))


@pytest.mark.parametrize("sparse", [False, True])
def test_h5ad_dense_and_sparse(tmp_path, sparse):
  rng = np.random.default_rng(0)
  dense = rng.poisson(1.0, size=(30, 6)).astype(np.float32)
  obs = pd.DataFrame({"cell_type": pd.Categorical(["T", "B", "NK"] * 10),
                      "donor": pd.Categorical(["d1"] * 15 + ["d2"] * 15),
                      "n_counts": dense.sum(1)},
                     index=[f"c{i}" for i in range(30)])
  x = scipy.sparse.csr_matrix(dense) if sparse else dense
  path = tmp_path / "d.h5ad"
  anndata.AnnData(X=x, obs=obs).write_h5ad(path)
  train, test = sources.load_dataset(
      _config(name="file", path=str(path), label_column="cell_type"))
  assert train.x.dtype == np.float32 and train.x.shape == (24, 6) and test.x.shape == (6, 6)
  assert train.class_names == ("B", "NK", "T")
  assert set(train.columns) == {"donor"}  # Continuous obs (n_counts) are not site columns.
  all_x = np.concatenate([train.x, test.x])
  assert sorted(map(tuple, all_x)) == sorted(map(tuple, dense))
  with pytest.raises(ConfigError, match=r"data.label_column.*cell_type, donor, n_counts"):
    sources.load_dataset(_config(name="file", path=str(path), label_column="celltype"))


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("overrides,key", [
    (dict(name="mnist"), "data.name"),
    (dict(name="file", path="/nonexistent/d.npz"), "data.path"),
    (dict(name="file", path=""), "data.path"),
    (dict(name="file", path="/tmp/d.parquet"), "data.path"),
    (dict(test_fraction=1.5), "data.test_fraction"),
])
def test_config_errors_name_the_key(overrides, key):
  with pytest.raises(ConfigError) as info:
    sources.load_dataset(_config(**overrides))
  assert info.value.key == key
  assert key in str(info.value)


def test_unknown_name_lists_allowed():
  with pytest.raises(ConfigError, match="allowed: digits, pbmc68k, synthetic_expression"):
    sources.load_dataset(_config(name="mnist"))


# ----------------------------------------------------------------------------- standardize


def _full_config(**data):
  from fedjax_lab.config import default_config
  c = default_config()
  for key, value in data.items():
    c.data[key] = value
  return c


def _tabular(n=60, features=4, seed=0, shift=0.0):
  rng = np.random.default_rng(seed)
  x = (rng.normal(3.0 + shift, 2.0, size=(n, features)) * np.arange(1, features + 1)
       ).astype(np.float32)
  x[:, -1] = 7.0  # a constant feature: centred, not divided by 0
  y = rng.integers(0, 3, size=n).astype(np.int32)
  return sources.Dataset(x=x, y=y, num_classes=3, columns={}, name="file")


def test_standardize_global_fits_on_train_only_and_applies_to_test():
  from fedjax_lab.data import standardize
  train, test = _tabular(60), _tabular(20, seed=1, shift=5.0)
  sites = [np.arange(0, 30), np.arange(30, 60)]
  c = _full_config(name="file", path="x.csv")  # auto + file + no DP = global
  assert standardize.resolve(c)[0] == "global"
  new_train, new_test, _, note = standardize.apply(c, train, test, sites)
  x64 = train.x.astype(np.float64)
  mean, std = x64.mean(0), x64.std(0)
  std[std == 0] = 1.0
  np.testing.assert_allclose(new_train.x.mean(0), 0.0, atol=1e-5)
  np.testing.assert_allclose(new_train.x[:, :-1].std(0), 1.0, rtol=1e-5)
  np.testing.assert_array_equal(new_train.x[:, -1], 0.0)
  np.testing.assert_allclose(new_test.x, (test.x - mean) / std, rtol=1e-5, atol=1e-5)
  assert abs(new_test.x[:, 0].mean()) > 0.5  # test keeps its shift: train statistics, not its own
  np.testing.assert_array_equal(new_train.y, train.y)
  assert note.startswith("data.standardize=global (auto: user file, no DP): mean/std fitted on "
                         "the 60 training examples of all sites (never the test split)")


def test_standardize_per_site_each_site_mean_zero_and_test_its_own():
  from fedjax_lab.data import standardize
  train, test = _tabular(60), _tabular(20, seed=1, shift=5.0)
  sites = [np.arange(0, 60, 3), np.setdiff1d(np.arange(60), np.arange(0, 60, 3))]
  c = _full_config(name="file", path="x.csv", standardize="per_site")
  new_train, new_test, _, note = standardize.apply(c, train, test, sites)
  for rows in sites:
    x64 = train.x[rows].astype(np.float64)
    std = x64.std(0)
    std[std == 0] = 1.0
    np.testing.assert_allclose(new_train.x[rows], (x64 - x64.mean(0)) / std, atol=1e-5)
    np.testing.assert_allclose(new_train.x[rows].mean(0), 0.0, atol=1e-5)
  np.testing.assert_allclose(new_test.x.mean(0), 0.0, atol=1e-5)


def test_standardize_public_uses_public_statistics():
  from fedjax_lab.data import standardize
  train, test, pub = _tabular(60), _tabular(20, seed=1), _tabular(30, seed=2, shift=1.0)
  c = _full_config(name="file", path="x.csv")
  c.optim.public_data = "holdout:0.2"
  c.dp.level, c.dp.noise_multiplier = "example", 1.0
  assert standardize.resolve(c)[0] == "public"  # auto under DP with a public set
  new_train, new_test, new_pub, note = standardize.apply(c, train, test, [np.arange(60)], pub)
  mean, std = pub.x.astype(np.float64).mean(0), pub.x.astype(np.float64).std(0)
  std[std == 0] = 1.0
  np.testing.assert_allclose(new_pub.x.mean(0), 0.0, atol=1e-5)
  np.testing.assert_allclose(new_train.x, (train.x - mean) / std, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(new_test.x, (test.x - mean) / std, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,dp_level,expected", [
    ("digits", "none", "none"), ("pbmc68k", "site", "none"), ("tfds:mnist", "none", "none"),
    ("synthetic_expression", "none", "none"), ("file", "none", "global"),
    ("file", "site", "per_site"), ("file", "example", "none")])
def test_standardize_auto(name, dp_level, expected):
  from fedjax_lab.data import standardize
  c = _full_config(name=name)
  c.dp.level, c.dp.noise_multiplier = dp_level, 1.0
  assert standardize.resolve(c)[0] == expected


@pytest.mark.parametrize("mode,dp_level,public_data", [
    ("global", "site", None), ("global", "example", None), ("per_site", "example", None),
    ("public", "none", None), ("zscore", "none", None)])
def test_standardize_config_errors_name_the_key(mode, dp_level, public_data):
  from fedjax_lab.config import validate
  c = _full_config(name="file", path="x.csv", standardize=mode)
  c.dp.level, c.dp.noise_multiplier = dp_level, 1.0
  c.optim.public_data = public_data
  with pytest.raises(ConfigError) as info:
    validate(c)
  assert info.value.key == "data.standardize"
  assert "allowed" in str(info.value)


def test_label_with_one_class_is_a_config_error(tmp_path):
  path = tmp_path / "one.csv"
  pd.DataFrame({"a": np.arange(20.0), "b": np.ones(20), "label": ["T"] * 20}).to_csv(
      path, index=False)
  with pytest.raises(ConfigError, match=r"data.label_column.*one class \(T\)"):
    sources.load_dataset(_config(name="file", path=str(path)))
  npz = tmp_path / "one.npz"
  np.savez(npz, x=np.zeros((10, 2)), y=np.zeros(10))
  with pytest.raises(ConfigError) as info:
    sources.load_dataset(_config(name="file", path=str(npz)))
  assert info.value.key == "data.path"


def _stray_cell_csv(tmp_path):
  """40 rows of two numeric features; row 7 of 'f2' holds the typo 'oops'."""
  frame = pd.DataFrame({"f1": np.arange(40.0), "f2": np.arange(40.0).astype(object),
                        "label": np.arange(40) % 2})
  frame.loc[6, "f2"] = "oops"
  path = tmp_path / "d.csv"
  frame.to_csv(path, index=False)
  return path


def test_csv_stray_cell_in_a_numeric_column_names_column_and_row(tmp_path):
  """A typo must not silently move the column out of the features (issue 28)."""
  path = _stray_cell_csv(tmp_path)
  with pytest.raises(ConfigError, match=r"data.path: .*column 'f2' is numeric but row 7 "
                     r"\(line 8 of the file\) holds 'oops'"):
    sources.load_dataset(_config(name="file", path=str(path)))
  assert path.read_text().splitlines()[7].split(",")[1] == "oops"  # line 8 is that row


def test_csv_column_named_as_the_site_column_may_hold_names(tmp_path):
  path = _stray_cell_csv(tmp_path)
  train, _ = sources.load_dataset(_config(name="file", path=str(path), partition="by_column",
                                          column="f2"))
  assert train.x.shape[1] == 1 and "f2" in train.columns


def test_csv_missing_feature_value_names_its_row(tmp_path):
  frame = pd.DataFrame({"f1": np.arange(40.0), "f2": np.arange(40.0), "label": np.arange(40) % 2})
  frame.loc[11, "f2"] = np.nan
  path = tmp_path / "d.csv"
  frame.to_csv(path, index=False)
  with pytest.raises(ConfigError, match=r"column 'f2', row 12 \(line 13 of the file\)"):
    sources.load_dataset(_config(name="file", path=str(path)))


def test_small_csv_over_the_default_sites_warns_with_a_size_that_fits(tmp_path, caplog):
  """300 rows, test_fraction 0.2: 240 training examples over the default 100 sites is 2.4 a
  site; the warning names data.num_sites and 240 // 20 = 12 sites."""
  rng = np.random.default_rng(0)
  path = tmp_path / "patients.csv"
  pd.DataFrame({"a": rng.normal(size=300), "b": rng.normal(size=300),
                "label": np.arange(300) % 2}).to_csv(path, index=False)
  assert _config(name="file", path=str(path)).num_sites == 100  # the default a user gets
  with caplog.at_level("WARNING", logger="fedjax_lab"):
    sources.load_dataset(_config(name="file", path=str(path)))
  (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert "data.num_sites=100" in warning and "240 training examples" in warning
  assert "2.4 a site" in warning and "e.g. 12" in warning
  caplog.clear()
  with caplog.at_level("WARNING", logger="fedjax_lab"):
    sources.load_dataset(_config(name="file", path=str(path), num_sites=12))
  assert not [r for r in caplog.records if r.levelname == "WARNING"]
