r"""Trains RETRO on the Python standard library (embedded default corpus).

  python scripts/train.py --config=configs/tiny.py --workdir=runs/tiny \
      [--config.train.steps=200]

Stages: read the corpus -> train (or load) a SentencePiece vocabulary ->
tokenize and pack sequences -> attach neighbours -> train, printing the loss
-> report validation loss with retrieval on and off.

Until the retrieval database exists, each chunk's k neighbours are chunks
(with their continuations) drawn at random from *other* documents of the
corpus: real text of the right shape, but not nearest neighbours.
"""

import os
import time

from absl import app
from absl import flags
from ml_collections import config_flags
import jax
import numpy as np

import retro_jax
from retro_jax import sharding
from retro_jax import train
from retro_jax.corpus import packing
from retro_jax.corpus import sources
from retro_jax.corpus import vocab

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py",
                                          "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/tiny", "Output folder.")


def log(msg: str) -> None:
  print(msg, flush=True)


def tokenized(docs, sp):
  texts = [d.text for d in docs]
  return [(d.doc_id, np.asarray(ids, np.int32))
          for d, ids in zip(docs, sp.encode(texts))]


def random_neighbours(tokens, doc_ids, pool, pool_docs, k, rng):
  """[S, n] sequences -> [S, n/m, k, 2m] neighbours from other documents."""
  s, l, m = tokens.shape[0], tokens.shape[1] // pool.shape[1], pool.shape[1]
  out = np.zeros((s, l, k, 2 * m), np.int32)
  for i in range(s):
    own = set(np.unique(doc_ids[i]).tolist())
    picks = rng.integers(0, len(pool) - 1, (l * k * 4,))
    picks = [p for p in picks if pool_docs[p] not in own
             and pool_docs[p + 1] == pool_docs[p]][:l * k]
    for j, p in enumerate(picks):
      out[i, j // k, j % k] = np.concatenate([pool[p], pool[p + 1]])
  return out


def main(argv):
  del argv
  config, workdir = _CONFIG.value, _WORKDIR.value
  os.makedirs(workdir, exist_ok=True)
  cfg = retro_jax.RetroConfig.from_dict(config.model)
  tc = config.train
  rng = np.random.default_rng(tc.seed)

  # -- corpus and vocabulary --------------------------------------------------
  t0 = time.time()
  train_docs = list(sources.python_stdlib("train",
                                          max_bytes=config.data.max_bytes))
  valid_docs = list(sources.python_stdlib(
      "validation", max_bytes=config.data.max_bytes // 10))
  spm_path = config.data.vocab_model or os.path.join(workdir, "spm.model")
  if os.path.exists(spm_path):
    sp = vocab.load(spm_path)
  else:
    budget, texts = config.data.spm_train_bytes, []
    for d in train_docs:
      texts.append(d.text)
      budget -= len(d.text)
      if budget <= 0:
        break
    sp = vocab.train(texts, spm_path, cfg.vocab_size)
  if sp.vocab_size() != cfg.vocab_size:
    raise ValueError(f"vocabulary {spm_path} has {sp.vocab_size()} pieces but "
                     f"config.model.vocab_size is {cfg.vocab_size}")
  log(f"corpus: {len(train_docs)} train / {len(valid_docs)} validation files, "
      f"vocabulary {spm_path} ({time.time() - t0:.1f} s)")

  # -- sequences and neighbours ----------------------------------------------
  def sequences(docs):
    packed = list(packing.pack(tokenized(docs, sp), tc.seq_len))
    return (np.stack([p[0] for p in packed]), np.stack([p[1] for p in packed]))

  tokens, doc_ids = sequences(train_docs)
  v_tokens, v_doc_ids = sequences(valid_docs)
  pool = packing.chunks_of(tokens, cfg.chunk_size).reshape(-1, cfg.chunk_size)
  pool_docs = packing.chunks_of(doc_ids, cfg.chunk_size)[..., 0].reshape(-1)
  neighbours = random_neighbours(tokens, doc_ids, pool, pool_docs,
                                 cfg.num_neighbours, rng)
  v_neighbours = random_neighbours(v_tokens, v_doc_ids, pool, pool_docs,
                                   cfg.num_neighbours, rng)
  log(f"data: {tokens.shape[0]} train / {v_tokens.shape[0]} validation "
      f"sequences of {tc.seq_len} tokens, neighbours {neighbours.shape[1:]}")

  # -- model, optimizer, mesh -------------------------------------------------
  model = retro_jax.Retro(cfg)
  optimizer = train.make_optimizer(
      tc.learning_rate, tc.warmup_steps, tc.steps,
      weight_decay=tc.weight_decay, b2=tc.b2, clip_norm=tc.clip_norm or None)
  mesh = sharding.make_mesh(dict(config.mesh))
  sharding.check_batch_divides(tc.batch_size, mesh)

  def batch_at(idx, toks, nbs):
    return sharding.global_batch({"tokens": toks[idx], "neighbours": nbs[idx]},
                                 mesh)

  first = batch_at(np.arange(tc.batch_size), tokens, neighbours)
  _, state_sh, _ = train.state_shardings(model, optimizer, mesh, first)
  state = train.init_sharded_state(model, optimizer, state_sh,
                                   jax.random.key(tc.seed), first)
  step_fn = train.jit_train_step(model, optimizer, mesh, state_sh, first)
  log(f"model: {retro_jax.count_params(state.params):,} parameters, "
      f"mesh {dict(mesh.shape)}")

  # -- train ------------------------------------------------------------------
  order = rng.permutation(tokens.shape[0])
  t0 = time.time()
  for step in range(1, tc.steps + 1):
    start = ((step - 1) * tc.batch_size) % (len(order) - tc.batch_size + 1)
    state, metrics = step_fn(state, batch_at(order[start:start + tc.batch_size],
                                             tokens, neighbours))
    if step % tc.log_every == 0 or step == tc.steps:
      log(f"step {step:5d}  loss {float(metrics['loss']):.4f}  "
          f"grad_norm {float(metrics['grad_norm']):.3f}  "
          f"{(time.time() - t0) / step:.2f} s/step")

  # -- evaluate ---------------------------------------------------------------
  eval_fn = jax.jit(lambda p, b: train.loss_fn(model, p, b)[0])
  n = min(tc.eval_batches * tc.batch_size, v_tokens.shape[0])
  n -= n % tc.batch_size
  for name, nbs in (("retrieval on", v_neighbours),
                    ("retrieval off", np.zeros_like(v_neighbours))):
    losses = [float(eval_fn(state.params, batch_at(
        np.arange(i, i + tc.batch_size), v_tokens, nbs)))
              for i in range(0, n, tc.batch_size)]
    log(f"validation loss ({name}): {np.mean(losses):.4f} over {n} sequences")


if __name__ == "__main__":
  app.run(main)
