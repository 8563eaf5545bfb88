r"""Trains one federated experiment from a config (`fedjax-lab` once installed; train.py).

  python train.py                   # configs/digits_fedavg.py, workdir runs/digits_fedavg-<hash>
  python train.py --config configs/pbmc_celltype.py --workdir /tmp/pbmc --config.rounds=20

Writes WORKDIR/run.json, metrics.jsonl, summary.json, TensorBoard events and checkpoints.
Without --workdir the workdir names the configuration (fedjax_lab/runs.py), so another seed,
`:argument` or override trains in its own; running the same command again resumes from the
last checkpoint, and a workdir holding another config is refused. A bad config exits with
code 2 and one line.
"""

import json
import logging
import sys

import fedjax_lab

# This module is the command (`fedjax-lab`, whose entry point imports it): the device layout
# before anything imports jax; a process that has imported jax already keeps its devices.
fedjax_lab.setup_cpu_devices()

from absl import app, flags  # noqa: E402
import jax  # noqa: E402

from fedjax_lab import cli, divergence, runs, sharding  # noqa: E402
from fedjax_lab.attacks import canaries  # noqa: E402
from fedjax_lab.errors import ConfigError  # noqa: E402
from fedjax_lab.experiment import Experiment  # noqa: E402

_CONFIG = cli.define_config_flag()
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Output directory (default runs/<config file>-<:arg>-<overrides>-<hash of "
    "the config>).")


def main(argv):
  del argv
  cli.quiet_logs()
  try:  # one process per host: every process runs this same command (docs/running.md, multi-host)
    sharding.initialize_distributed()
  except ValueError as e:
    cli.fail(str(e))
  primary = jax.process_index() == 0
  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(logging.Formatter("fedjax_lab: %(message)s"))
  lab_log = logging.getLogger("fedjax_lab")
  lab_log.addHandler(handler)
  lab_log.setLevel(logging.INFO if primary else logging.WARNING)
  lab_log.propagate = False
  config, config_spec = cli.load_config(_CONFIG)
  try:
    workdir = _WORKDIR.value or runs.default_workdir(
        config_spec, config, runs.load_config_file(config_spec))
  except ConfigError as e:
    cli.fail(str(e))
  cli.make_workdir(workdir)  # before anything loads or compiles
  try:
    runs.check_resume(workdir, config)  # Experiment.run checks too; here before data loads
    experiment = Experiment(config)
  except ConfigError as e:
    cli.fail(str(e))
  try:
    summary = experiment.run(workdir)
  except ConfigError as e:  # e.g. a checkpoint in workdir trained with another privacy plan
    cli.fail(str(e))
  except divergence.Diverged as e:  # exit 1: the config ran, the training failed
    print(e, file=sys.stderr)
    sys.exit(1)
  except KeyboardInterrupt as e:
    print(f"\ninterrupted: {e}", file=sys.stderr)
    sys.exit(130)
  if not primary:
    return
  # First: the last two lines stay the test_accuracy line (or the centralized one) and the JSON.
  if "audit" in summary:  # audit.canaries > 0: beside the claim, the estimate and the bound
    print("\n".join(canaries.format_lines(summary["audit"])))
  if summary.get("test_auc") is not None:  # evaluation_robustness.final_metrics
    ci = lambda key: ("" if summary.get(key) is None else
                      " [{:.3f}, {:.3f}]".format(*summary[key]))
    line = (f"federated test_auc={summary['test_auc']:.4f}{ci('test_auc_ci95')} "
            f"macro_f1={summary['test_macro_f1']:.4f}")
    if summary.get("centralized_test_auc") is not None:
      line += (f" vs centralized test_auc={summary['centralized_test_auc']:.4f}"
               f"{ci('centralized_test_auc_ci95')} macro_f1="
               f"{summary['centralized_test_macro_f1']:.4f}")
    print(line + " (95% bootstrap intervals over test examples)")
  eps = summary["epsilon"]
  eps_text = 'none' if eps is None else f'{eps:.3f} delta={config.dp.delta:g}'
  if "test_rmse" in summary:  # a regression task (data.name=synthetic_regression)
    print(f"test_rmse={summary['test_rmse']:.4f} test_r2={summary['test_r2']:.4f} "
          f"epsilon={eps_text} rounds={summary['rounds_completed']} workdir={workdir}")
    print(json.dumps({k: summary[k] for k in ("test_rmse", "test_r2", "epsilon",
                                              "params_sha256")}))
    _check_aborts(config, summary)
    return
  print(f"test_accuracy={summary['test_accuracy']:.4f} "
        f"epsilon={eps_text} "
        f"rounds={summary['rounds_completed']} "
        f"site_accuracy_worst10={summary['site_accuracy_worst10']:.4f} workdir={workdir}")
  if "centralized_test_accuracy" in summary:
    print(f"federated test_accuracy={summary['test_accuracy']:.4f} vs centralized (one site "
          f"holding all data) test_accuracy={summary['centralized_test_accuracy']:.4f}")
  print(json.dumps({k: summary[k] for k in ("test_accuracy", "epsilon", "params_sha256")}))
  _check_aborts(config, summary)


def _check_aborts(config, summary):
  """A secure-aggregation run whose rounds mostly aborted left the model near its
  initialisation, whatever its accuracy line says: exit 1 unless secagg.allow_aborts."""
  aborted = summary.get("secagg", {}).get("aborted_rounds", 0)
  if not aborted:
    return
  n = summary["rounds_completed"]
  line = f"secure aggregation: aborted {aborted} of {n} rounds (too few survivors)"
  if 2 * aborted <= n or config.secagg.allow_aborts:
    print(line, file=sys.stderr)
    return
  print(f"{line}; lower secagg.dropout_rate or secagg.threshold, or set "
        "--config.secagg.allow_aborts=True to accept the run", file=sys.stderr)
  sys.exit(1)


def console_main():
  """The `fedjax-lab` command (pyproject.toml) and `python train.py`."""
  app.run(main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
  console_main()
