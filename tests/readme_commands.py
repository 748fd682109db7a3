"""Checks the commands of README.md and docs/*.md (found by
tests/readme_shell.py) against the scripts and config files they name
(tests/test_readme.py). For each one:

  * the script exists;
  * python scripts: every `--flag`, `--flag=value`, `--noflag` (and `-v`) is an
    absl flag the script defines (read from its source with `ast`: scripts are
    never imported, their global FLAGS would collide) or one of absl's own;
    integer / float / enum / bool values parse;
  * `--config.a.b=value` names a field of the config file given by that
    command's `--config=file.py[:arg]` (else the script's default), loaded
    with `get_config(arg)`, and `value` parses to the field's type with the
    parser ml_collections uses (int, float, bool, tuple, str);
  * bash scripts: options match the script's `case` patterns
    (scripts/quickstart.sh); scripts/launch_tpu.sh takes NAME ZONE
    ACCELERATOR and then scripts/train.py flags, checked as above.

Also every `configs/`, `scripts/`, `benchmarks/`, `tools/`, `retro_jax/`,
`tests/` and `docs/` path these pages name exists, the README opens with
exactly the two commands `bash scripts/quickstart.sh` and
`bash scripts/run_tests.sh`, and CI (.ci/run) runs scripts/run_tests.sh. Values that are placeholders (`...`, `N`, `DIR`,
`gs://BUCKET/x` is a plain string, `<text>`, `$VAR`) are not type-checked.
"""

import ast
import dataclasses
import fnmatch
import functools
import importlib.util
import os
import re

from absl import app
from absl import flags
from absl import logging  # pylint: disable=unused-import  (defines -v etc.)
from ml_collections import config_dict
from ml_collections.config_flags import config_path
from ml_collections.config_flags import tuple_parser

from conftest import REPO_ROOT
from readme_shell import PLACEHOLDER

README = os.path.join(REPO_ROOT, "README.md")
DOCS_DIR = os.path.join(REPO_ROOT, "docs")


def doc_files():
  """Repo-relative paths of the pages whose commands are checked."""
  docs = sorted(f"docs/{n}" for n in os.listdir(DOCS_DIR) if n.endswith(
      ".md")) if os.path.isdir(DOCS_DIR) else []
  return ["README.md"] + docs
# scripts/launch_tpu.sh NAME ZONE ACCELERATOR [train flags]: forwarded flags.
FORWARDS = {"scripts/launch_tpu.sh": ("scripts/train.py", 3)}
# Scripts that import another script's flags along with its code.
INCLUDES = {"scripts/gpu_check.py": ("benchmarks/accelerator.py",)}
# absl's special flags, handled by FlagValues itself.
_ABSL_SPECIAL = ("flagfile", "undefok")


# ------------------------------------------------------------- script flags


@dataclasses.dataclass
class FlagSpec:
  kind: str               # DEFINE_<kind>: integer, string, bool, config_file..
  default: object = None  # Literal default, if any (config file path).
  enum_values: tuple = ()
  accept_new_attributes: bool = False


@functools.lru_cache(maxsize=None)
def script_flags(script):
  """{name: FlagSpec} of the absl flags `script` defines (from its source)."""
  with open(os.path.join(REPO_ROOT, script), encoding="utf-8") as f:
    tree = ast.parse(f.read(), script)
  found = {}
  for node in ast.walk(tree):
    if not isinstance(node, ast.Call):
      continue
    func = node.func
    name = getattr(func, "attr", None) or getattr(func, "id", None)
    if not name or not name.startswith("DEFINE_"):
      continue
    kwargs = {k.arg: k.value for k in node.keywords}
    args = list(node.args)
    flag_node = args[0] if args else kwargs.get("name")
    if not isinstance(flag_node, ast.Constant):
      continue

    def literal(pos, key, args=args, kwargs=kwargs):
      """The literal argument at `pos` or keyword `key`; None if not one."""
      value = args[pos] if pos is not None and len(args) > pos else (
          kwargs.get(key))
      try:
        return ast.literal_eval(value) if value is not None else None
      except ValueError:
        return None
    kind = name[len("DEFINE_"):].replace("boolean", "bool")
    spec = FlagSpec(kind, default=literal(1, "default"),
                    enum_values=tuple(literal(2, "enum_values") or ()),
                    accept_new_attributes=literal(
                        None, "accept_new_attributes") is True)
    found[flag_node.value] = spec
    short = kwargs.get("short_name")
    if isinstance(short, ast.Constant):
      found[short.value] = spec
  for other in INCLUDES.get(script, ()):
    found = {**script_flags(other), **found}
  return found


@functools.lru_cache(maxsize=None)
def required_flags(script):
  """Names `script` passes to flags.mark_flag(s)_as_required."""
  with open(os.path.join(REPO_ROOT, script), encoding="utf-8") as f:
    tree = ast.parse(f.read(), script)
  names = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Call) and getattr(node.func, "attr", None) in (
        "mark_flag_as_required", "mark_flags_as_required") and node.args:
      try:
        value = ast.literal_eval(node.args[0])
      except ValueError:
        continue
      names += [value] if isinstance(value, str) else list(value)
  return tuple(names)


@functools.lru_cache(maxsize=None)
def absl_flags():
  """{name or short name: kind} of the flags absl itself always defines."""
  app.define_help_flags()
  found = {name: "string" for name in _ABSL_SPECIAL}
  for module, module_flags in flags.FLAGS.flags_by_module_dict().items():
    if module.startswith("absl."):
      for flag in module_flags:
        kind = "bool" if flag.boolean else "string"
        found[flag.name] = kind
        if flag.short_name:
          found[flag.short_name] = kind
  return found


# ------------------------------------------------------------------ configs


@functools.lru_cache(maxsize=None)
def load_config(spec):
  """The config of `file.py[:arg]` as ml_collections loads it."""
  path, *arg = spec.split(":", 1)
  module_spec = importlib.util.spec_from_file_location(
      "readme_config_" + re.sub(r"\W", "_", path), os.path.join(REPO_ROOT,
                                                               path))
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(*arg)


def _is_placeholder(value):
  return (value is None or PLACEHOLDER in value or "$" in value
          or "..." in value or re.fullmatch(r"[A-Z][A-Z0-9_]*", value))


def _parser_for(field_type):
  """The absl parser ml_collections' config_flags uses for a field type."""
  if field_type is bool:
    return flags.BooleanParser()
  if field_type is int:
    return flags.IntegerParser()
  if field_type is float:
    return flags.FloatParser()
  if field_type is str:
    return flags.ArgumentParser()
  if field_type is tuple:
    return tuple_parser.TupleParser()
  return None


def _missing_field(config, path):
  """Why `path` names no field of `config`, naming the first missing part."""
  node, walked = config, "config"
  for part in path.split("."):
    keys = sorted(node.keys()) if isinstance(node, (dict,
                                                    config_dict.ConfigDict)
                                             ) else []
    if part not in keys:
      return f"{walked} has no field {part!r} (fields: {', '.join(keys)})"
    node, walked = node[part], f"{walked}.{part}"
  return None


def _check_override(flag, path, value, has_value, negated, config, spec):
  """Problems with `--<flag>.<path>[=value]`; None value = no value given."""
  where = f"--{'no' if negated else ''}{flag}.{path}"
  if spec.accept_new_attributes:
    return []
  try:
    field_type = config_path.get_type(path, config)
  except (KeyError, AttributeError, IndexError, ValueError):
    return [f"{where}: {_missing_field(config, path) or 'no such field'}"]
  if isinstance(field_type, type) and issubclass(field_type,
                                                 config_dict.ConfigDict):
    if has_value and not _is_placeholder(value):
      try:
        assert isinstance(ast.literal_eval(value), dict)
      except (ValueError, SyntaxError, AssertionError):
        return [f"{where}={value}: field is a ConfigDict; value is not a "
                "dict literal"]
    return []
  parser = _parser_for(field_type)
  if parser is None:
    return [f"{where}: field of type {field_type.__name__} cannot be set "
            "from the command line by ml_collections"]
  if negated or (not has_value and field_type is bool):
    return ([] if field_type is bool else
            [f"{where}: --[no]{flag}.{path} needs a bool field, this one is "
             f"{field_type.__name__}"])
  if _is_placeholder(value):
    return []
  if field_type is tuple:
    try:
      parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      parsed = None
    if not isinstance(parsed, (tuple, list)):
      return [f"{where}={value}: tuple field; give a tuple literal such as "
              "\"()\" or \"(6, 9)\""]
  try:
    parser.parse(value)
  except (ValueError, TypeError, flags.Error) as e:
    return [f"{where}={value}: {field_type.__name__} field "
            f"(now {config_path.get_value(path, config)!r}); value does not "
            f"parse: {e}"]
  return []


# ------------------------------------------------------------------- checks


def _check_value(name, kind, spec, value):
  if _is_placeholder(value):
    return []
  parsers = {"integer": flags.IntegerParser(), "float": flags.FloatParser(),
             "bool": flags.BooleanParser()}
  if kind in parsers:
    try:
      parsers[kind].parse(value)
    except (ValueError, TypeError, flags.Error) as e:
      return [f"--{name}={value}: {kind} flag; value does not parse: {e}"]
  if kind == "enum" and spec and spec.enum_values and (
      value not in spec.enum_values):
    return [f"--{name}={value}: not one of {list(spec.enum_values)}"]
  return []


def check_python_args(script, args):
  """Problems with absl arguments `args` of python script `script`."""
  own = script_flags(script)
  builtin = absl_flags()
  kinds = {**builtin, **{name: s.kind for name, s in own.items()}}
  config_flags_ = {n: s for n, s in own.items() if s.kind.startswith("config")}
  problems = []

  # Config files first, as ml_collections finds them before the overrides.
  given = {}
  for i, arg in enumerate(args):
    for name in config_flags_:
      match = re.match(rf"^--?{re.escape(name)}(=(.*))?$", arg)
      if match:
        given[name] = (match.group(2) if match.group(1) else
                       (args[i + 1] if i + 1 < len(args) else None))
  configs = {}
  for name, spec in config_flags_.items():
    file_spec = given.get(name, spec.default)
    if spec.kind != "config_file" or not file_spec:
      continue
    if not os.path.isfile(os.path.join(REPO_ROOT, file_spec.split(":")[0])):
      problems.append(f"--{name}={file_spec}: no such config file")
      continue
    try:
      configs[name] = load_config(file_spec)
    except Exception as e:  # pylint: disable=broad-except
      problems.append(f"--{name}={file_spec}: get_config failed: {e!r}")

  overrides, seen = [], set()
  i = 0
  while i < len(args):
    arg = args[i]
    i += 1
    if arg == "--":
      problems += [f"{a}: unexpected positional argument" for a in args[i:]]
      break
    if not arg.startswith("-") or arg == "-":
      problems.append(f"unquoted {arg!r}: a bash syntax error; quote it"
                      if arg in ("(", ")") else
                      f"{arg}: unexpected positional argument (a space in an "
                      "unquoted value?)")
      continue
    name, eq, value = arg.lstrip("-").partition("=")
    has_value = bool(eq)
    prefix, dot, path = name.partition(".")
    negated = (prefix not in config_flags_ and prefix.startswith("no")
               and prefix[2:] in config_flags_)
    if dot and (prefix in config_flags_ or negated):
      flag = prefix[2:] if negated else prefix
      if flag not in configs:
        if config_flags_[flag].kind == "config_file":
          continue            # Its file's problem is reported above.
        problems.append(f"--{name}: cannot check, {flag} is not a config file")
        continue
      config = configs[flag]
      try:
        field_type = config_path.get_type(path, config)
      except (KeyError, AttributeError, IndexError, ValueError):
        field_type = None
      if not has_value and not negated and field_type is not bool:
        value = args[i] if i < len(args) else None
        has_value = value is not None
        i += 1
      problems += _check_override(flag, path, value, has_value, negated,
                                  config, config_flags_[flag])
      overrides.append((flag, path))
      continue
    if name in kinds:
      seen.add(name)
      kind = kinds[name]
      if kind == "bool":
        problems += _check_value(name, kind, None, value) if has_value else []
        continue
      if not has_value:
        value = args[i] if i < len(args) else None
        i += 1
        if value is None:
          problems.append(f"--{name}: needs a value")
          continue
      problems += _check_value(name, kind, own.get(name), value)
      continue
    if name.startswith("no") and kinds.get(name[2:]) == "bool":
      if has_value:
        problems.append(f"--{name}={value}: --no<flag> takes no value")
      continue
    problems.append(f"--{name}: {script} defines no such flag (it has: "
                    f"{', '.join(sorted(n for n in own if len(n) > 1))})")

  if not seen & {"help", "helpshort", "helpfull", "helpxml", "?"}:
    problems += [f"--{name} is required by {script} and not given"
                 for name in required_flags(script) if name not in seen]
  # ml_collections refuses --config.a.b followed by --config.a.
  for j, (flag_a, path_a) in enumerate(overrides):
    for flag_b, path_b in overrides[j + 1:]:
      if flag_a == flag_b and path_a.startswith(path_b + "."):
        problems.append(f"--{flag_b}.{path_b} after --{flag_a}.{path_a} "
                        "overwrites it (ml_collections refuses this order)")
  return problems


def case_patterns(script):
  """Option patterns of the `case` statements of a bash script and of the
  scripts it sources (scripts/quickstart_args.sh)."""
  with open(os.path.join(REPO_ROOT, script), encoding="utf-8") as f:
    text = f.read()
  for sourced in re.findall(r"^\s*(?:source|\.) (scripts/\S+\.sh)", text, re.M):
    with open(os.path.join(REPO_ROOT, sourced), encoding="utf-8") as f:
      text += f.read()
  patterns = []
  for block in re.findall(r"\bcase\b.*?\bin\b(.*?)\besac\b", text, re.S):
    for match in re.finditer(r"^\s*\(?([^()\n]+)\)", block, re.M):
      patterns += [p.strip().strip("\"'") for p in match.group(1).split("|")]
  return [p for p in patterns if p != "*"]


def check_command(cmd):
  """Problems with one README command, each naming the flag or field."""
  if cmd.kind == "unparsed":
    return [f"not valid shell: {cmd.script}"]
  path = os.path.join(REPO_ROOT, cmd.script)
  if not os.path.isfile(path):
    return [f"{cmd.script}: no such script"]
  if cmd.kind == "python":
    if not cmd.script.endswith(".py"):
      return [f"{cmd.script}: run with python but is not a .py file"]
    return check_python_args(cmd.script, list(cmd.args))
  if cmd.script in FORWARDS:
    target, positionals = FORWARDS[cmd.script]
    head = cmd.args[:positionals]
    if len(head) < positionals or any(a.startswith("-") for a in head):
      return [f"{cmd.script} takes {positionals} positional arguments before "
              f"the {target} flags; got {list(head)}"]
    return check_python_args(target, list(cmd.args[positionals:]))
  patterns = case_patterns(cmd.script)
  if not patterns:
    return []                 # Arguments pass through (run_tests.sh: pytest).
  return [f"{arg}: {cmd.script} accepts only {patterns}"
          for arg in cmd.args
          if not any(fnmatch.fnmatchcase(arg, p) for p in patterns)]
