"""KV-cached decoding and generation with retrieval at chunk boundaries."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retro_jax.inference import sampling
from retro_jax.config import RetroConfig
from retro_jax.model.network import Retro
from retro_jax.corpus import sources
from retro_jax.retrieval import build_job
from retro_jax.retrieval import sequence_neighbours
from retro_jax.retrieval.embedder import BertEmbedder


def test_sample_logits_filters():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
  keys = jax.random.key(1)
  greedy = sampling.sample_logits(logits, keys, 0.0)
  assert (greedy == 0).all()
  top2 = sampling.sample_logits(logits, keys, 1.0, top_k=2)
  assert set(np.unique(top2).tolist()) == {0, 1}
  nucleus = sampling.sample_logits(logits, keys, 1.0, top_p=0.7)
  assert set(np.unique(nucleus).tolist()) == {0, 1}  # 0.5 < 0.7 <= 0.8.
  assert (sampling.sample_logits(logits, keys, 1.0, top_p=0.1) == 0).all()
  full = sampling.sample_logits(logits, keys, 1.0)
  freq = np.bincount(np.asarray(full), minlength=4) / 4000
  np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.03)


@pytest.fixture(scope="module")
def small_db(tmp_path_factory):
  """A real retrieval DB (SentencePiece 512, MiniLM, exact index) over a
  small slice of the standard library."""
  root = tmp_path_factory.mktemp("sampling_db")
  db_dir = str(root / "db")
  embedder = BertEmbedder.load()
  build_job.build_database(
      db_dir, {"train": sources.text_source("python_stdlib", "train", 30_000)},
      str(root / "spm.model"), embedder, vocab_size=512,
      spm_train_bytes=200_000, shard_chunks=100, log=lambda _: None)
  retriever, sp = sequence_neighbours.load_retriever(
      db_dir, str(root / "spm.model"), embedder)
  return retriever, sp


@pytest.mark.slow
def test_cached_generation_equals_uncached_greedy(small_db):
  retriever, sp = small_db
  cfg = RetroConfig.preset("tiny")
  model = Retro(cfg)
  params = model.init(jax.random.key(7), *model.dummy_inputs())
  retrieve = sampling.make_retrieve(retriever, sp, cfg.num_neighbours)
  prompt = np.asarray([sp.encode("import os\ndef main():\n")], np.int32)
  sampler = sampling.Sampler(model)
  num = 3 * 64 + 5
  cached = sampler.generate(params, prompt, num, retrieve)
  full = sampler.generate(params, prompt, num, retrieve, use_cache=False)
  total = prompt.shape[1] + num
  assert len(cached.neighbours) == total // 64 >= 3
  np.testing.assert_array_equal(cached.tokens, full.tokens)
  for a, b in zip(cached.neighbours, full.neighbours):
    np.testing.assert_array_equal(a, b)
    assert (a[:, :, :64] > 0).all()  # Real DB chunks were retrieved.
  # Retrieval changes the continuation (after the first chunk).
  off = sampler.generate(params, prompt, num, None)
  assert not np.array_equal(off.tokens, cached.tokens)
  np.testing.assert_array_equal(off.tokens[:, :64], cached.tokens[:, :64])


@pytest.mark.slow
def test_cached_sampling_equals_uncached_with_the_same_key(small_db):
  retriever, sp = small_db
  cfg = RetroConfig.preset("tiny", num_neighbours=3)  # k != trained k is ok.
  model = Retro(cfg)
  params = model.init(jax.random.key(2), *model.dummy_inputs())
  retrieve = sampling.make_retrieve(retriever, sp, 3)
  prompt = np.asarray([sp.encode("class Foo:\n")], np.int32)
  sampler = sampling.Sampler(model)
  kw = dict(temperature=0.8, top_k=40, top_p=0.95, rng=jax.random.key(5))
  a = sampler.generate(params, prompt, 70, retrieve, **kw)
  b = sampler.generate(params, prompt, 70, retrieve, use_cache=False, **kw)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert a.neighbours[0].shape == (1, 3, 128)
  c = sampler.generate(params, prompt, 70, retrieve,
                       **dict(kw, rng=jax.random.key(6)))
  assert not np.array_equal(a.tokens, c.tokens)
