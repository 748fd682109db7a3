"""A sample and its neighbours as one self-contained HTML page.

`render(sample, attribution)` lays the prompt and the continuation out chunk
by chunk: each row holds a chunk of text (left) and the DB chunks the model
read while writing it (right), with their source, title and distance. Chunk
u's neighbours are retrieved once chunk u is complete and condition chunk
u + 1 (RETRO's chunked cross-attention), so row u shows the neighbours of
chunk u - 1; the first chunk is written before any retrieval.

The page is a string of HTML with its CSS inline: no script, no external
resource, so it opens from disk anywhere and can be mailed or archived as is.
Every piece of text is escaped (`html.escape`) and kept with its whitespace
(<pre>), since samples and DB chunks are code as often as prose.
"""

from __future__ import annotations

import html
from typing import Any, Dict, List, Optional, Sequence

_CSS = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #1f2328;
       background: #f6f8fa; }
h1 { font-size: 20px; margin: 0 0 4px; }
.summary { color: #57606a; font-size: 13px; margin-bottom: 16px; }
.texts, .chunk { display: grid; grid-template-columns: 1fr 1fr; gap: 12px;
                 margin-bottom: 12px; }
.box, .neighbour, .text { background: #fff; border: 1px solid #d0d7de;
                          border-radius: 6px; padding: 8px 10px; }
.chunk { border-top: 2px solid #d0d7de; padding-top: 10px; }
.text.prompt { border-left: 4px solid #8c959f; }
.text.generated { border-left: 4px solid #0969da; }
.text.mixed { border-left: 4px dashed #0969da; }
.label { font-size: 12px; color: #57606a; margin-bottom: 4px; }
.neighbours { display: flex; flex-direction: column; gap: 8px; }
.neighbour.dropped { opacity: 0.55; }
.source { font-family: ui-monospace, monospace; font-weight: 600;
          color: #0a3069; }
.title { font-style: italic; }
.none { color: #57606a; font-size: 13px; font-style: italic; }
pre { white-space: pre-wrap; word-break: break-word; margin: 0;
      font-family: ui-monospace, monospace; font-size: 12px; }
"""


def _pre(text: str) -> str:
  return f"<pre>{html.escape(text)}</pre>"


def _span(cls: str, text: str) -> str:
  return f'<span class="{cls}">{html.escape(text)}</span>'


def _neighbour(hit: Dict[str, Any]) -> str:
  """One neighbour's card: where it came from, then what the model read."""
  j = hit.get("neighbour", 0)
  if hit.get("chunk_id", -1) < 0:
    return (f'<div class="neighbour"><div class="label">neighbour {j}: '
            f'none found</div></div>')
  source = hit.get("source")
  where = (_span("source", source) if source else
           _span("none", "source unknown (DB built before attribution)"))
  title = hit.get("title")
  parts = [f"neighbour {j}", f"chunk {int(hit['chunk_id'])}", where]
  if title:
    parts.append(_span("title", title))
  if hit.get("doc_id") is not None:
    parts.append(f"document {int(hit['doc_id'])}")
  parts.append(f"squared L2 {float(hit['distance']):.3f}")
  dropped = bool(hit.get("dropped"))
  if dropped:
    parts.append("dropped by alignment (not read)")
  body = _pre(hit.get("text", "")) if hit.get("text") else ""
  cls = "neighbour dropped" if dropped else "neighbour"
  return (f'<div class="{cls}"><div class="label">{" · ".join(parts)}'
          f"</div>{body}</div>")


def _kind(start: int, end: int, prompt_len: int) -> str:
  """Whether tokens [start, end) are prompt, generated or both."""
  if end <= prompt_len:
    return "prompt"
  return "generated" if start >= prompt_len else "mixed"


def _chunk_row(u: int, text: str, hits: Optional[Sequence[Dict[str, Any]]],
               sample, complete: bool, retrieval: bool) -> str:
  """Row u: chunk u's text and the neighbours it was written with."""
  m, p = getattr(sample, "chunk_size", 0), getattr(sample, "prompt_len", 0)
  label = f"chunk {u}" + ("" if complete else " (incomplete)")
  kind = "generated"
  if m:
    start = u * m
    end = start + m if complete else len(sample.tokens)
    kind = _kind(start, end, p)
    label += f" · tokens {start}–{end - 1} · " + {
        "prompt": "prompt", "generated": "generated",
        "mixed": "prompt + generated"}[kind]
  left = (f'<div class="text {kind}"><div class="label">{label}</div>'
          f"{_pre(text)}</div>")
  if hits:
    right = "".join(_neighbour(h) for h in hits)
    note = f"neighbours of chunk {u - 1}, read while writing chunk {u}"
  else:
    right = ""
    note = ("no neighbours: retrieval was off" if not retrieval else
            "no neighbours: the first chunk is written before any retrieval"
            if u == 0 else "no neighbours")
  return (f'<section class="chunk" id="chunk-{u}">{left}'
          f'<div class="neighbours"><div class="label">{note}</div>'
          f"{right}</div></section>")


def render(sample, attribution: List[List[Dict[str, Any]]],
           title: str = "RETRO sample") -> str:
  """The HTML page of `sample` (a `run.Sample`, or anything with .prompt,
  .text, .chunks, .tail and, optionally, .tokens, .prompt_len, .chunk_size).

  Args:
    sample: the generated sample.
    attribution: `Run.attribution(sample)`: per completed chunk, its
      neighbours' records ({"neighbour", "chunk_id", "distance", "doc_id",
      "source", "title", "text", "dropped"}); [] without retrieval.
    title: the page's heading.
  Returns:
    The page, one string (UTF-8 when written).
  """
  retrieval = bool(attribution)
  rows = list(sample.chunks) + ([sample.tail] if sample.tail else [])
  sections = []
  for u, text in enumerate(rows):
    hits = attribution[u - 1] if 0 < u <= len(attribution) else None
    sections.append(_chunk_row(u, text, hits, sample,
                               complete=u < len(sample.chunks),
                               retrieval=retrieval))
  k = max((len(a) for a in attribution), default=0)
  summary = (f"{len(sample.chunks)} complete chunks"
             + (f", {k} neighbours each" if retrieval else ", retrieval off")
             + ". Each row: a chunk of text (left) and the DB chunks the "
             "model read while writing it (right), nearest first.")
  return "\n".join([
      "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
      f"<title>{html.escape(title)}</title><style>{_CSS}</style>",
      "</head><body>", f"<h1>{html.escape(title)}</h1>",
      f'<div class="summary">{html.escape(summary)}</div>',
      '<div class="texts">',
      f'<div class="box"><div class="label">prompt</div>'
      f"{_pre(sample.prompt)}</div>",
      f'<div class="box"><div class="label">continuation</div>'
      f"{_pre(sample.text)}</div>", "</div>",
      *sections, "</body></html>", ""])
