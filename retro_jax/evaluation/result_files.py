"""Where evaluation results lie, and all of them read back as one table.

Every evaluation of one set writes its own files under <workdir>/eval/,
named by what decides its figures (docs/evaluation.md):

  step_<S>_<set>_db-<hash>_k<k>[_<variant>...].json     results
  ..._leakage.png                                         leakage plot
  ..._chunks.npz, ..._chunks_<subset>.npz                 per-chunk scores

<hash> is the first 12 hex digits of the sha256 of the DB's manifest.json
bytes (the DB's identity, whatever its folder is called); "nodb" for a
model without retrieval, which reads no DB. Variants name the settings that
differ from the defaults (neighbours mode, window, split, caps), so an
evaluation of another set, DB, k or setting never overwrites another's
files; rerunning the same evaluation replaces its own. Names hold only
[A-Za-z0-9._-] (safe in shells and gs:// URLs).

`collect` reads every results JSON of a workdir (older step_<S>.json files
too) into rows, one per (step, set, subset, DB, k, variant); `format_table`
prints them.
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Any, Dict, Iterable, List, Optional

from etils import epath

from retro_jax.core import files
from retro_jax.retrieval import db_format

NO_DB = "nodb"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(name: str) -> str:
  """`name` with every run of other characters than [A-Za-z0-9._-] made
  one "_" (leading and trailing ones dropped): "Wikipedia (en)" ->
  "Wikipedia_en"."""
  return _UNSAFE.sub("_", name).strip("_") or "_"


def safe_names(names: Iterable[str]) -> Dict[str, str]:
  """{name: its safe name}, distinct: a name whose safe form another name
  already has gets "-" and 6 hex digits of its sha256 appended."""
  out: Dict[str, str] = {}
  taken = set()
  for name in names:
    safe = safe_name(name)
    if safe in taken:
      safe += "-" + hashlib.sha256(name.encode()).hexdigest()[:6]
    taken.add(safe)
    out[name] = safe
  return out


def db_identity(db_dir: str, retrieval: bool = True) -> str:
  """"db-<12 hex of sha256(manifest.json bytes)>", NO_DB for a model
  without retrieval (or no DB), "db-unreadable" when the DB's manifest
  cannot be read (the results JSON still names its folder)."""
  if not retrieval or not db_dir:
    return NO_DB
  path = epath.Path(db_dir) / db_format.MANIFEST
  try:
    data = path.read_bytes()
  except (OSError, ValueError):
    return "db-unreadable"
  return "db-" + hashlib.sha256(data).hexdigest()[:12]


def stem(step: int, set_name: str, db_id: str, k: int,
         variants: Iterable[str] = ()) -> str:
  """The common start of one evaluation's file names."""
  parts = [f"step_{step}", safe_name(set_name), db_id, f"k{k}"]
  parts += [safe_name(v) for v in variants]
  return "_".join(parts)


def _metric(summary: Dict[str, Any], side: str, key: str) -> float:
  return float(summary.get(side, {}).get(key, math.nan))


def rows_of(results: Dict[str, Any], path: str = "") -> List[Dict[str, Any]]:
  """One row per reported set of a results JSON."""
  rows = []
  for name, s in results.get("sets", {}).items():
    set_name, _, subset = name.partition("/")
    rows.append({
        "step": int(results.get("step", -1)), "set": set_name,
        "subset": subset,
        "db": results.get("db_id", "?"),  # Older files: no identity.
        "k": int(results.get("num_neighbours", 0)),
        "variant": "_".join(results.get("variants", [])) or (
            "" if results.get("neighbours", "db") == "db"
            else results["neighbours"]),
        "tokens": int(s.get("tokens", 0)), "bytes": int(s.get("bytes", 0)),
        "bpb_on": _metric(s, "retrieval_on", "bits_per_byte"),
        "bpb_off": _metric(s, "retrieval_off", "bits_per_byte"),
        "ppl_on": _metric(s, "retrieval_on", "perplexity"),
        "ppl_off": _metric(s, "retrieval_off", "perplexity"),
        "word_ppl_on": _metric(s, "retrieval_on", "word_perplexity"),
        "word_ppl_off": _metric(s, "retrieval_off", "word_perplexity"),
        "file": path})
  return rows


def collect(workdir: str) -> List[Dict[str, Any]]:
  """The rows of every results JSON under <workdir>/eval, sorted by step,
  set, subset, DB, k and variant. A file that is not JSON raises naming
  it."""
  eval_dir = epath.Path(workdir) / "eval"
  if not eval_dir.exists():
    raise FileNotFoundError(f"{eval_dir}: no evaluation results (run "
                            f"scripts/evaluate.py --workdir={workdir})")
  rows = []
  for path in sorted(eval_dir.glob("*.json")):
    rows.extend(rows_of(files.read_json(path), str(path)))
  return sorted(rows, key=lambda r: (r["step"], r["set"], r["subset"],
                                     r["db"], r["k"], r["variant"]))


def find(workdir: str, set_name: str, neighbours: str = "db"
         ) -> List[Dict[str, Any]]:
  """The results JSONs of `set_name` evaluated with `neighbours` (db |
  leak | random), oldest step first (e.g. [-1]["sets"]["task"]: the
  latest evaluation of the run's Task)."""
  found = []
  for path in sorted((epath.Path(workdir) / "eval").glob("*.json")):
    results = files.read_json(path)
    # Files written before results were named by set hold all sets of one
    # evaluation ("sets") and no "set".
    named = results.get("set", set_name if set_name in results.get(
        "sets", {}) else None)
    if named == set_name and results.get("neighbours", "db") == neighbours:
      found.append(results)
  return sorted(found, key=lambda r: r["step"])


COLUMNS = (("step", "{:>6}"), ("set", "{:<10}"), ("subset", "{:<18}"),
           ("db", "{:<15}"), ("k", "{:>3}"), ("variant", "{:<10}"),
           ("bytes", "{:>10}"), ("bpb_on", "{:>7.4f}"), ("bpb_off", "{:>7.4f}"),
           ("word_ppl_on", "{:>11.6g}"), ("word_ppl_off", "{:>12.6g}"))


def format_table(rows: List[Dict[str, Any]],
                 columns: Optional[Iterable] = None) -> str:
  """`rows` as aligned text, a header line first ("nan": not measured)."""
  columns = list(columns or COLUMNS)
  header = []
  for name, fmt in columns:
    width = int(re.search(r"[<>](\d+)", fmt).group(1))
    header.append(f"{name:<{width}}" if "<" in fmt else f"{name:>{width}}")
  lines = [" ".join(header)]
  for row in rows:
    lines.append(" ".join(f.format(row[name]) for name, f in columns))
  return "\n".join(lines)

