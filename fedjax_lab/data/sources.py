"""Data sources: every data set the lab trains on, loaded to host NumPy arrays.

`load_dataset(data_config)` returns `(train, test)` as two `Dataset`s; partitioners
(`fedjax_lab.data.partition`) then split `train` over sites. Everything here is offline:

- `digits` (default): scikit-learn's bundled 8x8 digits, 1797 x 64, 10 classes. The split is
  FIXED (a benchmark contract): rows permuted by `np.random.RandomState(0).permutation(1797)`,
  the first 1500 are train, the last 297 test. `data.test_fraction` does not apply.
- `pbmc68k`: scanpy's `10x_pbmc68k_reduced.h5ad` (700 cells x 765 genes, X scaled,
  `bulk_labels` 10 cell types), bundled in `fedjax_lab/data/bundled/` (BSD-3, see the README
  there), so scanpy is not needed. obs categoricals ("phase", "louvain") become columns.
- `synthetic_expression`: negative-binomial single-cell counts with per-batch multiplicative
  batch effects and cell-type marker genes (model in `ExpressionModel`); column "batch".
  Measured on this 2-core VM (numpy 2.4, shared with other jobs): 1,000,000 cells x 2,000
  genes costs ~150 CPU-seconds (~75 ns per count: Poisson ~48, gamma ~19, normalisation ~10),
  spread over 2 threads: 131 s wall at load average ~4 (idle machine: ~75 s, not measured).
  Peak RSS 7.7 GiB with float32 (the 7.45 GiB [N, G] output, filled in place; train and test
  are views of it), 4.0 GiB with `data.synthetic.dtype="float16"`.
- `gse7390`: breast-cancer prognosis, distant metastasis within 5 years (198 tumours, 76
  genes + clinical; `fedjax_lab/data/gse7390.py`: the censoring rule and where the file comes
  from: data.path = .arff/.csv/GEO series matrix, data.download=True, or scikit-survival's copy).
- `synthetic_regression`: a REGRESSION task, a 1-D function (sine, squared sine) sampled on the
  host (`fedjax_lab/data/synthetic_regression.py`); y is float32 and num_classes 1. Every
  other source is a classification task (`task_of`).
- `tfds:<name>`: a TFDS data set read through `tfds.data_source` (array_record), no TensorFlow.
  `data.path` is the TFDS data_dir. Images (uint8) are scaled to [0, 1].
- `file`: a user file at `data.path`: `.npz` (arrays x, y; optional x_test, y_test; other
  1-D arrays of length N become columns), `.csv` (numeric columns are features, the label
  column by name, columns of names become site columns; a stray non-number in a numeric
  column is an error naming its row) or `.h5ad` (obs label column,
  X dense or sparse, obs categoricals become columns). The `data.column` of a by_column
  partition is a column even when numeric (a site id), never a feature.

Sources without a natural test split use `stratified_split` with `data.test_fraction` and
`data.split_seed`. Labels that are not non-negative integers become categorical codes in
sorted order, with `class_names`.

Bad input raises `ConfigError(key, problem)` naming the config key and the fix.
"""

import concurrent.futures
import dataclasses
import importlib.util
import logging
import os
import pathlib
import socket
from typing import Any, Callable, Mapping
import warnings

import ml_collections
import numpy as np

from fedjax_lab.errors import ConfigError

log = logging.getLogger("fedjax_lab")

NAMES = ("digits", "pbmc68k", "synthetic_expression", "gse7390", "synthetic_regression",
         "tfds:<name>", "file", "cifar100_pachinko", "emnist62")
REGRESSION_SOURCES = ("synthetic_regression",)
FILE_EXTENSIONS = (".npz", ".csv", ".h5ad")
SYNTHETIC_DTYPES = ("float32", "float16")

_BUNDLED_DIR = pathlib.Path(__file__).resolve().parent / "bundled"
_PBMC_FILENAME = "10x_pbmc68k_reduced.h5ad"
_PBMC_LABEL_COLUMN = "bulk_labels"
_DEFAULT_LABEL_COLUMN = "label"
# Cells per independently seeded chunk of synthetic counts: fixed, so that a cell's counts do
# not depend on how many threads generated them.
_SYNTHETIC_CHUNK_CELLS = 2048
_TFDS_READ_BATCH = 4096


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: `==` on arrays is ambiguous.
class Dataset:
  """Examples of one split on the host.

  Attributes:
    x: [N, ...] features (float32; float16 only if `data.synthetic.dtype` asks for it).
    y: [N] int32 labels in [0, num_classes); float32 targets for a regression source.
    num_classes: number of classes (some may be absent from a split); 1 for regression.
    columns: per-example metadata, each [N] int (e.g. "batch", "donor"); may be empty.
    name: the data set, as in `data.name`.
    class_names: names of the classes, index = label; empty if unnamed.
  """
  x: np.ndarray
  y: np.ndarray
  num_classes: int
  columns: Mapping[str, np.ndarray]
  name: str
  class_names: tuple[str, ...] = ()

  def __post_init__(self):
    n = len(self.x)
    if self.y.shape != (n,):
      raise ValueError(f"y has shape {self.y.shape}, expected ({n},)")
    for key, column in self.columns.items():
      if np.shape(column) != (n,):
        raise ValueError(f"column {key!r} has shape {np.shape(column)}, expected ({n},)")

  def __len__(self) -> int:
    return len(self.x)

  def subset(self, indices: np.ndarray) -> "Dataset":
    """The examples at `indices` ([M] ints), columns included (copies)."""
    return dataclasses.replace(
        self, x=self.x[indices], y=self.y[indices],
        columns={k: v[indices] for k, v in self.columns.items()})


def default_data_config() -> ml_collections.ConfigDict:
  """Every `data.*` key with its default; configs start from this and override."""
  c = ml_collections.ConfigDict()
  c.name = "digits"
  c.path = ""                   # file: .npz/.csv/.h5ad; tfds:*: data_dir; pbmc68k: optional
  c.label_column = ""           # csv/h5ad label; "" = "bulk_labels" (pbmc68k) or "label"
  c.feature_key = "image"       # tfds feature holding x
  c.label_key = "label"         # tfds feature holding y
  c.download = False            # tfds:*: download and prepare if absent (needs internet);
                                # gse7390: fetch GEO's series matrix once (cached, gse7390.py)
  c.mock = False                # cifar100_pachinko / emnist62: tfds.testing.mock_data
  c.test_fraction = 0.2         # sources without a test split: stratified split
  c.split_seed = 0
  c.num_sites = 100
  c.partition = "iid"           # iid | dirichlet | shards | by_column | quantity_skew
  c.alpha = 0.5                 # dirichlet concentration; small = more label skew
  c.classes_per_site = 2        # shards
  c.column = ""                 # by_column: a key of Dataset.columns
  c.quantity_sigma = 1.0        # quantity_skew: lognormal sigma of site sizes
  c.min_examples = 1            # every site gets at least this many examples
  # auto | none | global | per_site | public (data/standardize.py): auto = none for bundled
  # and tfds sources; for files global without DP, per_site / public / none under DP.
  c.standardize = "auto"
  c.synthetic = ml_collections.ConfigDict(dict(
      num_cells=20000, num_genes=2000, num_cell_types=10, num_batches=10,
      batch_effect=0.5, signal=1.0, dispersion=0.2, seed=0, dtype="float32"))
  # synthetic_regression (data/synthetic_regression.py): function sine | squared_sine; noise:
  # std of the Gaussian noise on the training targets (test targets are the function).
  c.regression = ml_collections.ConfigDict(dict(
      function="sine", num_examples=2000, noise=0.0, seed=0))
  return c


def task_of(name: str) -> str:
  """'regression' for the sources in REGRESSION_SOURCES, else 'classification'."""
  return "regression" if name in REGRESSION_SOURCES else "classification"


def load_dataset(data_config) -> tuple[Dataset, Dataset]:
  """Loads `(train, test)` as host NumPy arrays.

  Args:
    data_config: the `data` sub-config (see `default_data_config`).

  Returns:
    (train, test) `Dataset`s with the same `num_classes`, `class_names` and column keys.

  Raises:
    ConfigError: unknown `data.name`, missing or unsupported file, missing label column, ...
  """
  name = data_config.name
  if not 0 < data_config.test_fraction < 1:
    raise ConfigError("data.test_fraction",
                      f"must be in (0, 1), got {data_config.test_fraction}")
  if name.startswith("tfds:") and len(name) > len("tfds:"):
    train, test = _load_tfds(data_config, name[len("tfds:"):])
  elif name not in _SOURCES:
    raise ConfigError("data.name", f"unknown data set '{name}'; allowed: {', '.join(NAMES)}")
  else:
    train, test = _SOURCES[name](data_config)
  _check_two_classes(train, test, data_config)
  return train, test


def _check_two_classes(train: Dataset, test: Dataset, data_config) -> None:
  """A label with one class is nothing to learn: ConfigError naming the label's key."""
  classes = np.unique(np.concatenate([train.y, test.y]))
  if len(classes) >= 2:
    return
  if data_config.name.startswith("tfds:"):
    key = "data.label_key"
  elif data_config.name == "file" and pathlib.Path(data_config.path).suffix.lower() == ".npz":
    key = "data.path"
  else:
    key = "data.label_column"
  only = (train.class_names[classes[0]] if len(classes) and len(train.class_names) > classes[0]
          else (classes[0] if len(classes) else "none"))
  raise ConfigError(key, f"the label of {data_config.name} has one class ({only}) in all "
                    f"{len(train) + len(test)} examples; a classifier needs at least 2: "
                    "check the label column")


def stratified_split(y: np.ndarray, test_fraction: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Splits example indices so every class keeps (almost exactly) its share in test.

  Class k with n_k examples sends floor(n_k * f) or that plus one to test (largest
  remainders first, so the test split has round(N * f) examples), never all of a class:
  a class of one example stays in train. Which examples go is drawn with
  `np.random.default_rng(seed)`.

  Args:
    y: [N] int labels.
    test_fraction: f in (0, 1).
    seed: split seed.

  Returns:
    (train_idx, test_idx): sorted int64 arrays partitioning range(N).
  """
  rng = np.random.default_rng(seed)
  classes, counts = np.unique(y, return_counts=True)
  target = counts * test_fraction
  num_test = np.minimum(np.floor(target).astype(np.int64), np.maximum(counts - 1, 0))
  room = num_test < counts - 1
  short = int(round(len(y) * test_fraction)) - int(num_test.sum())
  # Stable sort: ties go to the smaller class index, so the split is seed-independent in size.
  for k in np.argsort(-(target - num_test), kind="stable"):
    if short <= 0:
      break
    if room[k]:
      num_test[k] += 1
      short -= 1
  test = [rng.permutation(np.flatnonzero(y == c))[:m] for c, m in zip(classes, num_test)]
  test_idx = np.sort(np.concatenate(test + [np.zeros(0, np.int64)])).astype(np.int64)
  train_mask = np.ones(len(y), bool)
  train_mask[test_idx] = False
  return np.flatnonzero(train_mask).astype(np.int64), test_idx


def _split(x, y, num_classes, columns, name, class_names, data_config):
  """Stratified (train, test) Datasets from one pool of examples."""
  train_idx, test_idx = stratified_split(y, data_config.test_fraction, data_config.split_seed)
  pool = Dataset(x=x, y=y, num_classes=num_classes, columns=columns, name=name,
                 class_names=class_names)
  return pool.subset(train_idx), pool.subset(test_idx)


# ----------------------------------------------------------------------------- digits


def _load_digits(data_config) -> tuple[Dataset, Dataset]:
  del data_config  # The split is a fixed contract.
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  x = (digits.images / 16.0).reshape(len(digits.images), -1).astype(np.float32)
  y = digits.target.astype(np.int32)
  order = np.random.RandomState(0).permutation(len(x))
  x, y = x[order], y[order]
  names = tuple(str(c) for c in range(10))
  make = lambda s: Dataset(x=x[s], y=y[s], num_classes=10, columns={}, name="digits",
                           class_names=names)
  return make(slice(0, 1500)), make(slice(1500, None))


# ----------------------------------------------------------------------------- labels


def _labels_to_codes(values: np.ndarray, key: str) -> tuple[np.ndarray, int, tuple[str, ...]]:
  """[N] labels of any type -> ([N] int32 codes, num_classes, class_names).

  Non-negative integers are kept as they are (class k stays k); anything else becomes codes
  in sorted order of the distinct values, named by them.
  """
  values = np.asarray(values)
  if values.dtype.kind == "f" and np.all(np.isfinite(values)) and np.all(values % 1 == 0):
    values = values.astype(np.int64)  # Integral floats (y saved as float) are class ids.
  if values.dtype.kind in "iu" and (len(values) == 0 or values.min() >= 0):
    num_classes = int(values.max()) + 1 if len(values) else 0
    return values.astype(np.int32), num_classes, ()
  if values.dtype.kind == "f" and np.any(np.isnan(values)):
    raise ConfigError(key, f"label has {int(np.isnan(values).sum())} missing values; "
                      "drop those rows or fill them")
  # Numbers sort as numbers (2 before 10); anything else by its string.
  sortable = values if values.dtype.kind in "iufb" else values.astype(str)
  names, codes = np.unique(sortable, return_inverse=True)
  return codes.astype(np.int32), len(names), tuple(str(n) for n in names)


def _categorical_codes(series) -> tuple[np.ndarray, tuple[str, ...]]:
  """A pandas Series (categorical / object / bool) -> ([N] int32 codes, names); -1 = missing."""
  import pandas as pd  # pylint: disable=g-import-not-at-top
  cat = series.astype("category") if not isinstance(series.dtype, pd.CategoricalDtype) else series
  cat = cat.cat.remove_unused_categories()
  return cat.cat.codes.to_numpy().astype(np.int32), tuple(str(c) for c in cat.cat.categories)


def _split_column(data_config) -> str | None:
  """The column by_column partitions on: taken as site metadata even when it is numeric
  (a hospital or donor id), and so never a feature."""
  return data_config.column if data_config.partition == "by_column" else None


def _is_categorical(series) -> bool:
  import pandas as pd  # pylint: disable=g-import-not-at-top
  return (isinstance(series.dtype, pd.CategoricalDtype) or pd.api.types.is_object_dtype(series)
          or pd.api.types.is_string_dtype(series) or pd.api.types.is_bool_dtype(series))


def _label_from_frame(frame, label_column: str, what: str):
  """Picks the label column of a DataFrame -> ([N] int32, num_classes, class_names)."""
  if label_column not in frame.columns:
    raise ConfigError("data.label_column",
                      f"'{label_column}' is not a column of {what}; available: "
                      f"{', '.join(map(str, frame.columns))}")
  series = frame[label_column]
  if series.isna().any():
    raise ConfigError("data.label_column", f"'{label_column}' of {what} has "
                      f"{int(series.isna().sum())} missing values; drop or fill those rows")
  if _is_categorical(series):
    codes, names = _categorical_codes(series)
    return codes, len(names), names
  return _labels_to_codes(series.to_numpy(), "data.label_column")


# ----------------------------------------------------------------------------- AnnData


def _read_h5ad(path: pathlib.Path):
  import anndata  # pylint: disable=g-import-not-at-top
  with warnings.catch_warnings():
    # Files from old anndata versions (like scanpy's pbmc68k) warn about their layout on
    # every read; they read correctly, and the user cannot act on the warning.
    warnings.simplefilter("ignore", FutureWarning)
    warnings.simplefilter("ignore", anndata.OldFormatWarning)
    return anndata.read_h5ad(path)


def _from_anndata(path: pathlib.Path, label_column: str, name: str, data_config):
  """(train, test) from .h5ad: X -> x, obs[label_column] -> y, obs categoricals -> columns."""
  adata = _read_h5ad(path)
  y, num_classes, class_names = _label_from_frame(adata.obs, label_column, f"obs of {path}")
  x = adata.X
  if hasattr(x, "toarray"):  # scipy.sparse
    x = x.toarray()
  x = np.asarray(x, dtype=np.float32)
  columns = {}
  for key in adata.obs.columns:
    if key != label_column and (_is_categorical(adata.obs[key])
                                or key == _split_column(data_config)):
      columns[str(key)] = _categorical_codes(adata.obs[key])[0]
  return _split(x, y, num_classes, columns, name, class_names, data_config)


def _pbmc68k_path(data_config) -> pathlib.Path:
  """Where the pbmc68k file is: data.path if set, else our bundled copy, else scanpy's."""
  if data_config.path:
    path = pathlib.Path(data_config.path).expanduser()
    if path.is_dir():
      path = path / _PBMC_FILENAME
    if not path.is_file():
      raise ConfigError("data.path", f"file not found: {path}; for pbmc68k set data.path to "
                        f"{_PBMC_FILENAME} or leave it empty to use the bundled copy")
    return path
  candidates = [_BUNDLED_DIR / _PBMC_FILENAME]
  spec = importlib.util.find_spec("scanpy")  # Locates scanpy without its slow import.
  if spec is not None and spec.submodule_search_locations:
    candidates += [pathlib.Path(p) / "datasets" / _PBMC_FILENAME
                   for p in spec.submodule_search_locations]
  for path in candidates:
    if path.is_file():
      return path
  raise ConfigError("data.name", "pbmc68k needs scanpy's bundled file: pip install scanpy "
                    f"(or set data.path to {_PBMC_FILENAME})")


def _load_pbmc68k(data_config) -> tuple[Dataset, Dataset]:
  label_column = data_config.label_column or _PBMC_LABEL_COLUMN
  return _from_anndata(_pbmc68k_path(data_config), label_column, "pbmc68k", data_config)


# ----------------------------------------------------------------------------- user files


def _load_file(data_config) -> tuple[Dataset, Dataset]:
  if not data_config.path:
    raise ConfigError("data.path", "data.name='file' needs data.path: a .npz (arrays x, y), "
                      ".csv or .h5ad file")
  path = pathlib.Path(data_config.path).expanduser()
  suffix = path.suffix.lower()
  if suffix not in FILE_EXTENSIONS:
    raise ConfigError("data.path", f"unsupported extension '{suffix}' of {path}; use one of "
                      f"{', '.join(FILE_EXTENSIONS)}")
  if not path.is_file():
    raise ConfigError("data.path", f"file not found: {path}; set data.path to an existing "
                      f"{'/'.join(FILE_EXTENSIONS)} file")
  label_column = data_config.label_column or _DEFAULT_LABEL_COLUMN
  if suffix == ".npz":
    train, test = _load_npz(path, data_config)
  elif suffix == ".csv":
    train, test = _load_csv(path, label_column, data_config)
  else:
    train, test = _from_anndata(path, label_column, "file", data_config)
  _warn_small_sites(train, data_config, path)
  return train, test


def _load_npz(path: pathlib.Path, data_config) -> tuple[Dataset, Dataset]:
  with np.load(path, allow_pickle=False) as npz:
    arrays = dict(npz)
  for key in ("x", "y"):
    if key not in arrays:
      raise ConfigError("data.path", f"{path} has no array '{key}' (has: "
                        f"{', '.join(arrays)}); save it with np.savez(path, x=..., y=...)")
  if ("x_test" in arrays) != ("y_test" in arrays):
    raise ConfigError("data.path", f"{path} must have both x_test and y_test, or neither")
  n_train = len(arrays["x"])
  if len(arrays["y"]) != n_train:
    raise ConfigError("data.path", f"{path}: x has {n_train} rows but y has "
                      f"{len(arrays['y'])}")
  has_test = "x_test" in arrays
  y_all = np.concatenate([arrays["y"], arrays["y_test"]]) if has_test else arrays["y"]
  # Codes over train and test together, so one label means the same class in both.
  y_all, num_classes, class_names = _labels_to_codes(y_all, "data.path")
  if "class_names" in arrays:
    class_names = tuple(str(c) for c in arrays["class_names"])
    num_classes = max(num_classes, len(class_names))
  x = arrays["x"].astype(np.float32)
  columns = {k: v for k, v in arrays.items()
             if k not in ("x", "y", "x_test", "y_test", "class_names")
             and v.ndim == 1 and len(v) == n_train}
  if not has_test:
    return _split(x, y_all, num_classes, columns, "file", class_names, data_config)
  x_test = arrays["x_test"].astype(np.float32)
  # Columns describe train rows only; the test split gets none unless it has them too.
  test_columns = {k: arrays[k + "_test"] for k in columns if k + "_test" in arrays}
  columns = {k: v for k, v in columns.items() if k in test_columns}
  train = Dataset(x=x, y=y_all[:n_train], num_classes=num_classes, columns=columns,
                  name="file", class_names=class_names)
  test = Dataset(x=x_test, y=y_all[n_train:], num_classes=num_classes, columns=test_columns,
                 name="file", class_names=class_names)
  return train, test


def _load_csv(path: pathlib.Path, label_column: str, data_config) -> tuple[Dataset, Dataset]:
  import pandas as pd  # pylint: disable=g-import-not-at-top
  try:
    frame = pd.read_csv(path)
  except pd.errors.EmptyDataError:
    raise ConfigError("data.path", f"{path} is empty; give a CSV with a header row, feature "
                      "columns and a label column") from None
  y, num_classes, class_names = _label_from_frame(frame, label_column, str(path))
  features, columns = [], {}
  for key in frame.columns:
    if key == label_column:
      continue
    if key != _split_column(data_config):
      _check_numeric_cells(frame[key], path)
    if _is_categorical(frame[key]) or key == _split_column(data_config):
      columns[str(key)] = _categorical_codes(frame[key])[0]
    else:
      features.append(key)
  if not features:
    raise ConfigError("data.path", f"{path} has no numeric feature columns besides the label "
                      f"'{label_column}'")
  if columns:  # columns of names are not features: say which is which
    log.info("%s: %d numeric feature columns; site columns (not features): %s", path,
             len(features), ", ".join(columns))
  x = frame[features].to_numpy(dtype=np.float32)
  if not np.all(np.isfinite(x)):
    bad = [str(k) for k in features if not np.all(np.isfinite(frame[k].to_numpy(float)))]
    row = int(np.flatnonzero(~np.isfinite(frame[bad[0]].to_numpy(float)))[0])
    raise ConfigError("data.path", f"{path}: feature columns {', '.join(bad)} have missing or "
                      f"infinite values (first: column '{bad[0]}', {_row(row)}); fill or "
                      "drop them")
  return _split(x, y, num_classes, columns, "file", class_names, data_config)


def _row(i: int) -> str:
  """Where the 0-based data row i is in a CSV file with one header line."""
  return f"row {i + 1} (line {i + 2} of the file)"


def _check_numeric_cells(series, path) -> None:
  """A column whose cells are mostly numbers is a feature column: a cell that is not one
  (a typo such as 'oops') is an error, not a reason to drop the whole column from the
  features as a site column. Columns of names (hospital, donor) stay site columns."""
  import pandas as pd  # pylint: disable=g-import-not-at-top
  if not pd.api.types.is_object_dtype(series) and not pd.api.types.is_string_dtype(series):
    return
  present = series.notna().to_numpy()
  numbers = pd.to_numeric(series, errors="coerce").notna().to_numpy()
  bad = np.flatnonzero(present & ~numbers)
  if len(bad) == 0 or numbers.sum() <= len(bad):
    return
  raise ConfigError("data.path", f"{path}: column '{series.name}' is numeric but {_row(bad[0])} "
                    f"holds {series.iloc[bad[0]]!r} ({len(bad)} non-numeric in all); fix them, "
                    "or if the column names sites, set data.column to it with "
                    "data.partition=by_column")


# Fewer training examples than this a site, on average, warns (_warn_small_sites).
_MIN_EXAMPLES_PER_SITE = 20


def _warn_small_sites(train: Dataset, data_config, path) -> None:
  """data.num_sites is 100 unless set; a small file split that way leaves each site a couple
  of examples (under example-level DP a sampling rate of 1 and a huge noise multiplier).
  The run goes ahead as configured, with a warning naming the key and a size that fits."""
  if data_config.partition == "by_column":
    return
  n, sites = len(train), data_config.num_sites
  if sites <= 0 or n / sites >= _MIN_EXAMPLES_PER_SITE:
    return
  suggest = max(1, n // _MIN_EXAMPLES_PER_SITE)
  log.warning("data.num_sites=%d splits the %d training examples of %s into %.1f a site; set "
              "--config.data.num_sites to the number of sites the data came from, or e.g. %d "
              "(%d a site; with --config.cohort_size at most that)", sites, n, path, n / sites,
              suggest, _MIN_EXAMPLES_PER_SITE)


# ----------------------------------------------------------------------------- TFDS


# data.download=True first opens one connection here, so that a machine without internet
# fails in seconds with one line instead of in tfds's retry loop.
_DOWNLOAD_PROBE = ("storage.googleapis.com", 443)
_DOWNLOAD_PROBE_TIMEOUT_S = 5.0


def _check_internet(tfds_name: str) -> None:
  host, port = _DOWNLOAD_PROBE
  try:
    socket.create_connection((host, port), timeout=_DOWNLOAD_PROBE_TIMEOUT_S).close()
  except OSError as e:
    raise ConfigError("data.download", f"True but there is no internet here ({host}:{port}: "
                      f"{e.strerror or e}); prepare tfds:{tfds_name} on a machine with internet "
                      f"(`tfds build {tfds_name} --file_format=array_record`), copy its "
                      "data_dir here and point data.path at it, with data.download=False"
                      ) from None


def _load_tfds(data_config, tfds_name: str) -> tuple[Dataset, Dataset]:
  """Reads a whole TFDS data set with `tfds.data_source` (array_record; no TensorFlow)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data_dir = str(pathlib.Path(data_config.path).expanduser()) if data_config.path else None
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  verbosity = absl_logging.get_verbosity()
  # tfds warns about every empty version folder it looks at; the ConfigError below says it.
  absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    builder = tfds.builder(tfds_name, data_dir=data_dir, file_format="array_record")
    prepared = builder.is_prepared()
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ConfigError("data.name", f"TFDS has no data set '{tfds_name}' (in data.path="
                      f"'{data_config.path}'): check the name (tfds:mnist, "
                      "tfds:fashion_mnist, ...) and data.path") from e
  finally:
    absl_logging.set_verbosity(verbosity)
  if not prepared:
    if not data_config.download:
      raise ConfigError("data.path", f"tfds:{tfds_name} is not prepared under "
                        f"{builder.data_dir}; set data.download=True (needs internet) or run "
                        f"`tfds build {tfds_name} --file_format=array_record` and point "
                        "data.path at its data_dir")
    _check_internet(tfds_name)
    try:
      builder.download_and_prepare(file_format="array_record")
    except OSError as e:  # the connection dropped mid-download (tfds's own errors pass)
      raise ConfigError("data.download", f"downloading tfds:{tfds_name} failed ({e}); give a "
                        "prepared data_dir in data.path and data.download=False") from e
  file_format = str(getattr(builder.info.file_format, "value", builder.info.file_format))
  if "array_record" not in file_format:
    raise ConfigError("data.path", f"tfds:{tfds_name} under {builder.data_dir} is stored as "
                      f"{file_format}, which needs TensorFlow to read; rebuild it with "
                      "--file_format=array_record")
  features = builder.info.features
  for key, value in (("data.feature_key", data_config.feature_key),
                     ("data.label_key", data_config.label_key)):
    if value not in features:
      raise ConfigError(key, f"tfds:{tfds_name} has no feature '{value}'; available: "
                        f"{', '.join(features.keys())}")
  label_feature = features[data_config.label_key]
  class_names = tuple(getattr(label_feature, "names", None) or ())

  def read(split):
    source = builder.as_data_source(split=split)
    xs, ys = [], []
    for start in range(0, len(source), _TFDS_READ_BATCH):
      batch = source.__getitems__(range(start, min(start + _TFDS_READ_BATCH, len(source))))
      xs.append(np.stack([np.asarray(e[data_config.feature_key]) for e in batch]))
      ys.append(np.asarray([e[data_config.label_key] for e in batch]))
    x = np.concatenate(xs)
    # Images are stored as uint8 pixels; everything else is taken as it is.
    x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    return x, np.concatenate(ys)

  splits = builder.info.splits
  if "train" not in splits:
    raise ConfigError("data.name", f"tfds:{tfds_name} has no 'train' split; splits: "
                      f"{', '.join(splits.keys())}")
  x, y = read("train")
  num_classes = getattr(label_feature, "num_classes", None)
  if "test" not in splits:
    y, guess, _ = _labels_to_codes(y, "data.label_key")
    return _split(x, y, num_classes or guess, {}, data_config.name, class_names, data_config)
  x_test, y_test = read("test")
  if num_classes is None:
    num_classes = int(max(y.max(), y_test.max())) + 1
  make = lambda x, y: Dataset(x=x, y=y.astype(np.int32), num_classes=num_classes, columns={},
                              name=data_config.name, class_names=class_names)
  return make(x, y), make(x_test, y_test)


# ----------------------------------------------------------------------------- synthetic


@dataclasses.dataclass(frozen=True, eq=False)
class ExpressionModel:
  """Gamma-Poisson (negative-binomial) single-cell counts with batch effects and cell types.

  For cell i of type t_i in batch b_i and gene g, with mean

    mu_ig = base_mean_g * exp(signal * marker[t_i, g] + batch_log_effect[b_i, g]),

  counts_ig ~ Poisson(lambda_ig), lambda_ig ~ Gamma(shape=1/phi, scale=mu_ig * phi), so
  counts_ig ~ NB with E = mu_ig and Var = mu_ig + phi * mu_ig^2 (phi = `dispersion`;
  phi = 0 is Poisson). log base_mean_g ~ N(-1, 1) (mean ~0.6 counts per gene, so ~1,200
  per cell at 2,000 genes, like 10x data); each cell type has max(1, G // (4 T)) marker genes;
  batch_log_effect ~ N(0, batch_effect^2) per batch and gene.

  Attributes:
    base_mean: [G] mean count of each gene without signal or batch effect.
    marker: [T, G] 1.0 where gene g is a marker of cell type t, else 0.0.
    batch_log_effect: [B, G] additive log-scale effect of each batch on each gene.
    signal: log-scale up-regulation of marker genes.
    dispersion: phi of the NB.
  """
  base_mean: np.ndarray
  marker: np.ndarray
  batch_log_effect: np.ndarray
  signal: float
  dispersion: float

  def mean(self, cell_type: np.ndarray, batch: np.ndarray) -> np.ndarray:
    """[n] cell types, [n] batches -> [n, G] float32 NB means mu."""
    log_mu = (np.log(self.base_mean).astype(np.float32)[None]
              + np.float32(self.signal) * self.marker[cell_type]
              + self.batch_log_effect[batch])
    return np.exp(log_mu, out=log_mu)

  def sample_counts(self, cell_type: np.ndarray, batch: np.ndarray,
                    rng: np.random.Generator) -> np.ndarray:
    """[n] cell types, [n] batches -> [n, G] int64 NB counts."""
    rate = self.mean(cell_type, batch)
    if self.dispersion > 0:
      shape = 1.0 / self.dispersion
      # Scalar-shape float32 gamma is ~2x faster than passing the [n, G] scale to numpy.
      rate *= rng.standard_gamma(shape, size=rate.shape, dtype=np.float32)
      rate *= np.float32(self.dispersion)
    return rng.poisson(rate)


def expression_model(synthetic_config) -> ExpressionModel:
  """The per-gene parameters of `data.synthetic`, drawn from default_rng([seed, 0])."""
  c = synthetic_config
  rng = np.random.default_rng([c.seed, 0])
  base_mean = np.exp(rng.normal(-1.0, 1.0, size=c.num_genes))
  num_markers = max(1, c.num_genes // (4 * c.num_cell_types))
  marker = np.zeros((c.num_cell_types, c.num_genes), np.float32)
  for t in range(c.num_cell_types):
    marker[t, rng.choice(c.num_genes, size=num_markers, replace=False)] = 1.0
  batch_log_effect = rng.normal(0.0, c.batch_effect, size=(c.num_batches, c.num_genes))
  return ExpressionModel(base_mean=base_mean, marker=marker,
                         batch_log_effect=batch_log_effect.astype(np.float32),
                         signal=float(c.signal), dispersion=float(c.dispersion))


def synthetic_cells(synthetic_config) -> tuple[np.ndarray, np.ndarray]:
  """([N] int32 cell types, [N] int32 batches), uniform and independent, default_rng([seed, 1])."""
  c = synthetic_config
  rng = np.random.default_rng([c.seed, 1])
  cell_type = rng.integers(0, c.num_cell_types, size=c.num_cells, dtype=np.int32)
  batch = rng.integers(0, c.num_batches, size=c.num_cells, dtype=np.int32)
  return cell_type, batch


def _chunk_counts(model: ExpressionModel, synthetic_config, cell_type, batch, chunk: int):
  """Counts of cells [chunk * C, (chunk + 1) * C): [<=C, G] int64, seeded by the chunk alone."""
  rows = slice(chunk * _SYNTHETIC_CHUNK_CELLS, (chunk + 1) * _SYNTHETIC_CHUNK_CELLS)
  rng = np.random.default_rng([synthetic_config.seed, 2, chunk])
  return model.sample_counts(cell_type[rows], batch[rows], rng)


def synthetic_counts(synthetic_config) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The raw counts behind `synthetic_expression` (small configs: returns [N, G] int64).

  Returns:
    (counts [N, G] int64, cell_type [N] int32, batch [N] int32), cells in generation order;
    `log_normalize(counts)` are the features `load_dataset` splits into train and test.
  """
  _check_synthetic(synthetic_config)
  model = expression_model(synthetic_config)
  cell_type, batch = synthetic_cells(synthetic_config)
  num_chunks = -(-synthetic_config.num_cells // _SYNTHETIC_CHUNK_CELLS)
  counts = [_chunk_counts(model, synthetic_config, cell_type, batch, k)
            for k in range(num_chunks)]
  return np.concatenate(counts), cell_type, batch


def log_normalize(counts: np.ndarray, dtype=np.float32) -> np.ndarray:
  """[n, G] counts -> [n, G] log1p(counts / library size * 1e4), the usual scRNA-seq transform."""
  library = np.maximum(counts.sum(axis=1, keepdims=True), 1).astype(np.float32)
  x = counts.astype(np.float32)
  x *= np.float32(1e4) / library
  return np.log1p(x, out=x).astype(dtype, copy=False)


def _check_synthetic(c) -> None:
  for key in ("num_cells", "num_genes", "num_cell_types", "num_batches"):
    if int(c[key]) != c[key] or c[key] < 1:
      raise ConfigError(f"data.synthetic.{key}", f"must be a positive integer, got {c[key]}")
  if c.num_cells < 2:
    raise ConfigError("data.synthetic.num_cells", f"must be >= 2 (train and test), got "
                      f"{c.num_cells}")
  for key in ("batch_effect", "dispersion", "signal"):
    if c[key] < 0:
      raise ConfigError(f"data.synthetic.{key}", f"must be >= 0, got {c[key]}")
  if c.dtype not in SYNTHETIC_DTYPES:
    raise ConfigError("data.synthetic.dtype", f"unknown '{c.dtype}'; allowed: "
                      f"{', '.join(SYNTHETIC_DTYPES)}")


def _load_synthetic(data_config) -> tuple[Dataset, Dataset]:
  c = data_config.synthetic
  _check_synthetic(c)
  model = expression_model(c)
  cell_type, batch = synthetic_cells(c)
  train_idx, test_idx = stratified_split(cell_type, data_config.test_fraction,
                                         data_config.split_seed)
  # Train rows first, then test: both splits are views of ONE array, so a 1e6 x 2000 data set
  # is never copied. Chunks are generated in cell order and scattered to their split rows.
  position = np.empty(c.num_cells, np.int64)
  position[np.concatenate([train_idx, test_idx])] = np.arange(c.num_cells)
  x = np.empty((c.num_cells, c.num_genes), np.dtype(c.dtype))

  def fill(chunk):
    counts = _chunk_counts(model, c, cell_type, batch, chunk)
    rows = np.arange(chunk * _SYNTHETIC_CHUNK_CELLS,
                     chunk * _SYNTHETIC_CHUNK_CELLS + len(counts))
    x[position[rows]] = log_normalize(counts, x.dtype)

  num_chunks = -(-c.num_cells // _SYNTHETIC_CHUNK_CELLS)
  # NumPy's samplers release the GIL, so threads scale; chunk seeds make it thread-count-free.
  with concurrent.futures.ThreadPoolExecutor(min(os.cpu_count() or 1, 8)) as pool:
    list(pool.map(fill, range(num_chunks)))
  n_train = len(train_idx)
  names = tuple(f"type_{t}" for t in range(c.num_cell_types))
  make = lambda rows, idx: Dataset(
      x=x[rows], y=cell_type[idx], num_classes=int(c.num_cell_types),
      columns={"batch": batch[idx]}, name="synthetic_expression", class_names=names)
  return make(slice(0, n_train), train_idx), make(slice(n_train, None), test_idx)


_SOURCES: dict[str, Callable[[Any], tuple[Dataset, Dataset]]] = {
    "digits": _load_digits,
    "pbmc68k": _load_pbmc68k,
    "synthetic_expression": _load_synthetic,
    "file": _load_file,
}
# GSE7390 breast-cancer prognosis (data/gse7390.py): registered here, loaded there.
from fedjax_lab.data import gse7390 as _gse7390  # pylint: disable=g-import-not-at-top,wrong-import-position
_SOURCES["gse7390"] = _gse7390.load
from fedjax_lab.data import synthetic_regression as _synthetic_regression  # pylint: disable=g-import-not-at-top,wrong-import-position
_SOURCES["synthetic_regression"] = _synthetic_regression.load
# CIFAR-100 Pachinko / EMNIST-62 benchmarks, prepared once from TFDS (data/tfds_federated.py).
from fedjax_lab.data import tfds_federated as _tfds_federated  # pylint: disable=g-import-not-at-top,wrong-import-position
for _name in _tfds_federated.NAMES:
  _SOURCES[_name] = lambda data_config, _name=_name: _tfds_federated.load(_name, data_config)
