"""One run, one workdir: the name of a configuration's workdir, and what may resume there.

    base = runs.load_config_file("configs/dopamine_digits.py:central")
    workdir = runs.default_workdir("configs/dopamine_digits.py:central", config, base)
    # runs/dopamine_digits-central-seed=1-3fa9c2d1
    runs.check_resume(workdir, config)   # ConfigError if the workdir holds another config

A workdir's name is readable (the config file, its `:argument`, the keys that differ from
the file's config) and ends in a hash of the run's fingerprint (the resolved config without
the keys a run may change when it resumes, RESUMABLE_KEYS) and its rounds. So two configs
that train differently never share a default workdir, and a workdir resumes only the config
that made it: `run.json`, written when a run starts, holds the fingerprint and the resolved config,
and `check_resume` names the first key that differs.
"""

import hashlib
import importlib.util
import json
import os
import platform
import re
import subprocess
from importlib import metadata

from fedjax_lab.errors import ConfigError

# Keys a workdir's run may change when it resumes; any other key makes another run.
#   rounds            extends a run (fewer than it completed is refused: check_resume)
#   log.*             progress bar and TensorBoard only
#   checkpoint.every, checkpoint.keep   when and how many checkpoints are written
#   eval.every, eval.batch_size         which rounds are evaluated, and in what batches
#   attack.*          what an attack study records or attacks (never how the run trains)
#   secagg.allow_aborts  whether train.py exits 0 when most rounds aborted (not how it trains)
# (A calibrated sigma depends on rounds: Experiment.run refuses a resume whose privacy plan
# differs, so extending a run calibrated to dp.target_epsilon fails there, by design.)
RESUMABLE_KEYS = ("rounds", "log.*", "checkpoint.every", "checkpoint.keep", "eval.every",
                  "eval.batch_size", "attack.*", "secagg.allow_aborts")

RUN_FILE = "run.json"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_HASH_CHARS = 8
_MAX_NAME = 120  # characters of a workdir name before its hash; longer names are cut


def flat_config(config) -> dict:
  """The resolved config as {dotted key: JSON value} (tuples as lists), in config order."""
  out = {}

  def walk(node, prefix):
    for k, v in node.items():
      if isinstance(v, dict):
        walk(v, f"{prefix}{k}.")
      else:
        out[f"{prefix}{k}"] = v
  walk(json.loads(config.to_json_best_effort()), "")
  return out


def resumable(key: str) -> bool:
  return any(key == k or (k.endswith(".*") and key.startswith(k[:-1]))
             for k in RESUMABLE_KEYS)


def identity(flat: dict) -> dict:
  """The keys of a flat config that make a run that run: all but RESUMABLE_KEYS, and under
  data.partition=by_column not data.num_sites, which the column sets when the data loads
  (config.resolve_num_sites), so a config saying otherwise is the same run."""
  derived = ("data.num_sites",) if flat.get("data.partition") == "by_column" else ()
  return {k: v for k, v in flat.items() if not resumable(k) and k not in derived}


def fingerprint(config) -> str:
  """SHA-256 (hex) of the resolved config's identity keys: what makes a run that run."""
  return hashlib.sha256(json.dumps(identity(flat_config(config)), sort_keys=True).encode()
                        ).hexdigest()


def _value(v) -> str:
  return ",".join(map(str, v)) if isinstance(v, list) else str(v)


def overrides(config, base) -> list[str]:
  """`key=value` for every key of `config` that differs from `base` (the config file's own
  config) and changes the run: resumable keys are left out, except rounds (a 100-round run
  is not the 3000-round one, so it gets its own name)."""
  new, old = flat_config(config), flat_config(base)
  return [f"{k}={_value(v)}" for k, v in new.items()
          if old.get(k, object()) != v and (k == "rounds" or not resumable(k))]


def run_name(parts, config) -> str:
  """`part-part-...-<hash>`, each part sanitized for a file system. The hash is of the
  fingerprint and `rounds`, so names differ for any two configs that are different runs,
  even where the readable part is cut short."""
  readable = "-".join(re.sub(r"[^A-Za-z0-9._=+-]+", "_", str(p)).strip("_") for p in parts
                      if str(p))
  readable = readable[:_MAX_NAME].rstrip("-")
  digest = hashlib.sha256(f"{fingerprint(config)} rounds={config.rounds}".encode())
  return "-".join(filter(None, (readable, digest.hexdigest()[:_HASH_CHARS])))


def spec_parts(config_spec: str) -> list[str]:
  """'configs/dopamine_digits.py:central' -> ['dopamine_digits', 'central']."""
  path, _, arg = config_spec.partition(":")
  return [os.path.splitext(os.path.basename(path))[0], arg]


# The lab's config files: configs/ of the checkout, or the copy an installed package carries
# as fedjax_lab/configs (setup.py maps configs/ there), so `--config configs/x.py` works from
# any folder after `pip install .`.
CONFIGS = (os.path.join(ROOT, "configs") if os.path.isdir(os.path.join(ROOT, "configs"))
           else os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs"))
DEFAULT_CONFIG = os.path.join(CONFIGS, "digits_fedavg.py")


def resolve_config_spec(spec: str) -> str:
  """A `--config` value whose file is not there but names one of the lab's configs
  (configs/x.py[:arg], or x.py) -> that bundled file, same :arg; any other value as it is."""
  path, colon, arg = spec.partition(":")
  if not path or os.path.exists(path):
    return spec
  bundled = os.path.join(CONFIGS, os.path.basename(path))
  if os.path.normpath(os.path.dirname(path)) in (".", "configs") and os.path.isfile(bundled):
    return bundled + colon + arg
  return spec


def default_workdir(config_spec: str, config, base, root: str = "runs") -> str:
  """The workdir train.py uses without --workdir: root/<file>-<arg>-<overrides>-<hash>.

  A run on the user's own file (data.name=file) is named after that file instead of
  data.name=file-data.path=...: root/<data file>-<config file, unless the default>-<arg>-
  <other overrides>-<hash>."""
  parts = spec_parts(config_spec) + overrides(config, base)
  data = config.get("data")
  if data is not None and data.get("name") == "file" and data.get("path"):
    path = config_spec.partition(":")[0]
    own = [] if os.path.abspath(path) == DEFAULT_CONFIG else parts[:1]
    parts = ([os.path.splitext(os.path.basename(data.path))[0], *own, parts[1]]
             + [p for p in parts[2:] if not p.startswith(("data.name=", "data.path="))])
  return os.path.join(root, run_name(parts, config))


def load_module(path: str, name: str = "fedjax_lab_config_file"):
  """The Python file at `path` as a module (config files are files, not a package)."""
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config_file(config_spec: str):
  """get_config(arg) of 'path/to/config.py[:arg]', as ml_collections' --config loads it."""
  path, _, arg = config_spec.partition(":")
  try:
    module = load_module(path)
  except (OSError, AttributeError, ImportError, SyntaxError):
    raise ConfigError("--config", f"cannot load '{path}'; give a file like "
                      "configs/digits_fedavg.py") from None
  try:
    return module.get_config(arg) if arg else module.get_config()
  except ValueError as e:  # the configs' own check of their argument
    raise ConfigError("--config", str(e)) from None


def completed_rounds(workdir: str) -> int | None:
  """The last round checkpointed in workdir (orbax names each step's folder by its round)."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return None
  saved = [int(d) for d in os.listdir(directory) if d.isdigit()]
  return max(saved) if saved else None


def check_resume(workdir: str, config) -> None:
  """Raises ConfigError unless `config` may start or resume in `workdir`.

  Refused: a workdir whose run.json has another fingerprint (the first differing key is
  named, old and new value), checkpoints without run.json (written before run.json existed:
  nothing says which config they belong to), and fewer rounds than already completed (the
  summary would report the longer run).
  """
  record, done = read_run(workdir), completed_rounds(workdir)
  if record is None and done is not None:
    raise ConfigError("--workdir", f"{workdir} holds checkpoints but no {RUN_FILE}, so which "
                      "config made them is unknown; use a new workdir")
  if record is not None and record["fingerprint"] != fingerprint(config):
    old, new = identity(record["config"]), identity(flat_config(config))
    key = next((k for k in [*new, *old] if old.get(k) != new.get(k)),
               "--workdir")  # none: a run.json hashed by an older rule
    raise ConfigError(key, f"{workdir} holds a run with {key}={old.get(key)!r}, this config "
                      f"has {key}={new.get(key)!r}; use a new --workdir (or none: the "
                      "default names the config)")
  if done is not None and done > config.rounds:
    raise ConfigError("rounds", f"{workdir} holds a run that completed {done} rounds, more "
                      f"than rounds={config.rounds}; use rounds>={done} to report (or "
                      "extend) it, or a new --workdir for the shorter run")


def read_run(workdir: str) -> dict | None:
  path = os.path.join(workdir, RUN_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def write_run(workdir: str, config) -> None:
  """run.json: the fingerprint and the resolved config of the run (of its last start, whose
  resumable keys may differ from the first's). Written whole, then renamed: the other
  processes of a multi-host run may be reading it."""
  path = os.path.join(workdir, RUN_FILE)
  with open(path + ".tmp", "w") as f:
    json.dump({"fingerprint": fingerprint(config), "config": flat_config(config)}, f, indent=1)
  os.replace(path + ".tmp", path)


def lab_commit() -> str | None:
  """The git commit of this fedjax_lab checkout, or None outside a git checkout."""
  try:
    out = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True,
                         text=True, timeout=10)
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout.strip() if out.returncode == 0 else None


_VERSIONED = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "dp-accounting", "numpy")


def versions() -> dict:
  """Versions of the packages a result depends on (None where one is not installed)."""
  def version(name):
    try:
      return metadata.version(name)
    except metadata.PackageNotFoundError:
      return None
  return {**{name: version(name) for name in _VERSIONED}, "python": platform.python_version()}
