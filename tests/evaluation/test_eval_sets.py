"""Evaluation sets as configs/eval.py states them (groups picked by the config
argument, fields overridden by flags), their documents and groups, and what
a loaded run reads from its config: the vocabulary and the DB."""

import dataclasses
import json
import os

from absl import flags
import ml_collections
from ml_collections import config_flags
import pytest

from conftest import REPO_ROOT
from retro_jax.config import RetroConfig
from retro_jax.evaluation import loaded_run
from retro_jax.evaluation import sets

EVAL_CONFIG = os.path.join(REPO_ROOT, "configs", "eval.py")


def _parse(*argv):
  """configs/eval.py as scripts/evaluate.py reads it from `argv`."""
  argv = ["evaluate.py", *argv]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", EVAL_CONFIG, flag_values=values,
                                  sys_argv=argv)
  values(argv)
  return values.config


def test_config_argument_picks_set_groups_and_flags_override_fields():
  default = sets.sets_of(_parse().eval)
  assert [s.name for s in default] == ["task"] and default[0].is_task
  config = _parse(f"--config={EVAL_CONFIG}:task,stdlib,pile",
                  "--config.eval.sets.pile.corpus=jsonl:/x/val.jsonl",
                  "--config.eval.stride=128")
  got = {s.name: s for s in sets.sets_of(config.eval)}
  assert set(got) == {"task", "stdlib", "pile"}
  # The library's held-out files; a corpus file is read whole by default.
  assert got["stdlib"] == sets.EvalSet("stdlib", "python_stdlib", {}, "",
                                       "validation")
  assert got["pile"].corpus == "jsonl:/x/val.jsonl"
  assert got["pile"].group_by == "pile_set_name"
  assert got["pile"].split == "all" and config.eval.max_bytes == 0
  assert config.eval.task_split == "validation"
  assert config.eval.stride == 128
  capped = _parse(f"--config={EVAL_CONFIG}:pile,stdlib",
                  "--config.eval.split=train")
  assert [s.split for s in sets.sets_of(capped.eval)] == ["train",
                                                          "validation"]
  arxiv = _parse(f"--config={EVAL_CONFIG}:arxiv",
                 "--config.eval.sets.arxiv.meta.pile_set_name=Github")
  assert sets.sets_of(arxiv.eval)[0].meta == {"pile_set_name": "Github"}
  wiki = sets.sets_of(_parse(f"--config={EVAL_CONFIG}:wikitext103").eval)
  assert [(s.name, s.corpus.split(":")[0], s.split) for s in wiki] == [
      ("wikitext103", "jsonl", "all")]
  with pytest.raises(flags.IllegalFlagValueError,
                     match="no set group 'nope'"):
    _parse(f"--config={EVAL_CONFIG}:nope")


def test_sets_are_checked():
  config = _parse(f"--config={EVAL_CONFIG}:")
  with pytest.raises(ValueError, match="config.eval.sets is empty"):
    sets.sets_of(config.eval)
  config = _parse(f"--config={EVAL_CONFIG}:task",
                  "--config.eval.sets.task.group_by=pile_set_name")
  with pytest.raises(ValueError, match="takes no meta filter, group_by"):
    sets.sets_of(config.eval)
  config = _parse(f"--config={EVAL_CONFIG}:task",
                  "--config.eval.sets.task.split=train")
  with pytest.raises(ValueError, match="config.eval.task_split picks"):
    sets.sets_of(config.eval)


def test_documents_are_filtered_by_meta_and_grouped(tmp_path):
  path = tmp_path / "pile.jsonl"
  names = ["ArXiv", "Github", "ArXiv", "Enron Emails"]
  with open(path, "w") as f:
    for i, name in enumerate(names):
      f.write(json.dumps({"text": f"document {i}\n" * 5,
                          "meta": {"pile_set_name": name}}) + "\n")
  pile = sets.EvalSet("pile", f"jsonl:{path}", {}, "pile_set_name")
  docs = list(sets.documents(pile))
  assert len(docs) == 4  # "all": no line is held out.
  group = sets.group_of(pile)
  assert [group(d) for d in docs] == ["pile/ArXiv", "pile/Github",
                                      "pile/ArXiv", "pile/Enron Emails"]
  arxiv = dataclasses.replace(pile, meta={"pile_set_name": "ArXiv"},
                              group_by="")
  assert [d.text for d in sets.documents(arxiv)] == [docs[0].text,
                                                     docs[2].text]
  assert sets.group_of(arxiv)(docs[1]) == "pile"
  # A byte cap stops after the document that reaches it.
  assert len(list(sets.documents(pile, max_bytes=len(docs[0].text) + 1))) == 2
  nothing = dataclasses.replace(arxiv, meta={"pile_set_name": "Books3"})
  assert not list(sets.documents(nothing))
  assert "has no document" in str(sets.no_document_error(nothing))


def test_a_run_finds_its_vocabulary_and_db(tmp_path):
  db = tmp_path / "db"
  db.mkdir()
  config = ml_collections.ConfigDict(dict(
      model=dataclasses.asdict(RetroConfig.preset("tiny")),
      data=dict(spm_path="", db_dir=str(db))))
  # Nothing exists yet: no vocabulary.
  assert loaded_run.spm_path_of(config, str(tmp_path)) == ""
  (tmp_path / "spm.model").write_bytes(b"")  # The workdir's copy.
  assert loaded_run.spm_path_of(config, str(tmp_path)) == str(
      tmp_path / "spm.model")
  (db / "spm.model").write_bytes(b"")  # The DB's copy comes first.
  assert loaded_run.spm_path_of(config, str(tmp_path)) == str(
      db / "spm.model")
  config.data.spm_path = str(tmp_path / "named.model")  # Named, if present.
  (tmp_path / "named.model").write_bytes(b"")
  assert loaded_run.spm_path_of(config, str(tmp_path)) == str(
      tmp_path / "named.model")
  run = loaded_run.LoadedRun(str(tmp_path), config, params=None, step=3)
  assert run.model_config == RetroConfig.preset("tiny")
  with pytest.raises(ValueError, match="no SentencePiece model"):
    run.need_tokenizer()
  with pytest.raises(ValueError, match="no retrieval DB"):
    run.retriever  # pylint: disable=pointless-statement
