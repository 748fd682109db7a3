"""A training run's checkpoint with what scoring it needs: the model and its
params, the run's vocabulary, its retrieval DB (opened on first use) and the
compiled per-token NLL.

The evaluation job scores it; `retro_jax.load` (inference.run) returns a
`Run`, this class with generation and research helpers added, so that a run
is loaded one way.

The run's config.json (written by scripts/train.py) names the vocabulary
(config.data.spm_path, else the copy the DB build keeps in config.data.
db_dir) and the DB; `load(..., db_dir=...)` swaps in another DB of the same
vocabulary.
"""

from __future__ import annotations

import os
from typing import Optional

from etils import epath
import haiku as hk
import ml_collections

from retro_jax.config import RetroConfig
from retro_jax.corpus import vocab
from retro_jax.evaluation import scores
from retro_jax.model.network import Retro
from retro_jax.retrieval import db as dblib
from retro_jax.retrieval import db_format
from retro_jax.retrieval import sequence_neighbours
from retro_jax.training import step as train_step


def spm_path_of(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The run's SentencePiece model: the one training read (data.spm_path,
  else <data.db_dir>/spm.model, as `sequence_neighbours.default_spm_path`),
  else workdir/spm.model ("" if none exists)."""
  data = config.get("data", ml_collections.ConfigDict())
  for path in (sequence_neighbours.default_spm_path(
      data.get("spm_path", "") or "", data.get("db_dir", "") or ""),
               os.path.join(workdir, db_format.SPM_MODEL)):
    if path and epath.Path(path).exists():   # Local, or gs://.
      return path
  return ""


class LoadedRun:
  """A checkpoint, its model, vocabulary and (lazily) retriever."""

  def __init__(self, workdir: str, config: ml_collections.ConfigDict,
               params: hk.Params, step: int, spm_path: str = "",
               db_dir: str = "", embedder=None):
    self.workdir = workdir
    self.config = config  # The run's config.json.
    self.model_config = RetroConfig.from_dict(config.model)
    self.model = Retro(self.model_config)
    self.params = params
    self.step = step
    self.spm_path = spm_path
    self.tokenizer = vocab.load(spm_path) if spm_path else None
    self.db_dir = db_dir
    self._embedder = embedder
    self._db = self._retriever = None
    # The compiled per-token NLL, shared by every evaluation of this run.
    self.token_nll = scores.make_token_nll(self.model)

  @classmethod
  def load(cls, workdir: str, step: Optional[int] = None, mesh=None, *,
           db_dir: Optional[str] = None, spm_path: Optional[str] = None,
           embedder=None):
    """Restores a run's params (only those) and wraps them in `cls`.

    Args:
      workdir: the run folder written by scripts/train.py.
      step: a checkpoint step (default: the latest).
      mesh: restore the params sharded onto this mesh (default: one device).
      db_dir: a retrieval DB to use instead of the run's (same vocabulary).
      spm_path: a SentencePiece model to use instead of the run's.
      embedder: a BertEmbedder (default: the DB's default, loaded on use).
    """
    config, params, step = train_step.restore_params(workdir, step, mesh)
    data = config.get("data", ml_collections.ConfigDict())
    return cls(workdir, config, params, step,
               spm_path=spm_path or spm_path_of(config, workdir),
               db_dir=db_dir if db_dir is not None else (
                   data.get("db_dir", "") or ""),
               embedder=embedder)

  @property
  def retriever(self):
    """The `retrieval.neighbours.Retriever` over the DB (loaded on first
    use: the DB's index and BERT take seconds)."""
    if self._retriever is None:
      if not self.db_dir:
        raise ValueError(f"run {self.workdir} has no retrieval DB "
                         f"(config.data.db_dir is empty): pass db_dir= to "
                         f"retro_jax.load")
      if not self.spm_path:
        raise ValueError(f"run {self.workdir} has no SentencePiece model")
      self._retriever, _ = sequence_neighbours.load_retriever(
          self.db_dir, self.spm_path, self._embedder)
    return self._retriever

  @property
  def db(self):
    """The RetrievalDB (opened on first use)."""
    if self._db is None:
      self.retriever  # pylint: disable=pointless-statement  (checks the DB)
      self._db = dblib.RetrievalDB.open(self.db_dir)
    return self._db

  @property
  def searcher(self):
    """The DB's index searcher (loaded on first use)."""
    return self.retriever.searcher

  def need_tokenizer(self):
    """Raises unless the run has a SentencePiece model."""
    if self.tokenizer is None:
      raise ValueError(f"run {self.workdir} has no SentencePiece model "
                       f"(config.data.spm_path); pass spm_path= to load")
