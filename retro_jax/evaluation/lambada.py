"""LAMBADA last-word accuracy with retrieval on and off, as the RETRO paper
(Borgeaud et al. 2022) reports it.

Input: a JSON-lines file, one object {"text": ...} per line (the layout of
OpenAI's lambada_test.jsonl). The target is the text after the last space
(" "), the context everything before that space.

Tokenization: context ids = encode(context), target ids = encode(target).
The separating space belongs to neither string; SentencePiece's dummy
prefix puts it back as the "▁" that starts the target's first piece, so
context ids + target ids is the tokenization of the whole text (the
vocabularies of `corpus.vocab` split on whitespace first, so the two agree
whenever the context does not end in whitespace). Encoding " " + target
instead would add a second "▁".

A word is right when greedy decoding reproduces every one of its tokens:
teacher-forced, the argmax of the logits at each target position (given
the true context and the true earlier target tokens) is the target token.
Greedy decoding reproduces the word exactly when that holds for all of them.

Retrieval on: each complete 64-token chunk of the context retrieves k
neighbours (its detokenized text embedded by the DB's BERT, as for any
held-out text in `sequence_neighbours`); chunked cross-attention lets the
tokens from the end of chunk u on read Ret(C_u). Chunks that hold a target
token retrieve nothing (all-padding neighbours, which CCA ignores), so the
target never reaches the query. Retrieval off: no neighbours at all
(`Retro.apply(params, tokens, None)`), the decoder without CCA.

Leakage (paper §2.6), retrieval on: an example's r(C) is that of the chunk
holding its target (the larger of two if the target spans a boundary)
against the neighbours the chunk is predicted with, Ret(C_{u-1}) (the
"previous" source of `leakage`). Accuracy is also reported over the
examples with r(C) <= alpha, for the alphas of `report.ALPHAS`.

Examples are left-aligned and padded to one length (the longest, rounded up
to a multiple of m) and batched in a fixed batch size, so the forward pass
compiles once per retrieval setting.

Shape glossary: S examples, B batch, n padded length, m chunk size,
L = n // m chunks, k neighbours, r tokens per neighbour, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np

from retro_jax.config import PAD_ID
from retro_jax.core import files
from retro_jax.evaluation import leakage as leakage_lib
from retro_jax.evaluation import loaded_run
from retro_jax.evaluation import report
from retro_jax.evaluation import result_files
from retro_jax.retrieval import db_format
from retro_jax.retrieval import sequence_neighbours


NO_DB = result_files.NO_DB  # The DB identity of an evaluation that reads none.


@dataclasses.dataclass(frozen=True)
class Example:
  """One LAMBADA passage split into context and target word."""

  line: int  # 1-based line of the input file.
  context: str
  target: str


def split_target(text: str) -> Tuple[str, str]:
  """(context, target): the text before and after its last space.

  Raises:
    ValueError: no space, or nothing on one side of the last one.
  """
  cut = text.rfind(" ")
  if cut < 0:
    raise ValueError("the text has no space, so no target word")
  context, target = text[:cut], text[cut + 1:]
  if not target:
    raise ValueError("the text ends with a space: empty target word")
  if not context:
    raise ValueError("nothing precedes the target word: empty context")
  return context, target


def read_examples(path: str, max_examples: Optional[int] = None
                  ) -> List[Example]:
  """The examples of a LAMBADA-layout JSON-lines file (blank lines skipped).

  Raises:
    ValueError: naming the file and line, for a line that is not UTF-8, not
      a JSON object with a string "text", or whose text has no target word;
      and for a file without any example.
    FileNotFoundError: no such file.
  """
  return parse_examples(_read_bytes(path), path, max_examples)


def parse_examples(data: bytes, path: str,
                   max_examples: Optional[int] = None) -> List[Example]:
  """`read_examples` of the bytes `data` read from `path` (named in
  errors)."""
  examples = []
  for number, raw in enumerate(data.split(b"\n"), start=1):
    if max_examples is not None and len(examples) >= max_examples:
      break
    where = f"{path}:{number}"
    try:
      line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
      raise ValueError(f"{where}: not valid UTF-8 ({e.reason} at byte "
                       f"{e.start})") from None
    if not line.strip():
      continue
    try:
      obj = json.loads(line)
    except ValueError as e:
      raise ValueError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(obj, dict) or "text" not in obj:
      raise ValueError(f'{where}: expected a JSON object with a "text" '
                       f"field, got {line[:80]!r}")
    if not isinstance(obj["text"], str):
      raise ValueError(f'{where}: "text" is a {type(obj["text"]).__name__}, '
                       f"not a string")
    try:
      context, target = split_target(obj["text"])
    except ValueError as e:
      raise ValueError(f"{where}: {e}") from None
    examples.append(Example(number, context, target))
  if not examples:
    raise ValueError(f"{path}: no example (the file is empty)")
  return examples


def _read_bytes(path: str) -> bytes:
  p = epath.Path(path)  # Local, or gs://.
  if not p.is_file():
    raise FileNotFoundError(f"{path}: no such file")
  return p.read_bytes()


def db_identity(db_dir: str) -> str:
  """"db-" and the first 12 hex digits of the sha256 of the DB's manifest
  bytes: the DB's identity whatever its folder is called (the form
  scripts/evaluate.py's result names use)."""
  manifest = epath.Path(db_dir) / db_format.MANIFEST
  if not manifest.is_file():
    raise ValueError(f"{db_dir} is not a finalized retrieval DB (no "
                     f"{db_format.MANIFEST})")
  return result_files.db_identity(db_dir)


@dataclasses.dataclass
class Packed:
  """Examples tokenized, left-aligned and padded to one length."""

  tokens: np.ndarray  # int32 [S, n]: context, target, then PAD_ID.
  context_len: np.ndarray  # int64 [S]: C, context tokens.
  length: np.ndarray  # int64 [S]: T, context + target tokens.


def pack(sp, examples: Sequence[Example], chunk_size: int) -> Packed:
  """Tokenizes the examples (see the module docstring) into one array whose
  length is the longest example's, rounded up to a multiple of m."""
  pairs = [(sp.encode(e.context), sp.encode(e.target)) for e in examples]
  longest = max(len(c) + len(t) for c, t in pairs)
  n = -(-longest // chunk_size) * chunk_size
  tokens = np.full((len(pairs), n), PAD_ID, np.int32)  # [S, n]
  for i, (context, target) in enumerate(pairs):
    tokens[i, :len(context) + len(target)] = context + target
  return Packed(tokens,
                np.asarray([len(c) for c, _ in pairs], np.int64),
                np.asarray([len(c) + len(t) for c, t in pairs], np.int64))


def target_mask(context_len: np.ndarray, length: np.ndarray,
                n: int) -> np.ndarray:
  """bool [S, n]: position t holds a target token (C <= t < T)."""
  positions = np.arange(n)[None, :]  # [1, n]
  return ((positions >= np.asarray(context_len)[:, None])
          & (positions < np.asarray(length)[:, None]))


def words_correct(predicted: np.ndarray, tokens: np.ndarray,
                  context_len: np.ndarray, length: np.ndarray) -> np.ndarray:
  """bool [S]: every target token was the greedy prediction.

  Args:
    predicted: int [S, n], the argmax prediction of token t made from
      tokens < t (column 0 unused).
    tokens: int [S, n].
    context_len, length: int [S], C and T: tokens C .. T-1 are the target.
  """
  is_target = target_mask(context_len, length, tokens.shape[1])  # [S, n]
  if not is_target.any(-1).all():
    raise ValueError("an example has no target token")
  hit = np.asarray(predicted) == np.asarray(tokens)  # [S, n]
  return np.where(is_target, hit, True).all(-1)


def make_predict(model):
  """jitted (params, tokens [B, n], neighbours [B, L, k, r] | None) ->
  (predicted int32 [B, n], nll float32 [B, n]): the argmax prediction of
  token t and its NLL (nats) given tokens < t; column 0 is -1 and 0."""
  def fn(params, tokens, neighbours):
    # The last chunk's neighbours reach only the last position, which
    # predicts no token of the sequence.
    logits = model.apply(params, tokens, neighbours,
                         retrieve_for_last_position=False)  # [B, n, V]
    logits = logits[:, :-1]  # [B, n-1, V]: position t predicts token t+1.
    predicted = jnp.argmax(logits, -1).astype(jnp.int32)  # [B, n-1]
    picked = jnp.take_along_axis(logits, tokens[:, 1:, None], -1)[..., 0]
    nll = jax.nn.logsumexp(logits, -1) - picked  # [B, n-1]
    return (jnp.pad(predicted, ((0, 0), (1, 0)), constant_values=-1),
            jnp.pad(nll, ((0, 0), (1, 0))))
  return jax.jit(fn)


def context_neighbours(retriever, sp, tokens: np.ndarray,
                       context_len: np.ndarray, k: int, chunk_size: int,
                       neighbour_len: int) -> np.ndarray:
  """int32 [S, L, k, r]: k neighbours for each chunk that lies wholly in the
  context (chunk u with (u + 1) * m <= C); all padding for the others."""
  num, n = tokens.shape
  out = np.zeros((num, n // chunk_size, k, neighbour_len), np.int32)
  slots = [(i, u) for i in range(num)
           for u in range(int(context_len[i]) // chunk_size)]
  if not slots:  # Contexts shorter than a chunk: nothing to retrieve.
    return out
  chunks = np.stack([tokens[i, u * chunk_size:(u + 1) * chunk_size]
                     for i, u in slots])  # [q, m]
  texts = sequence_neighbours.chunk_texts(sp, chunks, chunk_size)
  _, values = retriever.retrieve_texts(texts, k)  # [q, k, r']
  if values.shape[-1] != neighbour_len:
    raise ValueError(f"the DB's neighbours have {values.shape[-1]} tokens, "
                     f"the model reads {neighbour_len}")
  for (i, u), value in zip(slots, values):
    out[i, u] = value
  return out


def example_leakage(packed: Packed, neighbours: np.ndarray,
                    chunk_size: int) -> np.ndarray:
  """float32 [S]: r(C) of the chunk(s) holding each example's target,
  against Ret(C_{u-1}) (see the module docstring)."""
  r = leakage_lib.chunk_leakage(packed.tokens, neighbours, chunk_size,
                                "previous")  # [S, L]
  chunks = np.arange(r.shape[1])[None, :]  # [1, L]
  holds_target = ((chunks >= (packed.context_len // chunk_size)[:, None])
                  & (chunks <= ((packed.length - 1) // chunk_size)[:, None]))
  return np.where(holds_target, r, 0.0).max(-1)  # [S]


def leakage_table(leakage: np.ndarray, correct_on: np.ndarray,
                  correct_off: np.ndarray,
                  alphas: Sequence[float] = report.ALPHAS
                  ) -> List[Dict[str, Any]]:
  """Per alpha: the examples with r(C) <= alpha and their accuracy with
  retrieval on and off (None when there is no such example)."""
  rows = []
  for alpha in alphas:
    keep = np.asarray(leakage) <= alpha  # [S]
    count = int(keep.sum())
    rows.append({
        "alpha": float(alpha), "examples": count,
        "accuracy_on": float(correct_on[keep].mean()) if count else None,
        "accuracy_off": float(correct_off[keep].mean()) if count else None})
  return rows


@dataclasses.dataclass
class Scored:
  """Per-example outcome of one retrieval setting."""

  correct: np.ndarray  # bool [S].
  target_nll: np.ndarray  # float64 [S]: summed NLL (nats) of the target.


def score(predict, params, packed: Packed, neighbours: Optional[np.ndarray],
          batch_size: int) -> Scored:
  """Runs `predict` (see `make_predict`) over the examples in batches of
  exactly `batch_size` rows (the last padded with empty rows, so one
  compile), with `neighbours` [S, L, k, r] or None (retrieval off)."""
  num, n = packed.tokens.shape
  predicted = np.zeros((num, n), np.int32)  # [S, n]
  nll = np.zeros((num, n), np.float64)  # [S, n]
  for lo in range(0, num, batch_size):
    rows = slice(lo, min(lo + batch_size, num))
    size = rows.stop - rows.start
    tokens = _pad_rows(packed.tokens[rows], batch_size)  # [B, n]
    nbs = None if neighbours is None else _pad_rows(neighbours[rows],
                                                    batch_size)
    got_pred, got_nll = predict(params, tokens, nbs)
    predicted[rows] = np.asarray(got_pred)[:size]
    nll[rows] = np.asarray(got_nll)[:size]
  is_target = target_mask(packed.context_len, packed.length, n)  # [S, n]
  return Scored(
      correct=words_correct(predicted, packed.tokens, packed.context_len,
                            packed.length),
      target_nll=(nll * is_target).sum(-1))


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
  """`x` [b, ...] with zero rows appended up to `rows`."""
  pad = np.zeros((rows - len(x),) + x.shape[1:], x.dtype)
  return np.concatenate([x, pad]) if len(pad) else x


def _side(scored: Scored) -> Dict[str, Any]:
  correct = int(scored.correct.sum())
  return {"accuracy": correct / len(scored.correct), "correct": correct,
          "target_nll": float(scored.target_nll.sum())}


def evaluate(run, examples: Sequence[Example], *, k: Optional[int] = None,
             batch_size: int = 8, predict=None) -> Dict[str, Any]:
  """Last-word accuracy of `run` (a `loaded_run.LoadedRun`) on `examples`.

  Args:
    run: the loaded checkpoint, with its vocabulary and (for a model with
      CCA) its retrieval DB.
    examples: from `read_examples`.
    k: neighbours per chunk (default: the k the run trained with).
    batch_size: examples per forward pass.
    predict: a `make_predict(run.model)` to reuse across calls.
  Returns:
    {"examples", "mean_target_tokens", "retrieval_off": {accuracy, correct,
    target_nll}, "retrieval_on": the same, or None for a model without CCA,
    "leakage": `leakage_table` rows (None without retrieval),
    "per_example": [{line, context_tokens, target_tokens, correct_off,
    correct_on, leakage}]}.
  """
  run.need_tokenizer()
  cfg = run.model_config
  k = k or cfg.num_neighbours
  predict = predict or make_predict(run.model)
  packed = pack(run.tokenizer, examples, cfg.chunk_size)
  off = score(predict, run.params, packed, None, batch_size)
  on = leakage = None
  if cfg.has_retrieval:
    if not run.db_dir:
      raise ValueError(f"run {run.workdir} has no retrieval DB "
                       f"(config.data.db_dir is empty): pass a DB")
    neighbours = context_neighbours(
        run.retriever, run.tokenizer, packed.tokens, packed.context_len, k,
        cfg.chunk_size, cfg.neighbour_len)  # [S, L, k, r]
    on = score(predict, run.params, packed, neighbours, batch_size)
    leakage = example_leakage(packed, neighbours, cfg.chunk_size)  # [S]
  target_len = packed.length - packed.context_len  # [S]
  per_example = [
      {"line": e.line, "context_tokens": int(packed.context_len[i]),
       "target_tokens": int(target_len[i]),
       "correct_off": bool(off.correct[i]),
       "correct_on": None if on is None else bool(on.correct[i]),
       "leakage": None if leakage is None else float(leakage[i])}
      for i, e in enumerate(examples)]
  return {"examples": len(examples),
          "mean_target_tokens": float(target_len.mean()),
          "retrieval_off": _side(off),
          "retrieval_on": None if on is None else _side(on),
          "num_neighbours": k if on is not None else 0,
          "leakage": None if on is None else leakage_table(
              leakage, on.correct, off.correct),
          "per_example": per_example}


def results_name(step: int, digest: str, db_id: str, k: int,
                 max_examples: Optional[int] = None) -> str:
  """lambada_step_<N>_file-<12 hex>_<db-<12 hex> | nodb>_k<k>[_first<M>]
  .json: the step, the input file's content, the DB and k (and the cap on
  examples), so distinct evaluations never share a file."""
  name = f"lambada_step_{step}_file-{digest[:12]}_{db_id}_k{k}"
  if max_examples:
    name += f"_first{max_examples}"
  return name + ".json"


def format_summary(results: Dict[str, Any]) -> str:
  """The lines the script prints."""
  lines = [f"lambada {os.path.basename(results['file'])}: "
           f"{results['examples']} examples, "
           f"{results['mean_target_tokens']:.2f} target tokens on average; "
           f"step {results['step']}, k={results['num_neighbours']}, "
           f"DB {results['db_dir'] or '-'}"]
  for side in ("retrieval_on", "retrieval_off"):
    s = results[side]
    label = side.replace("_", " ")
    if s is None:
      lines.append(f"  accuracy {label}: - (the model has no CCA layer)")
    else:
      lines.append(f"  accuracy {label}: {s['accuracy']:.4f} "
                   f"({s['correct']}/{results['examples']})")
  if results.get("leakage"):  # Paper §2.6: drop the examples that leak.
    lines.append("  examples with leakage r(C) <= alpha:")
    lines.append("    alpha  examples  acc on  acc off")
    for row in results["leakage"]:
      accuracy = ("  {:.4f}   {:.4f}".format(row["accuracy_on"],
                                              row["accuracy_off"])
                  if row["examples"] else "       -        -")
      lines.append(f"    {row['alpha']:5.3f}  {row['examples']:8d}{accuracy}")
  return "\n".join(lines)


def evaluate_file(workdir: str, path: str, step: Optional[int] = None,
                  db_dir: str = "", k: int = 0,
                  max_examples: Optional[int] = None, batch_size: int = 8,
                  log=print) -> Dict[str, Any]:
  """Evaluates a run's checkpoint on a LAMBADA-layout file and writes the
  results JSON to <workdir>/eval/ (name: `results_name`). Returns them.

  Args:
    workdir: the run folder (scripts/train.py).
    path: the JSON-lines file.
    step: a checkpoint step (default: the latest).
    db_dir: a DB to retrieve from instead of the run's (same vocabulary).
    k: neighbours per chunk (0: the k the run trained with).
    max_examples: evaluate the file's first examples only.
    batch_size: examples per forward pass.
    log: where the summary lines go.
  """
  data = _read_bytes(path)
  examples = parse_examples(data, path, max_examples)  # Before loading.
  run = loaded_run.LoadedRun.load(workdir, step, db_dir=db_dir or None)
  results = evaluate(run, examples, k=k or None, batch_size=batch_size)
  retrieves = results["retrieval_on"] is not None
  db_id = db_identity(run.db_dir) if retrieves else NO_DB
  digest = hashlib.sha256(data).hexdigest()  # Of the bytes evaluated.
  results.update(
      file=path, file_sha256=digest, workdir=workdir, step=run.step,
      db_dir=run.db_dir if retrieves else "", db_id=db_id,
      max_examples=max_examples or 0,
      convention="target = text after the last space; tokens = "
                 "encode(context) + encode(target); right = every target "
                 "token is the greedy argmax (teacher-forced)")
  out = epath.Path(workdir) / "eval" / results_name(
      run.step, digest, db_id, results["num_neighbours"], max_examples)
  results["json"] = str(out)
  files.write_json(out, results)
  log(format_summary(results))
  log(f"wrote {out}")
  return results
