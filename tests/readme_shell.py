"""Script commands in Markdown and shell text (tests/readme_commands.py
checks them).

A command is a `python scripts/X.py ...` (also `python3`, `.venv/bin/python`)
or `bash scripts/X.sh ...` line of a ```bash block (with `\\` continuations,
open quotes and `#` comments), or the same in an inline `code` span of the
prose; `benchmarks/` and `tools/` scripts count as well as `scripts/`.
`<placeholder>`s count as one word.
"""

import dataclasses
import re
import shlex

_FENCE = re.compile(r"^\s*```\s*([\w+-]*)")
_SHELL_LANGS = ("bash", "sh", "shell", "console")
PLACEHOLDER = "__placeholder__"
# Folders whose files are run as commands.
SCRIPT_DIRS = ("scripts", "benchmarks", "tools")
_SCRIPT = re.compile(r"^(\./)?(%s)/" % "|".join(SCRIPT_DIRS))


@dataclasses.dataclass(frozen=True)
class Command:
  line: int      # 1-based line in the file where the command starts.
  text: str      # The command as written (continuations joined).
  kind: str      # "python" | "bash".
  script: str    # Repo-relative script path, e.g. "scripts/train.py".
  args: tuple    # Arguments after the script, shell quoting removed.


# ---------------------------------------------------------------- shell text


def _strip_comment(text):
  """Drops a bash comment (`#` starting a word, outside quotes)."""
  quote, i = None, 0
  while i < len(text):
    ch = text[i]
    if ch == "\\" and quote != "'":
      i += 1                  # The escaped character is literal.
    elif quote:
      quote = None if ch == quote else quote
    elif ch in "'\"":
      quote = ch
    elif ch == "#" and (i == 0 or text[i - 1].isspace()):
      return text[:i]
    i += 1
  return text


def _words(text):
  """Shell words of `text` (no comments), `<placeholder>`s as one word."""
  text = re.sub(r"<[A-Za-z][^<>\n]*>", PLACEHOLDER, text)
  lex = shlex.shlex(text, posix=True, punctuation_chars=True)
  lex.whitespace_split = True
  lex.commenters = ""
  return list(lex)


def command_segments(text):
  """Simple commands of a logical line: lists of words split at && ; | ..."""
  segments, current = [], []
  words = iter(_words(_strip_comment(text)))
  for word in words:
    if word in ("&&", "||", ";", "|", "&", ";;"):
      segments.append(current)
      current = []
    elif word in (">", ">>", "<", ">&", "&>"):
      if current and current[-1].isdigit():
        current.pop()         # The 2 of 2>&1.
      next(words, None)       # Redirection target.
    else:
      current.append(word)
  segments.append(current)
  return [s for s in segments if s]


def logical_lines(lines, first_line):
  """(line number, text) of shell lines joined at `\\` and open quotes."""
  out, buf, start = [], "", None
  for n, line in enumerate(lines, first_line):
    if line.lstrip().startswith("$ "):
      line = line.lstrip()[2:]
    if start is None:
      start = n
    if _strip_comment(line).rstrip().endswith("\\"):
      buf += line.rstrip()[:-1] + " "
      continue
    buf += line
    try:
      _words(_strip_comment(buf))
    except ValueError:          # An open quote: the command goes on.
      buf += "\n"
      continue
    if buf.strip():
      out.append((start, buf.strip()))
    buf, start = "", None
  if buf.strip():
    out.append((start, buf.strip()))
  return out


def _script_command(line, text, words, direct):
  """A Command if `words` runs a file of SCRIPT_DIRS, else None.

  `direct`: also `scripts/x.sh ...` without an interpreter (in shell blocks;
  in prose a bare `scripts/x.py` is a mention, not a command).
  """
  while words and re.match(r"^[A-Za-z_]\w*=", words[0]):
    words = words[1:]         # VAR=value prefixes.
  if not words:
    return None
  head = words[0]
  rest = words[1:]
  if re.fullmatch(r"(.*/)?python3?(\.\d+)?", head):
    kind = "python"
    while rest and rest[0] in ("-u", "-O", "-B", "-W", "-X"):
      rest = rest[2:] if rest[0] in ("-W", "-X") else rest[1:]
  elif head in ("bash", "sh"):
    kind = "bash"
  elif direct and _SCRIPT.match(head):
    kind = "python" if head.endswith(".py") else "bash"
    rest = words
  else:
    return None
  if not rest or not _SCRIPT.match(rest[0]):
    return None
  script = re.sub(r"^\./", "", rest[0])
  # Usage notation: `[--db=DIR]` optional, a bare `...` for "and so on".
  args = [re.sub(r"\]$", "", re.sub(r"^\[(?=-)", "", a)) for a in rest[1:]]
  return Command(line, text, kind, script,
                 tuple(a for a in args if a not in ("...", "")))


def commands_in(lines, first_line, direct=True):
  """Script commands of shell lines starting at line `first_line`."""
  found = []
  for n, text in logical_lines(lines, first_line):
    try:
      segments = command_segments(text)
    except ValueError as e:   # Unclosed quote at the end of the block.
      if any(f"{d}/" in text for d in SCRIPT_DIRS):
        found.append(Command(n, text, "unparsed", str(e), ()))
      continue
    for words in segments:
      cmd = _script_command(n, text, words, direct)
      if cmd:
        found.append(cmd)
  return found


def fenced_blocks(lines):
  """(language, first line number of the body, body lines) of ``` blocks."""
  blocks, lang, body, start = [], None, [], 0
  for n, line in enumerate(lines, 1):
    fence = _FENCE.match(line)
    if fence and lang is None:
      lang, body, start = fence.group(1).lower(), [], n + 1
    elif fence:
      blocks.append((lang, start, body))
      lang = None
    elif lang is not None:
      body.append(line)
  return blocks


def readme_commands(text):
  """Every script command of the README: shell blocks and inline code."""
  lines = text.splitlines()
  found, prose = [], list(lines)
  for lang, start, body in fenced_blocks(lines):
    for i in range(start - 2, start + len(body)):   # Fences and body.
      prose[i] = ""
    if lang in _SHELL_LANGS:
      found += commands_in(body, start)
  prose_text = "\n".join(prose)
  for span in re.finditer(r"`([^`]+)`", prose_text):
    line = prose_text.count("\n", 0, span.start()) + 1
    found += commands_in([span.group(1).replace("\n", " ")], line,
                         direct=False)
  return sorted(found, key=lambda c: c.line)
