r"""Edits a finalized retrieval DB in place: remove or add documents.

The DB is the run config's config.data.db_dir (or --db_dir). Removing text
from the DB changes what the model can retrieve; it does not remove what the
weights memorised in training (docs/db_editing.md).

List the documents a selection matches (nothing is changed):
  python scripts/edit_db.py --config=configs/quickstart.py \
      --remove_glob='stdlib:email/*' --list

Remove them (by source glob, exact source, document id or metadata):
  python scripts/edit_db.py --config=configs/quickstart.py \
      --remove_glob='stdlib:email/*'
  python scripts/edit_db.py --config=configs/retro.py \
      --remove_meta='url=https://en.wikipedia.org/*'

Add documents from a corpus (read as the build reads it, embedded by the
DB's BERT, config.db.embedder):
  python scripts/edit_db.py --config=configs/quickstart.py \
      --add_corpus=textdir:/data/new_docs --add_part=added

Each edit rebuilds the index (recall@10 re-measured) and records itself and
the DB's new content version in the manifest. The neighbour table and Task
caches made before are refused afterwards; --rebuild_table rebuilds the
table here, or run `python scripts/build_db.py --config=... --stage=table`,
then `python scripts/cache_tasks.py --config=...` for the caches.
A killed edit leaves the DB as it was; rerun the same command to finish it.
"""

import json

from absl import flags
from ml_collections import config_flags

from retro_jax.core import cli
from retro_jax.corpus import sources
from retro_jax.retrieval import attribution
from retro_jax.retrieval import db_edit
from retro_jax.retrieval import db_format as fmt
from retro_jax.retrieval import db_select
from retro_jax.retrieval import neighbour_table
from retro_jax.retrieval.db import RetrievalDB

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Run config file (configs/*.py): config.data.db_dir and "
    "config.db (embedder, recall_queries, table_candidates).",
    lock_config=True)
_DB_DIR = flags.DEFINE_string("db_dir", "", "The DB (default: the run "
                              "config's config.data.db_dir).")
_REMOVE_ID = flags.DEFINE_multi_integer("remove_doc_id", [], "Remove the "
                                        "document with this id.")
_REMOVE_SOURCE = flags.DEFINE_multi_string(
    "remove_source", [], "Remove the document with this source, e.g. "
    "stdlib:json/decoder.py.")
_REMOVE_GLOB = flags.DEFINE_multi_string(
    "remove_glob", [], "Remove documents whose source matches this shell "
    "pattern, e.g. 'stdlib:email/*' or 'https://example.com/*'.")
_REMOVE_META = flags.DEFINE_multi_string(
    "remove_meta", [], "field=pattern: remove documents whose metadata field "
    "matches (all --remove_meta together), e.g. pile_set_name=Github.")
_LIST = flags.DEFINE_bool("list", False, "Print the documents the removal "
                          "flags select, and change nothing.")
_ADD_CORPUS = flags.DEFINE_string("add_corpus", "", "Add the documents of "
                                  "this corpus spec (sources.open_corpus).")
_ADD_SPLIT = flags.DEFINE_string("add_split", "", "Split of --add_corpus "
                                 "(default: all).")
_ADD_MAX_BYTES = flags.DEFINE_integer("add_max_bytes", 0, "Bytes of "
                                      "--add_corpus to read (0: all).")
_ADD_META = flags.DEFINE_multi_string("add_meta", [], "field=value: add "
                                      "only documents with this metadata.")
_ADD_PART = flags.DEFINE_string("add_part", "added", "The DB part the added "
                                "documents join (a new one, or the last).")
_REBUILD_TABLE = flags.DEFINE_bool("rebuild_table", False, "Rebuild the "
                                   "neighbour table after the edit, here.")


def _selection() -> db_select.Selection:
  return db_select.Selection.of(
      _REMOVE_ID.value, _REMOVE_SOURCE.value, _REMOVE_GLOB.value,
      db_select.parse_meta(_REMOVE_META.value, "--remove_meta"))


def _list(db_dir: str) -> None:
  db = RetrievalDB.open(db_dir)
  _, records = db_select.select(db, _selection())
  for r in records:
    print(attribution.describe_document(r))
  print(f"{len(records)} document(s) of {db_dir} match "
        f"{_selection().describe()}")


def main(argv):
  del argv
  config = _CONFIG.value
  db_dir = _DB_DIR.value or config.data.db_dir
  if not db_dir:
    cli.fail("no DB: set --db_dir or config.data.db_dir", status=2)
  selection = _selection()
  if _LIST.value:
    _list(db_dir)
    return
  if selection.empty == (not _ADD_CORPUS.value):
    cli.fail("name what to remove (--remove_*) or what to add "
             "(--add_corpus), one per run", status=2)
  recall_queries = int(config.db.recall_queries)
  if not selection.empty:
    record = db_edit.remove_documents(db_dir, selection,
                                      recall_queries=recall_queries)
  else:
    from retro_jax.retrieval.embedder import BertEmbedder  # pylint: disable=g-import-not-at-top
    embedder = BertEmbedder.load(config.db.embedder or None,
                                 batch_size=config.db.embed_batch)
    source = sources.text_source(
        _ADD_CORPUS.value, _ADD_SPLIT.value or None, _ADD_MAX_BYTES.value,
        db_select.parse_meta(_ADD_META.value, "--add_meta"))
    record = db_edit.add_documents(
        db_dir, sources.source_documents(source), embedder,
        part=_ADD_PART.value, source=source,
        batch_size=config.db.embed_batch, recall_queries=recall_queries)
  table = fmt.read_json(f"{db_dir}/{neighbour_table.TABLE_DIR}/"
                        f"{neighbour_table.TABLE_JSON}")
  if table is not None and _REBUILD_TABLE.value:
    neighbour_table.build_table(db_dir, fmt.index_dir_of(db_dir),
                                int(table["candidates"]))
  elif table is not None:
    print(f"the neighbour table is now stale: rebuild it with "
          f"`{neighbour_table.REBUILD}` (or rerun with --rebuild_table)")
  print("Task caches of this DB are stale: rebuild them with "
        "`python scripts/cache_tasks.py --config=<run config>`")
  print("edit: " + json.dumps(record, default=str))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  cli.run(main)  # Bad input (a selection, a corpus): one line, status 1.
