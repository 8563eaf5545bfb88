"""GSE7390 loader (censoring rule, shapes, missing file), the NumPy metrics against
scikit-learn, per-site weights against evaluation.summarize, and the end-of-run report
(AUC / macro-F1 / intervals / robustness / unknown-class rejection) of a real run."""

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from sklearn.metrics import f1_score, roc_auc_score

from fedjax_lab import evaluation, evaluation_robustness, metrics
from fedjax_lab.data import gse7390, sources
from fedjax_lab.errors import ConfigError
from fedjax_lab.experiment import Experiment
from test_experiment import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DAY5Y = 5 * 365.25
GRADES = ("well differentiated", "intermediate", "poorly differentiated", "unkown")


def write_arff(path, n=60, genes=6, seed=0):
  """A small ARFF with GSE7390's columns; returns (time, event, grade, er) as written."""
  rng = np.random.default_rng(seed)
  time = rng.uniform(100, 4000, n).round()
  time[:4] = [DAY5Y, DAY5Y + 1, 300, 300]        # the boundary and both censoring cases
  event = rng.integers(0, 2, n)
  event[:4] = [1, 0, 0, 1]
  grade = rng.integers(0, 4, n)
  er = rng.integers(0, 2, n)
  gene = rng.normal(8, 1, (n, genes)) + event[:, None] * (time[:, None] < DAY5Y)
  lines = ["% synthetic fixture with GSE7390's columns", "@relation tdm.data",
           "@attribute age numeric", "@attribute size numeric",
           "@attribute grade {" + ",".join(GRADES) + "}",
           "@attribute er {negative,positive}", "@attribute t.tdm numeric",
           "@attribute e.tdm {0,1}"]
  lines += [f"@attribute X{j}_at numeric" for j in range(genes)] + ["@data"]
  for i in range(n):
    row = [f"{40 + i % 30}", f"{1 + (i % 5) / 2}", GRADES[grade[i]],
           ("negative", "positive")[er[i]], f"{time[i]:g}", f"{event[i]}"]
    lines.append(",".join(row + [f"{v:.4f}" for v in gene[i]]))
  path.write_text("\n".join(lines) + "\n")
  return time, event, grade, er


def _data_config(path, **kw):
  c = sources.default_data_config()
  c.name, c.path = "gse7390", str(path)
  c.update(kw)
  return c


# ----------------------------------------------------------------------------- loader


def test_censoring_rule_by_hand():
  time = np.array([100, DAY5Y, DAY5Y + 0.5, 4000, 100, 3000])
  event = np.array([1, 1, 1, 0, 0, 0])
  y, keep = gse7390.prognosis_labels(time, event)
  np.testing.assert_array_equal(keep, [True, True, True, True, False, True])
  np.testing.assert_array_equal(y[keep], [1, 1, 0, 0, 0])


def test_loader_applies_the_rule_and_shapes(tmp_path, caplog):
  time, event, grade, er = write_arff(tmp_path / "g.arff")
  expect_keep = (time > DAY5Y) | (event == 1)
  expect_y = ((event == 1) & (time <= DAY5Y))[expect_keep]
  with caplog.at_level(logging.INFO, logger="fedjax_lab"):
    train, test = sources.load_dataset(_data_config(tmp_path / "g.arff"))
  excluded = int((~expect_keep).sum())
  assert any(f"{excluded} censored before 5 years EXCLUDED" in r.message for r in caplog.records)
  assert len(train) + len(test) == expect_keep.sum()
  assert train.x.shape[1] == 5 + 6 and train.x.dtype == np.float32 and train.num_classes == 2
  # Every kept row is found with its label: match rows by the gene values.
  x_all = np.concatenate([train.x, test.x])
  y_all = np.concatenate([train.y, test.y])
  assert sorted(y_all.tolist()) == sorted(expect_y.astype(int).tolist())
  grade_code = np.where(grade == 3, 2, grade + 1)  # 'unkown' -> 2 with the indicator set
  genes = _genes(tmp_path)
  for xi, yi in zip(x_all, y_all):
    i = int(np.argmin(np.abs(genes - xi[5:]).sum(1)))  # the file row with these gene values
    assert expect_keep[i]
    assert yi == int((event[i] == 1) and time[i] <= DAY5Y)
    assert xi[2] == grade_code[i] and xi[3] == (grade[i] == 3) and xi[4] == er[i]
  assert set(train.columns) == {"er", "grade"}


def _genes(tmp_path):
  table = gse7390.read_table(tmp_path / "g.arff")
  return np.column_stack([table[f"X{j}_at"] for j in range(6)])


def test_csv_reads_like_arff(tmp_path):
  write_arff(tmp_path / "g.arff")
  table = gse7390.read_table(tmp_path / "g.arff")
  import pandas as pd
  pd.DataFrame(table).to_csv(tmp_path / "g.csv", index=False)
  a = sources.load_dataset(_data_config(tmp_path / "g.arff"))
  b = sources.load_dataset(_data_config(tmp_path / "g.csv"))
  for u, v in zip(a, b):
    np.testing.assert_allclose(u.x, v.x, rtol=1e-6)
    np.testing.assert_array_equal(u.y, v.y)


def test_missing_file_and_missing_package_are_config_errors(tmp_path, monkeypatch):
  with pytest.raises(ConfigError, match="file not found") as e:
    sources.load_dataset(_data_config(tmp_path / "nope.arff"))
  assert e.value.key == "data.path"
  monkeypatch.setattr(gse7390, "installed_arff", lambda: None)
  with pytest.raises(ConfigError, match="scikit-survival") as e:
    sources.load_dataset(_data_config(""))
  assert e.value.key == "data.path"


def test_train_py_missing_file_is_one_line_exit_2(tmp_path):
  r = subprocess.run([sys.executable, "train.py", "--config", "configs/gse7390_prognosis.py",
                      f"--config.data.path={tmp_path}/missing.arff",
                      f"--workdir={tmp_path}/w"], cwd=ROOT, capture_output=True, text=True)
  assert r.returncode == 2
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  assert lines[-1].startswith("config error: data.path: file not found")
  assert not any("Traceback" in l for l in lines)


@pytest.mark.skipif(gse7390.installed_arff() is None, reason="scikit-survival not installed")
def test_the_real_file():
  train, test = sources.load_dataset(_data_config("", test_fraction=0.3))
  assert len(train) + len(test) == 189 and train.x.shape[1] == 81
  assert int(train.y.sum() + test.y.sum()) == 35


# ----------------------------------------------------------------------------- metrics


def test_metrics_match_sklearn():
  rng = np.random.default_rng(1)
  for _ in range(5):
    y = rng.integers(0, 2, 80)
    score = rng.integers(0, 6, 80) / 5.0          # many ties
    w = rng.uniform(0, 2, 80)
    assert metrics.binary_auc(y, score) == pytest.approx(roc_auc_score(y, score))
    assert metrics.binary_auc(y, score, w) == pytest.approx(
        roc_auc_score(y, score, sample_weight=w))
    y4 = rng.integers(0, 4, 80)
    probs = rng.dirichlet(np.ones(4), 80)
    assert metrics.macro_auc(y4, probs) == pytest.approx(
        roc_auc_score(y4, probs, multi_class="ovr", average="macro"))
    pred = rng.integers(0, 5, 80)
    assert metrics.macro_f1(y4, pred) == pytest.approx(
        f1_score(y4, pred, average="macro", zero_division=0))
    assert metrics.macro_f1(y4, pred, w) == pytest.approx(
        f1_score(y4, pred, average="macro", sample_weight=w, zero_division=0))
  assert np.isnan(metrics.binary_auc(np.zeros(5), np.arange(5)))


def test_bootstrap_interval_against_numpy():
  rng = np.random.default_rng(0)
  y, s = rng.integers(0, 2, 50), rng.normal(size=50)
  lo, hi = metrics.bootstrap_ci(lambda i: metrics.binary_auc(y[i], s[i]), 50, 200, seed=3)
  draws = np.random.default_rng(3)
  vals = [roc_auc_score(y[i], s[i]) for i in (draws.integers(0, 50, 50) for _ in range(200))
          if len(np.unique(y[i])) == 2]
  assert (lo, hi) == pytest.approx((np.percentile(vals, 2.5), np.percentile(vals, 97.5)))


def test_site_weights_reproduce_evaluation_site_accuracy():
  rng = np.random.default_rng(2)
  y = rng.integers(0, 3, 40)
  pred = np.where(rng.random(40) < 0.7, y, (y + 1) % 3)
  hist = rng.integers(0, 10, (4, 3))
  correct = np.bincount(y[pred == y], minlength=3)
  expected = evaluation.summarize(correct, 0.0, y, hist)
  w = metrics.site_weights(y, hist)
  site = [metrics.accuracy(y, pred, wi) for wi in w]
  assert np.mean(site) == pytest.approx(expected.site_accuracy_mean)


# ----------------------------------------------------------------------------- report


def _tiny(**kw):
  return tiny_config(**{"rounds": 4, "data.num_sites": 10, "client.batch_size": 16,
                        "eval.bootstrap": 50, **kw})


def test_report_matches_sklearn_on_the_models_probabilities(tmp_path):
  c = _tiny(**{"eval.robustness": True, "eval.unknown_classes": (9,),
               "eval.robustness_noise": (0.0, 1.0), "eval.robustness_mask": (0.5,)})
  exp = Experiment(c)
  summary = exp.run(str(tmp_path))
  assert not np.isin(9, exp.train.y) and not np.isin(9, exp.test.y)
  assert (exp.unknown.y == 9).all() and len(exp.unknown) > 0
  probs = evaluation_robustness.make_predictor(exp.model, 64)(
      exp.final_state.params, exp.final_state.model_state, exp.test.x)
  y = exp.test.y
  assert summary["test_accuracy"] == pytest.approx((probs.argmax(-1) == y).mean(), abs=1e-6)
  assert summary["test_macro_f1"] == pytest.approx(
      f1_score(y, probs.argmax(-1), average="macro", zero_division=0))
  present = np.unique(y)
  assert summary["test_auc"] == pytest.approx(
      np.mean([roc_auc_score(y == k, probs[:, k]) for k in present]))
  lo, hi = summary["test_auc_ci95"]
  assert lo <= summary["test_auc"] <= hi
  assert len(summary["site_metrics"]["accuracy"]) == 10
  assert np.mean(summary["site_metrics"]["accuracy"]) == pytest.approx(
      summary["site_accuracy_mean"], abs=1e-6)
  rob = summary["robustness"]
  assert rob["gaussian_noise"]["0"]["accuracy"] == pytest.approx(summary["test_accuracy"])
  assert rob["gaussian_noise"]["1"]["accuracy"] < summary["test_accuracy"]
  unk = rob["unknown_classes"]
  known = 1 - probs.max(-1)
  unknown = 1 - evaluation_robustness.make_predictor(exp.model, 64)(
      exp.final_state.params, exp.final_state.model_state, exp.unknown.x).max(-1)
  assert unk["auroc"] == pytest.approx(roc_auc_score(
      np.r_[np.zeros(len(known)), np.ones(len(unknown))], np.r_[known, unknown]))
  assert len(unk["site_auroc"]) == 10
  assert json.load(open(tmp_path / "summary.json"))["robustness"]["unknown_classes"][
      "classes"] == [9]


def test_eval_config_errors_name_the_key():
  from fedjax_lab import config as config_lib
  for kw, key in (({"eval.unknown_classes": (3,)}, "eval.unknown_classes"),
                  ({"eval.bootstrap": -1}, "eval.bootstrap"),
                  ({"eval.robustness_mask": (1.0,), "eval.robustness": True},
                   "eval.robustness_mask")):
    with pytest.raises(ConfigError) as e:
      config_lib.validate(_tiny(**kw))
    assert e.value.key == key
  with pytest.raises(ConfigError) as e:
    Experiment(_tiny(**{"eval.robustness": True, "eval.unknown_classes": (12,)}))
  assert e.value.key == "eval.unknown_classes"


def test_gse7390_federated_and_central_auc(tmp_path):
  """The acceptance command on a fixture: both AUCs printed, interval around each."""
  write_arff(tmp_path / "g.arff", n=120)
  r = subprocess.run([sys.executable, "train.py", "--config", "configs/gse7390_prognosis.py",
                      f"--config.data.path={tmp_path}/g.arff", "--config.rounds=10",
                      "--config.eval.bootstrap=100", f"--workdir={tmp_path}/w"],
                     cwd=ROOT, capture_output=True, text=True)
  assert r.returncode == 0, r.stderr[-2000:]
  line = next(l for l in r.stdout.splitlines() if l.startswith("federated test_auc="))
  assert "vs centralized test_auc=" in line
  s = json.load(open(tmp_path / "w" / "summary.json"))
  assert s["test_auc"] is not None and s["centralized_test_auc"] is not None
  assert "censored before 5 years EXCLUDED" in r.stderr
