"""Partitioners: which training examples each site holds.

`partition(train, data_config, seed)` returns `data.num_sites` sorted int64 index arrays into
`train`, disjoint and together covering every example. Methods (`data.partition`):

- `iid`: a random permutation cut into num_sites near-equal parts.
- `dirichlet`: label skew of Hsu et al. 2019 ("Measuring the effects of non-identical data
  distribution") as implemented by Yurochkin et al. 2019 / NIID-Bench (Li et al. 2022): for
  each class, site proportions p ~ Dir(alpha * 1), zeroed for sites that already hold N / S
  examples, and the class's shuffled examples are cut at cumsum(p). If some site ends with
  fewer than `data.min_examples`, the whole draw is repeated (up to `DIRICHLET_MAX_DRAWS`
  times, from the same generator, so still deterministic); then ConfigError.
- `shards`: McMahan et al. 2017 ("Communication-efficient learning of deep networks from
  decentralized data"): examples sorted by label, cut into num_sites * classes_per_site shards,
  classes_per_site random shards per site. Unlike a plain sort-and-cut, shards are cut within
  each class (a class gets shards in proportion to its size), so no shard straddles two
  classes and every site holds AT MOST classes_per_site classes.
- `by_column`: one site per distinct value of `train.columns[data.column]` (sorted values;
  e.g. the "batch" of a synthetic cell, the donor of a sample). The column sets the number of
  sites: `data.num_sites` is ignored here, and `config.resolve_num_sites` (called by the Experiment)
  overwrites it with the number of distinct values, saying so in the log when they differ. A
  column with one value is a ConfigError naming data.column.
- `quantity_skew`: site sizes min_examples + a share of the rest proportional to lognormal
  weights exp(N(0, quantity_sigma^2)); labels iid.
- `pool`: a synthetic cross-device population of any size (10^6 sites on digits), as pfl and
  Flower simulations build theirs: the examples are shuffled once into a pool and site s holds
  the window pool[(s m + j) mod N], j < m = `data.examples_per_site`. With num_sites * m <= N
  the windows are disjoint (an iid split of equal sizes, leaving the rest unused); beyond, they
  wrap and one example belongs to about num_sites * m / N sites, so only site-level DP (whose
  unit is the site) is allowed on it. Returned as a `PoolSites` (a sequence of the same sorted
  arrays) that also holds the whole [num_sites, m] table, built without a per-site loop.

Determinism: all randomness comes from ONE `np.random.default_rng(seed)` per call, so the same
(train, data_config, seed) always gives the same sites. Runs on the host, once per run.
"""

from typing import Sequence

import numpy as np

from fedjax_lab.errors import ConfigError

PARTITIONS = ("iid", "dirichlet", "shards", "by_column", "quantity_skew", "pool")
DIRICHLET_MAX_DRAWS = 100


def partition(train, data_config, seed: int) -> list[np.ndarray]:
  """Splits the examples of `train` over `data_config.num_sites` sites.

  Args:
    train: a `fedjax_lab.data.sources.Dataset` (uses `y` [N] and `columns`).
    data_config: the `data` sub-config (num_sites, partition, alpha, classes_per_site,
      column, quantity_sigma, min_examples).
    seed: seeds `np.random.default_rng`; same seed, same partition.

  Returns:
    num_sites int64 arrays of indices into train, each sorted; disjoint; union = range(N).

  Raises:
    ConfigError: unknown partition, bad parameters, or a partition that cannot give every
      site `data.min_examples` examples.
  """
  y = np.asarray(train.y)
  num_examples = len(y)
  min_examples = data_config.min_examples
  method = data_config.partition
  if method not in PARTITIONS:
    raise ConfigError("data.partition", f"unknown '{method}'; allowed: {', '.join(PARTITIONS)}")
  num_sites = (column_num_sites(train, data_config.column) if method == "by_column"
               else data_config.num_sites)
  if int(num_sites) != num_sites or num_sites <= 0:
    raise ConfigError("data.num_sites", f"must be a positive integer, got {num_sites}")
  if method == "pool":
    return _pool(num_examples, num_sites, data_config.examples_per_site,
                 np.random.default_rng(seed))
  if num_sites > num_examples:
    raise ConfigError("data.num_sites", f"{num_sites} sites but only {num_examples} training "
                      f"examples in {train.name}; use at most {num_examples}")
  if int(min_examples) != min_examples or min_examples < 1:
    raise ConfigError("data.min_examples", f"must be an integer >= 1, got {min_examples}")
  if num_sites * min_examples > num_examples:
    raise ConfigError("data.min_examples", f"data.num_sites={num_sites} x data.min_examples="
                      f"{min_examples} > {num_examples} training examples; lower either")
  rng = np.random.default_rng(seed)
  if method == "iid":
    sites = _iid(num_examples, num_sites, rng)
  elif method == "dirichlet":
    sites = _dirichlet(y, num_sites, data_config.alpha, min_examples, rng)
  elif method == "shards":
    sites = _shards(y, num_sites, data_config.classes_per_site, train.num_classes, rng)
  elif method == "by_column":
    sites = _by_column(train, data_config.column)
  else:
    sites = _quantity_skew(num_examples, num_sites, data_config.quantity_sigma, min_examples,
                           rng)
  sites = [np.sort(np.asarray(s, np.int64)) for s in sites]
  smallest = min(len(s) for s in sites)
  if smallest < min_examples:
    raise ConfigError("data.min_examples", f"partition '{method}' gave a site only {smallest} "
                      f"examples < data.min_examples={min_examples}; lower data.num_sites="
                      f"{num_sites} or data.min_examples{_fix_hint(method)}")
  return sites


def label_histogram(y: np.ndarray, sites: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
  """Example counts per site and label.

  Args:
    y: [N] int labels in [0, num_classes).
    sites: per-site index arrays into y.
    num_classes: number of columns.

  Returns:
    [num_sites, num_classes] int64 counts.
  """
  y = np.asarray(y)
  return np.stack([np.bincount(y[s], minlength=num_classes)[:num_classes] for s in sites]
                  ).astype(np.int64).reshape(len(sites), num_classes)


class PoolSites(Sequence):
  """The `pool` partition: site s's sorted rows are `table[s]` ([num_sites, m] int32)."""

  def __init__(self, table: np.ndarray):
    self.table = table

  def __len__(self) -> int:
    return self.table.shape[0]

  def __getitem__(self, s: int) -> np.ndarray:
    return self.table[s].astype(np.int64)


def _pool(num_examples: int, num_sites: int, m, rng: np.random.Generator) -> PoolSites:
  if int(m) != m or not 1 <= m <= num_examples:
    raise ConfigError("data.examples_per_site", f"must be an integer in [1, {num_examples}] "
                      f"(the training examples), got {m}")
  pool = rng.permutation(num_examples).astype(np.int32)
  # int64 positions: num_sites * m overflows int32 beyond 2^31 (10^8 sites of 20).
  start = np.arange(num_sites, dtype=np.int64)[:, None] * m
  return PoolSites(np.sort(pool[(start + np.arange(m)) % num_examples], axis=1))


def _fix_hint(method: str) -> str:
  return {"dirichlet": ", or raise data.alpha (less skew)",
          "shards": ", or lower data.classes_per_site",
          "by_column": ", or choose another data.column",
          "quantity_skew": ", or lower data.quantity_sigma"}.get(method, "")


def _iid(num_examples: int, num_sites: int, rng: np.random.Generator) -> list[np.ndarray]:
  return np.array_split(rng.permutation(num_examples), num_sites)


def _dirichlet(y: np.ndarray, num_sites: int, alpha: float, min_examples: int,
               rng: np.random.Generator) -> list[np.ndarray]:
  """Hsu et al. 2019 label skew with the Yurochkin et al. 2019 size cap; see module doc."""
  if not alpha > 0:
    raise ConfigError("data.alpha", f"must be > 0, got {alpha} (small = more label skew, "
                      "e.g. 0.1; large = near iid, e.g. 100)")
  num_examples = len(y)
  classes = np.unique(y)
  for _ in range(DIRICHLET_MAX_DRAWS):
    sizes = np.zeros(num_sites, np.int64)
    parts = [[] for _ in range(num_sites)]
    for c in classes:
      members = rng.permutation(np.flatnonzero(y == c))
      p = rng.dirichlet(np.full(num_sites, alpha))
      # The cap stops a few sites from soaking up most of the data at small alpha.
      capped = p * (sizes < num_examples / num_sites)
      p = capped / capped.sum() if capped.sum() > 0 else p
      cuts = (np.cumsum(p) * len(members)).astype(np.int64)[:-1]
      for s, chunk in enumerate(np.split(members, cuts)):
        parts[s].append(chunk)
        sizes[s] += len(chunk)
    if sizes.min() >= min_examples:
      return [np.concatenate(p) for p in parts]
  raise ConfigError("data.min_examples", f"{DIRICHLET_MAX_DRAWS} Dirichlet draws (alpha="
                    f"{alpha}) all left a site with fewer than data.min_examples="
                    f"{min_examples} examples; raise data.alpha, or lower data.num_sites="
                    f"{num_sites} or data.min_examples")


def _shard_counts(class_sizes: np.ndarray, num_shards: int) -> np.ndarray:
  """Shards per class: proportional to size (largest remainder), each in [1, class size]."""
  target = num_shards * class_sizes / class_sizes.sum()
  counts = np.clip(np.floor(target).astype(np.int64), 1, class_sizes)
  while counts.sum() < num_shards:
    room = np.where(counts < class_sizes, target - counts, -np.inf)
    counts[np.argmax(room)] += 1
  while counts.sum() > num_shards:
    spare = np.where(counts > 1, target - counts, np.inf)
    counts[np.argmin(spare)] -= 1
  return counts


def _shards(y: np.ndarray, num_sites: int, classes_per_site: int, num_classes: int,
            rng: np.random.Generator) -> list[np.ndarray]:
  """McMahan et al. 2017 pathological non-iid shards, cut within classes; see module doc."""
  classes, class_sizes = np.unique(y, return_counts=True)
  if int(classes_per_site) != classes_per_site or not 1 <= classes_per_site <= num_classes:
    raise ConfigError("data.classes_per_site", f"must be an integer in [1, {num_classes}] "
                      f"(num_classes), got {classes_per_site}")
  num_shards = num_sites * classes_per_site
  if num_shards < len(classes):
    raise ConfigError("data.classes_per_site", f"data.num_sites={num_sites} x "
                      f"classes_per_site={classes_per_site} = {num_shards} shards cannot hold "
                      f"all {len(classes)} classes; raise data.num_sites or "
                      "data.classes_per_site")
  if num_shards > len(y):
    raise ConfigError("data.classes_per_site", f"{num_shards} shards (data.num_sites x "
                      f"classes_per_site) > {len(y)} examples; lower data.num_sites or "
                      "data.classes_per_site")
  shards = []
  for c, count in zip(classes, _shard_counts(class_sizes, num_shards)):
    shards += np.array_split(rng.permutation(np.flatnonzero(y == c)), count)
  order = rng.permutation(num_shards)
  return [np.concatenate([shards[i] for i in order[s::num_sites]]) for s in range(num_sites)]


def column_num_sites(train, column: str) -> int:
  """The number of sites of a by_column partition: distinct values of train.columns[column].

  Raises ConfigError naming data.column if it is not a column or holds a single value.
  """
  if column not in train.columns:
    available = ", ".join(train.columns) or f"none ({train.name} has no columns)"
    raise ConfigError("data.column", f"'{column}' is not a column of {train.name}; "
                      f"available: {available}")
  values = np.unique(np.asarray(train.columns[column]))
  if len(values) < 2:
    only = values[0] if len(values) else "none"
    raise ConfigError("data.column", f"'{column}' holds one value ({only}) "
                      f"in the {len(train)} training examples of {train.name}, so "
                      "data.partition=by_column would make one site; choose a column with "
                      "at least 2 values or another data.partition")
  return len(values)


def _by_column(train, column: str) -> list[np.ndarray]:
  values, inverse = np.unique(np.asarray(train.columns[column]), return_inverse=True)
  order = np.argsort(inverse, kind="stable")
  return np.split(order, np.cumsum(np.bincount(inverse, minlength=len(values)))[:-1])


def _quantity_skew(num_examples: int, num_sites: int, sigma: float, min_examples: int,
                   rng: np.random.Generator) -> list[np.ndarray]:
  if not sigma >= 0:
    raise ConfigError("data.quantity_sigma", f"must be >= 0, got {sigma} (0 = equal sizes)")
  weights = rng.lognormal(0.0, sigma, size=num_sites)
  spare = num_examples - num_sites * min_examples
  target = spare * weights / weights.sum()
  extra = np.floor(target).astype(np.int64)
  # Largest remainders get the leftover examples, so sizes sum to N exactly.
  extra[np.argsort(-(target - extra), kind="stable")[:spare - extra.sum()]] += 1
  sizes = min_examples + extra
  return np.split(rng.permutation(num_examples), np.cumsum(sizes)[:-1])
