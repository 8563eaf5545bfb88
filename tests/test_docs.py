"""The documentation's commands and links: the `python train.py ...` commands of README.md and
docs/*.md, run as written (a few rounds each) from a fresh folder: each exits 0, prints its final
line, and ends in a workdir of its own, so running them top to bottom never resumes one
command's run with another's config; every relative link resolves to a file (and heading) of
the repository; the Quick start holds .ci/run's command verbatim."""

import glob
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def doc_paths() -> list[str]:
  """README.md first, then docs/*.md in name order."""
  return [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def docs_text() -> str:
  return "\n".join(open(p).read() for p in doc_paths())


def docs_train_commands() -> list[str]:
  """Single-process `python train.py` lines of the docs' bash blocks, continuations joined
  and comments dropped."""
  commands = []
  for block in re.findall(r"```bash\n(.*?)```", docs_text(), re.S):
    for command in block.replace("\\\n", " ").splitlines():
      command = command.split("  #")[0].strip()
      if command.startswith("python train.py"):
        commands.append(command)
  return commands


def test_the_docs_have_train_commands():
  commands = docs_train_commands()
  assert len(commands) >= 6
  assert any("dopamine_digits.py:coordinated" in c for c in commands)


def _anchors(path: str) -> set[str]:
  """GitHub's heading anchors of a markdown file (fenced code blocks hold no headings)."""
  text = re.sub(r"```.*?```", "", open(path).read(), flags=re.S)
  return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
          for h in re.findall(r"^#+ (.*)$", text, re.M)}


def test_every_relative_link_resolves_to_a_file_and_heading_of_the_repository():
  checked = 0
  for path in doc_paths():
    text = re.sub(r"```.*?```", "", open(path).read(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
      if re.match(r"[a-z]+:", target):
        continue  # a URL: README links only to files in the repository
      file, _, anchor = target.partition("#")
      resolved = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
      assert resolved.startswith(ROOT + os.sep), f"{path}: {target} leaves the repository"
      assert os.path.exists(resolved), f"{os.path.relpath(path, ROOT)}: {target} does not exist"
      if anchor:
        assert anchor in _anchors(resolved), f"{os.path.relpath(path, ROOT)}: no heading #{anchor}"
      checked += 1
  assert checked >= 20


def test_the_quick_start_holds_the_ci_command_verbatim():
  ci = open(os.path.join(ROOT, ".ci", "run")).read().strip().splitlines()[-1]
  readme = open(os.path.join(ROOT, "README.md")).read()
  quick = readme.split("## Quick start")[1].split("\n## ")[0]
  assert ci in quick.splitlines()


@pytest.mark.slow
def test_docs_train_commands_each_end_in_their_own_workdir(tmp_path):
  os.symlink(os.path.join(ROOT, "configs"), tmp_path / "configs")
  # The own-CSV example's patients.csv, written by the docs' own snippet.
  (snippet,) = [b for b in re.findall(r"```python\n(.*?)```", docs_text(), re.S)
                if "patients.csv" in b]
  subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, check=True, timeout=60)
  # Variants a reader is told to run too ("also :central, :parallel"), after :coordinated.
  commands = docs_train_commands()
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
