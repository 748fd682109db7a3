"""retro_jax.training.memory_plan: exact state bytes per device (against the
real shardings on 8 simulated devices), activation estimate behaviour,
slices, and the script's table."""

import math
import os
import subprocess
import sys

import jax
import pytest

from retro_jax import Retro, RetroConfig
from retro_jax.core import sharding
from retro_jax.training import memory_plan
from retro_jax.training import step as step_lib
from conftest import REPO_ROOT


def test_parse_slice():
  assert memory_plan.parse_slice("v4-32") == (16, 32 * memory_plan.GIB)
  assert memory_plan.parse_slice("v5e-256") == (256, 16 * memory_plan.GIB)
  assert memory_plan.parse_slice("v5p-8")[0] == 4
  with pytest.raises(ValueError, match="unknown TPU slice 'v9-8'"):
    memory_plan.parse_slice("v9-8")
  with pytest.raises(ValueError, match="multiple of 2"):
    memory_plan.parse_slice("v4-3")


@pytest.mark.parametrize("axes", [{"data": 2, "fsdp": 2, "model": 2},
                                  {"data": 1, "fsdp": 8, "model": 1}])
def test_state_bytes_match_real_shardings(axes):
  cfg = RetroConfig.preset("tiny")
  model = Retro(cfg)
  optimizer = step_lib.make_optimizer(1e-4, 750, 10_000)
  mesh = sharding.make_mesh(axes)
  tokens, neighbours = model.dummy_inputs(8, 128)
  abstract, shardings, _ = step_lib.state_shardings(
      model, optimizer, mesh, {"tokens": tokens, "neighbours": neighbours})

  def on_device(tree, shs):
    return sum(math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
               for x, s in zip(jax.tree_util.tree_leaves(tree),
                               jax.tree_util.tree_leaves(shs)))
  got = memory_plan.state_bytes(cfg, memory_plan.abstract_mesh(axes, 8))
  assert got["params"] == on_device(abstract.params, shardings.params)
  assert got["opt_state"] == on_device(abstract.opt_state,
                                       shardings.opt_state)
  assert got["grads"] == got["params"]
  assert got["num_params"] == retro_jax_count(cfg)


def retro_jax_count(cfg):
  from retro_jax import count_params  # pylint: disable=g-import-not-at-top
  return count_params(cfg)


def test_7_5b_state_splits_over_fsdp():
  cfg = RetroConfig.preset("7.5b", scan_layers=True)
  mesh = memory_plan.abstract_mesh({"fsdp": -1}, 16)
  got = memory_plan.state_bytes(cfg, mesh)
  whole = got["num_params"] * 4
  assert whole / 16 <= got["params"] < 1.02 * whole / 16
  assert got["opt_state"] == pytest.approx(2 * got["params"], rel=1e-3)


def test_activation_estimate_scales():
  cfg = RetroConfig.preset("172m", compute_dtype="bfloat16")
  acts = {}
  for remat in ("none", "dots", "full"):
    c = cfg.replace(remat=remat)
    acts[remat] = memory_plan.activation_bytes(
        c, memory_plan.abstract_mesh({"fsdp": -1}, 16), 256, 2048)
  assert acts["full"] < acts["dots"] < acts["none"]
  wide = memory_plan.activation_bytes(
      cfg, memory_plan.abstract_mesh({"fsdp": -1}, 32), 256, 2048)
  assert wide == pytest.approx(acts["none"] / 2)   # Linear in b per device.
  accum = memory_plan.activation_bytes(
      cfg, memory_plan.abstract_mesh({"fsdp": -1}, 16), 256, 2048,
      accum_steps=4)
  assert accum == pytest.approx(acts["none"] / 4)
  f32 = memory_plan.activation_bytes(
      cfg.replace(compute_dtype="float32"),
      memory_plan.abstract_mesh({"fsdp": -1}, 16), 256, 2048)
  assert f32 > acts["none"]


def test_estimate_adds_gathered_vocabulary_and_accumulated_grads():
  """Terms XLA's buffer assignment showed once the step was compiled for
  TPU (retro_jax/training/aot.py): the [V, D] matrices gathered whole under
  fsdp, and two gradients when accumulating."""
  cfg = RetroConfig.preset("172m", compute_dtype="bfloat16")
  fsdp = memory_plan.abstract_mesh({"fsdp": -1}, 16)
  data = memory_plan.abstract_mesh({"data": -1}, 16)
  assert memory_plan.gathered_bytes(cfg, fsdp) == 2 * 128_000 * 896 * 2
  assert memory_plan.gathered_bytes(cfg.replace(tie_output=True), fsdp) == (
      128_000 * 896 * 2)
  assert memory_plan.gathered_bytes(cfg, data) == 0    # Nothing split.
  one = memory_plan.estimate(cfg, fsdp, 256, 2048)
  accum = memory_plan.estimate(cfg, fsdp, 256, 2048, accum_steps=8)
  state = memory_plan.state_bytes(cfg, fsdp)
  assert one["grads"] == state["grads"] and accum["grads"] == 2 * one["grads"]
  assert one["total"] == pytest.approx(
      sum(one[k] for k in ("params", "opt_state", "grads", "acts",
                           "gathered")))
  # Every CCA layer keeps its neighbours' keys and values, twice.
  base = memory_plan.activation_bytes(cfg.replace(cca_layers=(6, 9)), fsdp,
                                      256, 2048)
  more = memory_plan.activation_bytes(cfg, fsdp, 256, 2048)
  kv = 1 * 31 * 2 * 128 * 2 * 16 * 64 * 2                # b=1 per device.
  assert more - base > 2 * kv


def test_script_prints_table():   # ~15 s: one interpreter, eval_shape only.
  env = {**os.environ, "PYTHONPATH": REPO_ROOT, "TF_CPP_MIN_LOG_LEVEL": "3"}
  env.pop("XLA_FLAGS", None)
  out = subprocess.run(
      [sys.executable, os.path.join("scripts", "memory_plan.py"),
       "--sizes=172m,7.5b", "--slices=v4-32,v5e-256",
       "--mesh=data=16,fsdp=-1,model=1"],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = [l for l in out.stdout.splitlines() if l.startswith("| 7.5b")]
  assert len(rows) == 2 and "v4-32" in rows[0] and "16x1x1" in rows[0]
  assert "v5e-256" in rows[1] and "16x16x1" in rows[1]
