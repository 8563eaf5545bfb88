r"""Prints and plots the per-site label histogram of a config's partition.

  python -m fedjax_lab.data.histogram [--config configs/X.py] \
      [--config.data.alpha=0.1] [--out hist.png]

Loads `config.data` exactly as a run would, partitions train with `config.seed`, prints one
row per site (counts per class and the site total, then a `total` row; the table's grand
total is the number of training examples) and saves a sites x classes heatmap to `--out`.
`--config` defaults to train.py's (configs/digits_fedavg.py). A bad config prints
`config error: KEY: PROBLEM` and exits with code 2, as train.py does (fedjax_lab/cli.py).
"""

import os
import sys
from typing import Sequence

from absl import app
from absl import flags
from absl import logging as absl_logging
import numpy as np

from fedjax_lab import cli
from fedjax_lab.data import partition as partition_lib
from fedjax_lab.data import sources
from fedjax_lab.errors import ConfigError

_CONFIG = cli.define_config_flag()
_OUT = flags.DEFINE_string("out", "hist.png", "Where to save the heatmap PNG.")


def format_table(hist: np.ndarray, class_names: Sequence[str] = ()) -> str:
  """[sites, classes] counts -> a fixed-width text table with site and class totals."""
  num_sites, num_classes = hist.shape
  names = list(class_names) if len(class_names) == num_classes else [
      str(k) for k in range(num_classes)]
  header = ["site"] + names + ["total"]
  rows = [[str(s)] + [str(v) for v in hist[s]] + [str(hist[s].sum())]
          for s in range(num_sites)]
  rows.append(["total"] + [str(v) for v in hist.sum(0)] + [str(hist.sum())])
  widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
  line = lambda r: "  ".join(c.rjust(w) for c, w in zip(r, widths))
  return "\n".join([line(header)] + [line(r) for r in rows])


def save_heatmap(hist: np.ndarray, path: str, class_names: Sequence[str] = (),
                 title: str = "") -> None:
  """Saves [sites, classes] counts as a heatmap PNG (sites down, classes across)."""
  import matplotlib  # optional: pyplot is slow to import and only the plots need it
  matplotlib.use("Agg")  # Headless: no display on servers.
  import matplotlib.pyplot as plt  # optional: as matplotlib above
  num_sites, num_classes = hist.shape
  fig, ax = plt.subplots(
      figsize=(max(4.0, 0.4 * num_classes + 2), min(12.0, 2.5 + 0.12 * num_sites)))
  image = ax.imshow(hist, aspect="auto", interpolation="nearest", cmap="viridis")
  fig.colorbar(image, ax=ax, label="examples")
  ax.set_xlabel("class")
  ax.set_ylabel("site")
  if class_names and len(class_names) == num_classes and num_classes <= 30:
    ax.set_xticks(range(num_classes), class_names, rotation=90)
  ax.set_title(title)
  # bbox "tight" grows the canvas to fit long rotated class names; tight_layout cannot.
  fig.savefig(path, dpi=100, bbox_inches="tight")
  plt.close(fig)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Libraries' INFO lines (e.g. numexpr's thread count, logged when pandas loads) would
  # break the one-line config errors on stderr; train.py does the same.
  absl_logging.set_verbosity(absl_logging.WARNING)
  config, _ = cli.load_config(_CONFIG)
  try:
    train, _ = sources.load_dataset(config.data)
    sites = partition_lib.partition(train, config.data, int(config.get("seed", 0)))
  except ConfigError as e:
    cli.fail(str(e))
  hist = partition_lib.label_histogram(train.y, sites, train.num_classes)
  print(format_table(hist, train.class_names))
  title = (f"{config.data.name}: {config.data.partition}, {len(sites)} sites")
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  save_heatmap(hist, _OUT.value, train.class_names, title)
  print(f"saved {_OUT.value}", file=sys.stderr)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
