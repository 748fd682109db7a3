"""Command-line parsing of the entry points: a bad flag is one line.

The scripts read their config with ml_collections' `config_flags`, whose
overrides (`--config.train.steps=10`) are applied while absl parses the
command line. A misspelt field or a value of the wrong type raises there, and
absl shows such errors as a traceback through ml_collections. Passed as
`app.run(main, flags_parser=cli.parse_flags)`, `parse_flags` turns them into
one line that names the flag, and exits with status 2 as absl does for its
own flag errors.
"""

from __future__ import annotations

import re
import sys
from typing import List, Sequence

from absl import flags


def _flag_named(argv: Sequence[str], error: BaseException) -> str:
  """The command-line argument an override error is about, or ''."""
  field = re.search(r"'[\\']*([A-Za-z_]\w*)", str(error))
  for arg in argv[1:]:
    name = arg.split("=", 1)[0]
    if field and name.startswith("--") and name.endswith("." + field[1]):
      return arg
  return ""


def _one_line(message: str) -> str:
  """A message that embeds a traceback, as its first and last lines."""
  lines = [line.strip() for line in message.splitlines() if line.strip()]
  if len(lines) <= 1:
    return message.strip()
  return f"{lines[0].rstrip(':')}: {lines[-1]}"


def _load_config_files() -> None:
  """config_flags loads a config file lazily, on first use of its value, so
  a missing or broken file would otherwise fail inside `main`."""
  for name in list(flags.FLAGS):
    flag = flags.FLAGS[name]
    # The config file flag itself, not its `--config.a.b` override flags.
    if "." not in name and type(flag).__module__.startswith(
        "ml_collections.config_flags"):
      if flag.value is not None:  # None: not given, and no default.
        flag.value.to_dict  # pylint: disable=pointless-statement


def parse_flags(argv: Sequence[str]) -> List[str]:
  """absl's flag parsing, with config override errors as one line."""
  try:
    rest = flags.FLAGS(list(argv))
    _load_config_files()
    return rest
  except (flags.Error, OSError) as e:  # OSError: a config file not loaded.
    message = _one_line(str(e))
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    # AttributeError / KeyError: no such field; TypeError / ValueError: a
    # value the field's type does not take.
    arg = _flag_named(argv, e)
    if isinstance(e, (AttributeError, KeyError)):
      what = "no such config field"
      guess = re.search(r'Did you mean "(\w+)"', str(e))
      what += f" (did you mean {guess[1]}?)" if guess else ""
    else:
      what = f"bad value ({e})"
    message = (f"{arg}: {what}; configs/base.py and configs/eval.py state "
               f"every field" if arg else f"bad flag: {_one_line(str(e))}")
  print(f"{argv[0]}: error: {message}", file=sys.stderr)
  sys.exit(2)
