"""The public calibration set of the curvature optimizers (`optim.public_data`).

Under example-level DP a Hessian-vector product of a private minibatch's loss is a release that
DP-SGD's clipping and noise never touch. With `optim.public_data` set, the curvature optimizers
(esgd, adahessian, sophia) estimate their preconditioner on a minibatch of `optim.public_batch_size`
PUBLIC examples instead (client.py), while their gradient step still takes the privatized
gradient. The examples live once on device in `FederatedData.public_x / public_y`.

`optim.public_data` is one of:

  holdout:F                  a stratified fraction F in (0, 1) of the training split (drawn with
                             `data.split_seed`), REMOVED from the sites before partitioning, so
                             it is disjoint from both the private training data and the test split.
  PATH.npz / .csv / .h5ad    every row of a user file, read as for `data.name=file`: npz arrays
                             x, y (and x_test, y_test if present); csv / h5ad label column
                             `data.label_column` (default "label").
  digits | pbmc68k | synthetic_expression | tfds:<name>
                             every example (train and test splits) of another source, with its
                             default `data.*` settings. Not `data.name` itself: those examples are
                             the private training data and the test split.

The examples must have the training data's feature shape, and labels in its label space (mapped
by name when both name their classes, else taken as class ids); anything else is a ConfigError
naming `optim.public_data`. "Public" is the user's statement: the lab cannot check that a file
or another source shares no examples with the private data, and no epsilon covers them.
"""

import dataclasses
import pathlib
from typing import Optional

import numpy as np

from fedjax_lab.data import sources
from fedjax_lab.data.sources import Dataset
from fedjax_lab.errors import ConfigError

KEY = "optim.public_data"
HOLDOUT = "holdout:"
FORMS = ("holdout:F with F in (0, 1)", "a path to a .npz/.csv/.h5ad file",
         "a source: digits, pbmc68k, synthetic_expression, tfds:<name>")


def parse(spec: Optional[str], data_config) -> Optional[tuple[str, object]]:
  """Checks the spec without reading any file: None (unset) or (kind, value).

  kind is "holdout" (value: the fraction), "file" (value: the path) or "source" (value: the
  source name). Raises ConfigError naming `optim.public_data`.
  """
  if not spec:
    return None
  allowed = "; ".join(FORMS)
  if spec.startswith(HOLDOUT):
    try:
      fraction = float(spec[len(HOLDOUT):])
    except ValueError:
      fraction = float("nan")
    if not 0 < fraction < 1:
      raise ConfigError(KEY, f"'{spec}': the holdout fraction must be a number in (0, 1), "
                        "e.g. holdout:0.2")
    return "holdout", fraction
  if pathlib.Path(spec).suffix.lower() in sources.FILE_EXTENSIONS:
    path = pathlib.Path(spec).expanduser()
    if data_config.name == "file" and data_config.path and (
        path.resolve() == pathlib.Path(data_config.path).expanduser().resolve()):
      raise ConfigError(KEY, f"'{spec}' is data.path, the private training data; give a file "
                        "of public examples, or holdout:F to hold part of it out as public")
    return "file", path
  if spec == data_config.name:
    raise ConfigError(KEY, f"'{spec}' is data.name, whose examples are the private training "
                      "data and the test split; use holdout:F to hold part of its training "
                      "split out as public, or another source or file")
  named = spec in sources.NAMES and spec not in ("file", "tfds:<name>")
  if named or (spec.startswith("tfds:") and len(spec) > len("tfds:")):
    return "source", spec
  raise ConfigError(KEY, f"unknown '{spec}'; allowed: {allowed}")


def load(spec: Optional[str], data_config, train: Dataset) -> tuple[Dataset, Optional[Dataset]]:
  """Returns (training examples left for the sites, public calibration set or None).

  Args:
    spec: `optim.public_data` (None or "" = no public set; `train` comes back unchanged).
    data_config: the run's `data` sub-config.
    train: the training split of `data.name`.

  Raises:
    ConfigError naming `optim.public_data`: bad spec, missing or unreadable file, feature
    shape or label space unlike the training data's, no examples.
  """
  parsed = parse(spec, data_config)
  if parsed is None:
    return train, None
  kind, value = parsed
  if kind == "holdout":
    keep, held = sources.stratified_split(train.y, value, data_config.split_seed)
    if len(held) == 0 or len(keep) == 0:
      raise ConfigError(KEY, f"'{spec}' holds out {len(held)} of {len(train.y)} training "
                        "examples; choose a fraction that leaves some on each side")
    return train.subset(keep), train.subset(held)
  if kind == "file":
    if not value.is_file():
      raise ConfigError(KEY, f"file not found: {value}; give an existing "
                        f"{'/'.join(sources.FILE_EXTENSIONS)} file of public examples")
    source_config = data_config.copy_and_resolve_references()
    source_config.name, source_config.path = "file", str(value)
  else:
    source_config = sources.default_data_config()
    source_config.name = value
  try:
    public = _concatenate(*sources.load_dataset(source_config))
  except ConfigError as e:  # Re-keyed: the problem is in the public set, not in data.*.
    raise ConfigError(KEY, f"'{spec}': {e.problem}") from e
  if public.x.shape[1:] != train.x.shape[1:]:
    raise ConfigError(KEY, f"'{spec}' has examples of shape {public.x.shape[1:]}, the training "
                      f"data {train.x.shape[1:]}; the public set needs the same features")
  if len(public) == 0:
    raise ConfigError(KEY, f"'{spec}' has no examples")
  return train, dataclasses.replace(public, y=_align_labels(public, train, spec),
                                    num_classes=train.num_classes,
                                    class_names=train.class_names)


def _concatenate(a: Dataset, b: Dataset) -> Dataset:
  return Dataset(x=np.concatenate([a.x, b.x]), y=np.concatenate([a.y, b.y]),
                 num_classes=a.num_classes, columns={}, name=a.name, class_names=a.class_names)


def _align_labels(public: Dataset, train: Dataset, spec: str) -> np.ndarray:
  """[P] public labels as codes of the TRAINING label space."""
  present = np.unique(public.y)
  if public.class_names and train.class_names:
    index = {name: code for code, name in enumerate(train.class_names)}
    unknown = [public.class_names[c] for c in present if public.class_names[c] not in index]
    if unknown:
      raise ConfigError(KEY, f"'{spec}' has classes {', '.join(unknown[:5])} that the training "
                        f"data does not ({', '.join(train.class_names[:10])}); the public set "
                        "needs the training label space")
    lookup = np.array([index.get(name, -1) for name in public.class_names], np.int32)
    return lookup[public.y]
  if len(present) and present.max() >= train.num_classes:
    raise ConfigError(KEY, f"'{spec}' has label {int(present.max())}, the training data only "
                      f"classes 0..{train.num_classes - 1}; the public set needs the training "
                      "label space")
  return public.y.astype(np.int32)
