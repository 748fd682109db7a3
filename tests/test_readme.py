"""Every command in README.md and docs/*.md names an existing script, its
flags and fields (found by tests/readme_shell.py, checked by
tests/readme_commands.py), the README opens with the two set-up commands,
fits on a screen and links every page of docs/, CI runs the test command,
and every reference to a section of docs/design.md names one that exists."""

import os
import re

import pytest

from conftest import REPO_ROOT
from readme_commands import README, FORWARDS, check_command, doc_files
from readme_shell import (fenced_blocks, logical_lines, command_segments,
                          commands_in, readme_commands)

README_MAX_LINES = 200
DESIGN = "docs/design.md"
# Folders whose files the pages may name as paths (checked to exist).
_PATH = re.compile(r"(?<![\w/.-])((?:configs|scripts|benchmarks|tools|"
                   r"retro_jax|tests|docs)/[\w./-]*[\w/])")
# "design.md §3", "design.md, §3" in any case; "§3-§5" counts its first.
_DESIGN_REF = re.compile(r"design\.md\W{0,3}§\s*(\d+)", re.I)


# -------------------------------------------------------------------- tests


def _text(page):
  with open(os.path.join(REPO_ROOT, page), encoding="utf-8") as f:
    return f.read()


def _readme_text():
  return _text("README.md")


_PAGES = doc_files()
_COMMANDS = [(page, cmd) for page in _PAGES
             for cmd in readme_commands(_text(page))]


def test_readme_has_script_commands():
  assert any(page == "README.md" for page, _ in _COMMANDS), (
      "no `python scripts/...` or `bash scripts/...` commands in README.md")


@pytest.mark.parametrize("page, cmd", _COMMANDS,
                         ids=[f"{p}:{c.line}" for p, c in _COMMANDS])
def test_doc_command(page, cmd):
  problems = check_command(cmd)
  assert not problems, f"{page}:{cmd.line}: {cmd.text}\n  " + "\n  ".join(
      problems)


@pytest.mark.parametrize("page", _PAGES)
def test_doc_paths_exist(page):
  missing = []
  for n, line in enumerate(_text(page).splitlines(), 1):
    for match in _PATH.finditer(line):
      path = match.group(1)
      if not os.path.exists(os.path.join(REPO_ROOT, path)):
        missing.append(f"{page}:{n}: {path} does not exist")
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


def test_readme_fits_on_a_screen_and_links_the_docs():
  text = _readme_text()
  lines = text.count("\n")
  assert lines <= README_MAX_LINES, (
      f"README.md has {lines} lines, at most {README_MAX_LINES}: move detail "
      f"into docs/")
  assert 'bash scripts/run_tests.sh -m "not slow"' in text, (
      "README.md names the fast test tier")
  unlinked = [page for page in _PAGES[1:] if f"({page})" not in text]
  assert not unlinked, f"README.md links no [..]({unlinked[0]})"


def _design_sections():
  return {int(m) for m in re.findall(r"^## (\d+)\. ", _text(DESIGN), re.M)}


def test_design_sections_are_numbered_in_order():
  numbers = [int(m) for m in re.findall(r"^## (\d+)\. ", _text(DESIGN), re.M)]
  assert numbers == list(range(1, len(numbers) + 1)), numbers


def _design_references():
  """(file:line, section, text) of every design.md section reference."""
  found = []
  roots = ("retro_jax", "scripts", "benchmarks", "tools", "configs", "tests")
  files = [os.path.join(REPO_ROOT, p) for p in _PAGES]
  for root in roots:
    for folder, _, names in os.walk(os.path.join(REPO_ROOT, root)):
      files += [os.path.join(folder, n) for n in sorted(names)
                if n.endswith((".py", ".sh", ".md"))]
  for path in files:
    if os.path.samefile(path, __file__):
      continue
    with open(path, encoding="utf-8") as f:
      for n, line in enumerate(f, 1):
        for m in _DESIGN_REF.finditer(line):
          found.append((f"{os.path.relpath(path, REPO_ROOT)}:{n}",
                        int(m.group(1)), m.group(0)))
  return found


def test_design_references_point_at_existing_sections():
  sections = _design_sections()
  wrong = [f"{where}: {text}: {DESIGN} has no section {number} (it has "
           f"{sorted(sections)})"
           for where, number, text in _design_references()
           if number not in sections]
  assert not wrong, "\n".join(wrong)


def test_design_references_name_the_file():
  """The design is docs/design.md: references spell its name as it is."""
  wrong = [f"{where}: {text}: write {DESIGN} §..."
           for where, _, text in _design_references()
           if not text.startswith("design.md")]
  assert not wrong, "\n".join(wrong)


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
