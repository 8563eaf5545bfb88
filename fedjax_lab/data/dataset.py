"""The host-side data set every source returns, and the stratified split of one pool.

Lives apart from `sources.py` (the registry of sources) so that each source module can build
`Dataset`s without importing the registry that imports it.
"""

import dataclasses
from typing import Mapping

import numpy as np


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


def split_pool(x, y, num_classes, columns, name, class_names, data_config):
  """Stratified (train, test) Datasets from one pool of examples."""
  train_idx, test_idx = stratified_split(y, data_config.test_fraction, data_config.split_seed)
  pool = Dataset(x=x, y=y, num_classes=num_classes, columns=columns, name=name,
                 class_names=class_names)
  return pool.subset(train_idx), pool.subset(test_idx)
