"""Building the retrieval DB: chunk, embed, finalize (streaming, resumable).

Three stages, each safe to kill at any point and rerun (db_format.py has the
layout and the atomic-write rules that make this true):

  1. write_chunks   documents -> SentencePiece ids + EOS -> 64-token chunks
                    (corpus/packing.document_chunks) and each document's
                    source and metadata (shard_writer.py), in shards of
                    `shard_chunks` chunks; one pass over a stream per part
                    (the training split first, then any extra text), one
                    shard in memory. A rerun re-reads the stream and
                    rewrites only shards whose bytes differ from what is on
                    disk or that are damaged.
  2. embed_shard    frozen BERT over the detokenized chunks of one shard:
                    the unit of work of the Beam pipeline that runs the stage
                    over workers (beam_jobs.embed_pipeline, after
                    `embedding_plan` lists the shards left); `embed_shards`
                    is the same loop in one process. Complete shards are
                    skipped.
  3. finalize       checks every shard against its checksums and writes
                    manifest.json, the only file that makes the DB servable.

A document's chunks are consecutive and may run across a shard boundary; the
continuation of chunk i is chunk i + 1 when both have the same document id,
which readers derive (nothing about continuations is stored, so nothing about
them can go stale).

Shape glossary:
  t: tokens of a document.   c: its chunks, ceil((t + 1) / m).
  n: chunks in a shard.      m: tokens per chunk (64).   D: embedding width.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Any, Dict, Iterable, Mapping, Optional, Union

from etils import epath
import numpy as np
import tqdm

from retro_jax.config import CHUNK_SIZE, PAD_ID
from retro_jax.core import files
from retro_jax.corpus import vocab
from retro_jax.corpus.packing import chunk_document, document_chunks
from retro_jax.corpus.sources import Document
from retro_jax.retrieval import db_format as fmt
from retro_jax.retrieval import shard_writer

EMBEDDING_DTYPES = ("float32", "float16")


def spm_model_bytes(sp, spm_path: Optional[str]) -> bytes:
  """The `.model` file's bytes, or the processor's serialized model (the same
  bytes for a model written by corpus.vocab.train)."""
  if spm_path is None:
    return sp.serialized_model_proto()
  return epath.Path(spm_path).read_bytes()  # Local or gs://.


def _start_build(out_dir: str, build: Dict[str, Any], record: bool) -> None:
  """Records the build parameters (if `record`), refusing a directory built
  with others."""
  os.makedirs(out_dir, exist_ok=True)
  old = fmt.read_json(os.path.join(out_dir, fmt.BUILD))
  if old is None:
    if [f for f in os.listdir(out_dir) if fmt.TMP_MARK not in f]:
      raise ValueError(f"{out_dir} is not empty and holds no {fmt.BUILD}: "
                       f"not a retrieval DB directory, refusing to write")
  else:
    for key in ("format_version", "spm_model_sha256", "chunk_size",
                "shard_chunks"):
      if old.get(key) != build[key]:
        raise ValueError(
            f"{out_dir} was built with {key} {old.get(key)!r}, this build has "
            f"{build[key]!r}: build into a fresh directory")
  if record:
    fmt.write_json_atomic(os.path.join(out_dir, fmt.BUILD), build)


def write_chunks(docs: Union[Iterable[Document],
                              Mapping[str, Iterable[Document]]],
                 sp, out_dir: str, shard_chunks: int = 65536,
                 spm_path: Optional[str] = None, chunk_size: int = CHUNK_SIZE,
                 sources: Optional[Mapping[str, Any]] = None,
                 progress: bool = True) -> Dict[str, Any]:
  """Stage 1: tokenizes and chunks `docs` into shards under `out_dir`.

  Args:
    docs: the corpus, streamed once: one iterable, or {part name: iterable}
      whose parts are written in order, each a contiguous range of chunk
      ids (the build job writes part "train", the Task's training split,
      first; training sequences are cut from it).
    sp: a SentencePieceProcessor (corpus/vocab.py).
    out_dir: the DB directory (created; a rerun resumes it).
    shard_chunks: chunks per shard (the last shard holds the rest).
    spm_path: the `.model` file of `sp`, whose bytes the DB records and
      copies (default: the processor's serialized model).
    chunk_size: m, tokens per chunk.
    sources: {part name: what it was read from (corpus spec, split, byte
      cap, meta filter)}, recorded with the part so that a Task can check
      that the DB's training part is its training split.
    progress: show a tqdm bar.
  Returns:
    A summary: counts of documents, chunks, tokens, padding, text bytes,
    short and skipped documents by reason, shards written / reused, and
    "parts": [{name, source, first_chunk, num_chunks, num_documents,
    num_tokens, pad_tokens}].
  Raises:
    ValueError: the directory was built with another vocabulary, chunk or
      shard size, or is finalized and differs; or no document gave a chunk.
  """
  if shard_chunks < 1 or chunk_size < 1:
    raise ValueError(f"shard_chunks {shard_chunks} and chunk_size "
                     f"{chunk_size} must be positive")
  if not isinstance(docs, Mapping):
    docs = {"corpus": docs}
  sources = dict(sources or {})
  spm_bytes = spm_model_bytes(sp, spm_path)
  build = {"format_version": fmt.FORMAT_VERSION,
           "spm_model_sha256": fmt.sha256_bytes(spm_bytes),
           "chunk_size": chunk_size, "shard_chunks": shard_chunks,
           "started": time.time(), "chunks": None}
  manifest = fmt.read_json(os.path.join(out_dir, fmt.MANIFEST))
  if manifest is not None and manifest.get("edits"):
    raise ValueError(
        f"{out_dir} was edited ({len(manifest['edits'])} edits, "
        f"scripts/edit_db.py): its shards no longer follow the corpus; build "
        f"into a fresh directory")
  # A finalized DB's build.json is rewritten only if the rerun matches it.
  _start_build(out_dir, build, record=manifest is None)
  spm_file = os.path.join(out_dir, fmt.SPM_MODEL)
  if (not os.path.isfile(spm_file)
      or fmt.sha256_file(spm_file) != build["spm_model_sha256"]):
    fmt.write_bytes_atomic(spm_file, spm_bytes)
  writer = shard_writer.ShardWriter(out_dir, shard_chunks, chunk_size,
                                    manifest)
  skipped = shard_writer.new_skip_counts()
  counts = dict(num_documents=0, num_chunks=0, num_tokens=0, pad_tokens=0,
                text_bytes=0, short_documents=0)
  parts = []
  seen_ids = set()  # Document ids written so far, every part.
  bar = tqdm.tqdm(desc="chunking", unit="doc", disable=not progress)
  for name, part_docs in docs.items():
    part = dict(name=name, source=sources.get(name),
                first_chunk=counts["num_chunks"], num_chunks=0,
                num_documents=0, num_tokens=0, pad_tokens=0)
    for doc, ids, nbytes in shard_writer.tokenized_documents(
        part_docs, sp, skipped, seen_ids, bar.update):
      chunks = document_chunks(np.asarray(ids, np.int32),
                               chunk_size)  # [c, m]
      writer.add(chunks, doc.doc_id,
                 shard_writer.document_record(doc, nbytes))
      pad = chunks.size - len(ids) - 1  # The rest of the last chunk.
      for c in (counts, part):
        c["num_documents"] += 1
        c["num_chunks"] += len(chunks)
        c["num_tokens"] += len(ids)
        c["pad_tokens"] += pad
      counts["text_bytes"] += nbytes
      counts["short_documents"] += len(ids) < chunk_size
    parts.append(part)
  writer.flush()
  bar.close()
  num_shards = writer.index
  if manifest is not None and num_shards != len(manifest["shards"]):
    raise ValueError(f"{out_dir} is finalized with {len(manifest['shards'])} "
                     f"shards, this corpus gives {num_shards}: build into a "
                     f"fresh directory")
  shards_root = os.path.join(out_dir, fmt.SHARDS)
  for name in sorted(os.listdir(shards_root)) if os.path.isdir(
      shards_root) else []:
    if (name.startswith("shard-") and name[6:].isdigit()
        and int(name[6:]) >= num_shards):
      shutil.rmtree(os.path.join(shards_root, name))  # From a longer corpus.
  positions = counts["num_chunks"] * chunk_size
  summary = dict(counts, pad_percent=round(
      100 * counts["pad_tokens"] / max(positions, 1), 2),
                 skipped=skipped, num_shards=num_shards,
                 shards_written=writer.written, shards_reused=writer.reused,
                 chunk_size=chunk_size, shard_chunks=shard_chunks,
                 spm_model_sha256=build["spm_model_sha256"], parts=parts)
  fmt.write_json_atomic(os.path.join(out_dir, fmt.BUILD),
                        dict(build, chunks=summary))
  if not counts["num_chunks"]:
    raise ValueError(f"no document gave a chunk (skipped: {skipped}): "
                     f"the corpus is empty")
  return summary


def load_build(db_dir: str) -> Dict[str, Any]:
  """build.json of a DB whose stage 1 (write_chunks) has finished."""
  build = fmt.read_json(os.path.join(db_dir, fmt.BUILD))
  if build is None:
    raise fmt.IncompleteDBError(f"{db_dir} holds no {fmt.BUILD}: not a "
                                f"retrieval DB (run write_chunks first)")
  if build.get("chunks") is None:
    raise fmt.IncompleteDBError(
        f"{db_dir}: write_chunks has not finished (rerun it; complete shards "
        f"are kept)")
  return build


def _check_embedder(record: Dict[str, Any], want: Dict[str, Any],
                    where: str) -> None:
  """Refuses to mix embedders (or embedding dtypes) in one DB."""
  have = record.get("embedder", {})
  if have.get("fingerprint") != want["fingerprint"]:
    raise ValueError(
        f"{where} was embedded with {have.get('name')!r} (fingerprint "
        f"{have.get('fingerprint')}), this embedder is {want['name']!r} "
        f"(fingerprint {want['fingerprint']}): build into a fresh directory")
  if record.get("dtype") != want["dtype"]:
    raise ValueError(f"{where} holds {record.get('dtype')} embeddings, this "
                     f"run asks for {want['dtype']}")


def _embed_shard(sdir: str, chunks: Dict[str, Any], sp, embedder,
                 want: Dict[str, Any], batch_size: int, bar) -> None:
  """Embeds one shard into embeddings.npy (+ its record, written last)."""
  fmt.remove_temporaries(sdir)
  record_path = os.path.join(sdir, fmt.EMBEDDINGS_RECORD)
  if os.path.exists(record_path):
    os.remove(record_path)
  tokens = np.load(os.path.join(sdir, fmt.TOKENS), mmap_mode="r",
                   allow_pickle=False)  # [n, m]
  n = len(tokens)
  path = os.path.join(sdir, fmt.EMBEDDINGS)
  tmp = files.tmp_name(path)
  # Written in place through a memmap: a shard's vectors never sit in RAM.
  out = np.lib.format.open_memmap(tmp, mode="w+", dtype=want["dtype"],
                                  shape=(n, embedder.dim))  # [n, D]
  for start in range(0, n, batch_size):
    rows = np.asarray(tokens[start:start + batch_size])  # [b, m]
    texts = sp.decode([r[r != PAD_ID].tolist() for r in rows])
    out[start:start + len(rows)] = embedder.embed(texts)  # [b, D]
    bar.update(len(rows))
  out.flush()
  del out
  with open(tmp, "rb+") as f:
    os.fsync(f.fileno())
  files.commit(tmp, path)
  fmt.write_json_atomic(record_path, dict(
      want, num_chunks=n, dim=embedder.dim,
      tokens_sha256=chunks["files"][fmt.TOKENS]["sha256"],
      file={"sha256": fmt.sha256_file(path), "bytes": os.path.getsize(path)}))


def embedding_plan(db_dir: str, embedder, dtype: str = "float32"
                   ) -> Dict[str, Any]:
  """What stage 2 has left: {"todo": [shard indices whose embeddings are
  missing, stale or damaged], "done": [complete ones], "num_chunks": {i: n}}.

  Raises:
    ValueError: a shard was embedded with another embedder or dtype.
    IncompleteDBError: stage 1 is unfinished or a chunk file is damaged.
  """
  if dtype not in EMBEDDING_DTYPES:
    raise ValueError(f"dtype {dtype!r} is not one of {EMBEDDING_DTYPES}")
  manifest = fmt.read_json(os.path.join(db_dir, fmt.MANIFEST))
  if manifest is not None and manifest.get("edits"):
    # An edited DB's shards are those of its manifest, all embedded (an
    # edit embeds what it adds); build.json describes the DB as built.
    shards = manifest["shards"]
    return {"todo": [], "done": list(range(len(shards))),
            "num_chunks": {i: s["num_chunks"] for i, s in enumerate(shards)}}
  build = load_build(db_dir)
  want = {"name": embedder.name, "fingerprint": embedder.fingerprint,
          "dtype": dtype}
  todo, done, sizes = [], [], {}
  for i in range(build["chunks"]["num_shards"]):
    sdir = fmt.shard_dir(db_dir, i)
    problem = fmt.chunks_problem(sdir, verify=True)
    if problem:
      raise fmt.IncompleteDBError(f"{db_dir}: {problem}; rerun write_chunks")
    chunks = fmt.read_json(os.path.join(sdir, fmt.CHUNKS_RECORD))
    sizes[i] = chunks["num_chunks"]
    record = fmt.read_json(os.path.join(sdir, fmt.EMBEDDINGS_RECORD))
    if record is not None:
      _check_embedder(record, want, os.path.join(db_dir, fmt.shard_name(i)))
    if fmt.embeddings_problem(sdir, chunks, verify=True) is None:
      done.append(i)
    else:
      todo.append(i)
  return {"todo": todo, "done": done, "num_chunks": sizes}


def embed_shard_dir(sdir: str, sp, embedder, batch_size: int = 256,
                    dtype: str = "float32", bar=None) -> int:
  """Embeds the shard in directory `sdir` (its chunk files complete),
  whatever its name: what an edit that adds documents runs on its new
  shards. Returns the number of chunks embedded."""
  problem = fmt.chunks_problem(sdir, verify=True)
  if problem:
    raise fmt.IncompleteDBError(f"{sdir}: {problem}")
  chunks = fmt.read_json(os.path.join(sdir, fmt.CHUNKS_RECORD))
  want = {"embedder": {"name": embedder.name,
                       "fingerprint": embedder.fingerprint}, "dtype": dtype}
  _embed_shard(sdir, chunks, sp, embedder, want, batch_size,
               bar if bar is not None else tqdm.tqdm(disable=True))
  return chunks["num_chunks"]


def embed_shard(db_dir: str, index: int, embedder, batch_size: int = 256,
                dtype: str = "float32", bar=None) -> int:
  """Embeds shard `index` of a DB whose stage 1 has finished, whatever its
  state (one unit of work for any scheduler: a loop, a Beam DoFn). Its
  files are written whole, record last, so a killed call leaves the shard
  unembedded, never half-embedded. Returns the number of chunks embedded.
  """
  build = load_build(db_dir)
  spm_file = os.path.join(db_dir, fmt.SPM_MODEL)
  if (not os.path.isfile(spm_file)
      or fmt.sha256_file(spm_file) != build["spm_model_sha256"]):
    raise fmt.IncompleteDBError(f"{spm_file} is missing or damaged: rerun "
                                f"write_chunks")
  sdir = fmt.shard_dir(db_dir, index)
  problem = fmt.chunks_problem(sdir, verify=True)
  if problem:
    raise fmt.IncompleteDBError(f"{db_dir}: {problem}; rerun write_chunks")
  chunks = fmt.read_json(os.path.join(sdir, fmt.CHUNKS_RECORD))
  want = {"embedder": {"name": embedder.name,
                       "fingerprint": embedder.fingerprint}, "dtype": dtype}
  _embed_shard(sdir, chunks, vocab.load(spm_file), embedder, want,
               batch_size, bar if bar is not None else tqdm.tqdm(
                   disable=True))
  return chunks["num_chunks"]


def embed_shards(db_dir: str, embedder, shard_index: int = 0,
                 num_shards: int = 1, batch_size: int = 256,
                 dtype: str = "float32",
                 progress: bool = True) -> Dict[str, Any]:
  """Stage 2 in this process: embeds the shards i with i % num_shards ==
  shard_index that are not complete (`embedding_plan`, `embed_shard`).

  Args:
    db_dir: a DB whose write_chunks has finished.
    embedder: a BertEmbedder (anything with .embed, .dim, .name and
      .fingerprint).
    shard_index: this worker, in [0, num_shards).
    num_shards: the number of workers.
    batch_size: chunks per embed() call (and per progress update).
    dtype: "float32" or "float16" storage of the embeddings.
    progress: show a tqdm bar (chunks/s).
  Returns:
    {"embedded": shard indices embedded now, "skipped": complete ones,
     "chunks_embedded": how many chunks were embedded now}.
  Raises:
    ValueError: a shard was embedded with another embedder or dtype.
    IncompleteDBError: stage 1 is unfinished or a chunk file is damaged.
  """
  if not 0 <= shard_index < num_shards:
    raise ValueError(f"shard_index {shard_index} must lie in [0, "
                     f"num_shards={num_shards})")
  plan = embedding_plan(db_dir, embedder, dtype)
  mine = lambda ids: [i for i in ids if i % num_shards == shard_index]
  todo, skipped = mine(plan["todo"]), mine(plan["done"])
  total = sum(plan["num_chunks"][i] for i in todo)
  bar = tqdm.tqdm(total=total, unit="chunk", disable=not progress,
                  desc=f"embedding (worker {shard_index}/{num_shards})")
  for i in todo:
    embed_shard(db_dir, i, embedder, batch_size, dtype, bar)
  bar.close()
  return {"embedded": todo, "skipped": skipped, "chunks_embedded": total}
