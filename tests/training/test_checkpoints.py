"""retro_jax.training.checkpoints on real orbax: a state saved on one mesh
restores onto others bit for bit, keep-last-K, the run config (and old run
configs read in the present form), params-only restore."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from retro_jax import Retro, RetroConfig
from retro_jax.core import sharding
from retro_jax.training import checkpoints
from retro_jax.training import run_config
from retro_jax.training import step as step_lib

CFG = RetroConfig.preset("tiny", vocab_size=256, num_layers=2,
                         cca_layers=(2,), enc_num_layers=1)
BATCH = {"tokens": jax.ShapeDtypeStruct((8, 128), jnp.int32),
         "neighbours": jax.ShapeDtypeStruct((8, 2, 2, 128), jnp.int32)}


def setup(axes):
  model = Retro(CFG)
  opt = step_lib.make_optimizer(1e-3, warmup_steps=2, total_steps=10)
  mesh = sharding.make_mesh(axes)
  abstract, shardings, _ = step_lib.state_shardings(model, opt, mesh, BATCH)
  return model, opt, mesh, abstract, shardings


def random_state(abstract, shardings, seed=0):
  """A state with random values everywhere (moments too), in its sharding."""
  leaves, tree = jax.tree_util.tree_flatten(abstract)
  rng = np.random.default_rng(seed)
  values = [np.asarray(rng.standard_normal(x.shape), x.dtype)
            if jnp.issubdtype(x.dtype, jnp.floating)
            else np.full(x.shape, seed + 3, x.dtype) for x in leaves]
  host = jax.tree_util.tree_unflatten(tree, values)
  return jax.tree_util.tree_map(jax.device_put, host, shardings), host


def test_restores_onto_other_meshes(tmp_path):
  _, _, _, abstract, sh = setup({"data": 2, "fsdp": 2, "model": 2})
  state, host = random_state(abstract, sh)
  ckpt = checkpoints.Checkpointer(str(tmp_path), save_every=1, keep=2)
  assert ckpt.latest_step() is None
  assert ckpt.save(5, state, {"step": 5, "source": "synthetic", "seed": 0})
  ckpt.wait()
  ckpt.close()
  for axes in ({"data": 1, "fsdp": 8, "model": 1},
               {"data": 8, "fsdp": 1, "model": 1},
               {"data": 1, "fsdp": 2, "model": 4}):
    _, _, mesh, abstract2, sh2 = setup(axes)
    ckpt = checkpoints.Checkpointer(str(tmp_path), save_every=1, keep=2)
    assert ckpt.latest_step() == 5
    restored, position = ckpt.restore(
        checkpoints.abstract_with_shardings(abstract2, sh2))
    assert position == {"step": 5, "source": "synthetic", "seed": 0}
    assert isinstance(restored, step_lib.TrainState)
    for got, want, s in zip(jax.tree_util.tree_leaves(restored),
                            jax.tree_util.tree_leaves(host),
                            jax.tree_util.tree_leaves(sh2)):
      assert np.array_equal(np.asarray(got), want)
      assert got.sharding == s             # Placed on the new mesh.
    ckpt.close()


def test_keep_last_k_and_save_every(tmp_path):
  _, _, _, abstract, sh = setup({"data": -1})
  state, _ = random_state(abstract, sh)
  ckpt = checkpoints.Checkpointer(str(tmp_path), save_every=2, keep=2,
                                  async_save=True)
  saved = [s for s in range(1, 8) if ckpt.save(s, state, {"step": s})]
  assert saved == [2, 4, 6]
  assert ckpt.save(7, state, {"step": 7}, force=True)
  ckpt.wait()
  assert ckpt.all_steps() == [6, 7]
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["6", "7"]
  ckpt.close()


def test_run_config_and_params_only_restore(tmp_path):
  config = ml_collections.ConfigDict(
      {"model": CFG.to_dict(), "data": {"spm_path": "/x/spm.model",
                                        "db_dir": "/x/db"}})
  path = run_config.save_run_config(str(tmp_path), config)
  assert os.path.basename(path) == "config.json"
  loaded = run_config.load_run_config(str(tmp_path))
  assert RetroConfig.from_dict(loaded.model) == CFG
  assert loaded.data.db_dir == "/x/db"

  _, _, _, abstract, sh = setup({"data": 2, "fsdp": 2, "model": 2})
  ckpt = checkpoints.Checkpointer(str(tmp_path), save_every=1, keep=3,
                                  config=config)
  for step in (1, 2):
    ckpt.save(step, random_state(abstract, sh, seed=step)[0], {"step": step})
  ckpt.wait()
  assert ckpt.saved_config().data.spm_path == "/x/spm.model"
  ckpt.close()

  _, params, step = checkpoints.restore_params(str(tmp_path))
  want2 = random_state(abstract, sh, seed=2)[1].params
  assert step == 2
  for got, want in zip(jax.tree_util.tree_leaves(params),
                       jax.tree_util.tree_leaves(want2)):
    assert np.array_equal(np.asarray(got), want)
    assert len(got.sharding.device_set) == 1
  mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "model": 2})
  cfg, params, step = step_lib.restore_params(str(tmp_path), step=1, mesh=mesh)
  assert step == 1 and RetroConfig.from_dict(cfg.model) == CFG
  big = params["decoder/layer_00/mlp"]["w_in"]
  assert big.sharding.spec == sharding.P("fsdp", "model")
  # Ready-made target shardings (a tree matching the params).
  other = jax.sharding.SingleDeviceSharding(jax.devices()[3])
  _, params, _ = checkpoints.restore_params(
      str(tmp_path), shardings=jax.tree_util.tree_map(lambda _: other,
                                                      want2))
  assert all(p.sharding == other for p in jax.tree_util.tree_leaves(params))
  with pytest.raises(FileNotFoundError, match="no checkpoint of step 9"):
    checkpoints.restore_params(str(tmp_path), step=9)


def test_missing_run_config_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json: no run config"):
    run_config.load_run_config(str(tmp_path))
  with pytest.raises(ValueError, match="save_every must be >= 1"):
    checkpoints.Checkpointer(str(tmp_path), save_every=0, keep=1)


def test_old_run_config_reads_in_the_present_form(tmp_path):
  # config.json as runs wrote it before data.max_bytes took a mapping per
  # split and data.meta a mapping.
  old = {"model": CFG.to_dict(), "train": {"seq_len": 128},
         "data": {"source": "task", "max_bytes": 2_000_000,
                  "split_max_bytes": "validation=200000",
                  "meta_filter": "pile_set_name=ArXiv, lang=en",
                  "spm_model": "/x/spm.model", "db_dir": "/x/db"}}
  (tmp_path / "config.json").write_text(json.dumps(old))
  data = run_config.load_run_config(str(tmp_path)).data
  assert dict(data.max_bytes) == {"train": 2_000_000, "validation": 200_000}
  assert dict(data.meta) == {"pile_set_name": "ArXiv", "lang": "en"}
  assert data.spm_path == "/x/spm.model" and data.db_dir == "/x/db"
  assert not {"split_max_bytes", "meta_filter", "spm_model"} & set(data)

  old["data"].update(max_bytes=0, split_max_bytes="", meta_filter="")
  (tmp_path / "config.json").write_text(json.dumps(old))
  data = run_config.load_run_config(str(tmp_path)).data
  assert dict(data.max_bytes) == {"train": 0, "validation": 0}
  assert dict(data.meta) == {}

  old["data"]["split_max_bytes"] = "validation"
  (tmp_path / "config.json").write_text(json.dumps(old))
  with pytest.raises(ValueError, match=r"config\.json: data\.split_max_bytes "
                     r"item 'validation' is not key=value"):
    run_config.load_run_config(str(tmp_path))


def test_present_run_config_reads_back_unchanged(tmp_path):
  config = run_config.base_config()
  config.data.max_bytes.validation = 5
  config.data.meta = {"pile_set_name": "ArXiv"}
  run_config.save_run_config(str(tmp_path), config)
  assert not [f for f in os.listdir(tmp_path) if f != "config.json"]
  assert run_config.load_run_config(str(tmp_path)).to_dict() == json.loads(
      config.to_json_best_effort())
