"""Ahead-of-time checks of the train step.

retro_jax.training.aot: the real step compiled by XLA's TPU compiler for a
v5e-4 slice on this CPU host (libtpu, the `tpu` extra, installed by
scripts/setup_env.sh), through the library and through
scripts/train_compile.py: its per-chip argument bytes are the sharded state
and batch in the compiled layouts, the donated state aliases the outputs,
its FLOPs match the analytic count; bad input is one `error:` line. And the
largest preset's init and step lower on a simulated 8-device mesh.
"""

import json
import math
import os
import subprocess
import sys

import jax
from jax.experimental.layout import Layout
import jax.numpy as jnp
import pytest

import retro_jax
from retro_jax.config import RetroConfig
from retro_jax.core import sharding
from retro_jax.model import flops
from retro_jax.training import aot
from retro_jax.training import memory_plan
from retro_jax.training import run_config
from retro_jax.training import step as step_lib
from conftest import REPO_ROOT

aot.prepare_host()   # Before this process loads libtpu (conftest: CPU only).
TINY = os.path.join(REPO_ROOT, "configs", "tiny.py")
SCRIPT = os.path.join(REPO_ROOT, "scripts", "train_compile.py")


def _tiny_config(**mesh):
  config = run_config.load_config_file(TINY)
  config.mesh.update(mesh)
  return config


def _script(*flags, timeout=600):
  return subprocess.run([sys.executable, SCRIPT, f"--config={TINY}", *flags],
                        cwd=REPO_ROOT, capture_output=True, text=True,
                        timeout=timeout, env={**os.environ,
                                              "PYTHONPATH": REPO_ROOT})


def test_topology_names():
  assert aot.parse_topology("v4-32")[1] == "v4:2x2x4"     # 16 chips.
  assert aot.parse_topology("v4-8")[1] == "v4:2x2x1"
  assert aot.parse_topology("v4-128")[1] == "v4:4x4x4"
  assert aot.parse_topology("v5e-256")[1] == "v5e:16x16"  # Names count chips.
  assert aot.parse_topology("v5litepod-8")[1] == "v5e:2x4"
  assert aot.parse_topology("v5e:4x8")[1] == "v5e:4x8"
  assert aot.parse_topology("v4-32")[2]["chip_config_name"] == "megacore"
  for bad, what in (("v9-8", "expected a slice"), ("v4-3", "TensorCores"),
                    ("v5e-12", "not a v5e slice size")):
    with pytest.raises(ValueError, match=f"--topology={bad}: .*{what}"):
      aot.parse_topology(bad)


def test_topology_devices_are_chips():
  """A v4 slice name counts TensorCores; JAX sees one device per chip."""
  gen, topo, devices = aot.topology_devices("v4-32")
  assert (gen, topo, len(devices)) == ("v4", "v4:2x2x4", 16)
  assert devices[0].device_kind == "TPU v4"
  with pytest.raises(ValueError, match=r"--topology=v5e:3x3: libtpu has no"):
    aot.topology_devices("v5e:3x3")


def test_padded_bytes_in_tpu_layouts():
  """Layouts XLA:TPU chose for these shapes (v5e): minor dimensions padded
  to the first tile; a [512, 64] matrix stored transposed pads nothing."""
  f32, bf16 = jnp.float32, jnp.bfloat16
  assert aot.padded_bytes((), jnp.int32, Layout((), ((128,),))) == 512
  assert aot.padded_bytes((3, 64), f32, Layout((0, 1), ((4, 128),))) == (
      4 * 128 * 4)
  assert aot.padded_bytes((512, 64), f32, Layout((1, 0), ((8, 128),))) == (
      512 * 64 * 4)
  assert aot.padded_bytes((4, 2, 4, 16), f32, Layout(
      (0, 1, 2, 3), ((4, 128),))) == 4 * 2 * 4 * 128 * 4
  assert aot.padded_bytes((100,), bf16, Layout(
      (0,), ((256,), (128,), (2, 1)))) == 256 * 2


def test_bad_mesh_and_batch_name_the_field():
  with pytest.raises(ValueError, match=r"config.train.batch_size=6 .* data "
                     r"x fsdp = 4 devices of v5e:2x2"):
    config = _tiny_config()
    config.train.batch_size = 6
    aot.compile_train_step(config, "v5e-4")
  with pytest.raises(ValueError, match=r"config.mesh on v5e:2x2 \(4 devices"):
    aot.compile_train_step(_tiny_config(model=3), "v5e-4")


def test_flops_as_xla_counts_loops_once():
  cfg = RetroConfig.preset("172m")            # CCA in layers 6, 9 and 12.
  full = aot.flops_as_xla_counts(cfg, 8, 2048)
  assert full == pytest.approx(
      flops.train_flops(cfg, 8, 2048)["total"])
  # Scanned: the runs 1-5, 7-8 and 10-11 count one layer each.
  parts = flops.train_flops(cfg, 8, 2048)
  per_layer = (parts["decoder_dense"] + parts["decoder_self_attention"]) / 12
  scanned = aot.flops_as_xla_counts(cfg.replace(scan_layers=True), 8, 2048)
  assert full - scanned == pytest.approx(6 * per_layer)
  assert aot.flops_as_xla_counts(cfg, 8, 2048, accum_steps=4) == (
      pytest.approx(full / 4))
  remat = aot.flops_as_xla_counts(cfg.replace(remat="full"), 8, 2048)
  assert remat - full == pytest.approx((full - parts["logits"]) / 3)


def test_script_bad_topology_is_one_line():
  proc = _script("--topology=v9-8")
  assert proc.returncode == 1, proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
  assert "error: --topology=v9-8: expected a slice" in proc.stderr


@pytest.fixture(scope="module")
def tiny_v5e_4():
  """The tiny run compiled for a v5e-4 slice, its state sharded 4 ways."""
  config = _tiny_config(data=1, fsdp=4)
  return config, aot.compile_train_step(config, "v5e-4")


@pytest.mark.slow
def test_compiled_arguments_are_the_sharded_state(tiny_v5e_4):
  config, r = tiny_v5e_4
  assert (r["topology"], r["devices"], r["mesh"]) == (
      "v5e:2x2", 4, {"data": 1, "fsdp": 4, "model": 1})
  assert r["device_kind"] == "TPU v5 lite"
  # XLA's argument bytes are exactly the state and batch shards, in the
  # layouts it chose (padded to TPU tiles): each chip holds its shards of
  # the weights, not a replica (whose padded bytes would differ).
  assert r["xla_argument_bytes"] == r["expected_argument_bytes"]
  cfg = RetroConfig.from_dict(config.model)
  whole = 3 * 4 * retro_jax.count_params(cfg)           # params, mu, nu.
  plan_state = memory_plan.state_bytes(
      cfg, memory_plan.abstract_mesh(dict(config.mesh), 4))
  assert plan_state["params"] + plan_state["opt_state"] < 0.3 * whole
  # Padding adds to memory_plan's exact, unpadded state: tiny's 64-wide
  # rows split 4 ways are 16 wide, and a TPU tile is 128 lanes.
  assert plan_state["params"] + plan_state["opt_state"] < r[
      "expected_state_bytes"] < whole
  # The state is donated: every state argument is reused for its output.
  assert r["xla_alias_bytes"] == r["expected_state_bytes"]
  assert r["xla_temp_bytes"] > 0 and r["xla_code_bytes"] > 0


@pytest.mark.slow
def test_compiled_flops_match_the_analytic_count(tiny_v5e_4):
  _, r = tiny_v5e_4
  # XLA also counts elementwise work (norms, softmax, Adam): a few percent.
  assert 1.0 <= r["xla_flops"] / r["analytic_flops"] < 1.15, r
  assert r["analytic_flops_as_xla_counts"] == r["analytic_flops"]
  text = aot.format_result(r)
  assert "v5e:2x2: 4 x TPU v5 lite (16 GiB HBM each)" in text
  assert "fits HBM" in text


@pytest.mark.slow
def test_script_compiles_scanned_accumulated_step(tmp_path):
  """Through the script: a scanned run of 3 layers and 2 micro-batches,
  loops whose bodies XLA's cost analysis counts once."""
  out = tmp_path / "r.json"
  proc = _script("--topology=v5e:2x2", "--config.model.cca_layers=(4,)",
                 "--config.model.scan_layers=True",
                 "--config.train.accum_steps=2", f"--json={out}")
  assert proc.returncode == 0, proc.stderr
  r = json.loads(out.read_text())
  assert r["analytic_flops_as_xla_counts"] < 0.5 * r["analytic_flops"]
  assert 1.0 <= r["xla_flops"] / r["analytic_flops_as_xla_counts"] < 1.15, r
  assert r["xla_argument_bytes"] == r["expected_argument_bytes"]
  assert "FLOPs per step" in proc.stdout and "compile" in proc.stdout


@pytest.mark.slow
def test_7_5b_init_and_step_lower_sharded():
  """The largest preset on a simulated 8-device CPU mesh: the sharding
  rules cover every parameter, the state splits across devices, and init
  and one train step lower without allocating anything."""
  cfg = retro_jax.RetroConfig.preset("7.5b", scan_layers=True, remat="full",
                                     compute_dtype="bfloat16")
  model = retro_jax.Retro(cfg)
  optimizer = step_lib.make_optimizer(1e-4, warmup_steps=750,
                                      total_steps=10_000)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "model": 2})
  b, n = 8, 2048
  batch = {"tokens": jax.ShapeDtypeStruct((b, n), jnp.int32),
           "neighbours": jax.ShapeDtypeStruct((b, n // 64, 2, 128),
                                              jnp.int32)}
  abstract, state_sh, unmatched = step_lib.state_shardings(
      model, optimizer, mesh, batch, strict=True)
  assert not unmatched

  # Bytes of the train state one device holds, from the shardings alone.
  def per_device(leaf, sh):
    shard = sh.shard_shape(leaf.shape)
    return math.prod(shard) * leaf.dtype.itemsize

  total = sum(math.prod(x.shape) * x.dtype.itemsize
              for x in jax.tree_util.tree_leaves(abstract))
  mine = sum(jax.tree_util.tree_leaves(
      jax.tree_util.tree_map(per_device, abstract, state_sh)))
  assert total > 80e9                     # ~7.5B params x (param, mu, nu).
  assert mine < total / 6, (mine, total)  # Split ~8 ways (norms replicated).

  with jax.set_mesh(mesh):
    init = jax.jit(lambda r, bt: step_lib.init_state(model, optimizer, r, bt),
                   out_shardings=state_sh)
    init.lower(jax.ShapeDtypeStruct((), jax.random.key(0).dtype), batch)
    step = step_lib.jit_train_step(model, optimizer, mesh, state_sh, batch)
    text = step.lower(abstract, batch).as_text()
  assert "sharding" in text
