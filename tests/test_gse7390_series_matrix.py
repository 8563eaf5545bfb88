"""GSE7390 from GEO's series matrix (data.path=*.txt[.gz] or data.download=True): the parser
against the .csv/.arff path on the same tumours, errors, the log2 detection, and the download
into the cache on a local file:// fixture (no network)."""

import gzip
import logging
import pathlib

import numpy as np
import pandas as pd
import pytest

from fedjax_lab.data import gse7390, sources
from fedjax_lab.errors import ConfigError

DAY5Y = 5 * 365.25
WORDS = {1: "well differentiated", 2: "intermediate", 3: "poorly differentiated", 0: "unkown"}
NUMBER = {v: k for k, v in WORDS.items()}


def _data_config(path, **kw):
  c = sources.default_data_config()
  c.name, c.path = "gse7390", str(path)
  c.update(kw)
  return c


def synthetic_table(n=12, seed=0):
  """{column: array} as read_table gives it, with the 76 signature genes (log2-like values)."""
  rng = np.random.default_rng(seed)
  time = rng.uniform(100, 4000, n).round()
  time[:4] = [DAY5Y, DAY5Y + 1, 300, 300]
  event = rng.integers(0, 2, n)
  event[:4] = [1, 0, 0, 1]
  grade = np.arange(n) % 4                          # 0 = 'unkown'
  table = {"age": rng.integers(25, 70, n).astype(float), "size": rng.uniform(0.5, 5, n).round(1),
           "grade": np.array([WORDS[g] for g in grade]),
           "er": np.array([("negative", "positive")[i % 2] for i in range(n)]),
           "t.tdm": time, "e.tdm": event.astype(str)}
  genes = rng.normal(8, 2, (n, len(gse7390.SIGNATURE_PROBES)))
  for j, probe in enumerate(gse7390.SIGNATURE_PROBES):
    table["X" + probe] = genes[:, j]
  return table


def write_series_matrix(path, table, drop_key=None, scale=None, drop_probe=None, seed=1):
  """`table` (read_table's layout) written as GEO writes GSE7390_series_matrix.txt(.gz):
  header lines, "key: value" characteristics (grade 1/2/3/NA, er 0/1), quoted strings, the
  table with extra probes and the GSM columns in a different order than the accessions."""
  n = len(table["age"])
  gsm = [f"GSM{177885 + i}" for i in range(n)]
  q = lambda cells: "\t".join(f'"{c}"' for c in cells)
  chars = {"id": [f"VDX_{i}" for i in range(n)], "hospital": ["IGR"] * n,
           "age": [f"{v:g}" for v in table["age"]], "size": [f"{v:g}" for v in table["size"]],
           "grade": [("NA" if NUMBER[g] == 0 else str(NUMBER[g])) for g in table["grade"]],
           "er": [str(int(e == "positive")) for e in table["er"]],
           "t.tdm": [f"{v:g}" for v in table["t.tdm"]], "e.tdm": list(table["e.tdm"]),
           "t.os": ["1000"] * n}
  lines = ['!Series_title\t"Strong Time Dependence of the 76-Gene Prognostic Signature"',
           '!Series_geo_accession\t"GSE7390"', '!Series_status\t"Public on Jun 15 2007"',
           '!Series_platform_id\t"GPL96"', "",
           "!Sample_title\t" + q([f"VDX_{i}" for i in range(n)]),
           "!Sample_geo_accession\t" + q(gsm),
           "!Sample_status\t" + q(["Public on Jun 15 2007"] * n),
           "!Sample_source_name_ch1\t" + q(["breast tumor"] * n),
           "!Sample_organism_ch1\t" + q(["Homo sapiens"] * n)]
  lines += ["!Sample_characteristics_ch1\t" + q(f"{k}: {v}" for v in values)
            for k, values in chars.items() if k != drop_key]
  lines += ["!Sample_platform_id\t" + q(["GPL96"] * n),
            "!Sample_data_row_count\t" + q(["22283"] * n), "!series_matrix_table_begin"]
  order = np.random.default_rng(seed).permutation(n)
  lines.append(q(["ID_REF"] + [gsm[j] for j in order]))
  rng = np.random.default_rng(seed)
  extra = {"1007_s_at": rng.normal(8, 1, n), "AFFX-BioB-5_at": np.full(n, np.nan)}
  probes = {**{p: table["X" + p] for p in gse7390.SIGNATURE_PROBES}, **extra}
  for probe in ("1007_s_at", *gse7390.SIGNATURE_PROBES[:40], "AFFX-BioB-5_at",
                *gse7390.SIGNATURE_PROBES[40:]):
    if probe == drop_probe:
      continue
    values = probes[probe] if scale is None else scale(probes[probe])
    lines.append(f'"{probe}"\t' + "\t".join("null" if np.isnan(values[j]) else repr(float(values[j]))
                                            for j in order))
  lines.append("!series_matrix_table_end")
  text = "\n".join(lines) + "\n"
  path = pathlib.Path(path)
  if path.name.endswith(".gz"):
    with gzip.open(path, "wt") as f:
      f.write(text)
  else:
    path.write_text(text)
  return path


def _assert_same(a, b):
  xa, ya, ca, na, _ = a
  xb, yb, cb, nb, _ = b
  np.testing.assert_array_equal(xa, xb)
  np.testing.assert_array_equal(ya, yb)
  assert na == nb and ca.keys() == cb.keys()
  for k in ca:
    np.testing.assert_array_equal(ca[k], cb[k])


@pytest.mark.parametrize("name", ["GSE7390_series_matrix.txt", "GSE7390_series_matrix.txt.gz"])
def test_series_matrix_reads_like_csv(tmp_path, name):
  table = synthetic_table()
  pd.DataFrame(table).to_csv(tmp_path / "g.csv", index=False)
  matrix = write_series_matrix(tmp_path / name, table)
  got = gse7390.load_arrays(matrix)
  _assert_same(got, gse7390.load_arrays(tmp_path / "g.csv"))
  x, y, columns, names, _ = got
  keep = (table["t.tdm"] > DAY5Y) | (table["e.tdm"] == "1")
  assert 0 < (~keep).sum() and x.shape == (keep.sum(), 81)
  assert names[5:] == ["X" + p for p in gse7390.SIGNATURE_PROBES]
  np.testing.assert_array_equal(
      y, ((table["e.tdm"] == "1") & (table["t.tdm"] <= DAY5Y))[keep])
  np.testing.assert_array_equal(columns["grade"], [(3, 0, 1, 2)[i % 4] for i in np.where(keep)[0]])
  # Through sources and the split: the same datasets as the .csv.
  for u, v in zip(sources.load_dataset(_data_config(matrix)),
                  sources.load_dataset(_data_config(tmp_path / "g.csv"))):
    np.testing.assert_array_equal(u.x, v.x)
    np.testing.assert_array_equal(u.y, v.y)
    np.testing.assert_array_equal(u.columns["er"], v.columns["er"])


def test_missing_characteristic_is_one_line_naming_data_path(tmp_path):
  matrix = write_series_matrix(tmp_path / "GSE7390_series_matrix.txt.gz", synthetic_table(),
                               drop_key="t.tdm")
  with pytest.raises(ConfigError) as e:
    sources.load_dataset(_data_config(matrix))
  assert e.value.key == "data.path" and "\n" not in str(e.value)
  assert "'t.tdm'" in str(e.value) and str(matrix) in str(e.value)


def test_missing_probe_and_not_a_matrix(tmp_path):
  matrix = write_series_matrix(tmp_path / "m.txt", synthetic_table(),
                               drop_probe=gse7390.SIGNATURE_PROBES[3])
  with pytest.raises(ConfigError, match=gse7390.SIGNATURE_PROBES[3]) as e:
    gse7390.load_arrays(matrix)
  assert e.value.key == "data.path"
  (tmp_path / "notes.txt").write_text("hello\n")
  with pytest.raises(ConfigError, match="no expression table") as e:
    gse7390.load_arrays(tmp_path / "notes.txt")


def test_linear_values_are_log2d_and_logged_once(tmp_path, caplog):
  table = synthetic_table()
  log2 = write_series_matrix(tmp_path / "a.txt", table)
  linear = write_series_matrix(tmp_path / "b.txt", table, scale=np.exp2)
  with caplog.at_level(logging.INFO, logger="fedjax_lab"):
    xa = gse7390.load_arrays(log2)[0]
    assert not any("not log2" in r.message for r in caplog.records)
    xb = gse7390.load_arrays(linear)[0]
  assert sum("not log2" in r.message for r in caplog.records) == 1
  np.testing.assert_allclose(xb, xa, rtol=1e-6)


@pytest.mark.skipif(gse7390.installed_arff() is None, reason="scikit-survival not installed")
def test_signature_probes_are_the_arffs():
  table = gse7390.read_table(gse7390.installed_arff())
  genes = [c for c in table if c not in (*gse7390.CLINICAL, "t.tdm", "e.tdm")]
  assert genes == ["X" + p for p in gse7390.SIGNATURE_PROBES]


@pytest.mark.skipif(gse7390.installed_arff() is None, reason="scikit-survival not installed")
def test_round_trip_from_the_bundled_arff(tmp_path):
  arff = gse7390.installed_arff()
  matrix = write_series_matrix(tmp_path / "GSE7390_series_matrix.txt.gz",
                               gse7390.read_table(arff))
  got, want = gse7390.load_arrays(matrix), gse7390.load_arrays(arff)
  _assert_same(got, want)
  assert got[0].shape == (189, 81) and int(got[1].sum()) == 35


# ----------------------------------------------------------------------------- download


def test_download_into_the_cache_then_reuse_it(tmp_path, monkeypatch, caplog):
  (tmp_path / "geo").mkdir()
  source = write_series_matrix(tmp_path / "geo" / gse7390.SERIES_MATRIX_NAME, synthetic_table())
  monkeypatch.setattr(gse7390, "GEO_URL", source.as_uri())
  monkeypatch.setenv(gse7390.CACHE_ENV, str(tmp_path / "cache"))
  config = _data_config("", download=True)
  first = sources.load_dataset(config)
  cached = tmp_path / "cache" / gse7390.SERIES_MATRIX_NAME
  assert cached.is_file() and list(cached.parent.iterdir()) == [cached]
  source.unlink()                                  # a second fetch would now fail
  with caplog.at_level(logging.INFO, logger="fedjax_lab"):
    second = sources.load_dataset(config)
  assert any("using the cached series matrix" in r.message for r in caplog.records)
  for u, v in zip(first, second):
    np.testing.assert_array_equal(u.x, v.x)
  table = synthetic_table()
  pd.DataFrame(table).to_csv(tmp_path / "g.csv", index=False)
  for u, v in zip(first, sources.load_dataset(_data_config(tmp_path / "g.csv"))):
    np.testing.assert_array_equal(u.x, v.x)


def test_download_offline_is_one_line_naming_data_download(tmp_path, monkeypatch):
  monkeypatch.setenv(gse7390.CACHE_ENV, str(tmp_path / "cache"))
  monkeypatch.setattr(gse7390, "GEO_URL", (tmp_path / "absent.txt.gz").as_uri())
  with pytest.raises(ConfigError) as e:
    sources.load_dataset(_data_config("", download=True))
  msg = str(e.value)
  assert e.value.key == "data.download" and "\n" not in msg
  assert "data.path" in msg and "scikit-survival" in msg
  # A reply that is not a gzipped series matrix (an HTML error page) is refused, not cached.
  (tmp_path / "page.html").write_text("<html>503</html>")
  monkeypatch.setattr(gse7390, "GEO_URL", (tmp_path / "page.html").as_uri())
  with pytest.raises(ConfigError) as e:
    sources.load_dataset(_data_config("", download=True))
  assert e.value.key == "data.download"
  assert not list((tmp_path / "cache").iterdir())
