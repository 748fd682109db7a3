"""What an evaluation reports: the leakage table, its text and plot, the
lines logged per evaluation set, and the results JSON.

The leakage table (paper §2.6) gives bits per byte over the chunks whose
leakage ratio r(C) is at most alpha, for growing alpha: retrieval's gain at
alpha = 0 comes from no copying at all, the rest from chunks that overlap
the text they were evaluated with.

Every file goes through `retro_jax.core.files` (atomic; local or gs://).
"""

from __future__ import annotations

import io
from typing import Any, Dict, List, Sequence

from retro_jax.core import files
from retro_jax.evaluation.scores import ChunkScores
from retro_jax.evaluation.scores import LN2

# The leakage table's thresholds on r(C).
ALPHAS = (0.0, 0.125, 0.25, 0.5, 0.75, 1.0)


def leakage_table(scores: ChunkScores,
                  alphas: Sequence[float] = ALPHAS) -> List[Dict[str, float]]:
  """Bits per byte over the chunks with r(C) <= alpha, for each alpha."""
  if scores.leakage is None:
    raise ValueError("leakage_table needs scores computed with leakage=True")
  rows = []
  counted = scores.targets > 0
  for alpha in alphas:
    keep = (scores.leakage <= alpha + 1e-9) & counted
    sub = scores.select(keep)
    nbytes = int(sub.bytes.sum())
    row = {"alpha": float(alpha), "chunks": int(keep.sum()),
           "chunk_fraction": float(keep.sum() / max(counted.sum(), 1)),
           "bytes": nbytes,
           "bpb_on": float(sub.nll_on.sum() / LN2 / nbytes) if nbytes
           else float("nan")}
    if sub.nll_off is not None:
      row["bpb_off"] = (float(sub.nll_off.sum() / LN2 / nbytes) if nbytes
                        else float("nan"))
    rows.append(row)
  return rows


def overlap_split(scores, threshold: float = 0.75) -> Dict[str, Dict]:
  """Bits per byte with retrieval on and off on the chunks with r(C) above
  `threshold` ("overlapping": their neighbours hold most of their text) and
  on the rest, and how much lower "on" is than "off" (`cut`, a fraction).
  `scores`: `scores.ChunkScores` with leakage and retrieval-off scores."""
  counted = scores.targets > 0
  out = {"threshold": float(threshold)}
  for name, keep in (("overlapping", scores.leakage > threshold),
                     ("rest", scores.leakage <= threshold)):
    sub = scores.select(keep & counted)
    nbytes = int(sub.bytes.sum())
    row = {"chunks": int((keep & counted).sum()), "bytes": nbytes}
    if nbytes:
      row["bpb_on"] = float(sub.nll_on.sum() / LN2 / nbytes)
      if sub.nll_off is not None:
        row["bpb_off"] = float(sub.nll_off.sum() / LN2 / nbytes)
        row["cut"] = 1.0 - row["bpb_on"] / row["bpb_off"]
    out[name] = row
  return out


def relative_change(cut: float) -> str:
  """A relative cut in bits per byte as words: "83.1% lower", or "4.3%
  higher" where retrieval made the figure worse."""
  return f"{100 * abs(cut):.1f}% {'lower' if cut >= 0 else 'higher'}"


def format_overlap(name: str, split: Dict[str, Dict]) -> List[str]:
  """One logged line per side of `overlap_split`."""
  lines = []
  for side, what in (("overlapping", f"r(C) > {split['threshold']:g}"),
                     ("rest", f"r(C) <= {split['threshold']:g}")):
    row = split[side]
    if "cut" not in row:
      lines.append(f"{name}: {row['chunks']} chunks with {what}")
      continue
    lines.append(f"{name}: {row['chunks']} chunks with {what}: "
                 f"{row['bpb_on']:.4f} bpb with retrieval, "
                 f"{row['bpb_off']:.4f} without "
                 f"({relative_change(row['cut'])})")
  return lines


def format_table(rows: List[Dict[str, float]]) -> str:
  """The leakage table as aligned text."""
  lines = [f"{'alpha':>6} {'chunks':>7} {'frac':>6} {'bpb on':>8} "
           f"{'bpb off':>8}"]
  for r in rows:
    lines.append(f"{r['alpha']:6.3f} {r['chunks']:7d} "
                 f"{r['chunk_fraction']:6.3f} {r['bpb_on']:8.4f} "
                 f"{r.get('bpb_off', float('nan')):8.4f}")
  return "\n".join(lines)


def format_summary(name: str, summary: Dict[str, Any]) -> str:
  """The lines logged for one evaluated set: its metrics with retrieval on
  (and off), the gain retrieval brings when measured, and the leakage table.
  `summary` is `scores.summarize`'s dict with "leakage" (and optionally
  "retrieval_gain") added."""
  def metrics(side):
    m = summary[side]
    words = (f" word ppl {m['word_perplexity']:.2f}"
             if "word_perplexity" in m else "")
    return (f"loss {m['loss']:.4f} ppl {m['perplexity']:.2f} "
            f"bpb {m['bits_per_byte']:.4f}{words}")
  line = (f"{name}: {summary['tokens']} tokens, {summary['bytes']} bytes | "
          f"retrieval on: {metrics('retrieval_on')}")
  if "retrieval_off" in summary:
    line += f" | off: {metrics('retrieval_off')}"
  lines = [line]
  if "retrieval_gain" in summary:
    g = summary["retrieval_gain"]
    lines.append(f"{name}: retrieval saves {g['bpb_gain']:.4f} bpb "
                 f"({100 * g['relative']:.2f}%), 95% interval over the "
                 f"{g['sequences']} sequences [{g['ci95'][0]:.4f}, "
                 f"{g['ci95'][1]:.4f}]")
  if "overlap" in summary and "retrieval_off" in summary:
    lines.extend(format_overlap(name, summary["overlap"]))
  if "leakage" in summary:
    lines.append(format_table(summary["leakage"]))
  return "\n".join(lines)


def plot_leakage(curves: Dict[str, List[Dict[str, float]]], path: str,
                 title: str = "") -> str:
  """PNG of bpb vs alpha, retrieval on (solid) and off (dashed), one colour
  per evaluation set (`curves`: name -> `leakage_table` rows)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4))
  for i, (name, rows) in enumerate(curves.items()):
    colour = f"C{i}"
    alphas = [r["alpha"] for r in rows]
    ax.plot(alphas, [r["bpb_on"] for r in rows], "o-", color=colour,
            label=f"{name} retrieval on")
    if "bpb_off" in rows[0]:
      ax.plot(alphas, [r["bpb_off"] for r in rows], "s--", color=colour,
              label=f"{name} retrieval off")
  ax.set_xlabel("max eval/retrieved chunk overlap α (r(C) ≤ α)")
  ax.set_ylabel("bits per byte")
  ax.set_title(title or "Leakage-filtered bits per byte")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=120)
  plt.close(fig)
  files.write_bytes(path, png.getvalue())
  return path


def write_results(path: str, results: Dict[str, Any]) -> str:
  """Writes the results JSON (sorted keys, indented) atomically."""
  files.write_json(path, results, indent=2)
  return path
