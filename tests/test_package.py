"""The lab as an installable package: no import-time side effects, no import-path edits."""

import os
import pathlib
import subprocess
import sys

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
  assert 'include = ["fedjax_lab*"]' in text and '"bundled/*"' in text
  assert (ROOT / "requirements.txt").read_text().splitlines()[-1] == "-e ."
