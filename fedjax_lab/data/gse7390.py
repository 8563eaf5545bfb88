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

Where the file comes from (nothing is bundled here), first match wins:
- `data.path` = an `.arff` or `.csv` with the columns above (age, size, grade, er, t.tdm,
  e.tdm, the gene columns; grade as the words above or 1/2/3, er as negative/positive or 0/1);
- `data.path` = GEO's series matrix of GSE7390 (`GSE7390_series_matrix.txt` or `.txt.gz`, any
  name ending in .txt / .txt.gz): see "Series matrix" below;
- `data.download=True` (data.path empty): that series matrix fetched once from GEO_URL into
  cache_dir() (`$FEDJAX_LAB_CACHE`, default ~/.cache/fedjax_lab) and read from there on every
  later run (no network then). Offline / unreachable: ConfigError naming data.download with
  the fixes (data.path, or data.download=False with scikit-survival installed);
- otherwise the copy that scikit-survival ships as
  `sksurv/datasets/data/breast_cancer_GSE7390-metastasis.arff` (from GEO GSE7390), found
  through importlib WITHOUT importing sksurv and read with scipy.io.arff. scikit-survival is
  GPL-3; the lab uses none of its code, only reads that data file at run time.
None present: ConfigError naming data.path (one line, exit 2).

Series matrix (read_series_matrix). GEO's tab-separated text: `!Series_*` / `!Sample_*` header
lines, values in double quotes, then the expression table between `!series_matrix_table_begin`
and `!series_matrix_table_end` (a header `"ID_REF" "GSM..." ...`, then one row per probe).
Clinical values come from the `!Sample_characteristics_ch1` lines, each cell "key: value" for
one sample; keys are matched by name (case-insensitive, in whichever line they sit): age,
size, grade, er, t.tdm, e.tdm. A key no sample has: ConfigError naming data.path and the key.
A sample without a key, or with NA, gets NaN (grade: unknown). Samples are matched between the
characteristics (`!Sample_geo_accession` order) and the table by GSM id. Genes: the 76 probes
of SIGNATURE_PROBES, in the .arff's order, named `X<probe id>` as in the .arff (its columns
are R's make.names of the Affymetrix HG-U133A probe ids: "X" + the ID_REF, e.g. X219340_s_at
<-> 219340_s_at; checked against scikit-survival 0.28's file); the other ~22,200 probes are
skipped. A probe missing from the table: ConfigError naming data.path.
Scale: the .arff's 76 genes span 0.52..14.4 (checked), i.e. log2 intensities. GEO's series
matrix could NOT be checked here (no internet), so whether its VALUE column is log2 (RMA-like)
or linear (MAS5-like) is not assumed: if any selected value is > 50 the values are taken to
be linear intensities and log2(max(v, 1)) is used, logged once; otherwise as is. Whether
GEO's values equal the .arff's (same normalisation) is likewise unverified offline; the
round trip in tests/test_gse7390.py checks the parser, not GEO's numbers.
"""

import gzip
import importlib.util
import logging
import os
import pathlib
import shutil
import urllib.error
import urllib.request

import numpy as np
from scipy.io import arff

from fedjax_lab.data.dataset import split_pool
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

# The series matrix of GSE7390 (one platform, GPL96 = HG-U133A) on GEO's FTP site over HTTPS.
SERIES_MATRIX_NAME = "GSE7390_series_matrix.txt.gz"
GEO_URL = ("https://ftp.ncbi.nlm.nih.gov/geo/series/GSE7nnn/GSE7390/matrix/"
           + SERIES_MATRIX_NAME)
CACHE_ENV = "FEDJAX_LAB_CACHE"
DOWNLOAD_TIMEOUT_S = 30.0
_NA = ("", "na", "nan", "null", "none")
# Above this an expression value is not a log2 intensity (HG-U133A log2 values stay < ~16).
_LINEAR_SCALE_ABOVE = 50.0
# The 76 probes (Wang et al. 2005 signature) of the .arff, in its column order, without its
# "X" prefix (R's make.names); test_signature_probes_are_the_arffs checks them against the file.
SIGNATURE_PROBES = tuple("""
219340_s_at 217771_at 202418_at 206295_at 201091_s_at 204015_s_at 200726_at 200965_s_at
210314_x_at 221882_s_at 217767_at 219588_s_at 204073_s_at 212567_s_at 211382_s_at
201663_s_at 221344_at 210028_s_at 218782_s_at 201664_at 219724_s_at 204014_at
212014_x_at 202240_at 204740_at 208180_s_at 204768_s_at 203391_at 211762_s_at 218914_at
221028_s_at 211779_x_at 218883_s_at 204888_s_at 217815_at 201368_at 201288_at
201068_s_at 218478_s_at 214919_s_at 209835_x_at 217471_at 203306_s_at 205034_at
221816_s_at 219510_at 217102_at 208683_at 215510_at 218533_s_at 215633_x_at 221928_at
214806_at 204540_at 221916_at 216693_x_at 209500_x_at 209524_at 207118_s_at 211040_x_at
218430_s_at 217404_s_at 205848_at 214915_at 216010_x_at 204631_at 202687_s_at 221634_at
220886_at 202239_at 204218_at 221241_s_at 209862_s_at 217019_at 210593_at 216103_at
""".split())


def installed_arff() -> pathlib.Path | None:
  """scikit-survival's bundled copy, located without importing the package (or None)."""
  spec = importlib.util.find_spec("sksurv")
  if spec is None or not spec.submodule_search_locations:
    return None
  path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / ARFF_NAME
  return path if path.is_file() else None


def is_series_matrix(path: pathlib.Path) -> bool:
  """True for a GEO series matrix by name: *.txt or *.txt.gz."""
  name = path.name.lower()
  return name.endswith(".txt") or name.endswith(".txt.gz")


def cache_dir() -> pathlib.Path:
  """$FEDJAX_LAB_CACHE, else ~/.cache/fedjax_lab."""
  return pathlib.Path(os.environ.get(CACHE_ENV) or "~/.cache/fedjax_lab").expanduser()


def fetch_series_matrix(url: str | None = None) -> pathlib.Path:
  """GEO's series matrix in cache_dir(); fetched from `url` (GEO_URL) only if not cached."""
  url = url or GEO_URL
  target = cache_dir() / SERIES_MATRIX_NAME
  if target.is_file():
    log.info("gse7390: using the cached series matrix %s", target)
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  part = target.with_name(target.name + f".part{os.getpid()}")
  log.info("gse7390: downloading %s to %s", url, target)
  try:
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, \
        open(part, "wb") as out:
      shutil.copyfileobj(response, out)
    with gzip.open(part, "rt", encoding="utf-8", errors="replace") as f:
      first = f.readline()
    if not first.startswith("!"):
      raise OSError("not a gzipped GEO series matrix")
  except (urllib.error.URLError, OSError, EOFError, ValueError) as e:
    part.unlink(missing_ok=True)
    reason = getattr(e, "reason", None) or e
    raise ConfigError("data.download", f"gse7390: cannot fetch {url} ({reason}); set data.path "
                      f"to {SERIES_MATRIX_NAME} (or the .arff/.csv), or set data.download=False "
                      f"and pip install scikit-survival==0.28.0 (it ships {ARFF_NAME})"
                      ) from None
  os.replace(part, target)
  return target


def resolve_path(data_config) -> pathlib.Path:
  if data_config.path:
    path = pathlib.Path(data_config.path).expanduser()
    if path.suffix.lower() not in (".arff", ".csv") and not is_series_matrix(path):
      raise ConfigError("data.path", f"gse7390 reads an .arff, .csv or GEO series matrix "
                        f"(.txt/.txt.gz) file, got '{path.suffix}' ({path})")
    if not path.is_file():
      raise ConfigError("data.path", f"file not found: {path}; set data.path to the GSE7390 "
                        f".arff/.csv/series matrix, or leave it empty to read scikit-survival's "
                        f"{ARFF_NAME}")
    return path
  if data_config.get("download", False):
    return fetch_series_matrix()
  path = installed_arff()
  if path is None:
    raise ConfigError("data.path", f"gse7390: data.path is empty and scikit-survival (which "
                      f"ships {ARFF_NAME}) is not installed; pip install scikit-survival==0.28.0 "
                      "or set data.path to an .arff/.csv with age, size, grade, er, t.tdm, "
                      "e.tdm and the gene columns (or GEO's series matrix), or set "
                      "data.download=True to fetch the series matrix from GEO")
  return path


def _open_text(path: pathlib.Path):
  if path.name.lower().endswith(".gz"):
    return gzip.open(path, "rt", encoding="utf-8", errors="replace")
  return open(path, encoding="utf-8", errors="replace")


def _cells(line: str) -> list[str]:
  """A series-matrix line's tab-separated cells after the first, quotes stripped."""
  return [c.strip().strip('"').strip() for c in line.rstrip("\r\n").split("\t")[1:]]


def _number(text: str) -> float:
  return np.nan if text.strip().lower() in _NA else float(text)


def read_series_matrix(path: pathlib.Path, probes=SIGNATURE_PROBES,
                       key: str = "data.path") -> dict[str, np.ndarray]:
  """GEO series matrix -> the {column: [N] array} table read_table gives for the .arff.

  Columns: age, size, t.tdm (float), grade, er, e.tdm (strings; NA grade -> 'unknown') and
  one float column `X<probe>` per probe in `probes` order. `key` is the config key errors name.
  """
  accessions, chars, header, rows = None, [], None, {}
  wanted = set(probes)
  in_table = False
  try:
    with _open_text(path) as f:
      for line in f:
        if in_table:
          if line.startswith("!series_matrix_table_end"):
            in_table = False
            continue
          if header is None:
            header = _cells("\t" + line)[1:]
            continue
          probe = line.split("\t", 1)[0].strip().strip('"')
          if probe in wanted:
            rows[probe] = _cells(line)
        elif line.startswith("!Sample_geo_accession"):
          accessions = _cells(line)
        elif line.startswith("!Sample_characteristics_ch1"):
          chars.append(_cells(line))
        elif line.startswith("!series_matrix_table_begin"):
          in_table = True
  except (OSError, EOFError, UnicodeError) as e:
    raise ConfigError(key, f"cannot read {path} as a GEO series matrix: {e}") from None
  if header is None:
    raise ConfigError(key, f"{path} has no expression table (!series_matrix_table_begin ... "
                      "_end); is it a GEO series matrix?")
  accessions = accessions or header
  # Per sample: {key: value} over every characteristics line (keys may move between lines).
  per_sample = [dict() for _ in accessions]
  for cells in chars:
    for i, cell in enumerate(cells[:len(accessions)]):
      name, sep, value = cell.partition(":")
      if sep:
        per_sample[i][name.strip().lower()] = value.strip()
  found = set().union(*per_sample) if per_sample else set()
  for name in (*CLINICAL, "t.tdm", "e.tdm"):
    if name not in found:
      has = ", ".join(sorted(found)) or "none"
      raise ConfigError(key, f"{path}: no sample has the characteristic '{name}' in its "
                        f"!Sample_characteristics_ch1 lines (has: {has})")
  where = {gsm: j for j, gsm in enumerate(header)}
  absent = [gsm for gsm in accessions if gsm not in where]
  if absent:
    raise ConfigError(key, f"{path}: samples {', '.join(absent[:3])} have characteristics "
                      "but no column in the expression table")
  missing = [p for p in probes if p not in rows]
  if missing:
    raise ConfigError(key, f"{path} lacks {len(missing)} of the {len(probes)} signature probes "
                      f"in ID_REF (e.g. {', '.join(missing[:3])}); GSE7390 uses HG-U133A ids")
  table = {}
  try:
    for name in ("age", "size", "t.tdm"):
      table[name] = np.array([_number(s.get(name, "NA")) for s in per_sample], np.float64)
    cols = [where[gsm] for gsm in accessions]
    genes = np.array([[_number(rows[p][j] if j < len(rows[p]) else "NA") for j in cols]
                      for p in probes], np.float64)
  except ValueError as e:
    raise ConfigError(key, f"{path}: a non-numeric value ({e})") from None
  for name in ("er", "e.tdm"):
    table[name] = np.array([s.get(name, "NA") for s in per_sample])
  grades = [s.get("grade", "NA") for s in per_sample]
  table["grade"] = np.array(["unknown" if g.lower() in _NA else g for g in grades])
  if np.nanmax(genes, initial=0.0) > _LINEAR_SCALE_ABOVE:
    floored = int((genes < 1).sum())
    genes = np.log2(np.maximum(genes, 1.0))
    log.info("gse7390: %s holds values up to %g (> %g: not log2); using log2(max(value, 1)) "
             "like the .arff's log2 values (%d values floored at 1)", path,
             2 ** np.nanmax(genes), _LINEAR_SCALE_ABOVE, floored)
  for p, values in zip(probes, genes):
    table["X" + p] = values
  return table


def read_table(path: pathlib.Path) -> dict[str, np.ndarray]:
  """{column: [N] array} of an .arff (scipy.io.arff), .csv (pandas) or GEO series matrix
  (read_series_matrix); strings decoded."""
  if is_series_matrix(path):
    return read_series_matrix(path)
  if path.suffix.lower() == ".arff":
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
  import pandas as pd  # optional: slow to import; only this table source needs it
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
  path = resolve_path(data_config)
  x, y, columns, _, note = load_arrays(path)
  log.info(note)
  return split_pool(x, y, 2, columns, NAME, CLASS_NAMES, data_config)
