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

import pathlib

import ml_collections
import numpy as np

from fedjax_lab.data import files, gse7390, synthetic_expression, synthetic_regression
from fedjax_lab.data import tfds_federated, tfds_source
# Re-exported: the public names of this module before it was split by source.
from fedjax_lab.data.dataset import Dataset, split_pool, stratified_split  # noqa: F401
from fedjax_lab.data.files import FILE_EXTENSIONS  # noqa: F401
from fedjax_lab.data.synthetic_expression import (  # noqa: F401
    SYNTHETIC_DTYPES, ExpressionModel, expression_model, log_normalize, synthetic_cells,
    synthetic_counts)
from fedjax_lab.errors import ConfigError

NAMES = ("digits", "pbmc68k", "synthetic_expression", "gse7390", "synthetic_regression",
         "tfds:<name>", "file", "cifar100_pachinko", "emnist62")
REGRESSION_SOURCES = ("synthetic_regression",)


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
  c.partition = "iid"           # iid | dirichlet | shards | by_column | quantity_skew | pool
  c.examples_per_site = 15      # pool: each site's window of the shared pool (partition.py)
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
    train, test = tfds_source.load(data_config, name[len("tfds:"):])
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



def _load_digits(data_config) -> tuple[Dataset, Dataset]:
  del data_config  # The split is a fixed contract.
  from sklearn import datasets  # optional: sklearn takes seconds to import; only digits needs it
  digits = datasets.load_digits()
  x = (digits.images / 16.0).reshape(len(digits.images), -1).astype(np.float32)
  y = digits.target.astype(np.int32)
  order = np.random.RandomState(0).permutation(len(x))
  x, y = x[order], y[order]
  names = tuple(str(c) for c in range(10))
  make = lambda s: Dataset(x=x[s], y=y[s], num_classes=10, columns={}, name="digits",
                           class_names=names)
  return make(slice(0, 1500)), make(slice(1500, None))


_SOURCES = {
    "digits": _load_digits,
    "pbmc68k": files.load_pbmc68k,
    "synthetic_expression": synthetic_expression.load,
    "file": files.load_file,
    "gse7390": gse7390.load,
    "synthetic_regression": synthetic_regression.load,
}
# CIFAR-100 Pachinko / EMNIST-62 benchmarks, prepared once from TFDS (data/tfds_federated.py).
for _name in tfds_federated.NAMES:
  _SOURCES[_name] = lambda data_config, _name=_name: tfds_federated.load(_name, data_config)
