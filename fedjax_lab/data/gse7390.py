"""GSE7390 breast-cancer prognosis (Desmedt et al. 2007, Clin Cancer Res 13:3207).

198 node-negative, untreated breast tumours (TRANSBIG validation series): age, tumour size,
grade, ER status, the expression (Affymetrix HG-U133A, log2) of the 76 genes of the Wang et al.
(2005) signature, and the time to distant metastasis `t.tdm` (days) with its event `e.tdm`.

Task (`data.name=gse7390`): distant metastasis within 5 years (HORIZON_DAYS = 1826.25).
  label 1: e.tdm = 1 and t.tdm <= 5 years (metastasis seen within 5 years)
  label 0: t.tdm > 5 years (free of distant metastasis for 5 years, whatever came later)
  excluded: e.tdm = 0 and t.tdm <= 5 years (censored before 5 years: the 5-year status is
            unknown). The loader logs how many, once.
Features (81, float32): age, size, grade (1 well, 2 intermediate, 3 poorly differentiated;
the 'unkown' grade becomes 2 with grade_unknown = 1), grade_unknown, er (1 positive), then the
76 genes in file order. Columns (for data.partition=by_column): `er` and `grade` (0 well,
1 intermediate, 2 poorly, 3 unknown). Split: stratified on the label, data.test_fraction and
data.split_seed. Features are on their own scales: data.standardize=auto standardises them
with the training examples' mean/std without DP (data/standardize.py).

Where the file comes from (nothing is bundled here):
- `data.path`: an `.arff` or `.csv` with the columns above (age, size, grade, er, t.tdm,
  e.tdm, the gene columns; grade as the words above or 1/2/3, er as negative/positive or 0/1);
- otherwise the copy that scikit-survival ships as
  `sksurv/datasets/data/breast_cancer_GSE7390-metastasis.arff` (from GEO GSE7390), found
  through importlib WITHOUT importing sksurv and read with scipy.io.arff. scikit-survival is
  GPL-3; the lab uses none of its code, only reads that data file at run time.
Neither present: ConfigError naming data.path (one line, exit 2).
"""

import importlib.util
import logging
import pathlib

import numpy as np

from fedjax_lab.errors import ConfigError

log = logging.getLogger("fedjax_lab")

NAME = "gse7390"
ARFF_NAME = "breast_cancer_GSE7390-metastasis.arff"
HORIZON_DAYS = 5 * 365.25
CLINICAL = ("age", "size", "grade", "er")
FEATURES_CLINICAL = ("age", "size", "grade", "grade_unknown", "er")
CLASS_NAMES = ("no distant metastasis within 5 years", "distant metastasis within 5 years")
_GRADES = {"well differentiated": 1, "intermediate": 2, "poorly differentiated": 3,
           "unkown": 0, "unknown": 0, "1": 1, "2": 2, "3": 3, "1.0": 1, "2.0": 2, "3.0": 3}
_ER = {"negative": 0, "positive": 1, "0": 0, "1": 1, "0.0": 0, "1.0": 1}


def installed_arff() -> pathlib.Path | None:
  """scikit-survival's bundled copy, located without importing the package (or None)."""
  spec = importlib.util.find_spec("sksurv")
  if spec is None or not spec.submodule_search_locations:
    return None
  path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / ARFF_NAME
  return path if path.is_file() else None


def resolve_path(data_config) -> pathlib.Path:
  if data_config.path:
    path = pathlib.Path(data_config.path).expanduser()
    if path.suffix.lower() not in (".arff", ".csv"):
      raise ConfigError("data.path", f"gse7390 reads an .arff or .csv file, got '{path.suffix}' "
                        f"({path})")
    if not path.is_file():
      raise ConfigError("data.path", f"file not found: {path}; set data.path to the GSE7390 "
                        f".arff/.csv, or leave it empty to read scikit-survival's {ARFF_NAME}")
    return path
  path = installed_arff()
  if path is None:
    raise ConfigError("data.path", f"gse7390: data.path is empty and scikit-survival (which "
                      f"ships {ARFF_NAME}) is not installed; pip install scikit-survival==0.28.0 "
                      "or set data.path to an .arff/.csv with age, size, grade, er, t.tdm, "
                      "e.tdm and the gene columns")
  return path


def read_table(path: pathlib.Path) -> dict[str, np.ndarray]:
  """{column: [N] array} of an .arff (scipy.io.arff) or .csv (pandas); strings decoded."""
  if path.suffix.lower() == ".arff":
    from scipy.io import arff  # pylint: disable=g-import-not-at-top
    try:
      records, _ = arff.loadarff(str(path))
    except Exception as e:  # scipy raises several types for a malformed file
      raise ConfigError("data.path", f"cannot read {path} as ARFF: {e}") from None
    table = {}
    for name in records.dtype.names:
      col = records[name]
      table[name] = (np.array([v.decode() for v in col]) if col.dtype.kind in "SO"
                     else np.asarray(col, np.float64))
    return table
  import pandas as pd  # pylint: disable=g-import-not-at-top
  frame = pd.read_csv(path)
  return {c: (frame[c].to_numpy(np.float64) if frame[c].dtype.kind in "fiu"
              else frame[c].astype(str).to_numpy()) for c in frame.columns}


def _codes(values: np.ndarray, mapping: dict, column: str, path) -> np.ndarray:
  keys = np.array([str(v).strip().lower() for v in values])
  bad = sorted(set(keys) - set(mapping))
  if bad:
    raise ConfigError("data.path", f"{path}: column '{column}' has values {bad[:3]}; "
                      f"allowed: {', '.join(sorted(mapping))}")
  return np.array([mapping[k] for k in keys], np.int64)


def prognosis_labels(time: np.ndarray, event: np.ndarray,
                     horizon: float = HORIZON_DAYS) -> tuple[np.ndarray, np.ndarray]:
  """(label [N] int32, keep [N] bool): the 5-year rule of the module docstring."""
  time, event = np.asarray(time, np.float64), np.asarray(event).astype(np.int64)
  positive = (event == 1) & (time <= horizon)
  negative = time > horizon
  return positive.astype(np.int32), positive | negative


def load_arrays(path: pathlib.Path):
  """(x [M, 81], y [M], columns {er, grade}, feature names, note) for the kept tumours."""
  table = read_table(path)
  missing = [c for c in (*CLINICAL, "t.tdm", "e.tdm") if c not in table]
  if missing:
    raise ConfigError("data.path", f"{path} lacks column(s) {', '.join(missing)}; GSE7390 "
                      "needs age, size, grade, er, t.tdm, e.tdm and gene columns")
  genes = [c for c in table if c not in (*CLINICAL, "t.tdm", "e.tdm")
           and np.asarray(table[c]).dtype.kind == "f"]
  if not genes:
    raise ConfigError("data.path", f"{path} has no numeric gene columns")
  grade = _codes(table["grade"], _GRADES, "grade", path)
  er = _codes(table["er"], _ER, "er", path)
  event = _codes(table["e.tdm"], {"0": 0, "1": 1, "0.0": 0, "1.0": 1}, "e.tdm", path)
  y, keep = prognosis_labels(table["t.tdm"], event)
  unknown = grade == 0
  x = np.column_stack([table["age"], table["size"], np.where(unknown, 2, grade),
                       unknown.astype(np.float64), er] + [table[g] for g in genes])
  if not np.all(np.isfinite(x[keep])):
    raise ConfigError("data.path", f"{path} has missing values in the features of kept "
                      "tumours; impute them first")
  n = len(y)
  note = (f"gse7390: {n} tumours; label = distant metastasis within 5 years "
          f"(t.tdm <= {HORIZON_DAYS:g} days with e.tdm = 1); {int((~keep).sum())} censored "
          f"before 5 years EXCLUDED (status at 5 years unknown); {int(keep.sum())} kept, "
          f"{int(y[keep].sum())} positive; {x.shape[1]} features ({len(genes)} genes + "
          f"{len(FEATURES_CLINICAL)} clinical); source {path}")
  columns = {"er": er[keep], "grade": np.where(unknown, 3, grade - 1)[keep]}
  return (x[keep].astype(np.float32), y[keep], columns,
          list(FEATURES_CLINICAL) + genes, note)


def load(data_config):
  """(train, test) sources.Dataset pair; registered as data.name='gse7390' in sources.py."""
  from fedjax_lab.data import sources  # pylint: disable=g-import-not-at-top
  path = resolve_path(data_config)
  x, y, columns, _, note = load_arrays(path)
  log.info(note)
  return sources._split(x, y, 2, columns, NAME, CLASS_NAMES, data_config)  # pylint: disable=protected-access
