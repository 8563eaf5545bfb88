"""The lab as an installable package: no import-time side effects, no import-path edits."""

import json
import os
import pathlib
import re
import subprocess
import sys
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _python(code, **env):
  clean = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "FEDJAX_LAB_CPU_DEVICES")}
  return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**clean, **env},
                        capture_output=True, text=True, check=True).stdout.strip()


def test_importing_the_lab_leaves_xla_flags_alone_and_setup_is_explicit():
  assert _python("import os, fedjax_lab.experiment; print(os.environ.get('XLA_FLAGS'))") == "None"
  flags = _python("import os, fedjax_lab; print(fedjax_lab.setup_cpu_devices(), "
                  "os.environ['XLA_FLAGS'])", FEDJAX_LAB_CPU_DEVICES="3")
  assert flags.startswith("True") and "xla_force_host_platform_device_count=3" in flags
  late = _python("import jax, fedjax_lab; print(fedjax_lab.setup_cpu_devices())",
                 FEDJAX_LAB_CPU_DEVICES="3")
  assert late == "False"  # jax already imported: too late, nothing changed


def test_no_sys_path_edits_in_tests_benchmarks_or_notebooks():
  files = [*ROOT.glob("tests/*.py"), *ROOT.glob("benchmarks/*.py"),
           *ROOT.glob("notebooks/*.ipynb"), ROOT / "train.py"]
  needle = "sys." + "path"  # spelled apart so this file does not match itself
  assert [str(f.relative_to(ROOT)) for f in files if needle in f.read_text()] == []


def test_pyproject_declares_the_package_and_its_bundled_data():
  text = (ROOT / "pyproject.toml").read_text()
  assert '"bundled/*"' in text
  setup = (ROOT / "setup.py").read_text()
  assert 'find_packages(include=["fedjax_lab*"])' in setup and '"fedjax_lab.configs": "configs"' in setup
  assert (ROOT / "requirements.txt").read_text().splitlines()[-1] == "-e ."


def _requirement(line):
  """'jax==0.10.2   # why' -> ('jax', '==0.10.2'); names normalised as pip does."""
  spec = line.split("#")[0].strip().strip('"\',')
  name = re.split(r"[=<>\[ ]", spec, maxsplit=1)[0]
  return name.lower().replace("_", "-"), spec[len(name):].split("]")[-1]


def test_pyproject_declares_every_runtime_requirement_with_its_pin():
  """requirements.txt's runtime section (above `# Tests and notebooks`) is the pinned set the
  README installs; `pip install .` must get the same packages and pins (dependencies or an
  extra: scikit-survival is optional, see pyproject.toml)."""
  runtime = (ROOT / "requirements.txt").read_text().split("# Tests and notebooks")[0]
  wanted = dict(_requirement(l) for l in runtime.splitlines()
                if l.strip() and not l.lstrip().startswith("#"))
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  declared = dict(_requirement(d) for d in project["dependencies"])
  for extra in project["optional-dependencies"].values():
    declared.update(_requirement(d) for d in extra)
  assert {k: declared.get(k) for k in wanted} == wanted
  assert project["scripts"]["fedjax-lab"] == "fedjax_lab.train:console_main"


def test_config_paths_resolve_to_the_bundled_configs_outside_the_checkout(tmp_path):
  from fedjax_lab import runs
  os.chdir(tmp_path)  # pytest's tmp_path: no configs/ here
  try:
    assert runs.resolve_config_spec("configs/digits_dp.py:example") == os.path.join(
        runs.CONFIGS, "digits_dp.py") + ":example"
    assert runs.resolve_config_spec("configs/no_such.py") == "configs/no_such.py"
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "digits_dp.py").write_text("")  # the user's own file wins
    assert runs.resolve_config_spec("configs/digits_dp.py") == "configs/digits_dp.py"
  finally:
    os.chdir(ROOT)


@pytest.mark.slow
def test_built_package_trains_from_another_folder_with_its_own_configs(tmp_path):
  """The package as setup.py builds it (setuptools' build_py: what a wheel holds), imported
  from a folder without the checkout: configs/ is inside it and `fedjax-lab`'s entry point
  trains a bundled config. (A fresh venv with `pip install .` needs the package index; this
  checks the same layout offline.)"""
  lib = tmp_path / "lib"
  subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(lib)],
                 cwd=ROOT, check=True, capture_output=True)
  assert (lib / "fedjax_lab" / "configs" / "digits_fedavg.py").is_file()
  assert (lib / "fedjax_lab" / "data" / "bundled").is_dir()
  run = tmp_path / "run"
  run.mkdir()
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env["PYTHONPATH"] = str(lib)
  code = ("import sys; sys.argv = ['fedjax-lab', '--config', 'configs/digits_dp.py:example', "
          "'--config.rounds=1', '--workdir', 'out']; "  # argv first: flags parse at import
          "from fedjax_lab.train import console_main; console_main()")
  out = subprocess.run([sys.executable, "-c", code], cwd=run, env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  summary = json.loads((run / "out" / "summary.json").read_text())
  assert summary["rounds_completed"] == 1 and summary["epsilon"] > 0
  assert json.loads((run / "out" / "run.json").read_text())["config"]["dp.level"] == "example"
