"""The `--config` flag of the lab's commands (train.py, python -m fedjax_lab.data.histogram).

    CONFIG = cli.define_config_flag()        # at import time, before absl parses argv
    app.run(main, flags_parser=cli.parse_flags)
    config, path = cli.load_config(CONFIG)    # inside main

Every way a config can be wrong ends the same way: one line `config error: KEY: PROBLEM` on
stderr and exit code 2, before anything compiles: an unknown --config key (with the keys
allowed beside it), a badly typed value, a config file that does not load.
"""

import ast
import logging
import os
import sys

from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from fedjax_lab import config as config_lib
from fedjax_lab import runs
from fedjax_lab.errors import ConfigError

ROOT = runs.ROOT
CONFIGS = runs.CONFIGS  # configs/ of the checkout, or of the installed package
DEFAULT_CONFIG = runs.DEFAULT_CONFIG

_optimizer_args = []  # (side, name, value) taken out of argv by define_config_flag
_default_config = [DEFAULT_CONFIG]  # the --config of the command, when argv gives none
_made_dirs = []  # folders make_workdir created, deepest first: fail removes them if empty

# numexpr (pulled in through pandas) announces its thread count at INFO when it is imported,
# which absl prints: a config error would no longer be the one line on stderr.
logging.getLogger("numexpr").setLevel(logging.WARNING)


def fail(message: str):
  """Prints `config error: MESSAGE` and exits 2; a workdir this command created and left
  empty goes too, so a rejected config leaves nothing behind."""
  for path in _made_dirs:
    try:
      os.rmdir(path)
    except OSError:  # not empty (a run wrote there) or gone
      break
  print(f"config error: {message}", file=sys.stderr)
  sys.exit(2)


def quiet_logs():
  """Keeps a command's output to its own lines: orbax logs every checkpoint save at INFO,
  and JAX logs at INFO each accelerator backend it tries (`Unable to initialize backend
  'tpu'`) on a machine without one. Call before jax first asks for its devices."""
  absl_logging.set_verbosity(absl_logging.WARNING)
  for name in ("jax._src.xla_bridge", "orbax", "absl"):
    logging.getLogger(name).setLevel(logging.WARNING)


def make_workdir(path: str) -> str:
  """Creates `path` (and missing parents) and checks it is writable, or fails with one line;
  remembers what it created, for `fail`."""
  missing, head = [], os.path.abspath(path)
  while head and not os.path.exists(head):
    missing.append(head)
    head = os.path.dirname(head)
  try:
    os.makedirs(path, exist_ok=True)
    if not os.access(path, os.W_OK):
      raise PermissionError(13, "not writable")
  except OSError as e:
    fail(f"--workdir: cannot write to '{path}' ({e.strerror}); give a writable folder")
  _made_dirs[:] = missing
  return path


def _config_spec(argv) -> str:
  """The --config value of a command line (or the command's default)."""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg[len("--config="):]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return _default_config[0]


def _file_config():
  """The config file's own config (no overrides), or a one-line failure if it does not load."""
  try:
    return runs.load_config_file(_config_spec(sys.argv))
  except ConfigError as e:
    fail(str(e))


def _unknown_key(error):
  """Names the full dotted key of the override that config_flags could not find."""
  # ml_collections raises KeyError("'clients'\nDid you mean ...") or an AttributeError
  # wrapping one; the leaf name is the first line of the innermost message.
  while error.args and isinstance(error.args[0], BaseException):
    error = error.args[0]
  message = str(error.args[0]) if error.args else str(error)
  leaf = message.splitlines()[0].strip("\"' ")
  keys = [a.split("=")[0][len("--config."):] for a in sys.argv if a.startswith("--config.")]
  key = next((k for k in keys if k == leaf or k.endswith("." + leaf)), leaf)
  # The keys beside it in the file's own config: an attack config (mia.*, target.*) is not
  # the lab's default_config.
  fail(str(config_lib.unknown_key(key, _file_config())))


def _take_optimizer_args(argv):
  """Removes --config.{client,server}.optimizer_args.<name>=<value> from argv; returns them.

  Those dicts are free-form (their names depend on the optimizer, which make_optimizer checks),
  and config_flags only overrides keys that already exist, so load_config sets them itself.
  """
  taken, rest, args = [], [], iter(argv)
  for arg in args:
    side = next((s for s in ("client", "server")
                 if arg.startswith(f"--config.{s}.optimizer_args.")), None)
    if side is None:
      rest.append(arg)
      continue
    name, eq, value = arg[len(f"--config.{side}.optimizer_args."):].partition("=")
    taken.append((side, name, value if eq else next(args, "")))
  return rest, taken


def _resolve_config_arg(argv):
  """argv with its --config value resolved by runs.resolve_config_spec (the bundled copy of
  configs/x.py when the command runs outside the checkout)."""
  out = list(argv)
  for i, arg in enumerate(out):
    if arg.startswith("--config="):
      out[i] = "--config=" + runs.resolve_config_spec(arg[len("--config="):])
    elif arg == "--config" and i + 1 < len(out):
      out[i + 1] = runs.resolve_config_spec(out[i + 1])
  return out


def _literal(value: str):
  try:
    return ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return value  # a bare string, e.g. a schedule name


def define_config_flag(default: str = DEFAULT_CONFIG):
  """Defines --config (an ml_collections config file, overridable key by key)."""
  sys.argv, taken = _take_optimizer_args(_resolve_config_arg(sys.argv))
  _optimizer_args.extend(taken)
  _default_config[0] = default
  try:
    # config_flags applies --config.<key>=value overrides as soon as the flag is defined.
    holder = config_flags.DEFINE_config_file(
        "config", default, "Experiment config file (configs/*.py[:arg]); override any key "
        "with --config.<key>=<value>.",
        lock_config=True)
  except (AttributeError, KeyError) as e:
    _unknown_key(e)
  # --help lists the flags of the script being run (argv[0]); --config is one of them.
  flags.FLAGS.register_flag_by_module(sys.argv[0], flags.FLAGS["config"])
  return holder


def parse_flags(argv):
  """absl's flags_parser, with config errors as one line and exit code 2."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    _unknown_key(e)
  except (flags.Error, ValueError, TypeError) as e:  # a badly typed value
    if "Error whilst parsing config file" in str(e):
      # ml_collections puts the config's own message (e.g. the valid `:arguments`) at the
      # end of a traceback; loading the file again raises it as a ConfigError.
      _file_config()
    fail(str(e).splitlines()[0])


def validate_target(config):
  """An attack config's `target` (the lab config it attacks) checked as train.py checks a
  config, or one line naming the key as target.KEY."""
  try:
    config_lib.validate(config.target)
  except ConfigError as e:
    fail(f"target.{e}")


def load_config(config_flag):
  """(the config with every override applied, the config file's path)."""
  path = flags.FLAGS["config"].config_filename
  try:
    config = config_flag.value
    config.keys()  # config_flags defers a load failure until first use
  except (OSError, AttributeError):
    fail(f"--config: cannot load '{path}'; give a file like configs/digits_fedavg.py")
  with config.unlocked():
    for side, name, value in _optimizer_args:
      config[side].optimizer_args[name] = _literal(value)
  return config, path
