"""The retrieval DB: RETRO's chunk store, read through memory maps.

Every chunk of the retrieval corpus (m = 64 SentencePiece tokens of one
document, the last chunk of a document 0-padded) has a global id; the DB maps
ids to tokens, document ids, BERT embeddings and neighbour values (the chunk
followed by its continuation, the next chunk of the same document), and each
document to where it came from (attribution.py). Building it is db_build.py
and db_finalize.py (write_chunks -> embed_shards -> finalize, re-exported
here), editing it db_edit.py; its files are described in db_format.py. Only
a finalized DB, one with a manifest.json written after every shard was
checked, is ever opened.

  db = RetrievalDB.open(path, spm_path=..., embedder=bert)
  db.neighbour_values(ids)        # int32 [..., 2m]; id -1 -> all zeros
  db.document_of(chunk_id)        # {doc_id, source, title, meta, bytes}

Global ids are mapped to (shard, row) by a table of cumulative shard sizes;
a continuation is read across a shard boundary like any other chunk.

Shape glossary:
  N: chunks in the DB.   S: shards.   m: tokens per chunk (64).
  D: embedding width.    ...: any shape of an id array.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Iterator, List, Optional, Union

import numpy as np

from retro_jax.retrieval import attribution
from retro_jax.retrieval import db_format as fmt
from retro_jax.retrieval import db_stage
from retro_jax.retrieval.db_build import (CHUNK_SIZE, PAD_ID, chunk_document,
                                          embed_shard, embed_shards,
                                          embedding_plan, write_chunks)
from retro_jax.retrieval.db_finalize import (finalize, unfinalized_reason,
                                             update_manifest)
from retro_jax.retrieval.db_format import IncompleteDBError

__all__ = ["CHUNK_SIZE", "PAD_ID", "IncompleteDBError", "RetrievalDB",
           "chunk_document", "embed_shard", "embed_shards", "embedding_plan",
           "finalize", "update_manifest",
           "write_chunks"]

def gather_rows(arrays: List[np.ndarray], offsets: np.ndarray,
                ids: np.ndarray) -> np.ndarray:
  """Rows `ids` (global chunk ids, any shape) of per-shard `arrays` whose
  first rows are the ids `offsets[:-1]` ([S + 1] cumulative sizes):
  [..., *row shape]. Reads each shard once, so memory maps stay cheap."""
  ids = np.asarray(ids)
  if ids.dtype.kind not in "iu":
    raise TypeError(f"chunk ids must be integers, got {ids.dtype}")
  flat = ids.reshape(-1).astype(np.int64)  # [K]
  if flat.size and (flat.min() < 0 or flat.max() >= offsets[-1]):
    raise IndexError(f"chunk ids must lie in [0, {offsets[-1]}), got "
                     f"[{flat.min()}, {flat.max()}]")
  shard = np.searchsorted(offsets, flat, side="right") - 1  # [K]
  row = flat - offsets[shard]  # [K]
  first = arrays[0]
  out = np.empty((len(flat),) + first.shape[1:], first.dtype)  # [K, ...]
  for s in np.unique(shard):
    sel = shard == s
    out[sel] = arrays[s][row[sel]]
  return out.reshape(ids.shape + first.shape[1:])


class RetrievalDB:
  """A finalized retrieval DB, memory-mapped; open it with `RetrievalDB.open`.

  Attributes:
    path: the DB directory.
    manifest: its manifest.json.
  """

  def __init__(self, path: str, manifest: Dict[str, Any],
               tokens: List[np.ndarray], doc_ids: List[np.ndarray],
               embeddings: List[np.ndarray]):
    self.path, self.manifest = path, manifest
    self._tokens, self._doc_ids, self._embeddings = tokens, doc_ids, embeddings
    sizes = [s["num_chunks"] for s in manifest["shards"]]
    self._offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(
        np.int64)  # [S + 1]
    self._documents = attribution.ShardDocuments(
        [os.path.join(path, fmt.SHARDS, s["name"]) if fmt.DOCUMENTS in
         s["files"] else None for s in manifest["shards"]])

  @classmethod
  def open(cls, path: str, spm_path: Optional[str] = None,
           embedder: Union[None, str, Any] = None,
           verify: bool = False) -> RetrievalDB:
    """Opens a finalized DB.

    Args:
      path: the DB directory.
      spm_path: if given, the `.model` file the DB must have been built with.
      embedder: if given, a BertEmbedder (or its fingerprint) the DB must
        have been embedded with.
      verify: recompute every file's sha256 (else sizes only).
    Raises:
      IncompleteDBError: not finalized, or files missing or corrupted.
      ValueError: the vocabulary or embedder differs (both values named).
    """
    path = db_stage.local_dir(path)   # A gs:// DB: its staged copy.
    manifest = fmt.read_json(os.path.join(path, fmt.MANIFEST))
    if manifest is None:
      raise IncompleteDBError(
          f"{path} is not a finalized retrieval DB (no {fmt.MANIFEST}): "
          f"{unfinalized_reason(path)}; finish the build and run finalize")
    if manifest.get("format_version") != fmt.FORMAT_VERSION:
      raise IncompleteDBError(
          f"{path} has format version {manifest.get('format_version')}, "
          f"this code reads version {fmt.FORMAT_VERSION}")
    if spm_path is not None:
      have = fmt.sha256_file(spm_path)
      if have != manifest["spm_model_sha256"]:
        raise ValueError(
            f"{path} was built with the SentencePiece model of sha256 "
            f"{manifest['spm_model_sha256']}, {spm_path} has sha256 {have}")
    if embedder is not None:
      given = embedder if isinstance(embedder, str) else (
          f"{embedder.name!r} (fingerprint {embedder.fingerprint})")
      fp = embedder if isinstance(embedder, str) else embedder.fingerprint
      built = manifest["embedder"]
      if fp != built["fingerprint"]:
        raise ValueError(
            f"{path} was embedded with {built['name']!r} (fingerprint "
            f"{built['fingerprint']}), the given embedder is {given}")
    return cls.from_manifest(path, manifest, verify)

  @classmethod
  def from_manifest(cls, path: str, manifest: Dict[str, Any],
                    verify: bool = False) -> RetrievalDB:
    """The DB whose shards `manifest` lists (not necessarily the one in
    manifest.json: an edit opens the edited DB before switching to it).

    Raises:
      IncompleteDBError: shard files missing, corrupted or misshapen.
    """
    arrays = {fmt.TOKENS: [], fmt.DOC_IDS: [], fmt.EMBEDDINGS: []}
    problems = []
    for shard in manifest["shards"]:
      sdir = os.path.join(path, fmt.SHARDS, shard["name"])
      for fname, record in shard["files"].items():
        problem = fmt.file_problem(os.path.join(sdir, fname), record, verify)
        if problem:
          problems.append(problem)
        elif not problems and fname in arrays:  # Documents are read lazily.
          try:
            arrays[fname].append(np.load(os.path.join(sdir, fname),
                                         mmap_mode="r", allow_pickle=False))
          except ValueError as e:  # A damaged header of the right size.
            problems.append(f"{shard['name']}/{fname} is unreadable: {e}")
    for shard, t, d, e in zip(manifest["shards"], arrays[fmt.TOKENS],
                              arrays[fmt.DOC_IDS], arrays[fmt.EMBEDDINGS]):
      n = shard["num_chunks"]
      want = (((n, manifest["chunk_size"]), np.int32), ((n,), np.int64),
              ((n, manifest["embedding"]["dim"]),
               np.dtype(manifest["embedding"]["dtype"])))
      if [(a.shape, a.dtype) for a in (t, d, e)] != list(want):
        problems.append(f"{shard['name']} holds arrays of the wrong shape")
    if problems:
      raise IncompleteDBError(f"{path} is damaged: {fmt.describe(problems)}")
    return cls(path, manifest, arrays[fmt.TOKENS], arrays[fmt.DOC_IDS],
               arrays[fmt.EMBEDDINGS])

  @property
  def num_chunks(self) -> int:
    return int(self._offsets[-1])

  def __len__(self) -> int:
    return self.num_chunks

  @property
  def dim(self) -> int:
    return int(self.manifest["embedding"]["dim"])

  @property
  def chunk_size(self) -> int:
    return int(self.manifest["chunk_size"])

  def __repr__(self) -> str:
    return (f"RetrievalDB({self.path!r}, {self.num_chunks} chunks, "
            f"{len(self._tokens)} shards, {self.manifest['embedder']['name']})")

  def part(self, name: str) -> Dict[str, Any]:
    """The manifest's record of part `name` (e.g. "train"): its source and
    its chunk-id range [first_chunk, first_chunk + num_chunks)."""
    for part in self.manifest["parts"]:
      if part["name"] == name:
        return part
    raise ValueError(f"{self.path} has no part {name!r} (it has "
                     f"{[p['name'] for p in self.manifest['parts']]}): "
                     f"rebuild it with scripts/build_db.py")

  def _gather(self, arrays: List[np.ndarray], ids: np.ndarray) -> np.ndarray:
    """Rows `ids` (any shape, all in [0, N)) of per-shard `arrays`."""
    return gather_rows(arrays, self._offsets, ids)

  def chunk_tokens(self, ids: np.ndarray) -> np.ndarray:
    """int32 [..., m]: the tokens of chunks `ids` (0-padded)."""
    return self._gather(self._tokens, ids)

  def doc_ids_of(self, ids: np.ndarray) -> np.ndarray:
    """int64 [...]: the document of each chunk."""
    return self._gather(self._doc_ids, ids)

  def neighbour_values(self, ids: np.ndarray) -> np.ndarray:
    """int32 [..., 2m]: each chunk followed by its continuation (the next
    chunk of its document, or zeros after its last chunk); id -1 (no
    neighbour) gives all zeros."""
    ids = np.asarray(ids)
    if ids.size and ids.min() < -1:
      raise IndexError(f"chunk ids must be -1 or in [0, {self.num_chunks})")
    valid = ids >= 0  # [...]
    cur = np.where(valid, ids, 0)  # [...]
    nxt = cur + 1  # [...]
    has_next = valid & (nxt < self.num_chunks)
    nxt = np.where(has_next, nxt, 0)
    # Continuations cross shard boundaries: chunk ids are global.
    same_doc = has_next & (self.doc_ids_of(nxt) == self.doc_ids_of(cur))
    chunk = self.chunk_tokens(cur) * valid[..., None]  # [..., m]
    cont = self.chunk_tokens(nxt) * same_doc[..., None]  # [..., m]
    return np.concatenate([chunk, cont], axis=-1).astype(np.int32)

  def embeddings_of(self, ids: np.ndarray) -> np.ndarray:
    """float32 [..., D]: the stored embeddings of chunks `ids` (what BERT
    gave for them when the DB was built: no BERT runs here)."""
    return self._gather(self._embeddings, ids).astype(np.float32)

  def embedding_range(self, first: int, count: int) -> np.ndarray:
    """float32 [count, D]: the embeddings of chunks [first, first + count),
    read from the files of the shards they lie in (only this range).

    Read with plain file reads, not through the memory maps: pages read
    through a map stay in the process's resident memory while the map is
    open, so a stage that streams every shard's embeddings (the index
    build, the neighbour table) would grow with the DB (by 0.3x at 4x the
    DB in benchmarks/offline_memory.py); pages read with read() stay in
    the kernel's page cache instead."""
    if not 0 <= first <= first + count <= self.num_chunks:
      raise IndexError(f"range [{first}, {first + count}) is not within "
                       f"[0, {self.num_chunks})")
    out = np.empty((count, self.dim), np.float32)  # [count, D]
    for s, emb in enumerate(self._embeddings):
      lo, hi = self._offsets[s], self._offsets[s + 1]
      a, b = max(first, lo), min(first + count, hi)
      if a < b:
        row = emb.dtype.itemsize * self.dim  # Bytes per chunk.
        with open(emb.filename, "rb") as f:
          f.seek(emb.offset + (a - lo) * row)
          data = f.read((b - a) * row)
        out[a - first:b - first] = np.frombuffer(data, emb.dtype).reshape(
            b - a, self.dim)
    return out

  def shard_ranges(self) -> List[tuple]:
    """(first chunk id, chunks) of every DB shard, in order."""
    return [(int(a), int(b - a)) for a, b in
            zip(self._offsets[:-1], self._offsets[1:])]

  def embedding_shards(self) -> List[np.ndarray]:
    """The memory-mapped embeddings, one [n, D] array per shard, in id
    order (for builders that stream rather than load)."""
    return list(self._embeddings)

  def embeddings(self) -> np.ndarray:
    """float32 [N, D]: every chunk's embedding, in id order (loaded)."""
    return np.concatenate(self._embeddings, axis=0, dtype=np.float32)

  @property
  def content_version(self) -> str:
    """sha256 of the shard records: changes with every edit of the DB."""
    return self.manifest.get("content_version") or fmt.content_version(
        self.manifest["shards"])

  @property
  def has_sources(self) -> bool:
    """Whether every shard keeps its documents' sources (DBs built before
    attribution do not: their documents are known by id only)."""
    return self._documents.complete

  def shard_of(self, chunk_id: int) -> int:
    """The index of the DB shard holding `chunk_id`."""
    if not 0 <= chunk_id < self.num_chunks:
      raise IndexError(f"chunk id {chunk_id} is not in [0, "
                       f"{self.num_chunks})")
    return int(np.searchsorted(self._offsets, chunk_id, side="right") - 1)

  def document_of(self, chunk_id: int) -> Dict[str, Any]:
    """Where chunk `chunk_id` came from: {"doc_id", "source", "title",
    "meta", "bytes"}; source, title and bytes are None (meta {}) in a DB
    built before attribution."""
    chunk_id = int(chunk_id)
    doc_id = int(self.doc_ids_of(np.asarray([chunk_id]))[0])
    return self._documents.get(self.shard_of(chunk_id), doc_id)

  def documents(self) -> Iterator[Dict[str, Any]]:
    """Every document's record once, in chunk-id order (ValueError on a DB
    built before attribution)."""
    return self._documents.all(self.path)

  def chunk_text(self, chunk_id: int, sp) -> str:
    """The detokenized text of one chunk (what BERT embedded)."""
    tokens = self.chunk_tokens(np.asarray([chunk_id]))[0]  # [m]
    return sp.decode(tokens[tokens != PAD_ID].tolist())
