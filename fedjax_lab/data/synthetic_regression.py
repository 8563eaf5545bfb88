"""`data.name=synthetic_regression`: a 1-D target function sampled on the host, a regression task.

After the two synthetic functions of FAR's experiments (Zhu & Jerby, arXiv 2402.06104v2, "Sine"
and "Squared Sine"), regenerated here rather than read from the authors' data files (their
sampling range and sizes are not reproduced):

  sine          y = sin(x)
  squared_sine  y = sin(x)^2

x ~ Uniform(-X_RANGE, X_RANGE) (two periods each side), `data.regression.num_examples` examples
from `np.random.default_rng(data.regression.seed)`; the training targets get
`data.regression.noise` * N(0, 1), the test targets are the function itself (test RMSE is the
distance to the true function). A random (unstratified) split with data.test_fraction and
data.split_seed. Dataset.y is float32, num_classes is 1 (the model's one output).

Why this target (issue 18): it ships with the lab (generated, nothing to download), it is large
enough to federate, and its derivatives are known, which is what FAR claims to fit. GSE7390's
survival times were the other candidate: only 51 of its 198 tumours have an observed event
(the other times are censored lower bounds, which a squared error would treat as exact), too
few for a regression study across sites.
"""

import numpy as np

from fedjax_lab.data.dataset import Dataset
from fedjax_lab.errors import ConfigError

NAME = "synthetic_regression"
FUNCTIONS = {"sine": np.sin, "squared_sine": lambda x: np.sin(x) ** 2}
X_RANGE = 2 * np.pi


def load(data_config):
  """(train, test) sources.Dataset pair; registered as data.name='synthetic_regression'."""
  c = data_config.regression
  if c.function not in FUNCTIONS:
    raise ConfigError("data.regression.function", f"unknown '{c.function}'; allowed: "
                      f"{', '.join(FUNCTIONS)}")
  if int(c.num_examples) != c.num_examples or c.num_examples < 4:
    raise ConfigError("data.regression.num_examples", f"must be an integer >= 4, got "
                      f"{c.num_examples}")
  if c.noise < 0:
    raise ConfigError("data.regression.noise", f"must be >= 0, got {c.noise}")
  rng = np.random.default_rng(c.seed)
  x = rng.uniform(-X_RANGE, X_RANGE, (int(c.num_examples), 1))
  f = FUNCTIONS[c.function](x[:, 0])
  order = np.random.default_rng(data_config.split_seed).permutation(len(x))
  n_test = max(1, int(round(len(x) * data_config.test_fraction)))
  test_idx, train_idx = np.sort(order[:n_test]), np.sort(order[n_test:])
  y_train = f[train_idx] + c.noise * rng.standard_normal(len(train_idx))
  make = lambda idx, y: Dataset(x=x[idx].astype(np.float32), y=y.astype(np.float32),
                                num_classes=1, columns={}, name=NAME)
  return make(train_idx, y_train), make(test_idx, f[test_idx])
