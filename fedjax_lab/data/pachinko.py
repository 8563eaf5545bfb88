"""The Pachinko allocation split of CIFAR-100 (Reddi et al. 2021, "Adaptive Federated
Optimization", appendix; the split TFF's `tff.simulation.datasets.cifar100` ships).

It follows Li & McCallum 2006's Pachinko Allocation Model, a two-level LDA over CIFAR-100's
label hierarchy (20 coarse labels, each the parent of 5 fine labels). For each site s:

  theta_s    ~ Dir(alpha * 1_20)        its distribution over coarse labels (alpha 0.1)
  phi_{s,c}  ~ Dir(beta * 1_{F_c})      for each coarse c, over c's F_c fine labels (beta 10)

then `examples_per_site` times: draw a coarse label c ~ theta_s, a fine label f ~ phi_{s,c},
and take a uniformly random example of fine label f that no site holds yet (without
replacement). When the last example of f is taken, f is removed from every later draw (its
phi entries are zeroed and phi renormalised); when every fine label of c is gone, c is removed
from theta the same way. Sites are drawn one after another, so late sites find the labels
popular with early sites exhausted: their labels are less skewed than theta_s alone implies.

Implementation: NumPy, one `np.random.Generator`; the removals are global counts, so the
split is a deterministic function of (labels, num_sites, examples_per_site, alpha, beta, rng).
"""

import numpy as np

from fedjax_lab.errors import ConfigError


def hierarchy(coarse: np.ndarray, fine: np.ndarray, num_coarse: int,
              num_fine: int) -> np.ndarray:
  """[num_fine] int: the coarse label of each fine label.

  In CIFAR-100 every fine label has exactly one coarse label. Data whose two labels are drawn
  independently (tfds.testing.mock_data) have none; there each fine label takes its most
  frequent coarse label, so the split still sees a hierarchy (of uneven sizes, some coarse
  labels possibly childless).
  """
  counts = np.zeros((num_fine, num_coarse), np.int64)
  np.add.at(counts, (fine, coarse), 1)
  return counts.argmax(axis=1)


def split(coarse: np.ndarray, fine: np.ndarray, num_sites: int, examples_per_site: int,
          alpha: float, beta: float, rng: np.random.Generator, num_coarse: int = 20,
          num_fine: int = 100) -> np.ndarray:
  """Assigns examples to sites by Pachinko allocation (see the module docstring).

  Args:
    coarse: [N] int coarse labels in [0, num_coarse).
    fine: [N] int fine labels in [0, num_fine).
    num_sites, examples_per_site: num_sites * examples_per_site <= N examples are used.
    alpha: Dirichlet concentration over coarse labels (small = each site few coarse labels).
    beta: Dirichlet concentration over the fine labels of a coarse label.
    rng: all randomness.

  Returns:
    [N] int32 site of each example in [0, num_sites), -1 for examples no site holds.
  """
  coarse, fine = np.asarray(coarse), np.asarray(fine)
  if num_sites * examples_per_site > len(fine):
    raise ConfigError("data.num_sites", f"{num_sites} sites x {examples_per_site} examples > "
                      f"{len(fine)} examples; lower data.num_sites")
  if not (alpha > 0 and beta > 0):
    raise ConfigError("data.alpha", f"must be > 0, got {alpha} (beta {beta})")
  parent = hierarchy(coarse, fine, num_coarse, num_fine)
  # Each fine label's examples in a random order: popping the end is a uniform draw without
  # replacement.
  pools = [list(rng.permutation(np.flatnonzero(fine == f))) for f in range(num_fine)]
  left_fine = np.array([len(p) for p in pools], np.int64)
  children = [np.flatnonzero(parent == c) for c in range(num_coarse)]
  left_coarse = np.array([left_fine[ch].sum() for ch in children], np.int64)
  site = np.full(len(fine), -1, np.int32)
  for s in range(num_sites):
    theta = rng.dirichlet(np.full(num_coarse, alpha))
    phi = [rng.dirichlet(np.full(len(ch), beta)) if len(ch) else np.zeros(0)
           for ch in children]
    for _ in range(examples_per_site):
      c = _draw(theta, left_coarse > 0, rng)
      f = children[c][_draw(phi[c], left_fine[children[c]] > 0, rng)]
      site[pools[f].pop()] = s
      left_fine[f] -= 1
      left_coarse[c] -= 1
  return site


def _draw(p: np.ndarray, available: np.ndarray, rng: np.random.Generator) -> int:
  """An index drawn from p restricted to `available` and renormalised.

  If every available label has probability exactly 0 (float underflow of a small-alpha
  Dirichlet draw), the available labels are drawn uniformly.
  """
  weights = np.where(available, p, 0.0)
  total = weights.sum()
  if not total > 0:
    weights, total = available.astype(np.float64), float(available.sum())
  return int(min(np.searchsorted(np.cumsum(weights), rng.random() * total, side="right"),
                 len(weights) - 1))
