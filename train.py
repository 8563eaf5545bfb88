r"""Trains one federated experiment from a config.

  python train.py                                   # configs/digits_fedavg.py, workdir runs/digits_fedavg
  python train.py --config configs/pbmc_celltype.py --workdir /tmp/pbmc --config.rounds=20

Writes WORKDIR/metrics.jsonl, summary.json, TensorBoard events and checkpoints; running the
same command again resumes from the last checkpoint. A bad config exits with code 2 and one line.
"""

import ast
import json
import logging
import os
import sys

import fedjax_lab  # noqa: F401  (first: it sets up the CPU devices before jax loads)
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_HERE = os.path.dirname(os.path.abspath(__file__))


def _fail(message: str):
  print(f"config error: {message}", file=sys.stderr)
  sys.exit(2)


def _unknown_key(error):
  """Names the full dotted key of the override that config_flags could not find."""
  from fedjax_lab.config import unknown_key
  # ml_collections raises KeyError("'clients'\nDid you mean ...") or an AttributeError
  # wrapping one; the leaf name is the first line of the innermost message.
  while error.args and isinstance(error.args[0], BaseException):
    error = error.args[0]
  message = str(error.args[0]) if error.args else str(error)
  leaf = message.splitlines()[0].strip("\"' ")
  keys = [a.split("=")[0][len("--config."):] for a in sys.argv if a.startswith("--config.")]
  key = next((k for k in keys if k == leaf or k.endswith("." + leaf)), leaf)
  _fail(str(unknown_key(key)))


def _take_optimizer_args(argv):
  """Removes --config.{client,server}.optimizer_args.<name>=<value> from argv; returns them.

  Those dicts are free-form (their names depend on the optimizer, which make_optimizer checks),
  and config_flags only overrides keys that already exist, so train.py sets them itself.
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


def _literal(value: str):
  try:
    return ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return value  # a bare string, e.g. a schedule name


sys.argv, _OPTIMIZER_ARGS = _take_optimizer_args(sys.argv)
try:
  # config_flags applies --config.<key>=value overrides as soon as the flag is defined.
  _CONFIG = config_flags.DEFINE_config_file(
      "config", os.path.join(_HERE, "configs", "digits_fedavg.py"), "Experiment config file.",
      lock_config=True)
except (AttributeError, KeyError) as e:
  _unknown_key(e)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (default runs/<config name>).")


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    _unknown_key(e)
  except (flags.Error, ValueError, TypeError) as e:  # a badly typed value
    _fail(str(e).splitlines()[0])


def main(argv):
  del argv
  import jax
  from fedjax_lab import sharding
  from fedjax_lab.errors import ConfigError
  from fedjax_lab.experiment import Experiment
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
  try:  # one process per host: every process runs this same command (README, multi-host)
    sharding.initialize_distributed()
  except ValueError as e:
    _fail(str(e))
  primary = jax.process_index() == 0
  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(logging.Formatter("fedjax_lab: %(message)s"))
  lab_log = logging.getLogger("fedjax_lab")
  lab_log.addHandler(handler)
  lab_log.setLevel(logging.INFO if primary else logging.WARNING)
  lab_log.propagate = False
  config_path = flags.FLAGS["config"].config_filename
  try:
    config = _CONFIG.value
    config.keys()  # config_flags defers a load failure until first use
  except OSError:
    _fail(f"--config: cannot load '{config_path}'; give a file like configs/digits_fedavg.py")
  with config.unlocked():
    for side, name, value in _OPTIMIZER_ARGS:
      config[side].optimizer_args[name] = _literal(value)
  workdir = _WORKDIR.value or os.path.join(
      "runs", os.path.splitext(os.path.basename(config_path))[0])
  try:
    experiment = Experiment(config)
  except ConfigError as e:
    _fail(str(e))
  try:
    summary = experiment.run(workdir)
  except ConfigError as e:  # e.g. a checkpoint in workdir trained with another privacy plan
    _fail(str(e))
  except KeyboardInterrupt as e:
    print(f"\ninterrupted: {e}", file=sys.stderr)
    sys.exit(130)
  if not primary:
    return
  eps = summary["epsilon"]
  print(f"test_accuracy={summary['test_accuracy']:.4f} "
        f"epsilon={'none' if eps is None else f'{eps:.3f}'} "
        f"rounds={summary['rounds_completed']} "
        f"site_accuracy_worst10={summary['site_accuracy_worst10']:.4f} workdir={workdir}")
  if "centralized_test_accuracy" in summary:
    print(f"federated test_accuracy={summary['test_accuracy']:.4f} vs centralized (one site "
          f"holding all data) test_accuracy={summary['centralized_test_accuracy']:.4f}")
  print(json.dumps({k: summary[k] for k in ("test_accuracy", "epsilon", "params_sha256")}))


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
