"""Where results lie (retro_jax.evaluation.result_files): names safe for
shells and gs://, the DB named by its manifest's bytes (not its folder),
and every results file of a workdir read back as one table."""

import math
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from retro_jax.core import files
from retro_jax.evaluation import result_files

SAFE = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")


def test_names_hold_only_safe_characters_and_stay_distinct():
  assert result_files.safe_name("Wikipedia (en)") == "Wikipedia_en"
  assert result_files.safe_name("Enron Emails") == "Enron_Emails"
  assert result_files.safe_name("a/b:c*d?") == "a_b_c_d"
  assert result_files.safe_name("(  )") == "_"
  names = result_files.safe_names(["Wikipedia (en)", "Wikipedia_en",
                                   "Wikipedia [en]", "ArXiv"])
  assert names["Wikipedia (en)"] == "Wikipedia_en" and names["ArXiv"] == "ArXiv"
  assert len(set(names.values())) == 4  # Collisions get a hash suffix.
  assert names["Wikipedia_en"].startswith("Wikipedia_en-")
  for name in names.values():
    assert set(name) <= SAFE
  stem = result_files.stem(300, "wiki", "db-0123456789ab", 2,
                           ["leak", "split-validation"])
  assert stem == "step_300_wiki_db-0123456789ab_k2_leak_split-validation"


def test_a_db_is_named_by_its_manifest_not_its_folder(tmp_path):
  one, two, copy = (tmp_path / "a" / "db", tmp_path / "b" / "db",
                    tmp_path / "c" / "other_name")
  for folder, body in ((one, b'{"num_chunks": 10}\n'),
                       (two, b'{"num_chunks": 11}\n'),
                       (copy, b'{"num_chunks": 10}\n')):
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_bytes(body)
  ids = [result_files.db_identity(str(p)) for p in (one, two, copy)]
  assert ids[0] != ids[1] and ids[0] == ids[2]  # Same bytes, same DB.
  assert ids[0].startswith("db-") and len(ids[0]) == 3 + 12
  assert result_files.db_identity(str(one), retrieval=False) == "nodb"
  assert result_files.db_identity("") == "nodb"
  assert result_files.db_identity(str(tmp_path / "none")) == "db-unreadable"


def _results(step, set_name, db_id, k, sets, neighbours="db", variants=()):
  return {"step": step, "set": set_name, "db_id": db_id,
          "num_neighbours": k, "neighbours": neighbours,
          "variants": list(variants), "sets": sets}


def _side(bpb, word_ppl=None):
  out = {"bits_per_byte": bpb, "perplexity": 2.0}
  if word_ppl is not None:
    out["word_perplexity"] = word_ppl
  return out


def test_every_results_file_comes_back_as_rows(tmp_path):
  eval_dir = tmp_path / "eval"
  files.write_json(eval_dir / "step_3_task_db-aaa_k2.json", _results(
      3, "task", "db-aaa", 2, {"task": {"tokens": 5, "bytes": 9,
                                        "retrieval_on": _side(1.5),
                                        "retrieval_off": _side(1.75)}}))
  files.write_json(eval_dir / "step_3_wiki_db-aaa_k2.json", _results(
      3, "wiki", "db-aaa", 2, {
          "wiki": {"bytes": 20, "retrieval_on": _side(1.0, 30.0),
                   "retrieval_off": _side(1.25, 40.0)},
          "wiki/Wikipedia (en)": {"bytes": 8,
                                  "retrieval_on": _side(0.5, 10.0)}}))
  files.write_json(eval_dir / "step_3_task_db-bbb_k2_leak.json", _results(
      3, "task", "db-bbb", 2, {"task": {"retrieval_on": _side(0.25)}},
      neighbours="leak", variants=["leak"]))
  # A file of the older layout (no set, DB identity or variants) too.
  files.write_json(eval_dir / "step_1.json", {
      "step": 1, "num_neighbours": 2, "neighbours": "db",
      "sets": {"task": {"retrieval_on": _side(3.0)}}})
  rows = result_files.collect(str(tmp_path))
  keys = [(r["step"], r["set"], r["subset"], r["db"], r["variant"])
          for r in rows]
  assert keys == [(1, "task", "", "?", ""), (3, "task", "", "db-aaa", ""),
                  (3, "task", "", "db-bbb", "leak"),
                  (3, "wiki", "", "db-aaa", ""),
                  (3, "wiki", "Wikipedia (en)", "db-aaa", "")]
  wiki = rows[3]
  assert (wiki["bpb_on"], wiki["bpb_off"], wiki["word_ppl_on"],
          wiki["word_ppl_off"]) == (1.0, 1.25, 30.0, 40.0)
  assert math.isnan(rows[1]["word_ppl_on"])  # Not measured for the Task.
  table = result_files.format_table(rows).splitlines()
  assert table[0].split()[:4] == ["step", "set", "subset", "db"]
  assert len(table) == 1 + 5 and "Wikipedia (en)" in table[5]
  found = result_files.find(str(tmp_path), "task")  # The older file too.
  assert [r.get("db_id") for r in found] == [None, "db-aaa"]
  assert [r["step"] for r in found] == [1, 3]
  assert not result_files.find(str(tmp_path), "wiki", "leak")
  assert result_files.find(str(tmp_path), "task", "leak")[0]["step"] == 3

  # The command prints the same table; a workdir without results is one
  # error line.
  env = dict(os.environ, PYTHONPATH=REPO_ROOT)
  proc = subprocess.run(
      [sys.executable, "scripts/eval_results.py", f"--workdir={tmp_path}"],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.splitlines() == table
  proc = subprocess.run(
      [sys.executable, "scripts/eval_results.py",
       f"--workdir={tmp_path / 'none'}"], cwd=REPO_ROOT, env=env,
      capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1
  assert proc.stderr.startswith("scripts/eval_results.py: error: ")
  assert "no evaluation results" in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_a_broken_results_file_is_named(tmp_path):
  (tmp_path / "eval").mkdir()
  (tmp_path / "eval" / "step_1_x.json").write_text("{not json")
  with pytest.raises(ValueError, match="step_1_x.json: not valid JSON"):
    result_files.collect(str(tmp_path))
