"""Population-independent rounds (data.partition=pool, O(cohort) cohort draws): each sampler
against its exact law (enumerated subsets, binomial counts, float64 NumPy), the pool's windows
against a NumPy construction, and a 10^5-site run."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from fedjax_lab import keys
from fedjax_lab.config import default_config
from fedjax_lab.data import federated, partition
from fedjax_lab.errors import ConfigError
from fedjax_lab.experiment import Experiment
from fedjax_lab.privacy import sampling


def _draws(fn, n):
  return np.asarray(jax.jit(jax.vmap(fn))(jax.random.split(jax.random.key(7), n)))


def test_first_distinct_is_uniform_over_ordered_samples():
  # 8 sites, cohorts of 2: all 56 ordered pairs equally likely (sampling without replacement
  # in random order), checked by a chi-square test on 28,000 draws.
  pairs = _draws(lambda r: keys.first_distinct(r, 8, 2), 28_000)
  assert (pairs[:, 0] != pairs[:, 1]).all()
  index = {p: i for i, p in enumerate(itertools.permutations(range(8), 2))}
  counts = np.bincount([index[tuple(p)] for p in pairs.tolist()], minlength=56)
  assert stats.chisquare(counts).pvalue > 1e-3


def test_large_population_cohort_is_distinct_and_uniform():
  n, k = 1 << 16, 100
  cohorts = _draws(lambda r: keys.sample_cohort(r, n, k), 2000)
  assert all(len(set(c)) == k for c in cohorts.tolist())
  assert cohorts.min() >= 0 and cohorts.max() < n
  assert stats.chisquare(np.bincount(cohorts.ravel() * 64 // n, minlength=64)).pvalue > 1e-3
  # Uniform order too: the first slot is as uniform as any (byzantine_sites takes slot 0).
  assert stats.chisquare(np.bincount(cohorts[:, 0] * 16 // n, minlength=16)).pvalue > 1e-3


def test_log_uniform_matches_float64():
  hi, lo = [a.ravel() for a in np.meshgrid(
      [0, 1, 2, 1000, 2**23 - 1, 2**23, 2**24 - 2, 2**24 - 1], [0, 1, 1000, 2**23 - 2, 2**23 - 1])]
  want = np.log((hi + (2 * lo + 1) / 2**24) / 2**24)  # float64
  got = np.asarray(sampling.log_uniform_from_words(hi, lo), np.float64)
  np.testing.assert_allclose(got, want, rtol=2e-6)


def test_geometric_cohort_has_the_law_of_independent_coins():
  # 6 sites at q = 0.3: every one of the 64 subsets with probability q^|S| (1-q)^(6-|S|).
  n, q, draws = 6, 0.3, 40_000
  pos, mask, overflow = [np.asarray(a) for a in jax.jit(jax.vmap(
      lambda r: sampling.geometric_cohort(r, n, q, n)))(jax.random.split(jax.random.key(3),
                                                                         draws))]
  assert (overflow == 0).all()
  code = ((np.where(mask > 0, 2 ** pos, 0)).sum(1)).astype(int)
  sizes = np.array([bin(s).count("1") for s in range(64)])
  expected = draws * q ** sizes * (1 - q) ** (n - sizes)
  assert stats.chisquare(np.bincount(code, minlength=64), expected).pvalue > 1e-3
  # Selected sites first, increasing, then zeros.
  for p, m in zip(pos[:200], mask[:200]):
    k = int(m.sum())
    assert (m[:k] == 1).all() and (np.diff(p[:k]) > 0).all() and (p[k:] == 0).all()


def test_geometric_cohort_counts_the_surplus_as_coins_would():
  # 2 slots for Binomial(6, 0.3) selections: slots + overflow must have the binomial law.
  n, q, draws = 6, 0.3, 40_000
  _, mask, overflow = [np.asarray(a) for a in jax.jit(jax.vmap(
      lambda r: sampling.geometric_cohort(r, n, q, 2)))(jax.random.split(jax.random.key(4),
                                                                        draws))]
  total = mask.sum(1).astype(int) + overflow
  assert (overflow[mask.sum(1) < 2] == 0).all()
  counts = np.bincount(total, minlength=n + 1)
  assert stats.chisquare(counts, draws * stats.binom.pmf(np.arange(n + 1), n, q)).pvalue > 1e-3


def test_poisson_cohort_at_scale():
  n, k, slots = 100_000, 100, 160
  pos, mask, overflow = [np.asarray(a) for a in jax.jit(jax.vmap(
      lambda r: sampling.poisson_cohort(r, n, k / n, slots)))(jax.random.split(
          jax.random.key(5), 500))]
  sizes = mask.sum(1)
  # Binomial(n, k/n): mean 100, sd ~10; the mean of 500 draws within 4 standard errors.
  assert abs(sizes.mean() - k) < 4 * math.sqrt(k * (1 - k / n) / 500)
  assert (overflow == 0).all() and pos.max() < n
  chosen = pos[mask > 0]
  assert stats.chisquare(np.bincount(chosen * 32 // n, minlength=32)).pvalue > 1e-3


def _data_config(num_sites, m, method="pool"):
  c = default_config().data
  c.num_sites, c.examples_per_site, c.partition = num_sites, m, method
  return c


class _Train:
  def __init__(self, n):
    self.y = np.arange(n) % 10
    self.columns = {}
    self.name = "toy"


def test_pool_windows():
  n, m = 97, 5
  small = partition.partition(_Train(n), _data_config(19, m), seed=0)  # 95 <= 97: disjoint
  rows = np.concatenate([small[s] for s in range(len(small))])
  assert len(small) == 19 and len(set(rows.tolist())) == 95
  big = partition.partition(_Train(n), _data_config(1000, m), seed=0)
  # Reference: the same permutation, windows built one by one.
  pool = np.random.default_rng(0).permutation(n)
  for s in (0, 1, 18, 19, 500, 999):
    np.testing.assert_array_equal(big[s], np.sort(pool[[(s * m + j) % n for j in range(m)]]))
  per_example = np.bincount(big.table.ravel(), minlength=n)
  assert per_example.min() >= (1000 * m) // n and per_example.max() <= -(-1000 * m // n)
  data = federated.from_partition(np.zeros((n, 2)), _Train(n).y, big, 10)
  assert data.idx.shape == (1000, m) and (np.asarray(data.count) == m).all()


def test_site_label_histogram_matches_a_loop():
  y = np.random.default_rng(1).integers(0, 4, 60)
  sites = [np.arange(0, 7), np.arange(7, 8), np.arange(8, 60)]  # padded rows must not count
  data = federated.from_partition(np.zeros((60, 1)), y, sites, 4)
  want = np.array([[np.sum(y[s] == c) for c in range(4)] for s in sites])
  np.testing.assert_array_equal(federated.site_label_histogram(data), want)


def test_shared_pool_refuses_example_dp():
  c = default_config()
  c.data.partition, c.data.num_sites, c.data.examples_per_site = "pool", 1000, 15
  c.dp.level, c.dp.noise_multiplier = "example", 1.0
  with pytest.raises(ConfigError, match="dp.level.*share examples"):
    Experiment(c)


def test_site_dp_round_at_large_population(tmp_path):
  # 10^4 sites (past keys.LARGE_POPULATION), site-level DP: the run trains through the
  # geometric gaps and binomial surplus drawn from the secret ChaCha20 keys, and the
  # attacks' recorder replays the round's cohort draw.
  from fedjax_lab.attacks import record
  c = default_config()
  c.data.partition, c.data.num_sites, c.cohort_size, c.rounds = "pool", 10_000, 20, 2
  c.dp.level, c.dp.noise_multiplier, c.dp.randomness = "site", 0.5, "secret"
  c.eval.bootstrap, c.eval.site_metrics_max = 0, 100
  exp = Experiment(c)
  summary = exp.run(str(tmp_path))
  assert summary["epsilon"] > 0 and np.isfinite(summary["test_accuracy"])
  # Past eval.site_metrics_max: per-site metrics for a sample, site sizes as a histogram.
  sampled = summary["site_metrics"]["sites"]
  assert len(sampled) == len(set(sampled)) == len(summary["site_metrics"]["accuracy"]) == 100
  assert summary["privacy"]["released_without_dp"]["site_examples_by_size"] == {"15": 10_000}
  ids, mask = record.cohort(exp, 0)
  chosen = ids[mask > 0]
  assert len(set(chosen.tolist())) == len(chosen) and chosen.max() < 10_000


def test_per_site_state_beyond_the_limit_is_refused_before_allocation():
  # SCAFFOLD's control per site: 10^6 sites x the MLP's 9,610 parameters x 2 (server and
  # site controls at most) is far beyond 16 GiB; refused from shapes, nothing allocated.
  c = default_config()
  c.data.partition, c.data.num_sites, c.cohort_size = "pool", 1_000_000, 100
  c.algorithm.name = "scaffold"
  with pytest.raises(ConfigError, match="data.num_sites.*GiB"):
    Experiment(c)
