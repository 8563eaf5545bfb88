"""The one error type raised at the boundary (config, data loading), and library errors.

`train.py` catches ConfigError, prints its message as ONE line and exits with code 2, before
anything is compiled. Messages name the config key (or file) and the fix, e.g.
`ConfigError("data.alpha", "must be > 0, got -1.0")` prints
`config error: data.alpha: must be > 0, got -1.0`.

Library code (models, optimizers, topologies) knows its arguments, not the config: it raises
ArgumentError (a ValueError) naming the argument, and the config layer, which knows where the
argument came from, turns it into a ConfigError naming the key (`config_keys`).
"""

import contextlib


class ConfigError(ValueError):
  """A bad config value, data file or data set; `key` names what to fix."""

  def __init__(self, key: str, problem: str):
    self.key = key
    self.problem = problem
    super().__init__(f"{key}: {problem}")


class ArgumentError(ValueError):
  """A bad argument of a library function; `argument` names it (a path inside it for a
  nested value, e.g. 'optimizer_args.eps')."""

  def __init__(self, argument: str, problem: str):
    self.argument = argument
    self.problem = problem
    super().__init__(f"{argument}: {problem}")


@contextlib.contextmanager
def config_keys(prefix: str):
  """Re-raises an ArgumentError from inside as ConfigError(f"{prefix}.{argument}"): the
  call site says which config block the arguments came from."""
  try:
    yield
  except ArgumentError as e:
    raise ConfigError(f"{prefix}.{e.argument}", e.problem) from None


def one_of(key: str, value, allowed) -> None:
  """ConfigError naming `key` unless `value` is one of `allowed`."""
  if value not in allowed:
    raise ConfigError(key, f"unknown '{value}'; allowed: {', '.join(map(str, allowed))}")


def positive(key: str, value, integer: bool = False) -> None:
  """ConfigError naming `key` unless `value` is > 0 (and an integer when `integer`)."""
  if value is None or value <= 0 or (integer and int(value) != value):
    kind = "a positive integer" if integer else "> 0"
    raise ConfigError(key, f"must be {kind}, got {value}")
