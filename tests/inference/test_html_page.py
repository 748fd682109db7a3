"""The sample page (retro_jax/inference/html_page.py), read back with the
standard library's HTML parser: one section per chunk, each with the
neighbours the model read while writing it, all text escaped, nothing
loaded from outside the file."""

import html.parser

import numpy as np

from retro_jax.inference import html_page
from retro_jax.inference import run as run_lib

M = 4  # Chunk size of the hand-made sample.


class _Page(html.parser.HTMLParser):
  """Sections (id, text inside), every tag's attributes and all text."""

  def __init__(self):
    super().__init__()
    self.sections = []  # [(id, [text pieces])]
    self.tags = []  # [(tag, attrs)]
    self.text = []
    self._depth = 0  # Open tags inside the current section.

  def handle_starttag(self, tag, attrs):
    self.tags.append((tag, dict(attrs)))
    if tag == "section":
      assert self._depth == 0, "sections must not nest"
      self.sections.append((dict(attrs)["id"], []))
      self._depth = 1
    elif self._depth:
      self._depth += 1

  def handle_endtag(self, tag):
    if self._depth:
      self._depth -= 1

  def handle_data(self, data):
    self.text.append(data)
    if self._depth:
      self.sections[-1][1].append(data)


def _hit(j, chunk_id, source, text, title=None, dropped=False):
  return {"neighbour": j, "chunk_id": chunk_id, "distance": 0.25 * (j + 1),
          "doc_id": 7 + chunk_id, "source": source, "title": title,
          "meta": {}, "text": text, "dropped": dropped}


def _sample():
  """6 prompt tokens and 6 generated: chunk 0 is prompt, chunk 1 prompt +
  generated, chunk 2 generated; no incomplete tail."""
  return run_lib.Sample(
      prompt="import os\n", text="x = '<script>alert(1)</script>'\n",
      tokens=np.arange(1, 13, dtype=np.int32),
      neighbours=[["a"], ["b"], ["c"]],
      chunks=["import os\n", "x = '<script>", "alert(1)</script>'"],
      seconds=0.1, neighbour_ids=[np.array([3]), np.array([5]),
                                  np.array([-1])],
      neighbour_distances=[np.array([0.25]), np.array([0.5]),
                           np.array([np.inf])],
      tail="", prompt_len=6, chunk_size=M)


ATTRIBUTION = [
    [_hit(0, 3, "stdlib:json/decoder.py", "def decode(s):\n    <b>&amp;",
          title="JSON decoder")],
    [_hit(0, 5, None, "", dropped=True)],  # Old DB, dropped by alignment.
    [_hit(0, -1, None, "")],  # Fewer DB chunks than k: none found.
]


def test_page_has_one_section_per_chunk_with_its_neighbours():
  page = html_page.render(_sample(), ATTRIBUTION, title="run <tiny>")
  parsed = _Page()
  parsed.feed(page)
  parsed.close()
  assert [s[0] for s in parsed.sections] == ["chunk-0", "chunk-1", "chunk-2"]
  texts = ["".join(s[1]) for s in parsed.sections]
  # Chunk 0 is written before any retrieval; chunk u reads chunk u-1's
  # neighbours: their source, title, distance and (unescaped) text.
  assert "before any retrieval" in texts[0]
  assert "stdlib:json/decoder.py" in texts[1]
  assert "JSON decoder" in texts[1] and "squared L2 0.250" in texts[1]
  assert "def decode(s):\n    <b>&amp;" in texts[1]  # Whitespace kept.
  assert "source unknown" in texts[2] and "dropped by alignment" in texts[2]
  assert "stdlib:json/decoder.py" not in texts[0] + texts[2]
  # Token ranges: prompt, prompt + generated, generated.
  assert "tokens 0–3 · prompt" in texts[0]
  assert "tokens 4–7 · prompt + generated" in texts[1]
  assert "tokens 8–11 · generated" in texts[2]
  # The neighbours of the last complete chunk condition nothing generated
  # here: no section shows chunk 2's (missing) neighbour.
  assert "none found" not in page


def test_text_is_escaped_and_nothing_loads_from_outside():
  page = html_page.render(_sample(), ATTRIBUTION, title="run <tiny>")
  assert "<script" not in page.lower()  # Only as &lt;script&gt;.
  assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
  assert "<b>" not in page and "&lt;b&gt;&amp;amp;" in page
  assert "<title>run &lt;tiny&gt;</title>" in page
  parsed = _Page()
  parsed.feed(page)
  tags = {tag for tag, _ in parsed.tags}
  assert not tags & {"script", "link", "img", "iframe", "object", "embed"}
  for tag, attrs in parsed.tags:
    assert not {"src", "href", "srcset", "action"} & set(attrs), (tag, attrs)
  assert "http" not in page.split("</style>")[0]  # No @import, no url().
  # The user's text survives the round trip exactly.
  assert "x = '<script>alert(1)</script>'\n" in "".join(parsed.text)


def test_incomplete_tail_and_retrieval_off():
  sample = _sample()
  sample.tail = "print(1)"
  page = html_page.render(sample, ATTRIBUTION)
  parsed = _Page()
  parsed.feed(page)
  assert [s[0] for s in parsed.sections][-1] == "chunk-3"
  last = "".join(parsed.sections[-1][1])
  assert "chunk 3 (incomplete)" in last and "print(1)" in last
  assert "none found" in last  # Chunk 2's neighbour slot, empty.
  off = run_lib.Sample(prompt="a", text="bcd", tokens=np.arange(1, 5),
                       neighbours=[], chunks=[], seconds=0.1, tail="abcd")
  parsed = _Page()
  parsed.feed(html_page.render(off, []))
  assert len(parsed.sections) == 1
  assert "retrieval was off" in "".join(parsed.sections[0][1])
