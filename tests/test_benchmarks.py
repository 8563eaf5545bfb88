"""The round-throughput benchmark times the same math three ways: check they agree."""

import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import round_throughput as rt  # noqa: E402


def test_naive_bare_and_lab_rounds_give_the_same_params():
  for cohort_size in (10, 100):
    exp = rt.Experiment(rt.reference_config(cohort_size, rounds=3))
    lab = rt.run_lab(exp, 3)
    naive = rt.run_reference(exp, rt.make_naive(exp), 3)
    bare = rt.run_reference(exp, rt.make_bare(exp), 3)
    for a, b, c in zip(jax.tree.leaves(lab), jax.tree.leaves(naive), jax.tree.leaves(bare)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-5, atol=1e-6)
