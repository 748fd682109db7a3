"""JSON lines, one line at a time: a file's numbered lines, and a line's
document text and metadata, or the cause it is none in plain words.

`sources.jsonl` reads documents with these; every cause names what is wrong
with the line ("not valid JSON (Expecting value: column 1)", 'no "text"
field (has: id, meta)'), and `sources` adds the file and line number.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Iterator, Mapping, Tuple

from retro_jax.corpus import errors
from retro_jax.corpus import streams


class BadLine(Exception):
  """A line that is no document: args are (reason, cause in plain words);
  the reason is the key `sources.jsonl` counts a skipped line under."""


def _scalars(fields: Mapping[str, Any], exclude=()) -> Dict[str, str]:
  return {str(k): v if isinstance(v, str) else json.dumps(v)
          for k, v in fields.items()
          if k not in exclude and isinstance(v, (str, int, float, bool))}


def _field_names(obj: Mapping[str, Any], most: int = 6) -> str:
  names = [str(k) for k in obj]
  more = f", ... ({len(names)} in all)" if len(names) > most else ""
  return ", ".join(names[:most]) + more if names else "no fields"


def parse(line: bytes, text_field: str, layout: str
          ) -> Tuple[str, Dict[str, str]]:
  """(text, meta) of a line, or BadLine naming what is wrong.

  `layout` picks the fields that become meta: "plain" none, "c4" url and
  timestamp, "pile" the scalar entries of "meta", "auto" the scalar
  top-level fields and "meta" entries.
  """
  try:
    obj = json.loads(line.decode("utf-8"))
  except UnicodeDecodeError as e:
    raise BadLine("invalid_utf8", f"not valid UTF-8 (byte 0x"
                  f"{line[e.start]:02x} at column {e.start + 1})") from None
  except json.JSONDecodeError as e:
    raise BadLine("malformed_json", f"not valid JSON ({e.msg}: column "
                  f"{e.colno})") from None
  if not isinstance(obj, dict):
    raise BadLine("missing_text", f"not a JSON object (a "
                  f"{type(obj).__name__}), so no \"{text_field}\" field")
  if text_field not in obj:
    raise BadLine("missing_text", f"no \"{text_field}\" field (has: "
                  f"{_field_names(obj)})")
  text = obj[text_field]
  if not isinstance(text, str):
    raise BadLine("text_not_string", f"\"{text_field}\" is a "
                  f"{type(text).__name__}, not a string")
  try:
    text.encode("utf-8")
  except UnicodeEncodeError:  # An escaped lone surrogate such as "\\udce9".
    raise BadLine("invalid_utf8", "text holds a lone surrogate (an escaped "
                  "\\udXXX with no UTF-8 form)") from None
  if layout == "plain":
    return text, {}
  if layout == "c4":
    c4 = {k: obj[k] for k in ("url", "timestamp") if k in obj}
    return text, _scalars(c4)
  nested = obj.get("meta")
  nested = _scalars(nested) if isinstance(nested, dict) else {}
  if layout == "pile":
    return text, nested
  return text, {**_scalars(obj, exclude=(text_field,)), **nested}


def numbered_lines(path: str) -> Iterator[Tuple[int, bytes]]:
  """(1-based number, line) of a file; a cut or corrupt compressed file
  raises saying how many whole lines came before the damage."""
  number = 0
  try:
    for number, line in enumerate(
        streams.lines(streams.decompressed_chunks(path)), 1):
      yield number, line
  except errors.CorpusError as e:
    # The partial line at a cut is never yielded: `number` lines were whole.
    lines = "line" if number == 1 else "lines"
    raise errors.CorpusError(
        e.where, f"{e.cause} after {number} {lines}") from None
