"""The round-throughput benchmark times the same math three ways: check they agree."""

import importlib.util
import os

import jax
import numpy as np


def _load(name):
  """A benchmark script as a module, from its file (benchmarks/ is not a package)."""
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "benchmarks", f"{name}.py")
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


rt = _load("round_throughput")


def test_naive_bare_and_lab_rounds_give_the_same_params():
  for cohort_size in (10, 100):
    exp = rt.Experiment(rt.reference_config(cohort_size, rounds=3))
    lab = rt.run_lab(exp, 3)
    naive = rt.run_reference(exp, rt.make_naive(exp), 3)
    bare = rt.run_reference(exp, rt.make_bare(exp), 3)
    for a, b, c in zip(jax.tree.leaves(lab), jax.tree.leaves(naive), jax.tree.leaves(bare)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-5, atol=1e-6)


def test_flower_secagg_uses_the_digits_model_size_and_the_same_rows():
  """benchmarks/flower_secagg.py: d is the digits MLP's (as in secagg_overhead.py), each
  site's row is fixed by (seed, site) (Flower's clients and the lab's matrix draw the same)."""
  fs, so = _load("flower_secagg"), _load("secagg_overhead")
  assert fs.digits_model_size() == so.MLP
  np.testing.assert_array_equal(fs.site_row(14, 3, 50), fs.site_row(14, 3, 50))
  assert not np.array_equal(fs.site_row(14, 3, 50), fs.site_row(14, 4, 50))
  k, t, levels = fs.settings(100, 14)
  assert (k, t) == (14, 8) and 100 * levels < 2 ** 32  # Flower's sum of weights fits mod 2^32
