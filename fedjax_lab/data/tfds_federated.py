"""The standard federated benchmarks, built once from TFDS and cached as arrays.

- `cifar100_pachinko`: tfds `cifar100` (50,000 train / 10,000 test, 32x32x3) split by the
  Pachinko allocation of Reddi et al. 2021 (data/pachinko.py): data.num_sites training sites
  (500) of 50,000 / num_sites examples, Dirichlet alpha = data.alpha (0.1) over coarse labels,
  beta = PACHINKO_BETA (10) over the fine labels of a coarse label; the test split likewise
  into TEST_SITES (100) sites of 100 (column "site" of the test Dataset; evaluation uses all
  of them together, as the paper's centralised test accuracy does). y is the fine label.
- `emnist62`: tfds `emnist/byclass` (697,932 train / 116,323 test, 28x28x1, 62 classes:
  digits, upper- and lower-case letters) split over data.num_sites sites (3,400, TFF's
  count) by the lab's Dirichlet label skew (data/partition.py `dirichlet`, alpha =
  data.alpha). TFDS has no writer ids, so TFF's natural by-writer split cannot be rebuilt
  from it; the test split is not split over sites.

The split is made ONCE: the images (uint8), labels and the "site" column are written to
`<dir>/fedjax_lab_federated/<name>-<key>.npz` (dir = data.path, else $TFDS_DATA_DIR, else
~/tensorflow_datasets; key = the split's parameters and SPLIT_VERSION), and every later
run reads that file only: rounds never touch TFDS. Configs set data.partition = "by_column"
on "site", so the partitioner takes the cached sites as they are.

data.mock=True runs the same builder on `tfds.testing.mock_data` (MockPolicy.USE_CODE:
random images and independent random labels with the real features, no download, no
TensorFlow) with MOCK_EXAMPLES examples per split, cached under a name ending in "-mock" so
it never mixes with real data. Mock data test the pipeline and the split's statistics; what
a model learns on them means nothing.
"""

import contextlib
import hashlib
import json
import logging
import os
import pathlib

import ml_collections
import numpy as np

from fedjax_lab.data import pachinko
from fedjax_lab.data.dataset import Dataset
from fedjax_lab.errors import ConfigError
from fedjax_lab.data import partition

log = logging.getLogger("fedjax_lab")

NAMES = ("cifar100_pachinko", "emnist62")
# Bump when the split's algorithm changes: old cache files then stop matching.
SPLIT_VERSION = 1
PACHINKO_BETA = 10.0
TEST_SITES = 100
CACHE_SUBDIR = "fedjax_lab_federated"
# Examples per split under data.mock: CIFAR-100's real sizes (the Pachinko split uses every
# training example); EMNIST's ~20 a site at 3,400 sites (the real split has ~205).
MOCK_EXAMPLES = {
    "cifar100_pachinko": {"train": 50_000, "test": 10_000},
    "emnist62": {"train": 68_000, "test": 10_000},
}
_TFDS = {"cifar100_pachinko": "cifar100", "emnist62": "emnist/byclass"}
_READ_BATCH = 4096


def data_dir(data_config) -> pathlib.Path:
  """Where the prepared arrays (and, online, TFDS's files) live."""
  if data_config.path:
    return pathlib.Path(data_config.path).expanduser()
  return pathlib.Path(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")).expanduser()


def split_params(name: str, data_config) -> dict:
  """Everything the cached split depends on (its cache key)."""
  params = {"name": name, "version": SPLIT_VERSION, "mock": bool(data_config.mock),
            "num_sites": int(data_config.num_sites), "alpha": float(data_config.alpha),
            "seed": int(data_config.split_seed)}
  if name == "cifar100_pachinko":
    params.update(beta=PACHINKO_BETA, test_sites=TEST_SITES)
  return params


def cache_path(name: str, data_config) -> pathlib.Path:
  params = split_params(name, data_config)
  key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
  return data_dir(data_config) / CACHE_SUBDIR / f"{name}-{key}{'-mock' if params['mock'] else ''}.npz"


def prepare(name: str, data_config) -> dict:
  """The benchmark's arrays: read from the cache, or built from TFDS and cached first.

  Returns:
    dict of x [N, H, W, C] uint8, y [N], site [N], x_test, y_test, site_test (cifar100 only).
  """
  path = cache_path(name, data_config)
  if path.is_file():
    with np.load(path, allow_pickle=False) as npz:
      arrays = dict(npz)
    if json.loads(str(arrays.pop("params"))) != split_params(name, data_config):
      raise ConfigError("data.path", f"{path} was written for other split parameters; "
                        "delete it to rebuild")
    return arrays
  log.info("%s: building the federated split (once) into %s", name, path)
  arrays = _BUILDERS[name](data_config)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
  # np.savez, not savez_compressed: the cache is read every run, written once.
  np.savez(tmp, params=np.array(json.dumps(split_params(name, data_config))), **arrays)
  os.replace(tmp, path)  # a crashed build leaves no half-written cache behind
  return arrays


def load(name: str, data_config):
  """(train, test) `Dataset`s of a benchmark, images scaled to [0, 1] float32."""
  a = prepare(name, data_config)
  num_classes = 100 if name == "cifar100_pachinko" else 62
  scale = lambda x: x.astype(np.float32) / np.float32(255.0)
  train = Dataset(x=scale(a["x"]), y=a["y"].astype(np.int32), num_classes=num_classes,
                  columns={"site": a["site"]}, name=name)
  test_columns = {"site": a["site_test"]} if "site_test" in a else {}
  test = Dataset(x=scale(a["x_test"]), y=a["y_test"].astype(np.int32),
                 num_classes=num_classes, columns=test_columns, name=name)
  return train, test


def _read(name: str, split: str, keys: tuple[str, ...], data_config) -> dict:
  """{key: [N, ...] array} of one TFDS split, through `tfds.data_source` (no TensorFlow)."""
  import tensorflow_datasets as tfds  # optional: heavy (TensorFlow); only TFDS sources use it
  mock = bool(data_config.mock)
  context = (tfds.testing.mock_data(num_examples=MOCK_EXAMPLES[name][split],
                                    policy=tfds.testing.MockPolicy.USE_CODE)
             if mock else contextlib.nullcontext())
  with context:
    builder = tfds.builder(_TFDS[name], data_dir=str(data_dir(data_config)),
                           file_format="array_record")
    if not mock and not builder.is_prepared():
      if not data_config.download:
        raise ConfigError("data.download", f"tfds {_TFDS[name]} is not prepared under "
                          f"{builder.data_dir}; set data.download=True (needs internet), or "
                          "data.mock=True for a pipeline test on random data")
      try:
        builder.download_and_prepare(file_format="array_record")
      except OSError as e:
        raise ConfigError("data.download", f"downloading tfds {_TFDS[name]} failed ({e}); "
                          "prepare it online and point data.path at its data_dir") from e
    source = builder.as_data_source(split=split)
    columns = {k: [] for k in keys}
    for start in range(0, len(source), _READ_BATCH):
      rows = range(start, min(start + _READ_BATCH, len(source)))
      # tfds 4.9's mock source breaks __getitems__ (unbound method): one record at a time.
      batch = [source[i] for i in rows] if mock else source.__getitems__(rows)
      for k in keys:
        columns[k].append(np.stack([np.asarray(e[k]) for e in batch]))
  return {k: np.concatenate(v) for k, v in columns.items()}


def _build_cifar100_pachinko(data_config) -> dict:
  rng = np.random.default_rng([int(data_config.split_seed), 29])
  out = {}
  for split, suffix, num_sites in (("train", "", int(data_config.num_sites)),
                                   ("test", "_test", TEST_SITES)):
    d = _read("cifar100_pachinko", split, ("image", "label", "coarse_label"), data_config)
    per_site = len(d["label"]) // num_sites
    site = pachinko.split(d["coarse_label"], d["label"], num_sites, per_site,
                          float(data_config.alpha), PACHINKO_BETA, rng)
    keep = site >= 0  # N % num_sites examples no site holds
    out.update({f"x{suffix}": d["image"][keep], f"y{suffix}": d["label"][keep].astype(np.int16),
                f"coarse{suffix}": d["coarse_label"][keep].astype(np.int16),
                f"site{suffix}": site[keep]})
  return out


def _build_emnist62(data_config) -> dict:
  train = _read("emnist62", "train", ("image", "label"), data_config)
  test = _read("emnist62", "test", ("image", "label"), data_config)
  labels = Dataset(x=np.zeros((len(train["label"]), 0), np.float32),
                   y=train["label"].astype(np.int32), num_classes=62, columns={},
                   name="emnist62")
  split_config = ml_collections.ConfigDict(dict(
      partition="dirichlet", num_sites=int(data_config.num_sites),
      alpha=float(data_config.alpha), min_examples=1, column="", classes_per_site=1,
      quantity_sigma=0.0))
  sites = partition.partition(labels, split_config, int(data_config.split_seed))
  site = np.empty(len(labels), np.int32)
  for s, rows in enumerate(sites):
    site[rows] = s
  return {"x": train["image"], "y": train["label"].astype(np.int16), "site": site,
          "x_test": test["image"], "y_test": test["label"].astype(np.int16)}


_BUILDERS = {"cifar100_pachinko": _build_cifar100_pachinko, "emnist62": _build_emnist62}
