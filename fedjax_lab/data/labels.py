"""Labels and metadata columns of a table: codes, class names, which columns are names."""

import numpy as np

from fedjax_lab.errors import ConfigError


def labels_to_codes(values: np.ndarray, key: str) -> tuple[np.ndarray, int, tuple[str, ...]]:
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


def categorical_codes(series) -> tuple[np.ndarray, tuple[str, ...]]:
  """A pandas Series (categorical / object / bool) -> ([N] int32 codes, names); -1 = missing."""
  import pandas as pd  # optional: slow to import; only table sources pass Series
  cat = series.astype("category") if not isinstance(series.dtype, pd.CategoricalDtype) else series
  cat = cat.cat.remove_unused_categories()
  return cat.cat.codes.to_numpy().astype(np.int32), tuple(str(c) for c in cat.cat.categories)


def _split_column(data_config) -> str | None:
  """The column by_column partitions on: taken as site metadata even when it is numeric
  (a hospital or donor id), and so never a feature."""
  return data_config.column if data_config.partition == "by_column" else None


def is_categorical(series) -> bool:
  import pandas as pd  # optional: slow to import; only table sources pass Series
  return (isinstance(series.dtype, pd.CategoricalDtype) or pd.api.types.is_object_dtype(series)
          or pd.api.types.is_string_dtype(series) or pd.api.types.is_bool_dtype(series))


def label_from_frame(frame, label_column: str, what: str):
  """Picks the label column of a DataFrame -> ([N] int32, num_classes, class_names)."""
  if label_column not in frame.columns:
    raise ConfigError("data.label_column",
                      f"'{label_column}' is not a column of {what}; available: "
                      f"{', '.join(map(str, frame.columns))}")
  series = frame[label_column]
  if series.isna().any():
    raise ConfigError("data.label_column", f"'{label_column}' of {what} has "
                      f"{int(series.isna().sum())} missing values; drop or fill those rows")
  if is_categorical(series):
    codes, names = categorical_codes(series)
    return codes, len(names), names
  return labels_to_codes(series.to_numpy(), "data.label_column")
