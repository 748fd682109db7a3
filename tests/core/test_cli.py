"""Entry-point flag parsing (retro_jax.core.cli): a bad config override or
config file is one line on stderr that names it, and exit status 2."""

import sys

import pytest
from ml_collections import config_flags

from retro_jax.core import cli

@pytest.fixture
def flag(request):
  """The name of a config flag of the test's own: absl flags are
  process-wide, and a config flag registers its override flags when it is
  parsed."""
  return f"cli_{request.node.name}"


@pytest.fixture
def config_file(tmp_path):
  path = tmp_path / "run.py"
  path.write_text(
      "import ml_collections\n\n"
      "def get_config():\n"
      "  return ml_collections.ConfigDict(dict(train=dict(steps=10)))\n")
  return str(path)


def _parse(monkeypatch, flag, *argv):
  # As in a script: sys.argv is set when the flag is defined (config_flags
  # reads its overrides from it).
  monkeypatch.setattr(sys, "argv", ["prog", *argv])
  config_flags.DEFINE_config_file(flag, None, "Test config.")
  return cli.parse_flags(["prog", *argv])


def _error(monkeypatch, capsys, flag, *argv):
  with pytest.raises(SystemExit) as exit_info:
    _parse(monkeypatch, flag, *argv)
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1, err
  return err


def test_good_flags_parse(flag, config_file, monkeypatch):
  rest = _parse(monkeypatch, flag, f"--{flag}={config_file}",
                f"--{flag}.train.steps=3", "extra")
  assert rest == ["prog", "extra"]
  from absl import flags  # pylint: disable=g-import-not-at-top
  assert flags.FLAGS[flag].value.train.steps == 3


def test_unknown_field_names_the_flag(flag, config_file, monkeypatch, capsys):
  err = _error(monkeypatch, capsys, flag, f"--{flag}={config_file}",
               f"--{flag}.train.stpes=3")
  assert err.startswith(f"prog: error: --{flag}.train.stpes=3: no such "
                        f"config field (did you mean steps?)")


def test_bad_value_names_the_flag(flag, config_file, monkeypatch, capsys):
  err = _error(monkeypatch, capsys, flag, f"--{flag}={config_file}",
               f"--{flag}.train.steps=many")
  assert f"--{flag}.train.steps=many" in err and "many" in err


def test_missing_config_file_names_it(flag, tmp_path, monkeypatch,
                                      capsys):
  missing = str(tmp_path / "nosuch.py")
  err = _error(monkeypatch, capsys, flag, f"--{flag}={missing}")
  assert "No such file or directory" in err and "nosuch.py" in err
