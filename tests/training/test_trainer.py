"""The training loop (retro_jax.training.loop) in-process on 8 simulated
devices: loss falls, sharded == one device, NaN stops with a good checkpoint
kept, SIGTERM saves, RETROfit freezes the baseline bit for bit, bad input
fails before any compute."""

import json
import math
import os
import signal

import jax
import numpy as np
import pytest

from retro_jax import Retro, RetroConfig
from retro_jax.core import sharding
from retro_jax.data import train_sources
from retro_jax.training import checkpoints
from retro_jax.training import loop as loop_lib
from retro_jax.training import run_config
from retro_jax.training import step as step_lib
from conftest import REPO_ROOT

# Tests below compile the same programs more than once: cache them.
jax.config.update("jax_compilation_cache_dir",
                  os.path.join(REPO_ROOT, ".pytest_cache", "jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def tiny_config(**train_overrides):
  """configs/tiny.py, shrunk: vocab 256, batch 8 of 128 tokens."""
  config = run_config.load_config_file(
      os.path.join(REPO_ROOT, "configs", "tiny.py"))
  config.model.update(dict(vocab_size=256, num_layers=2, cca_layers=(2,),
                           enc_num_layers=1))
  config.train.update(dict(batch_size=8, seq_len=128, steps=6, log_every=1,
                           warmup_steps=2, total_steps=20, learning_rate=3e-3,
                           peak_flops=1e11))
  config.train.update(train_overrides)
  config.checkpoint.update(dict(every=100, keep=2, async_save=False))
  return config


def init_params(config):
  """The parameters a run of `config` starts from (seed 0)."""
  cfg = RetroConfig.from_dict(config.model)
  model = Retro(cfg)
  tokens, neighbours = model.dummy_inputs(1, config.train.seq_len)
  return jax.device_get(jax.jit(model.init)(
      jax.random.key(config.train.seed), tokens, neighbours))


def params_of(summary):
  return loop_lib.host_params(summary["state"])


def flat(params):
  return {f"{m}/{n}": v for m, leaves in params.items()
          for n, v in leaves.items()}


@pytest.mark.slow
def test_loss_decreases_on_8_device_mesh(tmp_path, capsys):
  config = tiny_config(steps=8)
  config.mesh.update(dict(data=2, fsdp=2, model=2))
  summary = loop_lib.train(config, str(tmp_path))
  out = capsys.readouterr().out
  losses = [float(l.split("loss ")[1].split()[0])
            for l in out.splitlines() if l.startswith("step ")]
  assert len(losses) == 8, out
  assert losses[-1] < losses[0] - 0.3, losses
  assert "tok/s" in out and "MFU" in out and "ETA" in out
  assert summary["status"] == "done" and summary["step"] == 8
  assert checkpoints.Checkpointer(str(tmp_path), save_every=100,
                                  keep=2).latest_step() == 8
  assert os.listdir(tmp_path / "checkpoints")
  assert any(f.startswith("events.out.tfevents") for f in
             os.listdir(tmp_path))


@pytest.mark.slow
def test_sharded_matches_one_device_over_3_steps(tmp_path):
  config = tiny_config(steps=3)
  config.mesh.update(dict(data=2, fsdp=2, model=2))
  sharded = loop_lib.train(config, str(tmp_path / "sharded"))
  config.mesh.update(dict(data=1, fsdp=1, model=1))
  single = loop_lib.train(config, str(tmp_path / "single"),
                         devices=jax.devices()[:1])
  a, b = flat(params_of(sharded)), flat(params_of(single))
  assert a.keys() == b.keys()
  moved = 0
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=2e-4, atol=2e-5, err_msg=k)
  first = flat(init_params(config))
  moved = sum(not np.allclose(a[k], first[k]) for k in a)
  assert moved > len(a) // 2          # Training changed most parameters.
  np.testing.assert_allclose(sharded["metrics"]["loss"],
                             single["metrics"]["loss"], rtol=1e-5)


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  # The rate jumps to 1e38 after warmup: parameters overflow within steps.
  config = tiny_config(steps=8, learning_rate=1e38, warmup_steps=2,
                       clip_norm=0.0)
  config.checkpoint.every = 1
  with pytest.raises(loop_lib.NonFiniteLossError,
                     match=r"non-finite loss .* last good checkpoint is step"):
    loop_lib.train(config, str(tmp_path), devices=jax.devices()[:1])
  _, params, step = checkpoints.restore_params(str(tmp_path))
  assert 1 <= step < 8
  assert all(np.isfinite(np.asarray(v)).all()
             for v in jax.tree_util.tree_leaves(params))


@pytest.mark.slow
def test_sigterm_saves_and_returns(tmp_path):
  config = tiny_config(steps=50)
  base = train_sources.make_source(config)

  def source(start):
    for i, batch in enumerate(base(start)):
      if start + i == 3:                # Preempted while step 4 is read.
        os.kill(os.getpid(), signal.SIGTERM)
      yield batch

  # No read-ahead, so the signal arrives at a known step (with prefetching
  # it comes while an earlier step runs: tests/training/test_prefetch.py).
  summary = loop_lib.train(config, str(tmp_path), source=source,
                          devices=jax.devices()[:1], prefetch_depth=0)
  assert summary["status"] == "preempted"
  assert summary["step"] == 4
  ckpt = checkpoints.Checkpointer(str(tmp_path), save_every=100, keep=2)
  assert ckpt.latest_step() == 4
  # The default handler is back.
  assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


@pytest.mark.slow
def test_retrofit_trains_only_retrieval_weights(tmp_path):
  base = tiny_config(steps=3)
  base.model.cca_layers = ()
  base.model.scan_layers = True     # Stacked layers: grafted per layer.
  base_params = flat(params_of(loop_lib.train(base, str(tmp_path / "base"),
                                             devices=jax.devices()[:1])))
  retro = tiny_config(steps=3, trainable="retrieval",
                      init_from=str(tmp_path / "base"))
  retro.mesh.update(dict(data=2, fsdp=2, model=2))
  summary = loop_lib.train(retro, str(tmp_path / "retro"))
  after = flat(params_of(summary))
  frozen = [k for k in after if not step_lib.is_retrieval_module(k)]
  trained = [k for k in after if step_lib.is_retrieval_module(k)]
  assert len(trained) >= 4 and len(frozen) >= 10
  per_layer = {}
  for k, v in base_params.items():    # Unstack "layers_00_01" per layer.
    module, name = k.rsplit("/", 1)
    if "layers_00_01" in module:
      for j in range(v.shape[0]):
        per_layer[module.replace("layers_00_01", f"layer_{j:02d}")
                  + "/" + name] = v[j]
    else:
      per_layer[k] = v
  for k in frozen:
    assert np.array_equal(after[k], per_layer[k]), k    # Bit-identical.
  init = flat(init_params(retro))
  assert sum(not np.allclose(after[k], init[k]) for k in trained) > \
      len(trained) // 2


def test_bad_input_fails_before_compute(tmp_path):
  config = tiny_config(batch_size=6)
  config.mesh.update(dict(data=2, fsdp=2, model=2))
  with pytest.raises(ValueError, match="batch size 6 does not divide"):
    loop_lib.train(config, str(tmp_path / "a"))
  assert not os.path.exists(tmp_path / "a" / "checkpoints")

  config = tiny_config(accum_steps=3)
  with pytest.raises(ValueError, match="accum_steps=3 must"):
    loop_lib.train(config, str(tmp_path / "b"))

  del config.train.log_every
  with pytest.raises(ValueError, match=r"lacks config\.train\.log_every"):
    loop_lib.train(config, str(tmp_path / "c"))

  config = tiny_config()   # 3 data shards over the 8 rows.
  config.data.num_shards = 3
  with pytest.raises(ValueError, match=r"config.data.num_shards=3 must"):
    loop_lib.train(config, str(tmp_path / "e"))

  # A workdir holding a run of another architecture.
  config = tiny_config()
  run_config.save_run_config(str(tmp_path / "d"), config)
  config.model.d_model = 32
  with pytest.raises(ValueError, match=r"another model architecture.*d_model"):
    loop_lib.train(config, str(tmp_path / "d"))


@pytest.mark.slow
def test_resume_with_another_data_stream_fails(tmp_path):
  workdir = str(tmp_path)
  loop_lib.train(tiny_config(steps=1), workdir, devices=jax.devices()[:1])
  ckpt = checkpoints.Checkpointer(workdir, save_every=100, keep=2)
  saved = ckpt.data_position()
  ckpt.close()
  assert saved == dict(step=1, source="synthetic", seed=0, task_name=saved[
      "task_name"], split=saved["split"], num_shards=1, host_batch_size=8)
  with pytest.raises(ValueError, match=r"another data stream: seed: saved 0, "
                                       r"now 1.*allow_data_change"):
    loop_lib.train(tiny_config(steps=2, seed=1), workdir,
                  devices=jax.devices()[:1])
  summary = loop_lib.train(tiny_config(steps=2, seed=1, allow_data_change=True),
                          workdir, devices=jax.devices()[:1])
  assert summary["step"] == 2


@pytest.mark.slow
def test_grad_accumulation_equals_full_batch(tmp_path):
  one = loop_lib.train(tiny_config(steps=2), str(tmp_path / "one"),
                      devices=jax.devices()[:1])
  acc = loop_lib.train(tiny_config(steps=2, accum_steps=4),
                      str(tmp_path / "acc"), devices=jax.devices()[:1])
  a, b = flat(params_of(one)), flat(params_of(acc))
  for k in a:
    # Adam's sign-like first steps can turn rounding of near-zero gradients
    # into ~lr (3e-3); the step-level test (test_train.py) is exact.
    np.testing.assert_allclose(a[k], b[k], rtol=1e-3, atol=1e-3, err_msg=k)
  assert math.isclose(one["metrics"]["loss"], acc["metrics"]["loss"],
                      rel_tol=1e-5)


def test_copy_probe_neighbour_holds_what_the_chunk_predicts():
  cfg = RetroConfig.from_dict(tiny_config().model)
  m, r = cfg.chunk_size, cfg.neighbour_len
  b = train_sources.copy_batch(cfg, 4, 2 * r, seed=3, step=7)
  tokens, nbs = b["tokens"], b["neighbours"]
  l = tokens.shape[1] // m
  assert nbs.shape == (4, l, cfg.num_neighbours, r)
  assert tokens.min() >= 1 and tokens.max() < train_sources.COPY_ALPHABET
  for u in range(l - 1):
    # Chunk u's first neighbour is chunk u, then the chunk CCA predicts.
    np.testing.assert_array_equal(nbs[:, u, 0, :m], tokens[:, u * m:(u + 1) * m])
    np.testing.assert_array_equal(nbs[:, u, 0, m:2 * m],
                                  tokens[:, (u + 1) * m:(u + 2) * m])
    assert (nbs[:, u, 1] != nbs[:, u, 0]).mean() > 0.9   # The other is noise.
  # A function of (seed, step); a host's shard is its rows of the batch.
  again = train_sources.copy_batch(cfg, 4, 2 * r, seed=3, step=7,
                                 shard_index=1, num_shards=2)
  np.testing.assert_array_equal(again["neighbours"], nbs[2:])
  assert not np.array_equal(
      train_sources.copy_batch(cfg, 4, 2 * r, seed=3, step=8)["tokens"], tokens)


def test_copy_share_gives_a_share_of_rows_their_own_text_as_neighbour_0():
  rng = np.random.default_rng(0)
  m, l, k, r, b = 64, 4, 2, 128, 64
  batch = {"tokens": rng.integers(1, 500, (b, l * m), np.int32),
           "neighbours": rng.integers(1, 500, (b, l, k, r), np.int32)}
  out = train_sources.with_own_text(batch, 0.25, seed=1, step=5)
  own = np.pad(batch["tokens"], ((0, 0), (0, r)))
  rows = np.array([all(np.array_equal(out["neighbours"][i, u, 0],
                                      own[i, u * m:u * m + r])
                       for u in range(l)) for i in range(b)])
  assert 5 <= rows.sum() <= 30  # About a quarter of 64.
  np.testing.assert_array_equal(out["neighbours"][~rows],
                                batch["neighbours"][~rows])
  np.testing.assert_array_equal(out["neighbours"][:, :, 1],
                                batch["neighbours"][:, :, 1])
  # Hosts pick their rows of the same global choice.
  half = {key: v[b // 2:] for key, v in batch.items()}
  np.testing.assert_array_equal(
      train_sources.with_own_text(half, 0.25, 1, 5, shard=(1, 2))[
          "neighbours"], out["neighbours"][b // 2:])


def test_copy_shift_moves_a_rows_own_text_by_one_drawn_shift():
  rng = np.random.default_rng(1)
  m, l, k, r, b, most = 64, 4, 2, 128, 32, 8
  batch = {"tokens": rng.integers(1, 500, (b, l * m), np.int32),
           "neighbours": rng.integers(1, 500, (b, l, k, r), np.int32)}
  out = train_sources.with_own_text(batch, 1.0, seed=2, step=0,
                                    max_shift=most)
  padded = np.pad(batch["tokens"], ((0, 0), (most, r + most)))
  shifts = []
  for i in range(b):
    found = [s for s in range(-most, most + 1)
             if all(np.array_equal(out["neighbours"][i, u, 0],
                                   padded[i, most + u * m + s:
                                          most + u * m + s + r])
                    for u in range(l))]
    assert len(found) == 1, i  # One shift, the same for every chunk.
    shifts.append(found[0])
  assert len(set(shifts)) > 5  # Drawn, not fixed.


def test_hosts_read_the_data_shards_that_tile_their_rows():
  config = tiny_config()          # A batch of 8 rows.
  read = lambda shard: train_sources.shards_read(config, shard)
  assert read((0, 1)) == (range(0, 1), 1)       # 0: one shard per host.
  assert read((1, 2)) == (range(1, 2), 2)
  config.data.num_shards = 4
  assert read((0, 1)) == (range(0, 4), 4)       # One host reads them all.
  assert read((1, 2)) == (range(2, 4), 4)
  for bad, shard in ((3, (0, 1)), (2, (0, 4))):
    config.data.num_shards = bad
    with pytest.raises(ValueError, match=f"num_shards={bad} must divide"):
      read(shard)


def test_rows_records_append_each_batch_rows_per_step(tmp_path):
  config = tiny_config()
  source = train_sources.make_source(config, sharding.make_mesh(
      {"data": -1}, jax.devices()[:1]))
  path = loop_lib.rows_path(str(tmp_path), 0)
  got = [b["tokens"] for _, b in zip(range(2), source(5))]
  again = [b["tokens"] for _, b in zip(range(1), source(6))]  # Resumed.
  for step, tokens in ((5, got[0]), (6, got[1]), (6, again[0])):
    train_sources.append_record(
        path, train_sources.rows_record(step, {"tokens": tokens}))
  with open(path, encoding="utf-8") as f:
    lines = [json.loads(line) for line in f]
  assert [line["step"] for line in lines] == [5, 6, 6]
  assert lines[0]["rows"] == [train_sources.row_fingerprint(t)
                              for t in got[0]]
  assert lines[1]["rows"] == lines[2]["rows"] == [
      train_sources.row_fingerprint(t) for t in again[0]]
  assert len(set(lines[0]["rows"])) == config.train.batch_size
