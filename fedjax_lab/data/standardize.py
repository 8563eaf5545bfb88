"""Feature standardisation (`data.standardize`), fitted on training data only.

Each feature (axis 0 of x) becomes (x - mean) / std, std the population std (ddof 0); a
feature with std 0 is only centred (divided by 1). Modes:

  none      features as the source gives them.
  global    mean/std of the sites' training examples (after any `holdout:F` public set is
            taken out), applied to the training examples, the test split and the public set.
            The test split never contributes. Without DP only: the statistics are a function
            of every site's private examples, a release that no epsilon covers, so with
            dp.level != none it is a config error.
  per_site  every site standardises its own examples with its own mean/std: a local
            operation, nothing leaves the site. The test split (one shared set, no site) and the
            public set are each standardised with their own statistics. Sound with
            dp.level=site (the unit is the whole site, and the clipped, noised update is still
            a function of that site's data alone); a config error with dp.level=example:
            one example moves its site's mean/std and hence every other example of the site,
            so the per-example clipping bound no longer holds.
  public    mean/std of the public set `optim.public_data` (public by the user's statement),
            applied to everything; needs optim.public_data. Sound at every dp.level.
  auto      (default) none for the bundled and TFDS sources (digits, pbmc68k,
            synthetic_expression, synthetic_regression, tfds:*), whose features are already scaled, so their results
            do not move; for user files (data.name=file): global without DP; under DP public
            if optim.public_data is set, else per_site (dp.level=site) or none
            (dp.level=example).

`resolve(config)` turns the config into (mode, reason) and raises the config errors; it runs
in `config.validate`, before anything loads. `apply(...)` standardises and returns the ONE
line the run logs at start, saying which standardisation, fitted on what.
"""

import dataclasses

import numpy as np

from fedjax_lab.errors import ConfigError

KEY = "data.standardize"
MODES = ("auto", "none", "global", "per_site", "public")
_BUNDLED = ("digits", "pbmc68k", "synthetic_expression", "synthetic_regression",
            "cifar100_pachinko", "emnist62")


def resolve(config) -> tuple[str, str]:
  """(mode, why) for `config.data.standardize`; ConfigError naming data.standardize."""
  mode, dp_level = config.data.standardize, config.dp.level
  has_public = bool(config.optim.public_data)
  if mode not in MODES:
    raise ConfigError(KEY, f"unknown '{mode}'; allowed: {', '.join(MODES)}")
  if mode == "auto":
    name = config.data.name
    if name in _BUNDLED or name.startswith("tfds:"):
      return "none", f"auto: {name} is a bundled/TFDS source, used as it is"
    if dp_level == "none":
      return "global", "auto: user file, no DP"
    if has_public:
      return "public", f"auto: user file, dp.level={dp_level}, optim.public_data set"
    if dp_level == "site":
      return "per_site", "auto: user file, dp.level=site (a site's own statistics are local)"
    return "none", ("auto: user file, dp.level=example: no statistic of private examples is "
                    "covered by the epsilon; set optim.public_data and data.standardize=public "
                    "to standardise with public statistics")
  if mode == "global" and dp_level != "none":
    raise ConfigError(KEY, f"'global' under dp.level={dp_level}: a mean/std over all sites' "
                      "private examples is a release no epsilon covers; allowed with DP: "
                      "none, per_site (dp.level=site), public (needs optim.public_data)")
  if mode == "per_site" and dp_level == "example":
    raise ConfigError(KEY, "'per_site' under dp.level=example: one example moves its site's "
                      "mean/std and so every other example of the site, which per-example "
                      "clipping does not bound; allowed: none, public (needs "
                      "optim.public_data), or dp.level=site")
  if mode == "public" and not has_public:
    raise ConfigError(KEY, "'public' needs optim.public_data (holdout:F, a file or a "
                      "source) to take the statistics from; allowed without it: none, global, "
                      "per_site")
  return mode, "given"


def moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-feature (mean, std) of [N, ...] x over axis 0, float64; std 0 becomes 1."""
  x64 = np.asarray(x, np.float64)
  mean = x64.mean(axis=0)
  std = x64.std(axis=0)
  return mean, np.where(std > 0, std, 1.0)


def _scale(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
  return ((np.asarray(x, np.float64) - mean) / std).astype(x.dtype)


def _own(dataset):
  """A Dataset standardised with its own statistics (none if it is empty)."""
  if dataset is None or len(dataset) == 0:
    return dataset
  return dataclasses.replace(dataset, x=_scale(dataset.x, *moments(dataset.x)))


def apply(config, train, test, sites, public=None):
  """Standardises as `config.data.standardize` says.

  Args:
    config: the full config (data.standardize, dp.level, optim.public_data).
    train: the sites' training examples (a sources.Dataset).
    test: the test split.
    sites: per-site index arrays into train (partition.partition's output).
    public: the public calibration set (optim.public_data) or None.

  Returns:
    (train, test, public, note): standardised copies (the same objects with mode none), and
    the one line for the start log saying which standardisation, fitted on what.
  """
  mode, why = resolve(config)
  fit = {
      "none": "features used as they are",
      "global": f"mean/std fitted on the {len(train)} training examples of all sites "
                "(never the test split), applied to train, test and public",
      "per_site": f"each of the {len(sites)} sites with its own examples' mean/std (local); "
                  "the test split and the public set each with their own",
      "public": f"mean/std fitted on the {0 if public is None else len(public)} public "
                "examples of optim.public_data, applied to train, test and public",
  }[mode]
  note = f"data.standardize={mode} ({why}): {fit}"
  if mode == "none":
    return train, test, public, note
  if mode == "per_site":
    x = np.array(train.x, copy=True)
    for rows in sites:
      if len(rows):
        x[rows] = _scale(train.x[rows], *moments(train.x[rows]))
    smallest = min(len(s) for s in sites)
    if smallest < 2:
      note += f"; WARNING: a site holds {smallest} example(s), whose features all become 0"
    return dataclasses.replace(train, x=x), _own(test), _own(public), note
  mean, std = moments(train.x if mode == "global" else public.x)
  scale = lambda d: None if d is None else dataclasses.replace(d, x=_scale(d.x, mean, std))
  return scale(train), scale(test), scale(public), note
