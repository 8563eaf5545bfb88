"""The README's `python train.py ...` commands, run as written (a few rounds each) from a fresh
folder: each exits 0, prints its final line, and ends in a workdir of its own, so running them
top to bottom never resumes one command's run with another's config."""

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_train_commands() -> list[str]:
  """Single-process `python train.py` lines of the README's bash blocks, continuations joined
  and comments dropped."""
  text = open(os.path.join(ROOT, "README.md")).read()
  commands = []
  for block in re.findall(r"```bash\n(.*?)```", text, re.S):
    for command in block.replace("\\\n", " ").splitlines():
      command = command.split("  #")[0].strip()
      if command.startswith("python train.py"):
        commands.append(command)
  return commands


def test_the_readme_has_train_commands():
  commands = readme_train_commands()
  assert len(commands) >= 6
  assert any(":central" in c or ":coordinated" in c for c in commands)


@pytest.mark.slow
def test_readme_train_commands_each_end_in_their_own_workdir(tmp_path):
  os.symlink(os.path.join(ROOT, "configs"), tmp_path / "configs")
  # The own-CSV example's patients.csv, written by the README's own snippet.
  text = open(os.path.join(ROOT, "README.md")).read()
  (snippet,) = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "patients.csv" in b]
  subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, check=True, timeout=60)
  # Variants a reader is told to run too ("also :central, :parallel"), after :coordinated.
  commands = readme_train_commands()
  commands += [c.replace(":coordinated", ":central") for c in commands if ":coordinated" in c]
  workdirs = {}
  for command in commands:
    argv = command.split()[2:] + ["--config.rounds=2", "--config.log.progress=False",
                                  "--config.log.tensorboard=False"]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *argv],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "XLA_FLAGS": ""})
    assert proc.returncode == 0, f"{command}\n{proc.stderr[-2000:]}"
    final = [l for l in proc.stdout.splitlines()
             if l.startswith(("test_accuracy=", "test_rmse="))]  # regression: test_rmse
    assert final, f"{command}\n{proc.stdout}"
    workdir = final[-1].split("workdir=")[1]
    assert os.path.exists(tmp_path / workdir / "summary.json"), command
    assert workdir not in workdirs, f"{command} reused {workdirs.get(workdir)}'s workdir"
    workdirs[workdir] = command
    if "dopamine_digits.py:central" in command:  # central's run, not :coordinated's resumed
      summary = json.loads((tmp_path / workdir / "summary.json").read_text())
      assert summary["config"]["data"]["num_sites"] == 1
