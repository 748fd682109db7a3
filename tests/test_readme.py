"""Every command in README.md names an existing script, its flags and fields
(found by tests/readme_shell.py, checked by tests/readme_commands.py), the
README opens with the two set-up commands, and CI runs the test command."""

import os
import re

import pytest

from conftest import REPO_ROOT
from readme_commands import README, FORWARDS, check_command
from readme_shell import (fenced_blocks, logical_lines, command_segments,
                          commands_in, readme_commands)


# -------------------------------------------------------------------- tests


def _readme_text():
  with open(README, encoding="utf-8") as f:
    return f.read()


_COMMANDS = readme_commands(_readme_text())


def test_readme_has_script_commands():
  assert _COMMANDS, "no `python scripts/...` or `bash scripts/...` commands"


@pytest.mark.parametrize("cmd", _COMMANDS, ids=lambda c: f"README:{c.line}")
def test_readme_command(cmd):
  problems = check_command(cmd)
  assert not problems, f"README.md:{cmd.line}: {cmd.text}\n  " + "\n  ".join(
      problems)


def test_readme_paths_exist():
  missing = []
  for n, line in enumerate(_readme_text().splitlines(), 1):
    for match in re.finditer(
        r"(?<![\w/.-])((?:configs|scripts|retro_jax|tests)/[\w./-]*[\w/])",
        line):
      path = match.group(1)
      if not os.path.exists(os.path.join(REPO_ROOT, path)):
        missing.append(f"README.md:{n}: {path} does not exist")
  assert not missing, "\n".join(missing)


def test_readme_opens_with_quickstart_and_tests():
  lines = _readme_text().splitlines()
  blocks = fenced_blocks(lines)
  assert blocks, "README.md has no code block"
  lang, start, body = blocks[0]
  assert lang == "bash", f"README.md:{start - 1}: first code block is " \
                         f"{lang!r}, not bash"
  found = [words for _, text in logical_lines(body, start)
           for words in command_segments(text)]
  assert found == [["bash", "scripts/quickstart.sh"],
                   ["bash", "scripts/run_tests.sh"]], (
                       f"README.md:{start}: the first block must be exactly "
                       f"`bash scripts/quickstart.sh` and `bash "
                       f"scripts/run_tests.sh`; it has {found}")


def test_ci_runs_the_readme_test_command():
  with open(os.path.join(REPO_ROOT, ".ci", "run"), encoding="utf-8") as f:
    ci = commands_in(f.read().splitlines(), 1)
  assert any(c.script == "scripts/run_tests.sh" for c in ci), (
      f".ci/run does not run scripts/run_tests.sh: {ci}")


def test_forwarded_flags_match_the_script():
  # FORWARDS must stay true: launch_tpu.sh shifts its positionals away and
  # passes the rest to the python script.
  for script, (target, positionals) in FORWARDS.items():
    with open(os.path.join(REPO_ROOT, script), encoding="utf-8") as f:
      text = f.read()
    assert f"shift {positionals}" in text and target in text, script


@pytest.mark.parametrize("line, problem", [
    ("python scripts/no_such.py", "no such script"),
    ("python scripts/train.py --workdir=x --nosuch=1", "--nosuch"),
    ("python scripts/train.py --config=configs/retro.py:172m "
     "--config.train.no_field=1", "has no field 'no_field'"),
    ("python scripts/train.py --config.train.steps=ten", "does not parse"),
    ("python scripts/train.py --config=configs/retro.py:172m "
     "--config.model.cca_layers=6", "tuple literal"),
    ("python scripts/train.py --config.model.cca_layers=()", "unquoted"),
    ("python scripts/evaluate.py --workdir=x --step=last", "integer flag"),
    ("python scripts/memory_plan.py --config.train.steps=1", "no such flag"),
    ("bash scripts/quickstart.sh --config.train.steps=300", "accepts only"),
    ("bash scripts/launch_tpu.sh tpu zone v4-8 --config.train.nope=1",
     "has no field 'nope'"),
    ("bash scripts/launch_tpu.sh tpu --config=configs/retro.py",
     "positional"),
])
def test_checker_rejects(line, problem):
  """The checker is not vacuous: each bad command yields the named problem."""
  (cmd,) = commands_in([line], 1)
  problems = check_command(cmd)
  assert any(problem in p for p in problems), problems


def test_checker_accepts():
  text = r"""
  TF_CPP_MIN_LOG_LEVEL=3 .venv/bin/python scripts/train.py \
      --config=configs/retro.py:172m --workdir=gs://BUCKET/runs/172m \
      --config.train.accum_steps=8 --config.model.cca_layers="()" \
      --config.train.steps N -v=1 --alsologtostderr  # a comment
  python scripts/sample.py --workdir=runs/x --noshow_neighbours --prompt='a
  b' 2>&1 && bash scripts/quickstart.sh --steps=600 > log
  gcloud compute tpus tpu-vm list
  """
  found = commands_in(text.splitlines(), 1)
  assert [c.script for c in found] == ["scripts/train.py", "scripts/sample.py",
                                       "scripts/quickstart.sh"]
  assert found[1].args[-1] == "--prompt=a\n  b"
  for cmd in found:
    assert not check_command(cmd), (cmd, check_command(cmd))
