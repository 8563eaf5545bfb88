"""TFDS data sets (`data.name=tfds:<name>`), read through `tfds.data_source` (array_record,
no TensorFlow)."""

import pathlib
import socket

from absl import logging as absl_logging
import numpy as np

from fedjax_lab.data.dataset import Dataset, split_pool
from fedjax_lab.data.labels import labels_to_codes
from fedjax_lab.errors import ConfigError

_TFDS_READ_BATCH = 4096


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


def load(data_config, tfds_name: str) -> tuple[Dataset, Dataset]:
  """Reads a whole TFDS data set with `tfds.data_source` (array_record; no TensorFlow)."""
  import tensorflow_datasets as tfds  # optional: heavy (TensorFlow); only TFDS sources use it
  data_dir = str(pathlib.Path(data_config.path).expanduser()) if data_config.path else None
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
    y, guess, _ = labels_to_codes(y, "data.label_key")
    return split_pool(x, y, num_classes or guess, {}, data_config.name, class_names, data_config)
  x_test, y_test = read("test")
  if num_classes is None:
    num_classes = int(max(y.max(), y_test.max())) + 1
  make = lambda x, y: Dataset(x=x, y=y.astype(np.int32), num_classes=num_classes, columns={},
                              name=data_config.name, class_names=class_names)
  return make(x, y), make(x_test, y_test)
