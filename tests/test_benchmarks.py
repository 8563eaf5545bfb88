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
