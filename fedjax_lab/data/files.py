"""User files (`data.name=file`: .npz, .csv, .h5ad) and the bundled pbmc68k AnnData file."""

import importlib.util
import logging
import pathlib
import warnings

import numpy as np

from fedjax_lab.data.dataset import Dataset, split_pool
from fedjax_lab.data.labels import categorical_codes, is_categorical, label_from_frame
from fedjax_lab.data.labels import labels_to_codes
from fedjax_lab.errors import ConfigError

log = logging.getLogger("fedjax_lab")

FILE_EXTENSIONS = (".npz", ".csv", ".h5ad")
_BUNDLED_DIR = pathlib.Path(__file__).resolve().parent / "bundled"
_PBMC_FILENAME = "10x_pbmc68k_reduced.h5ad"
_PBMC_LABEL_COLUMN = "bulk_labels"
_DEFAULT_LABEL_COLUMN = "label"


def _split_column(data_config) -> str | None:
  """The column by_column partitions on: taken as site metadata even when it is numeric
  (a hospital or donor id), and so never a feature."""
  return data_config.column if data_config.partition == "by_column" else None



# ----------------------------------------------------------------------------- AnnData


def _read_h5ad(path: pathlib.Path):
  import anndata  # optional: slow to import (pandas, h5py); only .h5ad files need it
  with warnings.catch_warnings():
    # Files from old anndata versions (like scanpy's pbmc68k) warn about their layout on
    # every read; they read correctly, and the user cannot act on the warning.
    warnings.simplefilter("ignore", FutureWarning)
    warnings.simplefilter("ignore", anndata.OldFormatWarning)
    return anndata.read_h5ad(path)


def _from_anndata(path: pathlib.Path, label_column: str, name: str, data_config):
  """(train, test) from .h5ad: X -> x, obs[label_column] -> y, obs categoricals -> columns."""
  adata = _read_h5ad(path)
  y, num_classes, class_names = label_from_frame(adata.obs, label_column, f"obs of {path}")
  x = adata.X
  if hasattr(x, "toarray"):  # scipy.sparse
    x = x.toarray()
  x = np.asarray(x, dtype=np.float32)
  columns = {}
  for key in adata.obs.columns:
    if key != label_column and (is_categorical(adata.obs[key])
                                or key == _split_column(data_config)):
      columns[str(key)] = categorical_codes(adata.obs[key])[0]
  return split_pool(x, y, num_classes, columns, name, class_names, data_config)


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


def load_pbmc68k(data_config) -> tuple[Dataset, Dataset]:
  label_column = data_config.label_column or _PBMC_LABEL_COLUMN
  return _from_anndata(_pbmc68k_path(data_config), label_column, "pbmc68k", data_config)


# ----------------------------------------------------------------------------- user files


def load_file(data_config) -> tuple[Dataset, Dataset]:
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
  y_all, num_classes, class_names = labels_to_codes(y_all, "data.path")
  if "class_names" in arrays:
    class_names = tuple(str(c) for c in arrays["class_names"])
    num_classes = max(num_classes, len(class_names))
  x = arrays["x"].astype(np.float32)
  columns = {k: v for k, v in arrays.items()
             if k not in ("x", "y", "x_test", "y_test", "class_names")
             and v.ndim == 1 and len(v) == n_train}
  if not has_test:
    return split_pool(x, y_all, num_classes, columns, "file", class_names, data_config)
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
  import pandas as pd  # optional: slow to import; only CSV files need it
  try:
    frame = pd.read_csv(path)
  except pd.errors.EmptyDataError:
    raise ConfigError("data.path", f"{path} is empty; give a CSV with a header row, feature "
                      "columns and a label column") from None
  y, num_classes, class_names = label_from_frame(frame, label_column, str(path))
  features, columns = [], {}
  for key in frame.columns:
    if key == label_column:
      continue
    if key != _split_column(data_config):
      _check_numeric_cells(frame[key], path)
    if is_categorical(frame[key]) or key == _split_column(data_config):
      columns[str(key)] = categorical_codes(frame[key])[0]
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
  return split_pool(x, y, num_classes, columns, "file", class_names, data_config)


def _row(i: int) -> str:
  """Where the 0-based data row i is in a CSV file with one header line."""
  return f"row {i + 1} (line {i + 2} of the file)"


def _check_numeric_cells(series, path) -> None:
  """A column whose cells are mostly numbers is a feature column: a cell that is not one
  (a typo such as 'oops') is an error, not a reason to drop the whole column from the
  features as a site column. Columns of names (hospital, donor) stay site columns."""
  import pandas as pd  # optional: slow to import; only CSV files need it
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
