"""The entry points' errors: a bad flag or bad input is one line.

The scripts read their config with ml_collections' `config_flags`, whose
overrides (`--config.train.steps=10`) are applied while absl parses the
command line. A misspelt field or a value of the wrong type raises there, and
absl shows such errors as a traceback through ml_collections. Passed as
`app.run(main, flags_parser=cli.parse_flags)`, `parse_flags` turns them into
one line that names the flag, and exits with status 2 as absl does for its
own flag errors.

Bad input met while running (a corpus line that is not JSON, a missing file,
a value no setting allows) is a ValueError or OSError that names its cause.
`cli.run(main)` runs a script so that such an error is one line,
"<script>: error: <message>", with exit status 1; `-v 1` (any explicit
--verbosity) shows the whole traceback instead. Anything else is a bug, and
keeps its traceback.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Callable, List, NoReturn, Optional, Sequence, Tuple, Type

from absl import app
from absl import flags

from retro_jax.core import platform


# Errors that report bad input (their message names it), not a bug.
# UnicodeDecodeError is a ValueError; the corpus readers turn it into a
# CorpusError that names the file and line first.
BAD_INPUT: Tuple[Type[BaseException], ...] = (ValueError, OSError)
# A corpus error raised inside TensorFlow's or Beam's workers comes back
# wrapped in their own exception, its message in the wrapper's text.
_WRAPPED_CORPUS_ERROR = re.compile(
    r"\b(?:CorpusError|NoCorpusFiles): ([^\n]+?)(?: \[while running [^\n]*)?$",
    re.MULTILINE)


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


def verbose() -> bool:
  """Whether the command line asked for tracebacks: `-v N`/`--verbosity`."""
  try:
    return bool(flags.FLAGS["verbosity"].present)
  except (KeyError, flags.UnparsedFlagAccessError):
    return False


def asks_verbosity(argv: Sequence[str]) -> bool:
  """`verbose()` before the flags are parsed: -v or --verbosity given."""
  return any(re.match(r"--?(v|verbosity)(=|$)", arg) for arg in argv[1:])


def quiet_tensorflow(argv: Sequence[str] = ()) -> None:
  """Keeps TensorFlow's C++ log lines off stderr unless -v asks.

  Call it before TensorFlow is imported. It sets TensorFlow's C++ log level
  to errors that end the process; the others are a CUDA probe that fails on
  every CPU host, or an op's error, traceback and all, that Python raises
  anyway. JAX's import has already set a default, so a value in the
  environment is overridden.
  """
  if not asks_verbosity(argv or sys.argv):
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"


def quiet_libraries(argv: Sequence[str] = ()) -> None:
  """Keeps TensorFlow's and Beam's log lines off stderr unless -v asks.

  Call it before TensorFlow is imported: `quiet_tensorflow`, then Beam's
  own logger is hidden (a failing step is logged before it is raised, and
  then reported in one line), and Beam imported, whose import warns on the
  root logger that BigQuery's client, unused here, is missing.
  """
  if asks_verbosity(argv or sys.argv):
    return
  quiet_tensorflow(argv)
  logging.getLogger("apache_beam").setLevel(logging.CRITICAL)
  root = logging.getLogger()
  level = root.level
  root.setLevel(logging.ERROR)
  try:
    import apache_beam.io.gcp.internal.clients.bigquery  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    pass
  finally:
    root.setLevel(level)


class BadInput(ValueError):
  """Bad user input whose message is one line naming where and what (the
  corpus readers' CorpusError is one); found even when wrapped by
  TensorFlow or Beam."""


def error_line(error: BaseException,
               also: Tuple[Type[BaseException], ...] = ()) -> Optional[str]:
  """The one-line message of an error that reports bad input, else None.

  Args:
    error: what `main` raised.
    also: more exception types that report bad input in a script (e.g. a
      cache that is not complete).
  """
  seen = set()
  cause: Optional[BaseException] = error
  while cause is not None and id(cause) not in seen:  # A wrapped corpus error.
    seen.add(id(cause))
    if isinstance(cause, BadInput):
      return str(cause)
    cause = cause.__cause__ or cause.__context__
  found = _WRAPPED_CORPUS_ERROR.findall(str(error))
  if found:
    return found[-1].strip()
  if isinstance(error, BAD_INPUT + tuple(also)):
    return _one_line(str(error)) or type(error).__name__
  return None


def fail(message: str, status: int = 1) -> NoReturn:
  """Ends the script: one line "<script>: error: <message>" on stderr."""
  print(f"{sys.argv[0]}: error: {message}", file=sys.stderr, flush=True)
  sys.exit(status)


def reporting_bad_input(main: Callable[[List[str]], None],
                        also: Tuple[Type[BaseException], ...] = ()
                        ) -> Callable[[List[str]], None]:
  """`main`, with bad input (see `error_line`) reported in one line and exit
  status 1, unless `verbose()`: then it raises with its traceback."""

  def checked_main(argv: List[str]) -> None:
    try:
      main(argv)
    except Exception as e:  # pylint: disable=broad-except
      line = error_line(e, also)
      if line is None or verbose():
        raise
      fail(line)

  return checked_main


def run(main: Callable[[List[str]], None],
        also: Tuple[Type[BaseException], ...] = (),
        cpu_without_accelerator: bool = True) -> None:
  """`app.run` for an entry script: flags parsed by `parse_flags` (a bad
  flag is one line, status 2) and bad input in one line (status 1). On a
  host without a TPU or GPU, jax runs on the CPU without probing for TPUs
  (`platform.use_cpu_without_accelerator`)."""
  if cpu_without_accelerator:
    platform.use_cpu_without_accelerator()
  app.run(reporting_bad_input(main, also), flags_parser=parse_flags)
