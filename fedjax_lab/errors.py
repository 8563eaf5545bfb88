"""The one error type raised at the boundary (config, data loading).

`train.py` catches it, prints its message as ONE line and exits with code 2, before
anything is compiled. Messages name the config key (or file) and the fix, e.g.
`ConfigError("data.alpha", "must be > 0, got -1.0")` prints
`config error: data.alpha: must be > 0, got -1.0`.
"""


class ConfigError(ValueError):
  """A bad config value, data file or data set; `key` names what to fix."""

  def __init__(self, key: str, problem: str):
    self.key = key
    self.problem = problem
    super().__init__(f"{key}: {problem}")
